"""galore_torch: the two optimizer names ColossalAI's optimizer package imports (training only)."""


class GaLoreAdamW:
    def __init__(self, *_args, **_kwargs):
        raise NotImplementedError("galore_torch stand-in: optimizers are not available in the tests")


class GaLoreAdafactor(GaLoreAdamW): ...
