"""The PyTorch backend."""

from __future__ import annotations

import torch

from cl_runner.backends.torch import algorithms, backbones, learner, optim  # noqa: F401
from cl_runner.errors import ConfigError
from cl_runner.registry import ALGORITHMS

NAME = "torch"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for but PyTorch sees no CUDA device; "
                          f"use device=cpu or device=auto.")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_learner(cfg, stream, device: torch.device, seed: int):
    cls = ALGORITHMS.get(cfg.algo.name, backend=NAME)
    return cls(cfg, stream, device, seed)


def versions() -> dict:
    return {"torch": torch.__version__}
