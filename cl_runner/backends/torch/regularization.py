"""The importance-weighted quadratic penalty shared by EWC, online EWC, SI and MAS.

penalty(theta) = strength * sum_k sum_i Omega_k,i (theta_i - theta*_k,i)^2

over consolidated snapshots k (one per past task for EWC; a single running one for the others).
The sums sum_k Omega_k, sum_k Omega_k theta*_k and sum_k Omega_k theta*_k^2 are kept, so the
penalty and its gradient 2 * strength * (theta * sum Omega - sum Omega theta*) cost the same for
any number of tasks, and the gradient is added analytically after backward (no extra graph).
A method only says how Omega is computed (``importance``) and whether snapshots accumulate.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from cl_runner.backends.torch.learner import Part


class ImportanceRegularizer(Part):
    refuses_growing_head = "its importances and anchors are kept per parameter of the network as first built"
    #: True: each task adds its own (Omega, theta*) term (EWC). False: a single term whose
    #: anchor is the latest parameters and whose Omega the method maintains (online EWC, SI, MAS).
    accumulate_snapshots = False

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.params = [p for p in learner.model.parameters() if p.requires_grad]
        self.omega = [torch.zeros_like(p) for p in self.params]        # sum_k Omega_k
        self.omega_anchor = [torch.zeros_like(p) for p in self.params]  # sum_k Omega_k theta*_k
        self.omega_anchor_sq = torch.zeros((), device=self.params[0].device)  # sum Omega theta*^2
        self.num_snapshots = 0

    # -- what a method provides ----------------------------------------------------------------
    @property
    def strength(self) -> float:
        raise NotImplementedError

    def importance(self, task) -> list[torch.Tensor]:
        """Omega for the task just trained (one tensor per parameter)."""
        raise NotImplementedError

    # -- shared mechanics ------------------------------------------------------------------------
    @functools.cached_property
    def gradient_scale(self) -> float:
        """2 * strength, the penalty gradient's factor (read from the config once: every step
        uses it)."""
        return 2.0 * self.strength

    def on_after_training(self, task) -> None:
        omega = [o.detach().clone() for o in self.importance(task)]
        self.consolidate(omega)

    @torch.no_grad()
    def consolidate(self, omega: list[torch.Tensor]) -> None:
        anchor = [p.detach() for p in self.params]
        if self.accumulate_snapshots:
            torch._foreach_add_(self.omega, omega)
            torch._foreach_add_(self.omega_anchor, torch._foreach_mul(omega, anchor))
            self.omega_anchor_sq += sum(float((o * a * a).sum()) for o, a in zip(omega, anchor))
        else:
            self.omega = omega
            self.omega_anchor = torch._foreach_mul(omega, anchor)
            self.omega_anchor_sq = torch.as_tensor(sum(float((o * a * a).sum()) for o, a in zip(omega, anchor)))
        self.num_snapshots += 1

    @staticmethod
    def adds_only_the_penalty(part) -> bool:
        """Whether ``part``'s gradient hook is exactly the shared penalty gradient below (no
        subclass or instance replaces ``after_backward``): device arithmetic only, which the native
        update fuses and a CUDA graph can record."""
        return getattr(part.after_backward, "__func__", None) is ImportanceRegularizer.after_backward

    @torch.no_grad()
    def after_backward(self) -> None:
        if self.num_snapshots == 0:
            return
        # grad += 2 * strength * (Omega * theta - Omega theta*), in two fused passes
        grads = [p.grad for p in self.params]
        scale = self.gradient_scale
        torch._foreach_addcmul_(grads, self.omega, self.params, value=scale)
        torch._foreach_add_(grads, self.omega_anchor, alpha=-scale)

    @torch.no_grad()
    def penalty(self) -> float:
        """The penalty's value at the current parameters."""
        if self.num_snapshots == 0:
            return 0.0
        total = float(self.omega_anchor_sq)
        for o, oa, p in zip(self.omega, self.omega_anchor, self.params):
            total += float((o * p * p).sum() - 2.0 * (oa * p).sum())
        return self.strength * total

    def anchor(self) -> list[torch.Tensor]:
        """The parameters the penalty pulls toward: sum Omega theta* / sum Omega (where Omega > 0)."""
        return [torch.where(o > 0, oa / o.clamp_min(1e-30), torch.zeros_like(o))
                for o, oa in zip(self.omega, self.omega_anchor)]

    def state_dict(self) -> dict[str, Any]:
        return {"omega": [o.clone() for o in self.omega],
                "omega_anchor": [o.clone() for o in self.omega_anchor],
                "omega_anchor_sq": float(self.omega_anchor_sq), "num_snapshots": self.num_snapshots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.omega = [o.to(p.device) for o, p in zip(state["omega"], self.params)]
        self.omega_anchor = [o.to(p.device) for o, p in zip(state["omega_anchor"], self.params)]
        self.omega_anchor_sq = torch.as_tensor(state["omega_anchor_sq"])
        self.num_snapshots = state["num_snapshots"]
