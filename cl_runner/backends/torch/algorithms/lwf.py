"""Learning without Forgetting (Li & Hoiem 2016, ECCV; 2017, TPAMI).

At the start of each task after the first, a frozen copy of the model (the previous model, in
eval mode) is kept. Every step's loss is

    w_ce * CE  +  w_kd * alpha_t * L_old,   L_old = - sum_j y'_j log yhat'_j,

CE the new task's cross-entropy and L_old the cross-entropy between the previous model's and the
current model's outputs on the current batch, both softened with temperature T:
y' = softmax(z_old / T), yhat' = softmax(z / T) (the paper's modified cross-entropy, lambda_o =
alpha, T = 2, no factor T^2). w_ce = w_kd = 1 unless ``alpha_rule`` says otherwise
(cl_runner/algorithms/distillation.py: tasks_seen, van de Ven & Tolias 2018; classes_seen, BiC).
Which outputs are distilled depends on the scenario:

* class-IL: the logits of every class of the previous tasks, as one softmax (Mammoth
  models/lwf.py observe; Avalanche regularization.py ``prev_classes_by_task``). With
  ``distill_units=seen`` the current model's softmax runs over every class seen so far and the
  previous model's probabilities are padded with 0 for the current task's classes (van de Ven &
  Tolias, GMvandeVen/continual-learning e17b714 train.py:146 and utils.py ``loss_fn_kd``);
* domain-IL: all output units (every task uses them all);
* task-IL: each previous task's head (its output units) as its own softmax, the terms summed
  over the previous tasks, as the paper sums L_old over its old tasks and Avalanche over its
  heads (``head_reduction=mean`` averages them, as van de Ven & Tolias's encoder.py:136).

``kd_reduction=mean`` divides each softmax's term by its number of units and
``temperature_squared`` multiplies by T^2 (van de Ven & Tolias's ``loss_fn_kd``). With
``ce_units=seen`` (class-IL) the cross-entropy runs over the classes seen so far, as Mammoth's
and van de Ven & Tolias's LwF do.

The previous model's outputs are computed on each batch as it comes (the same numbers as
recording them on the task's data before training, since that model is frozen). With
``teacher_inputs=not_aug`` the previous model sees the batch's images before augmentation and
before normalisation (pixel / 255), as Mammoth's ``begin_task`` records its logits on
``not_aug_img`` (ToTensor() alone) while the network trains on normalised, augmented images.

Warm-up (``warmup_epochs``, Mammoth models/lwf.py ``begin_task``, the paper's warm-up step):
before each task after the first, only the new task's output units are trained, for that many
epochs over the task's (shuffled, augmented) batches, with a fresh plain SGD (no momentum, no
weight decay) at ``warmup_lr`` (default optimizer.lr) on the output layer, the features computed
without gradient and the network in eval mode, the cross-entropy over the new units only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_runner.algorithms.distillation import check_lwf_stream, lwf_loss_weights, per_task_value
from cl_runner.backends.torch.backbones import build_backbone
from cl_runner.backends.torch.learner import Part, TorchLearner
from cl_runner.backends.torch.memory import derived_seed
from cl_runner.registry import ALGORITHMS


def distillation_loss(logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of -sum_j softmax(old / T)_j log softmax(new / T)_j."""
    target = F.softmax(old_logits / temperature, dim=1)
    return -(target * F.log_softmax(logits / temperature, dim=1)).sum(1).mean()


def head_distillation_loss(logits: torch.Tensor, old_logits: torch.Tensor, heads: torch.Tensor,
                           temperature: float, student_heads: torch.Tensor | None = None,
                           kd_reduction: str = "sum", head_reduction: str = "sum") -> torch.Tensor:
    """The distillation loss of each head (``heads``: one row of output units per softmax, the
    previous model's), averaged over the batch. The current model's softmax of a head runs over
    ``student_heads``'s row (None: the same units; it must contain the head's units), the
    previous model's probability being 0 on the units beyond the head's. Per head,
    ``kd_reduction`` sum: -sum_j y'_j log yhat'_j; mean: divided by the row's number of units.
    The heads' terms are summed (``head_reduction`` sum) or averaged (mean)."""
    student = heads if student_heads is None else student_heads
    keep_old, keep_new = heads.unsqueeze(0), student.unsqueeze(0)  # (1, H, U)
    new = (logits / temperature).unsqueeze(1).masked_fill(~keep_new, float("-inf"))
    old = (old_logits / temperature).unsqueeze(1).masked_fill(~keep_old, float("-inf"))
    terms = F.softmax(old, dim=2) * F.log_softmax(new, dim=2)
    per_head = -torch.where(keep_new, terms, torch.zeros_like(terms)).sum(2)  # (N, H)
    if kd_reduction == "mean":
        per_head = per_head / student.sum(1).clamp(min=1)
    per_sample = per_head.mean(1) if head_reduction == "mean" else per_head.sum(1)
    return per_sample.mean()


