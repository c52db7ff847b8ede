"""Tasks made by remapping a dataset's pixels, kept as the recipe rather than the pixels.

A task of Rotated MNIST (one angle per task, nearest-neighbour) or Permuted MNIST is the source
split's images with every output pixel taken from one fixed source pixel: a :class:`PixelGather`,
an index over the H*W pixels plus, for subsets, the rows drawn. The stream cache stores the
source split once and each task's index (a few kilobytes) instead of the task's pixels: for 20
Rotated-MNIST tasks, 55 MB instead of 1.1 GB. Loading gathers the tasks again, with a small C
kernel (gather.c, compiled once per machine into clrun's cache) on every core, or NumPy's
``take`` where no C compiler exists. Both give the same bytes as building the stream anew.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cl_runner.utils import cbuild

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gather.c")
CHUNK_ROWS = 4096  # rows per job handed to a thread

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
            path = cbuild.library_path(SOURCE, "gather")
            if not path.exists():
                cbuild.compile_library(SOURCE, path, cbuild.compiler())
            lib = ctypes.CDLL(str(path))
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            lib.clrun_gather_pixels.argtypes = [p, i64, p, i64, i64, i64, i64, p, p]
            lib.clrun_gather_pixels.restype = ctypes.c_int
            _library = lib
        except Exception as err:  # NumPy computes the same bytes, more slowly
            _unavailable = str(err)
            log.info("clrun: the native pixel gather is unavailable (%s); NumPy is used", err)
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


def _gather_rows(lib, base: np.ndarray, g: PixelGather, out: np.ndarray, start: int, stop: int) -> None:
    n, c, h, w = base.shape
    if lib is not None:
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


def gather_all(bases: dict[str, np.ndarray], gathers: list[PixelGather],
               native: bool = True, threads: int | None = None) -> list[np.ndarray]:
    """The images of each gather in ``gathers``, computed on ``threads`` threads (every core by
    default). The C kernel releases the GIL, so the threads run in parallel."""
    lib = library() if native else None
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
            _gather_rows(lib, *job)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for done in [pool.submit(_gather_rows, lib, *job) for job in jobs]:
                done.result()
    return outs


def rotation_index(angle_deg: float, h: int, w: int) -> np.ndarray:
    """The source pixel of every output pixel of a nearest-neighbour rotation by ``angle_deg``
    (PIL's rule, as :func:`cl_runner.benchmarks.transforms.rotate`), -1 outside the image."""
    from cl_runner.benchmarks.transforms import _fixed_point_source_pixels

    ix, iy = _fixed_point_source_pixels(np.asarray([angle_deg], dtype=np.float64), h, w)
    inside = (ix[0] >= 0) & (ix[0] < w) & (iy[0] >= 0) & (iy[0] < h)
    return np.where(inside, iy[0] * w + ix[0], -1).astype(np.int32)
