"""Naive rehearsal (Hsu et al. 2018, "Re-evaluating Continual Learning Scenarios"): the schema and
the backend-independent memory.

The memory has a fixed total budget (``memory_size`` samples) split equally among the tasks
seen so far. After training task t (the (t+1)-th task), every task's share is
``min(n_t, memory_size // (t + 1))`` samples, where n_t is the size of task t's training set: the
older tasks' shares shrink to it by keeping the first samples of their previous (random) share,
and task t's share is a random subset of its training set. Budget 10 over three tasks: 10; 5 + 5;
3 + 3 + 3.

Task t is trained on the concatenation of its own training set and the memory, shuffled
together, with the normal epochs and batches (no separate replay batch). With ``balance`` (the
authors' code) the memory enters the concatenation ``max(n_t // memory_size, 1)`` times, so old
and new samples are about 1:1 (e.g. 10 copies of the 1100-sample memory beside a 12,000-sample
Split MNIST task).

The memory holds indices into each task's training arrays, drawn by a NumPy generator seeded
from the run's seed, so both backends choose the same samples for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cl_runner.algorithms import register_algo
from cl_runner.config.schema import AlgoConfig
from cl_runner.errors import ConfigError


@register_algo("naive_rehearsal",
               paper="Hsu et al. 2018, NeurIPS CL workshop (Re-evaluating Continual Learning Scenarios)",
               summary="a fixed memory split equally among the seen tasks, concatenated with each "
               "task's training set")
@dataclass
class NaiveRehearsalConfig(AlgoConfig):
    name: str = "naive_rehearsal"
    # Total memory budget in samples, split equally among the tasks seen so far (1100: the
    # authors' Split MNIST setting).
    memory_size: int = 1100
    # Repeat the memory max(n_task // memory_size, 1) times in the training set, so old and new
    # samples are about 1:1 (the authors' code); false: the memory enters once.
    balance: bool = True

    @staticmethod
    def check(algo) -> None:
        if algo.memory_size <= 0:
            raise ConfigError(f"config key 'algo.memory_size' must be a positive integer, got {algo.memory_size}.")


class RehearsalMemory:
    """Per task, the indices of its samples kept in the memory (see the module docstring)."""

    def __init__(self, budget: int, seed: int):
        self.budget = int(budget)
        self.indices: dict[int, np.ndarray] = {}
        self.rng = np.random.default_rng([int(seed), 0x5E1])  # a stream of its own, from the seed

    def __len__(self) -> int:
        return sum(len(v) for v in self.indices.values())

    def add_task(self, task_id: int, num_train: int) -> None:
        """After training ``task_id`` (``num_train`` samples): shrink the older shares, then
        draw this task's share at random."""
        share = min(int(num_train), self.budget // (len(self.indices) + 1))
        for k in self.indices:
            self.indices[k] = self.indices[k][:share]
        self.indices[int(task_id)] = self.rng.permutation(int(num_train))[:share].astype(np.int64)

    def repeats(self, num_train: int, balance: bool) -> int:
        """How many times the memory enters the training set of a task of ``num_train`` samples."""
        return max(int(num_train) // self.budget, 1) if balance else 1

    def arrays(self, stream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The memory's (x, y, task id) arrays, task by task in the order the tasks came."""
        xs, ys, ts = [], [], []
        for k, idx in self.indices.items():
            task = stream.tasks[k]
            xs.append(np.asarray(task.train_x)[idx])
            ys.append(np.asarray(task.train_y)[idx])
            ts.append(np.full(len(idx), k, dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(ts)

    def training_arrays(self, stream, task, balance: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, task id) to train ``task`` on: the memory (``repeats`` times), then the task's data."""
        x, y = task.train_x, task.train_y
        tid = np.full(len(y), task.id, dtype=np.int64)
        if not self.indices:
            return x, y, tid
        mx, my, mt = self.arrays(stream)
        r = self.repeats(len(y), balance)
        return (np.concatenate([*([mx] * r), np.asarray(x)]), np.concatenate([*([my] * r), np.asarray(y)]),
                np.concatenate([*([mt] * r), tid]))

    def state_dict(self) -> dict:
        return {"indices": {k: v.copy() for k, v in self.indices.items()}, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.indices = {int(k): np.asarray(v, dtype=np.int64) for k, v in state["indices"].items()}
        self.rng.bit_generator.state = state["rng"]


class NaiveRehearsalMixin:
    """The learner side of naive rehearsal, the same on both backends: put before the backend's
    learner class (``class NaiveRehearsal(NaiveRehearsalMixin, TorchLearner)``)."""

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
