"""Averaged Gradient Episodic Memory (Chaudhry et al. 2019, "Efficient Lifelong Learning with
A-GEM", ICLR).

Each task keeps an episodic memory of its samples (by default a ring of ``mem_per_task`` slots
per task: the task's last samples). At every step, with g the gradient of the stream batch's
loss and g_ref the gradient of the loss on ``replay_batch_size`` samples drawn from the memories
of the previous tasks, the update uses

    g~ = g - (g . g_ref / g_ref . g_ref) g_ref   if g . g_ref < 0,   else g,

so that, to first order, the step does not increase the average loss on the memory. The dot
products run over all parameters at once. The first task (empty memory) trains as fine-tuning.
In task-IL the reference loss uses each memory sample's task units. With ``benchmark.augment``
the memory keeps the stream's inputs before augmentation and the reference batch is augmented
afresh when drawn (Mammoth models/agem.py:49-75 passes ``transform`` to ``Buffer.get_data``).

``mem_policy: class_ring`` is the reference's episodic memory (facebookresearch/agem
conv_split_cifar.py:430-440 and fc_permute_mnist.py:307-316): each class of each task keeps its
last ``mem_per_class`` samples (see memory.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_runner.backends.torch.learner import Part, TorchLearner
from cl_runner.backends.torch.memory import memory_for
from cl_runner.registry import ALGORITHMS


@torch.no_grad()
def agem_project(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> torch.Tensor:
    """Project ``grads`` in place as A-GEM does against ``ref``; returns g . g_ref before.

    Written without a data-dependent branch (no device sync): the coefficient
    min(g . g_ref, 0) / (g_ref . g_ref) is zero when the gradients do not conflict.
    """
    dot = torch.stack([(g * r).sum() for g, r in zip(grads, ref)]).sum()
    ref_sq = torch.stack([(r * r).sum() for r in ref]).sum()
    coef = dot.clamp(max=0.0) / ref_sq.clamp_min(torch.finfo(ref_sq.dtype).tiny)
    torch._foreach_sub_(grads, torch._foreach_mul(ref, coef))
    return dot


class AGEMPart(Part):
    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.memory = memory_for(learner, cfg)
        self.replay_batch_size = int(cfg.replay_batch_size or learner.batch_size)
        self.params = [p for p in learner.model.parameters() if p.requires_grad]
        self.task_id = 0
        self._pending = None

    def on_before_task(self, task) -> None:
        self.task_id = task.id
        self.memory.register_classes(task.classes)

    def extra_loss(self, x, y, logits):
        self._pending = (self.learner.stream_inputs(x), y)  # offered to the memory after the step
        return None

    def reference_gradient(self, idx: torch.Tensor) -> list[torch.Tensor]:
        learner = self.learner
        mx, my, mt, _ = self.memory.get(idx)
        with torch.enable_grad():
            logits = learner.train_forward(learner.replay_inputs(mx))
            loss = F.cross_entropy(learner.masked(logits, mt if learner.masks else None), my)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]

    def after_backward(self) -> None:
        idx = self.memory.sample(self.replay_batch_size, before_task=self.task_id)
        if idx is None:
            return
        ref = self.reference_gradient(idx)
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        agem_project(grads, ref)

    def after_step(self) -> None:
        x, y = self._pending
        self._pending = None
        self.memory.add(x, y, self.task_id)

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state) -> None:
        self.memory.load_state_dict(state["memory"])


@ALGORITHMS.register("agem", backend="torch")
class AGEM(TorchLearner):
    part_classes = (AGEMPart,)
