"""The update paths after backward (backends/torch/update.py): each path's step against the
foreach step (bit for bit for the C and numba paths on CPUs whose PyTorch kernels use fused
multiply-adds; within a few ulp for PyTorch's fused kernel and torch.compile, which round
differently), the choice of path, its record in results.json, and the libraries' cache key."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console

from cl_runner import catalog
from cl_runner.benchmarks import pixels
from cl_runner.errors import ConfigError
from cl_runner.experiment import run_experiment

catalog.load_backend("torch")
from cl_runner.backends.torch import native, update  # noqa: E402
from cl_runner.backends.torch.fused import sgd_step  # noqa: E402
from cl_runner.utils import cbuild  # noqa: E402

from test_native_sgd import EXACT, SHAPES, Penalty  # noqa: E402


def available(path: str) -> bool:
    return update.unavailable_reason(path) is None


def step_against_foreach(path: str, momentum: float, dampening: float, nesterov: bool, wd: float,
                         steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``steps`` steps of the penalty + SGD update through ``path`` and through the foreach
    ops on the same gradients; (foreach, path) pairs of parameters, gradients and buffers."""
    torch.manual_seed(0)
    ref = [torch.randn(s, requires_grad=True) for s in SHAPES]
    oth = [p.detach().clone().requires_grad_() for p in ref]
    kw = dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd)
    opt_ref, opt_oth = torch.optim.SGD(ref, **kw), torch.optim.SGD(oth, **kw)
    pen_ref, pen_oth = Penalty(ref, 0.7), Penalty(oth, 0.7)
    pen_oth.omega = [o.clone() for o in pen_ref.omega]
    pen_oth.omega_anchor = [o.clone() for o in pen_ref.omega_anchor]
    step, record = update.for_learner(path, opt_oth, [pen_oth], None, True, True)
    assert step is not None and record.path == path, record
    taken = 0
    for _ in range(steps):
        grads = [torch.randn(s) for s in SHAPES]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        for p, g in zip(oth, grads):
            p.grad = g.clone()
        pen_ref.after_backward()
        sgd_step(opt_ref)
        if step():
            taken += 1
        else:  # the first step with momentum: the buffers are created the foreach way
            pen_oth.after_backward()
            sgd_step(opt_oth)
    assert taken == steps - (1 if momentum else 0)
    pairs = [(a, b) for a, b in zip(ref, oth)] + [(a.grad, b.grad) for a, b in zip(ref, oth)]
    if momentum:
        pairs += [(opt_ref.state[a]["momentum_buffer"], opt_oth.state[b]["momentum_buffer"]) for a, b in zip(ref, oth)]
    return pairs


SETTINGS = [(0.9, 0.0, False, 0.0), (0.8, 0.1, False, 0.0), (0.9, 0.0, True, 1e-3), (0.0, 0.0, False, 1e-2),
            (0.9, 0.0, True, 0.0)]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("path", ["numba", "fused"])
def test_library_paths_step_as_foreach(path, setting):
    if not available(path):
        pytest.skip(f"{path}: {update.unavailable_reason(path)}")
    for a, b in step_against_foreach(path, *setting):
        if path == "numba" and EXACT:  # native_sgd.c's fused multiply-adds, exactly
            assert torch.equal(a, b), float((a - b).abs().max())
        else:  # PyTorch's fused kernel rounds its own way: a few ulp after three steps
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compiled_update_steps_as_foreach():
    """One setting (each setting of the scalars is a compilation of its own, seconds each)."""
    try:
        pairs = step_against_foreach("compile", 0.9, 0.0, True, 1e-3)
    except ConfigError as err:  # no C++ compiler for TorchInductor's CPU code here
        pytest.skip(str(err))
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def sgd(*shapes, **kw):
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    return params, torch.optim.SGD(params, lr=0.1, **kw)


def test_auto_takes_the_first_available_path_and_says_why(monkeypatch):
    params, opt = sgd((3, 2), (2,), momentum=0.9)
    first = next(p for p in update.AUTO_ORDER if p == "foreach" or available(p))
    step, record = update.for_learner("auto", opt, [], None, True, True)
    assert record.path == first and record.why.startswith("backend.update_path=auto")
    assert (step is None) == (first == "foreach")
    # without a C compiler auto moves on, and the record names what was skipped and why
    monkeypatch.setattr(update, "AUTO_ORDER", ("c", "foreach"))
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C compiler found (set CC)")
    step, record = update.for_learner("auto", opt, [], None, True, True)
    assert step is None and record.path == "foreach"
    assert "c unavailable (no C compiler found (set CC))" in record.why
    # asked for by name, a path this machine lacks is an error with the fix
    with pytest.raises(ConfigError, match="backend.update_path=c is unavailable here: no C compiler"):
        update.for_learner("c", opt, [], None, True, True)
    monkeypatch.setattr(update, "_numba_lib", None)
    monkeypatch.setattr(update, "_numba_unavailable", "numba is not installed (pip install numba)")
    with pytest.raises(ConfigError, match="numba is not installed"):
        update.for_learner("numba", opt, [], None, True, True)


