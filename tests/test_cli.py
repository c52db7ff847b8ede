"""``clrun`` end to end, in a subprocess as a user runs it: results files and error messages."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY, read_results, run_clrun

# The SequeL-format files, in the offline copy beside the checkout.
SEQUEL = (Path(__file__).resolve().parent.parent.parent / "shared" / "sequel_configs").resolve()

# Every run: tiny model and batches, console logging only (the other loggers have tests of their own).
FAST = [*TINY, "loggers=[console]"]
# A proxy that refuses connections: a download attempt fails at once, on any machine.
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


def clrun(tmp_path: Path, *args: str, data_dir=None, run_dir: Path | None = None, env=None):
    run_dir = run_dir or tmp_path / "run"
    full = [*args, f"hydra.run.dir={run_dir}"]
    if data_dir is not None:
        full.append(f"data_dir={data_dir}")
    return run_clrun([*full, *FAST], cwd=tmp_path, env={**OFFLINE, **(env or {})})


def assert_failed(proc, *words: str) -> str:
    """Exit status 2 and an error message (no traceback) containing every one of ``words``."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    assert "error:" in proc.stderr, out
    for w in words:
        assert w in out, (w, out)
    return out


def check_results(run_dir: Path, num_tasks: int, algo: str, benchmark: str) -> dict:
    res = read_results(run_dir)
    R = np.array(res["acc_matrix"], dtype=float)
    assert R.shape == (num_tasks, num_tasks)
    assert not np.isnan(R).any()  # eval_on=all: every entry evaluated
    assert ((R >= 0) & (R <= 100)).all()
    assert res["avg_acc"] == pytest.approx(R[-1].mean())
    # forgetting and BWT from the matrix, by their definitions.
    T = num_tasks
    assert res["forgetting"] == pytest.approx(np.mean([R[j:T - 1, j].max() - R[T - 1, j] for j in range(T - 1)]))
    assert res["bwt"] == pytest.approx(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))
    assert len(res["per_task_time_s"]) == num_tasks and all(t > 0 for t in res["per_task_time_s"])
    assert res["config"]["algo"]["name"] == algo and res["config"]["benchmark"]["name"] == benchmark
    assert res["algo"] == algo and res["benchmark"] == benchmark
    for key in ("python", "torch", "numpy", "clrun"):
        assert res["versions"][key], key
    return res


# -- successful runs ----------------------------------------------------------------------------

# Each benchmark once, and each algorithm on two of them.
RUNS = [
    ("splitmnist", "naive", 5, ["benchmark.scenario=task_il"]),
    ("permutedmnist", "joint", 2, ["benchmark.subset=200"]),
    ("rotatedmnist", "ewc", 3, ["algo.ewc_lambda=10"]),
    ("splitfmnist", "ewc", 2, []),
    ("permutedfmnist", "naive", 2, ["benchmark.scenario=class_il"]),
    ("rotatedfmnist", "joint", 2, ["benchmark.per_task_rotation=45"]),
]


