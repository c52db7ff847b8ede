"""The replay memory on the JAX backend: fixed-size device arrays in a part's state.

The same memory as the PyTorch backend's (``cl_runner/backends/torch/memory.py``): the same
policies, sizes and keys, with every decision taken inside the compiled epoch, so replay methods
stay one program per epoch. The stored samples (inputs, labels, task ids, optionally logits),
a ``filled`` flag per slot and the counters are arrays of a :class:`MemoryPart`'s ``state``, an
argument of the compiled epoch like every other state; the memory has ``capacity + 1`` rows, the
last one a "discard" row that takes the writes of samples not kept.

* ``reservoir``: Vitter's algorithm R over the whole stream. The n-th sample seen (from 0) takes
  slot n while n < capacity, else slot j with j uniform in 0..n when j < capacity.
* ``class_balanced``: one region of capacity // K slots per registered class (K classes so far),
  each a reservoir over its class's samples; when new classes arrive (between tasks, on the
  host) each region keeps a uniformly random subset of what it held.
* ``ring``: ``per_task`` slots per task holding the task's latest samples.
* ``class_ring``: ``per_class`` slots for every (task, class) pair of the stream holding the
  latest samples of that class in that task (A-GEM's episodic memory; the layout is
  ``memories.class_ring_layout``'s, a table in the state).

A batch is inserted at once: each sample's slot comes from array operations (its position in
the stream, one uniform draw), and where two samples of one batch get the same slot the later
one wins, as it would one sample at a time. Samples of weight 0 (the padding of a padded last
batch) are not offered.

Sampling draws ``k`` distinct slots uniformly among the eligible ones (filled, and of a task
before ``before_task`` when given) with the Gumbel top-k trick: the k largest of independent
Gumbel scores over the eligible slots are a uniform draw without replacement. The batch has a
fixed size min(k, capacity); while fewer than k slots are eligible, the draw's extra entries are
flagged invalid (weight 0), so a loss averaged over the valid entries is the mean over
min(k, stored) samples, as on the PyTorch backend, and 0 when the memory is empty.

The PRNG key of insertion and sampling is in the state too: traced hooks that cannot return a
state (``extra_loss``, ``adjust_grads``) draw from ``fold_in(key, purpose)``, and
``after_batch`` moves the key on after every step.

With ``benchmark.augment`` the memory receives the stream batch before augmentation (the
learner's ``after_batch`` gets it so) and :meth:`MemoryPart.draw` augments every memory batch
afresh with its own key, as the references replay (Mammoth utils/buffer.py stores
``not_aug_inputs``; ``get_data`` applies ``transform``, utils/buffer.py:89-109).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.algorithms.memories import class_ring_layout, memory_sizes
from cl_runner.backends.jax.augment import random_crop_flip
from cl_runner.backends.jax.learner import Part, cross_entropy
from cl_runner.errors import ConfigError

POLICIES = ("reservoir", "class_balanced", "ring", "class_ring")

#: ``fold_in`` purposes of the memory's key within one step.
INSERT, SAMPLE, SAMPLE_2, DROPOUT, DROPOUT_2 = 0, 1, 2, 3, 4
#: Added to a draw's purpose for the key of its augmentation.
AUGMENT = 16


def derived_seed(seed: int, purpose: int) -> int:
    """A seed for one purpose that is independent of the others (as on the PyTorch backend)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, purpose]).generate_state(1)[0])


def last_writer_wins(slots, discard: int):
    """``slots`` with every slot that a later element of the batch also writes sent to ``discard``."""
    n = slots.shape[0]
    if n < 2:
        return slots
    later = jnp.triu(jnp.ones((n, n), dtype=bool), 1)
    overwritten = jnp.any((slots[:, None] == slots[None, :]) & later, axis=1)
    return jnp.where(overwritten, discard, slots)


def algorithm_r(pos, key, capacity):
    """Vitter's algorithm R per sample: the slot of the sample numbered ``pos`` (from 0) of its
    stream; ``capacity`` means "not kept"."""
    j = jax.random.randint(key, pos.shape, 0, pos + 1)  # uniform in 0..pos
    return jnp.where(pos < capacity, pos, jnp.where(j < capacity, j, capacity))


