"""clrun on a real SLURM cluster: a grid as a job array, requeue and resume, seeds packed per
array task, one Optuna study shared by the tasks of an array.

The jobs go to the SLURM controller that ``sbatch`` and ``sinfo`` reach: on a development machine
or in CI, the one-node cluster of ``scripts/slurm_cluster.sh`` (``.ci/run`` starts it before the
tests and stops it after). Without ``sbatch`` the tests are skipped; with ``sbatch`` but no
controller answering they are skipped too, unless ``CLRUN_REQUIRE_SLURM=1`` (set by CI), where
that is a failure. Each job asks for 1 CPU and 1 GB, so two run side by side on 2 cores.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, read_results, run_clrun

REPO = Path(__file__).resolve().parent.parent

# The launcher of conf/hydra/launcher/slurm.yaml, sized for a small local cluster.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=15"]
# Two-task Split MNIST on 100 images per task (the tiny IDX files of conftest.py).
SMALL = [*TINY, "loggers=[console]", "checkpoint=false", "benchmark=splitmnist", "benchmark.num_tasks=2",
         "benchmark.subset=100", "benchmark.test_subset=100", "training.eval_initial=false"]
TIMEOUT = 600


def _cluster_problem() -> str | None:
    """Why no SLURM job can run here, or None."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return ("sbatch not found: SLURM is not installed (scripts/slurm_cluster.sh install, then "
                "scripts/slurm_cluster.sh start, gives a one-node cluster on this machine)")
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P %a %t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    if proc.returncode != 0 or not proc.stdout.strip():
        return (f"sbatch is installed but no SLURM controller answers (sinfo: "
                f"{(proc.stderr or proc.stdout).strip()[:200]}); start one with scripts/slurm_cluster.sh start")
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    problem = _cluster_problem()
    if problem is None:
        return
    if os.environ.get("CLRUN_REQUIRE_SLURM") == "1":
        pytest.fail(f"CLRUN_REQUIRE_SLURM=1 but {problem}")
    pytest.skip(problem)


def multirun(tmp_path: Path, *args: str, data_dir: Path, sweep_dir: Path):
    keys = {a.split("=", 1)[0] for a in args}
    small = [a for a in SMALL if a.split("=", 1)[0] not in keys]
    return run_clrun(["-m", *args, f"data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}", *small], cwd=tmp_path,
                     timeout=TIMEOUT)


def job_dirs(sweep_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()}


def sbatch_script(sweep_dir: Path) -> str:
    """The sbatch script submitit wrote for the sweep (one array, one script)."""
    scripts = list((sweep_dir / ".submitit").glob("*/*_submission.sh"))
    assert len(scripts) == 1, scripts
    return scripts[0].read_text()


