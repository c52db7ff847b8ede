"""Joint training: the multitask upper bound.

``mode: cumulative`` (default) trains, at task t, on the union of tasks 0..t (so every row of
the accuracy matrix is a multitask model of the tasks seen so far). ``mode: final`` trains once,
on the union of all tasks, when the last task arrives; earlier rows then show the untrained model.
"""

from __future__ import annotations

import numpy as np

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("joint", backend="torch")
class Joint(TorchLearner):
    def train_arrays(self, task):
        last = task.id == self.stream.num_tasks - 1
        if self.cfg.algo.mode == "final" and not last:
            empty = task.train_x[:0]
            return empty, task.train_y[:0], np.zeros(0, dtype=np.int64)
        seen = self.stream.tasks[: task.id + 1]
        x = np.concatenate([np.asarray(t.train_x) for t in seen])
        y = np.concatenate([np.asarray(t.train_y) for t in seen])
        tid = np.concatenate([np.full(t.num_train, t.id, dtype=np.int64) for t in seen])
        return x, y, tid

    def train_epoch(self, task, epoch):
        if len(self.train_y) == 0:
            return {"steps": 0, "loss": float("nan")}
        return super().train_epoch(task, epoch)
