"""Schemas of the replay methods: ER, DER, DER++ and A-GEM.

Every replay method has the same memory keys: ``mem_policy`` (reservoir | class_balanced |
ring), ``mem_size`` (total slots) or ``mem_per_task`` (slots per task; it wins when both are set),
and ``replay_batch_size`` (samples drawn from the memory per step; null: the stream batch size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cl_runner.algorithms import register_algo
from cl_runner.config.schema import AlgoConfig
from cl_runner.errors import ConfigError

MEMORY_POLICIES = ("reservoir", "class_balanced", "ring")


def check_memory(algo) -> None:
    if algo.mem_policy not in MEMORY_POLICIES:
        raise ConfigError(f"config key 'algo.mem_policy': '{algo.mem_policy}' is not one of "
                          f"{', '.join(MEMORY_POLICIES)}.")
    if algo.mem_size is None and algo.mem_per_task is None:
        raise ConfigError("set the memory size: algo.mem_size (total) or algo.mem_per_task.")
    for key in ("mem_size", "mem_per_task", "replay_batch_size"):
        value = getattr(algo, key)
        if value is not None and value <= 0:
            raise ConfigError(f"config key 'algo.{key}' must be a positive integer or null, got {value}.")


@register_algo("er", paper="Chaudhry et al. 2019, arXiv:1902.10486 (ER, tiny episodic memories)",
               summary="each step trains on the stream batch concatenated with a memory batch")
@dataclass
class ERConfig(AlgoConfig):
    name: str = "er"
    # reservoir (over the whole stream) | class_balanced (equal slots per class) | ring (FIFO per task).
    mem_policy: str = "reservoir"
    # Total memory slots (null: use mem_per_task).
    mem_size: Optional[int] = 200
    # Slots per task (overrides mem_size when set).
    mem_per_task: Optional[int] = None
    # Memory samples concatenated to each stream batch (null: the stream batch size).
    replay_batch_size: Optional[int] = None

    check = staticmethod(check_memory)


@register_algo("der", paper="Buzzega et al. 2020, NeurIPS (Dark Experience Replay)",
               summary="reservoir memory of logits; MSE between current and stored logits")
@dataclass
class DERConfig(AlgoConfig):
    name: str = "der"
    mem_policy: str = "reservoir"
    mem_size: Optional[int] = 200
    mem_per_task: Optional[int] = None
    # Memory samples per step (null: the stream batch size).
    replay_batch_size: Optional[int] = None
    # Weight of the logit-matching term (the paper's seq-MNIST value for a 200-sample buffer).
    alpha: float = 0.2

    check = staticmethod(check_memory)


@register_algo("derpp", paper="Buzzega et al. 2020, NeurIPS (DER++)",
               summary="DER plus cross-entropy on a second memory batch")
@dataclass
class DERPPConfig(AlgoConfig):
    name: str = "derpp"
    mem_policy: str = "reservoir"
    mem_size: Optional[int] = 200
    mem_per_task: Optional[int] = None
    # Memory samples per step, for each of the two memory batches (null: the stream batch size).
    replay_batch_size: Optional[int] = None
    # Weights of the logit-matching and the label terms (seq-MNIST, 200-sample buffer).
    alpha: float = 0.2
    beta: float = 1.0

    check = staticmethod(check_memory)


@register_algo("agem", paper="Chaudhry et al. 2019, ICLR (A-GEM)",
               summary="project the gradient when it conflicts with a memory reference gradient")
@dataclass
class AGEMConfig(AlgoConfig):
    name: str = "agem"
    # ring: each task keeps its last mem_per_task samples (the paper's per-task episodic memory).
    mem_policy: str = "ring"
    mem_size: Optional[int] = None
    # Slots per task (250 in the paper's MNIST experiments).
    mem_per_task: Optional[int] = 250
    # Memory samples the reference gradient is computed on (256 in the paper's MNIST experiments).
    replay_batch_size: Optional[int] = 256

    check = staticmethod(check_memory)
