"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017, "Continual Learning Through Synaptic
Intelligence", ICML) on the JAX backend.

During task mu every step adds, per parameter, the product of the loss gradient g and the
step's parameter change:

    w_i += -g_i * (theta_i(after step) - theta_i(before step))

(the path integral of the loss decrease attributed to parameter i), inside the compiled step
(``after_step``). At the end of the task

    Omega_i += w_i / ((theta_i(end) - theta_i(start))^2 + si_xi)

and later tasks add si_c * sum_i Omega_i (theta_i - theta*_i)^2 with theta* the parameters at
the end of the last task (no factor 1/2). Omega accumulates over tasks; w restarts at each task.
g is the gradient of the data loss (task loss and any part's ``extra_loss``) before any part's
``adjust_grads`` adds a penalty or projects it, as on the PyTorch backend. w and theta(start)
are in the part's state with the penalty's sums.
"""

from __future__ import annotations

import jax
import numpy as np

from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.backends.jax.regularization import ImportanceRegularizer
from cl_runner.registry import ALGORITHMS, PLUGINS

tmap = jax.tree_util.tree_map


class SIPart(ImportanceRegularizer):
    accumulate_snapshots = False  # Omega is the running sum; the anchor is the latest task's end

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.state = {**self.state,
                      "w": learner.put(tmap(lambda p: np.zeros(p.shape, p.dtype), learner.params)),
                      "task_start": learner.params}

    @property
    def strength(self) -> float:
        return float(self.cfg.si_c)

    def on_before_task(self, task) -> None:
        learner = self.learner
        self.state = {**self.state,
                      "w": learner.put(tmap(lambda p: np.zeros(p.shape, p.dtype), learner.params)),
                      "task_start": learner.params}

    def after_step(self, old_params, new_params, grads, state):
        # w += -g * (theta_after - theta_before)
        w = tmap(lambda w, g, a, b: w - g * (b - a), state["w"], grads, old_params, new_params)
        return {**state, "w": w}

    def importance(self, task):
        xi = float(self.cfg.si_xi)
        return tmap(lambda old, w, p, s: old + w / ((p - s) ** 2 + xi),
                    self.state["omega"], self.state["w"], self.learner.params, self.state["task_start"])


@ALGORITHMS.register("si", backend="jax")
class SI(JaxLearner):
    part_classes = (SIPart,)


PLUGINS.register("si", backend="jax")(SIPart)
