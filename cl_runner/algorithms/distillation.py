"""Schemas of the distillation methods: Learning without Forgetting (Li & Hoiem 2016/2017) and
Less-Forgetful Learning (Jung et al. 2018), and the per-task weights both backends share.

The keys beyond the papers' own (a weight per task, a rule that re-weights the task loss and the
distillation as tasks accumulate, the distillation's scale, LwF's warm-up of the new output
units) are those of the reference implementations a published number comes from; each key's
comment names the code it reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any, Optional

from cl_runner.algorithms import register_algo
from cl_runner.config.schema import AlgoConfig
from cl_runner.errors import ConfigError

#: How LwF weights the new task's cross-entropy (CE) and the distillation (KD) while training
#: task t (counted from 0), alpha_t being ``algo.alpha`` (or its entry t):
#:
#: * constant:     CE + alpha_t KD (Li & Hoiem; Mammoth models/lwf.py; Avalanche regularization.py).
#: * tasks_seen:   CE / (t + 1) + (1 - 1 / (t + 1)) alpha_t KD: the task's share 1 / (tasks seen),
#:                 as van de Ven & Tolias 2018 (GMvandeVen/continual-learning at e17b714,
#:                 train.py:258 ``rnt = 1./task``, encoder.py:137 ``rnt*predL + (1-rnt)*loss_replay``).
#: * classes_seen: (n_new / n_seen) CE + (n_old / n_seen) alpha_t KD, n counting the output units of
#:                 the previous tasks (old), of the current one (new) and of both (seen): the
#:                 lambda = n / (n + m) of Wu et al. 2019 (BiC), as mmasana/FACIL
#:                 src/approach/bic.py ``criterion`` computes it when lamb = -1.
ALPHA_RULES = ("constant", "tasks_seen", "classes_seen")

#: LwF's ``teacher_inputs``: the previous model's inputs (see LwFConfig).
TEACHER_INPUTS = ("batch", "not_aug")


def per_task_value(value, task_id: int, key: str) -> float:
    """``value`` (a number, or a list with one number per task) for task ``task_id``: Avalanche's
    convention for LwF's alpha and LfL's lambda_e (regularization.py:137-141, lfl.py:67-71),
    the entry of the task being trained."""
    if isinstance(value, Real):
        return float(value)
    return float(list(value)[task_id])


def check_per_task_value(value, key: str, num_tasks: int | None = None, minimum: float = 0.0) -> None:
    """A number, or a list of numbers (one per task when ``num_tasks`` is known), each >= minimum."""
    if isinstance(value, bool) or not isinstance(value, Real):
        try:
            values = list(value)
        except TypeError:
            values = None
        if values is None or not values or any(isinstance(v, bool) or not isinstance(v, Real) for v in values):
            raise ConfigError(f"config key '{key}' must be a number or a list of numbers (one per task), "
                              f"got {value!r}.")
        if num_tasks is not None and len(values) != num_tasks:
            raise ConfigError(f"config key '{key}' lists {len(values)} values but the stream has {num_tasks} "
                              f"tasks; give one value per task (the first task's is not used: there is no "
                              f"previous model yet), or a single number.")
    else:
        values = [value]
    if any(v < minimum for v in values):
        raise ConfigError(f"config key '{key}' must be >= {minimum:g}, got {value!r}.")


def lwf_loss_weights(rule: str, task_id: int, n_old: int, n_seen: int) -> tuple[float, float]:
    """(weight of the task loss, weight of alpha_t KD) while training task ``task_id`` under ``rule``
    (ALPHA_RULES); ``n_old`` / ``n_seen``: output units of the previous tasks / of the tasks so far."""
    if rule == "constant" or task_id == 0:
        return 1.0, 1.0
    if rule == "tasks_seen":
        share = 1.0 / (task_id + 1)
        return share, 1.0 - share
    if rule == "classes_seen":
        return (n_seen - n_old) / n_seen, n_old / n_seen
    raise ConfigError(f"algo.alpha_rule: '{rule}' is not one of {', '.join(ALPHA_RULES)}.")


@register_algo("lwf", paper="Li & Hoiem 2017, TPAMI (Learning without Forgetting)",
               summary="distil the previous model's outputs on the new data")
@dataclass
class LwFConfig(AlgoConfig):
    name: str = "lwf"
    # Weight of the distillation loss (the paper's lambda_o): a number, or a list with one value per
    # task (entry t weights the distillation while task t trains; Avalanche's convention).
    alpha: Any = 1.0
    # constant | tasks_seen | classes_seen: how the task loss and alpha * KD are weighted as tasks
    # accumulate (ALPHA_RULES above: constant is the paper's; tasks_seen van de Ven & Tolias 2018;
    # classes_seen BiC / FACIL).
    alpha_rule: str = "constant"
    # Softmax temperature of the distillation (the paper's T = 2).
    temperature: float = 2.0
    # Multiply the distillation by T^2 (Hinton et al. 2015; van de Ven & Tolias's utils.py loss_fn_kd).
    temperature_squared: bool = False
    # sum: per sample -sum_j y'_j log yhat'_j over the distilled units (the paper, Mammoth, Avalanche);
    # mean: that sum divided by the number of units of the softmax (van de Ven & Tolias's loss_fn_kd
    # at e17b714 averages over units as well as samples).
    kd_reduction: str = "sum"
    # Class-IL: old: the softmax of the current model runs over the previous tasks' units (Mammoth,
    # Avalanche); seen: over every unit seen so far, the current task's included, with target
    # probability 0 on the current task's units (van de Ven & Tolias, train.py:146 + loss_fn_kd).
    distill_units: str = "old"
    # Task-IL: sum (the paper, Avalanche) or mean (van de Ven & Tolias, encoder.py:136) of the
    # previous tasks' heads' distillation terms.
    head_reduction: str = "sum"
    # Class-IL: all: the task's cross-entropy over every output unit; seen: over the units of the
    # classes seen so far (Mammoth lwf.py observe ``outputs[:, :n_seen_classes]``; van de Ven & Tolias
    # ``active_classes``).
    ce_units: str = "all"
    # Before each task after the first, train only the new task's output units for this many
    # epochs on the task's data with plain SGD (no momentum, no weight decay), the rest of the
    # network frozen and in eval mode: Mammoth models/lwf.py begin_task (there: the task's own
    # number of epochs at the task's lr); the paper's warm-up step. 0: none.
    warmup_epochs: int = 0
    # The warm-up's learning rate (null: optimizer.lr, as Mammoth).
    warmup_lr: Optional[float] = None
    # What the previous model sees. batch: the batch as trained (after benchmark.augment and
    # normalisation). not_aug: the same images before augmentation and before normalisation
    # (pixel / 255), as Mammoth's begin_task records its logits: on ``not_aug_img``, whose
    # ``not_aug_transform`` is ToTensor() alone, while the network trains on normalised crops
    # (datasets/seq_cifar10.py; models/lwf.py begin_task). Equal to batch on an unnormalised
    # stream without augmentation.
    teacher_inputs: str = "batch"

    @staticmethod
    def check(algo) -> None:
        check_per_task_value(algo.alpha, "algo.alpha")
        if algo.temperature <= 0:
            raise ConfigError(f"config key 'algo.temperature' must be positive, got {algo.temperature}.")
        for key, choices in (("alpha_rule", ALPHA_RULES), ("kd_reduction", ("sum", "mean")),
                             ("distill_units", ("old", "seen")), ("head_reduction", ("sum", "mean")),
                             ("ce_units", ("all", "seen")), ("teacher_inputs", TEACHER_INPUTS)):
            if getattr(algo, key) not in choices:
                raise ConfigError(f"algo.{key}: '{getattr(algo, key)}' is not one of {', '.join(choices)}.")
        if algo.warmup_epochs < 0:
            raise ConfigError(f"config key 'algo.warmup_epochs' must be >= 0, got {algo.warmup_epochs}.")
        if algo.warmup_lr is not None and algo.warmup_lr <= 0:
            raise ConfigError(f"config key 'algo.warmup_lr' must be positive (or null for optimizer.lr), "
                              f"got {algo.warmup_lr}.")


def check_lwf_stream(cfg, stream) -> None:
    """The LwF keys that depend on the stream (its scenario and number of tasks)."""
    check_per_task_value(cfg.alpha, "algo.alpha", stream.num_tasks)
    scenario = stream.scenario
    if cfg.distill_units == "seen" and scenario != "class_il":
        raise ConfigError(f"algo.distill_units=seen is defined for class-IL streams (this one is {scenario}: "
                          "each task's softmax already covers its own units); set algo.distill_units=old.")
    if cfg.ce_units == "seen" and scenario != "class_il":
        raise ConfigError(f"algo.ce_units=seen is defined for class-IL streams (this one is {scenario}); "
                          "set algo.ce_units=all.")
    if cfg.head_reduction == "mean" and scenario != "task_il":
        raise ConfigError(f"algo.head_reduction=mean averages the heads of a task-IL stream (this one is "
                          f"{scenario}, with one softmax); set algo.head_reduction=sum.")
    if cfg.alpha_rule == "classes_seen" and scenario == "domain_il":
        raise ConfigError("algo.alpha_rule=classes_seen weights the task loss by the share of new output "
                          "units, and a domain-IL task brings none (its weight would be 0); use "
                          "algo.alpha_rule=tasks_seen or constant.")
    if cfg.warmup_epochs and scenario == "domain_il":
        raise ConfigError("algo.warmup_epochs trains the new task's output units, and a domain-IL task "
                          "brings none (every task uses all of them); set algo.warmup_epochs=0.")


#: LfL's feature distance, per sample, averaged over the batch (f: the features fed to the output
#: layer, D of them): half_sq: 1/2 ||f - f_old||^2 (the paper's L_e); mse: ||f - f_old||^2 / D
#: (Avalanche plugins/lfl.py:36 ``mse_loss`` and SequeL's ``F.mse_loss`` / ``jnp.mean``, which
#: also average over the D units). The same lambda_e is 2 / D times stronger with half_sq than
#: with mse: lambda_e(half_sq) = 2 * lambda_e(mse) / D gives the same loss.
FEATURE_DISTANCES = ("half_sq", "mse")


@register_algo("lfl", paper="Jung et al. 2018, AAAI (Less-forgetful learning for domain expansion in deep "
               "neural networks)", plugin=True,
               summary="keep the penultimate features close to the previous model's; old output units frozen")
@dataclass
class LFLConfig(AlgoConfig):
    name: str = "lfl"
    # Weight of the feature loss (the paper's lambda_e; lambda_t = 1): a number, or a list with one
    # value per task (entry t while task t trains; Avalanche's convention). Its scale depends on
    # feature_distance: with half_sq, Avalanche's / SequeL's lambda_e becomes 2 * lambda_e / D (D the
    # feature width; D = 100 for the MLP 2x100: divide theirs by 50). 0.1 (half_sq) is measured on
    # 5-task Permuted MNIST (MLP 2x100, lr 0.1): with 1 the new tasks are not learnt any more (the
    # features may hardly move and the output layer is frozen).
    lambda_e: Any = 0.1
    # half_sq: 1/2 ||f(x) - f_old(x)||^2 (the paper); mse: the mean over the feature units of
    # (f(x) - f_old(x))^2 (Avalanche, SequeL). Both averaged over the batch.
    feature_distance: str = "half_sq"
    # Freeze the output units of the previous tasks (the paper freezes the softmax layer).
    freeze_head: bool = True

    @staticmethod
    def check(algo) -> None:
        check_per_task_value(algo.lambda_e, "algo.lambda_e")
        if algo.feature_distance not in FEATURE_DISTANCES:
            raise ConfigError(f"algo.feature_distance: '{algo.feature_distance}' is not one of "
                              f"{', '.join(FEATURE_DISTANCES)}.")
