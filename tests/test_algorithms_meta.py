"""MC-SGD and La-MAML: MC-SGD's line gradient by hand and against the gradients at the sampled
points, its two stages (start position, per-task learning rate, memory); La-MAML's alpha and
weight updates by hand; both beating fine-tuning on real rotated MNIST; the SequeL files run."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from cl_runner import catalog
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.config import validate_config
from cl_runner.errors import ConfigError
from cl_runner.experiment import run_experiment

from conftest import TINY, read_results, run_clrun

torch_backend = catalog.load_backend("torch")
from cl_runner.backends.torch.algorithms.mcsgd import line_gradient  # noqa: E402

CPU = torch.device("cpu")
SEQUEL = (Path(__file__).resolve().parent.parent.parent / "shared" / "sequel_configs").resolve()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest (and does not fight other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_stream(num_tasks=3, scenario="domain_il", n_train=40, side=5, seed=0) -> Stream:
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(num_tasks):
        classes = np.arange(10) if scenario == "domain_il" else np.array([2 * t, 2 * t + 1])
        tasks.append(Task(id=t, train_x=rng.integers(0, 256, (n_train, 1, side, side), dtype=np.uint8),
                          train_y=rng.choice(classes, n_train).astype(np.int64),
                          test_x=rng.integers(0, 256, (20, 1, side, side), dtype=np.uint8),
                          test_y=rng.choice(classes, 20).astype(np.int64), classes=classes))
    outputs = 10 if scenario == "domain_il" else 2 * num_tasks
    return Stream(name="synthetic", scenario=scenario, tasks=tasks, num_outputs=outputs,
                  input_shape=(1, side, side), mean=(0.5,), std=(0.25,))


def make_learner(stream, name, algo=None, backbone=None, seed=0, **sections):
    cfg = {"algo": {"name": name, **(algo or {})},
           "backbone": {"width": 8, "n_hidden_layers": 1, **(backbone or {})},
           "benchmark": {"batch_size": 8}, **sections}
    typed, _ = validate_config(cfg)
    torch.manual_seed(seed)
    return torch_backend.build_learner(typed, stream, CPU, seed)


def weights(learner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.parameters()]


# -- MC-SGD: the line objective ------------------------------------------------------------------------

def test_line_gradient_by_hand():
    # f(x) = w x, loss 1/2 (f(1) - 0)^2 = w^2 / 2, so the gradient at a point p is p. Line from
    # the anchor 0 to w = 2 with n = 2: points 0, 1, 2; losses 0, 0.5, 2.
    model = torch.nn.Linear(1, 1, bias=False)
    stub = SimpleNamespace(model=model, criterion=lambda logits, y, t: 0.5 * ((logits[:, 0] - y) ** 2).mean())
    x, y = torch.ones(1, 1), torch.zeros(1)
    grads, loss = line_gradient(stub, [torch.zeros(1, 1)], [torch.full((1, 1), 2.0)], 2, x, y, None)
    assert loss.item() == pytest.approx((0 + 0.5 + 2) / 3)
    # The mean of the gradients at the points, (0 + 1 + 2) / 3 = 1: not the chain-rule derivative
    # of the mean loss with respect to w, (0 * 0 + 1/2 * 1 + 1 * 2) / 3 = 5/6.
    assert grads[0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("scenario", ["domain_il", "task_il"])
def test_line_gradient_is_the_mean_of_the_gradients_at_the_points(scenario):
    stream = random_stream(num_tasks=2, scenario=scenario)
    learner = make_learner(stream, "mcsgd")
    learner.model.eval()
    params = list(learner.model.parameters())
    w = weights(learner)
    torch.manual_seed(1)
    anchor = [p + 0.3 * torch.randn_like(p) for p in w]
    x = learner.to_input(stream.tasks[1].train_x[:16])
    y = torch.from_numpy(stream.tasks[1].train_y[:16])
    t = torch.tensor([1] * 8 + [0] * 8) if scenario == "task_il" else None
    n = 4
    grads, loss = line_gradient(learner, anchor, w, n, x, y, t)
    expected = [torch.zeros_like(p) for p in w]
    losses = []
    for k in range(n + 1):
        with torch.no_grad():
            for p, a, b in zip(params, anchor, w):
                p.copy_(a + (k / n) * (b - a))
        loss_k = learner.criterion(learner.model(x), y, t)
        losses.append(loss_k.item())
        for e, g in zip(expected, torch.autograd.grad(loss_k, params)):
            e += g / (n + 1)
    assert loss.item() == pytest.approx(np.mean(losses), rel=1e-5)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# -- MC-SGD: the two stages ----------------------------------------------------------------------------

def run_task(learner, task):
    learner.on_before_task(task)
    learner.train_epoch(task, 0)


def test_mcsgd_starts_the_line_search_at_the_init_position_and_decays_the_lr():
    stream = random_stream(num_tasks=3)
    algo = {"lmc_lr": 1e-30, "lmc_momentum": 0.0, "lmc_init_position": 0.25, "lr_decay": 0.5,
            "per_task_memory_samples": 7}
    learner = make_learner(stream, "mcsgd", algo=algo, optimizer={"lr": 0.2, "momentum": 0.5})
    run_task(learner, stream.tasks[0])
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    learner.on_after_training(stream.tasks[0])  # first task: w_bar_0 = w_hat_0, no line search
    w_bar0 = weights(learner)
    assert learner.last_lmc == {}
    for p, q in zip(learner.w_bar, w_bar0):
        assert torch.equal(p, q)
    learner.on_after_task(stream.tasks[0])
    run_task(learner, stream.tasks[1])
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5)
    w_hat1 = weights(learner)
    learner.on_after_training(stream.tasks[1])
    # A vanishing lmc_lr leaves w where the line search starts: w_bar_0 + 0.25 (w_hat_1 - w_bar_0).
    for p, a, b in zip(learner.model.parameters(), w_bar0, w_hat1):
        torch.testing.assert_close(p.detach(), a + 0.25 * (b - a))
    # Memory: 7 samples of each finished task; 7 previous-task samples in one batch of 64 -> 1 step.
    assert learner.memory.task_counts[:2] == [7, 7] and len(learner.memory) == 14
    assert learner.last_lmc["steps"] == 1


def objective(learner, w_prev, w_hat, task_id, n):
    """J(w) of the module docstring over the whole memory (model in evaluation mode)."""
    mem = learner.memory
    prev = torch.arange(task_id * mem.per_task)
    cur = torch.arange(task_id * mem.per_task, (task_id + 1) * mem.per_task)
    w = weights(learner)
    total = 0.0
    for anchor, idx in ((w_prev, prev), (w_hat, cur)):
        x, y, _, _ = mem.get(idx)
        total += line_gradient(learner, anchor, w, n, x, y, None)[1].item()
    return total


def test_mcsgd_line_search_lowers_the_path_objective():
    # Each task has exactly per_task_memory_samples samples, so the memory holds all of them.
    stream = random_stream(num_tasks=2, n_train=16)
    algo = {"lmc_lr": 0.05, "lmc_epochs": 30, "lmc_batch_size": 8, "per_task_memory_samples": 16,
            "lmc_line_samples": 5}
    learner = make_learner(stream, "mcsgd", algo=algo, optimizer={"lr": 0.3})
    for _ in range(10):
        run_task(learner, stream.tasks[0])
    learner.on_after_training(stream.tasks[0])
    learner.on_after_task(stream.tasks[0])
    w_prev = [w.clone() for w in learner.w_bar]
    for _ in range(10):
        run_task(learner, stream.tasks[1])
    w_hat = weights(learner)
    learner.model.eval()
    learner.memory.add(learner.train_x, learner.train_y, 1)
    with torch.no_grad():  # the start of the line search
        for p, a, b in zip(learner.model.parameters(), w_prev, w_hat):
            p.copy_(a + 0.1 * (b - a))
    start = objective(learner, w_prev, w_hat, 1, 5)
    learner.memory.task_counts[1] = 0  # on_after_training stores the task's samples again
    learner.on_after_training(stream.tasks[1])
    end = objective(learner, w_prev, w_hat, 1, 5)
    assert end < 0.9 * start, (start, end)


# -- La-MAML: one update by hand ---------------------------------------------------------------------

def linear_loss(ws, xb, yb):
    w, b = ws
    return F.cross_entropy(xb.flatten(1) @ w.T + b, yb)


def first_order_meta_gradients(theta0, alpha0, x, y, mx, my, pieces, inner_clip):
    """(grad_theta, grad_alpha) of La-MAML's first-order meta-loss for a linear model, by hand
    (montrealrobotics/La-MAML model/lamaml.py:37-56, 81-97): theta_i = theta_{i-1} - relu(alpha) * g_i
    with constant g_i (optionally clamped element-wise), so d theta_i / d theta_0 = I and
    d theta_i / d alpha = -(g_1 + ... + g_i) * [alpha > 0]; the meta-loss is the mean over i of
    L(theta_i)."""
    fast = [w.clone().requires_grad_(True) for w in theta0]
    g_sum = [torch.zeros_like(w) for w in theta0]
    g_theta = [torch.zeros_like(w) for w in theta0]
    g_alpha = [torch.zeros_like(w) for w in theta0]
    for piece in pieces:
        g = torch.autograd.grad(linear_loss(fast, x[piece], y[piece]), fast)
        if inner_clip:
            g = [gi.clamp(-inner_clip, inner_clip) for gi in g]
        g_sum = [s + gi for s, gi in zip(g_sum, g)]
        fast = [(w - a.clamp(min=0) * gi).detach().requires_grad_(True) for w, a, gi in zip(fast, alpha0, g)]
        g_meta = torch.autograd.grad(linear_loss(fast, mx, my), fast)
        g_theta = [a + gm / len(pieces) for a, gm in zip(g_theta, g_meta)]
        g_alpha = [a - s * gm / len(pieces) for a, s, gm in zip(g_alpha, g_sum, g_meta)]
    g_alpha = [g * (a > 0) for g, a in zip(g_alpha, alpha0)]
    return g_theta, g_alpha


def batches(stream, learner):
    task = stream.tasks[0]
    x = learner.to_input(task.train_x[:6])
    y = torch.from_numpy(task.train_y[:6])
    mx = learner.to_input(task.train_x[6:16])
    my = torch.from_numpy(task.train_y[6:16])
    return x, y, mx, my


PER_SAMPLE = tuple(slice(i, i + 1) for i in range(6))


@pytest.mark.parametrize("n_inner,pieces,clip,inner_clip", [
    (None, PER_SAMPLE, None, None),            # the reference: one single-sample step per sample
    (None, PER_SAMPLE, 0.05, None),            # with the meta-gradients clipped (active here)
    (2, (slice(0, 3), slice(3, 6)), 0.001, 0.01),  # two pieces, inner gradients clamped too
], ids=["per-sample", "per-sample-clip", "pieces-inner-clip"])
def test_lamaml_update_by_hand(n_inner, pieces, clip, inner_clip):
    stream = random_stream(num_tasks=1, side=3)
    algo = {"n_inner_updates": n_inner, "alpha_init": 0.15, "lr_alpha": 0.3, "grad_clip_norm": clip,
            "inner_grad_clip": inner_clip}
    learner = make_learner(stream, "lamaml", algo=algo, backbone={"n_hidden_layers": 0})
    assert all(torch.all(a == 0.15) for a in learner.alpha)
    params = list(learner.model.parameters())
    # Some learning rates start negative: relu(alpha) stops their weights in the inner steps and
    # in the update, and their own gradient is zero.
    with torch.no_grad():
        learner.alpha[1].copy_(torch.linspace(-0.4, 0.3, learner.alpha[1].numel()))
    theta0, alpha0 = weights(learner), [a.detach().clone() for a in learner.alpha]
    x, y, mx, my = batches(stream, learner)
    learner.meta_update(x, y, None, mx, my, None)

    g_theta, g_alpha = first_order_meta_gradients(theta0, alpha0, x, y, mx, my, pieces, inner_clip)
    if clip:
        for grads in (g_theta, g_alpha):
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            scale = min(1.0, clip / (norm.item() + 1e-6))
            assert scale < 1  # the clip is active in this case
            grads[:] = [g * scale for g in grads]
    alpha1 = [a - 0.3 * ga for a, ga in zip(alpha0, g_alpha)]
    for a, e in zip(learner.alpha, alpha1):
        torch.testing.assert_close(a.detach(), e, rtol=1e-5, atol=1e-7)
    negative = alpha0[1] <= 0
    assert negative.any() and torch.equal(learner.alpha[1].detach()[negative], alpha0[1][negative])
    # The weights move by -relu(alpha_new) * g_theta: the rates after their own update.
    for p, w, a, g in zip(params, theta0, alpha1, g_theta):
        torch.testing.assert_close(p.detach(), w - a.clamp(min=0) * g, rtol=1e-5, atol=1e-7)
    stopped = alpha1[1] < 0
    assert stopped.any() and torch.equal(params[1].detach()[stopped], theta0[1][stopped])


def test_lamaml_inner_steps_use_relu_of_alpha_and_are_not_clipped_by_default():
    """The two departures of the earlier code, pinned against the reference's arithmetic: with raw
    alpha in the inner step, or inner gradients clamped at grad_clip_norm, the update differs."""
    stream = random_stream(num_tasks=1, side=3)
    learner = make_learner(stream, "lamaml", algo={"grad_clip_norm": None}, backbone={"n_hidden_layers": 0})
    with torch.no_grad():
        learner.alpha[0].copy_(torch.linspace(-0.4, 0.3, learner.alpha[0].numel()).view_as(learner.alpha[0]))
    theta0, alpha0 = weights(learner), [a.detach().clone() for a in learner.alpha]
    x, y, mx, my = batches(stream, learner)
    _, g_theta, g_alpha = learner.meta_gradients(x, y, None, mx, my, None)
    ref = first_order_meta_gradients(theta0, alpha0, x, y, mx, my, PER_SAMPLE, None)
    raw_alpha = alpha0  # the earlier code's inner step: theta - alpha * g, without the ReLU

    def with_raw_alpha():
        fast = [w.clone().requires_grad_(True) for w in theta0]
        out = [torch.zeros_like(w) for w in theta0]
        for piece in PER_SAMPLE:
            g = torch.autograd.grad(linear_loss(fast, x[piece], y[piece]), fast)
            fast = [(w - a * gi).detach().requires_grad_(True) for w, a, gi in zip(fast, raw_alpha, g)]
            gm = torch.autograd.grad(linear_loss(fast, mx, my), fast)
            out = [o + m / 6 for o, m in zip(out, gm)]
        return out

    for got, e in zip([*g_theta, *g_alpha], [*ref[0], *ref[1]]):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(with_raw_alpha()[0], g_theta[0], rtol=1e-3, atol=1e-7)
    clipped = first_order_meta_gradients(theta0, alpha0, x, y, mx, my, PER_SAMPLE, 0.01)
    assert not torch.allclose(clipped[0][0], g_theta[0], rtol=1e-3, atol=1e-7)


def test_lamaml_without_learn_lr_keeps_alpha_and_sync_update_uses_the_optimizer():
    stream = random_stream(num_tasks=1, side=3)
    learner = make_learner(stream, "lamaml", algo={"learn_lr": False, "sync_update": True, "grad_clip_norm": None,
                                                   "n_inner_updates": 3, "alpha_init": 0.2, "lr_alpha": 0.5},
                           backbone={"n_hidden_layers": 0}, optimizer={"lr": 0.07})
    theta0, alpha0 = weights(learner), [a.detach().clone() for a in learner.alpha]
    x, y, mx, my = batches(stream, learner)
    learner.meta_update(x, y, None, mx, my, None)
    for a in learner.alpha:
        assert torch.all(a == 0.2)
    g_theta, _ = first_order_meta_gradients(theta0, alpha0, x, y, mx, my,
                                            (slice(0, 2), slice(2, 4), slice(4, 6)), None)
    for p, w, g in zip(learner.model.parameters(), theta0, g_theta):
        torch.testing.assert_close(p.detach(), w - 0.07 * g, rtol=1e-5, atol=1e-7)


def test_lamaml_second_order_differentiates_through_the_inner_steps():
    stream = random_stream(num_tasks=1, side=3)
    learner = make_learner(stream, "lamaml", algo={"second_order": True, "n_inner_updates": 2, "grad_clip_norm": 0.5,
                                                   "inner_grad_clip": 0.5},
                           backbone={"n_hidden_layers": 0})
    with torch.no_grad():
        learner.alpha[1].copy_(torch.linspace(-0.4, 0.3, learner.alpha[1].numel()))
    theta0, alpha0 = weights(learner), [a.detach().clone() for a in learner.alpha]
    x, y, mx, my = batches(stream, learner)
    _, g_theta, g_alpha = learner.meta_gradients(x, y, None, mx, my, None)
    # By hand: the unrolled inner steps, differentiated as one function of (theta_0, alpha).
    th = [w.clone().requires_grad_(True) for w in theta0]
    al = [a.clone().requires_grad_(True) for a in alpha0]
    fast, meta = th, 0.0
    for piece in (slice(0, 3), slice(3, 6)):
        g = torch.autograd.grad(linear_loss(fast, x[piece], y[piece]), fast, create_graph=True)
        fast = [w - torch.relu(a) * gi.clamp(-0.5, 0.5) for w, a, gi in zip(fast, al, g)]
        meta = meta + linear_loss(fast, mx, my) / 2
    expected = torch.autograd.grad(meta, [*th, *al])
    for got, e in zip([*g_theta, *g_alpha], expected):
        torch.testing.assert_close(got, e, rtol=1e-5, atol=1e-7)
    # ... which differ from the first-order gradients (the Hessian terms are not zero).
    first, _ = first_order_meta_gradients(theta0, alpha0, x, y, mx, my, (slice(0, 3), slice(3, 6)), 0.5)
    assert not torch.allclose(first[0], g_theta[0], rtol=1e-3, atol=1e-6)


def test_lamaml_memory_fills_during_the_first_epoch_only():
    stream = random_stream(num_tasks=2, n_train=24)
    learner = make_learner(stream, "lamaml", algo={"mem_size": 30, "glances": 1})
    task = stream.tasks[0]
    learner.on_before_task(task)
    learner.train_epoch(task, 0)
    assert learner.memory.seen == 24
    learner.train_epoch(task, 1)
    assert learner.memory.seen == 24
    learner.on_after_task(task)
    learner.on_before_task(stream.tasks[1])
    learner.train_epoch(stream.tasks[1], 0)
    assert learner.memory.seen == 48 and len(learner.memory) == 30
    assert set(learner.memory.t[:30].tolist()) == {0, 1}


def test_lamaml_batch_enters_the_memory_after_its_first_glance():
    """model/lamaml.py:78-87 draws the first glance's meta-batch, then pushes the batch's samples
    (lamaml_base.py:66-67: only at the first glance), so the later glances can replay them: with an
    empty memory the first batch's glances see 8, then 8 + 4 meta-batch samples."""
    stream = random_stream(num_tasks=1, n_train=16)
    learner = make_learner(stream, "lamaml", algo={"mem_size": 100, "glances": 3, "replay_batch_size": 4,
                                                   "n_inner_updates": 1})
    sizes = []
    meta_update = learner.meta_update

    def spy(x, y, t, mx, my, mt):
        sizes.append(len(my))
        return meta_update(x, y, t, mx, my, mt)

    learner.meta_update = spy
    task = stream.tasks[0]
    learner.on_before_task(task)
    learner.train_epoch(task, 0)
    assert sizes == [8, 12, 12, 12, 12, 12]


