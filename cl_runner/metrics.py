"""Continual-learning metrics from the accuracy matrix.

``R[i, j]`` is the test accuracy (percent) on task j after training on task i; entries that were
not evaluated are NaN. With T tasks:

* average accuracy  = mean_j R[T-1, j]
* forgetting (Chaudhry et al. 2018) = mean over j < T-1 of  max_{j <= l < T-1} R[l, j] - R[T-1, j]
* backward transfer (Lopez-Paz & Ranzato 2017) = mean over j < T-1 of  R[T-1, j] - R[j, j]
* forward transfer  (Lopez-Paz & Ranzato 2017) = mean over j > 0 of  R[j-1, j] - b_j,
  where b_j is the accuracy on task j of the model before any training.
"""

from __future__ import annotations

import math

import numpy as np


def _nanmean(values) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def average_accuracy(R: np.ndarray, after: int | None = None) -> float | None:
    """Mean accuracy over tasks 0..after after training task ``after`` (default: the last)."""
    R = np.asarray(R, dtype=float)
    i = R.shape[0] - 1 if after is None else after
    return _nanmean(R[i, : i + 1]) if after is not None else _nanmean(R[i, :])


def forgetting(R: np.ndarray) -> float | None:
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    if T < 2:
        return None
    return _nanmean(np.nanmax(R[j:T - 1, j]) - R[T - 1, j] for j in range(T - 1)
                    if not np.all(np.isnan(R[j:T - 1, j])))


def backward_transfer(R: np.ndarray) -> float | None:
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    if T < 2:
        return None
    return _nanmean(R[T - 1, j] - R[j, j] for j in range(T - 1))


def forward_transfer(R: np.ndarray, initial: np.ndarray | None) -> float | None:
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    if T < 2 or initial is None:
        return None
    b = np.asarray(initial, dtype=float)
    return _nanmean(R[j - 1, j] - b[j] for j in range(1, T))


def summarize(R: np.ndarray, initial: np.ndarray | None = None) -> dict:
    """All stream-level metrics of one accuracy matrix."""
    R = np.asarray(R, dtype=float)
    return {
        "avg_acc": average_accuracy(R),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, initial),
        "avg_acc_seen": [average_accuracy(R, after=i) for i in range(R.shape[0])],
    }


#: The keys of ``summarize_task_il``.
TASK_IL_KEYS = ("avg_acc_task_il", "forgetting_task_il", "bwt_task_il")


def summarize_task_il(R: np.ndarray) -> dict:
    """The summary of the task-IL accuracy matrix of a class-IL run (``training.eval_task_il``).
    No forward transfer: the untrained model is evaluated in the stream's own scenario only."""
    R = np.asarray(R, dtype=float)
    return {
        "avg_acc_task_il": average_accuracy(R),
        "forgetting_task_il": forgetting(R),
        "bwt_task_il": backward_transfer(R),
    }
