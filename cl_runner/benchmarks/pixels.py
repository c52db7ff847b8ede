"""Tasks made by remapping a dataset's pixels, kept as the recipe rather than the pixels.

A task of Rotated MNIST (one angle per task, nearest-neighbour) or Permuted MNIST is the source
split's images with every output pixel taken from one fixed source pixel: a :class:`PixelGather`,
an index over the H*W pixels plus, for subsets, the rows drawn. The stream cache stores the
source split once and each task's index (a few kilobytes) instead of the task's pixels: for 20
Rotated-MNIST tasks, 55 MB instead of 1.1 GB. Loading gathers the tasks again, on every core,
by one of three paths that give the same bytes as building the stream anew:

``c``      gather.c, compiled once per machine by the system's C compiler into clrun's cache;
``torch``  ``torch.index_select`` over each channel's pixels (PyTorch's own kernel);
``numpy``  NumPy's ``take`` (always there).

``$CLRUN_GATHER`` (``auto`` by default) picks one; ``auto`` takes the first of
:data:`AUTO_ORDER` that this machine has, the one switch that keeps or drops the C kernel as the
default (scripts/bench_kernels.py measures the paths side by side). A stream records which path
made its images and why (``Stream.gather``, results.json ``kernels.gather``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cl_runner.utils import cbuild

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gather.c")
CHUNK_ROWS = 4096  # rows per job handed to a thread
PATHS = ("c", "torch", "numpy")
#: ``auto`` takes the first of these that this machine has (see the module's docstring).
AUTO_ORDER = ("torch", "numpy")
GATHER_ENV = "CLRUN_GATHER"

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_unavailable: str | None = None


@dataclass(frozen=True)
class PixelGather:
    """``out[i, c, j] = base[rows[i], c, index[j]]`` over each channel's flattened H*W pixels,
    and 0 where ``index[j] < 0``. ``rows`` None means every row of the base, in order."""

    split: str  # which source split: "train" or "test"
    index: np.ndarray  # int32, shape (H*W,)
    rows: np.ndarray | None = None  # int64 row numbers into the base


@dataclass
class GatherPlan:
    """How a stream's task images derive from its source splits (the cache stores this)."""

    bases: dict[str, np.ndarray]  # split -> (N, C, H, W) uint8
    parts: dict[tuple[int, str], PixelGather] = field(default_factory=dict)  # (task id, "train_x")


