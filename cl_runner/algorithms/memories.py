"""The host-side rules of the replay memories, shared by the PyTorch and JAX backends (NumPy only).

A backend keeps the stored samples where its arrays live (device tensors, host arrays); what to
store, where, and what to evict is decided here, once, so both backends follow the same rules:

* ``memory_sizes``: slots of an ER / DER / DER++ / A-GEM memory from ``mem_size`` / ``mem_per_task``,
  and ``class_ring_layout``: where each (task, class) ring of ``mem_policy: class_ring`` lies.
* ``GreedyClassBalancedSampler``: GDumb's sampler (Prabhu et al. 2020, Algorithm 1) and
  ``sgdr_lr``, its retraining schedule.
* ``ExemplarSets``: iCaRL's ordered exemplar sets per class (Rebuffi et al. 2017, Algorithms 4
  and 5), with ``herding_order`` in NumPy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cl_runner.errors import ConfigError

EXEMPLAR_POLICIES = ("herding", "random")


# -- ER, DER, DER++, A-GEM ------------------------------------------------------------------------
def memory_sizes(cfg, num_tasks: int) -> tuple[int | None, int | None]:
    """(capacity, per_task) of the memory an algorithm's config asks for: ``mem_policy`` and
    ``mem_size`` (total) or ``mem_per_task`` (per task; it wins when both are set). A ring has
    ``per_task`` slots per task (capacity None); the other policies a total ``capacity``."""
    if cfg.mem_policy == "class_ring":
        raise ValueError("a class_ring memory's size comes from class_ring_layout")
    per_task, total = cfg.mem_per_task, cfg.mem_size
    if per_task is None and total is None:
        raise ConfigError("set the memory size: algo.mem_size (total) or algo.mem_per_task.")
    if cfg.mem_policy == "ring":
        per_task = per_task if per_task is not None else total // num_tasks
        if per_task < 1:
            raise ConfigError(f"algo.mem_size={total} leaves no slot per task for {num_tasks} tasks "
                              f"with mem_policy=ring; raise it or set algo.mem_per_task.")
        return None, per_task
    return (per_task * num_tasks if per_task is not None else total), per_task


def class_ring_layout(task_classes, per_class: int, num_outputs: int) -> tuple[int, np.ndarray]:
    """(capacity, start) of a ``class_ring`` memory: every class of every task owns ``per_class``
    consecutive slots, the tasks' blocks one after another and, inside a task's block, its
    classes in the task's order. ``start[t, c]`` is the first slot of class c in task t, -1 when
    task t has no class c. This is A-GEM's episodic memory (facebookresearch/agem
    conv_split_cifar.py:430-440 and fc_permute_mnist.py:307-316: a sample of class c goes to slot
    ``count_cls[c] + mem_size * (c's index in the task) + (the earlier tasks' slots)``, then
    ``count_cls[c] = (count_cls[c] + 1) % mem_size``)."""
    per_class = int(per_class)
    if per_class < 1:
        raise ConfigError(f"config key 'algo.mem_per_class' must be a positive integer, got {per_class}.")
    start = np.full((len(task_classes), int(num_outputs)), -1, dtype=np.int64)
    slot = 0
    for t, classes in enumerate(task_classes):
        for c in np.asarray(classes).tolist():
            start[t, int(c)] = slot
            slot += per_class
    return slot, start


# -- GDumb ----------------------------------------------------------------------------------------
def sgdr_lr(epoch: int, lr: float, lr_min: float) -> float:
    """GDumb's schedule: epoch 0 at lr / 10, then cosine cycles of 1, 2, 4, ... epochs."""
    if epoch == 0:
        return 0.1 * lr
    cycle = 1 << (epoch.bit_length() - 1)  # the cycle of epoch e >= 1 starts at the power of 2 <= e
    t_cur = epoch - cycle
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t_cur / cycle)) / 2


class GreedyClassBalancedSampler:
    """GDumb's decisions: which slot of a ``capacity``-slot memory each offered sample takes.

    A sample is stored if a slot is free. Otherwise, with k_c = capacity / (classes seen, its
    own included), if its class holds fewer than k_c samples, a random sample of the class
    holding the most is evicted and the new one takes its slot; else it is dropped. The
    decisions depend only on the labels and the counts. A backend's memory subclasses this and
    stores the samples at the slots ``plan`` returns."""

    def __init__(self, capacity: int, seed: int):
        self.capacity = int(capacity)
        self.rng = np.random.default_rng(seed)
        self.size = 0
        self.slots: dict[int, list[int]] = {}  # class -> its slots (order of insertion)

    def __len__(self) -> int:
        return self.size

    def counts(self) -> dict[int, int]:
        return {c: len(s) for c, s in self.slots.items()}

    def classes(self) -> list[int]:
        return [c for c, s in self.slots.items() if s]

    def plan(self, labels: np.ndarray) -> np.ndarray:
        """Run the sampler over ``labels`` in order; the slot each sample is written to, -1 if
        dropped or overwritten later in the same call (the last writer of a slot wins)."""
        dst = np.full(len(labels), -1, dtype=np.int64)
        slots, cap = self.slots, self.capacity
        for i, y in enumerate(np.asarray(labels).tolist()):
            own = slots.setdefault(int(y), [])
            if self.size < cap:
                slot = self.size
                self.size += 1
            elif len(own) < cap / len(slots):
                largest = max(slots, key=lambda c: len(slots[c]))
                victims = slots[largest]
                j = int(self.rng.integers(len(victims)))
                slot = victims[j]
                victims[j] = victims[-1]
                victims.pop()
            else:
                continue
            own.append(slot)
            dst[i] = slot
        kept = dst >= 0
        if kept.any():  # a slot written twice in this call keeps its last sample
            _, last_rev = np.unique(dst[::-1], return_index=True)
            last = np.zeros(len(dst), dtype=bool)
            last[len(dst) - 1 - last_rev] = True
            dst = np.where(last & kept, dst, -1)
        return dst

    def sampler_state(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "rng": self.rng.bit_generator.state, "size": self.size,
                "slots": {c: list(s) for c, s in self.slots.items()}}

    def load_sampler_state(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"a GDumb memory of {state['capacity']} slots cannot be loaded into one of "
                             f"{self.capacity}")
        self.rng.bit_generator.state = state["rng"]
        self.size = int(state["size"])
        self.slots = {int(c): list(s) for c, s in state["slots"].items()}


