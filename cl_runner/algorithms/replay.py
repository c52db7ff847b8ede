"""Schemas of the replay methods: ER, DER, DER++, A-GEM, GEM, iCaRL and GDumb.

ER, DER, DER++ and A-GEM have the same memory keys: ``mem_policy`` (reservoir | class_balanced |
ring | class_ring), ``mem_size`` (total slots) or ``mem_per_task`` (slots per task; it wins when
both are set), ``mem_per_class`` (class_ring only: slots per class of each task), and
``replay_batch_size`` (samples drawn from the memory per step; null: the stream batch size).
GEM (a ring per task), iCaRL (ordered exemplar sets per class) and GDumb (a greedy
class-balanced memory) keep memories of their own kind, with the keys their papers use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from cl_runner.algorithms import register_algo
from cl_runner.config.schema import AlgoConfig
from cl_runner.errors import ConfigError

MEMORY_POLICIES = ("reservoir", "class_balanced", "ring", "class_ring")


def check_memory(algo) -> None:
    if algo.mem_policy not in MEMORY_POLICIES:
        raise ConfigError(f"config key 'algo.mem_policy': '{algo.mem_policy}' is not one of "
                          f"{', '.join(MEMORY_POLICIES)}.")
    if algo.mem_policy == "class_ring":
        if algo.mem_per_class is None:
            raise ConfigError("algo.mem_policy=class_ring keeps the last algo.mem_per_class samples of "
                              "each class of each task: set algo.mem_per_class (e.g. 13).")
    elif algo.mem_per_class is not None:
        raise ConfigError(f"config key 'algo.mem_per_class' ({algo.mem_per_class}) is read only with "
                          f"algo.mem_policy=class_ring (now '{algo.mem_policy}'): set algo.mem_policy=class_ring "
                          "or algo.mem_per_class=null.")
    elif algo.mem_size is None and algo.mem_per_task is None:
        raise ConfigError("set the memory size: algo.mem_size (total) or algo.mem_per_task.")
    for key in ("mem_size", "mem_per_task", "mem_per_class", "replay_batch_size"):
        value = getattr(algo, key)
        if value is not None and value <= 0:
            raise ConfigError(f"config key 'algo.{key}' must be a positive integer or null, got {value}.")


@register_algo("er", paper="Chaudhry et al. 2019, arXiv:1902.10486 (ER, tiny episodic memories)",
               summary="each step trains on the stream batch concatenated with a memory batch")
@dataclass
class ERConfig(AlgoConfig):
    name: str = "er"
    # reservoir (over the whole stream) | class_balanced (equal slots per class) | ring (FIFO per task)
    # | class_ring (FIFO per class of each task).
    mem_policy: str = "reservoir"
    # Total memory slots (null: use mem_per_task).
    mem_size: Optional[int] = 200
    # Slots per task (overrides mem_size when set).
    mem_per_task: Optional[int] = None
    # class_ring only: slots of each class of each task (its latest samples).
    mem_per_class: Optional[int] = None
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
    mem_per_class: Optional[int] = None
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
    mem_per_class: Optional[int] = None
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
    # ring: each task keeps its last mem_per_task samples; class_ring: each class of each task its
    # last mem_per_class samples (the reference code's episodic memory).
    mem_policy: str = "ring"
    mem_size: Optional[int] = None
    # Slots per task (250 in the paper's MNIST experiments).
    mem_per_task: Optional[int] = 250
    # class_ring only: slots per class of each task (the reference's 25 on MNIST, 13 on CIFAR).
    mem_per_class: Optional[int] = None
    # Memory samples the reference gradient is computed on (256 in the paper's MNIST experiments).
    replay_batch_size: Optional[int] = 256

    check = staticmethod(check_memory)


# -- GEM, iCaRL and GDumb ---------------------------------------------------------------------------

def _positive(algo, *keys) -> None:
    for key in keys:
        value = getattr(algo, key)
        if value is None or value <= 0:
            raise ConfigError(f"config key 'algo.{key}' must be positive, got {value}.")


@register_algo("gem", paper="Lopez-Paz & Ranzato 2017, NeurIPS (Gradient Episodic Memory)",
               summary="project the gradient (a QP) so no past task's memory loss increases")
@dataclass
class GEMConfig(AlgoConfig):
    name: str = "gem"
    # Samples kept per task: a ring holding each task's latest samples (256 in the paper's MNIST runs).
    mem_per_task: int = 256
    # The paper's margin gamma: every dual variable is at least this (0.5 in the paper's runs).
    memory_strength: float = 0.5

    @staticmethod
    def check(algo) -> None:
        _positive(algo, "mem_per_task")
        if algo.memory_strength < 0:
            raise ConfigError(f"config key 'algo.memory_strength' must be >= 0, got {algo.memory_strength}.")


@register_algo("icarl", paper="Rebuffi et al. 2017, CVPR (iCaRL)", scenarios=("class_il", "task_il"),
               summary="herding exemplars, sigmoid distillation loss, nearest-mean-of-exemplars classifier")
@dataclass
class ICaRLConfig(AlgoConfig):
    name: str = "icarl"
    # K: exemplars kept in all (the paper's 2000); each seen class keeps K // classes seen.
    mem_size: int = 2000
    # herding (the paper's) | random: how each class's exemplars are chosen.
    mem_policy: str = "herding"

    @staticmethod
    def check(algo) -> None:
        _positive(algo, "mem_size")
        if algo.mem_policy not in ("herding", "random"):
            raise ConfigError(f"config key 'algo.mem_policy': '{algo.mem_policy}' is not one of herding, "
                              f"random (iCaRL keeps ordered exemplar sets per class).")


@register_algo("gdumb", paper="Prabhu et al. 2020, ECCV (GDumb)",
               summary="greedy class-balanced memory; a model trained from scratch on it after each task")
@dataclass
class GDumbConfig(AlgoConfig):
    name: str = "gdumb"
    # Memory slots (the paper's MNIST runs: 300 and 500).
    mem_size: int = 500
    # Retraining from scratch after each task: epochs over the memory (the paper's MNIST: 128),
    # batch size (16), SGD with momentum 0.9, weight decay 1e-6, gradient-norm clipping at 10.
    epochs: int = 128
    batch_size: int = 16
    lr: float = 0.05
    # sgdr: one warm-up epoch at lr / 10, then cosine cycles of 1, 2, 4, ... epochs from lr to
    # lr_min (the paper's); constant: lr throughout.
    lr_schedule: str = "sgdr"
    lr_min: float = 0.0005
    momentum: float = 0.9
    weight_decay: float = 1e-6
    # null: no clipping.
    clip_grad_norm: Optional[float] = 10.0

    @staticmethod
    def check(algo) -> None:
        _positive(algo, "mem_size", "epochs", "batch_size", "lr")
        if algo.lr_schedule not in ("sgdr", "constant"):
            raise ConfigError(f"config key 'algo.lr_schedule': '{algo.lr_schedule}' is not one of sgdr, constant.")
        if algo.lr_min < 0 or algo.lr_min > algo.lr:
            raise ConfigError(f"config key 'algo.lr_min' must be in [0, algo.lr={algo.lr}], got {algo.lr_min}.")
        if algo.clip_grad_norm is not None and algo.clip_grad_norm <= 0:
            raise ConfigError(f"config key 'algo.clip_grad_norm' must be positive or null, got {algo.clip_grad_norm}.")


# -- GEM's quadratic program (host side, shared by both backends) -------------------------------

def _solve_qp():
    try:
        import quadprog
    except ImportError:  # pragma: no cover - quadprog is a declared dependency
        raise ConfigError("algo=gem solves a quadratic program with the quadprog package, which is not "
                          "installed: pip install quadprog (or pip install -e '.[algos]').") from None
    return quadprog.solve_qp


def gem_dual(gram: np.ndarray, dots: np.ndarray, margin: float) -> np.ndarray:
    """v minimising 1/2 v^T P v + q^T v subject to v >= margin (P = ``gram``, q = ``dots``), in
    float64 with quadprog.

    quadprog needs P positive definite; past-task gradients are linearly independent in practice,
    and when they are not, a ridge growing from 1e-10 of P's mean diagonal is added until the
    factorisation succeeds (it loosens each constraint by ridge * v_k). Both backends call this."""
    solve_qp = _solve_qp()
    gram = np.asarray(gram, np.float64)
    dots = np.asarray(dots, np.float64)
    t = len(dots)
    P = 0.5 * (gram + gram.T)
    scale = max(float(np.trace(P)) / t, np.finfo(np.float64).tiny)
    identity = np.eye(t)
    for ridge in (0.0, 1e-10, 1e-7, 1e-4, 1e-2):
        try:
            return solve_qp(P + ridge * scale * identity, -dots, identity, np.full(t, float(margin)))[0]
        except ValueError:  # "matrix G is not positive definite"
            continue
    raise ValueError("GEM's quadratic program could not be solved: the past tasks' gradients are degenerate")
