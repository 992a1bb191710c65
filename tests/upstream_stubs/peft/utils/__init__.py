from . import other, save_and_load  # noqa: F401
