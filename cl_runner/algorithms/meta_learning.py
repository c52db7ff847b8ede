"""Schema of La-MAML (Gupta et al. 2020, "La-MAML: Look-ahead Meta Learning for Continual
Learning", NeurIPS).

Every key of the SequeL experiment file ``lamaml_rotatedmnist.yaml`` has its meaning here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cl_runner.algorithms import register_algo
from cl_runner.config.schema import AlgoConfig
from cl_runner.errors import ConfigError


@register_algo("lamaml", paper="Gupta et al. 2020, NeurIPS (La-MAML)",
               summary="look-ahead meta-learning with learnable per-parameter learning rates")
@dataclass
class LaMAMLConfig(AlgoConfig):
    name: str = "lamaml"
    # Passes over each incoming batch (the paper's "glances").
    glances: int = 5
    # Inner-loop SGD updates per meta-update (the incoming batch is split into this many parts).
    n_inner_updates: int = 5
    # Back-propagate through the inner updates (second-order) or not (first-order).
    second_order: bool = False
    # Clip the meta-gradient's global norm to this value (null: no clipping).
    grad_clip_norm: Optional[float] = 2.0
    # Learn the per-parameter learning rates (alpha); otherwise they stay at lr_alpha.
    learn_lr: bool = True
    # Initial per-parameter inner learning rate alpha, and the learning rate of alpha itself.
    lr_alpha: float = 0.3
    # Update the weights together with the learning rates (true) or with the learnt rates
    # after they are updated (false, La-MAML's asynchronous update).
    sync_update: bool = False
    # Episodic memory size (reservoir sampling over the stream).
    mem_size: int = 200
    # Memory samples joined to each incoming batch to form the meta-batch (null: the batch size).
    replay_batch_size: Optional[int] = None

    @staticmethod
    def check(algo) -> None:
        for key in ("glances", "n_inner_updates", "mem_size"):
            if getattr(algo, key) < 1:
                raise ConfigError(f"algo.{key} must be at least 1, got {getattr(algo, key)}.")
        if algo.replay_batch_size is not None and algo.replay_batch_size < 1:
            raise ConfigError(f"algo.replay_batch_size must be at least 1 (or null for the batch size), "
                              f"got {algo.replay_batch_size}.")
        if algo.grad_clip_norm is not None and algo.grad_clip_norm <= 0:
            raise ConfigError(f"algo.grad_clip_norm must be positive (or null for no clipping), "
                              f"got {algo.grad_clip_norm}.")
        if algo.lr_alpha <= 0:
            raise ConfigError(f"algo.lr_alpha must be positive, got {algo.lr_alpha}.")
