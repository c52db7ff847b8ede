"""Versions recorded in every results file."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import cl_runner


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    root = Path(cl_runner.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def collect() -> dict:
    return {
        "python": platform.python_version(),
        "clrun": cl_runner.__version__,
        "torch": _dist_version("torch"),
        "jax": _dist_version("jax"),
        "numpy": _dist_version("numpy"),
        "hydra": _dist_version("hydra-core"),
        "git_sha": git_sha(),
        "platform": platform.platform(),
    }
