"""Where clrun finds its own folders (cl_runner/resources.py), in a checkout and in an installed
wheel, and a user's folder of experiment files composed with clrun's groups. The wheel itself is
built, installed and run from outside the checkout by scripts/wheel_smoke.sh (CI)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from cl_runner import resources
from conftest import REPO, run_clrun


def test_a_checkout_reads_its_own_top_level_folders():
    assert resources.checkout_dir() == REPO
    assert resources.CONF_DIR == REPO / "conf"
    assert resources.SWEEPS_DIR == REPO / "sweeps"
    assert resources.EXPECTED_DIR == REPO / "expected_results"


def test_setup_py_ships_the_folders_resources_looks_for():
    """setup.py's package-dir mapping and resources.py name the same folders."""
    tree = ast.parse((REPO / "setup.py").read_text())
    mapping = next(ast.literal_eval(node.value) for node in tree.body
                   if isinstance(node, ast.Assign) and node.targets[0].id == "DATA_FOLDERS")
    assert {name.split(".")[1]: folder for name, folder in mapping.items()} == \
        {packaged: top for packaged, top in resources._FOLDERS.values()}
    for folder in mapping.values():
        assert list((REPO / folder).glob("*.yaml")), folder


def test_an_installed_package_reads_its_package_data(tmp_path, monkeypatch):
    """The layout of the wheel: cl_runner/_conf etc. beside the modules, no checkout around."""
    package = tmp_path / "site-packages" / "cl_runner"
    for packaged, _ in resources._FOLDERS.values():
        (package / packaged).mkdir(parents=True)
    monkeypatch.setattr(resources, "PACKAGE_DIR", package)
    assert resources.checkout_dir() is None
    assert resources._folder("conf") == package / "_conf"
    assert resources._folder("expected") == package / "_expected"
    (package / "_sweeps").rmdir()
    with pytest.raises(FileNotFoundError, match="sweeps/ folder is missing.*Reinstall clrun"):
        resources._folder("sweeps")


def test_a_users_folder_composes_with_clruns_groups(tmp_path):
    """``clrun --config-dir my_exps +exp=my_ewc``: the user's group ``exp`` sets clrun's groups
    and keys; ``hydra.searchpath`` does the same."""
    exp = tmp_path / "my_exps" / "exp"
    exp.mkdir(parents=True)
    (exp / "my_ewc.yaml").write_text("# @package _global_\ndefaults:\n  - override /algo: ewc\n"
                                     "  - override /benchmark: permutedmnist\n\nalgo:\n  ewc_lambda: 100\n"
                                     "benchmark:\n  num_tasks: 3\n")
    for args in (["--config-dir", "my_exps"], ["hydra.searchpath=[file://my_exps]"]):
        proc = run_clrun([*args, "+exp=my_ewc", "--cfg", "job"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        cfg = yaml.safe_load(proc.stdout)
        assert cfg["algo"]["name"] == "ewc" and cfg["algo"]["ewc_lambda"] == 100
        assert cfg["benchmark"]["name"] == "permutedmnist" and cfg["benchmark"]["num_tasks"] == 3
        assert cfg["backbone"]["type"] == "mlp"  # clrun's own defaults fill the rest
    proc = run_clrun(["--config-dir", "my_exps", "+exp=my_ewcc", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode != 0 and "my_ewcc" in proc.stderr


def test_nothing_names_a_folder_of_the_machine():
    """No tracked text file names an absolute path under /work/ or /root/ (a path of the
    machine the file was generated on)."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    bad = []
    for name in files:
        path = REPO / name
        if path.suffix in (".png", ".jpg", ".gz", ".npy") or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        for marker in ("/work/", "/root/"):
            if marker in text and name != Path(__file__).relative_to(REPO).as_posix():
                bad.append(f"{name}: {marker}")
    assert not bad, bad
