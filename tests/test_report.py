"""``clrun-report``: grouping runs by config, mean ± sample std over seeds, the three formats, the plot.

The runs are results.json files as clrun writes them (the config is composed from conf/ and
validated, as in a real run) with metric values chosen so every expected number is worked out
by hand below.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from cl_runner import report
from cl_runner.cli import CONF_DIR
from cl_runner.config import validate_config


def run_config(*overrides: str) -> dict:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
    typed, _ = validate_config(cfg)
    return OmegaConf.to_container(typed, resolve=True)


def write_run(root: Path, name: str, config: dict, avg_acc: float, forgetting: float, bwt: float) -> Path:
    """A job folder as Hydra and clrun leave it."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    results = {"avg_acc": avg_acc, "forgetting": forgetting, "bwt": bwt, "fwt": 0.0, "seed": config["seed"],
               "algo": config["algo"]["name"], "acc_matrix": [[avg_acc]], "config": config}
    (job / "results.json").write_text(json.dumps(results))
    return job


# naive: avg_acc 70, 72, 77 -> mean 73, sample var (9 + 1 + 16) / 2 = 13, std sqrt(13) = 3.6056
#        forgetting 10, 12, 14 -> mean 12, std 2;   bwt -10, -12, -14 -> mean -12, std 2
# ewc lambda=1: avg_acc 80, 84 -> mean 82, var (4 + 4) / 1 = 8, std 2.8284
#        forgetting 5, 9 -> mean 7, std 2.8284;     bwt -5, -9 -> mean -7, std 2.8284
# ewc lambda=10: one run, avg_acc 90, forgetting 1, bwt -1 -> no std
RUNS = [
    (("algo=naive", "seed=0"), 70.0, 10.0, -10.0),
    (("algo=naive", "seed=1"), 72.0, 12.0, -12.0),
    (("algo=naive", "seed=2"), 77.0, 14.0, -14.0),
    (("algo=ewc", "algo.ewc_lambda=1", "seed=0"), 80.0, 5.0, -5.0),
    (("algo=ewc", "algo.ewc_lambda=1", "seed=1"), 84.0, 9.0, -9.0),
    (("algo=ewc", "algo.ewc_lambda=10", "seed=0"), 90.0, 1.0, -1.0),
]


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun"
    for i, (overrides, acc, forg, bwt) in enumerate(RUNS):
        # data_dir differs between runs but changes no result: it must not split a group.
        config = run_config(*overrides, f"data_dir=/data/{i}")
        write_run(root, ",".join(overrides), config, acc, forg, bwt)
    return root


def csv_rows(root: Path, *args: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(report.report(root, "csv", *args))))


def test_mean_and_sample_std_by_hand(sweep):
    rows = csv_rows(sweep)
    assert [(r["algo"], r["algo.ewc_lambda"], r["runs"]) for r in rows] == [
        ("ewc", "10", "1"), ("ewc", "1", "2"), ("naive", "-", "3")]  # best avg_acc first
    ewc10, ewc1, naive = rows
    def stat(row: dict, name: str) -> float:
        return float(row[name])

    assert stat(naive, "avg_acc_mean") == pytest.approx(73.0)
    assert stat(naive, "avg_acc_std") == pytest.approx(math.sqrt(13))  # ddof=1; ddof=0 would give 3.27
    assert stat(naive, "forgetting_mean") == pytest.approx(12.0) and stat(naive, "forgetting_std") == pytest.approx(2)
    assert stat(naive, "bwt_mean") == pytest.approx(-12.0) and stat(naive, "bwt_std") == pytest.approx(2.0)
    assert stat(ewc1, "avg_acc_mean") == pytest.approx(82.0) and stat(ewc1, "avg_acc_std") == pytest.approx(8 ** 0.5)
    assert stat(ewc1, "forgetting_mean") == pytest.approx(7.0) and stat(ewc1, "bwt_std") == pytest.approx(8 ** 0.5)
    assert stat(ewc10, "avg_acc_mean") == pytest.approx(90.0)
    assert ewc10["avg_acc_std"] == ""  # one run: no standard deviation


def test_table_and_markdown(sweep):
    table = report.report(sweep, "table")
    assert "6 runs in 3 configs" in table and "sample std, ddof=1" in " ".join(table.split())
    assert "82.00 ± 2.83" in table and "73.00 ± 3.61" in table and "90.00" in table
    md = report.report(sweep, "markdown")
    lines = md.splitlines()
    assert lines[0] == "| algo | algo.ewc_lambda | avg acc (%) | forgetting (%) | BWT (%) | runs |"
    assert lines[2] == "| ewc | 10 | 90.00 | 1.00 | -1.00 | 1 |"
    assert lines[3] == "| ewc | 1 | 82.00 ± 2.83 | 7.00 ± 2.83 | -7.00 ± 2.83 | 2 |"
    assert lines[4] == "| naive | - | 73.00 ± 3.61 | 12.00 ± 2.00 | -12.00 ± 2.00 | 3 |"
    assert "ddof=1" in md


