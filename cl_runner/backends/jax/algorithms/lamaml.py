"""La-MAML (Gupta, Yadav & Paull 2020, "La-MAML: Look-ahead Meta Learning for Continual
Learning", NeurIPS) on the JAX backend.

The method is the PyTorch backend's (``cl_runner/backends/torch/algorithms/lamaml.py``, whose
docstring states it in full with the reference's lines): every weight tensor has a learnable
learning-rate tensor alpha of its shape (initialised to ``alpha_init``); for each incoming batch
b, ``glances`` times, the meta-batch is b (shuffled) joined with ``replay_batch_size`` samples of
a reservoir memory of ``mem_size`` samples; the fast weights take one SGD step per sample of b
(``n_inner_updates: null``; k: per piece of ``torch.tensor_split``'s sizes) with the rates
relu(alpha) (gradients clipped element-wise to +-``inner_grad_clip`` when it is set; constants
with ``second_order: false``, differentiated through otherwise), the meta-loss is the meta-batch
loss averaged over the fast weights after each inner step, its gradients with respect to theta
and alpha are each clipped to global norm ``grad_clip_norm``, then alpha <- alpha - lr_alpha
grad_alpha (``learn_lr``) and theta <- theta - relu(alpha) grad_theta (``sync_update: false``) or
the configured optimizer's step on grad_theta (``sync_update: true``). The incoming batch enters
the memory after its first glance (whose meta-batch was drawn before), during each task's first
epoch only; with ``benchmark.augment`` it is stored as it was before augmentation and every
replayed sample is augmented afresh (a key of its own per glance). In task-IL each loss uses
its samples' task units.

Compilation: an epoch is one compiled program (the learner's ``lax.scan`` over batches); inside
a step come the first glance, the memory insertion, then the other glances as a ``lax.scan``,
and the inner updates are an unrolled loop. alpha, the memory, its PRNG key, the task id and the
"first epoch" flag are the part's state (arguments). The padded last batch of an epoch (when the
set size is not a multiple of the batch size) is split like PyTorch's smaller last batch: its
real samples are shuffled to the front and split into min(n_inner_updates, real samples) pieces
(one per real sample with n_inner_updates null); pieces beyond that count take no inner step and
add no meta-loss term (their forward passes still run: a padded batch costs as much as a full
one). The inner forward passes run on the whole batch with the other pieces' samples weighted 0
(the piece boundaries move with the number of real samples); for the small batches La-MAML uses
(10 in the paper) this costs little next to the meta-batch passes.

Not supported here (clear errors): a growing head (``backbone.head`` other than fixed), a
backbone with batch norm, and ``algo.plugins`` (the meta-update has no place for a plugin's
loss or gradient terms; the PyTorch backend's La-MAML does not call them either). With
``sync_update: true`` the configured optimizer (including ``optimizer.grad_clip_norm``, applied
by its chain) takes the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_runner.backends.jax.augment import random_crop_flip
from cl_runner.backends.jax.learner import JaxLearner, Part, cross_entropy
from cl_runner.backends.jax.memory import AUGMENT, INSERT, SAMPLE, ReplayMemory, check_no_batch_norm, derived_seed
from cl_runner.errors import ConfigError
from cl_runner.registry import ALGORITHMS

tmap = jax.tree_util.tree_map


def piece_ids(n_real, size: int, k_max: int):
    """Which of the pieces of ``torch.tensor_split(arange(n_real), min(k_max, n_real))`` each of
    the ``size`` positions belongs to (positions >= n_real: an index >= the piece count), and the
    piece count; ``n_real`` may be traced."""
    k = jnp.minimum(k_max, jnp.maximum(n_real, 1))
    q, r = n_real // k, n_real % k
    i = jnp.arange(size)
    big = r * (q + 1)
    ids = jnp.where(i < big, i // jnp.maximum(q + 1, 1), r + (i - big) // jnp.maximum(q, 1))
    return jnp.where(i < n_real, ids, k_max), k


def global_clip(grads, max_norm):
    """``grads`` scaled so that their global L2 norm is at most ``max_norm`` (as the PyTorch
    backend's ``_clip_norm_``: coefficient min(max_norm / (norm + 1e-6), 1))."""
    if not max_norm:
        return grads
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
    coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
    return tmap(lambda g: g * coef, grads)


class LaMAMLPart(Part):
    """La-MAML's state: the learning rates alpha, the reservoir memory and its key, the task id,
    and whether the current epoch is a task's first (the memory is filled then)."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.memory = ReplayMemory("reservoir", learner.stream.input_shape, capacity=int(cfg.mem_size),
                                   num_tasks=learner.stream.num_tasks, num_outputs=learner.num_outputs())
        self.replay_batch_size = int(cfg.replay_batch_size or learner.batch_size)
        self.state = learner.put({
            "alpha": tmap(lambda p: np.full(p.shape, float(cfg.alpha_init), np.float32), learner.params),
            "memory": self.memory.init(),
            "key": jax.random.PRNGKey(derived_seed(learner.seed, 7331)),
            "task": np.zeros((), np.int32),
            "first_epoch": np.ones((), bool),
            "mask_table": np.asarray(learner.mask_table),
        })

    def on_before_task(self, task) -> None:
        check_no_batch_norm(self.learner, "lamaml")
        self.state = {**self.state, "task": self.learner.put(np.int32(task.id))}

    def set_first_epoch(self, flag: bool) -> None:
        self.state = {**self.state, "first_epoch": self.learner.put(np.bool_(flag))}


@ALGORITHMS.register("lamaml", backend="jax")
class LaMAML(JaxLearner):
    part_classes = (LaMAMLPart,)

    def __init__(self, cfg, stream, device, seed):
        head = getattr(cfg.backbone, "head", "fixed") or "fixed"
        if head != "fixed":
            raise ConfigError(f"algo=lamaml on backend=jax needs backbone.head=fixed (got {head}): its "
                              f"per-parameter learning rates are allocated once for the whole network.")
        if list(cfg.algo.plugins):
            raise ConfigError("algo=lamaml on backend=jax does not compose plugins (its meta-update has no "
                              "place for their loss or gradient terms); set algo.plugins=[].")
        super().__init__(cfg, stream, device, seed)
        algo = cfg.algo
        self.glances = int(algo.glances)
        # None: one inner step per sample (the batch size, as the pieces' upper bound)
        self.n_inner = int(algo.n_inner_updates) if algo.n_inner_updates is not None else None
        self.second_order = bool(algo.second_order)
        self.clip = float(algo.grad_clip_norm) if algo.grad_clip_norm else None
        self.inner_clip = float(algo.inner_grad_clip) if algo.inner_grad_clip else None
        self.learn_lr = bool(algo.learn_lr)
        self.lr_alpha = float(algo.lr_alpha)
        self.sync_update = bool(algo.sync_update)

    @property
    def part(self) -> LaMAMLPart:
        return self.parts[0]

    def glance_order(self, key, w):
        """The order of the incoming batch in one glance (traced): its real samples (weight > 0)
        in random order, then the padding."""
        return jnp.argsort(jax.random.uniform(key, w.shape) + 2.0 * (w <= 0))

    def pieces_max(self, batch: int) -> int:
        """The most inner steps a batch of ``batch`` samples takes (one per sample by default)."""
        return batch if self.n_inner is None else min(self.n_inner, batch)

    def train_epoch(self, task, epoch: int) -> dict:
        self.part.set_first_epoch(epoch == 0)
        return super().train_epoch(task, epoch)

    # -- the meta-update (traced) ------------------------------------------------------------
    def _loss(self, params, x, y, t, w, mask_table, dropout_key):
        """Mean cross-entropy over the samples of weight > 0 (0 when there are none)."""
        rngs = {"dropout": dropout_key} if dropout_key is not None else None
        logits = self.model.apply({"params": params}, x, train=True, rngs=rngs)
        ce = cross_entropy(self.masked(logits, t, mask_table), y)
        ce = jnp.where(w > 0, ce, 0.0)
        return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1e-12)

    def meta_update(self, params, alpha, opt_state, x, y, t, piece, k, mx, my, mt, mw, mask_table, key):
        """One La-MAML update from the incoming batch (x, y, t) split into pieces (``piece``:
        each sample's piece index, ``k`` the number of pieces) and the meta-batch (mx, my, mt,
        weights mw). Returns (params, alpha, opt_state, meta-loss)."""
        clip, inner_clip = self.clip, self.inner_clip
        k_max = self.pieces_max(x.shape[0])
        kf = k.astype(jnp.float32)
        keys = jax.random.split(key, 2 * k_max)
        dk = (lambda i: keys[i]) if self.dropout else (lambda i: None)

        def inner_grad(fast, j):
            w = (piece == j).astype(jnp.float32)
            g = jax.grad(self._loss)(fast, x, y, t, w, mask_table, dk(2 * j))
            return tmap(lambda a: jnp.clip(a, -inner_clip, inner_clip), g) if inner_clip else g

        if not self.second_order:
            # d theta_i / d alpha = -(g_1 + ... + g_i) * relu'(alpha): the sum is accumulated, the
            # gate (alpha > 0) applied once at the end.
            rate = tmap(jax.nn.relu, alpha)
            fast = params
            g_sum = tmap(jnp.zeros_like, params)
            g_theta = tmap(jnp.zeros_like, params)
            g_alpha = tmap(jnp.zeros_like, params)
            total = jnp.zeros((), jnp.float32)
            for j in range(k_max):
                on = (j < k).astype(jnp.float32)
                g = inner_grad(fast, j)
                g_sum = tmap(jnp.add, g_sum, g)
                fast = tmap(lambda f, r, gi: f - r * gi, fast, rate, g)
                meta_loss, g_meta = jax.value_and_grad(self._loss)(fast, mx, my, mt, mw, mask_table,
                                                                   dk(2 * j + 1))
                g_theta = tmap(lambda s, gm: s + on * gm, g_theta, g_meta)
                g_alpha = tmap(lambda s, gs, gm: s - on * gs * gm, g_alpha, g_sum, g_meta)
                total = total + on * meta_loss
            g_theta = tmap(lambda g: g / kf, g_theta)
            g_alpha = tmap(lambda g, a: jnp.where(a > 0, g / kf, 0.0), g_alpha, alpha)
            meta = total / kf
        else:
            def objective(theta, a):
                fast = theta
                total = jnp.zeros((), jnp.float32)
                for j in range(k_max):
                    on = (j < k).astype(jnp.float32)
                    g = inner_grad(fast, j)
                    fast = tmap(lambda f, ai, gi: f - jax.nn.relu(ai) * gi, fast, a, g)
                    total = total + on * self._loss(fast, mx, my, mt, mw, mask_table, dk(2 * j + 1))
                return total / kf

            meta, (g_theta, g_alpha) = jax.value_and_grad(objective, argnums=(0, 1))(params, alpha)
        g_theta = global_clip(g_theta, clip)
        g_alpha = global_clip(g_alpha, clip)
        if self.learn_lr:
            alpha = tmap(lambda a, g: a - self.lr_alpha * g, alpha, g_alpha)
        if self.sync_update:
            updates, opt_state = self.tx.update(g_theta, opt_state, params)
            params = optax.apply_updates(params, updates)
        else:
            params = tmap(lambda p, a, g: p - jax.nn.relu(a) * g, params, alpha, g_theta)
        return params, alpha, opt_state, meta

    def train_step(self, carry, batch, weights, x, y, t, mask_table):
        params, opt_state, part_states, key = carry
        part = self.part
        st = part_states[0]
        xb, yb = x[batch], y[batch]
        x_raw = xb  # what the memory stores: the batch before benchmark.augment
        if self._augment is not None:
            key, augment_key = jax.random.split(key)
            xb = random_crop_flip(augment_key, xb, *self._augment)
        tb = t[batch] if t is not None else None
        bs = yb.shape[0]
        w = jnp.ones(bs, jnp.float32) if weights is None else weights
        n_real = jnp.sum((w > 0).astype(jnp.int32))
        k_max = self.pieces_max(bs)
        piece, k = piece_ids(n_real, bs, k_max)
        key, step_key = jax.random.split(key)

        def glance(c, gkey, mem):
            params, alpha, opt_state = c
            k_perm, k_mem, k_meta = jax.random.split(gkey, 3)
            order = self.glance_order(k_perm, w)
            xg, yg, wg = xb[order], yb[order], w[order]
            tg = tb[order] if tb is not None else None
            slots, valid = part.memory.sample(mem, jax.random.fold_in(k_mem, SAMPLE), part.replay_batch_size)
            sx, sy, st_, _ = part.memory.get(mem, slots, valid, st["mask_table"])
            if self._augment is not None:  # a fresh crop and flip of each replayed sample
                sx = random_crop_flip(jax.random.fold_in(k_mem, AUGMENT + SAMPLE), sx, *self._augment)
            mx = jnp.concatenate([xg, sx.astype(xg.dtype)])
            my = jnp.concatenate([yg, sy.astype(yg.dtype)])
            mt = jnp.concatenate([tg, st_.astype(tg.dtype)]) if tg is not None else None
            mw = jnp.concatenate([wg, valid.astype(jnp.float32)])
            params, alpha, opt_state, meta = self.meta_update(params, alpha, opt_state, xg, yg, tg, piece, k,
                                                              mx, my, mt, mw, mask_table, k_meta)
            return (params, alpha, opt_state), meta

        glance_keys = jax.random.split(step_key, self.glances)
        carry_g, meta = glance((params, st["alpha"], opt_state), glance_keys[0], st["memory"])
        mem_key, insert_key = jax.random.split(st["key"])

        def insert(m):
            return part.memory.insert(m, jax.random.fold_in(insert_key, INSERT), x_raw, yb, st["task"], w > 0)

        # The batch enters the memory after the first glance drew its meta-batch, so the later
        # glances may replay it (the reference pushes it during its first glance).
        mem = jax.lax.cond(st["first_epoch"], insert, lambda m: m, st["memory"])
        if self.glances > 1:
            carry_g, metas = jax.lax.scan(lambda c, gk: glance(c, gk, mem), carry_g, glance_keys[1:])
            meta = metas[-1]
        params, alpha, opt_state = carry_g
        new_st = {**st, "alpha": alpha, "memory": mem, "key": mem_key}
        part_states = (new_st, *part_states[1:])
        return (params, opt_state, part_states, key), meta
