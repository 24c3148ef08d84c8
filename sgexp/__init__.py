"""sgexp: train token-sparse (TREAD-routed) diffusion transformers and study Sparse Guidance."""

__version__ = "0.1.0"
