"""Algorithm schemas: each algorithm's keys, defaults, paper and supported scenarios.

These are backend-independent; implementations register under the same name per backend
(``cl_runner/backends/<backend>/algorithms/<name>.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cl_runner.config.schema import SCENARIOS, AlgoConfig
from cl_runner.errors import ConfigError
from cl_runner.registry import ALGORITHMS, PLUGINS


def register_algo(name: str, *, paper: str, scenarios=SCENARIOS, plugin: bool = False, summary: str = ""):
    """Register an algorithm's config dataclass (and, with ``plugin``, make it composable)."""

    def deco(cls):
        ALGORITHMS.register(name, paper=paper, scenarios=tuple(scenarios), summary=summary)(cls)
        if plugin:
            PLUGINS.register(name, paper=paper, summary=summary)(cls)
        return cls

    return deco


@register_algo("naive", paper="fine-tuning baseline", summary="train on each task in turn")
@dataclass
class NaiveConfig(AlgoConfig):
    name: str = "naive"


@register_algo("joint", paper="multitask upper bound",
               summary="train on the union of the tasks seen so far (or all, once)")
@dataclass
class JointConfig(AlgoConfig):
    name: str = "joint"
    # cumulative: at task t train on tasks 0..t; final: train once on all tasks at the end.
    mode: str = "cumulative"

    @staticmethod
    def check(algo) -> None:
        if algo.mode not in ("cumulative", "final"):
            raise ConfigError(f"algo.mode: '{algo.mode}' is not one of cumulative, final.")


@register_algo("ewc", paper="Kirkpatrick et al. 2017, PNAS", plugin=True,
               summary="Fisher-weighted quadratic penalty per past task")
@dataclass
class EWCConfig(AlgoConfig):
    name: str = "ewc"
    ewc_lambda: float = 1.0
    # Training samples of each task used to estimate its Fisher (null: all of them).
    fisher_samples: Optional[int] = 1024
    fisher_batch_size: int = 256
    # empirical: per-sample gradients at the true labels; true: at labels sampled from the model;
    # argmax: at the model's most likely label (Hsu et al.'s EWC); weighted: empirical with each
    # sample's squared gradient weighted by p(y | x) (Mammoth's online EWC); batch: the squared
    # gradient of the mean loss over the samples (GEM's EWC baseline); agem: A-GEM's EWC (see below).
    fisher: str = "empirical"
    # fisher: agem only (facebookresearch/agem model/model.py): during training the squared
    # gradient of each step's mini-batch loss is summed, and every fisher_update_after steps the
    # running Fisher becomes (1 - fisher_ema_decay) * F + fisher_ema_decay * sum / fisher_update_after;
    # after a task F is min-max normalised to [0, 1] over all parameters, and the penalty is
    # ewc_lambda * sum F (theta - theta*)^2 (no factor 1/2) with the latest task's F and end point
    # only (one term, overwritten after each task).
    fisher_update_after: int = 10
    fisher_ema_decay: float = 0.9

    @staticmethod
    def check(algo) -> None:
        from cl_runner.algorithms.regularization import check_fisher

        check_fisher(algo)
        if algo.fisher_samples is not None and algo.fisher_samples <= 0:
            raise ConfigError(f"algo.fisher_samples must be positive (or null for all), got {algo.fisher_samples}.")
        if algo.fisher_batch_size <= 0:
            raise ConfigError(f"algo.fisher_batch_size must be positive, got {algo.fisher_batch_size}.")
        if algo.fisher_update_after <= 0:
            raise ConfigError(f"algo.fisher_update_after must be a positive number of steps, "
                              f"got {algo.fisher_update_after}.")
        if not 0 < algo.fisher_ema_decay <= 1:
            raise ConfigError(f"algo.fisher_ema_decay must be in (0, 1], got {algo.fisher_ema_decay}.")


# Algorithms whose schemas live in their own modules (imported last: they use register_algo).
from cl_runner.algorithms import (distillation, meta_learning, mode_connectivity,  # noqa: E402,F401
                                  regularization, replay)
from cl_runner.algorithms import others  # noqa: E402,F401
from cl_runner.algorithms import naive_rehearsal  # noqa: E402,F401
