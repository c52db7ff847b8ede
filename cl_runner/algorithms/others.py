"""Schemas of Stable SGD, Progressive Neural Networks and Kernel Continual Learning."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from cl_runner.algorithms import register_algo
from cl_runner.config.schema import AlgoConfig
from cl_runner.errors import ConfigError


@register_algo("stable_sgd", paper="Mirzadeh et al. 2020, NeurIPS (Understanding the Role of Training "
               "Regimes in Continual Learning)",
               summary="naive SGD with the stable regime: dropout, a large initial lr decayed per task, "
               "small batches")
@dataclass
class StableSGDConfig(AlgoConfig):
    name: str = "stable_sgd"
    # Each key below replaces the setting it names (null keeps that section's own value). The
    # defaults are the paper's Permuted/Rotated MNIST regime.
    # Dropout after every hidden layer of the backbone (replaces backbone.dropout).
    dropout: Optional[float] = 0.5
    # Learning rate of the first task (replaces optimizer.lr).
    lr: Optional[float] = 0.1
    # lr of task t = lr * lr_decay ** t (replaces optimizer.lr_decay; the paper's gamma).
    lr_decay: Optional[float] = 0.8
    # Mini-batch size (replaces benchmark.batch_size).
    batch_size: Optional[int] = 10

    @staticmethod
    def check(algo) -> None:
        if algo.dropout is not None and not 0 <= algo.dropout < 1:
            raise ConfigError(f"config key 'algo.dropout' must be in [0, 1), got {algo.dropout}.")
        if algo.lr is not None and algo.lr <= 0:
            raise ConfigError(f"config key 'algo.lr' must be positive (or null to keep optimizer.lr), got {algo.lr}.")
        if algo.lr_decay is not None and not 0 < algo.lr_decay <= 1:
            raise ConfigError(f"config key 'algo.lr_decay' must be in (0, 1], got {algo.lr_decay}.")
        if algo.batch_size is not None and algo.batch_size <= 0:
            raise ConfigError(f"config key 'algo.batch_size' must be positive (or null to keep "
                              f"benchmark.batch_size), got {algo.batch_size}.")


@register_algo("pnn", paper="Rusu et al. 2016, arXiv:1606.04671 (Progressive Neural Networks)",
               scenarios=("task_il", "domain_il"),
               summary="a new MLP column per task with adapters from the frozen earlier columns; the task id "
               "picks the column")
@dataclass
class PNNConfig(AlgoConfig):
    name: str = "pnn"
    # Lateral connections: adapter (the paper's: U sigma(V (alpha * h)), a learned scalar alpha and a
    # projection V of the earlier columns' units) or linear (U h, the basic formulation).
    lateral: str = "adapter"

    @staticmethod
    def check(algo) -> None:
        if algo.lateral not in ("adapter", "linear"):
            raise ConfigError(f"config key 'algo.lateral': '{algo.lateral}' is not one of adapter, linear.")


@register_algo("kcl", paper="Derakhshani et al. 2021, ICML (Kernel Continual Learning)",
               scenarios=("task_il",),
               summary="per-task kernel ridge regression on a coreset with variational random Fourier "
               "features")
@dataclass
class KCLConfig(AlgoConfig):
    name: str = "kcl"
    # Training samples of each task held out as its coreset (not trained on as queries).
    coreset_size: int = 200
    # Random Fourier features D (the paper's d_rn_f).
    num_features: int = 1024
    # Weight of KL(q(omega | coreset) || p(omega | batch)) (the paper's tau).
    kl_weight: float = 0.01
    # Initial ridge strength lambda of every task (learned; |lambda| + 0.01 is used).
    ridge_lambda: float = 0.1
    # Hidden width of the amortised inference networks (null: the feature dimension).
    inference_width: Optional[int] = None

    @staticmethod
    def check(algo) -> None:
        for key in ("coreset_size", "num_features"):
            if getattr(algo, key) <= 0:
                raise ConfigError(f"config key 'algo.{key}' must be positive, got {getattr(algo, key)}.")
        if algo.kl_weight < 0:
            raise ConfigError(f"config key 'algo.kl_weight' must be non-negative, got {algo.kl_weight}.")
        if algo.inference_width is not None and algo.inference_width <= 0:
            raise ConfigError(f"config key 'algo.inference_width' must be positive (or null), "
                              f"got {algo.inference_width}.")


def apply_regime(cfg):
    """A copy of ``cfg`` with the stable regime's keys written into the sections they replace."""
    cfg = copy.deepcopy(cfg)
    algo = cfg.algo
    if algo.dropout is not None:
        cfg.backbone.dropout = float(algo.dropout)
    if algo.lr is not None:
        cfg.optimizer.lr = float(algo.lr)
    if algo.lr_decay is not None:
        cfg.optimizer.lr_decay = float(algo.lr_decay)
    if algo.batch_size is not None:
        cfg.benchmark.batch_size = int(algo.batch_size)
    return cfg
