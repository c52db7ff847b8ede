"""Exemplar sets chosen per class, as iCaRL keeps them (Rebuffi et al. 2017, Algorithms 4 and 5),
for the JAX backend: the same memory as ``cl_runner/backends/torch/herding.py``, held on the host.

The memory holds, for every class seen, an *ordered* list of exemplars: the first k of a class's
list are its best k exemplars, so shrinking a class to m exemplars keeps the first m (the paper's
ReduceExemplarSet). Two ways of choosing them (``policy``):

* ``herding``: the paper's ConstructExemplarSet. With phi the L2-normalised features of the
  class's samples (the raw features with ``normalize=False``, as in Mammoth's iCaRL of 2020)
  and mu their mean, the k-th exemplar is

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

from cl_runner.algorithms.memories import ExemplarSets, herding_order, l2_normalize


class ExemplarMemory(ExemplarSets):
    """Ordered exemplar sets of every seen class (cl_runner/algorithms/memories.py); herding in
    NumPy, the random order from a NumPy generator."""

    def __init__(self, capacity: int, policy: str = "herding", seed: int = 0, normalize: bool = True):
        super().__init__(capacity, policy, normalize)
        self.rng = np.random.default_rng(seed)

    def select(self, features: np.ndarray, m: int) -> np.ndarray:
        """Indices of the ``m`` exemplars to keep among a class's samples, best first."""
        if self.policy == "herding":
            feats = np.asarray(features)
            return herding_order(l2_normalize(feats) if self.normalize else feats, m)
        n = len(features)
        return self.rng.permutation(n)[: min(m, n)]

    def state_dict(self) -> dict[str, Any]:
        return {**self.sets_state(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_sets_state(state)
        self.rng.bit_generator.state = state["rng"]
