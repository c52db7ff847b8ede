"""Naive rehearsal (Hsu et al. 2018): each task is trained on its own data concatenated with a
memory of fixed budget split equally among the tasks seen so far (cl_runner/algorithms/
naive_rehearsal.py has the memory's rules)."""

from __future__ import annotations

from cl_runner.algorithms.naive_rehearsal import RehearsalMemory
from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("naive_rehearsal", backend="torch")
class NaiveRehearsal(TorchLearner):
    def __init__(self, cfg, stream, device, seed: int):
        super().__init__(cfg, stream, device, seed)
        self.memory = RehearsalMemory(int(cfg.algo.memory_size), seed)

    def train_arrays(self, task):
        return self.memory.training_arrays(self.stream, task, bool(self.cfg.algo.balance))

    def on_after_training(self, task) -> None:
        super().on_after_training(task)
        self.memory.add_task(task.id, task.num_train)

    def state_dict(self):
        return {**super().state_dict(), "rehearsal_memory": self.memory.state_dict()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["rehearsal_memory"])
