"""bitsandbytes: the optimizer base class ColossalAI's GaLore module subclasses (training only).

`__version__` is below every bitsandbytes feature ColossalAI checks, so it never enables quantization.
"""

__version__ = "0.0.0"