def check_no_batch_norm(learner, method: str) -> None:
    """Methods that run forward passes of their own (on memory batches, a previous model, the
    importance samples) do not carry batch-norm running averages on this backend: a clear error
    instead of a silently different method."""
    if getattr(learner, "_stats_index", None) is not None:
        raise ConfigError(f"algo={method} on backend=jax does not support a backbone with batch norm "
                          f"({learner.cfg.backbone.type}); use backend=torch or a backbone without it "
                          f"(mlp, cnn).")


class ReplayMemory:
    """The static description of a memory (policy, sizes, shapes) and its pure operations on a
    memory state (a dict of device arrays, see :meth:`init`)."""

    def __init__(self, policy: str, input_shape, *, capacity: int | None = None,
                 per_task: int | None = None, num_tasks: int = 1, num_outputs: int = 1,
                 store_logits: bool = False, per_class: int | None = None, task_classes=None):
        if policy not in POLICIES:
            raise ConfigError(f"memory policy '{policy}' is not one of {', '.join(POLICIES)}.")
        self.policy = policy
        self.num_tasks = int(num_tasks)
        self.num_outputs = int(num_outputs)
        self.input_shape = tuple(input_shape)
        self.store_logits = store_logits
        self.per_class = None
        self.pair_start = None
        if policy == "ring":
            if not per_task or per_task <= 0:
                raise ConfigError("a ring memory needs a positive number of slots per task.")
            self.per_task = int(per_task)
            self.capacity = self.per_task * self.num_tasks
        elif policy == "class_ring":
            if task_classes is None or not per_class:
                raise ConfigError("a class_ring memory needs the slots per class and every task's classes.")
            self.per_task = None
            self.per_class = int(per_class)
            self.num_tasks = len(task_classes)
            self.capacity, self.pair_start = class_ring_layout(task_classes, self.per_class, self.num_outputs)
        else:
            if not capacity or capacity <= 0:
                raise ConfigError(f"a {policy} memory needs a positive size.")
            self.per_task = None
            self.capacity = int(capacity)

    def init(self) -> dict[str, np.ndarray]:
        rows = self.capacity + 1  # the last row is the discard row
        state = {
            "x": np.zeros((rows, *self.input_shape), np.float32),
            "y": np.zeros(rows, np.int32),
            "t": np.zeros(rows, np.int32),
            "filled": np.zeros(rows, bool),
            "seen": np.zeros((), np.int32),                          # samples offered so far
            "task_counts": np.zeros(self.num_tasks, np.int32),       # ring: offered per task
            "class_start": np.full(self.num_outputs, -1, np.int32),  # class_balanced regions
            "class_seen": np.zeros(self.num_outputs, np.int32),
            "quota": np.zeros((), np.int32),
        }
        if self.store_logits:
            state["logits"] = np.zeros((rows, self.num_outputs), np.float32)
        if self.policy == "class_ring":  # first slot of each (task, class) ring, and samples offered
            state["pair_start"] = self.pair_start.astype(np.int32)
            state["pair_seen"] = np.zeros(self.pair_start.shape, np.int32)
        return state

    # -- writing (traced) ------------------------------------------------------------------------
    def insert(self, mem, key, x, y, task, valid, logits=None):
        """``mem`` after offering the batch (x, y, logits) of task ``task`` (a scalar); samples
        with ``valid`` False are not offered."""
        cap = self.capacity
        valid = valid.astype(bool)
        count = jnp.sum(valid.astype(jnp.int32))
        rank = jnp.cumsum(valid.astype(jnp.int32)) - 1  # position among the offered samples
        if self.policy == "reservoir":
            slots = algorithm_r(mem["seen"] + rank, key, cap)
            slots = last_writer_wins(jnp.where(valid, slots, cap), cap)
        elif self.policy == "ring":
            done = mem["task_counts"][task]
            slots = task * self.per_task + (done + rank) % self.per_task
            # Only the batch's last per_task samples stay (so no two share a slot).
            slots = jnp.where(valid & (rank >= count - self.per_task), slots, cap)
            mem = {**mem, "task_counts": mem["task_counts"].at[task].add(count)}
        elif self.policy == "class_ring":
            # The k-th sample of class c offered in this task (from 0) takes slot k mod per_class
            # of the (task, class) ring; where a batch brings more, the later samples win.
            start = mem["pair_start"][task, y]
            n = y.shape[0]
            order = jnp.arange(n)
            earlier_same = (y[:, None] == y[None, :]) & (order[None, :] < order[:, None]) & valid[None, :]
            pos = mem["pair_seen"][task, y] + jnp.sum(earlier_same, axis=1).astype(jnp.int32)
            slots = jnp.where(valid & (start >= 0), start + pos % self.per_class, cap)
            slots = last_writer_wins(slots, cap)
            mem = {**mem, "pair_seen": mem["pair_seen"].at[task, y].add(valid.astype(jnp.int32))}
        else:
            start = mem["class_start"][y]
            n = y.shape[0]
            order = jnp.arange(n)
            earlier_same = (y[:, None] == y[None, :]) & (order[None, :] < order[:, None]) & valid[None, :]
            pos = mem["class_seen"][y] + jnp.sum(earlier_same, axis=1).astype(jnp.int32)
            quota = mem["quota"]
            in_region = algorithm_r(pos, key, quota)
            keep = valid & (in_region < quota) & (start >= 0)
            slots = last_writer_wins(jnp.where(keep, start + in_region, cap), cap)
            mem = {**mem, "class_seen": mem["class_seen"].at[y].add(valid.astype(jnp.int32))}
        slots = slots.astype(jnp.int32)
        new = {**mem,
               "x": mem["x"].at[slots].set(x.astype(mem["x"].dtype)),
               "y": mem["y"].at[slots].set(y.astype(jnp.int32)),
               "t": mem["t"].at[slots].set(jnp.broadcast_to(task, y.shape).astype(jnp.int32)),
               "filled": mem["filled"].at[slots].set(True).at[cap].set(False),
               "seen": mem["seen"] + count}
        if self.store_logits:
            new["logits"] = mem["logits"].at[slots].set(logits.astype(mem["logits"].dtype))
        return new

    # -- reading (traced) ------------------------------------------------------------------------
    def sample(self, mem, key, k: int, before_task=None):
        """(slots, valid): min(k, capacity) distinct slots drawn uniformly among the stored
        samples (of tasks before ``before_task`` when given); ``valid`` False marks entries
        beyond the number of eligible samples."""
        cap = self.capacity
        eligible = mem["filled"][:cap]
        if before_task is not None:
            eligible = eligible & (mem["t"][:cap] < before_task)
        scores = jnp.where(eligible, jax.random.gumbel(key, (cap,)), -jnp.inf)
        _, slots = jax.lax.top_k(scores, min(int(k), cap))
        return slots, eligible[slots]

    def get(self, mem, slots, valid, mask_table=None):
        """(x, y, task ids, logits or None) of ``slots``. Invalid entries get a label of their
        task's output units (so a masked loss stays finite before its weight 0 removes it)."""
        y, t = mem["y"][slots], mem["t"][slots]
        if mask_table is not None:
            y = jnp.where(valid, y, jnp.argmax(mask_table[t], axis=-1).astype(y.dtype))
        logits = mem["logits"][slots] if self.store_logits else None
        return mem["x"][slots], y, t, logits

    # -- host side, between tasks ----------------------------------------------------------------
    def register_classes(self, mem, classes, rng: np.random.Generator):
        """class_balanced: ``mem`` with a region for each new class (regions shrink, each keeping
        a uniformly random subset of what it held); other policies: ``mem`` unchanged."""
        if self.policy != "class_balanced":
            return mem
        start = np.asarray(mem["class_start"])
        old_classes = [int(c) for c in np.argsort(np.where(start >= 0, start, np.iinfo(np.int32).max))
                       if start[c] >= 0]
        new = [int(c) for c in dict.fromkeys(int(c) for c in classes) if start[int(c)] < 0]
        if not new:
            return mem
        old_quota = int(mem["quota"])
        quota = self.capacity // (len(old_classes) + len(new))
        if quota < 1:
            raise ConfigError(f"a class-balanced memory of {self.capacity} slots cannot hold one sample "
                              f"of each of {len(old_classes) + len(new)} classes; raise the memory size.")
        seen = np.asarray(mem["class_seen"])
        src, dst = [], []
        for k, c in enumerate(old_classes):
            stored = min(int(seen[c]), old_quota)
            keep = min(stored, quota)
            pick = rng.permutation(stored)[:keep] if keep < stored else np.arange(stored)
            src.append(k * old_quota + pick)
            dst.append(k * quota + np.arange(keep))
        out = {name: np.array(a) for name, a in mem.items()}
        out["filled"][:] = False
        if src:
            s, d = np.concatenate(src).astype(np.int64), np.concatenate(dst).astype(np.int64)
            for name in ("x", "y", "t", "logits"):
                if name in out:
                    out[name][d] = np.asarray(mem[name])[s]
            out["filled"][d] = True
        for k, c in enumerate(old_classes + new):
            out["class_start"][c] = k * quota
        out["quota"] = np.asarray(quota, np.int32)
        return out

    def size(self, mem) -> int:
        return int(np.asarray(mem["filled"][: self.capacity]).sum())


