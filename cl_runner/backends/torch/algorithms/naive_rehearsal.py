"""Naive rehearsal (Hsu et al. 2018): each task is trained on its own data concatenated with a
memory of fixed budget split equally among the tasks seen so far (cl_runner/algorithms/
naive_rehearsal.py has the memory's rules and the learner's side)."""

from __future__ import annotations

from cl_runner.algorithms.naive_rehearsal import NaiveRehearsalMixin
from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("naive_rehearsal", backend="torch")
class NaiveRehearsal(NaiveRehearsalMixin, TorchLearner):
    pass
