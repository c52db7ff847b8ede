"""Schemas of the importance-weighted regularisers beside EWC: online EWC, SI and MAS.

Each is also a plugin: ``algo=er algo.plugins=[si]`` adds its penalty to any algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
    # empirical: gradients at the true labels; true: at labels sampled from the model;
    # weighted: empirical, each sample's squared gradient weighted by p(y | x) (Mammoth's online EWC);
    # batch: the squared gradient of the mean loss (GEM's EWC baseline).
    fisher: str = "empirical"

    @staticmethod
    def check(algo) -> None:
        if not 0 <= algo.ewc_gamma <= 1:
            raise ConfigError(f"config key 'algo.ewc_gamma' must be in [0, 1], got {algo.ewc_gamma}.")
        _check_fisher(algo)


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


#: Estimators of the diagonal Fisher (see the torch and jax ``fisher_diagonal``).
FISHER_KINDS = ("empirical", "true", "weighted", "batch")


def _check_fisher(algo) -> None:
    if algo.fisher not in FISHER_KINDS:
        raise ConfigError(f"config key 'algo.fisher': '{algo.fisher}' is not one of {', '.join(FISHER_KINDS)}.")
