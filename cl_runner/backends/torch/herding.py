"""Exemplar sets chosen per class, as iCaRL keeps them (Rebuffi et al. 2017, Algorithms 4 and 5).

The memory holds, for every class seen, an *ordered* list of exemplars: the first k of a class's
list are its best k exemplars, so shrinking a class to m exemplars keeps the first m (the paper's
ReduceExemplarSet). Two ways of choosing them (``policy``):

* ``herding``: the paper's ConstructExemplarSet. With phi the L2-normalised features of the
  class's samples (the raw features with ``normalize=False``, as in Mammoth's iCaRL of 2020)
  and mu their mean, the k-th exemplar is

      p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||,

  each sample chosen at most once. The running mean of the exemplars then tracks the class mean
  as closely as a greedy choice can.
* ``random``: a uniformly random ordering (a baseline to compare herding with).

The choice is one array operation per exemplar over all of the class's candidates, on the device.
The stored images are the raw uint8 arrays (a few bytes per pixel), so the memory costs what the
images cost and is turned into model inputs with the learner's own normalisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cl_runner.algorithms.memories import ExemplarSets


@torch.no_grad()
def herding_order(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``m`` rows of ``features`` (n, d) chosen greedily by herding, in the order chosen.

    ``features`` are used as given (iCaRL passes L2-normalised ones). ``m`` larger than n is cut
    to n.
    """
    n = features.shape[0]
    m = min(int(m), n)
    feats = features.to(torch.float64)
    mu = feats.mean(0)
    chosen = torch.empty(m, dtype=torch.long, device=features.device)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    running = torch.zeros_like(mu)  # sum of the chosen exemplars' features
    for k in range(1, m + 1):
        # Distance between the class mean and the mean the exemplars would have with each candidate.
        dist = (mu - (running + feats) / k).pow(2).sum(1)
        dist.masked_fill_(taken, float("inf"))
        i = torch.argmin(dist)
        chosen[k - 1] = i
        taken[i] = True
        running += feats[i]
    return chosen


def l2_normalize(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


class ExemplarMemory(ExemplarSets):
    """Ordered exemplar sets of every seen class (cl_runner/algorithms/memories.py); herding on
    the device, the random order from a torch generator."""

    def __init__(self, capacity: int, policy: str = "herding", seed: int = 0, normalize: bool = True):
        super().__init__(capacity, policy, normalize)
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, features: torch.Tensor, m: int) -> np.ndarray:
        """Indices (host) of the ``m`` exemplars to keep among a class's samples, best first."""
        if self.policy == "herding":
            return herding_order(l2_normalize(features) if self.normalize else features, m).cpu().numpy()
        n = features.shape[0]
        return torch.randperm(n, generator=self.generator)[: min(m, n)].numpy()

    def state_dict(self) -> dict[str, Any]:
        return {**self.sets_state(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_sets_state(state)
        self.generator.set_state(state["generator"])
