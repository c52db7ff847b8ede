"""One writer per run folder.

A run takes an exclusive ``flock`` on ``<run dir>/.clrun.lock`` for as long as it writes there; a
second run pointed at the same folder (a repeated command, two cluster jobs with the same
``hydra.run.dir``) stops at once with an error naming the first one, instead of both running and
overwriting each other's results. The kernel releases the lock when its process ends, however it
ends (exit, crash, SIGKILL), so a killed run never leaves a folder locked; the file itself stays
(deleting a lock file while others may open it would let two writers in).

Locks are counted per process: the command line takes the lock before Hydra writes its files into
the folder, and the run inside takes it again without blocking itself. Where ``fcntl`` does not
exist (Windows) no lock is taken.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".clrun.lock"

# Locks this process holds: resolved folder -> [file descriptor, count].
_held: dict[str, list[int]] = {}


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    pid, _, host = text.partition(" ")
    return f" (pid {pid}{' on ' + host if host else ''})" if pid.isdigit() else ""


def acquire(directory: str | os.PathLike) -> None:
    """Take the lock of ``directory`` (created if needed), or raise a ClrunError when another
    process holds it. Each call is paired with a :func:`release`; a process that never releases
    holds the lock until it ends."""
    from cl_runner.errors import ClrunError

    d = Path(directory).expanduser().resolve()
    key = str(d)
    if key in _held:
        _held[key][1] += 1
        return
    if fcntl is None:  # pragma: no cover
        _held[key] = [-1, 1]
        return
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as ex:
        os.close(fd)
        if ex.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise ClrunError(f"another clrun run{_holder(path)} is writing to {d}; two runs in one folder "
                         f"would overwrite each other's results. Wait for it to finish, or choose "
                         f"another folder with hydra.run.dir=<dir>.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _held[key] = [fd, 1]


def release(directory: str | os.PathLike) -> None:
    key = str(Path(directory).expanduser().resolve())
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[key]
    if entry[0] >= 0:
        os.close(entry[0])  # closing the only descriptor of the file releases the flock


def held(directory: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``directory``."""
    return str(Path(directory).expanduser().resolve()) in _held


@contextlib.contextmanager
def run_dir_lock(directory: str | os.PathLike):
    """The lock of ``directory`` for the duration of a ``with`` block."""
    acquire(directory)
    try:
        yield
    finally:
        release(directory)