@pytest.mark.parametrize("name, algo", [
    ("mcsgd", {"per_task_memory_samples": 10, "lmc_batch_size": 8, "lmc_epochs": 2, "lmc_line_samples": 3}),
    ("lamaml", {"mem_size": 20, "glances": 2, "n_inner_updates": 2}),
])
def test_restored_learner_continues_identically(name, algo):
    stream = random_stream(num_tasks=3, scenario="task_il")
    a = make_learner(stream, name, algo=algo, optimizer={"lr": 0.2, "momentum": 0.5})

    def train(learner, tasks):
        for task in tasks:
            run_task(learner, task)
            learner.on_after_training(task)
            learner.on_after_task(task)

    train(a, stream.tasks[:2])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_learner(stream, name, algo=algo, optimizer={"lr": 0.2, "momentum": 0.5}, seed=5)
    b.load_state_dict(torch.load(buf, weights_only=False))
    for learner in (a, b):
        train(learner, stream.tasks[2:])
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("algo, words", [
    ({"name": "mcsgd", "lmc_policy": "online"}, ["algo.lmc_policy", "offline"]),
    ({"name": "mcsgd", "lmc_interpolation": "bezier"}, ["algo.lmc_interpolation", "linear"]),
    ({"name": "mcsgd", "lmc_init_position": 1.5}, ["algo.lmc_init_position", "[0, 1]"]),
    ({"name": "mcsgd", "lmc_line_samples": 0}, ["algo.lmc_line_samples", "at least 1"]),
    ({"name": "lamaml", "n_inner_updates": 0}, ["algo.n_inner_updates", "at least 1"]),
    ({"name": "lamaml", "grad_clip_norm": -1.0}, ["algo.grad_clip_norm", "positive"]),
], ids=["policy", "interpolation", "init-position", "line-samples", "inner", "clip"])
def test_bad_values_fail_at_validation(algo, words):
    with pytest.raises(ConfigError) as ei:
        validate_config({"algo": algo})
    for w in words:
        assert w in str(ei.value)


