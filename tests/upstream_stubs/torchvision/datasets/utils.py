"""torchvision.datasets.utils: downloads are refused (the tests are offline and pass local weights)."""


def download_url(url, root, filename=None, md5=None, max_redirect_hops=3):
    raise RuntimeError(f"torchvision stand-in: no downloads in the tests (asked for {url})")
