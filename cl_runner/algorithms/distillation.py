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
