"""Checkpoints and resume: a run killed after task 2 of 4 and resumed equals an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY, read_results, run_clrun
from cl_runner import checkpoint

ARGS = ["benchmark=rotatedmnist", "benchmark.num_tasks=4", "algo=ewc", "backbone.dropout=0.2",
        "optimizer.momentum=0.8", *TINY]


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "cl_runner.cli", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_after_task_two_then_resume_equals_uninterrupted(tmp_path, tiny_data_dir):
    common = [*ARGS, f"data_dir={tiny_data_dir}", "benchmark.batch_size=4"]
    full = run_clrun([*common, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path)
    assert full.returncode == 0, full.stderr

    run_dir = tmp_path / "part"
    proc = _start([*common, f"hydra.run.dir={run_dir}"], tmp_path)
    events = run_dir / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until task 2 has been logged, then stop the job
        if events.is_file() and any(json.loads(l)["event"] == "task" and json.loads(l)["task"] == 1
                                    for l in events.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (run_dir / "results.json").exists(), "an interrupted run must not write results"
    assert "interrupted" in out

    # The JSONL log is valid line by line even though the run was killed.
    lines = events.read_text().splitlines()
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    done = max(json.loads(l)["task"] for l in lines if json.loads(l)["event"] == "task")
    assert done in (1, 2)  # killed during task 3 (or just after it finished)

    resumed = run_clrun([*common, f"hydra.run.dir={run_dir}", "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after task" in resumed.stderr
    a, b = read_results(tmp_path / "full"), read_results(run_dir)
    assert b["resumed"] is True
    assert a["acc_matrix"] == b["acc_matrix"]
    for key in ("avg_acc", "forgetting", "bwt", "fwt"):
        assert a[key] == b[key]


def test_resume_with_a_different_config_is_an_error(tmp_path, tiny_data_dir):
    common = [*ARGS, f"data_dir={tiny_data_dir}", "benchmark.num_tasks=2"]
    first = run_clrun([*common, f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    assert first.returncode == 0, first.stderr
    other = run_clrun([*common, "optimizer.lr=0.5", f"hydra.run.dir={tmp_path / 'b'}",
                       f"resume={tmp_path / 'a'}"], tmp_path)
    assert other.returncode == 2
    assert "different config" in other.stderr and "optimizer.lr" in other.stderr


def test_corrupt_checkpoint_is_an_error_not_a_restart(tmp_path, tiny_data_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / checkpoint.FILENAME).write_bytes(b"not a checkpoint")
    res = run_clrun([*ARGS, f"data_dir={tiny_data_dir}", f"hydra.run.dir={run_dir}", "resume=true"], tmp_path)
    assert res.returncode == 2
    assert "corrupt" in res.stderr
    assert not (run_dir / "results.json").exists()


def test_missing_checkpoint_says_how_to_resume(tmp_path, tiny_data_dir):
    res = run_clrun([*ARGS, f"data_dir={tiny_data_dir}", f"hydra.run.dir={tmp_path / 'r'}", "resume=true"],
                    tmp_path)
    assert res.returncode == 2
    assert "no checkpoint" in res.stderr and "hydra.run.dir" in res.stderr


@pytest.mark.parametrize("algo", ["naive", "ewc"])
def test_in_process_checkpoint_round_trip(tmp_path, tiny_data_dir, algo):
    """Restoring a learner from a checkpoint restores its parameters and algorithm state."""
    import torch

    from cl_runner import checkpoint
    from cl_runner.experiment import run_experiment

    cfg = {"data_dir": str(tiny_data_dir), "progress": False, "algo": {"name": algo},
           "benchmark": {"name": "permutedmnist", "num_tasks": 2, "batch_size": 32},
           "backbone": {"width": 16}, "loggers": []}
    run_experiment(cfg, tmp_path)
    payload = checkpoint.load(tmp_path / checkpoint.FILENAME)
    assert payload["loop"]["completed_tasks"] == 2
    state = payload["learner"]
    assert set(state) >= {"model", "optimizer", "generator", "parts"}
    if algo == "ewc":
        (part,) = state["parts"]
        assert part["num_snapshots"] == 2
        assert all(torch.is_tensor(o) for o in part["omega"])


def test_a_key_added_since_the_checkpoint_counts_only_off_its_default():
    """A checkpoint written before a config key existed resumes when the key is at its default
    (the behaviour the checkpoint was made with), and is refused when it is not."""
    import copy

    from omegaconf import OmegaConf

    from cl_runner.checkpoint import config_differences
    from cl_runner.config import validate_config

    typed, _ = validate_config({"algo": {"name": "ewc"}, "benchmark": {"name": "splitmnist"}})
    current = OmegaConf.to_container(typed, resolve=True)
    saved = copy.deepcopy(current)
    del saved["training"]["eval_task_il"]             # an older checkpoint's config
    assert config_differences(saved, current) == []
    current["training"]["eval_task_il"] = True
    assert config_differences(saved, current) == ["training.eval_task_il"]
    current["training"]["eval_task_il"] = False
    current["algo"]["ewc_lambda"] = 5.0                 # present in both, changed: always a difference
    assert config_differences(saved, current) == ["algo.ewc_lambda"]
