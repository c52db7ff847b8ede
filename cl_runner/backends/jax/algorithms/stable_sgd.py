"""Stable SGD (Mirzadeh et al. 2020, NeurIPS, "Understanding the Role of Training Regimes in
Continual Learning") on the JAX backend, as ``cl_runner/backends/torch/algorithms/stable_sgd.py``.

Not a new loss: plain fine-tuning under the training regime the paper finds to widen the tasks'
minima and so reduce forgetting,

* dropout after every hidden layer (the paper's 0.5 on MNIST),
* a large initial learning rate (0.1) decayed once per task, lr_t = lr * lr_decay ** t (0.8),
* small mini-batches (10),

on SGD without momentum. The algorithm's keys replace ``backbone.dropout``, ``optimizer.lr``,
``optimizer.lr_decay`` and ``benchmark.batch_size`` for this run (a key set to null keeps the
section's own value); the learner keeps the replaced config as ``learner.cfg``. The learning rate
is in the optimizer state (optim.py), so its decay between tasks costs no recompilation.
"""

from __future__ import annotations

from cl_runner.algorithms.others import apply_regime
from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("stable_sgd", backend="jax")
class StableSGD(JaxLearner):
    def __init__(self, cfg, stream, device, seed: int):
        super().__init__(apply_regime(cfg), stream, device, seed)
