"""Joint training: the multitask upper bound (JAX backend).

``mode: cumulative`` (default) trains, at task t, on the union of tasks 0..t. ``mode: final``
trains once, on the union of all tasks, when the last task arrives; earlier rows then show the
untrained model. The training set grows from task to task, so the epoch program is compiled once
per distinct union size.
"""

from __future__ import annotations

import numpy as np

from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("joint", backend="jax")
class Joint(JaxLearner):
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
        if int(self.train_y.shape[0]) == 0:
            return {"steps": 0, "loss": float("nan")}
        return super().train_epoch(task, epoch)
