"""Learning without Forgetting (Li & Hoiem 2016, ECCV; 2017, TPAMI).

At the start of each task after the first, a frozen copy of the model (the previous model, in
eval mode) is kept. Every step adds to the new task's loss

    alpha * L_old,   L_old = - sum_j y'_j log yhat'_j,

the cross-entropy between the previous model's and the current model's outputs on the current
batch, both softened with temperature T: y' = softmax(z_old / T), yhat' = softmax(z / T) (the
paper's modified cross-entropy, with lambda_o = alpha and T = 2). No factor T^2, as in the paper.
Which outputs are distilled depends on the scenario:

* class-IL: the logits of every class of the previous tasks, as one softmax;
* domain-IL: all output units (every task uses them all);
* task-IL: each previous task's head (its output units) as its own softmax, the terms summed
  over the previous tasks, as the paper sums L_old over its old tasks.

The previous model's outputs are computed on each batch as it comes (the same numbers as
recording them on the task's data before training, since that model is frozen). The paper's
optional warm-up (training only the new head first) is not done.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_runner.backends.torch.backbones import build_backbone
from cl_runner.backends.torch.learner import Part, TorchLearner
from cl_runner.registry import ALGORITHMS


def distillation_loss(logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -sum_j softmax(old / T)_j log softmax(new / T)_j."""
    target = F.softmax(old_logits / temperature, dim=1)
    return -(target * F.log_softmax(logits / temperature, dim=1)).sum(1).mean()


def head_distillation_loss(logits: torch.Tensor, old_logits: torch.Tensor, heads: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """Task-IL: the distillation loss of each head (``heads``: one row of output units per old
    task) as its own softmax, summed over the heads, averaged over the batch."""
    keep = heads.unsqueeze(0)  # (1, H, U)
    new = (logits / temperature).unsqueeze(1).masked_fill(~keep, float("-inf"))
    old = (old_logits / temperature).unsqueeze(1).masked_fill(~keep, float("-inf"))
    terms = F.softmax(old, dim=2) * F.log_softmax(new, dim=2)
    return -torch.where(keep, terms, torch.zeros_like(terms)).sum((1, 2)).mean()


class LwFPart(Part):
    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.alpha = float(cfg.alpha)
        self.temperature = float(cfg.temperature)
        self.teacher: torch.nn.Module | None = None
        self.old_units: torch.Tensor | None = None  # class/domain-IL: output units distilled
        self.old_heads: torch.Tensor | None = None  # task-IL: (old tasks, units) masks

    @torch.no_grad()
    def on_before_task(self, task) -> None:
        learner = self.learner
        if task.id == 0:
            self.teacher = None
            return
        if self.teacher is None:
            self.teacher = build_backbone(learner.cfg.backbone, learner.stream.input_shape,
                                          learner.num_outputs()).to(learner.device)
            self.teacher.requires_grad_(False)
        self.teacher.load_state_dict(learner.model.state_dict())
        self.teacher.eval()
        old = learner.output_mask[: task.id]
        if learner.masks:
            self.old_heads = old
        else:
            self.old_units = old.any(0).nonzero().squeeze(1)

    def extra_loss(self, x, y, logits):
        if self.teacher is None:
            return None
        with torch.no_grad():
            old_logits = self.teacher(x)
        if self.old_heads is not None:
            loss = head_distillation_loss(logits, old_logits, self.old_heads, self.temperature)
        else:
            loss = distillation_loss(logits[:, self.old_units], old_logits[:, self.old_units],
                                     self.temperature)
        return self.alpha * loss


@ALGORITHMS.register("lwf", backend="torch")
class LwF(TorchLearner):
    part_classes = (LwFPart,)
