"""Published numbers as experiment files: ``expected_results/``, ``clrun +expected=<name>`` and
the regression tool (cl_runner/regress.py: ``clrun-regress``, ``scripts/regress.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from cl_runner import regress as regress_module
from cl_runner import resources, sweeps
from cl_runner.config import validate_config
from conftest import REPO, TINY, read_results, run_clrun

CONF_DIR = str(resources.CONF_DIR)
FILES = sorted(sweeps.expected_files())


def load_regress():
    return regress_module


def test_there_are_experiment_files():
    assert len(FILES) >= 8


@pytest.mark.parametrize("name", FILES)
def test_experiment_file_composes_and_states_its_source(name):
    """Every file composes onto clrun's config, validates, and states value, tolerance (at least
    1.5 points, as the published-number policy says), seeds, source and tier."""
    sweeps.register_sweep_files()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"+expected={name}"])
    finally:
        GlobalHydra.instance().clear()
    typed, _ = validate_config(cfg)
    exp = typed.expected
    assert exp.value is not None and exp.source and exp.tier in ("ci", "cpu", "gpu")
    assert exp.tolerance >= 1.5 and exp.seeds >= 1
    raw = OmegaConf.load(sweeps.EXPECTED_DIR / f"{name}.yaml")
    # The file's own settings are what the composed run uses (nothing silently dropped).
    for section in ("benchmark", "backbone", "optimizer", "algo"):
        for key, value in (raw.get(section) or {}).items():
            assert typed[section][key] == value, f"{name}: {section}.{key}"


def test_expected_run_prints_pass_or_fail(tmp_path, tiny_data_dir):
    """``expected=<name>`` (with or without +) applies the protocol and compares the result."""
    out = tmp_path / "run"
    proc = run_clrun(["expected=der_seqmnist_sgd", f"data_dir={tiny_data_dir}", f"hydra.run.dir={out}",
                      *TINY, "loggers=[]"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = read_results(out)
    assert res["config"]["benchmark"]["name"] == "splitmnist"
    assert res["config"]["optimizer"]["lr"] == 0.03
    assert res["config"]["benchmark"]["normalize"] is False
    e = res["expected"]
    assert e["expected"] == 19.60 and e["tolerance"] == 3.0
    assert e["measured"] == pytest.approx(res["avg_acc"])
    assert e["status"] == ("PASS" if abs(res["avg_acc"] - 19.60) <= 1.5 else "FAIL")
    assert f"measured {res['avg_acc']:.2f}: {e['status']}" in " ".join(proc.stdout.split())


def test_unknown_experiment_file_lists_the_valid_ones(tmp_path):
    proc = run_clrun(["+expected=der_seqmnist_sdg"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown experiment file 'der_seqmnist_sdg'" in proc.stderr
    assert "der_seqmnist_sgd" in proc.stderr


def test_bad_tier_is_an_error(tmp_path, tiny_data_dir):
    proc = run_clrun(["+expected=der_seqmnist_sgd", "expected.tier=laptop"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "expected.tier" in proc.stderr and "ci, cpu, gpu" in proc.stderr


def test_case_statistics_and_status():
    regress = load_regress()
    c = regress.Case(name="x", path=Path("x.yaml"), metric="avg_acc", value=50.0, tolerance=2.0,
                     seeds=3, source="s", tier="ci", known_gap=None)
    c.runs = [{"seed": 0, "value": 49.0, "seconds": 1.0}, {"seed": 1, "value": 53.0, "seconds": 1.0},
              {"seed": 2, "value": 54.0, "seconds": 1.0}]
    mean, std = c.mean_std()
    assert mean == pytest.approx(52.0)
    assert std == pytest.approx(((9 + 1 + 4) / 2) ** 0.5)   # sample std of 49, 53, 54
    assert c.status == "PASS"            # |52 - 50| = 2 is inside a tolerance of 2
    c.tolerance = 1.9
    assert c.status == "FAIL"
    c.tolerance = 1.0
    c.known_gap = "explained"
    assert c.status == "KNOWN GAP"
    c.runs.append({"seed": 3, "value": None, "seconds": 0.0, "error": "exit 2: boom"})
    assert c.status == "ERROR"


def test_regress_selects_by_tier_and_glob():
    regress = load_regress()
    cases = regress.load_cases()
    ci = regress.select(cases, "ci", [])
    assert ci and all(c.tier == "ci" for c in ci)
    der = regress.select(cases, None, ["der_seqmnist_*"])
    assert {c.name for c in der} == {n for n in FILES if n.startswith("der_seqmnist_")}


def test_regress_end_to_end_averages_seeds(tmp_path, tiny_data_dir):
    """Two seeds of one case on tiny data: the report's mean is the mean of the two runs'
    results.json values, and the exit status follows PASS/FAIL."""
    out = tmp_path / "RESULTS.md"
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "regress.py"), "der_seqmnist_sgd",
                           "--max-seeds", "2", "--jobs", "2", "--data-dir", str(tiny_data_dir),
                           "--out", str(out), "--workdir", str(work), "--", *TINY],
                          capture_output=True, text=True, timeout=600)
    values = [json.loads((work / "der_seqmnist_sgd" / f"seed_{s}" / "results.json").read_text())["avg_acc"]
              for s in (0, 1)]
    mean = sum(values) / 2
    status = "PASS" if abs(mean - 19.60) <= 1.5 else "FAIL"
    assert proc.returncode == (0 if status == "PASS" else 1), proc.stderr
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| der_seqmnist_sgd"))
    assert f"| {mean:.2f} +- " in row and f"| 2/10 | {status} |" in row
    assert "capped at 2 seeds" in text


def test_regress_reads_the_previous_reports_minutes(tmp_path):
    """The scheduler's durations come from the minutes column of the previous report."""
    regress = load_regress()
    report = tmp_path / "RESULTS.md"
    report.write_text("# x\n\n| name | metric | published | measured mean +- std | delta | tolerance | seeds "
                      "| status | minutes |\n|---|---|---|---|---|---|---|---|---|\n"
                      "| a_case | avg_acc | 50.00 | 49.00 +- 1.00 | -1.00 | 3.00 | 3/10 | PASS | 4.7 |\n"
                      "| b_case | avg_acc | 50.00 | - | - | 3.00 | 0/10 | ERROR | 0.3 |\n")
    assert regress.previous_minutes(report) == {"a_case": 4.7, "b_case": 0.3}
    assert regress.previous_minutes(tmp_path / "missing.md") == {}


