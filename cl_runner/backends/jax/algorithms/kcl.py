"""Kernel Continual Learning (Derakhshani et al. 2021, ICML) on the JAX backend.

The method is the PyTorch backend's (``cl_runner/backends/torch/algorithms/kcl.py``, whose
docstring states it in full): a shared feature extractor h (the backbone's ``features``, its
output scaled to unit length); the classifier of task t is kernel ridge regression on a coreset
C_t of ``coreset_size`` of the task's training samples (held out of its training data),

    yhat(x) = gamma_t k(x, C_t) (K_t + (|lambda_t| + 0.01) I)^-1 Y_t + beta_t,

with random Fourier features psi(x) = sqrt(2 / D) cos(omega h(x) + b), D = ``num_features``
bases omega ~ q(omega | C_t) = N(mu, diag sigma^2) from an amortised network on the coreset's
mean feature; the loss is the cross-entropy over the task's classes plus ``kl_weight`` times
KL(q || p), p(omega | batch) from a second amortised network on the batch's mean feature.
Training draws fresh bases every step (omega = mu + sigma eps); evaluation uses one eps and b
per task, fixed when the task starts.

On this backend every task's coreset (inputs, one-hot labels over all output units, eps, b) is
kept in stacked device arrays of fixed shape (num_tasks, ...) in the part's state, with the
current task id and a per-task "has a coreset" flag, so the epoch (and the evaluation) is one
compiled program for all tasks. One-hot labels over all output units give the same ridge
solution on the task's columns (the solve is column by column) and zero on the others, which
are masked to -inf: the softmax is over the task's classes as on PyTorch. In a padded last batch
the prior's input is the mean feature of the real samples only.

The coreset of each task is drawn with NumPy from the run's seed (PyTorch draws it with its own
generator), so the two backends hold different (equally random) coresets.

Not supported (clear errors): scenarios other than task-IL (as on PyTorch), growing heads (the
classifier is not a head), backbones with batch norm, and ``algo.plugins`` (KCL's step has no
place for their terms; the PyTorch backend's KCL does not call them either).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_runner.backends.jax.learner import JaxLearner, Part
from cl_runner.backends.jax.memory import check_no_batch_norm, derived_seed
from cl_runner.backends.jax.optim import set_lr
from cl_runner.errors import ConfigError
from cl_runner.registry import ALGORITHMS

tmap = jax.tree_util.tree_map


def random_features(h, omega, b):
    """psi(h) = sqrt(2 / D) cos(h omega^T + b) for D bases ``omega`` (D, d) and phases ``b`` (D,)."""
    return math.sqrt(2.0 / omega.shape[0]) * jnp.cos(h @ omega.T + b)


def kernel_ridge_predict(psi_query, psi_support, targets, ridge):
    """k(query, S) (k(S, S) + ridge I)^-1 Y with the linear kernel of the features ``psi``."""
    k_ss = psi_support @ psi_support.T
    alpha = jnp.linalg.solve(k_ss + ridge * jnp.eye(k_ss.shape[0], dtype=k_ss.dtype), targets)
    return (psi_query @ psi_support.T) @ alpha


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) of diagonal Gaussians, summed."""
    return 0.5 * jnp.sum(logvar_p - logvar_q + (jnp.exp(logvar_q) + (mu_q - mu_p) ** 2) / jnp.exp(logvar_p) - 1)


def amortised(p, mean_feature):
    """Mean feature (d,) -> (mu, log sigma^2): Linear, ELU, Linear, ELU, Linear(2d)."""
    h = jax.nn.elu(mean_feature @ p["l0"]["kernel"] + p["l0"]["bias"])
    h = jax.nn.elu(h @ p["l1"]["kernel"] + p["l1"]["bias"])
    out = h @ p["l2"]["kernel"] + p["l2"]["bias"]
    d = out.shape[-1] // 2
    return out[..., :d], out[..., d:]


def _dense(rng, fan_in: int, fan_out: int) -> dict:
    bound = 1.0 / math.sqrt(fan_in)
    return {"kernel": rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
            "bias": rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)}


