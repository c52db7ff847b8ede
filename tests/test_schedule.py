"""Learning rates per task and per epoch (cl_runner/core/schedule.py), ``optimizer.reset``,
``backbone.activation`` and the Stable SGD regime, on both backends, against NumPy computations
of the reference behaviour: SGD with momentum written out by hand (torch.optim.SGD's update: the
buffer starts as the first gradient, then buf <- m * buf + g, theta <- theta - lr * buf)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cl_runner import catalog
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.config import validate_config
from cl_runner.core.loop import ContinualLoop
from cl_runner.core.schedule import epoch_lr, task_lr
from cl_runner.errors import ConfigError

BACKENDS = ["torch", "jax"]


def stream_of(num_tasks=3, n_train=20, side=4, seed=0) -> Stream:
    """Domain-IL tasks of small random images, ten classes each."""
    rng = np.random.default_rng(seed)
    tasks = [Task(id=t, train_x=rng.integers(0, 256, (n_train, 1, side, side), dtype=np.uint8),
                  train_y=rng.integers(0, 10, n_train).astype(np.int64),
                  test_x=rng.integers(0, 256, (10, 1, side, side), dtype=np.uint8),
                  test_y=rng.integers(0, 10, 10).astype(np.int64), classes=np.arange(10))
             for t in range(num_tasks)]
    return Stream(name="synthetic", scenario="domain_il", tasks=tasks, num_outputs=10,
                  input_shape=(1, side, side), mean=(0.5,), std=(0.25,))


def build(backend, stream, name="naive", seed=0, **sections):
    if backend == "jax":
        pytest.importorskip("jax")
        pytest.importorskip("optax")
    cfg = {"backend": {"name": backend}, "algo": {"name": name, **sections.pop("algo", {})},
           "backbone": {"n_hidden_layers": 0, "width": 8, **sections.pop("backbone", {})},
           "benchmark": {"batch_size": 5, **sections.pop("benchmark", {})}, **sections}
    typed, _ = validate_config(cfg)
    module = catalog.load_backend(backend)
    torch.manual_seed(seed)
    return module.build_learner(typed, stream, module.resolve_device("cpu"), seed)


def linear_weights(learner) -> tuple[np.ndarray, np.ndarray]:
    """The head's (weight (out, in), bias) as float64 NumPy arrays."""
    if learner.backend == "torch":
        head = learner.model.head
        return head.weight.detach().double().numpy().copy(), head.bias.detach().double().numpy().copy()
    head = learner.params["head"]
    return np.asarray(head["kernel"], np.float64).T.copy(), np.asarray(head["bias"], np.float64).copy()


def current_lr(learner) -> float:
    if learner.backend == "torch":
        return float(learner.optimizer.param_groups[0]["lr"])
    from cl_runner.backends.jax.optim import get_lr

    return get_lr(learner.opt_state)


@pytest.fixture
def stored_order(monkeypatch):
    """Both backends walk each epoch's samples in their stored order (the shuffles replaced by
    the identity), so a hand computation sees the same batches."""
    monkeypatch.setattr(torch, "randperm", lambda n, generator=None, **kw: torch.arange(n))
    try:
        import jax
        import jax.numpy as jnp

        monkeypatch.setattr(jax.random, "permutation", lambda key, n: jnp.arange(n))
    except ImportError:
        pass