def test_sort_by_forgetting_puts_the_least_forgetting_first(sweep):
    assert [r["forgetting_mean"] for r in csv_rows(sweep, "forgetting")] == ["1.0", "7.0", "12.0"]


def test_keys_only_some_configs_have_are_not_columns(tmp_path):
    """naive vs EWC with one lambda: ewc_lambda, fisher... exist only for EWC and are implied by it."""
    for algo in ("naive", "ewc"):
        for seed in (0, 1):
            write_run(tmp_path, f"{algo}{seed}", run_config(f"algo={algo}", f"seed={seed}"), 50.0 + seed, 1.0, -1.0)
    rows = csv_rows(tmp_path)
    assert list(rows[0]) == ["algo", "avg_acc_mean", "avg_acc_std", "forgetting_mean", "forgetting_std",
                             "bwt_mean", "bwt_std", "runs"]
    assert {r["algo"]: r["avg_acc_std"] for r in rows} == {"naive": repr(math.sqrt(0.5)), "ewc": repr(math.sqrt(0.5))}


def test_runs_that_differ_only_in_seed_are_one_group(tmp_path):
    for seed, acc in ((0, 60.0), (1, 62.0)):
        write_run(tmp_path, f"seed={seed}", run_config(f"seed={seed}"), acc, 0.0, 0.0)
    md = report.report(tmp_path, "markdown")
    assert "| (all runs) | 61.00 ± 1.41 |" in md


def test_plot(sweep, tmp_path):
    out = tmp_path / "plots" / "acc.png"
    report.report(sweep, "table", plot=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_bars_are_means_with_std_error_bars(sweep, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    real_bar = plt.Axes.bar

    def spy(self, x, height, *args, yerr=None, **kwargs):
        drawn["height"], drawn["yerr"] = list(height), list(yerr)
        return real_bar(self, x, height, *args, yerr=yerr, **kwargs)

    monkeypatch.setattr(plt.Axes, "bar", spy)
    report.report(sweep, "csv", plot=tmp_path / "p.png")
    assert drawn["height"] == pytest.approx([90.0, 82.0, 73.0])
    assert drawn["yerr"] == pytest.approx([0.0, math.sqrt(8), math.sqrt(13)])


def test_job_without_results_and_unreadable_file_are_noted(sweep, capsys):
    (sweep / "failed_job" / ".hydra").mkdir(parents=True)
    (sweep / "failed_job" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (sweep / "broken").mkdir()
    (sweep / "broken" / "results.json").write_text("{not json")
    rows = csv_rows(sweep)
    assert sum(int(r["runs"]) for r in rows) == 6
    err = " ".join(capsys.readouterr().err.split())
    assert "1 job folder(s) without results.json" in err and "failed_job" in err
    assert "unreadable results file" in err and "broken" in err


def test_job_of_several_seeds_counts_as_complete_once_aggregated(tmp_path, capsys):
    """A job run with seeds=[...] writes seed=<s>/results.json per seed and aggregate.json in its
    own folder: each seed is a run of the report, and the job is not listed as without results
    once aggregate.json is there (a job whose aggregate is missing was interrupted)."""
    root = tmp_path / "multirun"
    for job, seeds, accs in (("seeds=[0,1]", (0, 1), (70.0, 72.0)), ("seeds=[2,3]", (2, 3), (77.0, 80.0))):
        (root / job / ".hydra").mkdir(parents=True)
        (root / job / ".hydra" / "config.yaml").write_text("seeds: [0, 1]\n")
        for seed, acc in zip(seeds, accs):
            write_run(root / job, f"seed={seed}", run_config("algo=naive", f"seed={seed}"), acc, 10.0, -10.0)
    (root / "seeds=[0,1]" / "aggregate.json").write_text("{}")
    rows = csv_rows(root)
    # One group of four runs: mean of 70, 72, 77, 80 = 74.75.
    assert [(r["runs"], float(r["avg_acc_mean"])) for r in rows] == [("4", pytest.approx(74.75))]
    err = " ".join(capsys.readouterr().err.split())
    assert "1 job folder(s) without results.json" in err and "seeds=[2,3]" in err
    (root / "seeds=[2,3]" / "aggregate.json").write_text("{}")
    csv_rows(root)
    assert "without results.json" not in capsys.readouterr().err


def test_command_lines(sweep, tmp_path):
    """The installed clrun-report and python -m cl_runner.report; errors exit with status 2."""
    proc = subprocess.run(["clrun-report", str(sweep), "--format", "markdown", "--plot", str(tmp_path / "a.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| ewc | 1 | 82.00 ± 2.83 |" in proc.stdout and (tmp_path / "a.png").is_file()
    proc = subprocess.run([sys.executable, "-m", "cl_runner.report", str(sweep), "--sort-by", "bwt"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "best BWT (%) first" in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "cl_runner.report", str(empty)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "error: no results.json" in proc.stderr
