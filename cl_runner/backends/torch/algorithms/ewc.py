"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, PNAS).

After each task the diagonal Fisher information F of that task is estimated at the task's final
parameters theta*_t, and training on later tasks adds (ewc_lambda / 2) * sum_t F_t (theta -
theta*_t)^2: one penalty per past task, as in the paper.

F is the mean over ``fisher_samples`` training samples of the squared per-sample gradient of the
log-likelihood (computed exactly per sample, not from mini-batch gradients; see persample.py), with
the true label (``fisher: empirical``) or a label drawn from the model (``fisher: true``);
``fisher: weighted`` weights each sample's term by p(y | x) (Mammoth's online EWC, models/ewc_on.py).
``fisher: batch`` is the estimator of GEM's EWC baseline (Lopez-Paz & Ranzato 2017,
model/ewc.py): the square of the gradient of the mean loss over the ``fisher_samples`` samples.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.backends.torch.persample import per_sample_grad_sum
from cl_runner.backends.torch.regularization import ImportanceRegularizer
from cl_runner.registry import ALGORITHMS, PLUGINS


def fisher_diagonal(learner: TorchLearner, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None,
                    batch_size: int, kind: str = "empirical",
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Mean over samples of the squared per-sample gradient of log p(y | x), per parameter
    (``kind: weighted``: each sample's term weighted by p(y | x)).

    Computed with the model in eval mode (no dropout): the Fisher of the trained network.
    """
    model = learner.model
    was_training = model.training
    model.eval()
    if kind == "batch":
        grads = mean_loss_grad(learner, x, y, t, batch_size)
        model.train(was_training)
        return [g * g for g in grads]
    if kind == "true":
        with torch.no_grad():
            labels = []
            for lo in range(0, len(x), batch_size):
                tb = t[lo:lo + batch_size] if t is not None else None
                probs = F.softmax(learner.masked(model(x[lo:lo + batch_size]), tb), dim=1)
                labels.append(torch.multinomial(probs, 1, generator=generator).squeeze(1))
            y = torch.cat(labels)

    def nll(logits, idx):
        losses = F.cross_entropy(learner.masked(logits, t[idx] if t is not None else None), y[idx],
                                 reduction="none")
        if kind == "weighted":  # sqrt(p) on the loss gives p * g^2 in the square
            losses = losses * torch.exp(-0.5 * losses.detach())
        return losses

    sums = per_sample_grad_sum(model, nll, x, "square", batch_size)
    model.train(was_training)
    return [s / max(len(x), 1) for s in sums]


def mean_loss_grad(learner: TorchLearner, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None,
                   batch_size: int) -> list[torch.Tensor]:
    """Gradient of the mean cross-entropy over all of ``x`` (accumulated over chunks)."""
    model = learner.model
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    n = max(len(x), 1)
    for lo in range(0, len(x), batch_size):
        tb = t[lo:lo + batch_size] if t is not None else None
        loss = F.cross_entropy(learner.masked(model(x[lo:lo + batch_size]), tb), y[lo:lo + batch_size],
                               reduction="sum") / n
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc += g
    return total


class EWCPart(ImportanceRegularizer):
    accumulate_snapshots = True

    @property
    def strength(self) -> float:
        return self.cfg.ewc_lambda / 2.0

    def importance(self, task):
        learner = self.learner
        n = len(learner.train_y)
        k = n if self.cfg.fisher_samples is None else min(n, int(self.cfg.fisher_samples))
        rng = np.random.default_rng([learner.seed, task.id, 17])
        idx = torch.from_numpy(np.sort(rng.choice(n, size=k, replace=False))).to(learner.device)
        t = learner.train_t[idx] if learner.train_t is not None else None
        gen = torch.Generator(device=learner.device).manual_seed(learner.seed * 1000 + task.id)
        return fisher_diagonal(learner, learner.train_x[idx], learner.train_y[idx], t,
                                 int(self.cfg.fisher_batch_size), self.cfg.fisher, gen)


@ALGORITHMS.register("ewc", backend="torch")
class EWC(TorchLearner):
    part_classes = (EWCPart,)


PLUGINS.register("ewc", backend="torch")(EWCPart)
