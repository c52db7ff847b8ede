"""Joint training: the multitask upper bound.

``mode: cumulative`` (default) trains, at task t, on the union of tasks 0..t (so every row of
the accuracy matrix is a multitask model of the tasks seen so far). ``mode: final`` trains once,
on the union of all tasks, when the last task arrives; earlier rows then show the untrained model.
"""

from __future__ import annotations

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.benchmarks.stream import training_arrays
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("joint", backend="torch")
class Joint(TorchLearner):
    def train_arrays(self, task):
        return training_arrays(self.stream, task, self.cfg.algo.mode)

    def train_epoch(self, task, epoch):
        if len(self.train_y) == 0:
            return {"steps": 0, "loss": float("nan")}
        return super().train_epoch(task, epoch)