class LwFPart(Part):
    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        check_lwf_stream(cfg, learner.stream)
        self.temperature = float(cfg.temperature)
        self.kd_reduction = str(cfg.kd_reduction)
        self.head_reduction = str(cfg.head_reduction)
        self.teacher: torch.nn.Module | None = None
        self.heads: torch.Tensor | None = None  # (softmaxes, units): the previous model's units
        self.student_heads: torch.Tensor | None = None  # the current model's units of each softmax
        self.ce_units: torch.Tensor | None = None  # class-IL ce_units=seen: the units of the CE
        self.ce_weight = 1.0
        self.kd_weight = 1.0  # w_kd * alpha_t (* T^2)
        self.warmup_generator = torch.Generator().manual_seed(derived_seed(learner.seed, 4711))

    @torch.no_grad()
    def on_before_task(self, task) -> None:
        learner, cfg = self.learner, self.cfg
        mask = learner.output_mask
        seen = mask[: task.id + 1].any(0)
        old = mask[: task.id].any(0)
        self.ce_units = seen if cfg.ce_units == "seen" else None
        self.ce_weight, kd_weight = lwf_loss_weights(cfg.alpha_rule, task.id, int(old.sum()), int(seen.sum()))
        self.kd_weight = kd_weight * per_task_value(cfg.alpha, task.id, "algo.alpha")
        if cfg.temperature_squared:
            self.kd_weight *= self.temperature ** 2
        if task.id == 0:
            self.teacher = None
            return
        if self.teacher is None:
            self.teacher = build_backbone(learner.cfg.backbone, learner.stream.input_shape,
                                          learner.num_outputs()).to(learner.device)
            self.teacher.requires_grad_(False)
        self.teacher.load_state_dict(learner.model.state_dict())
        self.teacher.eval()
        if learner.masks:
            self.heads, self.student_heads = mask[: task.id], None
        else:
            self.heads = old.unsqueeze(0)
            self.student_heads = seen.unsqueeze(0) if cfg.distill_units == "seen" else None
        if cfg.warmup_epochs:
            self.warm_up(task)

    @torch.enable_grad()
    def warm_up(self, task) -> None:
        """Train the new task's output units alone (see the module docstring)."""
        learner = self.learner
        model = learner.model
        new_units = learner.output_mask[task.id]
        lr = self.cfg.warmup_lr if self.cfg.warmup_lr is not None else learner.cfg.optimizer.lr
        params = [p for p in model.head.parameters()]
        opt = torch.optim.SGD(params, lr=float(lr))
        was_training = model.training
        model.eval()
        x, y = learner.train_x, learner.train_y
        n, bs = len(y), learner.batch_size
        for _ in range(int(self.cfg.warmup_epochs)):
            perm = torch.randperm(n, generator=self.warmup_generator).to(learner.device)
            for lo in range(0, n, bs):
                idx = perm[lo:lo + bs]
                xb = x.index_select(0, idx)
                if learner.augment is not None:
                    xb = learner.augment(xb)
                with torch.no_grad():
                    feats = model.features(xb)
                logits = model.head(feats).masked_fill(~new_units, float("-inf"))
                loss = F.cross_entropy(logits, y.index_select(0, idx))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in params:
            p.grad = None
        model.train(was_training)

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The previous model's input for the step's batch ``x`` (``teacher_inputs``)."""
        if self.cfg.teacher_inputs != "not_aug":
            return x
        learner = self.learner
        return learner.stream_inputs(x) * learner._std + learner._mean  # undo (x / 255 - mean) / std

    def extra_loss(self, x, y, logits):
        if self.teacher is None:
            return None
        with torch.no_grad():
            old_logits = self.teacher(self.teacher_input(x))
        loss = head_distillation_loss(logits, old_logits, self.heads, self.temperature, self.student_heads,
                                      self.kd_reduction, self.head_reduction)
        return self.kd_weight * loss


@ALGORITHMS.register("lwf", backend="torch")
class LwF(TorchLearner):
    part_classes = (LwFPart,)

    def criterion(self, logits, y, t):
        """The task loss, weighted by ``alpha_rule``'s w_ce; with ``ce_units=seen`` over the units
        of the classes seen so far."""
        part = self.parts[0]
        if part.ce_units is not None:
            logits = logits.masked_fill(~part.ce_units, float("-inf"))
        loss = super().criterion(logits, y, t)
        return loss if part.ce_weight == 1.0 else part.ce_weight * loss
