"""The algorithms beside EWC, checked against hand computations: SI's path integral, MAS's
importances, A-GEM's projection, ER's concatenated step, DER's stored logits and losses, LwF's
distillation, the replay memory's policies (reservoir uniformity by a chi-square test), state
round trips, and plugins."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_runner import catalog
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.config import validate_config
from cl_runner.errors import ConfigError

from conftest import TINY, read_results, run_clrun

torch_backend = catalog.load_backend("torch")
from cl_runner.backends.torch.algorithms.agem import AGEMPart, agem_project  # noqa: E402
from cl_runner.backends.torch.algorithms.der import DERPart  # noqa: E402
from cl_runner.backends.torch.algorithms.ewc import EWCPart  # noqa: E402
from cl_runner.backends.torch.algorithms.lwf import (LwFPart, distillation_loss,  # noqa: E402
                                                     head_distillation_loss)
from cl_runner.backends.torch.algorithms.mas import MASPart  # noqa: E402
from cl_runner.backends.torch.algorithms.si import SIPart  # noqa: E402
from cl_runner.backends.torch.memory import ReplayMemory, reservoir_slots  # noqa: E402

CPU = torch.device("cpu")


# -- streams and learners ---------------------------------------------------------------------------

def hand_stream(num_tasks=2, scenario="domain_il", pixels=(0, 51, 102, 255)) -> Stream:
    """One-pixel images (x = pixel / 255, no standardisation) and one output unit per task in
    task-IL, a single shared unit otherwise: with ``n_hidden_layers=0`` the model is f(x) = w x + b."""
    x = np.array(pixels, dtype=np.uint8).reshape(-1, 1, 1, 1)
    tasks = []
    for t in range(num_tasks):
        classes = np.array([t]) if scenario == "task_il" else np.array([0])
        y = np.full(len(x), classes[0], dtype=np.int64)
        tasks.append(Task(id=t, train_x=x, train_y=y, test_x=x, test_y=y, classes=classes))
    outputs = num_tasks if scenario == "task_il" else 1
    return Stream(name="hand", scenario=scenario, tasks=tasks, num_outputs=outputs, input_shape=(1, 1, 1),
                  mean=(0.0,), std=(1.0,))


def random_stream(num_tasks=3, scenario="class_il", n_train=40, side=5, seed=0) -> Stream:
    """Small random images; two classes per task in class/task-IL, ten shared ones in domain-IL."""
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(num_tasks):
        classes = np.arange(10) if scenario == "domain_il" else np.array([2 * t, 2 * t + 1])
        ytr = rng.choice(classes, n_train)
        yte = rng.choice(classes, 20)
        tasks.append(Task(id=t, train_x=rng.integers(0, 256, (n_train, 1, side, side), dtype=np.uint8),
                          train_y=ytr.astype(np.int64),
                          test_x=rng.integers(0, 256, (20, 1, side, side), dtype=np.uint8),
                          test_y=yte.astype(np.int64), classes=classes))
    outputs = 10 if scenario == "domain_il" else 2 * num_tasks
    return Stream(name="synthetic", scenario=scenario, tasks=tasks, num_outputs=outputs,
                  input_shape=(1, side, side), mean=(0.5,), std=(0.25,))


def make_learner(stream, name, algo=None, backbone=None, benchmark=None, seed=0, **sections):
    cfg = {"algo": {"name": name, **(algo or {})},
           "backbone": {"width": 8, "n_hidden_layers": 1, **(backbone or {})},
           "benchmark": {"batch_size": 8, "normalize": stream.name != "hand", **(benchmark or {})},
           **sections}
    typed, _ = validate_config(cfg)
    torch.manual_seed(seed)
    return torch_backend.build_learner(typed, stream, CPU, seed)


def set_linear(learner, w, b):
    with torch.no_grad():
        learner.model.head.weight.fill_(w)
        learner.model.head.bias.fill_(b)


def theta(learner) -> np.ndarray:
    return np.array([learner.model.head.weight.item(), learner.model.head.bias.item()])


def finish_task(learner, task):
    learner.on_after_training(task)
    learner.on_after_task(task)


def train_tasks(learner, tasks):
    for task in tasks:
        learner.on_before_task(task)
        learner.train_epoch(task, 0)
        finish_task(learner, task)


# -- SI -----------------------------------------------------------------------------------------------

SI_DATA = {0: [(1.0, 2.0), (-1.0, 0.5), (2.0, 1.0)], 1: [(0.5, -1.0), (1.5, 0.0), (-2.0, 0.3)]}


@pytest.mark.parametrize("algo", [{"name": "si"}, {"name": "ewc", "plugins": ["si"]}],
                         ids=["si", "ewc+si"])
def test_si_path_integral_and_importance_by_hand(algo):
    """f(x) = w x + b with the squared error (f - y)^2 and plain SGD, a few steps per task.

    With EWC first in the parts list (``ewc`` + plugin ``si``), EWC's penalty gradient is added
    before SI's hooks run: SI must still integrate the gradient of the task loss only."""
    c, xi, lr = 0.5, 0.1, 0.1
    stream = hand_stream()
    keys = {"si_c": c, "si_xi": xi, **({"ewc_lambda": 3.0} if algo["name"] == "ewc" else {})}
    learner = make_learner(stream, algo["name"], algo={"plugins": algo.get("plugins", []), **keys},
                           backbone={"n_hidden_layers": 0}, optimizer={"lr": lr})
    learner.criterion = lambda logits, y, t: ((logits[:, 0] - y) ** 2).mean()
    si = next(p for p in learner.parts if isinstance(p, SIPart))
    ewc_term = None
    if algo["name"] == "ewc":
        ewc = learner.parts[0]
        assert isinstance(ewc, EWCPart) and learner.parts.index(si) == 1
        ewc_omega, ewc_anchor = np.array([0.8, 1.5]), np.array([0.1, 0.3])
        set_linear(learner, *ewc_anchor)
        ewc.consolidate([torch.tensor([[0.8]]), torch.tensor([1.5])])
        ewc_term = (ewc_omega, ewc_anchor, 3.0 / 2)
    set_linear(learner, 0.5, -0.2)

    # By hand, in float64.
    th = np.array([0.5, -0.2])
    omega, anchor, expected = np.zeros(2), None, []
    for task in (0, 1):
        start, w_path = th.copy(), np.zeros(2)
        for x, y in SI_DATA[task]:
            r = th[0] * x + th[1] - y
            g = np.array([2 * r * x, 2 * r])  # the task loss's gradient
            step = g.copy()
            if anchor is not None:
                step += 2 * c * omega * (th - anchor)
            if ewc_term is not None:
                step += 2 * ewc_term[2] * ewc_term[0] * (th - ewc_term[1])
            new = th - lr * step
            w_path += -g * (new - th)
            th = new
        omega = omega + w_path / ((th - start) ** 2 + xi)
        anchor = th.copy()
        expected.append((w_path, omega.copy(), th.copy()))

    for task in stream.tasks:
        learner.on_before_task(task)
        for x, y in SI_DATA[task.id]:
            learner.train_step(torch.tensor([[[[x]]]]), torch.tensor([y]), None)
        w_path, omega, th = expected[task.id]
        np.testing.assert_allclose(theta(learner), th, rtol=1e-5)
        np.testing.assert_allclose([si.w[0].item(), si.w[1].item()], w_path, rtol=1e-5)
        finish_task(learner, task)
        np.testing.assert_allclose([si.omega[0].item(), si.omega[1].item()], omega, rtol=1e-5)
        np.testing.assert_allclose([a.item() for a in si.anchor()], th, rtol=1e-5)
    assert si.strength == c and si.num_snapshots == 2
    # The penalty is c * sum Omega (theta - theta*)^2, without a factor 1/2.
    set_linear(learner, 0.0, 0.0)
    assert si.penalty() == pytest.approx(c * float((omega * th ** 2).sum()), rel=1e-5)


