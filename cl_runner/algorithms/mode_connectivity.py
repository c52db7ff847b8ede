"""Schema of Mode Connectivity SGD (Mirzadeh et al. 2021, "Linear Mode Connectivity in
Multitask and Continual Learning", ICLR).

Every key of the SequeL experiment file ``mcsgd_rotatedmnist.yaml`` has its meaning here.
"""

from __future__ import annotations

from dataclasses import dataclass

from cl_runner.algorithms import register_algo
from cl_runner.config.schema import AlgoConfig


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
