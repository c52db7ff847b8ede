"""Stable SGD (Mirzadeh et al. 2020, NeurIPS, "Understanding the Role of Training Regimes in
Continual Learning").

Not a new loss: plain fine-tuning under the training regime the paper finds to widen the tasks'
minima and so reduce forgetting, as the authors' code runs it (imirzadeh/stable-continual-learning,
stable_sgd/main.py:126-134, models.py:6-28):

* dropout after every hidden ReLU (0.5 in the paper's 20-task runs),
* a large initial learning rate (0.1) decayed once per task with tasks counted from 1,
  lr_t = max(lr * gamma ** t, 0.00005) for t = 1, 2, ... (gamma 0.8 on Permuted MNIST and
  CIFAR-100, 0.5 on Rotated MNIST),
* SGD with momentum 0.8, the optimizer built anew at every epoch (its momentum starts from zero),
* small mini-batches (10).

The algorithm's keys (cl_runner/algorithms/others.py: StableSGDConfig) are written into
``backbone.dropout``, ``optimizer.lr`` / ``lr_decay`` / ``lr_decay_offset`` / ``lr_min`` /
``momentum`` / ``reset`` and ``benchmark.batch_size`` when the config is validated, so this
learner is the plain one: the base learner's per-task rate and per-epoch reset
(cl_runner/core/schedule.py, ``TorchLearner.on_before_epoch``) do the rest.
"""

from __future__ import annotations

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("stable_sgd", backend="torch")
class StableSGD(TorchLearner):
    """Fine-tuning under the stable regime that the validated config already holds."""