@contextlib.contextmanager
def small_pages():
    """NumPy asks Linux for transparent huge pages for its large arrays. A stream build allocates
    over a gigabyte of arrays it writes once; on virtual machines where a huge-page fault is slow
    (2 MB zeroed at a time) that dominated the build (9.5 s against 3.0 s for the 20 rotated tasks
    on this project's 2-core machine), so stream arrays are allocated with ordinary pages."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            _set_madvise_hugepage = None
    if _set_madvise_hugepage is None:
        yield
        return
    before = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(before)


def library() -> ctypes.CDLL | None:
    """The compiled gather kernel (built on first use), or None where it cannot be had."""
    global _library, _unavailable
    if _library is not None or _unavailable is not None:
        return _library
    with _lock:
        if _library is not None or _unavailable is not None:
            return _library
        try:
            cmd = cbuild.compiler()
            path = cbuild.library_path(SOURCE, "gather", None, cmd)
            if not path.exists():
                cbuild.compile_library(SOURCE, path, cmd)
            lib = ctypes.CDLL(str(path))
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            lib.clrun_gather_pixels.argtypes = [p, i64, p, i64, i64, i64, i64, p, p]
            lib.clrun_gather_pixels.restype = ctypes.c_int
            _library = lib
        except Exception as err:  # NumPy computes the same bytes, more slowly
            _unavailable = str(err)
            log.info("clrun: the native pixel gather is unavailable (%s)", err)
    return _library


def unavailable_reason() -> str | None:
    library()
    return _unavailable


def _check(base: np.ndarray, g: PixelGather) -> None:
    if base.dtype != np.uint8 or base.ndim != 4 or not base.flags.c_contiguous:
        raise ValueError(f"pixel gather: the base must be contiguous uint8 (N, C, H, W), "
                         f"got {base.dtype} {base.shape}")
    hw = base.shape[2] * base.shape[3]
    if g.index.dtype != np.int32 or g.index.shape != (hw,):
        raise ValueError(f"pixel gather: the index must be int32 of shape ({hw},), "
                         f"got {g.index.dtype} {g.index.shape}")
    if hw and (g.index.min() < -1 or g.index.max() >= hw):
        raise ValueError(f"pixel gather: index values must lie in [-1, {hw})")
    if g.rows is not None:
        if g.rows.dtype != np.int64 or g.rows.ndim != 1:
            raise ValueError(f"pixel gather: rows must be a 1-D int64 array, got {g.rows.dtype} {g.rows.shape}")
        if len(g.rows) and (g.rows.min() < 0 or g.rows.max() >= len(base)):
            raise ValueError(f"pixel gather: rows must lie in [0, {len(base)})")


def choose(path: str | None = None) -> tuple[str, str]:
    """(the gather path to run, why) for ``path`` (default ``$CLRUN_GATHER``, else ``auto``).
    An explicit path this machine lacks is an error naming the reason."""
    from cl_runner.errors import ConfigError

    requested = (path or os.environ.get(GATHER_ENV) or "auto").strip().lower()
    if requested != "auto" and requested not in PATHS:
        raise ConfigError(f"${GATHER_ENV}={requested} is not a gather path: use auto, {', '.join(PATHS)}.")
    source = f"${GATHER_ENV}={requested}" if path is None else f"gather path {requested}"
    skipped = []
    for candidate in (AUTO_ORDER if requested == "auto" else (requested,)):
        reason = unavailable_reason() if candidate == "c" else None
        if reason is None:
            detail = {"c": f"gather.c built by {cbuild.describe(cbuild.compiler())}",
                      "torch": "torch.index_select", "numpy": "numpy.take"}[candidate]
            return candidate, f"{source}: {detail}" + (f" ({'; '.join(skipped)})" if skipped else "")
        if requested != "auto":
            raise ConfigError(f"{source}: the C gather is unavailable here ({reason}); use auto, torch or numpy.")
        skipped.append(f"{candidate} unavailable ({reason})")
    return "numpy", f"{source}: numpy.take ({'; '.join(skipped)})"


def _gather_rows(lib, base: np.ndarray, g: PixelGather, out: np.ndarray, start: int, stop: int,
                 path: str = "numpy") -> None:
    n, c, h, w = base.shape
    if path == "torch":
        import torch

        with warnings.catch_warnings():  # a read-only map of the cache: only read here
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(base[start:stop] if g.rows is None else base[g.rows[start:stop]])
        dst = torch.from_numpy(out[start:stop]).view(stop - start, c, h * w)
        index = torch.from_numpy(np.maximum(g.index, 0).astype(np.int64))
        torch.index_select(src.reshape(stop - start, c, h * w), 2, index, out=dst)
        outside = np.flatnonzero(g.index < 0)
        if len(outside):
            dst[:, :, torch.from_numpy(outside)] = 0
        return
    if path == "c":
        rows = None if g.rows is None else g.rows.ctypes.data
        rc = lib.clrun_gather_pixels(base.ctypes.data, c * h * w, rows, start, stop, c, h * w,
                                     g.index.ctypes.data, out.ctypes.data)
        if rc != 0:
            raise MemoryError("pixel gather: the C kernel could not allocate its index tables")
        return
    src = base[start:stop] if g.rows is None else base[g.rows[start:stop]]
    dst = out[start:stop].reshape(stop - start, c, h * w)
    np.take(src.reshape(stop - start, c, h * w), np.maximum(g.index, 0), axis=2, out=dst)
    dst[:, :, g.index < 0] = 0


def workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def gather_all(bases: dict[str, np.ndarray], gathers: list[PixelGather], native: bool = True,
               threads: int | None = None, path: str | None = None,
               record: dict | None = None) -> list[np.ndarray]:
    """The images of each gather in ``gathers``, computed on ``threads`` threads (every core by
    default) by the gather ``path`` (default: :func:`choose`'s; ``native=False``: numpy). The C
    kernel, NumPy's take and PyTorch's index_select release the GIL, so the threads run in
    parallel. ``record`` (a dict) receives the path that ran and why."""
    chosen, why = ("numpy", "gather path numpy (native=False)") if not native and path is None else choose(path)
    lib = library() if chosen == "c" else None
    if record is not None:
        record.update(path=chosen, why=why)
    outs = []
    jobs = []
    with small_pages():
        for g in gathers:
            base = bases[g.split]
            _check(base, g)
            n = len(base) if g.rows is None else len(g.rows)
            out = np.empty((n,) + base.shape[1:], dtype=np.uint8)
            outs.append(out)
            jobs += [(base, g, out, a, min(n, a + CHUNK_ROWS)) for a in range(0, n, CHUNK_ROWS)]
    threads = threads or workers()
    if threads == 1 or len(jobs) <= 1:
        for job in jobs:
            _gather_rows(lib, *job, path=chosen)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for done in [pool.submit(_gather_rows, lib, *job, path=chosen) for job in jobs]:
                done.result()
    return outs


def rotation_index(angle_deg: float, h: int, w: int) -> np.ndarray:
    """The source pixel of every output pixel of a nearest-neighbour rotation by ``angle_deg``
    (PIL's rule, as :func:`cl_runner.benchmarks.transforms.rotate`), -1 outside the image."""
    from cl_runner.benchmarks.transforms import _fixed_point_source_pixels

    ix, iy = _fixed_point_source_pixels(np.asarray([angle_deg], dtype=np.float64), h, w)
    inside = (ix[0] >= 0) & (ix[0] < w) & (iy[0] >= 0) & (iy[0] < h)
    return np.where(inside, iy[0] * w + ix[0], -1).astype(np.int32)