# -- MAS ----------------------------------------------------------------------------------------------

def test_mas_importance_by_hand_accumulates_over_tasks():
    """Omega = mean_k |d (w x_k + b)^2 / d theta| = mean |2 f x|, mean |2 f|, summed over tasks."""
    stream = hand_stream()
    learner = make_learner(stream, "mas", algo={"mas_lambda": 2.0}, backbone={"n_hidden_layers": 0})
    part = learner.parts[0]
    assert isinstance(part, MASPart) and part.strength == 2.0
    xs = np.array([0, 51, 102, 255]) / 255.0
    total = np.zeros(2)
    for task, (w, b) in zip(stream.tasks, [(0.7, -0.3), (-0.4, 0.9)]):
        learner.on_before_task(task)
        set_linear(learner, w, b)  # the parameters "at the end of the task"
        finish_task(learner, task)
        f = w * xs + b  # changes sign over the samples in task 0: the absolute value matters
        total += [np.abs(2 * f * xs).mean(), np.abs(2 * f).mean()]
        np.testing.assert_allclose([part.omega[0].item(), part.omega[1].item()], total, rtol=1e-5)
        np.testing.assert_allclose([a.item() for a in part.anchor()], [w, b], rtol=1e-6)
    set_linear(learner, 0.1, 0.2)
    expected = 2.0 * float((total * (np.array([0.1, 0.2]) - [-0.4, 0.9]) ** 2).sum())
    assert part.penalty() == pytest.approx(expected, rel=1e-5)


