"""Loggers: TensorBoard tags, CSV and plots from a real (tiny) run; W&B offline when installed."""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest

from conftest import TINY, read_results, run_clrun


def _run(tmp_path, tiny_data_dir, loggers: str, extra=()):
    run_dir = tmp_path / "run"
    res = run_clrun(["benchmark=splitmnist", "benchmark.num_tasks=3", f"data_dir={tiny_data_dir}",
                     f"loggers={loggers}", f"hydra.run.dir={run_dir}", *TINY, *extra], tmp_path)
    assert res.returncode == 0, res.stderr
    return run_dir


def test_files_csv_jsonl_plots(tmp_path, tiny_data_dir):
    run_dir = _run(tmp_path, tiny_data_dir, "[console,jsonl,csv,plots]")
    results = read_results(run_dir)
    rows = list(csv.reader((run_dir / "acc_matrix.csv").open()))
    assert rows[0] == ["after_task", "task_1", "task_2", "task_3"]
    matrix = [[float(v) for v in r[1:]] for r in rows[1:]]
    assert np.allclose(matrix, results["acc_matrix"], atol=1e-4)
    events = [json.loads(l) for l in (run_dir / "events.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"train", "epoch", "task", "final"} <= kinds
    final = next(e for e in events if e["event"] == "final")
    assert final["avg_acc"] == pytest.approx(results["avg_acc"])
    task_rows = [e["acc"] for e in events if e["event"] == "task"]
    assert np.allclose(task_rows, results["acc_matrix"])
    for png in ("acc_matrix.png", "acc_over_time.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("peak_rss_mb", "model_size_mb", "num_parameters", "steps_per_s"):
        assert results[key] > 0


def test_tensorboard_tags(tmp_path, tiny_data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _run(tmp_path, tiny_data_dir, "[tensorboard]")
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/acc_task1", "eval/acc_task3", "eval/avg_acc_seen", "final/avg_acc"} <= scalars
    assert "eval/acc_matrix" in acc.Tags()["images"]
    results = read_results(run_dir)
    last = acc.Scalars("eval/acc_task1")[-1]
    assert last.step == 3 and last.value == pytest.approx(results["acc_matrix"][-1][0], abs=1e-3)


def test_wandb_offline_run_dir(tmp_path, tiny_data_dir, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (it is an optional dependency: pip install wandb)")
    run_dir = _run(tmp_path, tiny_data_dir, "[wandb]", ["+wandb.project=clrun-test"])
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run directory"


def test_unknown_logger_lists_valid_ones(tmp_path, tiny_data_dir):
    res = run_clrun([f"data_dir={tiny_data_dir}", "loggers=[jsnl]", *TINY], tmp_path)
    assert res.returncode == 2
    assert "jsonl" in res.stderr and "callback" in res.stderr


def test_task_il_metrics_reach_jsonl_and_csv(tmp_path, tiny_data_dir):
    """A class-IL run with training.eval_task_il: events.jsonl carries each task's task-IL row
    and the final task-IL summary, and acc_matrix_task_il.csv holds the task-IL matrix, all
    equal to results.json's."""
    run_dir = _run(tmp_path, tiny_data_dir, "[jsonl,csv]", ["training.eval_task_il=true"])
    results = read_results(run_dir)
    til = np.asarray(results["acc_matrix_task_il"], dtype=float)
    events = [json.loads(l) for l in (run_dir / "events.jsonl").read_text().splitlines()]
    tasks = [e for e in events if e["event"] == "task"]
    assert np.allclose(np.asarray([e["acc_task_il"] for e in tasks], dtype=float), til, equal_nan=True)
    assert tasks[-1]["avg_acc_seen_task_il"] == pytest.approx(results["avg_acc_task_il"])
    final = next(e for e in events if e["event"] == "final")
    for key in ("avg_acc_task_il", "forgetting_task_il", "bwt_task_il"):
        assert final[key] == pytest.approx(results[key])
    rows = list(csv.reader((run_dir / "acc_matrix_task_il.csv").open()))
    matrix = [[float(v) if v else float("nan") for v in r[1:]] for r in rows[1:]]
    assert np.allclose(matrix, til, atol=1e-4, equal_nan=True)
    # Task-IL is no harder than class-IL on the same model: every entry at least as high.
    assert (til[np.tril_indices(3)] >= np.asarray(results["acc_matrix"])[np.tril_indices(3)] - 1e-9).all()
