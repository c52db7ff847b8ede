"""The native SGD update (backends/torch/native.py): one C pass doing a quadratic penalty's
gradient and torch.optim.SGD's step. On CPUs where PyTorch's kernels use fused multiply-adds
(its AVX2 and AVX512 builds) the results are equal bit for bit; elsewhere within a few ulp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_runner import catalog

catalog.load_backend("torch")
from cl_runner.backends.torch import native, update  # noqa: E402
from cl_runner.backends.torch.fused import sgd_step  # noqa: E402
from cl_runner.backends.torch.native import NativeSGD  # noqa: E402
from cl_runner.backends.torch.regularization import ImportanceRegularizer  # noqa: E402

from test_fused_step import every_torch_algorithm, run  # noqa: E402
from test_torch_learner import learner_for, tiny_stream  # noqa: E402

needs_library = pytest.mark.skipif(native.library() is None,
                                   reason=f"native update unavailable: {native.unavailable_reason()}")
#: PyTorch builds whose vectorised add/addcmul kernels are fused multiply-adds, as native_sgd.c's.
EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    if EXACT:
        assert torch.equal(a, b), float((a - b).abs().max())
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class Penalty(ImportanceRegularizer):
    """A quadratic penalty with given importances and anchors (no learner needed)."""

    def __init__(self, params, strength):
        self.params = params
        self._strength = strength
        self.omega = [torch.rand_like(p) for p in params]
        self.omega_anchor = [torch.randn_like(p) for p in params]
        self.num_snapshots = 1

    @property
    def strength(self):
        return self._strength


SHAPES = [(33, 29), (33,), (7, 33), (7,), (1,), (0,)]  # odd sizes: vector bodies and tails


@needs_library
@pytest.mark.parametrize("momentum,dampening,nesterov,wd", [
    (0.0, 0.0, False, 0.0), (0.9, 0.0, False, 0.0), (0.8, 0.1, False, 0.0),
    (0.9, 0.0, True, 0.0), (0.9, 0.0, False, 5e-4), (0.9, 0.0, True, 1e-3), (0.0, 0.0, False, 1e-2)])
@pytest.mark.parametrize("with_penalty", [False, True])
def test_native_step_equals_torch(momentum, dampening, nesterov, wd, with_penalty):
    torch.manual_seed(0)
    ref = [torch.randn(s, requires_grad=True) for s in SHAPES]
    nat = [p.detach().clone().requires_grad_() for p in ref]
    opts = dict(lr=0.0371, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd, foreach=True)
    ref_opt, nat_opt = torch.optim.SGD(ref, **opts), torch.optim.SGD(nat, **opts)
    ref_pen = Penalty(ref, 3.7) if with_penalty else None
    nat_pen = Penalty(nat, 3.7) if with_penalty else None
    if with_penalty:
        nat_pen.omega = [o.clone() for o in ref_pen.omega]
        nat_pen.omega_anchor = [o.clone() for o in ref_pen.omega_anchor]
    step = NativeSGD.for_learner(nat_opt, [nat_pen] if with_penalty else [], None)
    assert step is not None
    took = []
    for i in range(4):
        for a, b in zip(ref, nat):
            g = torch.randn_like(a)
            a.grad, b.grad = g, g.clone()
        if with_penalty:
            ref_pen.after_backward()
        ref_opt.step()
        took.append(step())
        if not took[-1]:  # the first momentum step creates the buffers: PyTorch's path
            if with_penalty:
                nat_pen.after_backward()
            sgd_step(nat_opt)
        for a, b in zip(ref, nat):
            assert_same(a.detach(), b.detach())
            assert_same(a.grad, b.grad)  # p.grad left as torch leaves it
            if momentum:
                assert_same(ref_opt.state[a]["momentum_buffer"], nat_opt.state[b]["momentum_buffer"])
    assert took == ([False, True, True, True] if momentum else [True] * 4)


@needs_library
def test_refuses_what_it_does_not_do():
    p = [torch.zeros(4, requires_grad=True)]
    sgd = torch.optim.SGD(p, lr=0.1)
    assert NativeSGD.for_learner(sgd, [], None) is not None
    assert NativeSGD.for_learner(sgd, [], 1.0) is None  # gradient clipping
    assert NativeSGD.for_learner(torch.optim.SGD([{"params": p}, {"params": [torch.zeros(2, requires_grad=True)]}],
                                                 lr=0.1), [], None) is None
    assert NativeSGD.for_learner(torch.optim.SGD([torch.zeros(4, dtype=torch.float64, requires_grad=True)],
                                                 lr=0.1), [], None) is None

    class Other(Penalty):  # a part with its own after_backward
        def after_backward(self):
            pass

    assert NativeSGD.for_learner(sgd, [Other(p, 1.0)], None) is None
    assert NativeSGD.for_learner(sgd, [Penalty(p, 1.0), Penalty(p, 1.0)], None) is None
    step = NativeSGD.for_learner(sgd, [], None)
    p[0].grad = None
    assert not step()  # a parameter without a gradient: the caller's path


@needs_library
def test_learners_take_it_where_it_applies():
    stream = tiny_stream(num_tasks=2)
    for name, takes in [("naive", True), ("ewc", True), ("mas", True), ("si", False), ("er", True),
                        ("agem", False), ("lwf", True)]:
        learner = learner_for(stream, name=name)
        learner.on_before_task(stream.tasks[0])
        assert (learner._native is not None) == takes, name
    for sections in ({"backend": {"native_update": False}}, {"optimizer": {"type": "adam"}},
                     {"optimizer": {"grad_clip_norm": 1.0}}):
        learner = learner_for(stream, name="ewc", **sections)
        learner.on_before_task(stream.tasks[0])
        assert learner._native is None, sections


@needs_library
@pytest.mark.parametrize("algo,scenario", every_torch_algorithm())
def test_every_algorithm_runs_the_same_with_and_without_the_native_update(tiny_data_dir, tmp_path, algo, scenario):
    keys = {"coreset_size": 20} if algo == "kcl" else {}
    on = run(tiny_data_dir, tmp_path, algo, True, scenario, lr=0.01, momentum=0.8, native=True, **keys)
    off = run(tiny_data_dir, tmp_path, algo, True, scenario, lr=0.01, momentum=0.8, native=False, **keys)
    if EXACT:
        np.testing.assert_array_equal(on["acc_matrix"], off["acc_matrix"])
        np.testing.assert_array_equal(on["epoch_losses"], off["epoch_losses"])
    else:  # rounding differences of an ulp may move a prediction or two of the tiny test sets
        np.testing.assert_allclose(on["acc_matrix"], off["acc_matrix"], atol=3.0)


def test_without_a_compiler_the_run_uses_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_unavailable", None)
    monkeypatch.setenv("CLRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(update, "AUTO_ORDER", ("c", "foreach"))  # an order that tries C first
    assert native.library() is None
    assert "no C compiler" in native.unavailable_reason()
    assert not (tmp_path / "cache" / "native").exists() or not any((tmp_path / "cache" / "native").iterdir())
    stream = tiny_stream(num_tasks=1)
    learner = learner_for(stream, name="ewc")
    task = stream.tasks[0]
    learner.on_before_task(task)
    assert learner._native is None
    learner.train_epoch(task, 0)  # trains with PyTorch's kernels


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "compiler", lambda: ["false"])
    path = tmp_path / "native" / "sgd.so"
    with pytest.raises(RuntimeError, match="failed"):
        native.build(path)
    assert list(path.parent.iterdir()) == []


@needs_library
def test_build_writes_the_library_in_place(tmp_path):
    path = tmp_path / "native" / "sgd.so"
    native.build(path)
    assert [f.name for f in path.parent.iterdir()] == ["sgd.so"]
