"""Exemplar sets chosen per class, as iCaRL keeps them (Rebuffi et al. 2017, Algorithms 4 and 5),
for the JAX backend: the same memory as ``cl_runner/backends/torch/herding.py``, held on the host.

The memory holds, for every class seen, an *ordered* list of exemplars: the first k of a class's
list are its best k exemplars, so shrinking a class to m exemplars keeps the first m (the paper's
ReduceExemplarSet). Two ways of choosing them (``policy``):

* ``herding``: the paper's ConstructExemplarSet. With phi the L2-normalised features of the
  class's samples and mu their mean, the k-th exemplar is

      p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||,

  each sample chosen at most once (computed in float64, as on the PyTorch backend).
* ``random``: a uniformly random ordering (NumPy generator seeded from the run's seed).

Selection happens between tasks, once per new class: m steps of one vectorised NumPy operation
over the class's candidates (n x d), so no program is compiled per class size. The stored images
are the raw uint8 arrays, turned into model inputs with the learner's own normalisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cl_runner.errors import ConfigError

EXEMPLAR_POLICIES = ("herding", "random")


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (at least 1e-12), in the input's dtype."""
    norm = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norm, np.asarray(1e-12, features.dtype))


def herding_order(features: np.ndarray, m: int) -> np.ndarray:
    """Indices of ``m`` rows of ``features`` (n, d) chosen greedily by herding, in the order chosen.

    ``features`` are used as given (iCaRL passes L2-normalised ones). ``m`` larger than n is cut
    to n."""
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


class ExemplarMemory:
    """Ordered exemplar sets of every seen class: raw images (uint8, host) and task ids."""

    def __init__(self, capacity: int, policy: str = "herding", seed: int = 0):
        if policy not in EXEMPLAR_POLICIES:
            raise ConfigError(f"exemplar policy '{policy}' is not one of {', '.join(EXEMPLAR_POLICIES)}.")
        if capacity <= 0:
            raise ConfigError(f"an exemplar memory needs a positive size, got {capacity}.")
        self.capacity = int(capacity)
        self.policy = policy
        self.rng = np.random.default_rng(seed)
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

    def select(self, features: np.ndarray, m: int) -> np.ndarray:
        """Indices of the ``m`` exemplars to keep among a class's samples, best first."""
        if self.policy == "herding":
            return herding_order(l2_normalize(np.asarray(features)), m)
        n = len(features)
        return self.rng.permutation(n)[: min(m, n)]

    def add_class(self, cls: int, images: np.ndarray, task_id: int) -> None:
        self.sets[int(cls)] = (np.ascontiguousarray(images), int(task_id))

    def arrays(self):
        """All exemplars as (images, labels, task ids), class after class; None when empty."""
        if not self.sets:
            return None
        xs = [x for x, _ in self.sets.values()]
        ys = [np.full(len(x), c, dtype=np.int64) for c, (x, _) in self.sets.items()]
        ts = [np.full(len(x), t, dtype=np.int64) for x, t in self.sets.values()]
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(ts)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "policy": self.policy, "rng": self.rng.bit_generator.state,
                "sets": {c: (x.copy(), t) for c, (x, t) in self.sets.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity or state["policy"] != self.policy:
            raise ValueError(f"exemplar memory state of a {state['policy']} memory of {state['capacity']} "
                             f"cannot be loaded into a {self.policy} memory of {self.capacity}")
        self.rng.bit_generator.state = state["rng"]
        self.sets = {int(c): (np.asarray(x), int(t)) for c, (x, t) in state["sets"].items()}