class KCLPart(Part):
    """The coresets of every task (stacked), the current task and which tasks have a coreset."""


@ALGORITHMS.register("kcl", backend="jax")
class KCL(JaxLearner):
    part_classes = (KCLPart,)

    def __init__(self, cfg, stream, device, seed: int):
        if not stream.masks_logits:
            raise ConfigError("kcl predicts with the coreset of the sample's task, so it needs the task id: "
                              "use benchmark.scenario=task_il.")
        if (getattr(cfg.backbone, "head", "fixed") or "fixed") != "fixed":
            raise ConfigError(f"kcl classifies with kernel ridge regression, not a head; use "
                              f"backbone.head=fixed (got {cfg.backbone.head}).")
        if list(cfg.algo.plugins):
            raise ConfigError("algo=kcl on backend=jax does not compose plugins; set algo.plugins=[].")
        super().__init__(cfg, stream, device, seed)
        check_no_batch_norm(self, "kcl")
        algo = cfg.algo
        self.coreset_size = int(algo.coreset_size)
        self.num_features = int(algo.num_features)
        self.kl_weight = float(algo.kl_weight)
        d = int(self.model.feature_dim)
        self.feature_dim = d
        width = int(algo.inference_width or d)
        rng = np.random.default_rng([derived_seed(seed, 6161), 1])
        num_tasks = stream.num_tasks

        def net():
            return {"l0": _dense(rng, d, width), "l1": _dense(rng, width, width), "l2": _dense(rng, width, 2 * d)}

        params = {"features": self.params["features"], "posterior": net(), "prior": net(),
                  "ridge": np.full(num_tasks, float(algo.ridge_lambda), np.float32),
                  "scale": np.ones(num_tasks, np.float32), "shift": np.zeros(num_tasks, np.float32)}
        self.params = self.put(params)
        self.opt_state = self.put(set_lr(jax.jit(self.tx.init)(self.params), float(cfg.optimizer.lr)))
        self.host_rng = np.random.default_rng(derived_seed(seed, 6162))
        m, u = self.coreset_size, self.num_outputs()
        self.parts[0].state = self.put({
            "x": np.zeros((num_tasks, m, *stream.input_shape), np.float32),
            "y": np.zeros((num_tasks, m, u), np.float32),
            "eps": np.zeros((num_tasks, self.num_features, d), np.float32),
            "b": np.zeros((num_tasks, self.num_features), np.float32),
            "has": np.zeros(num_tasks, bool),
            "task": np.zeros((), np.int32),
        })
        self._kcl_eval_fn = jax.jit(self._kcl_eval_program)

    # -- data ----------------------------------------------------------------------------------
    def train_arrays(self, task):
        """The task's training data without its coreset; the coreset goes into the part's state."""
        n = len(task.train_y)
        if self.coreset_size >= n:
            raise ConfigError(f"algo.coreset_size={self.coreset_size} leaves nothing to train on in task "
                              f"{task.id + 1} ({n} training samples); choose a smaller coreset_size.")
        order = self.host_rng.permutation(n)
        core, rest = np.sort(order[: self.coreset_size]), np.sort(order[self.coreset_size:])
        st = {k: np.array(v) for k, v in self.parts[0].state.items()}
        st["x"][task.id] = np.asarray(self.to_input(np.asarray(task.train_x)[core]))
        onehot = np.zeros((self.coreset_size, self.num_outputs()), np.float32)
        onehot[np.arange(self.coreset_size), np.asarray(task.train_y)[core]] = 1.0
        st["y"][task.id] = onehot
        st["eps"][task.id] = self.host_rng.standard_normal((self.num_features, self.feature_dim)).astype(np.float32)
        st["b"][task.id] = (2 * math.pi * self.host_rng.random(self.num_features)).astype(np.float32)
        st["has"][task.id] = True
        st["task"] = np.int32(task.id)
        self.parts[0].state = self.put(st)
        return task.train_x[rest], task.train_y[rest], np.full(len(rest), task.id, dtype=np.int64)

    # -- the model (traced) ----------------------------------------------------------------------
    def embed(self, params, x, train: bool, dropout_key=None):
        rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else None
        h = self.model.features.apply({"params": params["features"]}, x, train=train, rngs=rngs)
        return h / jnp.maximum(jnp.linalg.norm(h, axis=1, keepdims=True), 1e-12)

    def task_logits(self, params, h, hc, core_y, task, eps, b, weights=None):
        """(logits over all units, task units first-class; KL(q || p)) for query features h."""
        mu_q, logvar_q = amortised(params["posterior"], jnp.mean(hc, axis=0))
        omega = mu_q + jnp.exp(0.5 * logvar_q) * eps
        out = kernel_ridge_predict(random_features(h, omega, b), random_features(hc, omega, b), core_y,
                                   jnp.abs(params["ridge"][task]) + 0.01)
        out = params["scale"][task] * out + params["shift"][task]
        if weights is None:
            mean_h = jnp.mean(h, axis=0)
        else:
            mean_h = jnp.sum(h * weights[:, None], axis=0) / jnp.maximum(jnp.sum(weights), 1e-12)
        mu_p, logvar_p = amortised(params["prior"], mean_h)
        return out, gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)

    def train_step(self, carry, batch, weights, x, y, t, mask_table):
        params, opt_state, part_states, key = carry
        st = part_states[0]
        key, eps_key, drop_key, drop_key2 = jax.random.split(key, 4)
        xb, yb = x[batch], y[batch]
        task = st["task"]
        core_x, core_y, b = st["x"][task], st["y"][task], st["b"][task]
        eps = jax.random.normal(eps_key, st["eps"].shape[1:], jnp.float32)
        dk = (drop_key, drop_key2) if self.dropout else (None, None)

        def loss_fn(p):
            h = self.embed(p, xb, True, dk[0])
            hc = self.embed(p, core_x, True, dk[1])
            out, kl = self.task_logits(p, h, hc, core_y, task, eps, b, weights)
            out = jnp.where(mask_table[task], out, -jnp.inf)
            ce = jax.nn.logsumexp(out, axis=-1) - jnp.take_along_axis(out, yb[:, None], axis=-1)[:, 0]
            if weights is None:
                ce = jnp.mean(ce)
            else:
                ce = jnp.sum(ce * weights) / jnp.sum(weights)
            return ce + self.kl_weight * kl

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, part_states, key), loss

    # -- evaluation ------------------------------------------------------------------------------
    def _kcl_eval_program(self, params, st, x, y, mask_table, task_id):
        self.trace_counts["eval"] += 1
        hc = self.embed(params, st["x"][task_id], False)

        def batch(args):
            xb, yb = args
            out, _ = self.task_logits(params, self.embed(params, xb, False), hc, st["y"][task_id], task_id,
                                      st["eps"][task_id], st["b"][task_id])
            out = jnp.where(st["has"][task_id], out, 0.0)  # not trained yet: no classifier
            logits = jnp.where(mask_table[task_id], out, -jnp.inf)
            return jnp.sum(jnp.argmax(logits, axis=1) == yb)

        return jnp.sum(jax.lax.map(batch, (x, y)))

    def evaluate(self, tasks, task_il: bool = False) -> dict[int, float]:
        pending = []
        st = self.parts[0].state
        for task in tasks:
            x, y = self.test_arrays(task)
            task_id = self.put(np.int32(task.id))
            pending.append((task, self._kcl_eval_fn(self.params, st, x, y, self.mask_table, task_id)))
        return {task.id: 100.0 * int(correct) / max(task.num_test, 1) for task, correct in pending}

    def predict(self, x, task_id: int | None = None):
        st = self.parts[0].state
        hc = self.embed(self.params, st["x"][task_id], False)
        out, _ = self.task_logits(self.params, self.embed(self.params, x, False), hc, st["y"][task_id], task_id,
                                  st["eps"][task_id], st["b"][task_id])
        out = jnp.where(st["has"][task_id], out, 0.0)
        return jnp.argmax(jnp.where(self.mask_table[task_id], out, -jnp.inf), axis=1)
