"""Schemas of the importance-weighted regularisers beside EWC: online EWC, SI and MAS.

Each is also a plugin: ``algo=er algo.plugins=[si]`` adds its penalty to any algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from cl_runner.algorithms import register_algo
from cl_runner.config.schema import AlgoConfig
from cl_runner.errors import ConfigError


@register_algo("ewc_online", paper="Schwarz et al. 2018, ICML (Progress & Compress: online EWC)",
               plugin=True, summary="one running Fisher F <- gamma F + F_t, anchored at the latest task")
@dataclass
class OnlineEWCConfig(AlgoConfig):
    name: str = "ewc_online"
    # Penalty (ewc_lambda / 2) * sum_i F_i (theta_i - theta*_i)^2.
    ewc_lambda: float = 1.0
    # Decay of the running Fisher: F <- ewc_gamma * F + F_t (1: no forgetting of old Fishers).
    ewc_gamma: float = 1.0
    # Training samples of each task used to estimate its Fisher (null: all of them).
    fisher_samples: Optional[int] = 1024
    fisher_batch_size: int = 256
    # empirical: gradients at the true labels; true: at labels sampled from the model; argmax: at
    # the model's most likely label (Hsu et al.'s EWC); weighted: empirical, each sample's squared
    # gradient weighted by p(y | x) (Mammoth's online EWC); batch: the squared gradient of the mean
    # loss (GEM's EWC baseline). (A-GEM's estimator, fisher: agem, is algo=ewc's: it already keeps
    # one running Fisher and one anchor.)
    fisher: str = "empirical"

    @staticmethod
    def check(algo) -> None:
        if not 0 <= algo.ewc_gamma <= 1:
            raise ConfigError(f"config key 'algo.ewc_gamma' must be in [0, 1], got {algo.ewc_gamma}.")
        if algo.fisher == "agem":
            raise ConfigError("algo=ewc_online does not take algo.fisher=agem: A-GEM's EWC keeps a single running, "
                              "normalised Fisher and a single anchor itself; use algo=ewc algo.fisher=agem.")
        check_fisher(algo)


@register_algo("si", paper="Zenke et al. 2017, ICML (Synaptic Intelligence)", plugin=True,
               summary="path-integral importance accumulated over the training trajectory")
@dataclass
class SIConfig(AlgoConfig):
    name: str = "si"
    # Penalty si_c * sum_i Omega_i (theta_i - theta*_i)^2 (the paper's c; 0.1 for Permuted MNIST).
    si_c: float = 0.1
    # Damping xi in Omega += w / ((theta_end - theta_start)^2 + xi) (0.1 for Permuted MNIST).
    si_xi: float = 0.1

    @staticmethod
    def check(algo) -> None:
        if algo.si_xi <= 0:
            raise ConfigError(f"config key 'algo.si_xi' must be positive, got {algo.si_xi}.")


@register_algo("mas", paper="Aljundi et al. 2018, ECCV (Memory Aware Synapses)", plugin=True,
               summary="importance = mean |gradient of the squared L2 norm of the outputs|")
@dataclass
class MASConfig(AlgoConfig):
    name: str = "mas"
    # Penalty mas_lambda * sum_i Omega_i (theta_i - theta*_i)^2 (the paper's lambda).
    mas_lambda: float = 1.0
    # Training samples of each task the importance is averaged over (null: all of them).
    mas_samples: Optional[int] = None
    mas_batch_size: int = 256
    # per_sample: Omega = 1/N sum_k |d ||f(x_k)||^2 / d theta| (the paper's per-sample importance);
    # batch_mean: Hsu et al.'s (Continual-Learning-Benchmark agents/regularization.py, MAS): for
    # each mini-batch B of mas_batch_size samples (in a random order), |d/d theta of the mean of
    # f(x)^2 over the batch and the output units|, averaged over the batches. The two scales are
    # not a constant factor apart: batch_mean is at most per_sample / C (C: output units per sample,
    # the task's units in task-IL), less where per-sample gradients differ in sign. A reference
    # mas_lambda / reg_coef is on the scale of the estimator it was tuned with: Hsu's reg_coef
    # goes with batch_mean; per_sample needs a smaller mas_lambda for the same penalty.
    mas_importance: str = "per_sample"

    @staticmethod
    def check(algo) -> None:
        if algo.mas_importance not in MAS_IMPORTANCES:
            raise ConfigError(f"config key 'algo.mas_importance': '{algo.mas_importance}' is not one of "
                              f"{', '.join(MAS_IMPORTANCES)}.")
        if algo.mas_samples is not None and algo.mas_samples <= 0:
            raise ConfigError(f"config key 'algo.mas_samples' must be positive (or null for all), "
                              f"got {algo.mas_samples}.")
        if algo.mas_batch_size <= 0:
            raise ConfigError(f"config key 'algo.mas_batch_size' must be positive, got {algo.mas_batch_size}.")


#: Estimators of the diagonal Fisher (see the torch and jax ``fisher_diagonal``; ``agem`` is
#: estimated during training, see ewc.py's ``AGEMFisherPart``).
FISHER_KINDS = ("empirical", "true", "argmax", "weighted", "batch", "agem")

#: MAS importance estimators (see the torch and jax ``mas_importance``).
MAS_IMPORTANCES = ("per_sample", "batch_mean")


def check_fisher(algo) -> None:
    if algo.fisher not in FISHER_KINDS:
        raise ConfigError(f"config key 'algo.fisher': '{algo.fisher}' is not one of {', '.join(FISHER_KINDS)}.")


def mas_sample_indices(seed: int, task_id: int, n: int, samples, kind: str) -> np.ndarray | None:
    """The indices (of the task's n training samples) the importance is computed on, the same on
    both backends: ``samples`` of them drawn from (seed, task id) (null: all), in index order for
    the per-sample estimator (whose result does not depend on the order), in a random order for
    ``batch_mean`` (the reference's shuffled loader). None: all, in order."""
    k = n if samples is None else min(n, int(samples))
    rng = np.random.default_rng([seed, task_id, 23])
    idx = np.sort(rng.choice(n, size=k, replace=False)) if k < n else None
    if kind == "batch_mean":
        idx = rng.permutation(n if idx is None else idx)
    return None if idx is None else idx.astype(np.int64)
