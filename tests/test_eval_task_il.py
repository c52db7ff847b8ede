"""training.eval_task_il: the task-IL accuracy of a class-IL run (each task evaluated with only its
own classes' output units), as a second accuracy matrix beside the class-IL one."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from cl_runner import checkpoint, metrics
from cl_runner.core.callbacks import Callback
from cl_runner.errors import ConfigError
from cl_runner.experiment import run_experiment


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def tiny(data_dir, backend: str = "torch", **extra) -> dict:
    cfg = {"data_dir": str(data_dir), "progress": False, "loggers": [], "device": "cpu", "threads": 1,
           "benchmark": {"name": "splitmnist", "scenario": "class_il", "num_tasks": 5, "batch_size": 16,
                         "eval_batch_size": 200},
           "backbone": {"type": "mlp", "width": 32}, "backend": {"name": backend},
           "training": {"epochs_per_task": 2, "eval_task_il": True}}
    for key, value in extra.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def task_il_accuracy_by_hand(logits: np.ndarray, y: np.ndarray, classes) -> float:
    masked = np.full_like(logits, -np.inf)
    masked[:, classes] = logits[:, classes]
    return 100.0 * float(np.mean(masked.argmax(1) == y))


def check_matrices(res: dict, T: int = 5) -> None:
    R = np.array(res["acc_matrix"], float)
    til = np.array(res["acc_matrix_task_il"], float)
    assert til.shape == R.shape == (T, T)
    assert not np.isnan(til).any()
    # A correct class-IL prediction stays correct when the other tasks' units are masked.
    assert (til >= R - 1e-9).all()
    assert (til[-1, :-1] > R[-1, :-1]).any()  # fine-tuning forgets in class-IL, far less in task-IL
    s = metrics.summarize_task_il(til)
    assert res["avg_acc_task_il"] == pytest.approx(til[-1].mean())
    assert res["forgetting_task_il"] == pytest.approx(s["forgetting_task_il"])
    assert res["bwt_task_il"] == pytest.approx(s["bwt_task_il"])


def test_torch_matrix_and_by_hand_last_row(tiny_data_dir, tmp_path):
    import torch

    from cl_runner.benchmarks import build_stream
    from cl_runner.config import validate_config

    console = quiet()
    res = run_experiment(tiny(tiny_data_dir), tmp_path, console=console)
    check_matrices(res)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["avg_acc_task_il"] == pytest.approx(res["avg_acc_task_il"])
    assert len(saved["acc_matrix_task_il"]) == 5
    printed = console.file.getvalue()
    assert "final acc task-IL %" in printed and "average accuracy, task-IL evaluation" in printed

    # The last row by hand, from the checkpointed model.
    payload = checkpoint.load(tmp_path / checkpoint.FILENAME)
    np.testing.assert_array_equal(payload["loop"]["acc_matrix_task_il"], np.array(res["acc_matrix_task_il"]))
    typed, _ = validate_config(tiny(tiny_data_dir))
    stream = build_stream(typed.benchmark, 0, typed.data_dir, typed.cache_dir)
    from cl_runner.catalog import load_backend

    backend = load_backend("torch")
    learner = backend.build_learner(typed, stream, backend.resolve_device("cpu"), 0)
    learner.load_state_dict(payload["learner"])
    learner.model.eval()
    for task in stream.tasks:
        x, y = learner.test_tensors(task)
        with torch.no_grad():
            logits = learner.model(x).numpy()
        expected = task_il_accuracy_by_hand(logits, y.numpy(), task.classes)
        assert res["acc_matrix_task_il"][-1][task.id] == pytest.approx(expected)
    assert learner.masks is False  # evaluation left the learner as it was


def test_jax_matrix(tiny_data_dir, tmp_path):
    pytest.importorskip("jax")
    res = run_experiment(tiny(tiny_data_dir, backend="jax", checkpoint=False, benchmark={"num_tasks": 3}),
                         tmp_path, console=quiet())
    check_matrices(res, T=3)
    assert res["config"]["training"]["eval_task_il"] is True


def test_off_by_default_adds_nothing(tiny_data_dir, tmp_path):
    res = run_experiment(tiny(tiny_data_dir, checkpoint=False, training={"eval_task_il": False}), tmp_path,
                         console=quiet())
    assert not any(k.endswith("_task_il") for k in res)


class _StopBeforeTask(Callback):
    def __init__(self, task: int):
        self.task = task

    def on_before_task(self, loop, task) -> None:
        if task.id == self.task:
            raise KeyboardInterrupt


def test_resume_carries_the_task_il_matrix(tiny_data_dir, tmp_path):
    full = run_experiment(tiny(tiny_data_dir), tmp_path / "full", console=quiet())
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny(tiny_data_dir), part, console=quiet(), callbacks=[_StopBeforeTask(3)])
    resumed = run_experiment(tiny(tiny_data_dir, resume=True), part, console=quiet())
    assert resumed["resumed"] is True
    assert resumed["acc_matrix_task_il"].tolist() == full["acc_matrix_task_il"].tolist()
    assert resumed["avg_acc_task_il"] == full["avg_acc_task_il"]


def test_vectorized_seeds_carry_it(tiny_data_dir, tmp_path):
    pytest.importorskip("jax")
    cfg = tiny(tiny_data_dir, backend="jax", checkpoint=False, seeds=[0, 1], benchmark={"num_tasks": 2},
               training={"epochs_per_task": 1})
    console = quiet()
    agg = run_experiment(cfg, tmp_path / "together", console=console)
    assert agg["vectorized"] is True
    # Per test-set shape: the class-IL and the task-IL evaluation program.
    assert agg["compilations"]["eval"] % 2 == 0
    values = agg["metrics"]["avg_acc_task_il"]["values"]
    assert agg["avg_acc_task_il"] == pytest.approx(np.mean(values))
    assert "avg acc task-IL %" in console.file.getvalue()
    alone = run_experiment(tiny(tiny_data_dir, backend="jax", checkpoint=False, seed=1, benchmark={"num_tasks": 2},
                                training={"epochs_per_task": 1}), tmp_path / "alone", console=quiet())
    together = json.loads((tmp_path / "together" / "seed=1" / "results.json").read_text())
    np.testing.assert_array_equal(np.array(together["acc_matrix_task_il"]), np.array(alone["acc_matrix_task_il"]))
    assert values[1] == pytest.approx(alone["avg_acc_task_il"])


def test_torch_seeds_aggregate_it(tiny_data_dir, tmp_path):
    cfg = tiny(tiny_data_dir, checkpoint=False, seeds=[0, 1], benchmark={"num_tasks": 2})
    agg = run_experiment(cfg, tmp_path, console=quiet())
    assert set(agg["metrics"]) >= {"avg_acc_task_il", "forgetting_task_il", "bwt_task_il"}


def test_expected_metric(tiny_data_dir, tmp_path):
    cfg = tiny(tiny_data_dir, checkpoint=False, benchmark={"num_tasks": 2},
               expected={"metric": "avg_acc_task_il", "value": 50.0, "tolerance": 60.0, "source": "test"})
    res = run_experiment(cfg, tmp_path, console=quiet())
    assert res["expected"]["measured"] == res["avg_acc_task_il"]
    assert res["expected"]["status"] == "PASS"


@pytest.mark.parametrize("extra, message", [
    ({"benchmark": {"scenario": "task_il"}}, "this stream is task_il"),
    ({"benchmark": {"name": "rotatedmnist", "scenario": None}}, "this stream is domain_il"),
    ({"training": {"eval_task_il": False}, "expected": {"metric": "avg_acc_task_il", "value": 90.0}},
     "only with training.eval_task_il=true"),
])
def test_config_errors(tiny_data_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        run_experiment(tiny(tiny_data_dir, **extra), tmp_path, console=quiet())
