"""clrun: continual-learning experiments from one Hydra config, on PyTorch or JAX."""

__version__ = "0.1.0"
