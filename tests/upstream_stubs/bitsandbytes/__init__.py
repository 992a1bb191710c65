"""bitsandbytes: the optimizer base class ColossalAI's GaLore module subclasses (training only).

`__version__` is below every bitsandbytes feature ColossalAI checks, so it never enables quantization.
"""

__version__ = "0.0.0"

# Imported with the package, as the real one does: the real mmengine (Open-Sora 1.2's environment) lists
# `bitsandbytes.optim` when a package of that name is importable, and finds no optimizer here to register.
from . import optim  # noqa: E402, F401
