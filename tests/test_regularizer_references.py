"""The reference estimators and knobs of the importance regularisers, on both backends, against
hand computations in NumPy (float64):

* ``fisher: agem`` (A-GEM's EWC, facebookresearch/agem model/model.py): a running average of
  squared step gradients updated every N steps, min-max normalised, one term without a factor 1/2;
* ``fisher: argmax`` (Hsu et al.'s EWC): the per-sample Fisher at the model's most likely label;
* ``mas_importance: batch_mean`` (Hsu et al.'s MAS): |gradient of the batch-and-unit mean of f^2|,
  averaged over mini-batches;
* ``optimizer.grad_clip_value`` (Mammoth's SI: ``clip_grad_value_(..., 1)``), and which PyTorch fast
  paths still apply with each of them.

The model is f(x) = W x + b on one-pixel images (``n_hidden_layers: 0``), three output units,
so every gradient has a closed form.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_runner import catalog
from cl_runner.algorithms.regularization import mas_sample_indices
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.config import validate_config
from cl_runner.errors import ConfigError

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

torch_backend = catalog.load_backend("torch")
jax_backend = catalog.load_backend("jax")
from cl_runner.backends.torch import native  # noqa: E402
from cl_runner.backends.torch.graphs import graph_refusal  # noqa: E402

PIXELS = np.array([0, 51, 102, 255], dtype=np.uint8)
X = PIXELS / 255.0
LABELS = {0: np.array([0, 0, 1, 2]), 1: np.array([2, 1, 0, 1])}
W0 = np.array([0.3, -0.5, 0.8])
B0 = np.array([0.1, 0.2, -0.3])


def pixel_stream(scenario="domain_il") -> Stream:
    """Two tasks of the same four one-pixel images (x = pixel / 255), three classes each (the
    same units in domain-IL; units 0-2 and 3-5 in task-IL)."""
    x = PIXELS.reshape(-1, 1, 1, 1)
    tasks = []
    for t in (0, 1):
        offset = 3 * t if scenario == "task_il" else 0
        y = LABELS[t] + offset
        tasks.append(Task(id=t, train_x=x, train_y=y, test_x=x, test_y=y, classes=np.arange(offset, offset + 3)))
    return Stream(name="pixels", scenario=scenario, tasks=tasks, num_outputs=6 if scenario == "task_il" else 3,
                  input_shape=(1, 1, 1), mean=(0.0,), std=(1.0,))


def build(backend, stream, name, algo=None, seed=0, backend_keys=None, **sections):
    cfg = {"backend": {"name": backend, **(backend_keys or {})}, "algo": {"name": name, **(algo or {})},
           "backbone": {"n_hidden_layers": 0, "dropout": 0.0},
           "benchmark": {"batch_size": 4, "normalize": False}, **sections}
    typed, _ = validate_config(cfg)
    if backend == "torch":
        torch.manual_seed(seed)
        return torch_backend.build_learner(typed, stream, torch.device("cpu"), seed)
    return jax_backend.build_learner(typed, stream, jax_backend.resolve_device("cpu"), seed)


def set_linear(learner, w, b) -> None:
    """Set the (units, 1) weight and the bias of the one linear layer."""
    w, b = np.asarray(w, np.float32).reshape(-1), np.asarray(b, np.float32)
    if learner.backend == "torch":
        with torch.no_grad():
            learner.model.head.weight.copy_(torch.from_numpy(w).view(-1, 1))
            learner.model.head.bias.copy_(torch.from_numpy(b))
    else:
        assert set(learner.params) == {"head"}
        learner.params = learner.put({"head": {"kernel": jnp.asarray(w).reshape(1, -1), "bias": jnp.asarray(b)}})


def as_wb(learner, tensors) -> np.ndarray:
    """A parameter-shaped list (torch) or tree (JAX) as one vector [w_0 .. w_C-1, b_0 .. b_C-1]."""
    if learner.backend == "torch":
        w, b = tensors
        return np.concatenate([w.detach().numpy().reshape(-1), b.detach().numpy()])
    layer = tensors["head"]
    return np.concatenate([np.asarray(layer["kernel"]).reshape(-1), np.asarray(layer["bias"])])


def params_of(learner) -> np.ndarray:
    if learner.backend == "torch":
        return as_wb(learner, [learner.model.head.weight, learner.model.head.bias])
    return as_wb(learner, learner.params)


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ce_grad(theta, x, y, units):
    """Gradient of the mean cross-entropy of f(x) = w x + b over the batch, as [dw, db]."""
    c = len(theta) // 2
    z = np.outer(x, theta[:c]) + theta[c:]
    mask = np.full_like(z, -np.inf)
    mask[:, units] = 0.0
    gz = softmax(z + mask)
    gz[np.arange(len(y)), y] -= 1.0
    gz /= len(y)
    return np.concatenate([gz.T @ x, gz.sum(0)])


# -- fisher: agem -----------------------------------------------------------------------------------

EPOCHS, PERIOD, DECAY, LAM, LR = 7, 3, 0.9, 2.0, 0.5


def agem_by_hand():
    """Full-batch SGD for two tasks of EPOCHS steps with A-GEM's EWC, by the reference's rules."""
    theta = np.concatenate([W0, B0])
    running, window = np.zeros(6), np.zeros(6)
    f_hat = anchor = None
    out = []
    for task in (0, 1):
        for i in range(EPOCHS):
            g = ce_grad(theta, X, LABELS[task], [0, 1, 2])
            if (i + 1) % PERIOD == 0:  # before this step's square is added (conv_split_cifar.py:373)
                running = (1 - DECAY) * running + DECAY / PERIOD * window
                window = np.zeros(6)
            window = window + g * g
            step = g if f_hat is None else g + 2 * LAM * f_hat * (theta - anchor)  # no factor 1/2
            theta = theta - LR * step
        f_hat = (running - running.min()) / (running.max() - running.min() + 1e-32)
        window = np.zeros(6)  # reset_tmp_fisher in task_updates (model/model.py:1260)
        anchor = theta.copy()
        out.append((running.copy(), f_hat.copy(), theta.copy()))
    return out


AGEM_ALGO = {"ewc_lambda": LAM, "fisher": "agem", "fisher_update_after": PERIOD, "fisher_ema_decay": DECAY}


@pytest.mark.parametrize("backend,fast", [("torch", True), ("torch", False), ("jax", False)],
                         ids=["torch-fast-paths", "torch-plain", "jax"])
def test_agem_fisher_and_penalty_by_hand(backend, fast):
    sections = {}
    if backend == "torch":
        sections["backend_keys"] = {"fused_step": fast, "native_update": fast}
    stream = pixel_stream()
    learner = build(backend, stream, "ewc", algo=AGEM_ALGO, optimizer={"lr": LR}, **sections)
    part = learner.parts[0]
    assert type(part).__name__ == "AGEMFisherPart" and part.strength == LAM
    set_linear(learner, W0, B0)
    expected = agem_by_hand()
    for task in stream.tasks:
        learner.on_before_task(task)
        if backend == "torch" and fast:  # an estimator changes only the importance: the fast paths apply
            assert learner._fused is not None
            assert learner._native is not None or native.library() is None
        for epoch in range(EPOCHS):
            learner.train_epoch(task, epoch)
        learner.on_after_training(task)
        learner.on_after_task(task)
        running, f_hat, theta = expected[task.id]
        np.testing.assert_allclose(params_of(learner), theta, rtol=2e-5, atol=1e-6)
        got_running = part.running if backend == "torch" else part.state["running"]
        np.testing.assert_allclose(as_wb(learner, got_running), running, rtol=2e-5, atol=1e-9)
        omega = part.omega if backend == "torch" else part.state["omega"]
        np.testing.assert_allclose(as_wb(learner, omega), f_hat, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(as_wb(learner, part.anchor())[f_hat > 0], theta[f_hat > 0], rtol=2e-5)
    assert part.num_snapshots == 2
    # One term (the latest task's), ewc_lambda * sum F_hat (theta - theta*)^2.
    set_linear(learner, np.zeros(3), np.zeros(3))
    assert part.penalty() == pytest.approx(LAM * float((f_hat * theta ** 2).sum()), rel=1e-5)


def test_agem_steps_cannot_be_recorded_as_a_cuda_graph():
    """The window is updated in Python after every step: a recording would skip it."""
    stream = pixel_stream()
    learner = build("torch", stream, "ewc", algo=AGEM_ALGO)
    learner.on_before_task(stream.tasks[0])
    assert graph_refusal(learner, [], "cuda") is not None
    plain = build("torch", stream, "ewc", algo={"fisher": "empirical"})
    plain.on_before_task(stream.tasks[0])
    assert graph_refusal(plain, [], "cuda") is None
    assert type(plain.parts[0]).__name__ == "EWCPart"


def test_agem_state_round_trip_continues_identically():
    stream = pixel_stream()
    a = build("torch", stream, "ewc", algo=AGEM_ALGO, optimizer={"lr": LR})
    set_linear(a, W0, B0)
    task = stream.tasks[0]
    a.on_before_task(task)
    for e in range(4):
        a.train_epoch(task, e)
    b = build("torch", stream, "ewc", algo=AGEM_ALGO, optimizer={"lr": LR})
    b.on_before_task(task)
    b.load_state_dict(a.state_dict())
    b.parts[0].load_state_dict(a.parts[0].state_dict())
    for learner in (a, b):
        for e in range(4, EPOCHS):
            learner.train_epoch(task, e)
        learner.on_after_training(task)
    np.testing.assert_array_equal(as_wb(a, a.parts[0].omega), as_wb(b, b.parts[0].omega))


# -- fisher: argmax -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("scenario", ["domain_il", "task_il"])
def test_argmax_fisher_by_hand(backend, scenario):
    """mean_k (d -log p(argmax_y f(x_k)) / d theta)^2, the argmax within the task's units in task-IL."""
    stream = pixel_stream(scenario)
    learner = build(backend, stream, "ewc", algo={"fisher": "argmax", "fisher_samples": None,
                                                  "fisher_batch_size": 3})
    task = stream.tasks[1]
    units = list(task.classes)
    c = stream.num_outputs
    w = np.linspace(-0.7, 0.9, c)
    b = np.linspace(0.4, -0.2, c)
    set_linear(learner, w, b)
    theta = np.concatenate([w, b])
    expected = np.zeros(2 * c)
    for x in X:
        z = w * x + b
        y = units[int(np.argmax(z[units]))]
        expected += ce_grad(theta, np.array([x]), np.array([y]), units) ** 2
    expected /= len(X)
    assert not np.allclose(expected, 0)
    learner.on_before_task(task)
    np.testing.assert_allclose(as_wb(learner, learner.parts[0].importance(task)), expected, rtol=1e-5, atol=1e-9)


