"""Online EWC (Schwarz et al. 2018, "Progress & Compress", ICML).

Instead of one penalty per past task (EWC), a single running Fisher and a single anchor:
after task t, with F_t the diagonal Fisher of task t at its final parameters theta*_t,

    F* <- ewc_gamma * F* + F_t,        anchor <- theta*_t,

and later tasks add (ewc_lambda / 2) * sum_i F*_i (theta_i - theta*_i)^2, the Laplace
approximation's quadratic with its factor 1/2 as in EWC. With ewc_gamma = 1 the running Fisher
is the sum of all tasks' Fishers, all pulled toward the latest anchor. F_t is estimated exactly
as for EWC (ewc.py).
"""

from __future__ import annotations

from cl_runner.backends.torch.algorithms.ewc import EWCPart
from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.registry import ALGORITHMS, PLUGINS


class OnlineEWCPart(EWCPart):
    accumulate_snapshots = False  # one running (Omega, theta*) term

    def importance(self, task):
        fisher = super().importance(task)
        if self.num_snapshots == 0:
            return fisher
        gamma = float(self.cfg.ewc_gamma)
        return [gamma * old + new for old, new in zip(self.omega, fisher)]


@ALGORITHMS.register("ewc_online", backend="torch")
class OnlineEWC(TorchLearner):
    part_classes = (OnlineEWCPart,)


PLUGINS.register("ewc_online", backend="torch")(OnlineEWCPart)
