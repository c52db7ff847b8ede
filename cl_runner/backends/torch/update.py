"""The parameter update after backward on a CPU, by one of several interchangeable paths.

An update is an optional quadratic penalty's gradient (one ImportanceRegularizer part: EWC, MAS),
then ``torch.optim.SGD``'s step, for one parameter group of dense float32 CPU tensors. At batch
10 these passes over the parameters are bound by memory traffic, so doing them in fewer passes
pays (docs/PERFORMANCE.md). ``backend.update_path`` picks the path:

============  =============================================================================
``c``         native_sgd.c: one pass, compiled at run time by the system's C compiler into
              clrun's cache (native.py). Bit for bit the foreach path on x86 with AVX2/AVX-512.
``numba``     the same loop as native_sgd.c, compiled by numba (which ships its own LLVM: no
              system compiler) into a C callback called the same way; fused multiply-adds
              exactly where native_sgd.c has them, so the same numbers. ``pip install numba``.
``compile``   ``torch.compile`` of the foreach update below (TorchInductor; on a CPU it
              generates C++ and needs a C++ compiler too); compiled once per process.
``fused``     the penalty with ``torch._foreach_*`` ops, then PyTorch's fused SGD kernel
              (``torch._fused_sgd_``, what ``torch.optim.SGD(fused=True)`` runs).
``foreach``   the penalty and SGD with ``torch._foreach_*`` ops, as ``torch.optim.SGD``'s
              foreach implementation does (fused.py's ``sgd_step``): needs nothing, always there.
``auto``      the first path of :data:`AUTO_ORDER` that this machine has.
============  =============================================================================

Where no path applies (another optimizer, gradient clipping, a part with its own
``after_backward``, a GPU), or for a step a path cannot take (the first step, which creates the
momentum buffers), the learner runs the foreach path (or ``optimizer.step()`` where fused.py's
step does not apply: ``optim``). :class:`UpdateRecord` counts the steps each path took and says
why, and results.json stores it under ``kernels.update``: a fallback is recorded, never silent.
An explicitly requested path that this machine lacks is a configuration error.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch

from cl_runner.backends.torch import native
from cl_runner.errors import ConfigError

log = logging.getLogger(__name__)

PATHS = ("c", "numba", "compile", "fused", "foreach")
#: ``backend.update_path=auto`` takes the first of these that this machine has. This tuple is the
#: one switch that keeps or drops the hand-written kernel as the default (scripts/bench_kernels.py
#: measures every path side by side on the reference experiment).
AUTO_ORDER = ("numba", "foreach")
#: The fallbacks, named as results.json names them: fused.py's foreach step, or optimizer.step().
FOREACH, OPTIM = "foreach", "optim"


@dataclass
class UpdateRecord:
    """Which update path ran and why (results.json ``kernels.update``)."""

    requested: str
    path: str  # the path chosen for the learner's steps
    why: str
    steps: Counter = field(default_factory=Counter)  # path -> steps it took

    def as_dict(self) -> dict:
        why = self.why
        if self.path == "compile" and CompiledSGD.failed:
            why += f"; then {CompiledSGD.failed}"
        out = {"requested": self.requested, "path": self.path, "why": why,
               "steps": dict(sorted(self.steps.items()))}
        if self.path not in (FOREACH, OPTIM) and self.steps.get(FOREACH):
            out["foreach_steps"] = ("steps the path cannot take ran foreach: the first step, which "
                                    "creates the momentum buffers, and any step without a gradient")
        return out


def requested_path(backend_cfg) -> str:
    """``backend.update_path``, with the older ``backend.native_update=false`` read as ``foreach``."""
    path = str(getattr(backend_cfg, "update_path", "auto") or "auto")
    if not bool(getattr(backend_cfg, "native_update", True)):
        if path not in ("auto", FOREACH):
            raise ConfigError(f"backend.native_update=false asks for PyTorch's kernels, but "
                              f"backend.update_path={path}: set one of them (backend.update_path={FOREACH} is "
                              f"what native_update=false means).")
        return FOREACH
    if path != "auto" and path not in PATHS:
        from cl_runner.errors import did_you_mean

        raise ConfigError(f"config key 'backend.update_path': '{path}' is not an update path."
                          f"{did_you_mean(path, list(PATHS))} Valid: auto, {', '.join(PATHS)}.")
    return path


# -- which steps a path can take ------------------------------------------------------------------
def coverage(optimizer: torch.optim.Optimizer, grad_parts: list, grad_clip):
    """(the penalty part or None, None) where one pass can do the update, else (None, why not)."""
    from cl_runner.backends.torch.regularization import ImportanceRegularizer

    if grad_clip:
        return None, "gradient clipping"
    if len(optimizer.param_groups) != 1:
        return None, "several parameter groups"
    params = optimizer.param_groups[0]["params"]
    if not params or not all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
                             and p.requires_grad for p in params):
        return None, "parameters that are not dense float32 CPU tensors"
    if not grad_parts:
        return None, None
    if len(grad_parts) > 1:
        return None, "several parts change the gradient"
    part = grad_parts[0]
    # exactly the shared penalty gradient (no subclass or instance replaces after_backward)
    if not ImportanceRegularizer.adds_only_the_penalty(part) or \
            [id(p) for p in part.params] != [id(p) for p in params]:
        return None, f"{type(part).__name__} changes the gradient in its own way"
    return part, None


# -- the paths' machinery -------------------------------------------------------------------------
_lock = threading.Lock()
_numba_lib = None
_numba_unavailable: str | None = None


class _NumbaLibrary:
    """numba's compilation of native_sgd.c's loop, called as the C library's function is."""

    def __init__(self, address: int):
        f, p = ctypes.c_float, ctypes.c_void_p
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, p, p, p, p, p, p, ctypes.c_int, f, f, f, f, f, f)
        self.clrun_sgd_update = proto(address)


