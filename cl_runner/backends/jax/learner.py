"""The JAX learner: plain fine-tuning, and the extension points algorithms build on.

A task's data lives on the device for the whole task (float32, normalised; labels; and, in
task-IL, each sample's task id). One epoch is ONE compiled program: it draws the epoch's
permutation from the PRNG key carried in the learner's state, then runs ``jax.lax.scan`` over
the batches (gathering each batch from the device arrays). When the set size is not a multiple
of the batch size, the last batch is padded to full size and the padding is masked out of the
loss (per-sample weights 1/0), so its loss is the mean over its real samples as on the PyTorch
backend, and the step is compiled once (not once more for the smaller shape). It returns the new
state and the loss of every step.

Everything that can change between tasks -- parameters, optimizer state (including the
learning rate, see optim.py), the parts' state (EWC's importance sums...), the task-IL mask
table and the PRNG key -- is an *argument* of the compiled functions, never a value closed over
or marked static, so nothing is frozen at the value it had when first compiled, and a program is
compiled once per distinct input shape (not per task). ``trace_counts`` counts how often each
program was traced; ``_epoch_fn._cache_size()`` counts its compilations (a program is compiled
again, without a new trace, when an argument's placement changes, so every array passed in is
committed to the learner's device).

Algorithm-specific behaviour comes from subclass hooks (``on_before_task``,
``on_after_training``, ``train_arrays`` ...) and from :class:`Part` objects composed onto the
learner (``algo.plugins=[ewc]`` adds EWC's part to any learner).
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cl_runner.backends.jax.augment import augment_settings, random_crop_flip
from cl_runner.backends.jax.backbones import build_backbone, init_params
from cl_runner.backends.jax.heads import build_head, refresh_tables
from cl_runner.backends.jax.optim import build_optimizer, get_lr, set_lr, task_lr
from cl_runner.core.learner import Learner
from cl_runner.core.schedule import epoch_lr, has_schedule
from cl_runner.errors import ConfigError, TrainingDivergedError
from cl_runner.registry import ALGORITHMS


def to_numpy(tree):
    """The same pytree with every array as a NumPy array (for checkpoints)."""
    return jax.tree_util.tree_map(lambda a: np.array(a), tree)


class Part:
    """A composable piece of an algorithm. Override only the hooks you need.

    ``state`` is a pytree of arrays that the learner passes into the compiled training program
    and takes back from it. The host-side hooks (``on_before_task``, ``on_after_training``) run
    between programs and may replace ``self.state``. The traced hooks (``extra_loss``,
    ``adjust_grads``, ``after_step``, ``after_batch``) are pure functions: they must read whatever changes
    between tasks from their ``state`` argument, never from ``self`` (a value read from ``self``
    inside them would be frozen into the compiled program).
    """

    def __init__(self, learner: "JaxLearner", cfg):
        self.learner = learner
        self.cfg = cfg
        self.state: Any = ()

    def on_before_task(self, task) -> None: ...
    def on_after_training(self, task) -> None: ...

    def extra_loss(self, params, state, x, y, logits, weights):
        """A differentiable term added to the step's loss (traced); None for none.

        ``weights`` is None, or (in a padded last batch) 1 for the batch's real samples and 0
        for its padding, which a per-sample term must leave out."""

    def adjust_grads(self, params, state, grads):
        """The gradient after the task loss's backward pass, before clipping and the optimizer
        (traced); add analytic terms here."""
        return grads

    def after_step(self, old_params, new_params, grads, state):
        """The part's new state after an optimizer step (traced). ``grads`` is the gradient of
        the step's loss (task loss and parts' ``extra_loss``), before any part's
        ``adjust_grads`` (penalty gradients, projections)."""
        return state

    def after_batch(self, state, x, y, t, logits, weights):
        """The part's new state once the step on the stream batch (x, y, task ids t or None)
        is done (traced): what a replay memory stores. ``x`` is the batch before
        ``benchmark.augment`` (a memory keeps it so and augments it when it replays it);
        ``logits`` are the logits of the step's forward pass on the batch it trained on
        (augmented, before the update); ``weights`` None, or 0 for the padding of a padded last
        batch."""
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"state": to_numpy(flax.serialization.to_state_dict(self.state))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = _restore(self.state, state["state"], self.learner.jax_device)


def _overrides(obj, name: str) -> bool:
    return getattr(type(obj), name) is not getattr(Part, name)


def _restore(target, saved, device):
    """``saved`` (NumPy, from a state dict) as device arrays of ``target``'s structure and dtypes."""
    restored = flax.serialization.from_state_dict(target, saved)
    return jax.tree_util.tree_map(lambda t, s: jax.device_put(jnp.asarray(s, dtype=t.dtype), device),
                                  target, restored)


