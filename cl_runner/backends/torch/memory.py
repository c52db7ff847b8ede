"""The replay memory: stored samples (inputs, labels, task ids, optionally logits) on the device.

One class, three ways of choosing what to keep (``policy``):

* ``reservoir``: Vitter's algorithm R over the whole stream. The n-th sample seen (from 0) takes
  a free slot while there is one, else replaces slot j, with j drawn uniformly from 0..n, when
  j < capacity. Every sample of the stream is then in the memory with the same probability
  capacity / n, whatever task it came from.
* ``class_balanced``: equal slots per seen class. The memory is cut into one region of
  capacity // K slots per class (K: classes registered so far); each region is a reservoir over
  its class's samples. When a new class arrives the regions shrink, each keeping a uniformly
  random subset of what it held, so every region stays a uniform sample of its class.
* ``ring``: a FIFO ring per task: ``per_task`` slots per task, holding the task's latest samples.
* ``class_ring``: a FIFO ring per class of each task: ``per_class`` slots for every (task, class)
  pair of the stream, holding the latest samples of that class in that task (A-GEM's episodic
  memory, laid out by ``memories.class_ring_layout``). A sample's slot depends on its label, so
  it is decided on the device, as for ``class_balanced``.

A batch is inserted at once, never one sample at a time in Python: the sequential
algorithm's outcome for the whole batch is computed with array operations, and where two
samples of one batch draw the same slot the later one wins, as it would one at a time.
Reservoir and ring slots depend only on counts the host knows, so they are decided on the host
(a few numpy operations on batch-sized arrays) and only kept samples are written: once a
reservoir is full most batches write nothing. Class-balanced slots depend on the labels and are
decided on the device; rows not kept go to a spare "discard" row after the real slots, so no
count has to come back to the host.

Sampling draws indices with a ``torch.Generator`` on the memory's device, seeded from the
learner's seed, without replacement inside one memory batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cl_runner.algorithms.memories import class_ring_layout, memory_sizes
from cl_runner.errors import ConfigError

POLICIES = ("reservoir", "class_balanced", "ring", "class_ring")


def derived_seed(seed: int, purpose: int) -> int:
    """A seed for one purpose (memory sampling, ...) that is independent of the others."""
    return int(np.random.SeedSequence([int(seed) % 2**32, purpose]).generate_state(1)[0])


def last_writer_wins(slots: torch.Tensor, discard: int) -> torch.Tensor:
    """``slots`` with every slot that a later element of the batch also writes sent to ``discard``."""
    n = slots.numel()
    if n < 2:
        return slots
    same = slots[:, None] == slots[None, :]
    later = torch.ones(n, n, dtype=torch.bool, device=slots.device).triu_(1)
    return torch.where((same & later).any(1), torch.full_like(slots, discard), slots)


def algorithm_r(pos: torch.Tensor, u: torch.Tensor, capacity: int) -> torch.Tensor:
    """Vitter's algorithm R, per sample: the slot of the sample numbered ``pos`` (from 0) in its
    stream, given a uniform ``u`` in [0, 1); ``capacity`` means "not kept"."""
    j = torch.floor(u.double() * (pos + 1).double()).long()  # uniform in 0..pos
    discard = torch.full_like(pos, capacity)
    return torch.where(pos < capacity, pos, torch.where(j < capacity, j, discard))


def reservoir_slots(seen: int, u: np.ndarray, capacity: int) -> np.ndarray:
    """Algorithm R for a batch, on the host: the i-th new sample is sample number seen + i of
    the stream, ``u`` one uniform number in [0, 1) per sample. Returns each sample's slot, -1
    for "not kept" (including a slot that a later sample of the batch takes, as it would be
    overwritten if the samples were inserted one at a time)."""
    pos = seen + np.arange(len(u), dtype=np.int64)
    j = np.floor(u * (pos + 1)).astype(np.int64)  # uniform in 0..pos
    slots = np.where(pos < capacity, pos, np.where(j < capacity, j, -1))
    if np.count_nonzero(slots >= 0) < 2:  # no two samples can share a slot
        return slots
    # Keep only the last writer of each slot.
    _, last_from_end = np.unique(slots[::-1], return_index=True)
    last = np.zeros(len(slots), dtype=bool)
    last[len(slots) - 1 - last_from_end] = True
    return np.where(last, slots, -1)


class ReplayMemory:
    """A fixed-size memory of samples kept on ``device``.

    ``capacity`` is the total number of slots (reservoir, class_balanced); ``per_task`` the
    slots of each task (ring, which then holds ``per_task * num_tasks``); ``per_class`` the slots
    of each class of each task (class_ring, with ``task_classes`` the classes of every task).
    """

    def __init__(self, policy: str, input_shape, device: torch.device, seed: int, *,
                 capacity: int | None = None, per_task: int | None = None, num_tasks: int = 1,
                 num_outputs: int | None = None, store_logits: bool = False,
                 per_class: int | None = None, task_classes=None):
        if policy not in POLICIES:
            raise ConfigError(f"memory policy '{policy}' is not one of {', '.join(POLICIES)}.")
        self.policy = policy
        self.device = torch.device(device)
        self.num_tasks = int(num_tasks)
        self.per_class = None
        n_cls = int(num_outputs) if num_outputs else 0
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
            self.capacity, start = class_ring_layout(task_classes, self.per_class, n_cls)
            # pair_start[t, c]: first slot of class c in task t (-1: none); pair_seen: samples offered.
            self.pair_start = torch.from_numpy(start).to(self.device)
            self.pair_seen = torch.zeros_like(self.pair_start)
        else:
            if not capacity or capacity <= 0:
                raise ConfigError(f"a {policy} memory needs a positive size.")
            self.per_task = None
            self.capacity = int(capacity)
        rows = self.capacity + 1  # the last row is the discard row
        self.x = torch.zeros((rows, *input_shape), device=self.device)
        self.y = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.t = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.logits = (torch.zeros((rows, int(num_outputs)), device=self.device) if store_logits else None)
        self.filled = torch.zeros(rows, dtype=torch.bool, device=self.device)
        # Sampling draws on the device; insertion decisions of reservoir memories on the host.
        self.generator = torch.Generator(device=self.device).manual_seed(derived_seed(seed, 7331))
        self.host_generator = torch.Generator().manual_seed(derived_seed(seed, 7332))
        # Host-side counters (no device sync needed to know them).
        self.seen = 0                                   # samples offered so far
        self.task_counts = [0] * self.num_tasks         # ring: samples offered per task
        # class_balanced: the registered classes in order, each owning slots [k*quota, (k+1)*quota).
        self.classes: list[int] = []
        self.quota = 0
        self.class_start = torch.full((max(n_cls, 1),), -1, dtype=torch.long, device=self.device)
        self.class_seen = torch.zeros(max(n_cls, 1), dtype=torch.long, device=self.device)
        self._ranges_cache: dict[Any, torch.Tensor] = {}

    # -- size ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.policy == "reservoir":
            return min(self.seen, self.capacity)
        if self.policy == "ring":
            return sum(min(c, self.per_task) for c in self.task_counts)
        return int(self.filled[: self.capacity].sum())

    # -- class regions ---------------------------------------------------------------------------
    def register_classes(self, classes) -> None:
        """class_balanced: give each new class its share of slots (a no-op for other policies)."""
        if self.policy != "class_balanced":
            return
        new = [int(c) for c in classes if int(c) not in self.classes]
        if not new:
            return
        if max(new) >= self.class_start.numel():
            grow = max(new) + 1 - self.class_start.numel()
            self.class_start = torch.cat([self.class_start, self.class_start.new_full((grow,), -1)])
            self.class_seen = torch.cat([self.class_seen, self.class_seen.new_zeros(grow)])
        old_quota, old_classes = self.quota, list(self.classes)
        quota = self.capacity // (len(old_classes) + len(new))
        if quota < 1:
            raise ConfigError(f"a class-balanced memory of {self.capacity} slots cannot hold one sample "
                              f"of each of {len(old_classes) + len(new)} classes; raise the memory size.")
        seen = self.class_seen.tolist()
        src, dst = [], []
        for k, c in enumerate(old_classes):
            stored = min(seen[c], old_quota)
            keep = min(stored, quota)
            if keep < stored:  # a uniformly random subset of a uniform sample is uniform
                pick = torch.randperm(stored, generator=self.generator, device=self.device)[:keep]
            else:
                pick = torch.arange(stored, device=self.device)
            src.append(k * old_quota + pick)
            dst.append(k * quota + torch.arange(keep, device=self.device))
        self.filled.zero_()
        if src:
            src_idx, dst_idx = torch.cat(src), torch.cat(dst)
            for buf in self._buffers():
                buf[dst_idx] = buf[src_idx].clone()
            self.filled[dst_idx] = True
        self.classes = old_classes + new
        self.quota = quota
        for k, c in enumerate(self.classes):
            self.class_start[c] = k * quota

    def _buffers(self) -> list[torch.Tensor]:
        return [b for b in (self.x, self.y, self.t, self.logits) if b is not None]

    # -- writing ---------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, task_id: int | torch.Tensor,
            logits: torch.Tensor | None = None) -> None:
        """Offer a batch of samples (all of task ``task_id``, or one task id per sample)."""
        n = int(y.shape[0])
        if n == 0:
            return
        if self.logits is not None and logits is None:
            raise ValueError("this memory stores logits: give them to add()")
        if self.policy == "class_balanced":
            # Depends on the labels, which are on the device: decided there.
            self.seen += n
            self._write(self._class_balanced_slots(y), x, y, task_id, logits)
            return
        if self.policy == "class_ring":
            if not isinstance(task_id, int):
                raise ValueError("a class_ring memory is filled one task at a time: give task_id as an int")
            self.seen += n
            self._write(self._class_ring_slots(y, task_id), x, y, task_id, logits)
            return
        # Reservoir and ring slots depend only on counts the host knows: decided on the host
        # with numpy, and only the kept samples are written (often none, once a reservoir is full).
        if self.policy == "reservoir":
            if self.seen + n <= self.capacity:
                slots = np.arange(self.seen, self.seen + n)
            else:
                u = torch.rand(n, generator=self.host_generator, dtype=torch.float64).numpy()
                slots = reservoir_slots(self.seen, u, self.capacity)
        else:
            if not isinstance(task_id, int):
                raise ValueError("a ring memory is filled one task at a time: give task_id as an int")
            count = self.task_counts[task_id]
            slots = task_id * self.per_task + (count + np.arange(n)) % self.per_task
            slots[: max(n - self.per_task, 0)] = -1  # only the batch's last per_task samples stay
            self.task_counts[task_id] += n
        self.seen += n
        kept = np.flatnonzero(slots >= 0)
        if len(kept) == 0:
            return
        dst = self._to_device(slots[kept])
        if len(kept) < n:
            src = self._to_device(kept)
            x, y = x[src], y[src]
            logits = logits[src] if logits is not None else None
            if not isinstance(task_id, int):
                task_id = task_id[src]
        self._write(dst, x, y, task_id, logits)

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        # A small host-to-device copy that does not wait for the device (the data is staged at once).
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device, non_blocking=True)

    def _class_balanced_slots(self, y: torch.Tensor) -> torch.Tensor:
        n = y.numel()
        start = self.class_start[y]
        # Position of each sample in its class's stream: samples seen before it of its class,
        # counting those earlier in this batch.
        order = torch.arange(n, device=self.device)
        earlier_same = (y[:, None] == y[None, :]) & (order[None, :] < order[:, None])
        pos = self.class_seen[y] + earlier_same.sum(1)
        u = torch.rand(n, generator=self.generator, device=self.device, dtype=torch.float64)
        in_region = algorithm_r(pos, u, self.quota)
        keep = (in_region < self.quota) & (start >= 0)
        slots = torch.where(keep, start + in_region, torch.full_like(pos, self.capacity))
        self.class_seen.index_add_(0, y, torch.ones_like(y))
        return last_writer_wins(slots, self.capacity)

    def _class_ring_slots(self, y: torch.Tensor, task_id: int) -> torch.Tensor:
        """Slot of each sample of a batch of task ``task_id``: the k-th sample of class c offered
        in this task (from 0, counting those earlier in the batch) takes slot start + k mod
        per_class of the (task, class) ring; a class the task does not have is not kept. Where a
        batch brings more than per_class samples of a class, the later ones win."""
        n = y.numel()
        start = self.pair_start[task_id][y]
        order = torch.arange(n, device=self.device)
        earlier_same = (y[:, None] == y[None, :]) & (order[None, :] < order[:, None])
        pos = self.pair_seen[task_id][y] + earlier_same.sum(1)
        slots = torch.where(start >= 0, start + pos % self.per_class, torch.full_like(pos, self.capacity))
        self.pair_seen[task_id].index_add_(0, y, torch.ones_like(y))
        return last_writer_wins(slots, self.capacity)

    def _write(self, slots, x, y, task_id, logits) -> None:
        self.x[slots] = x.detach().to(self.x.dtype)
        self.y[slots] = y
        self.t[slots] = task_id
        if self.logits is not None:
            self.logits[slots] = logits.detach().to(self.logits.dtype)
        if self.policy in ("class_balanced", "class_ring"):
            self.filled[slots] = True

    # -- reading ---------------------------------------------------------------------------------
    def sample(self, k: int, before_task: int | None = None) -> torch.Tensor | None:
        """Indices of up to ``k`` distinct stored samples drawn uniformly (None: nothing stored).

        ``before_task``: draw only among samples of tasks with a smaller id.
        """
        if self.policy == "ring":
            valid = self._ring_slots(before_task)
            if valid.numel() == 0:
                return None
            pick = torch.randperm(valid.numel(), generator=self.generator, device=self.device)[:k]
            return valid[pick]
        if self.policy == "reservoir":  # the stored samples are the first min(seen, capacity) slots
            stored = min(self.seen, self.capacity)
            if stored == 0:
                return None
            if before_task is None:
                return torch.randperm(stored, generator=self.generator, device=self.device)[:k]
            mask = self.t[:stored] < before_task
        else:
            mask = self.filled[: self.capacity]
            if before_task is not None:
                mask = mask & (self.t[: self.capacity] < before_task)
        n = int(mask.sum())  # a device sync; only the task-filtered and class-balanced draws need it
        if n == 0:
            return None
        return torch.multinomial(mask.float(), min(k, n), replacement=False, generator=self.generator)

    def _ring_slots(self, before_task: int | None) -> torch.Tensor:
        tasks = range(self.num_tasks if before_task is None else min(before_task, self.num_tasks))
        key = tuple(min(self.task_counts[t], self.per_task) for t in tasks)
        if key not in self._ranges_cache:  # one entry: the past tasks' slots during a task
            parts = [torch.arange(t * self.per_task, t * self.per_task + f) for t, f in zip(tasks, key)]
            idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            self._ranges_cache = {key: idx.to(self.device)}
        return self._ranges_cache[key]

    def task_rows(self, task_id: int):
        """(x, y, task ids) of one task's stored samples under the ``ring`` policy: views of
        the buffers (task t owns rows t*per_task .. t*per_task + filled), no copy."""
        lo = task_id * self.per_task
        hi = lo + min(self.task_counts[task_id], self.per_task)
        return self.x[lo:hi], self.y[lo:hi], self.t[lo:hi]

    def get(self, idx: torch.Tensor):
        """(x, y, task ids, logits or None) of the stored samples ``idx``."""
        logits = self.logits[idx] if self.logits is not None else None
        return self.x[idx], self.y[idx], self.t[idx], logits

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "capacity": self.capacity,
            "x": self.x.clone(), "y": self.y.clone(), "t": self.t.clone(),
            "logits": self.logits.clone() if self.logits is not None else None,
            "filled": self.filled.clone(), "generator": self.generator.get_state(),
            "host_generator": self.host_generator.get_state(),
            "seen": self.seen, "task_counts": list(self.task_counts),
            "classes": list(self.classes), "quota": self.quota,
            "class_start": self.class_start.clone(), "class_seen": self.class_seen.clone(),
            **({"pair_seen": self.pair_seen.clone()} if self.policy == "class_ring" else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["policy"] != self.policy or state["capacity"] != self.capacity:
            raise ValueError(f"memory state of a {state['policy']} memory of {state['capacity']} slots "
                             f"cannot be loaded into a {self.policy} memory of {self.capacity}")
        dev = self.device
        self.x = state["x"].to(dev)
        self.y = state["y"].to(dev)
        self.t = state["t"].to(dev)
        self.logits = state["logits"].to(dev) if state["logits"] is not None else None
        self.filled = state["filled"].to(dev)
        self.generator.set_state(state["generator"])
        self.host_generator.set_state(state["host_generator"])
        self.seen = state["seen"]
        self.task_counts = list(state["task_counts"])
        self.classes = list(state["classes"])
        self.quota = state["quota"]
        self.class_start = state["class_start"].to(dev)
        self.class_seen = state["class_seen"].to(dev)
        if self.policy == "class_ring":
            self.pair_seen = state["pair_seen"].to(dev)
        self._ranges_cache.clear()


def memory_for(learner, cfg, store_logits: bool = False) -> ReplayMemory:
    """The memory an algorithm's config asks for: ``mem_policy`` and ``mem_size`` (total) or
    ``mem_per_task`` (per task; it wins when both are set), or ``mem_per_class`` (class_ring)."""
    num_tasks = learner.stream.num_tasks
    if cfg.mem_policy == "class_ring":
        return ReplayMemory("class_ring", learner.stream.input_shape, learner.device, learner.seed,
                            per_class=cfg.mem_per_class, task_classes=[t.classes for t in learner.stream.tasks],
                            num_outputs=learner.num_outputs(), store_logits=store_logits)
    capacity, per_task = memory_sizes(cfg, num_tasks)
    return ReplayMemory(cfg.mem_policy, learner.stream.input_shape, learner.device, learner.seed,
                        capacity=capacity, per_task=per_task, num_tasks=num_tasks,
                        num_outputs=learner.num_outputs(), store_logits=store_logits)