# -- iCaRL ----------------------------------------------------------------------------------------
def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (at least 1e-12), in the input's dtype."""
    norm = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norm, np.asarray(1e-12, features.dtype))


def herding_order(features: np.ndarray, m: int) -> np.ndarray:
    """Indices of ``m`` rows of ``features`` (n, d) chosen greedily by herding, in the order chosen:
    the k-th is argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||, each row at most once
    (float64). ``features`` are used as given (iCaRL passes L2-normalised ones); ``m`` larger
    than n is cut to n."""
    feats = np.asarray(features, np.float64)
    n = feats.shape[0]
    m = min(int(m), n)
    mu = feats.mean(0)
    chosen = np.empty(m, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    running = np.zeros_like(mu)  # sum of the chosen exemplars' features
    for k in range(1, m + 1):
        # Distance between the class mean and the mean the exemplars would have with each candidate.
        dist = ((mu - (running + feats) / k) ** 2).sum(1)
        dist[taken] = np.inf
        i = int(np.argmin(dist))
        chosen[k - 1] = i
        taken[i] = True
        running += feats[i]
    return chosen


class ExemplarSets:
    """Ordered exemplar sets of every seen class: raw images (uint8, host) and task ids.

    The first k exemplars of a class are its best k, so shrinking a class to m keeps the first m
    (the paper's ReduceExemplarSet). A backend subclasses this with ``select`` (herding on its
    own arrays, or a random order from its own generator) and the generator's state."""

    def __init__(self, capacity: int, policy: str = "herding"):
        if policy not in EXEMPLAR_POLICIES:
            raise ConfigError(f"exemplar policy '{policy}' is not one of {', '.join(EXEMPLAR_POLICIES)}.")
        if capacity <= 0:
            raise ConfigError(f"an exemplar memory needs a positive size, got {capacity}.")
        self.capacity = int(capacity)
        self.policy = policy
        # class -> (images (k, C, H, W) uint8, task id), the images in priority order.
        self.sets: dict[int, tuple[np.ndarray, int]] = {}

    @property
    def classes(self) -> list[int]:
        return list(self.sets)

    def __len__(self) -> int:
        return sum(len(x) for x, _ in self.sets.values())

    def per_class(self, num_classes: int) -> int:
        """m = K / (classes seen), the exemplars each class may keep."""
        m = self.capacity // num_classes
        if m < 1:
            raise ConfigError(f"an exemplar memory of {self.capacity} samples cannot keep one exemplar "
                              f"of each of {num_classes} classes; raise algo.mem_size.")
        return m

    def reduce(self, m: int) -> None:
        """Keep the first ``m`` exemplars of every class (the paper's ReduceExemplarSet)."""
        self.sets = {c: (x[:m], t) for c, (x, t) in self.sets.items()}

    def add_class(self, cls: int, images: np.ndarray, task_id: int) -> None:
        self.sets[int(cls)] = (np.ascontiguousarray(images), int(task_id))

    def select(self, features, m: int) -> np.ndarray:
        """Indices (host) of the ``m`` exemplars to keep among a class's samples, best first."""
        raise NotImplementedError

    def add_task(self, task, features_of) -> None:
        """After a task: every class is cut to m = K / (classes seen) exemplars, and each of the
        task's new classes gets its m best training images. ``features_of(uint8 images)`` gives
        their features (on the backend's arrays) for ``select``."""
        new_classes = [int(c) for c in task.classes if int(c) not in self.sets]
        m = self.per_class(len(self.sets) + len(new_classes))
        self.reduce(m)
        labels = np.asarray(task.train_y)
        images = np.asarray(task.train_x)
        for c in new_classes:
            rows = np.flatnonzero(labels == c)
            if len(rows) == 0:
                continue
            self.add_class(c, images[rows[self.select(features_of(images[rows]), m)]], task.id)

    def arrays(self):
        """All exemplars as (images, labels, task ids), class after class; None when empty."""
        if not self.sets:
            return None
        xs = [x for x, _ in self.sets.values()]
        ys = [np.full(len(x), c, dtype=np.int64) for c, (x, _) in self.sets.items()]
        ts = [np.full(len(x), t, dtype=np.int64) for x, t in self.sets.values()]
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(ts)

    def sets_state(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "policy": self.policy,
                "sets": {c: (x.copy(), t) for c, (x, t) in self.sets.items()}}

    def load_sets_state(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity or state["policy"] != self.policy:
            raise ValueError(f"exemplar memory state of a {state['policy']} memory of {state['capacity']} "
                             f"cannot be loaded into a {self.policy} memory of {self.capacity}")
        self.sets = {int(c): (np.asarray(x), int(t)) for c, (x, t) in state["sets"].items()}
