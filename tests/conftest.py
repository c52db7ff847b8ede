"""Shared fixtures: tiny IDX datasets in the real file format, and a way to run ``clrun``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cl_runner.data.idx import write_idx

REPO = Path(__file__).resolve().parent.parent


def _pin_parallel_worker() -> None:
    """Under pytest-xdist (``-n N``), give each worker its own share of the cores.

    Each worker's torch, XLA and the ``clrun`` processes it starts then size their thread pools
    to that share (clrun's ``threads: auto`` follows the CPU affinity), instead of every worker
    spreading over all cores and the workers slowing each other down.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return
    os.sched_setaffinity(0, cores[int(worker[2:]) % count::count])


_pin_parallel_worker()
# One JAX CPU device in every test process and the clrun processes the tests start, however the
# tests are run (the JAX backend otherwise makes one per usable core): the tests that count
# compilations or compare seeds trained together assume it. The multi-device test sets its own.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


def make_images(n: int, rng: np.random.Generator, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: class c lights a 6x6 block at a class-specific place, plus noise."""
    y = rng.integers(0, 10, size=n).astype(np.uint8)
    x = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
    for c in range(10):
        r, col = 3 + (c // 5) * 12, 2 + (c % 5) * 5
        x[y == c, r:r + 6, col:col + 5] = 230
    return x, y


def write_tiny_dataset(root: Path, name: str, n_train: int = 600, n_test: int = 200, seed: int = 0,
                       compress: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / name
    ext = ".gz" if compress else ""
    xtr, ytr = make_images(n_train, rng)
    xte, yte = make_images(n_test, rng)
    write_idx(folder / f"train-images-idx3-ubyte{ext}", xtr)
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", ytr)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", xte)
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", yte)
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A data_dir with tiny MNIST and Fashion-MNIST files (600 train / 200 test images)."""
    root = tmp_path_factory.mktemp("data")
    write_tiny_dataset(root, "mnist", seed=0)
    write_tiny_dataset(root, "fashion-mnist", seed=1)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets a cache directory of its own session, never the user's ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "clrun-cache"
    monkeypatch.setenv("CLRUN_CACHE_DIR", str(cache))
    monkeypatch.delenv("CLRUN_DATA_DIR", raising=False)
    # the user's own choices of kernel path and experiment folders do not reach the tests
    monkeypatch.delenv("CLRUN_GATHER", raising=False)
    monkeypatch.delenv("CLRUN_EXPECTED_DIRS", raising=False)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {SHARED_DATA} (the offline copy beside the checkout)")
    return SHARED_DATA


def run_clrun(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``clrun`` as a user would, in a subprocess."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cl_runner.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# Overrides that make any stream tiny and fast.
TINY = ["benchmark.batch_size=32", "benchmark.eval_batch_size=200", "backbone.width=32", "progress=false"]