def test_cases_no_path_covers_are_recorded():
    params, opt = sgd((3,), momentum=0.9)
    assert update.for_learner("auto", opt, [], 1.0, True, True)[1].why == \
        "one-pass updates do not cover gradient clipping"
    record = update.for_learner("auto", opt, [], None, True, False)[1]  # fused_step off: optimizer.step()
    assert record.path in ("optim", *update.PATHS)
    adam = torch.optim.Adam(params)
    step, record = update.for_learner("auto", adam, [], None, False, True)
    assert step is None and record.path == "optim" and record.why == "the optimizer is not plain SGD"
    assert update.for_learner("foreach", opt, [], None, True, True)[1].as_dict() == {
        "requested": "foreach", "path": "foreach", "why": "backend.update_path=foreach", "steps": {}}


def test_requested_path_reads_the_config():
    from cl_runner.config import validate_config

    def backend(**kw):
        return validate_config({"backend": kw})[0].backend

    assert update.requested_path(backend()) == "auto"
    assert update.requested_path(backend(update_path="numba")) == "numba"
    assert update.requested_path(backend(native_update=False)) == "foreach"
    with pytest.raises(ConfigError, match="native_update=false asks for PyTorch's kernels"):
        update.requested_path(backend(native_update=False, update_path="c"))
    with pytest.raises(ConfigError, match="'numbaa' is not an update path. Did you mean 'numba'"):
        update.requested_path(backend(update_path="numbaa"))


def run(tiny_data_dir, tmp_path, path: str, benchmark: str = "rotatedmnist") -> dict:
    cfg = {"seed": 1, "data_dir": str(tiny_data_dir), "cache_dir": str(tmp_path / "cache"),
           "progress": False, "loggers": [], "checkpoint": False, "threads": 1,
           "algo": {"name": "ewc"}, "benchmark": {"name": benchmark, "num_tasks": 2, "subset": 200,
                                                  "batch_size": 10, "eval_batch_size": 200},
           "backbone": {"width": 32, "dropout": 0.2}, "optimizer": {"lr": 0.01, "momentum": 0.8},
           "backend": {"update_path": path}}
    return run_experiment(cfg, tmp_path / f"{path}-{benchmark}", console=Console(file=io.StringIO()))


def test_results_record_the_paths_that_ran(tiny_data_dir, tmp_path):
    """EWC on two rotated tasks: every step is counted under the path that took it (the first
    one foreach), the gather that made the rotated images is named, and the run's numbers are the
    foreach run's (exactly for numba)."""
    chosen = "numba" if available("numba") else "foreach"
    res = run(tiny_data_dir, tmp_path, chosen)
    ref = run(tiny_data_dir, tmp_path, "foreach")
    steps = 2 * 200 // 10
    kernels = res["kernels"]
    assert kernels["update"]["path"] == chosen
    assert sum(kernels["update"]["steps"].values()) == steps
    if chosen != "foreach":
        assert kernels["update"]["steps"] == {"foreach": 1, chosen: steps - 1}
        assert "first step" in kernels["update"]["foreach_steps"]
    assert ref["kernels"]["update"] == {"requested": "foreach", "path": "foreach",
                                        "why": "backend.update_path=foreach", "steps": {"foreach": steps}}
    assert kernels["gather"]["path"] == pixels.choose()[0] and kernels["gather"]["why"].startswith("$CLRUN_GATHER=auto")
    if EXACT:
        np.testing.assert_array_equal(res["acc_matrix"], ref["acc_matrix"])
        np.testing.assert_array_equal(res["epoch_losses"], ref["epoch_losses"])
    # a stream without pixel remaps gathers nothing
    assert run(tiny_data_dir, tmp_path, "foreach", "splitmnist")["kernels"]["gather"] is None


def test_the_library_cache_key_names_the_compiler_and_the_cpu(tmp_path, monkeypatch):
    src = tmp_path / "k.c"
    src.write_text("int f(void) { return 1; }\n")
    base = cbuild.library_path(src, "k", tmp_path, ["cc"], ("-O2",))
    assert base == cbuild.library_path(src, "k", tmp_path, ["cc"], ("-O2",))
    assert base != cbuild.library_path(src, "k", tmp_path, ["cc"], ("-O3",))
    with monkeypatch.context() as m:
        m.setattr(cbuild, "describe", lambda cmd: "clang 99")
        assert base != cbuild.library_path(src, "k", tmp_path, ["cc"], ("-O2",))
    with monkeypatch.context() as m:
        m.setattr(cbuild, "cpu_features", lambda: "another cpu|sse2")
        assert base != cbuild.library_path(src, "k", tmp_path, ["cc"], ("-O2",))
    model, flags = cbuild.cpu_features().split("|")
    assert model and (flags or not __import__("os").path.exists("/proc/cpuinfo"))
