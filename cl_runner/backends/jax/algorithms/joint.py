"""Joint training: the multitask upper bound (JAX backend).

``mode: cumulative`` (default) trains, at task t, on the union of tasks 0..t. ``mode: final``
trains once, on the union of all tasks, when the last task arrives; earlier rows then show the
untrained model. The training set grows from task to task, so the epoch program is compiled once
per distinct union size.
"""

from __future__ import annotations

from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.benchmarks.stream import training_arrays
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("joint", backend="jax")
class Joint(JaxLearner):
    def train_arrays(self, task):
        return training_arrays(self.stream, task, self.cfg.algo.mode)

    def train_epoch(self, task, epoch):
        if int(self.train_y.shape[0]) == 0:
            return {"steps": 0, "loss": float("nan")}
        return super().train_epoch(task, epoch)