def numba_library():
    """The numba-compiled update (compiled on first use; cached by numba), or None."""
    global _numba_lib, _numba_unavailable
    if _numba_lib is not None or _numba_unavailable is not None:
        return _numba_lib
    with _lock:
        if _numba_lib is None and _numba_unavailable is None:
            try:
                from cl_runner.backends.torch import numba_sgd

                _numba_lib = _NumbaLibrary(numba_sgd.compiled().address)
            except ImportError as err:
                _numba_unavailable = f"numba is not installed ({err}; pip install numba)"
            except Exception as err:  # noqa: BLE001 - any failure: the path is unavailable, and says why
                _numba_unavailable = f"numba could not compile the update: {err}"
    return _numba_lib


def numba_unavailable_reason() -> str | None:
    numba_library()
    return _numba_unavailable


def fused_unavailable_reason() -> str | None:
    """Why PyTorch's fused SGD kernel cannot run on CPU tensors here (None: it can)."""
    if not hasattr(torch, "_fused_sgd_"):
        return f"torch {torch.__version__} has no fused SGD kernel"
    try:
        p, g, b = torch.ones(3), torch.ones(3), torch.zeros(3)
        torch._fused_sgd_([p], [g], [b], weight_decay=0.0, momentum=0.5, lr=0.5, dampening=0.0,
                          nesterov=False, maximize=False, is_first_step=False)
    except Exception as err:  # noqa: BLE001
        return f"torch {torch.__version__}'s fused SGD kernel does not run on CPU tensors ({err})"
    return None


def unavailable_reason(path: str) -> str | None:
    """Why ``path`` cannot run on this machine (None: it can, as far as can be known before a step;
    ``compile`` is known only at its first step)."""
    if path == "c":
        return native.unavailable_reason()
    if path == "numba":
        return numba_unavailable_reason()
    if path == "fused":
        return fused_unavailable_reason()
    if path == "compile":
        return None if hasattr(torch, "compile") else f"torch {torch.__version__} has no torch.compile"
    return None


class FusedSGD:
    """The penalty's gradient with foreach ops (the part's own after_backward), then
    ``torch._fused_sgd_`` with the optimizer's momentum buffers."""

    name = "fused"

    def __init__(self, optimizer: torch.optim.SGD, penalty=None):
        self.optimizer = optimizer
        self.group = optimizer.param_groups[0]
        self.params = list(self.group["params"])
        self.penalty = penalty

    @torch.no_grad()
    def __call__(self) -> bool:
        params = self.params
        grads = [p.grad for p in params]
        if any(g is None or g.is_sparse for g in grads):
            return False
        group = self.group
        bufs = []
        if group["momentum"] != 0:
            state = self.optimizer.state
            bufs = [state[p].get("momentum_buffer") for p in params]
            if any(b is None for b in bufs):
                return False  # the first step creates them (foreach), as torch.optim.SGD does
        if self.penalty is not None:
            self.penalty.after_backward()
        torch._fused_sgd_(params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
                          lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                          maximize=False, is_first_step=False)
        if group["nesterov"] and bufs and group["weight_decay"] == 0:
            # torch.optim.SGD's foreach step leaves p.grad + momentum * buf in p.grad (a part's
            # after_step may read it); the fused kernel leaves p.grad as it was
            torch._foreach_add_(grads, bufs, alpha=group["momentum"])
        return True


def _foreach_update(params, grads, omega, anchor, bufs, c: float, wd: float, momentum: float,
                    one_minus_dampening: float, nesterov: bool, lr: float) -> None:
    """The penalty's gradient and SGD's step in foreach ops (what ``compile`` compiles)."""
    if omega:
        torch._foreach_addcmul_(grads, omega, params, value=c)
        torch._foreach_add_(grads, anchor, alpha=-c)
    d = grads
    if wd != 0:
        d = torch._foreach_add(grads, params, alpha=wd)
    if bufs:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d, alpha=one_minus_dampening)
        if nesterov:
            torch._foreach_add_(d, bufs, alpha=momentum)
        else:
            d = bufs
    torch._foreach_add_(params, d, alpha=-lr)