def memory_for(learner, cfg, store_logits: bool = False) -> ReplayMemory:
    """The memory an algorithm's config asks for: ``mem_policy`` and ``mem_size`` (total) or
    ``mem_per_task`` (per task; it wins when both are set), or ``mem_per_class`` (class_ring), as
    on the PyTorch backend."""
    num_tasks = learner.stream.num_tasks
    if cfg.mem_policy == "class_ring":
        return ReplayMemory("class_ring", learner.stream.input_shape, per_class=cfg.mem_per_class,
                            task_classes=[t.classes for t in learner.stream.tasks],
                            num_outputs=learner.num_outputs(), store_logits=store_logits)
    capacity, per_task = memory_sizes(cfg, num_tasks)
    return ReplayMemory(cfg.mem_policy, learner.stream.input_shape, capacity=capacity, per_task=per_task,
                        num_tasks=num_tasks, num_outputs=learner.num_outputs(), store_logits=store_logits)


class MemoryPart(Part):
    """A part that keeps a replay memory of the stream: its state is the memory, the memory's
    PRNG key, the current task id and the task-IL mask table. After every step the stream batch
    is offered to the memory (``after_batch``); subclasses read it in their traced hooks."""

    store_logits = False

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.memory = memory_for(learner, cfg, store_logits=self.store_logits)
        self.replay_batch_size = int(cfg.replay_batch_size or learner.batch_size)
        self.host_rng = np.random.default_rng(derived_seed(learner.seed, 7332))
        self.state = learner.put({
            "memory": self.memory.init(),
            "key": jax.random.PRNGKey(derived_seed(learner.seed, 7331)),
            "task": np.zeros((), np.int32),
            "mask_table": np.asarray(learner.mask_table),
        })

    def on_before_task(self, task) -> None:
        check_no_batch_norm(self.learner, self.cfg.name)
        mem = self.memory.register_classes(self.state["memory"], task.classes, self.host_rng)
        self.state = self.learner.put({**self.state, "memory": mem, "task": np.int32(task.id)})

    def draw(self, state, k: int, purpose: int, before_task=None):
        """(x, y, task ids, logits, valid) of a memory batch drawn with the step's key (traced).
        With ``benchmark.augment`` the inputs are augmented afresh (a key of their own)."""
        mem = state["memory"]
        slots, valid = self.memory.sample(mem, jax.random.fold_in(state["key"], purpose), k, before_task)
        x, y, t, z = self.memory.get(mem, slots, valid, state["mask_table"])
        augment = self.learner._augment
        if augment is not None:
            x = random_crop_flip(jax.random.fold_in(state["key"], AUGMENT + purpose), x, *augment)
        return x, y, t, z, valid

    def forward(self, params, state, x, purpose: int = DROPOUT):
        """Training-mode logits of memory samples (dropout drawn from the step's key; a forward
        pass of its own gets its own ``purpose``)."""
        learner = self.learner
        rngs = {"dropout": jax.random.fold_in(state["key"], purpose)} if learner.dropout else None
        return learner.model.apply({"params": params}, x, train=True, rngs=rngs)

    def masked_ce(self, state, logits, y, t, valid):
        """Mean cross-entropy over the valid samples (task-IL: each over its task's units); 0
        when none is valid."""
        learner = self.learner
        logits = learner.masked(logits, t if learner.masks else None, state["mask_table"])
        w = valid.astype(logits.dtype)
        return jnp.sum(cross_entropy(logits, y) * w) / jnp.maximum(jnp.sum(w), 1.0)

    def after_batch(self, state, x, y, t, logits, weights):
        key, insert_key = jax.random.split(state["key"])
        valid = jnp.ones(y.shape, bool) if weights is None else weights > 0
        mem = self.memory.insert(state["memory"], jax.random.fold_in(insert_key, INSERT), x, y,
                                 state["task"], valid, logits if self.store_logits else None)
        return {**state, "memory": mem, "key": key}

    def __len__(self) -> int:
        return self.memory.size(self.state["memory"])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "host_rng": self.host_rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.host_rng.bit_generator.state = state["host_rng"]
