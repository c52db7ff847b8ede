"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017, "Continual Learning Through Synaptic
Intelligence", ICML).

During task mu every step adds, per parameter, the product of the task loss's gradient g and
the step's parameter change:

    w_i += -g_i * (theta_i(after step) - theta_i(before step))

(the path integral of the loss decrease attributed to parameter i). At the end of the task

    Omega_i += w_i / ((theta_i(end) - theta_i(start))^2 + si_xi)

and later tasks add si_c * sum_i Omega_i (theta_i - theta*_i)^2 with theta* the parameters at
the end of the last task (the paper's surrogate loss: no factor 1/2). Omega accumulates
over tasks; w restarts at each task.

g is the gradient of the data loss only, without any regulariser's penalty gradient: it is read
from each parameter's ``.grad`` as soon as ``loss.backward()`` has accumulated it (a
post-accumulate-grad hook), i.e. before any part's ``after_backward`` adds a penalty or projects
the gradient, whatever the order of the parts. Losses that parts add through ``extra_loss``
(replay, distillation) are part of that data loss.
"""

from __future__ import annotations

import torch

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.backends.torch.regularization import ImportanceRegularizer
from cl_runner.registry import ALGORITHMS, PLUGINS


class SIPart(ImportanceRegularizer):
    accumulate_snapshots = False  # Omega is the running sum; the anchor is the latest task's end

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.w = [torch.zeros_like(p) for p in self.params]           # path integral of this task
        self.task_grad = [torch.zeros_like(p) for p in self.params]   # g of the current step
        self.before_step = [p.detach().clone() for p in self.params]  # theta before the step
        self.task_start = [p.detach().clone() for p in self.params]   # theta at the task's start
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_hook(i))
                       for i, p in enumerate(self.params)]

    def _grad_hook(self, i: int):
        buf = self.task_grad[i]

        def hook(p: torch.Tensor) -> None:
            buf.copy_(p.grad)

        return hook

    @property
    def strength(self) -> float:
        return float(self.cfg.si_c)

    @torch.no_grad()
    def on_before_task(self, task) -> None:
        for w in self.w:
            w.zero_()
        torch._foreach_copy_(self.task_start, [p.detach() for p in self.params])

    @torch.no_grad()
    def after_backward(self) -> None:
        torch._foreach_copy_(self.before_step, [p.detach() for p in self.params])
        super().after_backward()  # the penalty gradient

    @torch.no_grad()
    def after_step(self) -> None:
        # w += -g * (theta - theta_before)  ==  w += g * (theta_before - theta)
        torch._foreach_sub_(self.before_step, [p.detach() for p in self.params])  # now -delta
        torch._foreach_addcmul_(self.w, self.task_grad, self.before_step)
        torch._foreach_zero_(self.task_grad)  # a parameter left without gradient adds nothing

    @torch.no_grad()
    def importance(self, task):
        xi = float(self.cfg.si_xi)
        omega = []
        for old, w, p, start in zip(self.omega, self.w, self.params, self.task_start):
            change = p.detach() - start
            omega.append(old + w / (change * change + xi))
        return omega

    def state_dict(self):
        state = super().state_dict()
        state["w"] = [w.clone() for w in self.w]
        state["task_start"] = [s.clone() for s in self.task_start]
        return state

    @torch.no_grad()
    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        for dst, src in zip(self.w, state["w"]):
            dst.copy_(src)
        for dst, src in zip(self.task_start, state["task_start"]):
            dst.copy_(src)


@ALGORITHMS.register("si", backend="torch")
class SI(TorchLearner):
    part_classes = (SIPart,)


PLUGINS.register("si", backend="torch")(SIPart)