_compiled_update = None


class CompiledSGD:
    """:func:`_foreach_update` through ``torch.compile`` (one compilation per process and
    setting of the scalars). A compilation that fails leaves this path off for the process: the
    record says why, and an explicit ``backend.update_path=compile`` stops with an error."""

    name = "compile"
    failed: str | None = None

    def __init__(self, optimizer: torch.optim.SGD, penalty=None, explicit: bool = False):
        self.optimizer = optimizer
        self.group = optimizer.param_groups[0]
        self.params = list(self.group["params"])
        self.penalty = penalty
        self.explicit = explicit

    @torch.no_grad()
    def __call__(self) -> bool:
        global _compiled_update
        if CompiledSGD.failed is not None:
            return False
        params = self.params
        grads = [p.grad for p in params]
        if any(g is None or g.is_sparse for g in grads):
            return False
        group = self.group
        bufs = []
        if group["momentum"] != 0:
            state = self.optimizer.state
            bufs = [state[p].get("momentum_buffer") for p in params]
            if any(b is None for b in bufs):
                return False
        part = self.penalty
        on = part is not None and part.num_snapshots > 0
        if _compiled_update is None:
            _compiled_update = torch.compile(_foreach_update, dynamic=False, fullgraph=True)
        try:
            _compiled_update(params, grads, list(part.omega) if on else [], list(part.omega_anchor) if on else [],
                             bufs, part.gradient_scale if on else 0.0, group["weight_decay"], group["momentum"],
                             1 - group["dampening"], bool(group["nesterov"]), group["lr"])
        except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for TorchInductor's CPU code
            CompiledSGD.failed = f"torch.compile of the update failed: {str(err).strip().splitlines()[0][:300]}"
            if self.explicit:
                raise ConfigError(f"backend.update_path=compile: {CompiledSGD.failed}. Use backend.update_path=auto.") from err
            log.warning("clrun: %s; the foreach update runs instead", CompiledSGD.failed)
            return False
        return True


def for_learner(requested: str, optimizer: torch.optim.Optimizer, grad_parts: list, grad_clip,
                plain_sgd: bool, fused_step: bool):
    """(the update object or None, its :class:`UpdateRecord`) for a learner's optimizer and
    parts. None means the learner's own fallback: fused.py's foreach step (``foreach``) where
    ``fused_step`` and ``plain_sgd`` hold, else ``optimizer.step()`` (``optim``)."""
    fallback = FOREACH if fused_step and plain_sgd else OPTIM
    if not plain_sgd:
        why = "the optimizer is not plain SGD" if type(optimizer) is not torch.optim.SGD else \
            "the SGD settings (maximize, differentiable, fused, a tensor lr or step hooks) need optimizer.step()"
        return None, UpdateRecord(requested, OPTIM, why)
    if requested == FOREACH:
        return None, UpdateRecord(requested, fallback, "backend.update_path=foreach")
    penalty, refusal = coverage(optimizer, grad_parts, grad_clip)
    if refusal is not None:
        return None, UpdateRecord(requested, fallback, f"one-pass updates do not cover {refusal}")
    candidates = AUTO_ORDER if requested == "auto" else (requested,)
    skipped = []
    for path in candidates:
        if path == FOREACH:
            why = "backend.update_path=auto: " + "; ".join([*skipped, "foreach comes next"]) if skipped else \
                "backend.update_path=auto: foreach is the first choice"
            return None, UpdateRecord(requested, fallback, why)
        reason = unavailable_reason(path)
        if reason is not None:
            if requested != "auto":
                raise ConfigError(f"backend.update_path={path} is unavailable here: {reason}. "
                                  f"Use backend.update_path=auto (or foreach).")
            skipped.append(f"{path} unavailable ({reason})")
            continue
        if path == "c":
            update = native.NativeSGD(native.library(), optimizer, penalty)
            detail = f"native_sgd.c built by {native.compiler_description()}"
        elif path == "numba":
            update = native.NativeSGD(numba_library(), optimizer, penalty, name="numba")
            detail = "native_sgd.c's loop compiled by numba"
        elif path == "fused":
            update = FusedSGD(optimizer, penalty)
            detail = "foreach penalty, then torch._fused_sgd_"
        else:
            update = CompiledSGD(optimizer, penalty, explicit=requested != "auto")
            detail = "torch.compile of the foreach update"
        how = f"backend.update_path={requested}" + (f" ({'; '.join(skipped)})" if skipped else "")
        return update, UpdateRecord(requested, path, f"{how}: {detail}")
    return None, UpdateRecord(requested, fallback, "backend.update_path=auto: " + "; ".join(skipped))
