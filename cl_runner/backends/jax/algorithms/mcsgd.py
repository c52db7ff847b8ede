"""Mode Connectivity SGD (Mirzadeh et al. 2021, "Linear Mode Connectivity in Multitask and
Continual Learning", ICLR) on the JAX backend.

The method is the PyTorch backend's (``cl_runner/backends/torch/algorithms/mcsgd.py``, whose
docstring states it in full). Each task t runs

1. the continual stage: the plain learner's compiled epochs, from the previous MC-SGD solution
   w_bar_{t-1}, with learning rate ``optimizer.lr * algo.lr_decay ** t`` (times the optimizer's
   own per-task decay) and a fresh optimizer state; its end point is w_hat_t;
2. for t >= 1 (and ``lmc_epochs`` > 0), the mode-connectivity stage: from
   w_bar_{t-1} + ``lmc_init_position`` (w_hat_t - w_bar_{t-1}), SGD with momentum (``lmc_lr``,
   ``lmc_momentum``) on g(w) = mean_k grad L_{M_<t}(p_k) + mean_k grad L_{M_t}(q_k), the gradients
   taken at the n + 1 = ``lmc_line_samples`` + 1 points p_k = w_bar_{t-1} + k/n (w - w_bar_{t-1})
   and q_k = w_hat_t + k/n (w - w_hat_t) with respect to the weights at those points, the losses
   in evaluation mode (no dropout), on batches of ``lmc_batch_size`` memory samples of the
   previous tasks (a permutation of them each epoch) paired with batches of the current task's
   stored samples (cycled), ``ceil(max(|M_<t|, |M_t|) / lmc_batch_size)`` steps per epoch. The
   result w_bar_t is evaluated and the next task starts from it.

The episodic memory is a ring of ``per_task_memory_samples`` slots per task (a uniformly random
subset of each task's training set, stored after its continual stage) kept on the device.

Compilation: the n + 1 points of a line are evaluated with one ``jax.vmap`` of the gradient, and
the whole mode-connectivity stage (all its epochs and steps) is ONE compiled ``lax.scan``. Its
length is fixed by the configuration: ``lmc_epochs * ceil(max((T - 1) P, P) / lmc_batch_size)``
steps (T tasks, P = ``per_task_memory_samples``); the steps a task does not need (earlier tasks
have a smaller memory) are skipped by ``lax.cond``, so the program is compiled once for the whole
stream. The batches' memory slots are drawn on the host with NumPy (from the run's seed) and
passed in as arrays. The memory, the two anchors and the current weights are arguments.

With a growing head (``backbone.head=multihead``) the units of the task's new head keep their
continual-stage values through the stage, as the PyTorch backend's do (its previous solution
has no weights for a head created during the task, so the stage leaves that head alone).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.backends.jax.learner import JaxLearner, to_numpy
from cl_runner.backends.jax.memory import derived_seed
from cl_runner.backends.jax.optim import set_lr, task_lr
from cl_runner.registry import ALGORITHMS

tmap = jax.tree_util.tree_map


def line_gradient(learner: JaxLearner, anchor, w, n: int, x, y, t, mask_table):
    """Mean over alpha_k = k/n (k = 0..n) of the loss gradient at anchor + alpha_k (w - anchor),
    each taken with respect to the weights at that point, and the mean loss (traced)."""
    alphas = jnp.arange(n + 1, dtype=jnp.float32) / n

    def point_loss(p):
        logits = learner.model.apply({"params": p}, x, train=False)
        return learner.criterion(logits, y, t, mask_table)

    stacked = tmap(lambda a, p: a + alphas.reshape((-1,) + (1,) * a.ndim) * (p - a), anchor, w)
    losses, grads = jax.vmap(jax.value_and_grad(point_loss))(stacked)
    return tmap(lambda g: jnp.mean(g, axis=0), grads), jnp.mean(losses)


@ALGORITHMS.register("mcsgd", backend="jax")
class MCSGD(JaxLearner):
    def __init__(self, cfg, stream, device, seed):
        super().__init__(cfg, stream, device, seed)
        algo = cfg.algo
        self.per_task = int(algo.per_task_memory_samples)
        num_tasks = stream.num_tasks
        cap = self.per_task * num_tasks
        self.mem = {"x": np.zeros((cap, *stream.input_shape), np.float32), "y": np.zeros(cap, np.int32),
                    "t": np.zeros(cap, np.int32), "filled": np.zeros(cap, bool)}
        self.lmc_rng = np.random.default_rng(derived_seed(seed, 4242))
        self.w_bar = None  # the previous task's MC-SGD solution
        self.last_lmc: dict = {}
        self.lmc_bs = int(algo.lmc_batch_size)
        self.lmc_n = int(algo.lmc_line_samples)
        self.lmc_epochs = int(algo.lmc_epochs)
        per_epoch = math.ceil(max((num_tasks - 1) * self.per_task, self.per_task) / self.lmc_bs)
        self.lmc_max_steps = max(1, per_epoch * self.lmc_epochs)
        self._opt_init = jax.jit(self.tx.init)
        self._lmc_fn = jax.jit(self._lmc_program)

    # -- the continual stage -----------------------------------------------------------------
    def on_before_task(self, task) -> None:
        super().on_before_task(task)
        lr = task_lr(self.cfg.optimizer, task.id) * float(self.cfg.algo.lr_decay) ** task.id
        self.opt_state = set_lr(self.put(self._opt_init(self.params)), lr)

    def on_after_training(self, task) -> None:
        n = int(self.train_y.shape[0])
        k = min(self.per_task, n)
        pick = np.sort(self.lmc_rng.permutation(n)[:k]) if k else np.zeros(0, np.int64)
        rows = task.id * self.per_task + np.arange(k)
        idx = self.put(pick.astype(np.int32))
        self.mem["x"][rows] = np.asarray(self.train_x[idx])
        self.mem["y"][rows] = np.asarray(self.train_y[idx])
        self.mem["t"][rows] = task.id
        self.mem["filled"][rows] = True
        self._cur_count = getattr(self, "_cur_count", {})
        self._cur_count[task.id] = k
        if self.w_bar is not None and task.id > 0 and self.lmc_epochs > 0:
            self.mode_connectivity(task)
        self.w_bar = self.params
        super().on_after_training(task)  # composed parts (plugins) see the final w_bar_t

    # -- the mode-connectivity stage ---------------------------------------------------------
    def lmc_indices(self, task):
        """(previous-task slots, current-task slots, active flags) of every step of the stage:
        (max_steps, bs), (max_steps, bs), (max_steps,)."""
        bs, per_task = self.lmc_bs, self.per_task
        filled, mt = self.mem["filled"], self.mem["t"]
        prev_all = np.flatnonzero(filled & (mt < task.id))
        cur = task.id * per_task + np.arange(int(filled[task.id * per_task:(task.id + 1) * per_task].sum()))
        prev_rows, cur_rows, active = [], [], []
        for _ in range(self.lmc_epochs):
            prev = prev_all[self.lmc_rng.permutation(len(prev_all))]
            steps = math.ceil(max(len(prev), len(cur)) / bs)
            cur_order = cur[self.lmc_rng.permutation(len(cur))]
            prev_rows.append(_cycled(prev, steps * bs).reshape(steps, bs))
            cur_rows.append(_cycled(cur_order, steps * bs).reshape(steps, bs))
            active.append(np.ones(steps, bool))
        prev_rows, cur_rows = np.concatenate(prev_rows), np.concatenate(cur_rows)
        active = np.concatenate(active)
        pad = self.lmc_max_steps - len(active)
        prev_rows = np.concatenate([prev_rows, np.zeros((pad, bs), np.int64)])
        cur_rows = np.concatenate([cur_rows, np.zeros((pad, bs), np.int64)])
        active = np.concatenate([active, np.zeros(pad, bool)])
        return prev_rows.astype(np.int32), cur_rows.astype(np.int32), active

    def _lmc_program(self, w0, w_prev, w_hat, frozen, mem_x, mem_y, mem_t, prev_rows, cur_rows, active,
                     mask_table):
        """The whole mode-connectivity stage: (w_bar_t, objective per step). ``frozen``: head
        units the stage leaves alone (a head created during the task)."""
        self.trace_counts["lmc"] += 1
        algo = self.cfg.algo
        lr, momentum, n = float(algo.lmc_lr), float(algo.lmc_momentum), self.lmc_n
        masks = self.masks

        def keep_frozen(g):
            head = {k: jnp.where(frozen, 0.0, v) for k, v in g["head"].items()}
            return {**g, "head": head}

        def step(carry, inputs):
            w, buf = carry
            pr, cr, on = inputs

            def do(_):
                g_prev, l_prev = line_gradient(self, w_prev, w, n, mem_x[pr], mem_y[pr],
                                               mem_t[pr] if masks else None, mask_table)
                g_cur, l_cur = line_gradient(self, w_hat, w, n, mem_x[cr], mem_y[cr],
                                             mem_t[cr] if masks else None, mask_table)
                g = keep_frozen(tmap(jnp.add, g_prev, g_cur))
                new_buf = tmap(lambda b, gi: momentum * b + gi, buf, g)
                new_w = tmap(lambda p, b: p - lr * b, w, new_buf)
                return (new_w, new_buf), l_prev + l_cur

            def skip(_):
                return (w, buf), jnp.zeros((), jnp.float32)

            return jax.lax.cond(on, do, skip, None)

        (w, _), losses = jax.lax.scan(step, (w0, tmap(jnp.zeros_like, w0)), (prev_rows, cur_rows, active))
        return w, losses

    def mode_connectivity(self, task) -> None:
        """Replace the parameters (w_hat_t) by w_bar_t (module docstring)."""
        init = float(self.cfg.algo.lmc_init_position)
        w_hat = self.params
        frozen = np.zeros(self.num_outputs(), bool)
        if self._head is not None:
            before = self._head.table(task.id - 1).any(0)
            frozen = self._head.table(task.id).any(0) & ~before
        frozen_d = self.put(frozen)
        # A head created during the task has no previous solution: its anchor is w_hat.
        w_prev = dict(self.w_bar)
        w_prev["head"] = tmap(lambda a, b: jnp.where(frozen_d, b, a), self.w_bar["head"], w_hat["head"])
        w0 = tmap(lambda a, b: a + init * (b - a), w_prev, w_hat)
        prev_rows, cur_rows, active = self.lmc_indices(task)
        mem = {k: self.put(v) for k, v in self.mem.items()}
        w, losses = self._lmc_fn(w0, w_prev, w_hat, frozen_d, mem["x"], mem["y"], mem["t"],
                                 self.put(prev_rows), self.put(cur_rows), self.put(active), self.mask_table)
        self.params = w
        losses = np.asarray(losses)[active]
        self.last_lmc = {"steps": int(active.sum()), "objective": float(losses.mean()) if len(losses) else None}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state["mcsgd"] = {"memory": {k: np.array(v) for k, v in self.mem.items()},
                          "cur_count": dict(getattr(self, "_cur_count", {})),
                          "w_bar": to_numpy(self.w_bar) if self.w_bar is not None else None,
                          "rng": self.lmc_rng.bit_generator.state}
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        own = state["mcsgd"]
        self.mem = {k: np.array(v) for k, v in own["memory"].items()}
        self._cur_count = dict(own["cur_count"])
        self.w_bar = (tmap(lambda like, v: self.put(jnp.asarray(v, like.dtype)), self.params, own["w_bar"])
                      if own["w_bar"] is not None else None)
        self.lmc_rng.bit_generator.state = own["rng"]


def _cycled(idx: np.ndarray, total: int) -> np.ndarray:
    """``idx`` repeated until it has ``total`` entries."""
    reps = math.ceil(total / max(len(idx), 1))
    return np.tile(idx, reps)[:total]
