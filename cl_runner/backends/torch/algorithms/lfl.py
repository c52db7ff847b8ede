"""Less-Forgetful Learning (Jung et al. 2018, AAAI, "Less-forgetful learning for domain
expansion in deep neural networks").

The paper's Algorithm 1: start the new network from the old one, fix the weights of its softmax
(output) layer, and train on the new data with

    lambda_t * L_t(x)  +  lambda_e * L_e(x),   L_e(x) = 1/2 || f_old(x) - f(x) ||_2^2,

where f is the representation fed to the softmax layer (the penultimate features) and f_old that
of the frozen previous network. Here lambda_t = 1 and L_e is averaged over the batch; the
previous network is a frozen copy (eval mode) of the feature extractor taken before each task.
``feature_distance=mse`` takes instead the mean over the D feature units of (f - f_old)^2, the
scale of Avalanche (plugins/lfl.py:36 ``mse_loss``) and SequeL (``F.mse_loss``): the same loss
with lambda_e(half_sq) = 2 lambda_e(mse) / D. ``lambda_e`` may list one value per task
(Avalanche lfl.py:67-71).

f(x) is computed with the network in eval mode (no dropout; batch norm with its running
averages), as Avalanche (``compute_features`` calls ``model.eval()``) and SequeL (PyTorch:
``backbone.eval()``; JAX: ``training=False``) do: with dropout in f(x) the distance would not be 0
even at the previous network's weights. This is a second forward pass of the feature extractor
beside the step's own (training-mode) one.

Freezing the output layer keeps the old decision boundaries, which is what the paper relies on.
The paper expands a domain over the same classes (domain-IL), where every output unit is old
after the first task and the whole layer is frozen. In class- and task-IL the new task's classes
need trainable units, so only the previous tasks' output units are frozen (``freeze_head``); they
are written back after every optimizer step, so momentum or weight decay cannot move them.
(Avalanche freezes the whole last layer after the first experience, so in class-IL its new
classes' units stay at their initial values; SequeL freezes nothing.)
"""

from __future__ import annotations

import copy

import torch

from cl_runner.algorithms.distillation import check_per_task_value, per_task_value
from cl_runner.backends.torch.learner import Part, TorchLearner
from cl_runner.registry import ALGORITHMS, PLUGINS


def feature_loss(features: torch.Tensor, old_features: torch.Tensor, distance: str = "half_sq") -> torch.Tensor:
    """Mean over the batch of 1/2 ||f(x) - f_old(x)||^2 (half_sq), or of the mean over the
    feature units of (f(x) - f_old(x))^2 (mse)."""
    squares = (features - old_features).pow(2)
    if distance == "mse":
        return squares.mean()
    return 0.5 * squares.sum(1).mean()


class LFLPart(Part):
    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        check_per_task_value(cfg.lambda_e, "algo.lambda_e", learner.stream.num_tasks)
        self.lambda_e = per_task_value(cfg.lambda_e, 0, "algo.lambda_e")
        self.distance = str(cfg.feature_distance)
        self.freeze_head = bool(cfg.freeze_head)
        self.old_features: torch.nn.Module | None = None
        # (parameter, rows or None for all of it, saved values) restored after every step.
        self.frozen: list[tuple[torch.nn.Parameter, torch.Tensor | None, torch.Tensor]] = []

    @torch.no_grad()
    def on_before_task(self, task) -> None:
        learner = self.learner
        self.frozen = []
        self.lambda_e = per_task_value(self.cfg.lambda_e, task.id, "algo.lambda_e")
        if task.id == 0:
            self.old_features = None
            return
        self.old_features = copy.deepcopy(learner.model.features)
        self.old_features.requires_grad_(False)
        self.old_features.eval()
        if self.freeze_head:
            units = learner.output_mask[: task.id].any(0).nonzero().squeeze(1)
            self.frozen = frozen_head_rows(learner.model.head, units)

    def extra_loss(self, x, y, logits):
        if self.old_features is None:
            return None
        with torch.no_grad():
            target = self.old_features(x)
        features = self.learner.model.features
        was_training = features.training
        features.eval()
        try:
            current = features(x)
        finally:
            features.train(was_training)
        return self.lambda_e * feature_loss(current, target, self.distance)

    @torch.no_grad()
    def after_step(self) -> None:
        for param, rows, saved in self.frozen:
            if rows is None:
                param.copy_(saved)
            else:
                param[rows] = saved


def frozen_head_rows(head: torch.nn.Module, units: torch.Tensor):
    """What to write back after each step so that the output ``units`` stay as they are now: the
    rows of a linear head, or the whole of each chunk of a growing head that covers only them."""
    if isinstance(head, torch.nn.Linear):
        return [(p, units, p[units].clone()) for p in (head.weight, head.bias)]
    old = set(units.tolist())
    out = []
    for chunk, chunk_units in head.chunks_with_units():
        if set(chunk_units.tolist()) <= old:
            out += [(p, None, p.detach().clone()) for p in chunk.parameters()]
    return out


@ALGORITHMS.register("lfl", backend="torch")
class LFL(TorchLearner):
    part_classes = (LFLPart,)


PLUGINS.register("lfl", backend="torch")(LFLPart)
