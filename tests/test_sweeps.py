"""Sweeps with ``clrun -m``: grids, sweep files, Optuna studies in SQLite, parallel launchers.

Every sweep runs in a subprocess on the tiny datasets, as a user runs it.
"""

from __future__ import annotations

import csv
import io
import sqlite3
import statistics
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cl_runner import sweeps
from cl_runner.cli import CONF_DIR, precheck
from conftest import TINY, read_results, run_clrun

# Two-task Split MNIST on 100 images per task: each job takes a fraction of a second.
SMALL = [*TINY, "loggers=[console]", "checkpoint=false", "benchmark=splitmnist", "benchmark.num_tasks=2",
         "benchmark.subset=100", "benchmark.test_subset=100", "training.eval_initial=false"]


def multirun(tmp_path: Path, *args: str, data_dir: Path, sweep_dir: Path | None = None):
    """``clrun -m *args`` on the tiny data with SMALL settings (those ``args`` do not set)."""
    sweep_dir = sweep_dir or tmp_path / "sweep"
    keys = {a.split("=", 1)[0] for a in args}
    small = [a for a in SMALL if a.split("=", 1)[0] not in keys]
    proc = run_clrun(["-m", *args, f"data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}", *small], cwd=tmp_path)
    return proc, sweep_dir


def err(capsys) -> str:
    """What was printed to stderr, with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def job_dirs(sweep_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()}


def study_trials(db: Path, study_name: str) -> list[tuple[int, str, float | None]]:
    """(number, state, value) of each trial, read from Optuna's SQLite file directly."""
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT t.number, t.state, v.value FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "LEFT JOIN trial_values v ON v.trial_id = t.trial_id WHERE s.study_name = ? ORDER BY t.number",
            (study_name,)).fetchall()


def study_direction(db: Path, study_name: str) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT d.direction FROM study_directions d JOIN studies s ON s.study_id = d.study_id "
                           "WHERE s.study_name = ?", (study_name,)).fetchone()[0]


# -- grids ---------------------------------------------------------------------------------------