# -- MAS: batch_mean ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("scenario", ["domain_il", "task_il"])
@pytest.mark.parametrize("batch", [3, 8])
def test_mas_batch_mean_by_hand(backend, scenario, batch):
    """Hsu's MAS: batches of the shuffled task (4 samples: 3 + 1, or one batch of 4), each adding
    |d/dtheta mean_{k in B, j in units} f_j(x_k)^2|, divided by the number of batches; summed over
    tasks; penalty mas_lambda * sum Omega (theta - theta*)^2."""
    stream = pixel_stream(scenario)
    learner = build(backend, stream, "mas", algo={"mas_lambda": 3.0, "mas_importance": "batch_mean",
                                                  "mas_batch_size": batch})
    part = learner.parts[0]
    c = stream.num_outputs
    total = np.zeros(2 * c)
    for task, (w, b) in zip(stream.tasks, [(np.linspace(-0.7, 0.9, c), np.linspace(0.4, -0.2, c)),
                                           (np.linspace(0.5, -0.6, c), np.linspace(-0.3, 0.1, c))]):
        learner.on_before_task(task)
        set_linear(learner, w, b)
        learner.on_after_training(task)
        learner.on_after_task(task)
        units = list(task.classes)
        order = mas_sample_indices(learner.seed, task.id, len(X), None, "batch_mean")
        assert sorted(order) == [0, 1, 2, 3]
        starts = range(0, len(X), batch)
        for lo in starts:
            xb = X[order[lo:lo + batch]]
            f = np.outer(xb, w[units]) + b[units]                 # (|B|, C_task)
            scale = 2.0 / (len(xb) * len(units))
            gw, gb = np.zeros(c), np.zeros(c)
            gw[units] = scale * (f * xb[:, None]).sum(0)
            gb[units] = scale * f.sum(0)
            total += np.abs(np.concatenate([gw, gb])) / len(starts)
        omega = part.omega if backend == "torch" else part.state["omega"]
        np.testing.assert_allclose(as_wb(learner, omega), total, rtol=1e-5, atol=1e-9)
    set_linear(learner, np.zeros(c), np.zeros(c))
    anchor = np.concatenate([w, b])
    assert part.penalty() == pytest.approx(3.0 * float((total * anchor ** 2).sum()), rel=1e-5)


