"""Optimizers for the PyTorch backend and the per-task learning-rate schedule."""

from __future__ import annotations

import torch

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


def task_lr(cfg, task_index: int) -> float:
    """Learning rate for task ``task_index`` (from 0): lr * lr_decay ** t, at least lr_min."""
    return max(cfg.lr * cfg.lr_decay ** task_index, cfg.lr_min)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