# (The parameter is not called "benchmark": pytest-benchmark owns a fixture of that name.)
@pytest.mark.parametrize("bench, algo, num_tasks, extra", RUNS, ids=[f"{b}-{a}" for b, a, _, _ in RUNS])
def test_run(tmp_path, tiny_data_dir, bench, algo, num_tasks, extra):
    benchmark = bench
    proc = clrun(tmp_path, f"benchmark={benchmark}", f"algo={algo}", f"benchmark.num_tasks={num_tasks}",
                 *extra, data_dir=tiny_data_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = check_results(tmp_path / "run", num_tasks, algo, benchmark)
    assert "average accuracy" in proc.stdout and "results.json" in proc.stdout
    if benchmark == "splitmnist":
        assert res["scenario"] == "task_il"
        # Task-IL on learnable two-class tasks: well above the 50% of guessing.
        assert res["avg_acc"] > 60
    if benchmark == "permutedfmnist":
        assert res["scenario"] == "class_il"
    if algo == "ewc":
        assert res["config"]["algo"]["ewc_lambda"] == (10.0 if benchmark == "rotatedmnist" else 1.0)
    if benchmark == "rotatedfmnist":
        assert res["config"]["benchmark"]["per_task_rotation"] == 45.0


def test_sequel_ewc_file_runs(tmp_path, tiny_data_dir):
    path = SEQUEL / "ewc_rotatedmnist.yaml"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    # data_dir, progress and loggers are not in the SequeL file: clrun adds them ('+' overrides).
    proc = clrun(tmp_path, "--config-dir", str(SEQUEL), "--config-name", "ewc_rotatedmnist",
                 "benchmark.num_tasks=2", "benchmark.subset=100", data_dir=tiny_data_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = check_results(tmp_path / "run", 2, "ewc", "rotatedmnist")
    cfg = res["config"]
    assert cfg["backend"]["name"] == "torch" and cfg["mode"] == "pytorch"
    assert cfg["backbone"]["dropout"] == pytest.approx(0.2) and cfg["backbone"]["num_classes"] == 10
    assert cfg["optimizer"]["lr_decay"] == pytest.approx(0.8)
    assert cfg["benchmark"]["per_task_rotation"] == 9.0
    assert "wandb" in proc.stderr  # the warning about the kept wandb block


# -- information ---------------------------------------------------------------------------------

def test_help(tmp_path):
    proc = run_clrun(["--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    groups_part = proc.stdout.split("== Config ==")[0]  # the config dump below has "algo:" too
    lines = {line.split(":")[0]: line.split(":", 1)[1] for line in groups_part.splitlines()
             if line.startswith(("algo:", "benchmark:", "backbone:", "optimizer:"))}
    assert {"ewc", "joint", "naive"} <= set(lines["algo"].replace(",", " ").split())
    assert {"permutedfmnist", "permutedmnist", "rotatedfmnist", "rotatedmnist", "splitfmnist", "splitmnist"} \
        <= set(lines["benchmark"].replace(",", " ").split())
    assert {"mlp", "cnn"} <= set(lines["backbone"].replace(",", " ").split())
    assert {"sgd", "adam"} <= set(lines["optimizer"].replace(",", " ").split())


def test_cfg_job(tmp_path):
    proc = run_clrun(["--cfg", "job", "algo=naive", "benchmark=splitmnist", "optimizer.lr=0.5"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["algo"] == {"name": "naive", "plugins": []}
    assert cfg["benchmark"]["name"] == "splitmnist" and cfg["optimizer"]["lr"] == 0.5
    assert not list(tmp_path.iterdir())  # nothing run, nothing written


def test_list(tmp_path):
    proc = run_clrun(["--list"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("rotatedmnist", "splitfmnist", "ewc", "joint", "naive", "mlp", "cnn", "sgd", "adam", "torch"):
        assert name in proc.stdout, name
    assert "Kirkpatrick" in proc.stdout


# -- bad input ------------------------------------------------------------------------------------

def test_unknown_algorithm(tmp_path, tiny_data_dir):
    out = assert_failed(clrun(tmp_path, "algo=ewcc", data_dir=tiny_data_dir),
                        "unknown algorithm 'ewcc'", "Did you mean 'ewc'?", "Valid algorithms:")
    valid = out.split("Valid algorithms:")[1]
    for name in ("ewc", "joint", "naive"):
        assert name in valid
    assert not (tmp_path / "run").exists()


def test_unknown_algorithm_name_key(tmp_path, tiny_data_dir):
    assert_failed(clrun(tmp_path, "algo.name=naiv", data_dir=tiny_data_dir),
                  "unknown algorithm 'naiv'", "Did you mean 'naive'?")


@pytest.mark.parametrize("override, words", [
    ("benchmark.num_task=3", ["unknown config key 'benchmark.num_task'", "Did you mean 'benchmark.num_tasks'?"]),
    ("algo.ewc_lambdaa=5", ["unknown config key 'algo.ewc_lambdaa'", "Did you mean 'algo.ewc_lambda'?"]),
    ("benchmark.num_tasks=abc", ["config key 'benchmark.num_tasks'", "'abc' is not a valid integer"]),
])
def test_bad_overrides(tmp_path, tiny_data_dir, override, words):
    assert_failed(clrun(tmp_path, override, data_dir=tiny_data_dir), *words)
    assert not (tmp_path / "run" / "results.json").exists()


def test_missing_data_dir(tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    out = assert_failed(clrun(tmp_path, "benchmark.num_tasks=2", data_dir=empty),
                        f"data_dir={empty}", str(empty / "mnist"), "train-images-idx3-ubyte.gz")
    assert "download" in out
    assert not (tmp_path / "run" / "results.json").exists()


def test_corrupt_data_file(tmp_path, tiny_data_dir):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir / "mnist", data / "mnist")
    bad = data / "mnist" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    assert_failed(clrun(tmp_path, "benchmark=splitmnist", "benchmark.num_tasks=2", data_dir=data),
                  str(bad), "corrupt")
    assert not (tmp_path / "run" / "results.json").exists()


def test_nan_loss(tmp_path, tiny_data_dir):
    proc = clrun(tmp_path, "algo=naive", "benchmark.num_tasks=2", "optimizer.lr=1e30", data_dir=tiny_data_dir)
    assert_failed(proc, "task 0", "step", "optimizer.lr")
    assert not (tmp_path / "run" / "results.json").exists()


# Hydra creates hydra.run.dir itself before clrun's task runs; the command line checks it first.
def test_output_dir_not_writable(tmp_path, tiny_data_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user can write to a mode-555 directory (root)")
        run_dir = locked / "run"
        out = assert_failed(clrun(tmp_path, "benchmark.num_tasks=2", data_dir=tiny_data_dir, run_dir=run_dir),
                            "not writable", "hydra.run.dir")
        assert str(locked) in out
    finally:
        locked.chmod(0o755)


def test_output_dir_under_a_file(tmp_path, tiny_data_dir):
    # The same failure in a form that root meets too: a path component is a regular file.
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    out = assert_failed(clrun(tmp_path, "benchmark.num_tasks=2", data_dir=tiny_data_dir,
                              run_dir=blocker / "run"), "not writable", "hydra.run.dir")
    assert str(blocker / "run") in out
