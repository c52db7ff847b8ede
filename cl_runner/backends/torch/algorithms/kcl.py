"""Kernel Continual Learning (Derakhshani et al. 2021, ICML).

A feature extractor h (the backbone's ``features``) is shared by all tasks; the classifier of
task t is not a layer but kernel ridge regression on a coreset C_t of that task, kept for ever:

    yhat(x) = gamma_t * k(x, C_t) (K_t + lambda_t I)^-1 Y_t + beta_t,

where K_t = k(C_t, C_t), Y_t the coreset's one-hot labels over the task's classes, lambda_t the
task's ridge strength (|lambda_t| + 0.01, learned), gamma_t and beta_t a learned scale and shift.
The outputs are the logits of a softmax cross-entropy over the task's classes.

The kernel is given by random Fourier features psi(x) = sqrt(2 / D) cos(omega h(x) + b), k = psi
psi^T, whose D bases omega_1..omega_D are drawn from a task-specific spectral distribution
q(omega | C_t) = N(mu, diag sigma^2) inferred by an amortised network from the coreset's mean
feature (variational random features). A second amortised network gives the prior p(omega | x)
from the current batch's mean feature; the loss adds kl_weight * KL(q || p) (the paper's tau).

The features are scaled to unit length before the random features: without a bound on them the
ridge solution's gradient lets the features grow until the step diverges (the authors' code
bounds them by a min-max rescaling of each batch; a per-sample scaling keeps a query's
prediction independent of the rest of its batch).

The coreset of a task (``coreset_size`` samples, drawn at random) is taken out of its training
data; the rest is trained on. Training draws fresh bases every step (the reparameterisation
omega = mu + sigma * eps); evaluation uses one draw of eps and b per task, fixed when the task
starts, so predictions are deterministic. The method needs the task id to pick the coreset
(task-IL only).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.backends.torch.optim import build_optimizer
from cl_runner.errors import ConfigError
from cl_runner.registry import ALGORITHMS


def random_features(h: torch.Tensor, omega: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """psi(h) = sqrt(2 / D) cos(h omega^T + b) for D bases ``omega`` (D, d) and phases ``b`` (D,)."""
    return math.sqrt(2.0 / omega.shape[0]) * torch.cos(h @ omega.T + b)


def kernel_ridge_predict(psi_query: torch.Tensor, psi_support: torch.Tensor, targets: torch.Tensor,
                         ridge: torch.Tensor | float) -> torch.Tensor:
    """k(query, S) (k(S, S) + ridge I)^-1 Y with the linear kernel of the features ``psi``."""
    k_ss = psi_support @ psi_support.T
    eye = torch.eye(k_ss.shape[0], dtype=k_ss.dtype, device=k_ss.device)
    alpha = torch.linalg.solve(k_ss + ridge * eye, targets)
    return (psi_query @ psi_support.T) @ alpha


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) of diagonal Gaussians, summed over dimensions."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum()


class Amortised(nn.Module):
    """Mean feature (d,) -> (mu, log sigma^2) of a Gaussian over R^d."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ELU(), nn.Linear(width, width), nn.ELU(),
                                 nn.Linear(width, 2 * dim))

    def forward(self, mean_feature: torch.Tensor):
        mu, logvar = self.net(mean_feature).chunk(2, dim=-1)
        return mu, logvar


class KernelNet(nn.Module):
    def __init__(self, features: nn.Module, feature_dim: int, num_tasks: int, width: int, ridge: float):
        super().__init__()
        self.features = features
        self.feature_dim = feature_dim
        self.posterior = Amortised(feature_dim, width)
        self.prior = Amortised(feature_dim, width)
        self.ridge = nn.Parameter(torch.full((num_tasks,), float(ridge)))
        self.scale = nn.Parameter(torch.ones(num_tasks))
        self.shift = nn.Parameter(torch.zeros(num_tasks))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features scaled to unit length (bounded inputs to the random features)."""
        return F.normalize(self.features(x), dim=1)

    def task_logits(self, x, core_x, core_y, task: int, eps: torch.Tensor, b: torch.Tensor):
        """(logits over the task's classes, KL(q || p)) for queries ``x`` of task ``task``."""
        h, hc = self.embed(x), self.embed(core_x)
        mu_q, logvar_q = self.posterior(hc.mean(0))
        omega = mu_q + (0.5 * logvar_q).exp() * eps
        out = kernel_ridge_predict(random_features(h, omega, b), random_features(hc, omega, b), core_y,
                                   self.ridge[task].abs() + 0.01)
        out = self.scale[task] * out + self.shift[task]
        mu_p, logvar_p = self.prior(h.mean(0))
        return out, gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)


