"""torchvision.datasets.folder: the image suffixes and the RGB loader that Open-Sora's datasets import."""

from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def pil_loader(path):
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")
