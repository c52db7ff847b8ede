"""The SGD step as one C pass over the parameters (CPU, float32).

With batches of 10, a step of an MLP on the CPU spends a large share of its time in passes over
the parameters after backward: a quadratic penalty's gradient (EWC, MAS: two passes), then
``torch.optim.SGD``'s momentum update (three). Each pass reads and writes every parameter, so the
five are bound by memory traffic. :class:`NativeSGD` does them in one pass, with a small C file
(native_sgd.c) compiled once per machine by the system's C compiler into clrun's cache
(``$CLRUN_CACHE_DIR``, else ``~/.cache/clrun``) and loaded with ctypes.

The C code performs the same float32 operations as PyTorch's CPU kernels, fused multiply-adds
where ATen's vectorised kernels use them, so with PyTorch's AVX2 or AVX-512 kernels (x86) the
step is bit for bit the one ``after_backward`` + ``optimizer.step()`` would take, and elsewhere
equal up to rounding (tests/test_native_sgd.py checks both). This is the ``c`` path of
``backend.update_path`` (update.py, which also has the library paths and records which ran); the
library is keyed by the source, the compiler and the CPU's features (cbuild.py), so a shared
cache serves machines of several kinds. Without a C compiler, on another CPU, on a GPU, or with
a case it does not cover (gradient clipping, other optimizers, other gradient terms), the
learner takes another path and results.json says which and why.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading
from pathlib import Path

import torch

from cl_runner.utils import cbuild

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_sgd.c")
HAS_QUAD, HAS_WD, HAS_MOMENTUM, NESTEROV = 1, 2, 4, 8

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the library could not be had (once known)


FLAGS = ("-ffp-contract=off",)


def compiler() -> list[str] | None:
    """The C compiler command (see :func:`cl_runner.utils.cbuild.compiler`)."""
    return cbuild.compiler()


def compiler_description() -> str:
    """The compiler that builds the library, as results.json records it."""
    return cbuild.describe(compiler())


def library_path(cache_dir: Path | None = None) -> Path:
    return cbuild.library_path(SOURCE, "sgd", cache_dir, compiler(), FLAGS)


def build(path: Path) -> None:
    """Compile native_sgd.c into ``path`` (written under a temporary name, then renamed)."""
    cbuild.compile_library(SOURCE, path, compiler(), FLAGS)


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None where they cannot be had."""
    global _library, _unavailable
    if _library is not None or _unavailable is not None:
        return _library
    with _lock:
        if _library is not None or _unavailable is not None:
            return _library
        try:
            path = library_path()
            if not path.exists():
                build(path)
            lib = ctypes.CDLL(str(path))
            if not lib.clrun_native_usable():
                raise RuntimeError(f"this CPU ({platform.machine()}) lacks hardware fused multiply-add")
            f = ctypes.c_float
            p = ctypes.c_void_p
            lib.clrun_sgd_update.argtypes = [ctypes.c_int64, p, p, p, p, p, p, ctypes.c_int,
                                             f, f, f, f, f, f]
            lib.clrun_sgd_update.restype = ctypes.c_int
            _library = lib
        except Exception as err:  # any failure leaves PyTorch's kernels in charge
            _unavailable = str(err)
            log.info("clrun: the native SGD update is unavailable (%s)", err)
    return _library


def unavailable_reason() -> str | None:
    library()
    return _unavailable


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


class NativeSGD:
    """After backward: an optional quadratic penalty's gradient (one ImportanceRegularizer part:
    EWC, MAS), then ``torch.optim.SGD``'s step, for a single parameter group of dense float32 CPU
    tensors. :meth:`__call__` returns False (and does nothing) for a step it cannot take: a
    parameter without a gradient, or momentum buffers not yet created (the first step)."""

    def __init__(self, lib, optimizer: torch.optim.SGD, penalty=None, name: str = "c"):
        self.lib = lib  # the C library, or anything with its clrun_sgd_update (update.py: numba)
        self.name = name
        self.optimizer = optimizer
        self.group = optimizer.param_groups[0]
        self.params = list(self.group["params"])
        self.penalty = penalty
        self.count = len(self.params)
        self.sizes = (ctypes.c_int64 * self.count)(*[p.numel() for p in self.params])
        self.param_ptrs = (ctypes.c_void_p * self.count)()
        self.grad_ptrs = (ctypes.c_void_p * self.count)()
        self._bufs: list | None = None
        self._buf_ptrs = None
        self._terms: tuple | None = None
        self._term_ptrs = (None, None)

    @classmethod
    def for_learner(cls, optimizer: torch.optim.Optimizer, grad_parts: list, grad_clip) -> "NativeSGD | None":
        """The C update for these parameters and gradient parts, or None where it does not apply
        (update.py's :func:`~cl_runner.backends.torch.update.coverage`) or no library can be had."""
        from cl_runner.backends.torch.update import coverage

        penalty, refusal = coverage(optimizer, grad_parts, grad_clip)
        lib = library() if refusal is None else None
        return None if lib is None else cls(lib, optimizer, penalty)

    @torch.no_grad()
    def __call__(self) -> bool:
        params = self.params
        grads = [p.grad for p in params]
        for g in grads:
            if g is None or not g.is_contiguous() or g.dtype != torch.float32 or g.is_sparse:
                return False
        group = self.group
        momentum, wd = group["momentum"], group["weight_decay"]
        flags = 0
        if momentum != 0:
            state = self.optimizer.state
            bufs = [state[p].get("momentum_buffer") for p in params]
            if self._bufs is None or any(a is not b for a, b in zip(bufs, self._bufs)):
                if any(b is None or not b.is_contiguous() for b in bufs):
                    return False
                self._bufs, self._buf_ptrs = bufs, _pointers(bufs)
            flags |= HAS_MOMENTUM | (NESTEROV if group["nesterov"] else 0)
        if wd != 0:
            flags |= HAS_WD
        omega_ptrs = anchor_ptrs = None
        c = 0.0
        part = self.penalty
        if part is not None and part.num_snapshots:
            # pointers rebuilt only when the part holds other tensors (a new snapshot, a resume)
            terms = (*part.omega, *part.omega_anchor)
            if self._terms is None or len(terms) != len(self._terms) or \
                    any(x is not y for x, y in zip(terms, self._terms)):
                if not all(t.is_contiguous() and t.dtype == torch.float32 for t in terms):
                    return False
                self._terms = terms
                self._term_ptrs = (_pointers(part.omega), _pointers(part.omega_anchor))
            omega_ptrs, anchor_ptrs = self._term_ptrs
            c = part.gradient_scale
            flags |= HAS_QUAD
        # (parameters and gradients are looked up every step: a gradient is a new tensor each time)
        param_ptrs, grad_ptrs = self.param_ptrs, self.grad_ptrs
        for i, (p, g) in enumerate(zip(params, grads)):
            param_ptrs[i] = p.data_ptr()
            grad_ptrs[i] = g.data_ptr()
        rc = self.lib.clrun_sgd_update(self.count, param_ptrs, grad_ptrs, omega_ptrs, anchor_ptrs,
                                       self._buf_ptrs if momentum != 0 else None, self.sizes, flags,
                                       c, -c, wd, momentum, 1 - group["dampening"], -group["lr"])
        if rc != 0:
            raise RuntimeError(f"clrun_sgd_update: unsupported flags {flags}")
        return True
