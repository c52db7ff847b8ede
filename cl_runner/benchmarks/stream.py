"""A continual-learning stream: tasks of already-transformed arrays, framework-independent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Task:
    """One task: uint8 images (N, C, H, W) and int64 labels in the stream's output space.

    ``classes`` are the output units this task's labels use; in task-IL the model's logits are
    restricted to them (one head per task, realised as a slice of a shared output layer).
    """

    id: int
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return int(len(self.train_y))

    @property
    def num_test(self) -> int:
        return int(len(self.test_y))


@dataclass
class Stream:
    name: str
    scenario: str
    tasks: list[Task]
    num_outputs: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def masks_logits(self) -> bool:
        """True in task-IL: predictions and losses use only the current task's output units."""
        return self.scenario == "task_il"

    def describe(self) -> str:
        n = sum(t.num_train for t in self.tasks)
        return (f"{self.name} ({self.scenario}): {self.num_tasks} tasks, {n} training samples, "
                f"{self.num_outputs} output units, input {self.input_shape}")
