"""Online EWC (Schwarz et al. 2018, "Progress & Compress", ICML) on the JAX backend.

Instead of one penalty per past task (EWC), a single running Fisher and a single anchor:
after task t, with F_t the diagonal Fisher of task t at its final parameters theta*_t,

    F* <- ewc_gamma * F* + F_t,        anchor <- theta*_t,

and later tasks add (ewc_lambda / 2) * sum_i F*_i (theta_i - theta*_i)^2. F_t is estimated
exactly as for EWC (ewc.py); the running Fisher and the anchor are the part's state.
"""

from __future__ import annotations

import jax

from cl_runner.backends.jax.algorithms.ewc import EWCPart
from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.registry import ALGORITHMS, PLUGINS


class OnlineEWCPart(EWCPart):
    accumulate_snapshots = False  # one running (Omega, theta*) term

    def importance(self, task):
        fisher = super().importance(task)
        if self.num_snapshots == 0:
            return fisher
        gamma = float(self.cfg.ewc_gamma)
        return jax.tree_util.tree_map(lambda old, new: gamma * old + new, self.state["omega"], fisher)


@ALGORITHMS.register("ewc_online", backend="jax")
class OnlineEWC(JaxLearner):
    part_classes = (OnlineEWCPart,)


PLUGINS.register("ewc_online", backend="jax")(OnlineEWCPart)
