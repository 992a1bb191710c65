"""torchvision.transforms: Open-Sora builds these only for reference images and training data, not used here."""


class _Unavailable:
    def __init__(self, *_args, **_kwargs):
        raise NotImplementedError(f"torchvision stand-in: transforms.{type(self).__name__} is not available")


class Compose(_Unavailable): ...


class Lambda(_Unavailable): ...


class Normalize(_Unavailable): ...


class ToTensor(_Unavailable): ...


class Resize(_Unavailable): ...


class CenterCrop(_Unavailable): ...
