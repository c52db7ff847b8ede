"""The one control flow every backend and algorithm runs through."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cl_runner.core.callbacks import Callback, overrides


@dataclass
class LoopState:
    num_tasks: int
    task: int = -1
    epoch: int = -1
    global_step: int = 0
    acc_matrix: np.ndarray = None  # (T, T), NaN where not evaluated
    initial_acc: np.ndarray | None = None
    train_time_s: list = field(default_factory=list)
    eval_time_s: list = field(default_factory=list)
    task_time_s: list = field(default_factory=list)
    steps_per_task: list = field(default_factory=list)
    epoch_losses: list = field(default_factory=list)  # [task][epoch] mean training loss
    completed_tasks: int = 0
    # training.eval_task_il (class-IL streams): the same matrix with each task evaluated on its
    # own classes' output units only; None when not asked for.
    acc_matrix_task_il: np.ndarray | None = None

    def __post_init__(self):
        if self.acc_matrix is None:
            self.acc_matrix = np.full((self.num_tasks, self.num_tasks), np.nan)


class ContinualLoop:
    """fit -> for each task: [epochs of steps] -> end-of-task work -> evaluation.

    Every phase is wrapped by ``on_before_X`` / ``on_after_X`` on the learner first, then on
    each callback (for "after" events too the learner goes first, so callbacks see its result).
    """

    def __init__(self, learner, stream, callbacks: list[Callback] | None = None,
                 epochs_per_task: int = 1, eval_on: str = "all", eval_initial: bool = True,
                 eval_task_il: bool = False):
        self.learner = learner
        self.stream = stream
        self.callbacks = list(callbacks or [])
        self.epochs_per_task = epochs_per_task
        self.eval_on = eval_on
        self.eval_initial = eval_initial
        self.state = LoopState(stream.num_tasks)
        self.eval_task_il = eval_task_il
        if eval_task_il:
            self.state.acc_matrix_task_il = np.full((stream.num_tasks, stream.num_tasks), np.nan)
        self.step_callbacks = [c for c in self.callbacks
                               if overrides(c, "on_after_step") or overrides(c, "on_before_step")]
        learner.loop = self

    # -- events ------------------------------------------------------------------------------
    def emit(self, event: str, *args) -> None:
        hook = "on_" + event
        getattr(self.learner, hook, lambda *a: None)(*args)
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def progress(self, **info) -> None:
        info.setdefault("task", self.state.task)
        info.setdefault("epoch", self.state.epoch)
        for cb in self.callbacks:
            cb.on_progress(self, info)

    # -- the flow ----------------------------------------------------------------------------
    def run(self) -> LoopState:
        s = self.state
        tasks = self.stream.tasks
        self.emit("before_fit")
        if self.eval_initial and s.initial_acc is None and s.completed_tasks == 0:
            accs = self.learner.evaluate(tasks)
            s.initial_acc = np.array([accs[t.id] for t in tasks])
        for t in range(s.completed_tasks, len(tasks)):
            task = tasks[t]
            s.task, s.epoch = t, -1
            start = time.perf_counter()
            self.emit("before_task", task)
            self.emit("before_training", task)
            steps, losses = 0, []
            for e in range(self.epochs_per_task):
                s.epoch = e
                self.emit("before_epoch", task, e)
                stats = self.learner.train_epoch(task, e)
                steps += stats.get("steps", 0)
                losses.append(stats.get("loss"))
                self.emit("after_epoch", task, e, stats)
            self.emit("after_training", task)
            train_end = time.perf_counter()
            self.emit("before_eval", task)
            targets = tasks if self.eval_on == "all" else tasks[: t + 1]
            accs = self.learner.evaluate(targets)
            for j, acc in accs.items():
                s.acc_matrix[t, j] = acc
            if self.eval_task_il:
                for j, acc in self.learner.evaluate(targets, task_il=True).items():
                    s.acc_matrix_task_il[t, j] = acc
            self.emit("after_eval", task, accs)
            end = time.perf_counter()
            s.train_time_s.append(train_end - start)
            s.eval_time_s.append(end - train_end)
            s.task_time_s.append(end - start)
            s.steps_per_task.append(steps)
            s.epoch_losses.append(losses)
            s.completed_tasks = t + 1
            self.emit("after_task", task)
        self.emit("after_fit")
        return s
