"""Compiling clrun's small C kernels once per machine, into clrun's cache.

A kernel's shared library is named by a hash of its source and the platform, built by the
system's C compiler under a temporary name and renamed into place (a run that is cut off leaves
no half-written library), and loaded with ctypes. Where no compiler exists the callers fall back
to NumPy or PyTorch code that computes the same values.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path


def compiler() -> list[str] | None:
    """The C compiler command: $CC, else Python's own, else cc / gcc / clang on the PATH."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC")):
        if candidate:
            cmd = shlex.split(candidate)
            if cmd and shutil.which(cmd[0]):
                return cmd
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def library_path(source: Path, stem: str, cache_dir: Path | None = None) -> Path:
    """Where the library built from ``source`` lives: keyed by the source and the platform."""
    from cl_runner.data.datasets import default_cache_dir

    key = hashlib.sha256(source.read_bytes() + platform.machine().encode()
                         + platform.system().encode()).hexdigest()[:16]
    return (cache_dir or default_cache_dir()) / "native" / f"{stem}-{key}.so"


def compile_library(source: Path, path: Path, cmd: list[str] | None, flags: tuple[str, ...] = ()) -> None:
    """Compile ``source`` into the shared library ``path`` with the compiler command ``cmd``."""
    if cmd is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(fd)
    try:
        args = [*cmd, "-O3", *flags, "-fPIC", "-shared", str(source), "-o", tmp, "-lm"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
