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
    # How the task images derive from the source splits where they are pixel remaps
    # (a benchmarks.pixels.GatherPlan): the disk cache stores this instead of the pixels.
    plan: Any = field(default=None, repr=False, compare=False)
    # Which pixel-gather path made the remapped images, and why (pixels.gather_all's record;
    # None where no task is a pixel remap). results.json stores it under kernels.gather.
    gather: Any = field(default=None, repr=False, compare=False)

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


def training_arrays(stream: Stream, task: Task, joint_mode: str | None = None):
    """(x, y, task ids) to train on at ``task``: its own data, or for joint training the union
    of tasks 0..t (``cumulative``), or of all tasks at the last one and nothing before (``final``)."""
    if joint_mode is None:
        return task.train_x, task.train_y, np.full(task.num_train, task.id, dtype=np.int64)
    if joint_mode == "final" and task.id != stream.num_tasks - 1:
        return task.train_x[:0], task.train_y[:0], np.zeros(0, dtype=np.int64)
    seen = stream.tasks[: task.id + 1]
    x = np.concatenate([np.asarray(t.train_x) for t in seen])
    y = np.concatenate([np.asarray(t.train_y) for t in seen])
    tid = np.concatenate([np.full(t.num_train, t.id, dtype=np.int64) for t in seen])
    return x, y, tid