def test_mas_in_task_il_uses_the_task_head_only():
    stream = hand_stream(scenario="task_il")
    learner = make_learner(stream, "mas", backbone={"n_hidden_layers": 0})
    part = learner.parts[0]
    head = learner.model.head  # 1 input -> 2 units, unit t is task t's head
    xs = np.array([0, 51, 102, 255]) / 255.0
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.7], [-0.4]]))
        head.bias.copy_(torch.tensor([-0.3, 0.9]))
    learner.on_before_task(stream.tasks[0])
    finish_task(learner, stream.tasks[0])
    f0 = 0.7 * xs - 0.3
    np.testing.assert_allclose(part.omega[0][:, 0].numpy(), [np.abs(2 * f0 * xs).mean(), 0.0], rtol=1e-5)
    np.testing.assert_allclose(part.omega[1].numpy(), [np.abs(2 * f0).mean(), 0.0], rtol=1e-5)
    learner.on_before_task(stream.tasks[1])
    finish_task(learner, stream.tasks[1])
    f1 = -0.4 * xs + 0.9
    np.testing.assert_allclose(part.omega[1].numpy(), [np.abs(2 * f0).mean(), np.abs(2 * f1).mean()],
                               rtol=1e-5)


# -- online EWC ---------------------------------------------------------------------------------------

def test_online_ewc_keeps_one_decayed_running_fisher(monkeypatch):
    stream = random_stream(num_tasks=3, scenario="domain_il")
    learner = make_learner(stream, "ewc_online", algo={"ewc_lambda": 4.0, "ewc_gamma": 0.5})
    part = learner.parts[0]
    assert part.strength == 2.0  # lambda / 2
    fishers = [[torch.full_like(p, float(k + 1)) for p in part.params] for k in range(3)]
    monkeypatch.setattr(EWCPart, "importance", lambda self, task: fishers[task.id])
    anchors = []
    for task in stream.tasks:
        learner.on_before_task(task)
        learner.train_epoch(task, 0)
        anchors.append([p.detach().clone() for p in part.params])
        finish_task(learner, task)
    # F* = 0.5 * (0.5 * 1 + 2) + 3 = 4.25 everywhere; the anchor is the last task's end.
    for o, a, last in zip(part.omega, part.anchor(), anchors[-1]):
        torch.testing.assert_close(o, torch.full_like(o, 4.25))
        torch.testing.assert_close(a, last)
    assert part.num_snapshots == 3


# -- A-GEM --------------------------------------------------------------------------------------------

def test_agem_projection_formula():
    gen = torch.Generator().manual_seed(0)
    conflicts = 0
    for _ in range(20):
        g = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
        r = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
        gv, rv = torch.cat([t.flatten() for t in g]), torch.cat([t.flatten() for t in r])
        dot = float(gv @ rv)
        expected = gv - (dot / float(rv @ rv)) * rv if dot < 0 else gv.clone()
        returned = agem_project(g, r)
        out = torch.cat([t.flatten() for t in g])
        assert float(returned) == pytest.approx(dot)
        torch.testing.assert_close(out, expected)
        assert float(out @ rv) >= -1e-10  # never against the reference gradient
        if dot < 0:
            conflicts += 1
            assert float(out @ rv) == pytest.approx(0.0, abs=1e-10)
    assert 0 < conflicts < 20  # both branches exercised


