"""The learning rate of every task and epoch, the same on every backend.

``optimizer.lr`` / ``lr_decay`` / ``lr_decay_offset`` / ``lr_min`` give each task's rate
(:func:`task_lr`); ``optimizer.schedule`` changes it from epoch to epoch inside the task
(:func:`epoch_lr`). A backend sets the result at the start of every epoch: on the JAX backend the
rate is a value in the optimizer state, so a schedule costs no recompilation.
"""

from __future__ import annotations

import math


def task_lr(cfg, task_index: int) -> float:
    """The rate of task ``task_index`` (from 0): max(lr * lr_decay ** (t + lr_decay_offset), lr_min)."""
    exponent = task_index + int(getattr(cfg, "lr_decay_offset", 0) or 0)
    return max(cfg.lr * cfg.lr_decay ** exponent, cfg.lr_min)


def has_schedule(schedule) -> bool:
    """Whether ``optimizer.schedule`` changes the rate inside a task at all."""
    return schedule is not None and (schedule.name != "constant" or int(schedule.warmup_epochs) > 0)


def epoch_lr(base: float, schedule, epoch: int, epochs: int) -> float:
    """The rate of epoch ``epoch`` (from 0) of a task of ``epochs`` epochs whose rate is ``base``.

    * epoch e < warmup_epochs W: base * (warmup_start + (1 - warmup_start) * e / W);
    * multistep: base * gamma ** (number of milestones <= e), as torch.optim.lr_scheduler.
      MultiStepLR after e per-epoch steps;
    * cosine: eta_min + (base - eta_min) * (1 + cos(pi * (e - W) / (epochs - W))) / 2, as
      torch's CosineAnnealingLR (T_max = epochs - W) after e - W per-epoch steps;
    * constant: base.
    """
    if schedule is None:
        return base
    warmup = int(schedule.warmup_epochs)
    if epoch < warmup:
        start = float(schedule.warmup_start)
        return base * (start + (1.0 - start) * epoch / warmup)
    if schedule.name == "multistep":
        passed = sum(1 for m in schedule.milestones if int(m) <= epoch)
        return base * float(schedule.gamma) ** passed
    if schedule.name == "cosine":
        span = epochs - warmup
        if span <= 0:
            return base
        eta_min = float(schedule.eta_min)
        return eta_min + (base - eta_min) * (1.0 + math.cos(math.pi * (epoch - warmup) / span)) / 2.0
    return base


SCHEDULES = ("constant", "multistep", "cosine")
RESETS = ("never", "task", "epoch")


def check_optimizer(cfg, one_of, error) -> None:
    """Checks of the optimizer keys read here (called by the config validation)."""
    one_of("optimizer.reset", cfg.reset, RESETS)
    s = cfg.schedule
    one_of("optimizer.schedule.name", s.name, SCHEDULES)
    if int(cfg.lr_decay_offset) < 0:
        raise error(f"config key 'optimizer.lr_decay_offset' must be 0 or more, got {cfg.lr_decay_offset}.")
    milestones = [int(m) for m in s.milestones]
    if any(m < 0 for m in milestones) or milestones != sorted(set(milestones)):
        raise error(f"config key 'optimizer.schedule.milestones' must be distinct epochs (0 or more) in "
                    f"ascending order, got {list(s.milestones)}.")
    if s.gamma <= 0:
        raise error(f"config key 'optimizer.schedule.gamma' must be positive, got {s.gamma}.")
    if s.eta_min < 0:
        raise error(f"config key 'optimizer.schedule.eta_min' must be 0 or more, got {s.eta_min}.")
    if int(s.warmup_epochs) < 0:
        raise error(f"config key 'optimizer.schedule.warmup_epochs' must be 0 or more, got {s.warmup_epochs}.")
    if not 0 <= s.warmup_start <= 1:
        raise error(f"config key 'optimizer.schedule.warmup_start' must be in [0, 1], got {s.warmup_start}.")
