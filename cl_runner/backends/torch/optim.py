"""Optimizers for the PyTorch backend; the rate of each task and epoch is cl_runner/core/schedule.py's."""

from __future__ import annotations

import torch

from cl_runner.core.schedule import task_lr  # noqa: F401  (re-exported: the per-task rate)
from cl_runner.registry import OPTIMIZERS


@OPTIMIZERS.register("sgd", backend="torch")
def sgd(params, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov, foreach=True)


@OPTIMIZERS.register("adam", backend="torch")
def adam(params, cfg) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            foreach=True)


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.type, backend="torch")(params, cfg)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
