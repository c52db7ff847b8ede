"""Continual-learning metrics on hand-written accuracy matrices (every number worked out below)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from cl_runner import metrics

NAN = float("nan")

# R[i, j]: accuracy on task j after training task i.
R = np.array([
    [90.0, 20.0, 10.0],
    [95.0, 85.0, 15.0],
    [60.0, 75.0, 80.0],
])
# Accuracy of the untrained model on each task.
B = np.array([10.0, 12.0, 9.0])


def test_average_accuracy():
    # Last row: (60 + 75 + 80) / 3 = 215 / 3 = 71.666...
    assert metrics.average_accuracy(R) == pytest.approx(215 / 3)
    # After task 0: R[0, 0] = 90.  After task 1: (95 + 85) / 2 = 90.  After task 2: 215 / 3.
    assert metrics.average_accuracy(R, after=0) == pytest.approx(90.0)
    assert metrics.average_accuracy(R, after=1) == pytest.approx(90.0)
    assert metrics.average_accuracy(R, after=2) == pytest.approx(215 / 3)


def test_forgetting_uses_the_best_earlier_accuracy():
    # j = 0: max(R[0,0], R[1,0]) = max(90, 95) = 95;  95 - R[2,0] = 95 - 60 = 35
    # j = 1: max(R[1,1]) = 85;                         85 - R[2,1] = 85 - 75 = 10
    # mean: (35 + 10) / 2 = 22.5
    assert metrics.forgetting(R) == pytest.approx(22.5)


def test_backward_transfer_uses_the_accuracy_just_after_learning():
    # j = 0: R[2,0] - R[0,0] = 60 - 90 = -30
    # j = 1: R[2,1] - R[1,1] = 75 - 85 = -10
    # mean: -20  (differs from -forgetting because task 0 improved after task 1)
    assert metrics.backward_transfer(R) == pytest.approx(-20.0)


def test_forward_transfer():
    # j = 1: R[0,1] - b_1 = 20 - 12 = 8
    # j = 2: R[1,2] - b_2 = 15 - 9  = 6
    # mean: 7
    assert metrics.forward_transfer(R, B) == pytest.approx(7.0)
    assert metrics.forward_transfer(R, None) is None


def test_summarize():
    s = metrics.summarize(R, B)
    assert s["avg_acc"] == pytest.approx(215 / 3)
    assert s["forgetting"] == pytest.approx(22.5)
    assert s["bwt"] == pytest.approx(-20.0)
    assert s["fwt"] == pytest.approx(7.0)
    assert s["avg_acc_seen"] == pytest.approx([90.0, 90.0, 215 / 3])
    assert all(isinstance(s[k], float) for k in ("avg_acc", "forgetting", "bwt", "fwt"))


def test_unevaluated_future_tasks():
    # eval_on=seen: tasks not yet trained are not evaluated (upper triangle NaN).
    Rs = np.array([
        [90.0, NAN, NAN],
        [95.0, 85.0, NAN],
        [60.0, 75.0, 80.0],
    ])
    s = metrics.summarize(Rs, B)
    assert s["avg_acc"] == pytest.approx(215 / 3)   # the last row is complete
    assert s["forgetting"] == pytest.approx(22.5)   # uses only the lower triangle
    assert s["bwt"] == pytest.approx(-20.0)
    assert s["fwt"] is None                          # R[j-1, j] is never known
    assert s["avg_acc_seen"] == pytest.approx([90.0, 90.0, 215 / 3])


def test_nan_entries_are_left_out():
    Rn = R.copy()
    Rn[2, 1] = NAN
    # avg_acc: (60 + 80) / 2 = 70
    assert metrics.average_accuracy(Rn) == pytest.approx(70.0)
    # forgetting: j = 0 gives 35; j = 1 has no final accuracy and is left out -> 35
    assert metrics.forgetting(Rn) == pytest.approx(35.0)
    # bwt: j = 0 gives -30; j = 1 left out -> -30
    assert metrics.backward_transfer(Rn) == pytest.approx(-30.0)


def test_column_never_evaluated_before_the_end():
    Rn = R.copy()
    Rn[0, 0] = Rn[1, 0] = NAN
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "All-NaN slice" warning either
        # forgetting: j = 0 has no earlier accuracy, left out; j = 1 gives 10 -> 10
        assert metrics.forgetting(Rn) == pytest.approx(10.0)
        # bwt: j = 0: 60 - NaN left out; j = 1: -10 -> -10
        assert metrics.backward_transfer(Rn) == pytest.approx(-10.0)


def test_all_nan_gives_none():
    Rn = np.full((3, 3), NAN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = metrics.summarize(Rn, np.full(3, NAN))
    assert s["avg_acc"] is None and s["forgetting"] is None
    assert s["bwt"] is None and s["fwt"] is None
    assert s["avg_acc_seen"] == [None, None, None]


def test_single_task():
    s = metrics.summarize(np.array([[42.0]]), np.array([10.0]))
    assert s["avg_acc"] == pytest.approx(42.0)
    assert s["forgetting"] is None and s["bwt"] is None and s["fwt"] is None


def test_no_forgetting_when_accuracy_only_rises():
    Rup = np.array([[50.0, 10.0], [70.0, 80.0]])
    # forgetting: max(50) - 70 = -20 (negative: the task got better);  bwt: 70 - 50 = +20
    assert metrics.forgetting(Rup) == pytest.approx(-20.0)
    assert metrics.backward_transfer(Rup) == pytest.approx(20.0)
    assert not math.isnan(metrics.average_accuracy(Rup))
    assert metrics.average_accuracy(Rup) == pytest.approx(75.0)
