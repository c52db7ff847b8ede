"""Memory Aware Synapses (Aljundi et al. 2018, "Memory Aware Synapses: Learning what (not) to
forget", ECCV).

After each task, the importance of parameter i is the mean over the task's samples x_k of the
absolute value of the gradient of the squared L2 norm of the network's output (the logits, no
softmax):

    Omega_i^t = 1/N sum_k | d ||F(x_k; theta)||_2^2 / d theta_i |

computed exactly per sample (persample.py, fn='abs'), with the model in eval mode. In task-IL
F is the sample's task head (its task's output units). Importances are accumulated over tasks
(Omega <- Omega + Omega^t), and later tasks add mas_lambda * sum_i Omega_i (theta_i - theta*_i)^2
with theta* the parameters at the end of the last task (the paper's penalty: no factor 1/2).
"""

from __future__ import annotations

import numpy as np
import torch

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.backends.torch.persample import per_sample_grad_sum
from cl_runner.backends.torch.regularization import ImportanceRegularizer
from cl_runner.registry import ALGORITHMS, PLUGINS


def mas_importance(learner: TorchLearner, x: torch.Tensor, t: torch.Tensor | None,
                   batch_size: int) -> list[torch.Tensor]:
    """Mean over the samples ``x`` of |d ||f(x)||^2 / d theta| per parameter (f: the logits,
    restricted to each sample's task units when ``t`` is given)."""
    model = learner.model
    was_training = model.training
    model.eval()

    def squared_norm(logits, idx):
        if t is not None:
            logits = logits * learner.output_mask[t[idx]]
        return logits.square().sum(1)

    sums = per_sample_grad_sum(model, squared_norm, x, "abs", batch_size)
    model.train(was_training)
    return [s / max(len(x), 1) for s in sums]


class MASPart(ImportanceRegularizer):
    accumulate_snapshots = False  # Omega is the running sum; the anchor is the latest task's end

    @property
    def strength(self) -> float:
        return float(self.cfg.mas_lambda)

    def importance(self, task):
        learner = self.learner
        n = len(learner.train_y)
        k = n if self.cfg.mas_samples is None else min(n, int(self.cfg.mas_samples))
        if k < n:
            rng = np.random.default_rng([learner.seed, task.id, 23])
            idx = torch.from_numpy(np.sort(rng.choice(n, size=k, replace=False))).to(learner.device)
        else:
            idx = torch.arange(n, device=learner.device)
        t = learner.train_t[idx] if learner.train_t is not None else None
        new = mas_importance(learner, learner.train_x[idx], t, int(self.cfg.mas_batch_size))
        return [old + o for old, o in zip(self.omega, new)]


@ALGORITHMS.register("mas", backend="torch")
class MAS(TorchLearner):
    part_classes = (MASPart,)


PLUGINS.register("mas", backend="torch")(MASPart)
