"""Stable SGD (Mirzadeh et al. 2020, NeurIPS, "Understanding the Role of Training Regimes in
Continual Learning") on the JAX backend, as ``cl_runner/backends/torch/algorithms/stable_sgd.py``
(which states the regime and its sources): dropout, SGD with momentum 0.8 built anew every
epoch, lr_t = max(lr * gamma ** t, 0.00005) with tasks counted from 1, small batches.

The algorithm's keys are written into the backbone, optimizer and benchmark sections when the
config is validated, so this learner is the plain one. The learning rate and the momentum are
values of the optimizer state (optim.py): the per-task decay and the per-epoch restart
(``JaxLearner.on_before_epoch``) cost no recompilation.
"""

from __future__ import annotations

from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("stable_sgd", backend="jax")
class StableSGD(JaxLearner):
    """Fine-tuning under the stable regime that the validated config already holds."""
