"""``clrun --rerun <run dir>``: a saved run's config run again (cl_runner/rerun.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_runner import rerun, versions
from cl_runner.errors import ConfigError
from conftest import TINY, read_results, run_clrun

# EWC (the penalty and SGD update after the first task) with a lambda that is not the default,
# so a re-run that composed today's defaults instead of the saved config would differ.
RUN = ["algo=ewc", "algo.ewc_lambda=7.5", "benchmark=permutedmnist", "benchmark.num_tasks=2",
       "optimizer.momentum=0.8", "loggers=[]", *TINY]


def test_rerun_gives_the_same_numbers_from_another_folder(tmp_path, tiny_data_dir):
    first = tmp_path / "first"
    proc = run_clrun([*RUN, f"data_dir={tiny_data_dir}", f"hydra.run.dir={first}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # from another working directory, by a relative path, into the default output folder
    proc = run_clrun(["--rerun", "../first"], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    again, = list((elsewhere / "outputs").glob("*/*"))
    a, b = read_results(first), read_results(again)
    assert b["config"] == a["config"]
    assert b["config"]["algo"]["ewc_lambda"] == 7.5
    assert b["acc_matrix"] == a["acc_matrix"]
    assert b["avg_acc"] == a["avg_acc"] and b["forgetting"] == a["forgetting"]
    # Hydra's copies in the new folder make it a re-runnable artefact in turn
    assert (again / ".hydra" / "config.yaml").is_file()

    # recorded versions that differ from today's: a warning naming them, and the run goes on
    data = json.loads((first / "results.json").read_text())
    data["versions"]["torch"] = "1.0.0"
    data["versions"]["clrun"] = "0.0.1"
    (first / "results.json").write_text(json.dumps(data))
    proc = run_clrun(["--rerun", str(first), f"hydra.run.dir={tmp_path / 'third'}", "benchmark.num_tasks=1"],
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr
    assert "torch 1.0.0 then" in proc.stderr and "clrun 0.0.1 then" in proc.stderr
    # an override after the folder applies to the saved config
    assert read_results(tmp_path / "third")["config"]["benchmark"]["num_tasks"] == 1


def test_rerun_of_a_folder_that_is_no_run(tmp_path):
    proc = run_clrun(["--rerun", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2 and "no results.json, aggregate.json or .hydra/config.yaml" in proc.stderr
    proc = run_clrun(["--rerun", str(tmp_path / "missing")], cwd=tmp_path)
    assert proc.returncode == 2 and "no such folder" in proc.stderr
    proc = run_clrun(["--rerun"], cwd=tmp_path)
    assert proc.returncode == 2 and "--rerun needs the folder of a run" in proc.stderr


def test_version_differences():
    import torch

    now = {**versions.collect(), "torch": torch.__version__}
    same = {k: now[k] for k in ("clrun", "torch", "jax")}
    assert rerun.version_differences(same, "torch") == []
    assert rerun.version_differences(None, "torch") == []
    assert rerun.version_differences({**same, "torch": "0.1"}, "torch") == [
        f"torch 0.1 then, {now['torch']} now"]
    # jax missing on one side matters only to a jax run
    assert rerun.version_differences({**same, "jax": None}, "torch") == []
    if now["jax"] is not None:
        assert rerun.version_differences({**same, "jax": None}, "jax") == [
            f"jax not installed then, {now['jax']} now"]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_saved_config_of_a_seeds_run_and_of_an_unfinished_run(tmp_path):
    """A seeds=[...] folder: the first seed's config with the seeds set back; a folder with only
    Hydra's copy: that copy, resolved now, with a warning that no versions were recorded."""
    seeds_dir = tmp_path / "seeds"
    config = {"seed": 3, "seeds": None, "algo": {"name": "naive"}, "backend": {"name": "torch"}}
    write_json(seeds_dir / "seed=3" / "results.json", {"config": config, "versions": {"clrun": "x"}})
    write_json(seeds_dir / "aggregate.json", {"seeds": [3, 4], "runs": ["seed=3/results.json",
                                                                       "seed=4/results.json"]})
    saved, recorded, source = rerun._results_of(seeds_dir)
    assert saved["seeds"] == [3, 4] and saved["seed"] == 3 and saved["algo"] == {"name": "naive"}
    assert recorded == {"clrun": "x"} and source.endswith("aggregate.json")

    cut = tmp_path / "cut"
    (cut / ".hydra").mkdir(parents=True)
    (cut / ".hydra" / "config.yaml").write_text("seed: 1\nx: ${seed}\n")
    warnings = []
    folder = rerun.prepare(str(cut), warnings.append)
    try:
        text = (folder / f"{rerun.CONFIG_NAME}.yaml").read_text()
    finally:
        rerun.cleanup(folder)
    assert "x: 1" in text and "hydra:" in text  # resolved, with clrun's output folders
    assert warnings == [f"re-running {cut / '.hydra' / 'config.yaml'}: the run recorded no versions to compare."]

    bad = tmp_path / "bad"
    write_json(bad / "results.json", {})
    (bad / "results.json").write_text("{not json")
    with pytest.raises(ConfigError, match="could not be read"):
        rerun._results_of(bad)
