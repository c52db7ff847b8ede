"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, PNAS).

After each task the diagonal Fisher information F of that task is estimated at the task's final
parameters theta*_t, and training on later tasks adds (ewc_lambda / 2) * sum_t F_t (theta -
theta*_t)^2: one penalty per past task, as in the paper.

F is the mean over ``fisher_samples`` training samples of the squared per-sample gradient of the
log-likelihood (computed exactly per sample, not from mini-batch gradients; see persample.py), with
the true label (``fisher: empirical``), a label drawn from the model (``fisher: true``) or the
model's most likely label (``fisher: argmax``: Hsu et al.'s EWC, GT-RIPL/Continual-Learning-Benchmark
agents/regularization.py:133 ``ind = pred.max(1)[1]``, per sample with ``n_fisher_sample`` set as in
its MNIST agents, agents/customization.py ``EWC_mnist``); ``fisher: weighted`` weights each
sample's term by p(y | x) (Mammoth's online EWC, models/ewc_on.py). ``fisher: batch`` is the
estimator of GEM's EWC baseline (Lopez-Paz & Ranzato 2017, model/ewc.py): the square of the
gradient of the mean loss over the ``fisher_samples`` samples.

``fisher: agem`` is A-GEM's EWC (facebookresearch/agem model/model.py; ``AGEMFisherPart``), a
different method around the same penalty: the Fisher is a running average of squared mini-batch
gradients taken during training, min-max normalised, and the penalty has one term (the latest
task's) and no factor 1/2.
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
    if kind in ("true", "argmax"):
        with torch.no_grad():
            labels = []
            for lo in range(0, len(x), batch_size):
                tb = t[lo:lo + batch_size] if t is not None else None
                logits = learner.masked(model(x[lo:lo + batch_size]), tb)
                if kind == "argmax":  # the most likely label (within the sample's task in task-IL)
                    labels.append(logits.argmax(1))
                else:
                    probs = F.softmax(logits, dim=1)
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

    def __new__(cls, learner, cfg):
        # fisher: agem is its own part (it reads every step's gradient); every other estimator
        # only changes ``importance``.
        if cls is EWCPart and getattr(cfg, "fisher", None) == "agem":
            cls = AGEMFisherPart
        return super().__new__(cls)

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


class AGEMFisherPart(EWCPart):
    """A-GEM's EWC (``fisher: agem``), as facebookresearch/agem implements it:

    * every training step adds the square of the gradient of the step's mini-batch loss (the data
      loss, without the penalty) to a window sum S (model/model.py:1086 ``set_tmp_fisher``, run with
      the step, fc_permute_mnist.py / conv_split_cifar.py:381);
    * at step i of a task (from 0), before that step's square is added, when (i + 1) is a multiple
      of N = ``fisher_update_after`` (conv_split_cifar.py:373): F <- (1 - d) F + (d / N) S with
      d = ``fisher_ema_decay``, and S <- 0 (model/model.py:1092 ``set_running_fisher``, 1098). The
      first window of each task therefore holds N - 1 squares, the later ones N; F is never reset,
      so it carries over between tasks;
    * after the task, F_hat = (F - min F) / (max F - min F + 1e-32), min and max over every
      parameter of the network (model/model.py:1100-1110), and S <- 0 (task_updates, 1252-1260);
    * the penalty is ewc_lambda * sum F_hat (theta - theta*)^2 with theta* the parameters at the end
      of the latest task (model/model.py:850-852, star_vars set in init_updates after each task):
      one term, replaced after every task, without a factor 1/2.

    The step's gradient is read as SI reads it (a post-accumulate-grad hook, before any part adds
    a penalty); the window's arithmetic runs after the optimizer step. The fused MLP step and the
    native update still apply (the penalty gradient is the shared one); CUDA graphs do not (a hook
    and a part after every step).
    """

    accumulate_snapshots = False  # one (F_hat, theta*) term, overwritten after each task

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.step_grad = [torch.zeros_like(p) for p in self.params]  # the current step's gradient
        self.window = [torch.zeros_like(p) for p in self.params]     # S
        self.running = [torch.zeros_like(p) for p in self.params]    # F
        self.step_in_task = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_hook(i))
                       for i, p in enumerate(self.params)]

    def _grad_hook(self, i: int):
        buf = self.step_grad[i]

        def hook(p: torch.Tensor) -> None:
            buf.copy_(p.grad)

        return hook

    @property
    def strength(self) -> float:
        return float(self.cfg.ewc_lambda)

    def on_before_task(self, task) -> None:
        self.step_in_task = 0

    @torch.no_grad()
    def after_step(self) -> None:
        period = int(self.cfg.fisher_update_after)
        if (self.step_in_task + 1) % period == 0:
            decay = float(self.cfg.fisher_ema_decay)
            torch._foreach_mul_(self.running, 1.0 - decay)
            torch._foreach_add_(self.running, self.window, alpha=decay / period)
            torch._foreach_zero_(self.window)
        torch._foreach_addcmul_(self.window, self.step_grad, self.step_grad)
        torch._foreach_zero_(self.step_grad)  # a parameter left without gradient adds nothing
        self.step_in_task += 1

    @torch.no_grad()
    def importance(self, task):
        lo = min(float(f.min()) for f in self.running)
        hi = max(float(f.max()) for f in self.running)
        torch._foreach_zero_(self.window)
        return [(f - lo) / (hi - lo + 1e-32) for f in self.running]

    def state_dict(self):
        return {**super().state_dict(), "window": [w.clone() for w in self.window],
                "running": [f.clone() for f in self.running], "step_in_task": self.step_in_task}

    @torch.no_grad()
    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        for dst, src in zip(self.window, state["window"]):
            dst.copy_(src)
        for dst, src in zip(self.running, state["running"]):
            dst.copy_(src)
        self.step_in_task = int(state["step_in_task"])


@ALGORITHMS.register("ewc", backend="torch")
class EWC(TorchLearner):
    part_classes = (EWCPart,)


PLUGINS.register("ewc", backend="torch")(EWCPart)
