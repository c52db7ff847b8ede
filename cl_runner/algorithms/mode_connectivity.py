"""Schema of Mode Connectivity SGD (Mirzadeh et al. 2021, "Linear Mode Connectivity in
Multitask and Continual Learning", ICLR).

Every key of the SequeL experiment file ``mcsgd_rotatedmnist.yaml`` has its meaning here.
"""

from __future__ import annotations

from dataclasses import dataclass

from cl_runner.algorithms import register_algo
from cl_runner.config.schema import AlgoConfig
from cl_runner.errors import ConfigError


@register_algo("mcsgd", paper="Mirzadeh et al. 2021, ICLR (MC-SGD)", scenarios=("domain_il", "task_il"),
               summary="line search between the continual minimum and a memory-based multitask minimum")
@dataclass
class MCSGDConfig(AlgoConfig):
    name: str = "mcsgd"
    # Samples of each task kept in the episodic memory.
    per_task_memory_samples: int = 100
    # offline: the mode-connectivity step runs once at the end of each task.
    lmc_policy: str = "offline"
    # Path between the two minima: linear.
    lmc_interpolation: str = "linear"
    # SGD learning rate / momentum / batch size of the mode-connectivity optimisation.
    lmc_lr: float = 0.05
    lmc_momentum: float = 0.8
    lmc_batch_size: int = 64
    # Starting point on the line between the previous solution (0) and the new one (1).
    lmc_init_position: float = 0.1
    # Points sampled along the line whose losses are averaged at each mode-connectivity step.
    lmc_line_samples: int = 10
    # Epochs over the memory (plus the current task) of the mode-connectivity optimisation.
    lmc_epochs: int = 1
    # Per-task decay of the continual (first-stage) learning rate: lr * lr_decay ** t.
    lr_decay: float = 1.0

    @staticmethod
    def check(algo) -> None:
        if algo.lmc_policy != "offline":
            raise ConfigError(f"algo.lmc_policy: '{algo.lmc_policy}' is not supported; the only policy is "
                              f"'offline' (the mode-connectivity stage runs once at the end of each task).")
        if algo.lmc_interpolation != "linear":
            raise ConfigError(f"algo.lmc_interpolation: '{algo.lmc_interpolation}' is not supported; the only "
                              f"path is 'linear'.")
        for key in ("per_task_memory_samples", "lmc_batch_size", "lmc_line_samples"):
            if getattr(algo, key) < 1:
                raise ConfigError(f"algo.{key} must be at least 1, got {getattr(algo, key)}.")
        if algo.lmc_epochs < 0:
            raise ConfigError(f"algo.lmc_epochs must be >= 0 (0 skips the mode-connectivity stage), "
                              f"got {algo.lmc_epochs}.")
        if algo.lmc_lr <= 0:
            raise ConfigError(f"algo.lmc_lr must be positive, got {algo.lmc_lr}.")
        if not 0 <= algo.lmc_momentum < 1:
            raise ConfigError(f"algo.lmc_momentum must be in [0, 1), got {algo.lmc_momentum}.")
        if not 0 <= algo.lmc_init_position <= 1:
            raise ConfigError(f"algo.lmc_init_position must be in [0, 1] (0: the previous solution, 1: the "
                              f"new task's), got {algo.lmc_init_position}.")
        if algo.lr_decay <= 0:
            raise ConfigError(f"algo.lr_decay must be positive, got {algo.lr_decay}.")