def report_csv(folder: Path) -> list[dict]:
    rep = subprocess.run([sys.executable, "-m", "cl_runner.report", str(folder), "--format", "csv"],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "without results.json" not in rep.stderr, rep.stderr
    return list(csv.DictReader(io.StringIO(rep.stdout)))


def test_grid_is_one_job_array_and_reports_as_under_joblib(tmp_path, tiny_data_dir):
    """algo x seed through SLURM: one sbatch array of four tasks with the launcher config's
    settings, a results.json per task, and the same folders, numbers and report table as the
    same grid run by two joblib workers. threads=1 in both, so that the thread count (1 under
    either launcher here) is not what is compared."""
    grid = ["algo=naive,ewc", "seed=0,1", "threads=1"]
    proc = multirun(tmp_path, *SLURM, *grid, data_dir=tiny_data_dir, sweep_dir=tmp_path / "slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Submitit 'slurm' sweep output dir" in proc.stdout + proc.stderr
    script = sbatch_script(tmp_path / "slurm")
    for line in ("--array=0-3%4", "--job-name=clrun", "--cpus-per-task=1", "--mem=1GB", "--time=15",
                 "--signal=USR2@120", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {line}\n" in script, script
    # Each array task ran under SLURM (submitit's log names its array job and task).
    logs = sorted((tmp_path / "slurm" / ".submitit").glob("*_*/*_log.out"))
    assert len(logs) == 4
    assert all(re.search(r"JobEnvironment\(job_id=\d+_[0-3],", p.read_text()) for p in logs)

    proc = multirun(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *grid, data_dir=tiny_data_dir,
                    sweep_dir=tmp_path / "joblib")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    slurm_jobs, joblib_jobs = job_dirs(tmp_path / "slurm"), job_dirs(tmp_path / "joblib")
    assert len(slurm_jobs) == 4 and set(slurm_jobs) == set(joblib_jobs)
    for name, job in slurm_jobs.items():
        a, b = read_results(job), read_results(joblib_jobs[name])
        assert a["acc_matrix"] == b["acc_matrix"] and a["epoch_losses"] == b["epoch_losses"], name
    table = report_csv(tmp_path / "slurm")
    assert table == report_csv(tmp_path / "joblib")
    assert sorted((r["algo"], r["runs"]) for r in table) == [("ewc", "2"), ("naive", "2")]


# Ten Permuted MNIST tasks of 20 epochs over the 600 tiny images (1,200 steps of batch 10 per
# task), so that the job is still training when it is stopped after its second task.
LONG = ["algo=ewc", "benchmark=permutedmnist", "benchmark.num_tasks=10", "training.epochs_per_task=20",
        "benchmark.batch_size=10", "backbone.width=32", "benchmark.eval_batch_size=200", "threads=1",
        "progress=false", "loggers=[console,jsonl]"]


def _tasks_done(events: Path) -> int:
    try:
        return sum(1 for line in events.read_text().splitlines() if '"event": "task"' in line)
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("stop", ["scontrol requeue", "USR2"])
def test_requeued_job_continues_from_its_checkpoint(tmp_path, tiny_data_dir, stop):
    """A job stopped after its second task and requeued runs again with the same command and,
    with resume=auto, continues from its last checkpoint; its numbers equal an uninterrupted
    run's. Two ways a job gets requeued: ``scontrol requeue`` (what a preemption in requeue mode
    does: SIGTERM, the job ends, SLURM queues it again) and SIGUSR2 (the signal SLURM sends
    signal_delay_s before the time limit: submitit's handler requeues the job itself)."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "cl_runner.cli", "-m", *SLURM, *LONG, "resume=auto", f"data_dir={tiny_data_dir}",
           f"hydra.sweep.dir={sweep_dir}"]
    head = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + TIMEOUT
        events = None
        while time.monotonic() < deadline and head.poll() is None:
            found = list(sweep_dir.glob("*/events.jsonl"))
            events = found[0] if found else None
            if events is not None and _tasks_done(events) >= 2:
                break
            time.sleep(0.1)
        assert head.poll() is None, head.communicate()[0]
        assert events is not None and _tasks_done(events) >= 2, "the job did not finish two tasks in time"
        job_id = next(p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit())
        if stop == "USR2":
            subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
        else:
            subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        assert _tasks_done(events) < 10, "the job ended before it could be requeued"

        # The same run, uninterrupted, in this process's own folder (while the job waits to restart).
        ref = run_clrun([*LONG, f"data_dir={tiny_data_dir}", f"hydra.run.dir={tmp_path / 'ref'}"], cwd=tmp_path,
                        timeout=TIMEOUT)
        assert ref.returncode == 0, ref.stdout + ref.stderr
        out, _ = head.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if head.poll() is None:
            head.kill()
            head.communicate()
    assert head.returncode == 0, out

    job = next(iter(job_dirs(sweep_dir).values()))
    log_out = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
    log_err = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
    assert log_out.count("Starting with JobEnvironment") == 2, log_out  # ran twice, the same array task
    if stop == "USR2":
        assert "Caught signal SIGUSR2" in log_out and f"Requeued job {job_id}" in log_out, log_out
    resumed = re.findall(r"resuming after task (\d+) of 10", " ".join(log_err.split()))
    assert len(resumed) == 1 and 2 <= int(resumed[0]) < 10, log_err
    a, b = read_results(job), read_results(tmp_path / "ref")
    assert a["acc_matrix"] == b["acc_matrix"] and a["epoch_losses"] == b["epoch_losses"]
    assert a["avg_acc"] == b["avg_acc"] and a["forgetting"] == b["forgetting"]


def test_seeds_packed_per_array_task_on_jax(tmp_path, tiny_data_dir):
    """seeds=[0,1],[2,3]: two array tasks, each training two seeds together on JAX; each seed
    writes its own results.json, so the report averages over the four seeds as if each had been
    a job of its own."""
    pytest.importorskip("jax")
    sweep_dir = tmp_path / "sweep"
    proc = multirun(tmp_path, *SLURM, "backend=jax", "algo=naive", "seeds=[0,1],[2,3]", data_dir=tiny_data_dir,
                    sweep_dir=sweep_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "#SBATCH --array=0-1%2\n" in sbatch_script(sweep_dir)
    jobs = job_dirs(sweep_dir)
    # Each job's folder ends with its seeds (and names no single seed).
    assert sorted(n[n.index("seeds="):] for n in jobs) == ["seeds=[0,1]", "seeds=[2,3]"]
    assert not any(",seed=" in n for n in jobs)
    per_seed = {}
    for name, job in jobs.items():
        aggregate = json.loads((job / "aggregate.json").read_text())
        assert aggregate["vectorized"] is True, name  # the two seeds trained together
        for s in aggregate["seeds"]:
            per_seed[s] = read_results(job / f"seed={s}")
            assert per_seed[s]["seed"] == s
        assert aggregate["avg_acc"] == pytest.approx(statistics.mean(per_seed[s]["avg_acc"] for s in aggregate["seeds"]))
    assert sorted(per_seed) == [0, 1, 2, 3]
    [row] = report_csv(sweep_dir)
    assert row["runs"] == "4"
    for metric in ("avg_acc", "forgetting", "bwt"):
        values = [per_seed[s][metric] for s in range(4)]
        assert float(row[f"{metric}_mean"]) == pytest.approx(statistics.mean(values))
        assert float(row[f"{metric}_std"]) == pytest.approx(statistics.stdev(values))


def test_optuna_study_shared_by_the_tasks_of_a_job_array(tmp_path, tiny_data_dir):
    """Two array tasks running side by side, each a `clrun -m +sweep=ewc_optuna` of three trials
    on one SQLite study that does not exist yet: one creates the study and the other loads it,
    and the study gets all six trials, numbered 0-5 once each, every one COMPLETE with the
    avg_acc of its job's results.json."""
    db = tmp_path / "studies" / "ewc.db"
    runs = tmp_path / "runs"
    small = " ".join(a for a in SMALL)
    script = tmp_path / "study.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --job-name=clrun-study\n#SBATCH --array=0-1\n#SBATCH --cpus-per-task=1\n#SBATCH --mem=1G\n"
        "#SBATCH --time=15\n"
        f"#SBATCH --output={tmp_path}/logs/%A_%a.out\n"
        f"cd {tmp_path}\n"
        f"exec {sys.executable} -m cl_runner.cli -m +sweep=ewc_optuna hydra.sweeper.storage=sqlite:///{db} "
        f"hydra.sweeper.study_name=shared hydra.sweeper.n_trials=3 data_dir={tiny_data_dir} "
        f"hydra.sweep.dir={runs}/task$SLURM_ARRAY_TASK_ID {small}\n")
    (tmp_path / "logs").mkdir()
    proc = subprocess.run(["sbatch", "--wait", str(script)], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "COLUMNS": "200"})
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.out")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert logs.count("A new study created in RDB with name: shared") == 1, logs
    assert logs.count("Using an existing study with name 'shared'") == 1, logs

    with sqlite3.connect(db) as con:
        trials = con.execute(
            "SELECT t.number, t.state, v.value FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "LEFT JOIN trial_values v ON v.trial_id = t.trial_id WHERE s.study_name = 'shared' "
            "ORDER BY t.number").fetchall()
    assert [n for n, _, _ in trials] == [0, 1, 2, 3, 4, 5]
    assert {state for _, state, _ in trials} == {"COMPLETE"}
    results = sorted(runs.rglob("results.json"))
    assert len(results) == 6 and {p.parent.parent.name for p in results} == {"task0", "task1"}
    accs = sorted(json.loads(p.read_text())["avg_acc"] for p in results)
    assert sorted(v for _, _, v in trials) == pytest.approx(accs)
