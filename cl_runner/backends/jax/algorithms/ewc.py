"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, PNAS) on the JAX backend.

After each task the diagonal Fisher information F of that task is estimated at the task's final
parameters theta*_t, and training on later tasks adds (ewc_lambda / 2) * sum_t F_t (theta -
theta*_t)^2: one penalty per past task, kept as sums (see regularization.py).

F is the mean over ``fisher_samples`` training samples (the same samples as on the PyTorch
backend: drawn with NumPy from (seed, task id)) of the squared per-sample gradient of the
log-likelihood, computed exactly per sample with ``jax.vmap(jax.grad(...))``, with the true
label (``fisher: empirical``), a label drawn from the model (``fisher: true``) or the model's most
likely label (``fisher: argmax``, Hsu et al.'s EWC); ``fisher: weighted`` weights each sample's
term by p(y | x) (Mammoth's online EWC); ``fisher: batch``: the squared gradient of the mean loss
over those samples (GEM's EWC baseline). ``fisher: agem`` is A-GEM's EWC (``AGEMFisherPart``;
the PyTorch backend's ewc.py cites the reference line by line).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.backends.jax.learner import JaxLearner, cross_entropy, per_sample_compiler_options
from cl_runner.backends.jax.regularization import ImportanceRegularizer
from cl_runner.registry import ALGORITHMS, PLUGINS

tmap = jax.tree_util.tree_map
CPU_CHUNK = 16


def _fisher_mean(learner: JaxLearner, batch_size: int, kind: str, params, x, y, t, mask_table, key):
    """Mean over samples of the squared per-sample gradient of -log p(y | x) (traced).

    Scans over batches of ``batch_size`` samples; a last partial batch is padded (with copies
    of sample 0) and its padding gets weight 0, so the per-sample gradient is compiled once.
    """
    learner.trace_counts["fisher"] += 1

    def sample_nll(p, xi, yi, ti):
        logits = learner.model.apply({"params": p}, xi[None], train=False)
        logits = learner.masked(logits, None if ti is None else ti[None], mask_table)
        return cross_entropy(logits, yi[None])[0]

    per_sample = jax.vmap(jax.grad(sample_nll), in_axes=(None, 0, 0, 0))

    def batch_sum(totals, batch):
        xb, yb, tb, wb, kb = batch
        if kind in ("true", "argmax"):
            logits = learner.model.apply({"params": params}, xb, train=False)
            logits = learner.masked(logits, tb, mask_table)
            if kind == "argmax":  # the most likely label (within the sample's task in task-IL)
                yb = jnp.argmax(logits, axis=-1).astype(yb.dtype)
            else:
                yb = jax.random.categorical(kb, logits, axis=-1).astype(yb.dtype)
        grads = per_sample(params, xb, yb, tb)
        if kind == "weighted":  # each sample's squared gradient weighted by p(y | x)
            logits = learner.model.apply({"params": params}, xb, train=False)
            logits = learner.masked(logits, tb, mask_table)
            wb = wb * jnp.exp(-cross_entropy(logits, yb))

        def add(s, g):
            w = wb.reshape((-1,) + (1,) * (g.ndim - 1))
            return s + jnp.sum(g * g * w, axis=0)

        return tmap(add, totals, grads), None

    n = y.shape[0]
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    index = jnp.concatenate([jnp.arange(n, dtype=jnp.int32), jnp.zeros(pad, jnp.int32)])
    weights = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])

    def batched(a):
        if a is None:
            return None
        a = a[index] if pad else a
        return a.reshape((num_batches, batch_size) + a.shape[1:])

    xs = (batched(x), batched(y), batched(t), weights.reshape(num_batches, batch_size),
          jax.random.split(key, num_batches))
    totals, _ = jax.lax.scan(batch_sum, tmap(jnp.zeros_like, params), xs)
    return tmap(lambda s: s / n, totals)


def fisher_diagonal(learner: JaxLearner, params, x, y, t, batch_size: int, kind: str = "empirical",
                    key=None):
    """Mean over samples of the squared per-sample gradient of log p(y | x), per parameter.

    ``x`` normalised inputs (N, C, H, W), ``y`` labels, ``t`` task ids (task-IL) or None.
    Computed without dropout: the Fisher of the trained network. One compiled program per
    learner, batch size, kind and input shape. On CPU the per-sample gradients are computed
    ``CPU_CHUNK`` samples at a time whatever ``batch_size`` says (the (chunk, *parameter shape)
    intermediates then stay in cache: ~7x faster than 256 at a time; the result is the same).
    """
    if kind == "batch":
        return batch_fisher(learner, params, x, y, t)
    if key is None:
        key = learner.put(jax.random.PRNGKey(0))
    platform = learner.jax_device.platform
    if platform == "cpu":
        batch_size = min(batch_size, CPU_CHUNK)
    if int(y.shape[0]) == 0:
        return tmap(jnp.zeros_like, params)
    cache = learner.__dict__.setdefault("_fisher_programs", {})
    if (batch_size, kind) not in cache:
        cache[(batch_size, kind)] = jax.jit(partial(_fisher_mean, learner, batch_size, kind),
                                            compiler_options=per_sample_compiler_options(platform))
    return cache[(batch_size, kind)](params, x, y, t, learner.mask_table, key)


def _batch_fisher(learner: JaxLearner, params, x, y, t, mask_table):
    def mean_nll(p):
        logits = learner.model.apply({"params": p}, x, train=False)
        return jnp.mean(cross_entropy(learner.masked(logits, t, mask_table), y))

    return tmap(lambda g: g * g, jax.grad(mean_nll)(params))


def batch_fisher(learner: JaxLearner, params, x, y, t):
    """``fisher: batch``: the squared gradient of the mean loss over all of ``x`` (GEM's EWC)."""
    cache = learner.__dict__.setdefault("_fisher_programs", {})
    if "batch" not in cache:
        cache["batch"] = jax.jit(partial(_batch_fisher, learner))
    return cache["batch"](params, x, y, t, learner.mask_table)


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
        n = int(learner.train_y.shape[0])
        k = n if self.cfg.fisher_samples is None else min(n, int(self.cfg.fisher_samples))
        rng = np.random.default_rng([learner.seed, task.id, 17])
        idx = learner.put(np.sort(rng.choice(n, size=k, replace=False)).astype(np.int32))
        t = learner.train_t[idx] if learner.train_t is not None else None
        key = learner.put(jax.random.PRNGKey(learner.seed * 1000 + task.id))
        return fisher_diagonal(learner, learner.params, learner.train_x[idx], learner.train_y[idx], t,
                               int(self.cfg.fisher_batch_size), self.cfg.fisher, key)


class AGEMFisherPart(EWCPart):
    """A-GEM's EWC (``fisher: agem``; the PyTorch backend's ``AGEMFisherPart`` cites the
    reference): a window sum S of squared step gradients and a running Fisher F in the part's
    state, updated inside the compiled step: at step i of a task (from 0), when (i + 1) is a
    multiple of N = ``fisher_update_after``, F <- (1 - d) F + (d / N) S and S <- 0, before the
    step's square is added to S. After the task F is min-max normalised over all parameters; the
    penalty is ewc_lambda * sum F_hat (theta - theta*)^2 with the latest task's term only."""

    accumulate_snapshots = False

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)

        def zeros(p):
            return np.zeros(p.shape, p.dtype)

        self.state = learner.put({**self.state, "window": tmap(zeros, learner.params),
                                  "running": tmap(zeros, learner.params),
                                  "step_in_task": np.zeros((), np.int32)})

    @property
    def strength(self) -> float:
        return float(self.cfg.ewc_lambda)

    def on_before_task(self, task) -> None:
        self.state = {**self.state, "step_in_task": self.learner.put(np.zeros((), np.int32))}

    def after_step(self, old_params, new_params, grads, state):
        period = int(self.cfg.fisher_update_after)
        decay = float(self.cfg.fisher_ema_decay)
        step = state["step_in_task"]
        due = (step + 1) % period == 0
        running = tmap(lambda f, s: jnp.where(due, (1.0 - decay) * f + (decay / period) * s, f),
                       state["running"], state["window"])
        window = tmap(lambda s, g: jnp.where(due, 0.0, s) + g * g, state["window"], grads)
        return {**state, "running": running, "window": window, "step_in_task": step + 1}

    def importance(self, task):
        running = self.state["running"]
        leaves = jax.tree_util.tree_leaves(running)
        lo = min(float(jnp.min(f)) for f in leaves)
        hi = max(float(jnp.max(f)) for f in leaves)
        self.state = {**self.state, "window": tmap(jnp.zeros_like, self.state["window"])}
        return tmap(lambda f: (f - lo) / (hi - lo + 1e-32), running)


@ALGORITHMS.register("ewc", backend="jax")
class EWC(JaxLearner):
    part_classes = (EWCPart,)


PLUGINS.register("ewc", backend="jax")(EWCPart)
