"""The backend-independent face of a continual learner (an algorithm bound to a model).

The :class:`~cl_runner.core.loop.ContinualLoop` drives a learner through a stream. Each backend
implements ``train_epoch`` and ``evaluate`` once in its base learner; an algorithm then
overrides hooks (``on_before_task``, ``on_after_training``, ...) and the backend's step-level
extension points for what is particular to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Learner(ABC):
    backend: str = "?"

    def __init__(self, cfg, stream):
        self.cfg = cfg
        self.stream = stream
        self.loop = None  # set by the loop

    # -- hooks (same names as the callbacks', without the loop argument) ------------------------
    def on_before_fit(self) -> None: ...
    def on_after_fit(self) -> None: ...
    def on_before_task(self, task) -> None: ...
    def on_after_task(self, task) -> None: ...
    def on_before_epoch(self, task, epoch: int) -> None: ...
    def on_after_epoch(self, task, epoch: int, stats: dict) -> None: ...
    def on_before_training(self, task) -> None: ...
    def on_after_training(self, task) -> None: ...
    def on_before_eval(self, task) -> None: ...
    def on_after_eval(self, task, accuracies: dict[int, float]) -> None: ...

    # -- what a backend implements -----------------------------------------------------------
    @abstractmethod
    def train_epoch(self, task, epoch: int) -> dict:
        """Train one epoch on ``task``; return at least {"steps": int, "loss": float}."""

    @abstractmethod
    def evaluate(self, tasks, task_il: bool = False) -> dict[int, float]:
        """Accuracy (percent) on each task's test set, keyed by task id. ``task_il``: predict
        each task's samples among its own classes' output units only, as the task-IL scenario
        does (``training.eval_task_il``: the task-IL accuracy of a class-IL run)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training: model, optimizer, algorithm state, RNGs."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def num_parameters(self) -> int:
        return 0

    def describe(self) -> str:
        return type(self).__name__
