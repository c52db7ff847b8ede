"""iCaRL: incremental classifier and representation learning (Rebuffi et al. 2017, CVPR).

* Training data of a task: its own samples and the exemplars of every class seen before
  (the paper's UpdateRepresentation). The loss is the paper's sigmoid binary cross-entropy:
  with g_u(x) = sigmoid of output unit u, every unit u gets the term

      b_u(x) = - [ t_u log g_u(x) + (1 - t_u) log(1 - g_u(x)) ],

  t_u = q_u = g_u(x) under the model as it was before the task (the distillation targets) for
  the units of the previous tasks' classes ("old"), and t_u = 1 if u is x's label, else 0, for
  the others. ``algo.loss_reduction`` says over which units the terms are averaged (and the
  batch is always averaged):

  - ``original``: every output unit, those of classes not seen yet included (target 0): the
    original code's ``binary_crossentropy(...).mean()`` over its 100 units
    (srebuffi/iCaRL iCaRL-TheanoLasagne/main_cifar_100_theano.py:66-67, 153-162;
    iCaRL-Tensorflow/main_resnet_tf.py:135);
  - ``mammoth``: the units of the classes seen so far, old and current (Mammoth's
    models/icarl.py at the DER paper, commit 5dc82be, lines 90-102:
    ``binary_cross_entropy_with_logits(outputs[:, :ac], ...)``).

  With a growing head (``backbone.head`` incremental / multihead) only the units the head owns
  exist, which are the seen ones: the two reductions coincide. The previous model is a frozen
  copy evaluated on each batch as it comes (the same targets as recording them before training,
  since it does not change).
* After training: K = ``mem_size`` exemplars in all, m = K // (classes seen) per class. Every
  old class keeps its first m exemplars, and each new class gets m chosen by herding on the
  features (``mem_policy: random`` draws them uniformly instead).
* Classification: nearest mean of exemplars. mu_y is the mean of the features of class y's
  exemplars; x goes to argmin_y ||phi(x) - mu_y|| over the seen classes (in task-IL over its
  task's classes). Before the first task ends there are no means and the network's outputs
  decide. With ``algo.normalize_features`` (the original's) herding, the means and phi(x) use
  L2-normalised features and mu_y is normalised again; without it (Mammoth's at the DER paper)
  the raw features. With ``algo.flip_means`` each mean is the average of the exemplars' mean
  and their horizontal flips' mean (the original on CIFAR, main_cifar_100_theano.py:259-271).

Features phi are the backbone's ``features`` (the input of its last linear layer).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from cl_runner.algorithms.replay import icarl_flip_means
from cl_runner.backends.torch.herding import ExemplarMemory, l2_normalize
from cl_runner.backends.torch.learner import Part, TorchLearner
from cl_runner.backends.torch.memory import derived_seed
from cl_runner.registry import ALGORITHMS


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor, units: int) -> torch.Tensor:
    """Binary cross-entropy of sigmoid outputs, summed over the columns given and divided by
    (batch size x ``units``): the columns' share of a mean over the batch and ``units`` units."""
    if logits.shape[1] == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / (logits.shape[0] * units)


def nearest_mean(features: torch.Tensor, means: torch.Tensor, allowed: torch.Tensor,
                 normalize: bool = True) -> torch.Tensor:
    """Index of the closest row of ``means`` (units, d) for each feature (L2-normalised first when
    ``normalize``), among the ``allowed`` units ((units,) or (batch, units) bool)."""
    dist = torch.cdist(l2_normalize(features) if normalize else features, means)
    return dist.masked_fill(~allowed, float("inf")).argmin(dim=1)


