"""duca-video: Open-Sora 1.2 (STDiT3) video generation with Dual Feature Caching."""

__version__ = "0.1.0"