@ALGORITHMS.register("kcl", backend="torch")
class KCL(TorchLearner):
    refuses_plugins = "its per-task kernel classifiers replace the shared training step"

    def __init__(self, cfg, stream, device, seed: int):
        if not stream.masks_logits:
            raise ConfigError("kcl predicts with the coreset of the sample's task, so it needs the task id: "
                              "use benchmark.scenario=task_il.")
        if cfg.backend.compile:
            raise ConfigError("kcl does not use the compiled step; set backend.compile=false.")
        super().__init__(cfg, stream, device, seed)
        algo = cfg.algo
        self.coreset_size = int(algo.coreset_size)
        self.num_features = int(algo.num_features)
        self.kl_weight = float(algo.kl_weight)
        d = self.model.feature_dim
        self.model = KernelNet(self.model.features, d, stream.num_tasks, int(algo.inference_width or d),
                               float(algo.ridge_lambda)).to(device)
        self.train_forward = self.model
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optimizer)
        # position of each output unit inside its task's units
        self.unit_pos = (self.output_mask.cumsum(1) - 1).clamp(min=0)
        self.coresets: dict[int, dict[str, torch.Tensor]] = {}
        self.current = 0

    def train_arrays(self, task):
        """The task's training data without its coreset; the coreset is kept for the task's predictions."""
        n = len(task.train_y)
        if self.coreset_size >= n:
            raise ConfigError(f"algo.coreset_size={self.coreset_size} leaves nothing to train on in task "
                              f"{task.id} ({n} training samples); choose a smaller coreset_size.")
        order = torch.randperm(n, generator=self.generator).numpy()
        core, rest = np.sort(order[: self.coreset_size]), np.sort(order[self.coreset_size:])
        units = self.output_mask[task.id]
        core_y = torch.from_numpy(np.asarray(task.train_y)[core]).to(self.device)
        eps = torch.randn(self.num_features, self.model.feature_dim, generator=self.generator).to(self.device)
        b = (2 * math.pi * torch.rand(self.num_features, generator=self.generator)).to(self.device)
        self.coresets[task.id] = {
            "x": self.to_input(np.asarray(task.train_x)[core]),
            "y": F.one_hot(self.unit_pos[task.id][core_y], int(units.sum())).float(),
            "eps": eps, "b": b,
        }
        self.current = task.id
        return task.train_x[rest], task.train_y[rest], np.full(len(rest), task.id, dtype=np.int64)

    def full_logits(self, out: torch.Tensor, task: int) -> torch.Tensor:
        logits = out.new_full((out.shape[0], self.num_outputs()), float("-inf"))
        logits[:, self.output_mask[task]] = out
        return logits

    def train_step(self, x, y, t):
        task = self.current
        core = self.coresets[task]
        eps = torch.randn_like(core["eps"])
        out, kl = self.model.task_logits(x, core["x"], core["y"], task, eps, core["b"])
        loss = F.cross_entropy(out, self.unit_pos[task][y]) + self.kl_weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.clip_gradients()
        self.optimizer.step()
        return loss.detach()

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: int | None) -> torch.Tensor:
        core = self.coresets.get(task_id)
        if core is None:  # not trained yet: no classifier for this task
            logits = torch.zeros(x.shape[0], self.num_outputs(), device=x.device)
            return logits.masked_fill(~self.output_mask[task_id], float("-inf")).argmax(1)
        out, _ = self.model.task_logits(x, core["x"], core["y"], task_id, core["eps"], core["b"])
        return self.full_logits(out, task_id).argmax(1)

    def state_dict(self):
        state = super().state_dict()
        state["coresets"] = {k: {n: v.cpu() for n, v in c.items()} for k, c in self.coresets.items()}
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.coresets = {int(k): {n: v.to(self.device) for n, v in c.items()} for k, c in state["coresets"].items()}