def test_grid_2x2_on_two_joblib_workers_and_report(tmp_path, tiny_data_dir):
    """algo x seed, run by two parallel joblib workers: one readable folder and one results.json
    per job, each job on its share of the cores, and a report that averages the seeds."""
    proc, sweep_dir = multirun(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "algo=naive,joint",
                               "seed=0,1", data_dir=tiny_data_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    jobs = job_dirs(sweep_dir)
    # override_dirname (sorted, without seed/data_dir/progress/loggers/checkpoint), then the seed.
    rest = ("backbone.width=32,benchmark.batch_size=32,benchmark.eval_batch_size=200,benchmark.num_tasks=2,"
            "benchmark.subset=100,benchmark.test_subset=100,benchmark=splitmnist,training.eval_initial=False")
    expected = {f"algo={a},{rest},seed={s}": (a, s) for a in ("naive", "joint") for s in (0, 1)}
    assert set(jobs) == set(expected)
    results = {}
    for name, (algo, seed) in expected.items():
        res = read_results(jobs[name])
        assert res["algo"] == algo and res["seed"] == seed
        assert res["config"]["algo"]["name"] == algo and res["config"]["seed"] == seed
        # threads=auto within the job's share of the cores: evaluation on cores // 2 threads.
        assert res["threads"] == {"train": 1, "eval": max(1, sweeps.usable_cores() // 2)}
        results[(algo, seed)] = res

    # The report: one row per algorithm, mean and sample std (ddof=1) over the two seeds.
    rep = subprocess.run(["clrun-report", str(sweep_dir), "--format", "csv"], capture_output=True, text=True,
                         timeout=120)
    assert rep.returncode == 0, rep.stderr
    rows = {r["algo"]: r for r in csv.DictReader(io.StringIO(rep.stdout))}
    assert set(rows) == {"naive", "joint"}
    for algo in ("naive", "joint"):
        for metric in ("avg_acc", "forgetting", "bwt"):
            values = [results[(algo, s)][metric] for s in (0, 1)]
            assert float(rows[algo][f"{metric}_mean"]) == pytest.approx(statistics.mean(values))
            assert float(rows[algo][f"{metric}_std"]) == pytest.approx(statistics.stdev(values))
        assert rows[algo]["runs"] == "2"
    means = [float(r["avg_acc_mean"]) for r in csv.DictReader(io.StringIO(rep.stdout))]
    assert means == sorted(means, reverse=True)  # best first


def test_subdir_names(tmp_path):
    assert sweeps.job_dirname("algo=ewc,optimizer.lr=0.1", 2) == "algo=ewc,optimizer.lr=0.1,seed=2"
    assert sweeps.job_dirname("", 0) == "seed=0"  # only the seed swept: no leading comma
    assert sweeps.job_dirname("benchmark.class_order=[a/b]", 1) == "benchmark.class_order=[a_b],seed=1"
    long = sweeps.job_dirname(",".join(f"algo.k{i}=0.123456789" for i in range(40)), 3)
    assert len(long.encode()) <= sweeps.MAX_DIRNAME_BYTES
    other = sweeps.job_dirname(",".join(f"algo.k{i}=0.123456789" for i in range(40)), 4)
    assert long != other  # the hash keeps shortened names apart
    assert long.endswith(",seed=3") and other.endswith(",seed=4")
    (tmp_path / long).mkdir()  # and the file system takes it
    # A job of several seeds ends with them (the unused seed is left out).
    assert sweeps.job_dirname("algo=ewc", 0, [0, 1]) == "algo=ewc,seeds=[0,1]"
    assert sweeps.job_dirname("", 0, [2, 3]) == "seeds=[2,3]"


def test_precheck_validates_every_job_of_a_grid(tmp_path, capsys):
    with pytest.raises(SystemExit) as ex:
        precheck(["-m", "algo=naive,nosuchalgo", "seed=0,1"])
    assert ex.value.code == 2
    assert "unknown algorithm 'nosuchalgo'" in err(capsys)
    # EWC's key exists for ewc, not for naive: the naive jobs of this grid would fail.
    with pytest.raises(SystemExit):
        precheck(["-m", "algo=ewc,naive", "algo.ewc_lambda=1,10"])
    message = err(capsys)
    assert "in the sweep job algo=naive" in message and "algo.ewc_lambda" in message
    with pytest.raises(SystemExit):
        precheck(["-m", "optimizer.lr=0.1,fast"])
    assert "optimizer.lr=fast" in err(capsys)
    assert precheck(["-m", "algo=naive,ewc", "seed=0,1,2"]) == ["-m", "algo=naive,ewc", "seed=0,1,2"]


# -- sweep files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(sweeps.sweep_files()))
def test_sweep_file_composes_and_validates(name, tmp_path, monkeypatch):
    """Each ready sweep composes, names only registered algorithms, and passes the precheck."""
    monkeypatch.chdir(tmp_path)  # the precheck creates the folder of ewc_optuna's study here
    sweeps.register_sweep_files()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"+sweep={name}"], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    params = cfg.hydra.sweeper.params
    assert params, name
    argv = ["-m", f"+sweep={name}"]
    assert precheck(argv)[:2] == argv  # every job of the sweep is valid (unknown names exit)
    if name == "rotatedmnist_methods":
        from cl_runner import catalog
        from cl_runner.registry import ALGORITHMS

        catalog.load()
        algos = str(params.algo).split(",")
        assert "ewc" in algos and all(a in ALGORITHMS for a in algos)
        assert str(params.seed) == "0,1,2"
    if name == "ewc_bs_lr":
        assert str(params["benchmark.batch_size"]) == "10,20,30" and str(params["optimizer.lr"]) == "0.01,0.1"
    if name == "ewc_optuna":
        assert cfg.hydra.sweeper._target_ == sweeps.OPTUNA_SWEEPER
        assert "log" in params["algo.ewc_lambda"] and cfg.algo.name == "ewc"


def test_sweep_name_without_plus_and_without_m(tmp_path, capsys):
    assert precheck(["-m", "sweep=ewc_bs_lr"]) == ["-m", "+sweep=ewc_bs_lr"]
    with pytest.raises(SystemExit):
        precheck(["+sweep=ewc_bs_lr"])
    assert "add -m" in err(capsys)
    with pytest.raises(SystemExit):
        precheck(["-m", "+sweep=ewc_bs_l"])
    assert "Did you mean 'ewc_bs_lr'" in err(capsys)


# -- Optuna --------------------------------------------------------------------------------------

def test_optuna_study_in_sqlite_resumes(tmp_path, tiny_data_dir):
    db = tmp_path / "studies" / "ewc.db"  # the folder does not exist yet: clrun creates it
    args = ["+sweep=ewc_optuna", f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=t",
            "hydra.sweeper.n_trials=3"]
    proc, sweep_dir = multirun(tmp_path, *args, data_dir=tiny_data_dir, sweep_dir=tmp_path / "s1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "alembic" not in out  # the migration tool's INFO lines are silenced
    first = study_trials(db, "t")
    assert [(n, state) for n, state, _ in first] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert study_direction(db, "t") == "MAXIMIZE"
    # Each trial's value is the avg_acc of its results.json.
    accs = sorted(read_results(d)["avg_acc"] for d in job_dirs(sweep_dir).values())
    assert sorted(v for _, _, v in first) == pytest.approx(accs)
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert f"best_value: {max(accs)}" in best

    proc, _ = multirun(tmp_path, *args[:-1], "hydra.sweeper.n_trials=2", data_dir=tiny_data_dir,
                       sweep_dir=tmp_path / "s2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Using an existing study" in proc.stdout + proc.stderr
    second = study_trials(db, "t")
    numbers = [n for n, _, _ in second]
    assert numbers == [0, 1, 2, 3, 4] and len(set(numbers)) == len(numbers)
    assert second[:3] == first  # the first run's trials are kept as they were


def test_optuna_failed_trial_is_recorded_and_study_goes_on(tmp_path, tiny_data_dir):
    """A plain hydra/sweeper=optuna, out of the box: clrun sets the direction from the objective
    and lets the study go on after a failure. Split MNIST has no 50 two-class tasks, so the grid
    point num_tasks=50 fails when its stream is built; with the plugin's own max_failure_rate (0)
    the study would stop there (or fail at its end) with a non-zero exit status."""
    db = tmp_path / "fail.db"
    proc, sweep_dir = multirun(tmp_path, "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid",
                               f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=f",
                               "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
                               "benchmark.num_tasks=choice(2,3,50)", data_dir=tiny_data_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "hydra.sweeper.direction=maximize" in out and "hydra.sweeper.max_failure_rate=1.0" in out
    trials = study_trials(db, "f")
    assert sorted(state for _, state, _ in trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert [n for n, _, _ in trials] == [0, 1, 2]
    assert "Failed experiment" in out and "needs 100 classes" in out
    assert study_direction(db, "f") == "MAXIMIZE"
    jobs = job_dirs(sweep_dir).values()
    assert len(jobs) == 3
    done = sorted(read_results(d)["config"]["benchmark"]["num_tasks"] for d in jobs if (d / "results.json").is_file())
    assert done == [2, 3]


def test_optuna_overrides_follow_objective():
    plugin_defaults = {"_target_": sweeps.OPTUNA_SWEEPER, "direction": "minimize", "max_failure_rate": 0.0}
    assert sweeps.optuna_overrides(plugin_defaults, "avg_acc", set()) == [
        "hydra.sweeper.direction=maximize", "hydra.sweeper.max_failure_rate=1.0"]
    assert sweeps.optuna_overrides(plugin_defaults, "forgetting", set()) == ["hydra.sweeper.max_failure_rate=1.0"]
    # What the command line sets stays as it is.
    assert sweeps.optuna_overrides(plugin_defaults, "avg_acc", {"hydra.sweeper.direction",
                                                                "hydra.sweeper.max_failure_rate"}) == []
    assert sweeps.sqlite_path("sqlite:///a/b.db") == Path("a/b.db")
    assert sweeps.sqlite_path("sqlite:////abs/b.db") == Path("/abs/b.db")
    assert sweeps.sqlite_path("postgresql://host/db") is None


def test_unknown_objective(capsys):
    with pytest.raises(SystemExit):
        precheck(["-m", "hydra/sweeper=optuna", "objective=acc"])
    assert "Did you mean 'avg_acc'" in err(capsys)


# -- launchers -----------------------------------------------------------------------------------

def test_cpu_budget():
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"}
    assert sweeps.cpu_budget({**joblib, "n_jobs": 2}, cores=8) == 4
    assert sweeps.cpu_budget({**joblib, "n_jobs": 16}, cores=8) == 1
    assert sweeps.cpu_budget({**joblib, "n_jobs": -1}, cores=8) == 1
    assert sweeps.cpu_budget({**joblib, "n_jobs": -2}, cores=8) == 1  # 7 jobs
    assert sweeps.cpu_budget({**joblib, "n_jobs": -5}, cores=8) == 2  # 4 jobs
    slurm = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
    assert sweeps.cpu_budget({**slurm, "cpus_per_task": 4}, cores=64) == 4
    assert sweeps.cpu_budget({**slurm, "cpus_per_task": None}, cores=6) == 6
    assert sweeps.cpu_budget({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}) is None


def test_submitit_local_launcher(tmp_path, tiny_data_dir):
    """The code path of hydra/launcher=submitit_slurm, run by submitit's local executor (offline)."""
    proc, sweep_dir = multirun(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                               "hydra.launcher.cpus_per_task=1", "seed=3", data_dir=tiny_data_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 1
    name, job = jobs.popitem()
    assert name.endswith(",seed=3")
    res = read_results(job)
    assert res["seed"] == 3 and res["avg_acc"] is not None
    assert res["threads"] == {"train": 1, "eval": 1}  # cpus_per_task=1
    # submitit ran the job in a process of its own and kept its logs.
    assert list((sweep_dir / ".submitit").glob("*/*_log.out"))
