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
    """The defaults are the authors' MNIST La-MAML (montrealrobotics/La-MAML, model/lamaml.py and
    run_experiments.sh:22-23)."""

    name: str = "lamaml"
    # Passes over each incoming batch (the paper's "glances").
    glances: int = 5
    # Inner-loop SGD updates per meta-update. null: one single-sample update per sample of the
    # incoming batch (model/lamaml.py:81-85); k: the batch split into k pieces (torch.tensor_split
    # sizes), one update per piece (lamaml_cifar.py's cifar_batches; the SequeL listing's 5).
    n_inner_updates: Optional[int] = None
    # Back-propagate through the inner updates (second-order) or not (first-order).
    second_order: bool = False
    # Clip the two meta-gradients (weights, learning rates), each to this global norm (null: no
    # clipping; model/lamaml.py:99-100).
    grad_clip_norm: Optional[float] = 2.0
    # Clip each inner gradient element-wise to +-this value (null: no clipping: model/lamaml.py:51-52
    # computes a clamp and discards it; lamaml_cifar.py:82-83 clamps to grad_clip_norm).
    inner_grad_clip: Optional[float] = None
    # Learn the per-parameter learning rates alpha; otherwise they stay at alpha_init.
    learn_lr: bool = True
    # Initial value of every per-parameter learning rate alpha (--alpha_init; 0.15 in the MNIST
    # La-MAML runs).
    alpha_init: float = 0.15
    # Learning rate of alpha itself (--opt_lr; 0.3 in the MNIST La-MAML runs).
    lr_alpha: float = 0.3
    # Update the weights with the configured optimizer on the meta-gradient (true, --sync_update)
    # or by theta <- theta - relu(alpha) * grad with the updated alpha (false, La-MAML's
    # asynchronous update).
    sync_update: bool = False
    # Episodic memory size (reservoir sampling over the stream).
    mem_size: int = 200
    # Memory samples joined to each incoming batch to form the meta-batch (null: the batch size).
    replay_batch_size: Optional[int] = None

    @staticmethod
    def check(algo) -> None:
        for key in ("glances", "mem_size"):
            if getattr(algo, key) < 1:
                raise ConfigError(f"algo.{key} must be at least 1, got {getattr(algo, key)}.")
        if algo.n_inner_updates is not None and algo.n_inner_updates < 1:
            raise ConfigError(f"algo.n_inner_updates must be at least 1 (or null: one update per sample), "
                              f"got {algo.n_inner_updates}.")
        if algo.replay_batch_size is not None and algo.replay_batch_size < 1:
            raise ConfigError(f"algo.replay_batch_size must be at least 1 (or null for the batch size), "
                              f"got {algo.replay_batch_size}.")
        for key in ("grad_clip_norm", "inner_grad_clip"):
            value = getattr(algo, key)
            if value is not None and value <= 0:
                raise ConfigError(f"algo.{key} must be positive (or null for no clipping), got {value}.")
        if algo.lr_alpha <= 0:
            raise ConfigError(f"algo.lr_alpha must be positive, got {algo.lr_alpha}.")
        if algo.alpha_init < 0:
            raise ConfigError(f"algo.alpha_init must be 0 or more, got {algo.alpha_init}.")
