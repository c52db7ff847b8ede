"""iCaRL: incremental classifier and representation learning (Rebuffi et al. 2017, CVPR).

* Training data of a task: its own samples and the exemplars of every class seen before
  (the paper's UpdateRepresentation). The loss is the paper's: with g_y(x) = sigmoid of output
  unit y,

      l(x) = - sum_{y new}  [ d_y log g_y(x) + (1 - d_y) log(1 - g_y(x)) ]
             - sum_{y old}  [ q_y log g_y(x) + (1 - q_y) log(1 - g_y(x)) ],

  d_y = 1 when y is x's label, q_y = g_y(x) under the model as it was before the task (the
  distillation targets), "new" the task's classes and "old" those of the previous tasks; the
  units of classes not seen yet are left out. It is summed over classes, as in the paper, and
  averaged over the batch. The previous model is a frozen copy evaluated on each batch as it
  comes (the same targets as recording them before training, since it does not change).
* After training: K = ``mem_size`` exemplars in all, m = K // (classes seen) per class. Every
  old class keeps its first m exemplars, and each new class gets m chosen by herding on the
  L2-normalised features (``mem_policy: random`` draws them uniformly instead).
* Classification: nearest mean of exemplars. mu_y is the mean of the normalised features of
  class y's exemplars, normalised again; x goes to argmin_y ||phi(x) - mu_y|| over the seen
  classes (in task-IL over its task's classes). Before the first task ends there are no means
  and the network's outputs decide.

Features phi are the backbone's ``features`` (the input of its last linear layer).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from cl_runner.backends.torch.herding import ExemplarMemory, l2_normalize
from cl_runner.backends.torch.learner import Part, TorchLearner
from cl_runner.backends.torch.memory import derived_seed
from cl_runner.registry import ALGORITHMS


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of sigmoid outputs, summed over the units, averaged over the batch."""
    if logits.shape[1] == 0:
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


def nearest_mean(features: torch.Tensor, means: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Index of the closest row of ``means`` (units, d) for each normalised feature, among the
    ``allowed`` units ((units,) or (batch, units) bool)."""
    dist = torch.cdist(l2_normalize(features), means)
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
        return sigmoid_bce(logits[:, self.old_units], targets)


@ALGORITHMS.register("icarl", backend="torch")
class ICaRL(TorchLearner):
    part_classes = (ICaRLDistillation,)

    def __init__(self, cfg, stream, device, seed):
        super().__init__(cfg, stream, device, seed)
        self.memory = ExemplarMemory(int(cfg.algo.mem_size), cfg.algo.mem_policy, derived_seed(seed, 4242))
        self.class_means: torch.Tensor | None = None  # (output units, d); rows of unseen classes unused
        self.seen = torch.zeros(self.num_outputs(), dtype=torch.bool, device=device)
        self.new_units: torch.Tensor | None = None

    # -- training ------------------------------------------------------------------------------
    def train_arrays(self, task):
        x, y, t = super().train_arrays(task)
        stored = self.memory.arrays()
        if stored is None:
            return x, y, t
        return (np.concatenate([np.asarray(x), stored[0]]), np.concatenate([np.asarray(y), stored[1]]),
                np.concatenate([t, stored[2]]))

    def on_before_task(self, task) -> None:
        super().on_before_task(task)
        self.new_units = self.output_mask[task.id].nonzero().squeeze(1)

    def criterion(self, logits, y, t):
        """The new classes' part of the loss: one-hot targets (0 for every exemplar of an old class)."""
        targets = (y[:, None] == self.new_units[None, :]).to(logits.dtype)
        return sigmoid_bce(logits[:, self.new_units], targets)

    # -- exemplars and class means -----------------------------------------------------------------
    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = [self.model.features(x[lo:lo + self.eval_batch_size]) for lo in range(0, len(x), self.eval_batch_size)]
        return torch.cat(out) if out else x.new_zeros((0, self.model.feature_dim))

    @torch.no_grad()
    def on_after_training(self, task) -> None:
        super().on_after_training(task)
        was_training = self.model.training
        self.model.eval()
        self.memory.add_task(task, lambda images: self.features(self.to_input(images)))
        self.update_class_means()
        self.model.train(was_training)

    @torch.no_grad()
    def update_class_means(self) -> None:
        """mu_y: the normalised mean of the normalised features of class y's exemplars."""
        means = torch.zeros(self.num_outputs(), self.model.feature_dim, device=self.device)
        self.seen.zero_()
        for c, (images, _) in self.memory.sets.items():
            feats = l2_normalize(self.features(self.to_input(images)))
            means[c] = l2_normalize(feats.mean(0, keepdim=True))[0]
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
        return nearest_mean(self.model.features(x), self.class_means, allowed)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "exemplars": self.memory.state_dict(),
                "class_means": self.class_means, "seen": self.seen.clone()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["exemplars"])
        self.class_means = state["class_means"].to(self.device) if state["class_means"] is not None else None
        self.seen = state["seen"].to(self.device)