def test_regress_report_names_paths_relative_to_the_checkout():
    """The report's command line shows a data folder beside the checkout as ../shared/data, a
    path inside it relative to it, and other values as given (no folder of the machine)."""
    parent = REPO.parent
    argv = ["--tier", "ci", "--data-dir", str(parent / "shared" / "data"), f"--out={REPO / 'docs' / 'R.md'}",
            "--workdir", "rel/work", "--", "data_dir=x"]
    assert regress_module.display_argv(argv) == ["--tier", "ci", "--data-dir", "../shared/data",
                                                 "--out=docs/R.md", "--workdir", "rel/work", "--", "data_dir=x"]
    assert regress_module.display_path("/elsewhere/data") == "/elsewhere/data"


def users_folder(tmp_path: Path, value: float) -> Path:
    """A user's folder with one experiment file of their own: clrun's der_seqmnist_sgd protocol
    under another name, with a published number of ``value``."""
    folder = tmp_path / "my_numbers"
    folder.mkdir()
    raw = (sweeps.EXPECTED_DIR / "der_seqmnist_sgd.yaml").read_text()
    node = OmegaConf.load(sweeps.EXPECTED_DIR / "der_seqmnist_sgd.yaml")
    old = f"value: {node.expected.value}"
    assert old in raw
    (folder / "my_seqmnist.yaml").write_text(raw.replace(old, f"value: {value}"))
    return folder


def test_clrun_runs_a_users_experiment_file_from_CLRUN_EXPECTED_DIRS(tmp_path, tiny_data_dir):
    folder = users_folder(tmp_path, 50.0)
    env = {"CLRUN_EXPECTED_DIRS": str(folder)}
    proc = run_clrun(["+expected=my_seqmnist", f"data_dir={tiny_data_dir}", f"hydra.run.dir={tmp_path / 'run'}",
                      "loggers=[]", *TINY], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    res = read_results(tmp_path / "run")
    assert res["expected"]["expected"] == 50.0 and res["config"]["benchmark"]["num_tasks"] == 5
    proc = run_clrun(["+expected=my_seqmnist"], cwd=tmp_path, env={"CLRUN_EXPECTED_DIRS": str(tmp_path / "nope")})
    assert proc.returncode == 2 and "CLRUN_EXPECTED_DIRS names" in proc.stderr and "not a folder" in proc.stderr


def test_regress_runs_a_users_folder_with_dir(tmp_path, tiny_data_dir):
    """``python -m cl_runner.regress --dir <folder>`` from another working directory: the user's
    files are the cases (any tier), each run finds its file, and the report goes to ./RESULTS.md."""
    folder = users_folder(tmp_path, 0.0)
    here = tmp_path / "here"
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CLRUN_EXPECTED_DIRS"}
    proc = subprocess.run([sys.executable, "-m", "cl_runner.regress", "--dir", str(folder), "--max-seeds", "1",
                           "--jobs", "1", "--data-dir", str(tiny_data_dir), "--workdir", "work", "--",
                           *TINY], capture_output=True, text=True, timeout=600, cwd=here, env=env)
    value = json.loads((here / "work" / "my_seqmnist" / "seed_0" / "results.json").read_text())["avg_acc"]
    status = "PASS" if abs(value - 0.0) <= 1.5 else "FAIL"
    assert proc.returncode == (0 if status == "PASS" else 1), proc.stdout + proc.stderr
    text = (here / "RESULTS.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| my_seqmnist"))
    assert f"| {value:.2f} +- " in row and f"| {status} |" in row
    assert "der_seqmnist_sgd" not in text.split("## Sources")[0]  # only the user's files ran
    missing = subprocess.run([sys.executable, "-m", "cl_runner.regress", "--dir", "nowhere"],
                             capture_output=True, text=True, cwd=here)
    assert missing.returncode == 2 and "--dir nowhere: no such folder" in missing.stderr
