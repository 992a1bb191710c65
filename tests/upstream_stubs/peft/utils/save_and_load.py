def get_embedding_layer_name(*_args, **_kwargs):
    return None


def has_valid_embedding_base_layer(*_args, **_kwargs):
    return False