class ICaRLDistillation(Part):
    """The old classes' part of iCaRL's loss: sigmoid BCE toward the previous model's outputs."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.teacher: torch.nn.Module | None = None
        self.old_units: torch.Tensor | None = None

    @torch.no_grad()
    def on_before_task(self, task) -> None:
        learner = self.learner
        old = learner.output_mask[: task.id].any(0) & ~learner.output_mask[task.id]
        if task.id == 0 or not bool(old.any()):
            self.teacher = None
            return
        self.teacher = copy.deepcopy(learner.model)  # a copy of the model as it is (a grown head too)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.old_units = old.nonzero().squeeze(1)

    def extra_loss(self, x, y, logits):
        if self.teacher is None:
            return None
        with torch.no_grad():
            targets = torch.sigmoid(self.teacher(x)[:, self.old_units])
        return sigmoid_bce(logits[:, self.old_units], targets, self.learner.mean_units)


@ALGORITHMS.register("icarl", backend="torch")
class ICaRL(TorchLearner):
    part_classes = (ICaRLDistillation,)

    def __init__(self, cfg, stream, device, seed):
        super().__init__(cfg, stream, device, seed)
        self.normalize = bool(cfg.algo.normalize_features)
        self.flip_means = icarl_flip_means(cfg)
        self.reduction = str(cfg.algo.loss_reduction)
        self.growing_head = getattr(cfg.backbone, "head", "fixed") != "fixed"
        self.memory = ExemplarMemory(int(cfg.algo.mem_size), cfg.algo.mem_policy, derived_seed(seed, 4242),
                                     normalize=self.normalize)
        self.class_means: torch.Tensor | None = None  # (output units, d); rows of unseen classes unused
        self.seen = torch.zeros(self.num_outputs(), dtype=torch.bool, device=device)
        self.label_units: torch.Tensor | None = None  # the units with one-hot targets
        self.mean_units = 1  # the number of units the loss is averaged over

    # -- training ------------------------------------------------------------------------------
    def train_arrays(self, task):
        x, y, t = super().train_arrays(task)
        stored = self.memory.arrays()
        if stored is None:
            return x, y, t
        return (np.concatenate([np.asarray(x), stored[0]]), np.concatenate([np.asarray(y), stored[1]]),
                np.concatenate([t, stored[2]]))

    def on_before_task(self, task) -> None:
        new = self.output_mask[task.id]
        old = self.output_mask[: task.id].any(0) & ~new
        # The units the loss is averaged over: the seen ones (mammoth, or a growing head, which
        # owns only those), else every output unit.
        averaged = new | old if self.reduction == "mammoth" or self.growing_head else torch.ones_like(new)
        self.label_units = (averaged & ~old).nonzero().squeeze(1)
        self.mean_units = int(averaged.sum())
        super().on_before_task(task)

    def criterion(self, logits, y, t):
        """The loss's terms of the units that are not old: one-hot targets (0 for every exemplar
        of an old class, and for the units of classes not seen yet)."""
        targets = (y[:, None] == self.label_units[None, :]).to(logits.dtype)
        return sigmoid_bce(logits[:, self.label_units], targets, self.mean_units)

    # -- exemplars and class means -----------------------------------------------------------------
    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = [self.model.features(x[lo:lo + self.eval_batch_size]) for lo in range(0, len(x), self.eval_batch_size)]
        return torch.cat(out) if out else x.new_zeros((0, self.model.feature_dim))

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """phi of raw uint8 images (N, C, H, W)."""
        return self.features(self.to_input(images))

    @torch.no_grad()
    def on_after_training(self, task) -> None:
        super().on_after_training(task)
        was_training = self.model.training
        self.model.eval()
        self.memory.add_task(task, self.image_features)
        self.update_class_means()
        self.model.train(was_training)

    @torch.no_grad()
    def exemplar_mean(self, images: np.ndarray) -> torch.Tensor:
        """mu of one class's exemplars (uint8 images): the mean of their (normalised) features;
        with ``flip_means`` the average of that and the same mean over the images flipped
        horizontally; normalised again when the features are."""
        def mean_of(x: np.ndarray) -> torch.Tensor:
            feats = self.image_features(x)
            return (l2_normalize(feats) if self.normalize else feats).mean(0)

        mu = mean_of(images)
        if self.flip_means:
            mu = (mu + mean_of(images[..., ::-1])) / 2
        return l2_normalize(mu[None])[0] if self.normalize else mu

    @torch.no_grad()
    def update_class_means(self) -> None:
        """mu_y for every class that has exemplars."""
        means = torch.zeros(self.num_outputs(), self.model.feature_dim, device=self.device)
        self.seen.zero_()
        for c, (images, _) in self.memory.sets.items():
            means[c] = self.exemplar_mean(images)
            self.seen[c] = True
        self.class_means = means

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None) -> torch.Tensor:
        if self.class_means is None:
            return super().predict(x, task_id)
        allowed = self.seen
        if self.masks and task_id is not None:
            allowed = allowed & self.output_mask[task_id]
        return nearest_mean(self.model.features(x), self.class_means, allowed, self.normalize)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "exemplars": self.memory.state_dict(),
                "class_means": self.class_means, "seen": self.seen.clone()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["exemplars"])
        self.class_means = state["class_means"].to(self.device) if state["class_means"] is not None else None
        self.seen = state["seen"].to(self.device)
