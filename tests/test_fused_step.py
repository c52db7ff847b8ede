"""The fused MLP training step (backends/torch/fused.py) computes exactly what autograd and
torch.optim.SGD compute: the same gradients, the same updates, the same whole runs."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from cl_runner import catalog
from cl_runner.experiment import run_experiment

catalog.load_backend("torch")
from cl_runner.backends.torch.backbones import cnn, mlp  # noqa: E402
from cl_runner.backends.torch.fused import FusedMLPStep, sgd_step, sgd_step_possible  # noqa: E402
from cl_runner.backends.torch.heads import make_head  # noqa: E402

from test_torch_learner import learner_for, tiny_stream  # noqa: E402


def autograd_grads(model, x, y, invalid):
    for p in model.parameters():
        p.grad = None
    z = model(x)
    if invalid is not None:
        z = z.masked_fill(invalid, float("-inf"))
    loss = F.cross_entropy(z, y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("layers,dropout", [(0, 0.0), (1, 0.0), (2, 0.2), (3, 0.5)])
@pytest.mark.parametrize("task_mask", [False, True])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_gradients_equal_autograd(layers, dropout, task_mask, activation):
    torch.manual_seed(0)
    model = mlp(SimpleNamespace(n_hidden_layers=layers, width=16, dropout=dropout, activation=activation),
                (1, 5, 5), 7)
    step = FusedMLPStep.for_model(model)
    assert step is not None
    assert step.tanh == (activation == "tanh" and layers > 0)
    x = torch.randn(10, 1, 5, 5)
    y = torch.randint(0, 7, (10,))
    invalid = None
    if task_mask:  # each sample sees only some units, its own label among them
        invalid = torch.rand(10, 7) < 0.4
        invalid[torch.arange(10), y] = False
    for seed in (1, 2):
        torch.manual_seed(seed)  # the same dropout draws on both paths
        loss = step(x, y, invalid)
        fused = [p.grad.clone() for p in model.parameters()]
        torch.manual_seed(seed)
        ref_loss, ref = autograd_grads(model, x, y, invalid)
        assert torch.equal(loss, ref_loss)
        for a, b in zip(fused, ref):
            assert torch.equal(a, b)
        assert any(float(g.abs().sum()) > 0 for g in fused)
    # and the RNG was consumed identically: the next draw is the same on both paths
    torch.manual_seed(3)
    step(x, y, invalid)
    after_fused = torch.rand(1)
    torch.manual_seed(3)
    autograd_grads(model, x, y, invalid)
    assert torch.equal(after_fused, torch.rand(1))


def test_eval_mode_means_no_dropout():
    torch.manual_seed(0)
    model = mlp(SimpleNamespace(n_hidden_layers=2, width=16, dropout=0.5), (1, 5, 5), 4).eval()
    x, y = torch.randn(6, 1, 5, 5), torch.randint(0, 4, (6,))
    loss = FusedMLPStep.for_model(model)(x, y)
    ref_loss, ref = autograd_grads(model, x, y, None)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), ref))


def test_only_plain_mlps_take_the_fused_step():
    cfg = SimpleNamespace(n_hidden_layers=2, width=8, dropout=0.0, channels=[4], head="fixed")
    assert FusedMLPStep.for_model(mlp(cfg, (1, 8, 8), 4)) is not None
    assert FusedMLPStep.for_model(cnn(cfg, (1, 8, 8), 4)) is None
    grown = mlp(cfg, (1, 8, 8), 4)
    grown.head = make_head("incremental", grown.feature_dim, 4, "default")
    assert FusedMLPStep.for_model(grown) is None
    frozen = mlp(cfg, (1, 8, 8), 4)
    frozen.head.bias.requires_grad_(False)
    assert FusedMLPStep.for_model(frozen) is None


@pytest.mark.parametrize("opts", [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
])
def test_sgd_step_equals_torch_sgd(opts):
    torch.manual_seed(0)
    shapes = [(6, 5), (6,), (3, 6)]
    a = [torch.randn(s, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    opt_a = torch.optim.SGD(a, foreach=True, **opts)
    opt_b = torch.optim.SGD(b, foreach=True, **opts)
    assert sgd_step_possible(opt_b)
    for step in range(4):
        grads = [torch.randn(s) for s in shapes]
        for pa, pb, g in zip(a, b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        if step == 2:  # a parameter without a gradient is skipped, its buffer kept
            a[1].grad = b[1].grad = None
        opt_a.step()
        sgd_step(opt_b)
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)
            assert (pa.grad is None) == (pb.grad is None)
            if pa.grad is not None:
                assert torch.equal(pa.grad, pb.grad)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][key]) if torch.is_tensor(value) else value == sb["state"][k][key]


def test_sgd_step_refuses_what_it_does_not_do():
    p = [torch.zeros(3, requires_grad=True)]
    assert not sgd_step_possible(torch.optim.Adam(p))
    assert not sgd_step_possible(torch.optim.SGD(p, lr=0.1, maximize=True))
    opt = torch.optim.SGD(p, lr=0.1)
    opt.register_step_post_hook(lambda *args: None)
    assert not sgd_step_possible(opt)


def test_learners_choose_the_fused_step_only_where_it_is_exact():
    stream = tiny_stream(num_tasks=2)
    # (algorithm, fused forward/backward, whole step fused)
    for name, fused, plain in [("naive", True, True), ("ewc", True, True), ("si", True, True),
                               ("er", True, True), ("lwf", True, False), ("der", True, False),
                               ("pnn", False, True)]:
        learner = learner_for(stream, name=name)
        learner.on_before_task(stream.tasks[0])
        assert (learner._fused is not None) == fused, name
        assert learner._fused_plain == plain, name
        assert learner._fast_sgd is learner.optimizer
    # SI's gradient hooks with a loss term added by a part: autograd for the whole step
    learner = learner_for(stream, name="lwf", algo={"plugins": ["si"]})
    learner.on_before_task(stream.tasks[0])
    assert learner._fused is None
    learner = learner_for(stream, name="naive", backend={"fused_step": False})
    learner.on_before_task(stream.tasks[0])
    assert learner._fused is None and learner._fast_sgd is None
    learner = learner_for(stream, name="naive", optimizer={"type": "adam"})
    learner.on_before_task(stream.tasks[0])
    assert learner._fused is not None and learner._fast_sgd is None


def run(tiny_data_dir, tmp_path, algo, fused, scenario="permutedmnist", lr=0.05, momentum=0.9, native=True,
        **algo_keys):
    benchmark = {"name": "permutedmnist" if scenario == "task_il" else scenario, "num_tasks": 2, "subset": 200,
                 "batch_size": 10, "eval_batch_size": 200}
    if scenario in ("splitmnist", "class_il"):
        benchmark = {"name": "splitmnist", "scenario": "task_il" if scenario == "splitmnist" else scenario,
                     "num_tasks": 3, "subset": 100, "batch_size": 10, "eval_batch_size": 200}
    elif scenario == "task_il":
        benchmark = {**benchmark, "scenario": "task_il"}
    cfg = {"seed": 1, "data_dir": str(tiny_data_dir), "cache_dir": str(tmp_path / "cache"),
           "progress": False, "loggers": [], "checkpoint": False, "threads": 1,
           "algo": {"name": algo, **algo_keys}, "benchmark": benchmark,
           "backbone": {"width": 32, "dropout": 0.2},
           "optimizer": {"lr": lr, "momentum": momentum},
           "backend": {"fused_step": fused, "native_update": native}}
    return run_experiment(cfg, tmp_path / f"{algo}-{fused}-{native}", console=Console(file=io.StringIO()))


@pytest.mark.parametrize("algo,scenario,keys", [
    ("naive", "permutedmnist", {}),
    ("ewc", "permutedmnist", {"ewc_lambda": 100.0}),
    ("si", "permutedmnist", {"si_c": 1.0}),
    ("er", "permutedmnist", {}),
    ("naive", "splitmnist", {}),
])
def test_whole_runs_equal_the_autograd_path(tiny_data_dir, tmp_path, algo, scenario, keys):
    fused = run(tiny_data_dir, tmp_path, algo, True, scenario, **keys)
    plain = run(tiny_data_dir, tmp_path, algo, False, scenario, **keys)
    np.testing.assert_array_equal(fused["acc_matrix"], plain["acc_matrix"])
    assert fused["epoch_losses"] == plain["epoch_losses"]


def every_torch_algorithm():
    from cl_runner.registry import ALGORITHMS

    cases = []
    for name in sorted(ALGORITHMS.names()):
        if "torch" not in ALGORITHMS.entry(name).backends:
            continue
        scenarios = ALGORITHMS.meta(name).get("scenarios") or ("domain_il",)
        cases.append((name, "class_il" if "class_il" in scenarios else
                      "permutedmnist" if "domain_il" in scenarios else "task_il"))
    return cases


@pytest.mark.parametrize("algo,scenario", every_torch_algorithm())
def test_every_algorithm_runs_the_same_with_and_without_the_fused_step(tiny_data_dir, tmp_path, algo, scenario):
    """Each algorithm with its defaults: whichever path it takes (the whole step fused, the MLP's
    passes fused beside its own loss terms, or autograd), the numbers are those of autograd."""
    keys = {"coreset_size": 20} if algo == "kcl" else {}
    fused = run(tiny_data_dir, tmp_path, algo, True, scenario, lr=0.01, momentum=0.8, **keys)
    plain = run(tiny_data_dir, tmp_path, algo, False, scenario, lr=0.01, momentum=0.8, **keys)
    np.testing.assert_array_equal(fused["acc_matrix"], plain["acc_matrix"])
    np.testing.assert_array_equal(fused["epoch_losses"], plain["epoch_losses"])  # gdumb: NaN, no steps


def test_der_memory_batch_takes_the_fused_pass():
    stream = tiny_stream(num_tasks=2)
    learner = learner_for(stream, name="der", benchmark={"batch_size": 4})
    task = stream.tasks[0]
    learner.on_before_task(task)
    calls = []
    forward = learner._fused.forward
    learner._fused.forward = lambda x: calls.append(len(x)) or forward(x)
    xs, ys = learner.train_x, learner.train_y
    learner.train_step(xs[:4], ys[:4], None)  # empty memory: the stream batch only
    learner.train_step(xs[4:8], ys[4:8], None)  # then the memory batch too
    assert calls == [4, 4, 4]
    assert all(p.grad is not None for p in learner.model.parameters())


def test_cuda_dropout_branch_matches_autograd_of_the_fused_kernel():
    """On CUDA the fused step uses ATen's fused dropout kernel (a bool mask), as nn.Dropout does
    there; its backward is checked here on the CPU implementation of the same kernel."""
    from cl_runner.backends.torch.fused import _dropout_backward

    torch.manual_seed(0)
    h = torch.randn(6, 9, requires_grad=True)
    out, mask = torch.ops.aten.native_dropout(h, 0.3, True)
    assert mask.dtype == torch.bool and mask.shape == h.shape
    d = torch.randn(6, 9)
    out.backward(d)
    assert torch.equal(_dropout_backward(d, mask, 0.3), h.grad)