def flat_grad(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("scenario", ["domain_il", "task_il"])
def test_agem_step_is_sgd_on_the_projected_gradient(scenario):
    stream = random_stream(num_tasks=2, scenario=scenario, n_train=40)
    lr = 0.5
    learner = make_learner(stream, "agem", algo={"mem_per_task": 8, "replay_batch_size": 256},
                           optimizer={"lr": lr})
    part = learner.parts[0]
    assert isinstance(part, AGEMPart)
    train_tasks(learner, stream.tasks[:1])
    assert len(part.memory) == 8 and part.memory.task_counts[0] == 40
    task = stream.tasks[1]
    learner.on_before_task(task)
    mx, my, mt, _ = part.memory.get(part.memory.sample(256, before_task=1))
    assert len(my) == 8 and (mt == 0).all()  # the reference batch is all of task 0's memory
    params = part.params
    projected = 0
    for lo in range(0, 40, 8):
        x, y = learner.train_x[lo:lo + 8], learner.train_y[lo:lo + 8]
        t = learner.train_t[lo:lo + 8] if learner.masks else None
        g = flat_grad(learner.criterion(learner.model(x), y, t), params)
        ref = flat_grad(F.cross_entropy(learner.masked(learner.model(mx), mt if learner.masks else None), my),
                        params)
        dot = float(g @ ref)
        g_tilde = g - (dot / float(ref @ ref)) * ref if dot < 0 else g
        before = torch.cat([p.detach().flatten() for p in params])
        learner.train_step(x, y, t)
        after = torch.cat([p.detach().flatten() for p in params])
        torch.testing.assert_close((before - after) / lr, g_tilde, rtol=1e-4, atol=1e-6)
        assert float(g_tilde @ ref) >= -1e-5 * float(g.norm() * ref.norm())
        projected += dot < 0
    assert projected > 0, "no step conflicted with the memory; the test would not check the projection"
    assert part.memory.task_counts[1] == 40  # the stream batches went into task 1's ring


def test_agem_first_task_is_plain_sgd():
    stream = random_stream(num_tasks=2, scenario="class_il")
    a = make_learner(stream, "agem", algo={"mem_per_task": 8})
    b = make_learner(stream, "naive")
    b.model.load_state_dict(a.model.state_dict())
    for learner in (a, b):
        learner.on_before_task(stream.tasks[0])
        learner.train_epoch(stream.tasks[0], 0)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q)


# -- ER -----------------------------------------------------------------------------------------------

def test_er_step_trains_on_the_batch_concatenated_with_memory(monkeypatch):
    """Task-IL: the replayed samples of task 0 are scored on task 0's units, the stream's on
    task 1's; the step is SGD on the mean loss over the concatenation."""
    stream = random_stream(num_tasks=2, scenario="task_il", n_train=24)
    lr = 0.3
    learner = make_learner(stream, "er", algo={"mem_size": 30, "replay_batch_size": 6},
                           optimizer={"lr": lr})
    train_tasks(learner, stream.tasks[:1])
    memory = learner.memory
    assert len(memory) == 24 and (memory.t[:24] == 0).all()
    learner.on_before_task(stream.tasks[1])
    idx = torch.tensor([3, 0, 17, 9, 21, 5])
    monkeypatch.setattr(memory, "sample", lambda k, before_task=None: idx[:k])
    x, y, t = learner.train_x[:8], learner.train_y[:8], learner.train_t[:8]
    mx, my, mt, _ = memory.get(idx)
    params = list(learner.model.parameters())
    logits = learner.model(torch.cat([x, mx]))
    units = learner.output_mask[torch.cat([t, mt])]
    assert units[:8, 2:].all() and units[8:, :2].all()
    manual = F.cross_entropy(logits.masked_fill(~units, float("-inf")), torch.cat([y, my]))
    g = flat_grad(manual, params)
    before = torch.cat([p.detach().flatten() for p in params])
    loss = learner.train_step(x, y, t)
    after = torch.cat([p.detach().flatten() for p in params])
    assert float(loss) == pytest.approx(float(manual.detach()), rel=1e-5)
    torch.testing.assert_close((before - after) / lr, g, rtol=1e-4, atol=1e-6)
    assert memory.seen == 32  # the stream batch was offered to the memory after the step