# -- real rotated MNIST: both beat fine-tuning ----------------------------------------------------

def run_real(data_dir, out, algo: str, **algo_keys) -> dict:
    cfg = {
        "seed": 0, "data_dir": str(data_dir), "progress": False, "loggers": [], "checkpoint": False,
        "threads": 1, "algo": {"name": algo, **algo_keys},
        "benchmark": {"name": "rotatedmnist", "num_tasks": 5, "per_task_rotation": 22.5, "subset": 1000,
                      "test_subset": 1000, "batch_size": 10, "eval_batch_size": 1000},
        "backbone": {"type": "mlp", "n_hidden_layers": 2, "width": 100},
        "optimizer": {"type": "sgd", "lr": 0.1}, "training": {"epochs_per_task": 1},
    }
    return run_experiment(cfg, out, console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def rotated_naive(shared_data_dir, tmp_path_factory):
    return run_real(shared_data_dir, tmp_path_factory.mktemp("naive"), "naive")


# 5 tasks rotated by 22.5 degrees each, 1000 training images per task, MLP 2x100, batch 10, lr 0.1,
# seed 0. Measured: naive 52.9 (forgetting 35.5); MC-SGD (SequeL's lr_decay 0.8) 64.2 (forgetting
# 5.4; the same run without the line search, lmc_epochs=0, 59.9 with forgetting 28.9). La-MAML
# with the SequeL file's 5 glances of 5 inner steps (2 samples each) 79.5 (forgetting 5.8; about
# 35 s); the test uses 2 glances of 2 inner steps of 5 samples to stay fast: 80.1 (forgetting 4.4).
# (With the meta-loss at the last fast weights only, those two were 57.7 and 71.4.)
@pytest.mark.slow
def test_mcsgd_beats_naive_on_rotated_mnist(shared_data_dir, tmp_path, rotated_naive):
    """Measured at seeds 0-4 (MC-SGD - naive, points): average accuracy +11.3 +16.0 +15.6 +7.7
    +4.9 (mean 11.1, sd 4.9), forgetting -30.1 -37.6 -33.1 -36.6 -28.1 (mean -33.1, sd 4.1). The
    accuracy gain is asserted only to be positive (the smallest measured is 4.9; mean - 2.2 sd is
    0.4); the forgetting drop to be more than 20 points (mean - 3 sd is 20.9)."""
    res = run_real(shared_data_dir, tmp_path, "mcsgd", lr_decay=0.8)
    assert res["avg_acc"] > rotated_naive["avg_acc"], (rotated_naive["avg_acc"], res["avg_acc"])
    assert res["forgetting"] < rotated_naive["forgetting"] - 20


@pytest.mark.slow
def test_lamaml_beats_naive_on_rotated_mnist(shared_data_dir, tmp_path, rotated_naive):
    res = run_real(shared_data_dir, tmp_path, "lamaml", glances=2, n_inner_updates=2)
    assert res["avg_acc"] > rotated_naive["avg_acc"] + 20, (rotated_naive["avg_acc"], res["avg_acc"])
    assert res["forgetting"] < rotated_naive["forgetting"] - 20


# -- the SequeL files run unchanged ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["mcsgd", "lamaml"])
def test_sequel_file_runs(tmp_path, tiny_data_dir, name):
    if not (SEQUEL / f"{name}_rotatedmnist.yaml").is_file():
        pytest.skip(f"{SEQUEL} has no {name}_rotatedmnist.yaml")
    run_dir = tmp_path / "run"
    proc = run_clrun(["--config-dir", str(SEQUEL), "--config-name", f"{name}_rotatedmnist",
                      "benchmark.num_tasks=2", "benchmark.subset=60", f"data_dir={tiny_data_dir}",
                      f"hydra.run.dir={run_dir}", "loggers=[console]", *TINY], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = read_results(run_dir)
    assert res["config"]["algo"]["name"] == name
    assert np.asarray(res["acc_matrix"]).shape == (2, 2)
    assert "expected avg_acc" in proc.stdout
