"""Naive rehearsal (Hsu et al. 2018), JAX backend: each task is trained on its own data
concatenated with a memory of fixed budget split equally among the tasks seen so far
(cl_runner/algorithms/naive_rehearsal.py has the memory's rules and the learner's side). The
memory is chosen on the host; the training set grows from task to task, so the epoch program is
compiled once per distinct training-set size."""

from __future__ import annotations

from cl_runner.algorithms.naive_rehearsal import NaiveRehearsalMixin
from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("naive_rehearsal", backend="jax")
class NaiveRehearsal(NaiveRehearsalMixin, JaxLearner):
    pass