# -- DER / DER++ -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["der", "derpp"])
def test_der_stores_the_logits_of_the_step_and_matches_them(monkeypatch, name):
    stream = random_stream(num_tasks=2, scenario="task_il", n_train=16)
    alpha, beta = 0.7, 0.4
    algo = {"mem_size": 50, "replay_batch_size": 4, "alpha": alpha, **({"beta": beta} if name == "derpp" else {})}
    learner = make_learner(stream, name, algo=algo, optimizer={"lr": 0.2})
    part = learner.parts[0]
    assert isinstance(part, DERPart) and part.use_labels == (name == "derpp")
    learner.on_before_task(stream.tasks[0])
    x, y, t = learner.train_x[:8], learner.train_y[:8], learner.train_t[:8]
    with torch.no_grad():
        z = learner.model(x)  # the logits of the step, before its update
    learner.train_step(x, y, t)
    torch.testing.assert_close(part.memory.logits[:8], z)
    torch.testing.assert_close(part.memory.x[:8], x)
    assert (part.memory.t[:8] == 0).all() and len(part.memory) == 8

    # The replay terms by hand, with fixed memory batches.
    learner.on_before_task(stream.tasks[1])
    draws = iter([torch.tensor([0, 5, 2, 7]), torch.tensor([6, 1, 3, 4])])
    monkeypatch.setattr(part.memory, "sample", lambda k, before_task=None: next(draws))
    x1 = learner.train_x[:8]
    logits = learner.model(x1)
    extra = part.extra_loss(x1, learner.train_y[:8], logits)
    mx, my, mt, mz = part.memory.get(torch.tensor([0, 5, 2, 7]))
    expected = alpha * ((learner.model(mx) - mz) ** 2).mean()  # mean over samples and units
    if name == "derpp":
        mx2, my2, mt2, _ = part.memory.get(torch.tensor([6, 1, 3, 4]))
        expected = expected + beta * F.cross_entropy(learner.masked(learner.model(mx2), mt2), my2)
    assert extra.item() == pytest.approx(expected.item(), rel=1e-5)


# -- LwF ----------------------------------------------------------------------------------------------

def test_distillation_losses_by_hand():
    gen = torch.Generator().manual_seed(0)
    new, old = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    T = 2.0
    manual = -(torch.softmax(old / T, 1) * torch.log_softmax(new / T, 1)).sum(1).mean()
    assert float(distillation_loss(new, old, T)) == pytest.approx(float(manual), rel=1e-6)
    heads = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    per_head = sum(distillation_loss(new[:, h], old[:, h], T) for h in heads)
    assert float(head_distillation_loss(new, old, heads, T)) == pytest.approx(float(per_head), rel=1e-6)


@pytest.mark.parametrize("scenario", ["class_il", "task_il", "domain_il"])
def test_lwf_distils_the_previous_model_on_the_old_outputs(scenario):
    stream = random_stream(num_tasks=3, scenario=scenario)
    learner = make_learner(stream, "lwf", algo={"alpha": 1.5, "temperature": 3.0}, optimizer={"lr": 0.3})
    part = learner.parts[0]
    assert isinstance(part, LwFPart)
    learner.on_before_task(stream.tasks[0])
    x = learner.train_x[:8]
    assert part.extra_loss(x, None, learner.model(x)) is None  # nothing to distil yet
    learner.train_epoch(stream.tasks[0], 0)
    finish_task(learner, stream.tasks[0])
    train_tasks(learner, stream.tasks[1:2])
    previous = {k: v.clone() for k, v in learner.model.state_dict().items()}
    learner.on_before_task(stream.tasks[2])
    for k, v in part.teacher.state_dict().items():
        torch.testing.assert_close(v, previous[k])
    learner.train_epoch(stream.tasks[2], 0)  # the teacher stays frozen
    for k, v in part.teacher.state_dict().items():
        torch.testing.assert_close(v, previous[k])
    x = learner.train_x[:8]
    new, old = learner.model(x), part.teacher(x)
    if scenario == "class_il":
        expected = distillation_loss(new[:, :4], old[:, :4], 3.0)  # classes of tasks 0 and 1
    elif scenario == "domain_il":
        expected = distillation_loss(new, old, 3.0)
    else:
        expected = distillation_loss(new[:, :2], old[:, :2], 3.0) + distillation_loss(new[:, 2:4], old[:, 2:4], 3.0)
    assert part.extra_loss(x, None, new).item() == pytest.approx(1.5 * expected.item(), rel=1e-5)