def test_mas_batch_mean_is_at_most_the_per_sample_importance_over_the_units():
    """The documented conversion: batch_mean <= per_sample / C (equal with one sample per batch)."""
    stream = pixel_stream()
    kinds = {}
    for kind, batch in (("per_sample", 256), ("batch_mean", 2), ("batch_mean", 1)):
        learner = build("torch", stream, "mas", algo={"mas_importance": kind, "mas_batch_size": batch})
        set_linear(learner, [0.5, -0.4, 0.2], [-0.1, 0.3, 0.05])
        learner.on_before_task(stream.tasks[0])
        kinds[(kind, batch)] = as_wb(learner, learner.parts[0].importance(stream.tasks[0]))
    per_unit = kinds[("per_sample", 256)] / 3
    assert np.all(kinds[("batch_mean", 2)] <= per_unit + 1e-7)
    np.testing.assert_allclose(kinds[("batch_mean", 1)], per_unit, rtol=1e-5)


# -- optimizer.grad_clip_value ------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [True, False])
def test_torch_clip_value_clips_each_element_of_the_full_gradient(fast):
    """theta <- theta - lr * clip(g_data + penalty gradient, -v, v), element by element."""
    stream = pixel_stream()
    v, lr, lam = 0.05, 0.5, 4.0
    learner = build("torch", stream, "ewc", algo={"ewc_lambda": lam}, optimizer={"lr": lr, "grad_clip_value": v},
                    backend_keys={"fused_step": fast, "native_update": fast})
    part = learner.parts[0]
    omega = np.array([0.2, 0.0, 1.0, 0.5, 0.01, 0.3])
    anchor = np.array([0.0, -0.2, 0.9, 0.1, 0.1, -0.5])
    set_linear(learner, anchor[:3], anchor[3:])
    part.consolidate([torch.tensor(omega[:3], dtype=torch.float32).view(3, 1),
                      torch.tensor(omega[3:], dtype=torch.float32)])
    set_linear(learner, W0, B0)
    task = stream.tasks[0]
    learner.on_before_task(task)
    assert learner._native is None  # the native update would skip the clipping
    if fast:
        assert learner._fused is not None  # the fused forward/backward leaves the clipping in place
    theta = np.concatenate([W0, B0])
    g = ce_grad(theta, X, LABELS[0], [0, 1, 2]) + 2 * (lam / 2) * omega * (theta - anchor)
    assert np.abs(g).max() > v and np.abs(g).min() < v  # some elements clipped, some not
    xb = torch.from_numpy(PIXELS.reshape(-1, 1, 1, 1)).float() / 255.0
    learner.train_step(xb, torch.from_numpy(LABELS[0]), None)
    np.testing.assert_allclose(params_of(learner), theta - lr * np.clip(g, -v, v), rtol=1e-5, atol=1e-7)


