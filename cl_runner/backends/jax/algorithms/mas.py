"""Memory Aware Synapses (Aljundi et al. 2018, "Memory Aware Synapses: Learning what (not) to
forget", ECCV) on the JAX backend.

After each task, the importance of parameter i is the mean over the task's samples x_k of the
absolute value of the gradient of the squared L2 norm of the network's output (the logits, no
softmax):

    Omega_i^t = 1/N sum_k | d ||F(x_k; theta)||_2^2 / d theta_i |

computed exactly per sample (``jax.vmap(jax.grad(...))``), without dropout. In task-IL F is the
sample's task head (its task's output units). Importances are accumulated over tasks
(Omega <- Omega + Omega^t), and later tasks add mas_lambda * sum_i Omega_i (theta_i - theta*_i)^2
with theta* the parameters at the end of the last task (no factor 1/2). The samples are those
the PyTorch backend uses (drawn with NumPy from (seed, task id) when ``mas_samples`` is set).
``mas_importance: batch_mean`` is Hsu et al.'s batch-mean estimator (the PyTorch backend's mas.py
cites it): the mean over mini-batches of |d mean_{batch, units} f^2 / d theta|, in the same
random order of the samples as there.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.algorithms.regularization import mas_sample_indices
from cl_runner.backends.jax.algorithms.ewc import CPU_CHUNK
from cl_runner.backends.jax.learner import JaxLearner, per_sample_compiler_options
from cl_runner.backends.jax.memory import check_no_batch_norm
from cl_runner.backends.jax.regularization import ImportanceRegularizer
from cl_runner.registry import ALGORITHMS, PLUGINS

tmap = jax.tree_util.tree_map


def _mas_mean(learner: JaxLearner, batch_size: int, params, x, t, mask_table):
    """Mean over samples of |d ||f(x)||^2 / d theta| (traced); a padded last batch has weight 0."""
    learner.trace_counts["mas"] += 1

    def squared_norm(p, xi, ti):
        logits = learner.model.apply({"params": p}, xi[None], train=False)[0]
        if ti is not None:
            logits = jnp.where(mask_table[ti], logits, 0.0)
        return jnp.sum(logits * logits)

    per_sample = jax.vmap(jax.grad(squared_norm), in_axes=(None, 0, 0))

    def batch_sum(totals, batch):
        xb, tb, wb = batch
        grads = per_sample(params, xb, tb)

        def add(s, g):
            w = wb.reshape((-1,) + (1,) * (g.ndim - 1))
            return s + jnp.sum(jnp.abs(g) * w, axis=0)

        return tmap(add, totals, grads), None

    n = x.shape[0]
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    index = jnp.concatenate([jnp.arange(n, dtype=jnp.int32), jnp.zeros(pad, jnp.int32)])
    weights = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])

    def batched(a):
        if a is None:
            return None
        a = a[index] if pad else a
        return a.reshape((num_batches, batch_size) + a.shape[1:])

    totals, _ = jax.lax.scan(batch_sum, tmap(jnp.zeros_like, params),
                             (batched(x), batched(t), weights.reshape(num_batches, batch_size)))
    return tmap(lambda s: s / n, totals)


def _mas_batch_mean(learner: JaxLearner, batch_size: int, params, x, t, mask_table):
    """Mean over consecutive batches of |d mean_{batch, units} f^2 / d theta| (traced); the last
    batch is padded with weight-0 copies of sample 0 and averages over its real samples."""
    learner.trace_counts["mas"] += 1

    def batch_loss(p, xb, tb, wb):
        logits = learner.model.apply({"params": p}, xb, train=False)
        if tb is None:
            per_sample = jnp.mean(logits * logits, axis=1)
        else:
            mask = mask_table[tb]
            per_sample = jnp.sum(jnp.where(mask, logits * logits, 0.0), axis=1) / jnp.sum(mask, axis=1)
        return jnp.sum(per_sample * wb) / jnp.sum(wb)

    def batch_sum(totals, batch):
        xb, tb, wb = batch
        grads = jax.grad(batch_loss)(params, xb, tb, wb)
        return tmap(lambda s, g: s + jnp.abs(g), totals, grads), None

    n = x.shape[0]
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    index = jnp.concatenate([jnp.arange(n, dtype=jnp.int32), jnp.zeros(pad, jnp.int32)])
    weights = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])

    def batched(a):
        if a is None:
            return None
        a = a[index] if pad else a
        return a.reshape((num_batches, batch_size) + a.shape[1:])

    totals, _ = jax.lax.scan(batch_sum, tmap(jnp.zeros_like, params),
                             (batched(x), batched(t), weights.reshape(num_batches, batch_size)))
    return tmap(lambda s: s / num_batches, totals)


def mas_importance(learner: JaxLearner, params, x, t, batch_size: int, kind: str = "per_sample"):
    """Mean over the samples ``x`` of |d ||f(x)||^2 / d theta| per parameter (f: the logits,
    restricted to each sample's task units when ``t`` is given); ``kind: batch_mean``: the mean
    over the consecutive batches of ``batch_size`` samples of |d mean_{batch, units} f^2 / d theta|.
    One compiled program per learner, kind, batch size and input shape."""
    if int(x.shape[0]) == 0:
        return tmap(jnp.zeros_like, params)
    if kind == "batch_mean":  # the batches are the estimator's, not a chunking: never resized
        cache = learner.__dict__.setdefault("_mas_programs", {})
        if ("batch_mean", batch_size) not in cache:
            cache[("batch_mean", batch_size)] = jax.jit(partial(_mas_batch_mean, learner, batch_size))
        return cache[("batch_mean", batch_size)](params, x, t, learner.mask_table)
    platform = learner.jax_device.platform
    if platform == "cpu":
        batch_size = min(batch_size, CPU_CHUNK)
    cache = learner.__dict__.setdefault("_mas_programs", {})
    if batch_size not in cache:
        cache[batch_size] = jax.jit(partial(_mas_mean, learner, batch_size),
                                    compiler_options=per_sample_compiler_options(platform))
    return cache[batch_size](params, x, t, learner.mask_table)


class MASPart(ImportanceRegularizer):
    accumulate_snapshots = False  # Omega is the running sum; the anchor is the latest task's end

    @property
    def strength(self) -> float:
        return float(self.cfg.mas_lambda)

    def on_before_task(self, task) -> None:
        check_no_batch_norm(self.learner, "mas")

    def importance(self, task):
        learner = self.learner
        n = int(learner.train_y.shape[0])
        kind = self.cfg.mas_importance
        idx = mas_sample_indices(learner.seed, task.id, n, self.cfg.mas_samples, kind)
        if idx is not None:
            idx = learner.put(idx.astype(np.int32))
            x = learner.train_x[idx]
            t = learner.train_t[idx] if learner.train_t is not None else None
        else:
            x, t = learner.train_x, learner.train_t
        new = mas_importance(learner, learner.params, x, t, int(self.cfg.mas_batch_size), kind)
        return tmap(jnp.add, self.state["omega"], new)


@ALGORITHMS.register("mas", backend="jax")
class MAS(JaxLearner):
    part_classes = (MASPart,)


PLUGINS.register("mas", backend="jax")(MASPart)
