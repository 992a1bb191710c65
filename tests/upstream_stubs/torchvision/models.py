"""torchvision.models: no pretrained networks here (Open-Sora's LPIPS loss, training only, asks for vgg16)."""


def vgg16(*_args, **_kwargs):
    raise NotImplementedError("torchvision stand-in: no pretrained models in the tests")