def reference_sgd(stream, learner, lrs, momentum, reset, batch_size, epochs):
    """Softmax regression trained by hand: task t at rate lrs[t], SGD with momentum ``momentum``,
    the momentum buffer emptied at every task or epoch as ``reset`` says."""
    w, b = linear_weights(learner)
    mean, std = stream.mean[0], stream.std[0]
    buf = None
    for t, task in enumerate(stream.tasks):
        x = (task.train_x.reshape(len(task.train_y), -1).astype(np.float64) / 255.0 - mean) / std
        y = task.train_y
        for e in range(epochs):
            if reset == "epoch" or (reset == "task" and e == 0):
                buf = None
            for lo in range(0, len(y), batch_size):
                xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
                z = xb @ w.T + b
                p = np.exp(z - z.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                p[np.arange(len(yb)), yb] -= 1.0
                gz = p / len(yb)
                g = (gz.T @ xb, gz.sum(0))
                if momentum:
                    buf = g if buf is None else (momentum * buf[0] + g[0], momentum * buf[1] + g[1])
                    step = buf
                else:
                    step = g
                w, b = w - lrs[t] * step[0], b - lrs[t] * step[1]
    return w, b


# -- the schedule, by hand ---------------------------------------------------------------------------

def sched(**kw):
    base = {"name": "constant", "milestones": [], "gamma": 0.1, "eta_min": 0.0, "warmup_epochs": 0,
            "warmup_start": 0.1}
    return validate_config({"optimizer": {"schedule": {**base, **kw}}})[0].optimizer.schedule


def test_epoch_rates_by_hand():
    lrs = [epoch_lr(0.5, sched(name="multistep", milestones=[1, 3]), e, 5) for e in range(5)]
    np.testing.assert_allclose(lrs, [0.5, 0.05, 0.05, 0.005, 0.005])
    # cosine from 0.5 to eta_min 0.01 over 4 epochs: 0.01 + 0.49 (1 + cos(pi e / 4)) / 2
    lrs = [epoch_lr(0.5, sched(name="cosine", eta_min=0.01), e, 4) for e in range(4)]
    np.testing.assert_allclose(lrs, [0.5, 0.4282412, 0.255, 0.0817588], rtol=1e-6)
    # two warm-up epochs from a tenth of the rate (0.05, then 0.05 + 0.45 / 2), then a cosine over 3
    lrs = [epoch_lr(0.5, sched(name="cosine", warmup_epochs=2), e, 5) for e in range(5)]
    np.testing.assert_allclose(lrs, [0.05, 0.275, 0.5, 0.375, 0.125], rtol=1e-6)
    # GDumb's warm start: the first epoch at a tenth of the rate, then the rate
    lrs = [epoch_lr(0.5, sched(warmup_epochs=1), e, 3) for e in range(3)]
    np.testing.assert_allclose(lrs, [0.05, 0.5, 0.5])


def test_task_rates_by_hand():
    opt = validate_config({"optimizer": {"lr": 0.1, "lr_decay": 0.5, "lr_min": 0.02}})[0].optimizer
    assert [task_lr(opt, t) for t in range(4)] == pytest.approx([0.1, 0.05, 0.025, 0.02])
    opt = validate_config({"optimizer": {"lr": 0.1, "lr_decay": 0.5, "lr_decay_offset": 1}})[0].optimizer
    assert [task_lr(opt, t) for t in range(3)] == pytest.approx([0.05, 0.025, 0.0125])


@pytest.mark.parametrize("backend", BACKENDS)
def test_learners_set_every_epochs_rate(backend):
    """Two tasks (rate 0.4, then 0.2) of four epochs with milestones at epochs 1 and 3: the rate of
    each epoch is recorded while it trains. On JAX the rate is state: one compiled epoch program."""
    stream = stream_of(num_tasks=2)
    learner = build(backend, stream, optimizer={"lr": 0.4, "lr_decay": 0.5, "schedule": {
        "name": "multistep", "milestones": [1, 3], "gamma": 0.5}})
    seen = []
    train_epoch = learner.train_epoch

    def spy(task, epoch):
        seen.append(current_lr(learner))
        return train_epoch(task, epoch)

    learner.train_epoch = spy
    ContinualLoop(learner, stream, epochs_per_task=4).run()
    np.testing.assert_allclose(seen, [0.4, 0.2, 0.2, 0.1, 0.2, 0.1, 0.1, 0.05], rtol=1e-6)
    if backend == "jax":
        assert learner.trace_counts["epoch"] == 1 and learner._epoch_fn._cache_size() == 1


# -- optimizer.reset ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset", ["never", "task", "epoch"])
def test_reset_restarts_the_momentum(backend, reset, stored_order):
    """Three tasks of 20 samples, batches of 5, two epochs each, SGD momentum 0.9 at rates 0.1,
    0.05, 0.025: the weights are those of the hand computation with the buffer emptied as
    ``reset`` says, and differ from those of the other policies."""
    stream = stream_of()
    cfg = dict(optimizer={"lr": 0.1, "lr_decay": 0.5, "momentum": 0.9, "reset": reset})
    learner = build(backend, stream, **cfg)
    expected = {r: reference_sgd(stream, learner, [0.1, 0.05, 0.025], 0.9, r, 5, 2)
                for r in ("never", "task", "epoch")}
    ContinualLoop(learner, stream, epochs_per_task=2).run()
    w, b = linear_weights(learner)
    np.testing.assert_allclose(w, expected[reset][0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b, expected[reset][1], rtol=1e-4, atol=1e-6)
    for other in set(expected) - {reset}:
        assert np.abs(w - expected[other][0]).max() > 1e-3  # the policies are told apart


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_gives_adam_a_fresh_state_and_keeps_the_rate(backend):
    stream = stream_of(num_tasks=1)
    learner = build(backend, stream, optimizer={"type": "adam", "lr": 0.01, "betas": [0.9, 0.999],
                                                "reset": "epoch"})
    task = stream.tasks[0]
    learner.on_before_task(task)
    learner.on_before_epoch(task, 0)
    learner.train_epoch(task, 0)
    if backend == "torch":
        assert all(int(s["step"]) == 4 for s in learner.optimizer.state.values())
    learner.on_before_epoch(task, 1)
    if backend == "torch":
        assert len(learner.optimizer.state) == 0
    else:
        import jax

        counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(learner.opt_state)
                  if "count" in jax.tree_util.keystr(path)]
        assert counts and all(int(c) == 0 for c in counts)
    assert current_lr(learner) == pytest.approx(0.01)


# -- Stable SGD: the reference regime -------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_stable_sgd_trains_as_the_reference_code(backend, stored_order):
    """stable_sgd/main.py:126-134: tasks counted from 1, lr = max(lr * gamma ** task, floor), a new
    SGD(momentum=0.8) every epoch. Three tasks, two epochs of four batches each, lr 0.2, gamma 0.5
    and a floor of 0.04 (so the rates are 0.1, 0.05, 0.04); dropout off for a deterministic run."""
    stream = stream_of()
    learner = build(backend, stream, "stable_sgd",
                    algo={"lr": 0.2, "lr_decay": 0.5, "lr_min": 0.04, "dropout": 0.0, "batch_size": 5})
    lrs = [max(0.2 * 0.5 ** task, 0.04) for task in range(1, 4)]
    assert lrs == pytest.approx([0.1, 0.05, 0.04])
    expected = reference_sgd(stream, learner, lrs, 0.8, "epoch", 5, 2)
    kept = reference_sgd(stream, learner, lrs, 0.8, "never", 5, 2)
    ContinualLoop(learner, stream, epochs_per_task=2).run()
    w, b = linear_weights(learner)
    np.testing.assert_allclose(w, expected[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b, expected[1], rtol=1e-4, atol=1e-6)
    assert np.abs(w - kept[0]).max() > 1e-3
    assert current_lr(learner) == pytest.approx(0.04)


def test_stable_sgd_regime_is_in_the_validated_config():
    """The regime's values are the config's before anything reads them: the batch size the
    threads are chosen for, the optimizer the learner builds, what results.json stores."""
    typed, warnings = validate_config({"algo": {"name": "stable_sgd", "lr_decay": 0.5},
                                       "benchmark": {"batch_size": 10}})
    assert typed.benchmark.batch_size == 10 and typed.backbone.dropout == 0.5
    opt = typed.optimizer
    assert (opt.lr, opt.lr_decay, opt.lr_decay_offset, opt.lr_min, opt.momentum, opt.reset) == \
        (0.1, 0.5, 1, 0.00005, 0.8, "epoch")
    assert warnings == []
    # A section value set away from its default is replaced, with a warning naming both keys.
    typed, warnings = validate_config({"algo": {"name": "stable_sgd"}, "benchmark": {"batch_size": 64},
                                       "optimizer": {"momentum": 0.9}})
    assert typed.benchmark.batch_size == 10 and typed.optimizer.momentum == 0.8
    assert any("algo.batch_size=10 replaces benchmark.batch_size=64" in w for w in warnings)
    assert any("algo.momentum=0.8 replaces optimizer.momentum=0.9" in w for w in warnings)
    # null keys leave the sections' values.
    typed, _ = validate_config({"algo": {"name": "stable_sgd", "batch_size": None, "momentum": None,
                                         "reset": None}, "benchmark": {"batch_size": 64}})
    assert typed.benchmark.batch_size == 64 and typed.optimizer.momentum == 0.0
    assert typed.optimizer.reset == "never"
    for bad, match in [({"momentum": 1.0}, "algo.momentum"), ({"reset": "batch"}, "optimizer.reset"),
                       ({"lr_decay_offset": -1}, "algo.lr_decay_offset"), ({"dropout": 1.0}, "algo.dropout")]:
        with pytest.raises(ConfigError, match=match):
            validate_config({"algo": {"name": "stable_sgd", **bad}})


# -- backbone.activation -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_tanh_mlp_by_hand(backend):
    """One hidden layer of tanh units: logits = W2 tanh(W1 x + b1) + b2, computed in NumPy."""
    stream = stream_of(num_tasks=1, side=3)
    learner = build(backend, stream, backbone={"n_hidden_layers": 1, "width": 4, "activation": "tanh"})
    x_u8 = stream.tasks[0].train_x[:6]
    x = (x_u8.reshape(6, -1).astype(np.float64) / 255.0 - 0.5) / 0.25
    if backend == "torch":
        lin = learner.model.features[1]
        assert isinstance(learner.model.features[2], torch.nn.Tanh)
        w1, b1 = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
        with torch.no_grad():
            out = learner.model(learner.to_input(x_u8)).double().numpy()
    else:
        p = learner.params["features"]["layers_0"]
        w1, b1 = np.asarray(p["kernel"], np.float64).T, np.asarray(p["bias"], np.float64)
        out = np.asarray(learner.model.apply({"params": learner.params}, learner.to_input(x_u8)), np.float64)
    w2, b2 = linear_weights(learner)
    expected = np.tanh(x @ w1.T + b1) @ w2.T + b2
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    relu_expected = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    assert np.abs(out - relu_expected).max() > 1e-3


def test_bad_optimizer_and_activation_values_are_errors():
    for cfg, match in [
        ({"optimizer": {"reset": "always"}}, "optimizer.reset"),
        ({"optimizer": {"schedule": {"name": "step"}}}, "optimizer.schedule.name"),
        ({"optimizer": {"schedule": {"milestones": [3, 1]}}}, "optimizer.schedule.milestones"),
        ({"optimizer": {"schedule": {"warmup_start": 2.0}}}, "optimizer.schedule.warmup_start"),
        ({"optimizer": {"lr_decay_offset": -1}}, "optimizer.lr_decay_offset"),
        ({"backbone": {"activation": "gelu"}}, "backbone.activation"),
        ({"backbone": {"type": "cnn", "activation": "tanh"}}, "backbone.activation"),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate_config(cfg)
    assert math.isclose(validate_config({})[0].optimizer.schedule.warmup_start, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seeds", [None, [0, 1]])
def test_stable_sgd_settings_are_what_the_run_uses_and_records(tiny_data_dir, tmp_path, monkeypatch, backend,
                                                                seeds):
    """One home for the regime: with benchmark.batch_size=32 on the command line, algo=stable_sgd's
    batch of 10 is what the threads are chosen for, what the learner steps with (600 images per
    task in batches of 10: 60 steps per task) and what results.json's config shows, next to the
    optimizer and dropout values the run trained with; the same for several seeds in one run."""
    import io

    from rich.console import Console

    from cl_runner import experiment
    from cl_runner.experiment import run_experiment

    if backend == "jax":
        pytest.importorskip("jax")
    chosen = []
    choose = experiment.choose_threads

    def spy(threads, backbone, batch_size, **kw):
        chosen.append(batch_size)
        return choose(threads, backbone, batch_size, **kw)

    monkeypatch.setattr(experiment, "choose_threads", spy)
    cfg = {"data_dir": str(tiny_data_dir), "progress": False, "loggers": [], "checkpoint": False, "device": "cpu",
           "benchmark": {"name": "rotatedmnist", "num_tasks": 2, "batch_size": 32, "eval_batch_size": 200},
           "backbone": {"type": "mlp", "width": 16}, "algo": {"name": "stable_sgd", "lr_decay": 0.5},
           "backend": {"name": backend}, "training": {"epochs_per_task": 1}, "seeds": seeds}
    run_experiment(cfg, tmp_path, console=Console(file=io.StringIO()))
    folders = [tmp_path] if seeds is None else [tmp_path / f"seed={s}" for s in seeds]
    for folder in folders:
        r = json.loads((folder / "results.json").read_text())
        c = r["config"]
        assert c["benchmark"]["batch_size"] == 10 and c["backbone"]["dropout"] == 0.5
        o = c["optimizer"]
        assert (o["lr"], o["lr_decay"], o["lr_decay_offset"], o["lr_min"], o["momentum"], o["reset"]) == \
            (0.1, 0.5, 1, 0.00005, 0.8, "epoch")
        assert r["steps"] == 2 * 60
    assert chosen and set(chosen) == {10}
