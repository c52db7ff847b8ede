"""Schema of Learning without Forgetting (Li & Hoiem 2016/2017)."""

from __future__ import annotations

from dataclasses import dataclass

from cl_runner.algorithms import register_algo
from cl_runner.config.schema import AlgoConfig
from cl_runner.errors import ConfigError


@register_algo("lwf", paper="Li & Hoiem 2017, TPAMI (Learning without Forgetting)",
               summary="distil the previous model's outputs on the new data")
@dataclass
class LwFConfig(AlgoConfig):
    name: str = "lwf"
    # Weight of the distillation loss (the paper's lambda_o).
    alpha: float = 1.0
    # Softmax temperature of the distillation (the paper's T = 2).
    temperature: float = 2.0

    @staticmethod
    def check(algo) -> None:
        if algo.temperature <= 0:
            raise ConfigError(f"config key 'algo.temperature' must be positive, got {algo.temperature}.")


@register_algo("lfl", paper="Jung et al. 2018, AAAI (Less-forgetful learning for domain expansion in deep "
               "neural networks)", plugin=True,
               summary="keep the penultimate features close to the previous model's; old output units frozen")
@dataclass
class LFLConfig(AlgoConfig):
    name: str = "lfl"
    # Weight of the feature loss (1/2) ||f(x) - f_old(x)||^2 (the paper's lambda_e; lambda_t = 1).
    # 0.1 is measured on 5-task Permuted MNIST (MLP 2x100, lr 0.1): with 1 the new tasks are not
    # learnt any more (the features may hardly move and the output layer is frozen).
    lambda_e: float = 0.1
    # Freeze the output units of the previous tasks (the paper freezes the softmax layer).
    freeze_head: bool = True

    @staticmethod
    def check(algo) -> None:
        if algo.lambda_e < 0:
            raise ConfigError(f"config key 'algo.lambda_e' must be non-negative, got {algo.lambda_e}.")
