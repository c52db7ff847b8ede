"""Compiling clrun's small C kernels once per machine, into clrun's cache.

A kernel's shared library is named by a hash of its source, the compiler (its path and the
first line of its ``--version``), the flags, the platform and the CPU's model and features, so a
cache in a home folder shared by cluster nodes of several kinds, or a compiler upgrade, gives each
its own library rather than one that may not load or run there. It is built by the system's C
compiler under a temporary name and renamed into place (a run that is cut off leaves no
half-written library), and loaded with ctypes. Where no compiler exists the callers take another
path (a library kernel, NumPy or PyTorch code that computes the same values) and record which.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=8)
def _version_line(executable: str) -> str:
    try:
        done = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown version"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown version"


def describe(cmd: list[str] | None) -> str:
    """The compiler as a line: its resolved path and the first line of ``--version``."""
    if not cmd:
        return "no C compiler"
    path = shutil.which(cmd[0]) or cmd[0]
    return f"{' '.join([os.path.realpath(path), *cmd[1:]])} ({_version_line(path)})"


@functools.lru_cache(maxsize=1)
def cpu_features() -> str:
    """The CPU's model and feature flags (Linux: /proc/cpuinfo; elsewhere what the platform
    module says), for the libraries' cache key."""
    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "CPU part", "Model") and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    return f"{model or platform.processor()}|{flags}"


def library_path(source: Path, stem: str, cache_dir: Path | None = None, cmd: list[str] | None = None,
                 flags: tuple[str, ...] = ()) -> Path:
    """Where the library built from ``source`` by ``cmd`` with ``flags`` lives: keyed by the
    source, the compiler, the flags, the platform and the CPU (see the module's docstring)."""
    from cl_runner.data.datasets import default_cache_dir

    parts = [source.read_bytes(), platform.machine().encode(), platform.system().encode(),
             describe(cmd).encode(), " ".join(flags).encode(), cpu_features().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
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
