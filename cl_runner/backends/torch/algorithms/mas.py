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

``mas_importance: batch_mean`` is Hsu et al.'s estimator (GT-RIPL/Continual-Learning-Benchmark
agents/regularization.py:297-322): the task's samples in a random order, in mini-batches B of
``mas_batch_size`` (the reference passes its shuffled training loader), and

    Omega_i^t = 1/|batches| sum_B | d/d theta_i mean_{k in B, units j} f_j(x_k)^2 |

(``pred.pow_(2); loss = pred.mean()``: a mean over the batch and the output units, the task's
units in task-IL; ``p += grad.abs() / len(dataloader)``). It is on the scale of Hsu's
``reg_coef``: at most 1/C of the per-sample estimator (C output units), less where the samples'
gradients cancel in the batch mean.
"""

from __future__ import annotations

import torch

from cl_runner.algorithms.regularization import mas_sample_indices
from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.backends.torch.persample import per_sample_grad_sum
from cl_runner.backends.torch.regularization import ImportanceRegularizer
from cl_runner.registry import ALGORITHMS, PLUGINS


def mas_importance(learner: TorchLearner, x: torch.Tensor, t: torch.Tensor | None,
                   batch_size: int, kind: str = "per_sample") -> list[torch.Tensor]:
    """Mean over the samples ``x`` of |d ||f(x)||^2 / d theta| per parameter (f: the logits,
    restricted to each sample's task units when ``t`` is given); ``kind: batch_mean``: the mean
    over the consecutive batches of ``batch_size`` samples of |d mean_{batch, units} f^2 / d theta|."""
    model = learner.model
    was_training = model.training
    model.eval()
    if kind == "batch_mean":
        params = [p for p in model.parameters() if p.requires_grad]
        totals = [torch.zeros_like(p) for p in params]
        starts = range(0, len(x), batch_size)
        for lo in starts:
            out = model(x[lo:lo + batch_size])
            if t is not None:
                mask = learner.output_mask[t[lo:lo + batch_size]]
                per_sample = (out * mask).square().sum(1) / mask.sum(1)
            else:
                per_sample = out.square().mean(1)
            for acc, g in zip(totals, torch.autograd.grad(per_sample.mean(), params)):
                acc += g.abs()
        model.train(was_training)
        return [s / max(len(starts), 1) for s in totals]

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
        kind = self.cfg.mas_importance
        idx = mas_sample_indices(learner.seed, task.id, n, self.cfg.mas_samples, kind)
        idx = torch.arange(n, device=learner.device) if idx is None else torch.from_numpy(idx).to(learner.device)
        t = learner.train_t[idx] if learner.train_t is not None else None
        new = mas_importance(learner, learner.train_x[idx], t, int(self.cfg.mas_batch_size), kind)
        return [old + o for old, o in zip(self.omega, new)]


@ALGORITHMS.register("mas", backend="torch")
class MAS(TorchLearner):
    part_classes = (MASPart,)


PLUGINS.register("mas", backend="torch")(MASPart)
