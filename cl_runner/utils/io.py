"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


# Permissions of the files a run writes: readable by the group and others, like files created
# with the usual umask 022 (mkstemp alone would make them 0600).
FILE_MODE = 0o644


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read it
    would briefly change it for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_fd(fd: int, data: bytes, path: Path) -> None:
    """Write all of ``data`` to ``fd`` and flush it to the disk (``path`` names the file)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _free_space(directory: Path) -> str:
    import shutil

    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "unknown"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if free >= size:
            return f"{free / size:.1f} {unit}"
    return f"{free} bytes"


def write_error(path: Path, ex: OSError):
    """The WriteError for a failed write of ``path``: names the file and, when the disk (or
    quota) is full, the space left."""
    import errno

    from cl_runner.errors import WriteError

    if isinstance(ex, WriteError):
        return ex
    why = ex.strerror or str(ex)
    if ex.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"the disk is full ({why}; {_free_space(path.parent)} free in {path.parent})"
    return WriteError(f"could not write {path}: {why}. Free some space or write elsewhere "
                      f"(hydra.run.dir=<dir>); files already complete are intact.", ex.errno)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` so that a reader sees the old file or the new one, never part of one: a
    temporary file in the same folder, flushed to the disk, renamed over ``path``. The file gets
    mode 0644 less the umask. A failure is a :class:`cl_runner.errors.WriteError` (an OSError)
    naming the file and, on a full disk, the space left; the old file is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as ex:
        raise write_error(path, ex) from None
    try:
        try:
            os.fchmod(fd, FILE_MODE & ~_umask())
            _write_fd(fd, data, path)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as ex:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(ex, OSError):
            raise write_error(path, ex) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """NumPy arrays/scalars to lists/numbers; NaN and inf to None (JSON has neither)."""
    try:
        import numpy as np

        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
        if isinstance(obj, np.generic):
            return to_jsonable(obj.item())
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove it is writable, or raise a ClrunError."""
    from cl_runner.errors import ClrunError

    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as ex:
        raise ClrunError(f"the output directory {d} is not writable ({ex.strerror}). Choose another "
                         f"with hydra.run.dir=/some/writable/dir (or hydra.sweep.dir for -m).") from None
    return d