def test_native_update_is_chosen_again_without_clipping():
    stream = pixel_stream()
    learner = build("torch", stream, "ewc", backend_keys={"native_update": True})
    learner.on_before_task(stream.tasks[0])
    assert learner._native is not None or native.library() is None


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_jax_clip_value_clips_each_element_before_the_update(opt):
    """The update from gradient g with grad_clip_value v is the unclipped optimizer's update
    from clip(g, -v, v) (for SGD: -lr * clip(g))."""
    from cl_runner.backends.jax.optim import build_optimizer

    def tx_for(clip):
        sections = {"optimizer": {"type": opt, "lr": 0.1, "grad_clip_value": clip}}
        return build_optimizer(validate_config({"backend": {"name": "jax"}, **sections})[0].optimizer)

    params = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
    g = np.array([-2.0, -0.1, 0.3, 7.0], np.float32)
    clipped, plain = tx_for(0.5), tx_for(None)
    state_c, state_p = clipped.init(params), plain.init(params)
    for _ in range(2):  # the second step also sees the moments of the clipped first one
        got, state_c = clipped.update({"w": jnp.asarray(g)}, state_c, params)
        want, state_p = plain.update({"w": jnp.asarray(np.clip(g, -0.5, 0.5))}, state_p, params)
        np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"]), rtol=1e-6)
    if opt == "sgd":
        np.testing.assert_allclose(np.asarray(got["w"]), -0.1 * np.clip(g, -0.5, 0.5), rtol=1e-6)


def test_jax_and_torch_clip_value_train_alike():
    stream = pixel_stream()
    out = {}
    for backend in ("torch", "jax"):
        learner = build(backend, stream, "naive", optimizer={"lr": 0.5, "grad_clip_value": 0.05})
        set_linear(learner, W0, B0)
        task = stream.tasks[0]
        learner.on_before_task(task)
        for e in range(3):
            learner.train_epoch(task, e)
        out[backend] = params_of(learner)
    theta = np.concatenate([W0, B0])
    for _ in range(3):
        theta = theta - 0.5 * np.clip(ce_grad(theta, X, LABELS[0], [0, 1, 2]), -0.05, 0.05)
    np.testing.assert_allclose(out["torch"], theta, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["jax"], theta, rtol=1e-5, atol=1e-7)


# -- configuration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,words", [
    ({"algo": {"name": "ewc_online", "fisher": "agem"}}, "algo=ewc algo.fisher=agem"),
    ({"algo": {"name": "ewc", "fisher": "diagonal"}}, "argmax"),
    ({"algo": {"name": "ewc", "fisher": "agem", "fisher_update_after": 0}}, "fisher_update_after"),
    ({"algo": {"name": "ewc", "fisher": "agem", "fisher_ema_decay": 1.5}}, "fisher_ema_decay"),
    ({"algo": {"name": "mas", "mas_importance": "hsu"}}, "batch_mean"),
    ({"algo": {"name": "naive"}, "optimizer": {"grad_clip_value": -1.0}}, "grad_clip_value"),
])
def test_bad_values_are_clear_errors(cfg, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        validate_config(cfg)