_CPU_PER_SAMPLE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
_per_sample_options_ok: bool | None = None


def per_sample_compiler_options(platform: str) -> dict | None:
    """XLA options for programs that reduce per-sample gradients over the batch (Fisher, ...).

    On CPU, XLA's default library fusions turn "square the per-sample outer products and sum
    them over the batch" into a fused library call that is ~50x slower than XLA's own loop
    fusion (measured: 3 s instead of 0.06 s for 1024 MNIST samples of a 784-256-256-10 MLP);
    keeping only the matrix-product fusions avoids that without slowing the matrix products.
    The option is probed once; a jaxlib that does not know it gets no options.
    """
    global _per_sample_options_ok
    if platform != "cpu":
        return None
    if _per_sample_options_ok is None:
        try:
            jax.jit(lambda a: a + 1, compiler_options=_CPU_PER_SAMPLE_OPTIONS).lower(
                jax.ShapeDtypeStruct((), jnp.float32)).compile()
            _per_sample_options_ok = True
        except Exception:  # noqa: BLE001 - an unknown option raises a backend-specific error
            _per_sample_options_ok = False
    return dict(_CPU_PER_SAMPLE_OPTIONS) if _per_sample_options_ok else None


def cross_entropy(logits, y):
    """Per-sample -log softmax(logits)[y]."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]


class JaxLearner(Learner):
    """Fine-tuning ("naive"): train each task in turn with the task loss only.

    Progress and step events: an epoch is one compiled program, so there are no callbacks
    *during* an epoch on this backend. After each epoch the learner reports progress once
    (``loop.progress(step, steps, loss, steps_per_s)``), checks the per-step losses for NaN/inf
    (naming the first bad step), and, if some callback overrides ``on_before_step`` /
    ``on_after_step``, replays those events for every step of the epoch with its loss.
    ``training.progress_every`` has no effect here.
    """

    backend = "jax"
    #: Steps per iteration of the compiled loop (``jax.lax.scan``'s ``unroll``). 2-4 run small
    #: models a few percent faster on CPU, at the price of a longer compilation.
    scan_unroll: int = 1
    #: Converted training images shared between learners (see ``shared_input``); None: own.
    shared_inputs: dict | None = None
    #: Parts every instance of this algorithm has (on top of ``algo.plugins``).
    part_classes: tuple[type[Part], ...] = ()

    def __init__(self, cfg, stream, device, seed: int):
        super().__init__(cfg, stream)
        self.device = device
        self.jax_device = getattr(device, "jax", None) or jax.devices()[0]
        self.seed = seed
        self.trace_counts: Counter = Counter()
        # Two views of one network (same parameter tree): ``model`` for the gradient programs
        # (training steps, per-sample gradients), ``eval_model`` for evaluation. On CPU they
        # differ in how convolutions are computed (see backbones.Conv): im2col where gradients
        # run inside the compiled loop, XLA's convolution for the forward-only evaluation.
        cpu = self.jax_device.platform == "cpu"
        self.model = build_backbone(cfg.backbone, stream.input_shape, self.num_outputs(),
                                    conv_impl="im2col" if cpu else "lax")
        self.eval_model = build_backbone(cfg.backbone, stream.input_shape, self.num_outputs())
        self.params = self.put(init_params(self.model, stream.input_shape, seed,
                                           getattr(cfg.backbone, "init", "default")))
        self.tx = build_optimizer(cfg.optimizer)
        self._opt_init = jax.jit(self.tx.init)
        self.opt_state = self.put(set_lr(self._opt_init(self.params), float(cfg.optimizer.lr)))
        self.key = self.put(jax.random.PRNGKey(seed))  # shuffling and dropout
        self.batch_size = int(cfg.benchmark.batch_size)
        self.eval_batch_size = int(cfg.benchmark.eval_batch_size)
        self.check_finite = bool(cfg.training.check_finite)
        self.dropout = float(cfg.backbone.dropout) > 0
        normalize = bool(cfg.benchmark.normalize)
        shape = (1, len(stream.mean), 1, 1)
        channels = len(stream.mean)
        self._mean = np.array(stream.mean if normalize else [0.0] * channels, np.float32).reshape(shape)
        self._std = np.array(stream.std if normalize else [1.0] * channels, np.float32).reshape(shape)
        # to_input's table: channel c's normalised value of each uint8 value, (C, 256).
        table = np.tile(np.arange(256, dtype=np.float32), (channels, 1))
        table *= np.float32(1.0 / 255.0)
        table -= self._mean.reshape(channels, 1)
        table /= self._std.reshape(channels, 1)
        self._table = self.put(table)
        # Task-IL: mask_table[t] marks task t's output units.
        self.masks = stream.masks_logits
        table = np.zeros((stream.num_tasks, self.num_outputs()), dtype=bool)
        for t in stream.tasks:
            table[t.id, np.asarray(t.classes)] = True
        self.mask_table = self.put(table)
        # backbone.head=incremental|multihead: the full head, grown by masking (heads.py).
        self._head = build_head(self)
        self._test_cache: dict[int, tuple[jax.Array, jax.Array]] = {}
        self.train_x = self.train_y = self.train_t = None
        # While train_step traces an augmented step: the batch before augmentation (stream_inputs).
        self._unaugmented = None
        plugin_classes = [_plugin_class(name) for name in cfg.algo.plugins]
        self.parts: list[Part] = [cls(self, cfg.algo) for cls in (*self.part_classes, *plugin_classes)]
        self._loss_parts = [(i, p) for i, p in enumerate(self.parts) if _overrides(p, "extra_loss")]
        self._grad_parts = [(i, p) for i, p in enumerate(self.parts) if _overrides(p, "adjust_grads")]
        self._step_parts = [(i, p) for i, p in enumerate(self.parts) if _overrides(p, "after_step")]
        self._batch_parts = [(i, p) for i, p in enumerate(self.parts) if _overrides(p, "after_batch")]
        # Batch norm (resnet18): the running averages are the state of a BatchStats part, so they
        # pass through the compiled epoch, checkpoints and stacked seeds like any part's state.
        self._stats_index = BatchStats.attach(self, stream.input_shape)
        # benchmark.augment: (padding, fill) of the random crop + flip of each training batch.
        self._augment = augment_settings(cfg.benchmark, self._mean, self._std)
        self._epoch_fn = jax.jit(self._epoch_program)
        self._eval_fn = jax.jit(self._eval_program)

    # -- shapes and data ---------------------------------------------------------------------
    def num_outputs(self) -> int:
        n = self.cfg.backbone.num_classes
        return int(n) if n else self.stream.num_outputs

    def put(self, tree):
        return jax.device_put(tree, self.jax_device)

    def to_input(self, x: np.ndarray) -> jax.Array:
        """uint8 images (N, C, H, W) -> normalised float32 array on the device.

        The arithmetic (x * (1/255) - mean) / std is done in float32 in the same order as on the
        PyTorch backend, so both backends see bit-identical inputs.
        """
        x = np.asarray(x)
        if x.dtype == np.uint8 and x.ndim == 4 and x.shape[1] == self._table.shape[0]:
            # On the device, as a lookup of each channel's 256 values computed below: the
            # same float32 numbers, several times faster than NumPy's four passes (which on
            # some virtual machines also pay slow huge-page faults for every new array).
            return _lookup(self.put(x), self._table)
        x = x.astype(np.float32)
        x *= np.float32(1.0 / 255.0)
        x -= self._mean
        x /= self._std
        return self.put(x)

    def train_arrays(self, task) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (x, y, task id) arrays to train on for ``task``; joint training overrides this."""
        return task.train_x, task.train_y, np.full(len(task.train_y), task.id, dtype=np.int64)

    def shared_input(self, x: np.ndarray) -> jax.Array:
        """``to_input(x)``, reused from ``shared_inputs`` (a dict that several learners hold;
        jax/seeds.py) when another learner on this device already converted this very array: the
        seeds of one stream then keep one copy of a task's images."""
        cache = self.shared_inputs
        if cache is None:
            return self.to_input(x)
        hit = cache.get(self.jax_device)
        if hit is not None and hit[0] is x:
            return hit[1]
        cache[self.jax_device] = None  # free the previous task's copy first
        value = self.to_input(x)
        cache[self.jax_device] = (x, value)  # x kept alive: a later array cannot take its id
        return value

    def test_arrays(self, task) -> tuple[jax.Array, jax.Array]:
        """Test images as (batches, eval_batch_size, C, H, W) and labels as (batches,
        eval_batch_size), padded with label -1 (never predicted) to whole batches."""
        if task.id not in self._test_cache:
            x = np.asarray(task.test_x)
            y = np.asarray(task.test_y).astype(np.int32)
            n = len(y)
            bs = max(1, min(self.eval_batch_size, n))
            nb = max(1, math.ceil(n / bs))
            pad = nb * bs - n
            if pad:
                x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
                y = np.concatenate([y, np.full(pad, -1, np.int32)])
            xs = self.to_input(x).reshape((nb, bs, *x.shape[1:]))
            self._test_cache[task.id] = (xs, self.put(y.reshape(nb, bs)))
        return self._test_cache[task.id]

    # -- hooks -------------------------------------------------------------------------------
    def on_before_task(self, task) -> None:
        if self._head is not None:  # the units of the tasks started so far
            refresh_tables(self, self._head.table(task.id))
        self.opt_state = set_lr(self.opt_state, task_lr(self.cfg.optimizer, task.id))
        x, y, tid = self.train_arrays(task)
        self.train_x = self.shared_input(x)
        self.train_y = self.put(np.asarray(y).astype(np.int32))
        self.train_t = self.put(np.asarray(tid).astype(np.int32)) if self.masks else None
        for p in self.parts:
            p.on_before_task(task)

    def on_before_epoch(self, task, epoch: int) -> None:
        """``optimizer.reset``: the optimizer state built afresh (momentum, Adam's moments and
        step count: what ``tx.init`` gives) at every task or epoch, keeping the rate;
        ``optimizer.schedule``: the epoch's rate, from the rate the task started with (after
        every ``on_before_task`` hook). Both are values of the state: no recompilation."""
        opt = self.cfg.optimizer
        if epoch == 0:
            self.task_start_lr = get_lr(self.opt_state)
        if opt.reset == "epoch" or (opt.reset == "task" and epoch == 0):
            self.opt_state = set_lr(self.put(self._opt_init(self.params)), get_lr(self.opt_state))
        if has_schedule(opt.schedule):
            self.opt_state = set_lr(self.opt_state, epoch_lr(self.task_start_lr, opt.schedule, epoch,
                                                             int(self.cfg.training.epochs_per_task)))

    def on_after_training(self, task) -> None:
        for p in self.parts:
            p.on_after_training(task)

    def on_after_task(self, task) -> None:
        self.train_x = self.train_y = self.train_t = None

    # -- the step (traced) -------------------------------------------------------------------
    def masked(self, logits, task_ids, mask_table):
        """Task-IL: logits outside each sample's task set to -inf; otherwise unchanged."""
        if self._head is not None:  # a growing head: units of no task started yet read -inf
            logits = jnp.where(jnp.any(mask_table, axis=0), logits, -jnp.inf)
        if task_ids is None:
            return logits
        return jnp.where(mask_table[task_ids], logits, -jnp.inf)

    def criterion(self, logits, y, t, mask_table, weights=None):
        """Mean cross-entropy over the batch (over the samples of weight 1 when weighted)."""
        losses = cross_entropy(self.masked(logits, t, mask_table), y)
        if self._head is not None:  # multihead: which heads the step's task loss uses (heads.py)
            losses = self._head.mark_used(losses, t, weights, mask_table)
        if weights is None:
            return jnp.mean(losses)
        return jnp.sum(losses * weights) / jnp.sum(weights)

    def loss(self, params, part_states, x, y, t, weights, mask_table, dropout_key):
        return self.loss_and_logits(params, part_states, x, y, t, weights, mask_table, dropout_key)[0]

    def loss_and_logits(self, params, part_states, x, y, t, weights, mask_table, dropout_key):
        """The step's loss and the stream batch's logits (given to the parts' ``after_batch``)."""
        rngs = {"dropout": dropout_key} if dropout_key is not None else None
        logits = self.model.apply({"params": params}, x, train=True, rngs=rngs)
        return self.loss_from_logits(params, part_states, x, y, t, weights, mask_table, logits), logits

    def loss_logits_and_stats(self, params, part_states, x, y, t, weights, mask_table, dropout_key):
        """``loss_and_logits`` for a model with batch norm: the forward pass normalises with the
        batch's own statistics and also returns the updated running averages (aux: (logits,
        batch_stats)). The padding of a padded last batch enters the batch statistics."""
        rngs = {"dropout": dropout_key} if dropout_key is not None else None
        variables = {"params": params, "batch_stats": part_states[self._stats_index]}
        logits, updated = self.model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
        loss = self.loss_from_logits(params, part_states, x, y, t, weights, mask_table, logits)
        return loss, (logits, updated["batch_stats"])

    def stream_inputs(self, x):
        """The step's stream batch before ``benchmark.augment`` (traced): while ``train_step``
        traces a step on an augmented batch, that batch un-augmented; otherwise ``x`` itself (the
        PyTorch backend's ``stream_inputs``)."""
        raw = self._unaugmented
        return x if raw is None else raw

    def loss_from_logits(self, params, part_states, x, y, t, weights, mask_table, logits):
        """The task loss at ``logits`` plus the parts' ``extra_loss`` terms."""
        loss = self.criterion(logits, y, t, mask_table, weights)
        for i, p in self._loss_parts:
            extra = p.extra_loss(params, part_states[i], x, y, logits, weights)
            if extra is not None:
                loss = loss + extra
        return loss

    def _value_and_grad(self, fn):
        """``jax.value_and_grad(fn, has_aux=True)``; with a growing head it also records the
        head units the task loss used (heads.py)."""
        if self._head is None:
            return jax.value_and_grad(fn, has_aux=True)
        return self._head.value_and_grad(fn)

    def train_step(self, carry, batch, weights, x, y, t, mask_table):
        """One optimizer step on the samples ``batch`` (indices into x, y, t), weighted by
        ``weights`` (None: all 1)."""
        params, opt_state, part_states, key = carry
        dropout_key = None
        if self.dropout:
            key, dropout_key = jax.random.split(key)
        xb, yb = x[batch], y[batch]
        raw = xb  # what a replay memory stores (after_batch): the batch before augmentation
        if self._augment is not None:
            key, augment_key = jax.random.split(key)
            xb = random_crop_flip(augment_key, xb, *self._augment)
        tb = t[batch] if t is not None else None
        self._unaugmented = raw if self._augment is not None else None
        try:
            if self._stats_index is None:
                (loss, logits), loss_grads = self._value_and_grad(self.loss_and_logits)(
                    params, part_states, xb, yb, tb, weights, mask_table, dropout_key)
            else:
                (loss, (logits, stats)), loss_grads = self._value_and_grad(self.loss_logits_and_stats)(
                    params, part_states, xb, yb, tb, weights, mask_table, dropout_key)
                i = self._stats_index
                part_states = (*part_states[:i], stats, *part_states[i + 1:])
        finally:
            self._unaugmented = None
        grads = loss_grads
        for i, p in self._grad_parts:
            grads = p.adjust_grads(params, part_states[i], grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if self._head is not None:  # head units not in use keep their weights and optimizer state
            used, self._head.step_used = self._head.step_used, None
            new_params, opt_state = self._head.keep_unused(
                params, new_params, carry[1], opt_state, self._head.used_units(tb, weights, mask_table, used))
        if self._step_parts or self._batch_parts:
            part_states = list(part_states)
            for i, p in self._step_parts:
                part_states[i] = p.after_step(params, new_params, loss_grads, part_states[i])
            for i, p in self._batch_parts:
                part_states[i] = p.after_batch(part_states[i], raw, yb, tb, jax.lax.stop_gradient(logits),
                                               weights)
            part_states = tuple(part_states)
        return (new_params, opt_state, part_states, key), loss

    def _epoch_batches(self, carry, n: int):
        """An epoch's shuffle with the carried key: (carry with the key advanced, (batches
        (num_batches, batch_size) int32, weights (same shape) or None))."""
        params, opt_state, part_states, key = carry
        bs = self.batch_size
        num_batches = -(-n // bs)
        pad = num_batches * bs - n
        key, perm_key = jax.random.split(key)
        perm = jax.random.permutation(perm_key, n).astype(jnp.int32)
        carry = (params, opt_state, part_states, key)
        if pad:  # the last batch: its real samples, then copies of sample perm[0] of weight 0
            batches = jnp.concatenate([perm, jnp.zeros(pad, jnp.int32)]).reshape(num_batches, bs)
            weights = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])
            return carry, (batches, weights.reshape(num_batches, bs))
        return carry, (perm.reshape(num_batches, bs), None)

    def _epoch_program(self, carry, x, y, t, mask_table):
        """One epoch: shuffle with the carried key, then scan over the batches."""
        self.trace_counts["epoch"] += 1
        carry, xs = self._epoch_batches(carry, y.shape[0])

        def step(c, batch_and_weights):
            batch, weights = batch_and_weights
            return self.train_step(c, batch, weights, x, y, t, mask_table)

        return jax.lax.scan(step, carry, xs, unroll=self.scan_unroll)

    def _seeds_epoch_program(self, carries, data):
        """One epoch of several seeds in one scan, each step taking every seed's step in turn
        (jax/seeds.py's unrolled program): ``carries`` and ``data`` are per-seed lists of the
        ``_epoch_program`` arguments; returns (new carries, losses (num_batches, seeds))."""
        self.trace_counts["epoch"] += 1
        carries, xs = zip(*(self._epoch_batches(c, d[1].shape[0]) for c, d in zip(carries, data)))

        def step(cs, batches):
            out = [self.train_step(c, batch, weights, *d)
                   for c, (batch, weights), d in zip(cs, batches, data)]
            return tuple(o[0] for o in out), jnp.stack([o[1] for o in out], axis=-1)

        return jax.lax.scan(step, tuple(carries), tuple(xs), unroll=self.scan_unroll)

    def train_epoch(self, task, epoch: int) -> dict:
        n = int(self.train_y.shape[0])
        if n == 0:
            return {"steps": 0, "loss": float("nan")}
        start = time.perf_counter()
        carry, losses = self._epoch_fn(*self.epoch_inputs())
        losses = np.asarray(losses)  # waits for the epoch
        return self.finish_epoch(task, epoch, carry, losses, time.perf_counter() - start)

    def epoch_inputs(self) -> tuple:
        """The arguments of the epoch program: (carry, x, y, task ids, mask table), where carry
        is (params, optimizer state, the parts' states, PRNG key). jax/seeds.py stacks these
        over seeds to run one program for all of them."""
        carry = (self.params, self.opt_state, tuple(p.state for p in self.parts), self.key)
        return carry, self.train_x, self.train_y, self.train_t, self.mask_table

    def finish_epoch(self, task, epoch: int, carry, losses: np.ndarray, elapsed: float) -> dict:
        """Take back the epoch program's new carry and per-step losses (NumPy); check, report."""
        num_batches = len(losses)
        loop = self.loop
        base_step = loop.state.global_step if loop is not None else 0
        self.params, self.opt_state, part_states, self.key = carry
        for p, s in zip(self.parts, part_states):
            p.state = s
        if self.check_finite:
            self._check_finite(losses, task, epoch, base_step)
        mean_loss = float(losses.mean())
        rate = num_batches / max(elapsed, 1e-9)
        if loop is not None:
            for cb in loop.step_callbacks:
                for b in range(num_batches):
                    cb.on_before_step(loop, base_step + b)
                    cb.on_after_step(loop, base_step + b, float(losses[b]))
            loop.state.global_step += num_batches
            loop.progress(step=num_batches, steps=num_batches, loss=mean_loss, steps_per_s=rate)
        return {"steps": num_batches, "loss": mean_loss, "time_s": elapsed, "steps_per_s": rate}

    def _check_finite(self, losses: np.ndarray, task, epoch: int, base_step: int) -> None:
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad):
            b = int(bad[0])
            raise TrainingDivergedError(
                f"the training loss became {float(losses[b])} at task {task.id + 1} "
                f"(of {self.stream.num_tasks}), epoch {epoch + 1}, step {b} (global step {base_step + b}). "
                f"Lower optimizer.lr (now {get_lr(self.opt_state):g}), set optimizer.grad_clip_norm, "
                f"or lower the algorithm's regularisation strength.")

    # -- evaluation --------------------------------------------------------------------------
    def _eval_program(self, params, x, y, mask_table, task_id, task_il: bool = False):
        """Number of correct predictions over batches x: (B, bs, ...), y: (B, bs). ``params``:
        see ``eval_params``. ``task_il`` (a Python bool, bound before jit): keep to task
        ``task_id``'s output units even when the stream is not task-IL."""
        self.trace_counts["eval"] += 1
        variables = self._variables(params)

        def batch(args):
            xb, yb = args
            logits = self.eval_model.apply(variables, xb, train=False)
            if self._head is not None:
                logits = jnp.where(jnp.any(mask_table, axis=0), logits, -jnp.inf)
            if self.masks or task_il:
                logits = jnp.where(mask_table[task_id], logits, -jnp.inf)
            return jnp.sum(jnp.argmax(logits, axis=1) == yb)

        return jnp.sum(jax.lax.map(batch, (x, y)))

    def eval_params(self):
        """What evaluation reads: the parameters, or for a model with batch norm
        {"params": parameters, "batch_stats": running averages}."""
        if self._stats_index is None:
            return self.params
        return {"params": self.params, "batch_stats": self.parts[self._stats_index].state}

    def _variables(self, params) -> dict:
        if self._stats_index is None:
            return {"params": params}
        if "batch_stats" not in params:
            raise ConfigError("this backbone has batch norm, whose running averages the JAX backend "
                              "does not yet evaluate in one program for several seeds; run the seeds "
                              "one per run (seed=<s>) or use backend=torch.")
        return params

    def predict(self, x, task_id: int | None = None) -> jax.Array:
        """Predicted output units for normalised inputs ``x`` (N, C, H, W)."""
        logits = self.eval_model.apply(self._variables(self.eval_params()), x, train=False)
        if self._head is not None:
            logits = jnp.where(jnp.any(self.mask_table, axis=0), logits, -jnp.inf)
        if self.masks and task_id is not None:
            logits = jnp.where(self.mask_table[task_id], logits, -jnp.inf)
        return jnp.argmax(logits, axis=1)

    def evaluate(self, tasks, task_il: bool = False) -> dict[int, float]:
        eval_fn = self._eval_fn
        if task_il and not self.masks:  # a class-IL run evaluated as task-IL (training.eval_task_il)
            if getattr(self, "_eval_task_il_fn", None) is None:
                self._eval_task_il_fn = jax.jit(functools.partial(self._eval_program, task_il=True))
            eval_fn = self._eval_task_il_fn
        pending = []
        for task in tasks:  # dispatch every task, then wait
            x, y = self.test_arrays(task)
            task_id = self.put(np.int32(task.id))
            pending.append((task, eval_fn(self.eval_params(), x, y, self.mask_table, task_id)))
        return {task.id: 100.0 * int(correct) / max(task.num_test, 1) for task, correct in pending}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "params": to_numpy(flax.serialization.to_state_dict(self.params)),
            "optimizer": to_numpy(flax.serialization.to_state_dict(self.opt_state)),
            "key": np.array(self.key),
            "parts": [p.state_dict() for p in self.parts],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.params = _restore(self.params, state["params"], self.jax_device)
        self.opt_state = _restore(self.opt_state, state["optimizer"], self.jax_device)
        self.key = self.put(jnp.asarray(state["key"], dtype=self.key.dtype))
        for p, s in zip(self.parts, state["parts"]):
            p.load_state_dict(s)

    def num_parameters(self) -> int:
        return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(self.params)))


@jax.jit
def _lookup(x, table):
    """uint8 images (N, C, ...) -> float32 ``table[c, x]`` for each pixel of channel c."""
    channel = jnp.arange(table.shape[0]).reshape(1, -1, *([1] * (x.ndim - 2)))
    return table[channel, x.astype(jnp.int32)]


class BatchStats(Part):
    """The running averages of the model's batch norms (the ``batch_stats`` collection) as a
    part's state; the learner updates it in ``train_step`` and reads it in evaluation."""

    def __init__(self, learner: "JaxLearner", stats):
        super().__init__(learner, None)
        self.state = learner.put(stats)

    @classmethod
    def attach(cls, learner: "JaxLearner", input_shape) -> int | None:
        """Add the part to ``learner`` when its model has batch norm; its index in ``parts``."""
        from cl_runner.backends.jax.resnet import init_batch_stats

        stats = init_batch_stats(learner.model, input_shape)
        if not stats:
            return None
        learner.parts.append(cls(learner, stats))
        return len(learner.parts) - 1


def _plugin_class(name: str) -> type[Part]:
    from cl_runner.registry import PLUGINS

    return PLUGINS.get(name, backend="jax")


ALGORITHMS.register("naive", backend="jax")(JaxLearner)