# -- the replay memory --------------------------------------------------------------------------------

def algorithm_r_one_at_a_time(seen, u, capacity):
    """Vitter's algorithm R, sample by sample: the final slot of each sample (-1: not kept)."""
    owner = {}
    for i, ui in enumerate(u):
        n = seen + i
        slot = n if n < capacity else int(np.floor(ui * (n + 1)))
        if slot < capacity:
            owner[slot] = i
    out = np.full(len(u), -1)
    for slot, i in owner.items():
        out[i] = slot
    return out


def test_batched_reservoir_equals_one_sample_at_a_time():
    rng = np.random.default_rng(0)
    for seen, n, capacity in [(0, 10, 4), (3, 10, 5), (50, 40, 8), (1000, 64, 3), (7, 1, 7)]:
        for _ in range(20):
            u = rng.random(n)
            np.testing.assert_array_equal(reservoir_slots(seen, u, capacity),
                                          algorithm_r_one_at_a_time(seen, u, capacity))


def stream_memory(policy="reservoir", seed=0, **kw) -> ReplayMemory:
    return ReplayMemory(policy, (1,), CPU, seed, num_outputs=10, **kw)


def test_reservoir_content_is_uniform_over_the_stream():
    """1000 samples (ids 0..999) offered in batches of 10 to a 50-slot reservoir, 200 times with
    different seeds: every sample should be kept with probability 50/1000, early or late."""
    capacity, n, batch, repeats, bins = 50, 1000, 10, 200, 20
    counts = np.zeros(n)
    ids = torch.arange(n)
    for seed in range(repeats):
        memory = stream_memory(capacity=capacity, seed=seed)
        for lo in range(0, n, batch):
            memory.add(ids[lo:lo + batch, None].float(), ids[lo:lo + batch], task_id=lo * 5 // n)
        kept = memory.y[:capacity].numpy()
        assert len(np.unique(kept)) == capacity  # full, no sample twice
        np.testing.assert_array_equal(memory.x[:capacity, 0].long().numpy(), kept)  # x, y stay paired
        counts[kept] += 1
    per_bin = counts.reshape(bins, -1).sum(1)
    expected = repeats * capacity / bins
    chi2 = float(((per_bin - expected) ** 2 / expected).sum())
    # 99.9% quantile of the chi-square distribution with 19 degrees of freedom.
    assert chi2 < 43.82, (chi2, per_bin)
    # A memory of the first or last samples would be far off: the first and last fifths hold a
    # fifth of the kept samples each.
    assert abs(counts[:200].sum() / counts.sum() - 0.2) < 0.02
    assert abs(counts[-200:].sum() / counts.sum() - 0.2) < 0.02


def test_class_balanced_memory_gives_each_seen_class_equal_slots():
    memory = stream_memory("class_balanced", capacity=20)
    memory.register_classes([0, 1])
    y = torch.tensor([0] * 100 + [1] * 6)
    for lo in range(0, len(y), 10):
        memory.add(y[lo:lo + 10, None].float(), y[lo:lo + 10], task_id=0)
    stored = memory.y[:20][memory.filled[:20]]
    assert (stored == 0).sum() == 10 and (stored == 1).sum() == 6  # quota 10 each; class 1 has only 6
    assert (memory.y[:10] == 0).all()  # class 0's region
    memory.register_classes([2, 3])  # the quota shrinks to 5: each region keeps 5 of its samples
    stored = memory.y[:20][memory.filled[:20]]
    assert [(stored == c).sum().item() for c in range(4)] == [5, 5, 0, 0]
    y = torch.tensor([2, 3] * 30)
    for lo in range(0, len(y), 10):
        memory.add(y[lo:lo + 10, None].float(), y[lo:lo + 10], task_id=1)
    stored = memory.y[:20][memory.filled[:20]]
    assert [(stored == c).sum().item() for c in range(4)] == [5, 5, 5, 5] and len(memory) == 20
    for k, c in enumerate([0, 1, 2, 3]):  # every region holds its own class
        region = slice(5 * k, 5 * (k + 1))
        assert (memory.y[region] == c).all() and (memory.x[region, 0] == c).all()
    with pytest.raises(ConfigError, match="cannot hold one sample"):
        stream_memory("class_balanced", capacity=3).register_classes(range(4))


def test_ring_memory_keeps_each_tasks_latest_samples():
    memory = stream_memory("ring", per_task=4, num_tasks=3)
    assert memory.capacity == 12
    ids = torch.arange(10)
    for lo in range(0, 10, 3):  # batches 0-2, 3-5, 6-8, 9
        memory.add(ids[lo:lo + 3, None].float(), ids[lo:lo + 3], task_id=0)
    assert sorted(memory.y[:4].tolist()) == [6, 7, 8, 9] and len(memory) == 4
    memory.add(ids[:6, None].float() + 100, ids[:6] + 100, task_id=1)  # a batch larger than the ring
    assert sorted(memory.y[4:8].tolist()) == [102, 103, 104, 105] and len(memory) == 8
    assert memory.sample(3, before_task=0) is None
    for _ in range(20):
        idx = memory.sample(100, before_task=1)
        assert sorted(idx.tolist()) == [0, 1, 2, 3]  # all of task 0, nothing of task 1
        assert len(set(memory.sample(5).tolist())) == 5  # without replacement
    assert set(memory.sample(100).tolist()) == set(range(8))


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced", "ring"])
def test_sampling_before_a_task_draws_only_older_tasks(policy):
    kw = {"per_task": 6, "num_tasks": 3} if policy == "ring" else {"capacity": 20 if policy == "reservoir" else 40}
    memory = stream_memory(policy, **kw)
    memory.register_classes(range(10))
    assert memory.sample(4) is None and memory.sample(4, before_task=2) is None
    for task in range(3):
        y = torch.arange(10) % 10
        for lo in range(0, 10, 5):
            memory.add(torch.full((5, 1), float(task)), y[lo:lo + 5], task_id=task)
    for before in (1, 2):
        for _ in range(10):
            idx = memory.sample(4, before_task=before)
            assert idx is not None and len(idx) == 4 and len(set(idx.tolist())) == 4
            assert (memory.t[idx] < before).all()
            assert (memory.x[idx, 0] == memory.t[idx].float()).all()  # rows stay whole
    assert memory.sample(4, before_task=0) is None


def test_memory_state_round_trip_continues_identically():
    for policy, kw in [("reservoir", {"capacity": 16}), ("class_balanced", {"capacity": 16}),
                       ("ring", {"per_task": 4, "num_tasks": 2})]:
        a = stream_memory(policy, seed=3, **kw)
        a.register_classes(range(10))
        data = torch.arange(60)
        for lo in range(0, 30, 10):
            a.add(data[lo:lo + 10, None].float(), data[lo:lo + 10] % 10, task_id=0)
        b = stream_memory(policy, seed=99, **kw)
        b.load_state_dict(a.state_dict())
        for mem in (a, b):
            for lo in range(30, 60, 10):
                mem.add(data[lo:lo + 10, None].float(), data[lo:lo + 10] % 10, task_id=1)
        torch.testing.assert_close(a.x, b.x)
        assert torch.equal(a.sample(5), b.sample(5)), policy


def test_memory_size_per_task_or_total():
    stream = random_stream(num_tasks=3)
    er = make_learner(stream, "er", algo={"mem_size": 100, "mem_per_task": 7})
    assert er.memory.capacity == 21  # mem_per_task wins: 7 per task, reservoir over 3 tasks
    ring = make_learner(stream, "er", algo={"mem_policy": "ring", "mem_size": 10})
    assert ring.memory.per_task == 3 and ring.memory.capacity == 9
    agem = make_learner(stream, "agem")
    assert agem.parts[0].memory.per_task == 250 and agem.parts[0].replay_batch_size == 256


@pytest.mark.parametrize("algo, words", [
    ({"name": "er", "mem_policy": "fifo"}, ["'algo.mem_policy'", "reservoir, class_balanced, ring"]),
    ({"name": "der", "mem_size": None}, ["algo.mem_size", "algo.mem_per_task"]),
    ({"name": "agem", "mem_per_task": 0}, ["'algo.mem_per_task' must be a positive integer"]),
    ({"name": "si", "si_xi": 0.0}, ["'algo.si_xi' must be positive"]),
    ({"name": "naive", "plugins": ["ewc_online"], "ewc_gamma": 1.5}, ["'algo.ewc_gamma' must be in [0, 1]"]),
], ids=["policy", "no-size", "zero-size", "si-xi", "plugin-gamma"])
def test_bad_algorithm_values_fail_at_validation(algo, words):
    with pytest.raises(ConfigError) as ei:
        validate_config({"algo": algo})
    for w in words:
        assert w in str(ei.value)


# -- state round trips: a learner restored after task 2 trains task 3 like the original -----------

@pytest.mark.parametrize("name, algo", [
    ("er", {"mem_size": 20}), ("er", {"mem_policy": "class_balanced", "mem_size": 20}),
    ("der", {"mem_size": 20}), ("derpp", {"mem_size": 20}), ("agem", {"mem_per_task": 6}),
    ("si", {}), ("mas", {}), ("ewc_online", {"fisher_samples": None}), ("lwf", {}),
    ("er", {"plugins": ["si"], "mem_size": 20}),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v) or "defaults")
def test_restored_learner_continues_identically(name, algo):
    stream = random_stream(num_tasks=3, scenario="class_il")
    a = make_learner(stream, name, algo=algo, optimizer={"lr": 0.2, "momentum": 0.5})
    train_tasks(a, stream.tasks[:2])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_learner(stream, name, algo=algo, optimizer={"lr": 0.2, "momentum": 0.5}, seed=5)
    b.load_state_dict(torch.load(buf, weights_only=False))
    for learner in (a, b):
        train_tasks(learner, stream.tasks[2:])
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# -- plugins ------------------------------------------------------------------------------------------

def test_regularisers_are_plugins_on_any_algorithm():
    stream = random_stream(num_tasks=2)
    for plugin, cls in [("ewc", EWCPart), ("si", SIPart), ("mas", MASPart)]:
        learner = make_learner(stream, "er", algo={"plugins": [plugin]})
        assert [type(p) for p in learner.parts] == [cls]
        train_tasks(learner, stream.tasks)
        assert learner.parts[0].num_snapshots == 2
    learner = make_learner(stream, "derpp", algo={"plugins": ["ewc_online", "si"], "si_c": 0.3})
    assert [type(p).__name__ for p in learner.parts] == ["DERPPPart", "OnlineEWCPart", "SIPart"]
    assert learner.cfg.algo.si_c == 0.3 and learner.cfg.algo.ewc_gamma == 1.0


def test_cli_er_with_ewc_plugin_runs(tmp_path, tiny_data_dir):
    run_dir = tmp_path / "run"
    proc = run_clrun(["algo=er", "algo.plugins=[ewc]", "+algo.ewc_lambda=5", "benchmark=splitmnist",
                      "benchmark.num_tasks=2", f"data_dir={tiny_data_dir}", f"hydra.run.dir={run_dir}",
                      "loggers=[console]", *TINY], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = read_results(run_dir)
    assert res["algo"] == "er" and res["config"]["algo"]["plugins"] == ["ewc"]
    assert res["config"]["algo"]["ewc_lambda"] == 5.0 and res["config"]["algo"]["mem_size"] == 200
    assert np.array(res["acc_matrix"]).shape == (2, 2)


def test_cli_unknown_plugin_is_a_clear_error(tmp_path, tiny_data_dir):
    proc = run_clrun(["algo=er", "algo.plugins=[sii]", f"data_dir={tiny_data_dir}",
                      f"hydra.run.dir={tmp_path / 'run'}", *TINY], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert "unknown plugin 'sii'" in out and "Did you mean 'si'?" in out
    valid = out.split("Valid plugins:")[1]
    for name in ("ewc", "ewc_online", "mas", "si"):
        assert name in valid
    assert not (tmp_path / "run" / "results.json").exists()
