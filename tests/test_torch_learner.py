"""The PyTorch learner: determinism, task-IL masking, and EWC's Fisher and penalty by hand."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from cl_runner import catalog
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.config import validate_config
from cl_runner.core.loop import ContinualLoop
from cl_runner.errors import TrainingDivergedError
from cl_runner.experiment import run_experiment

from conftest import TINY

torch_backend = catalog.load_backend("torch")
from cl_runner.backends.torch.algorithms.ewc import EWCPart, fisher_diagonal  # noqa: E402
from cl_runner.backends.torch.persample import per_sample_grad_sum  # noqa: E402

CPU = torch.device("cpu")


def tiny_stream(num_tasks=2, scenario="domain_il", n_train=40, n_test=30, side=6, seed=0) -> Stream:
    """A synthetic stream of small random images (no files needed)."""
    rng = np.random.default_rng(seed)
    tasks = []
    per_task = 10 if scenario == "domain_il" else 2
    for t in range(num_tasks):
        offset = 0 if scenario == "domain_il" else per_task * t
        classes = np.arange(offset, offset + per_task)
        ytr = rng.integers(0, per_task, n_train) + offset
        yte = rng.integers(0, per_task, n_test) + offset
        tasks.append(Task(id=t, train_x=rng.integers(0, 256, (n_train, 1, side, side), dtype=np.uint8),
                          train_y=ytr.astype(np.int64),
                          test_x=rng.integers(0, 256, (n_test, 1, side, side), dtype=np.uint8),
                          test_y=yte.astype(np.int64), classes=classes))
    outputs = 10 if scenario == "domain_il" else per_task * num_tasks
    return Stream(name="synthetic", scenario=scenario, tasks=tasks, num_outputs=outputs,
                  input_shape=(1, side, side), mean=(0.5,), std=(0.25,))


def learner_for(stream, name="ewc", seed=0, algo=None, backbone=None, benchmark=None, **sections):
    """A learner of algorithm ``name`` on ``stream``; the keyword sections override the config."""
    cfg = {"algo": {"name": name, **(algo or {})},
           "backbone": {"width": 8, "n_hidden_layers": 2, **(backbone or {})},
           "benchmark": {"batch_size": 8, **(benchmark or {})}, **sections}
    typed, _ = validate_config(cfg)
    torch.manual_seed(seed)
    return torch_backend.build_learner(typed, stream, CPU, seed)


# -- determinism --------------------------------------------------------------------------------

def experiment_cfg(tiny_data_dir, tmp_path, seed, algo="ewc"):
    overrides = dict(o.split("=") for o in TINY)
    return {
        "seed": seed, "data_dir": str(tiny_data_dir), "cache_dir": str(tmp_path / "cache"),
        "progress": False, "loggers": [], "checkpoint": False, "threads": 1,
        "algo": {"name": algo, "ewc_lambda": 10.0} if algo == "ewc" else {"name": algo},
        "benchmark": {"name": "permutedmnist", "num_tasks": 2, "subset": 200,
                      "batch_size": int(overrides["benchmark.batch_size"]), "eval_batch_size": 200},
        "backbone": {"width": int(overrides["backbone.width"])},
    }


def quiet_run(cfg, out):
    return run_experiment(cfg, out, console=Console(file=io.StringIO()))


def test_same_seed_same_results(tiny_data_dir, tmp_path):
    a = quiet_run(experiment_cfg(tiny_data_dir, tmp_path, seed=3), tmp_path / "a")
    b = quiet_run(experiment_cfg(tiny_data_dir, tmp_path, seed=3), tmp_path / "b")
    np.testing.assert_array_equal(a["acc_matrix"], b["acc_matrix"])
    assert a["epoch_losses"] == b["epoch_losses"]
    np.testing.assert_array_equal(a["initial_acc"], b["initial_acc"])
    c = quiet_run(experiment_cfg(tiny_data_dir, tmp_path, seed=4), tmp_path / "c")
    assert c["epoch_losses"] != a["epoch_losses"]
    # The matrix is full (eval_on=all) and its last row gives avg_acc.
    assert a["acc_matrix"].shape == (2, 2) and not np.isnan(a["acc_matrix"]).any()
    assert a["avg_acc"] == pytest.approx(a["acc_matrix"][-1].mean())


def test_loop_fills_lower_triangle_with_eval_on_seen():
    stream = tiny_stream(num_tasks=3)
    learner = learner_for(stream, "naive")
    state = ContinualLoop(learner, stream, eval_on="seen", eval_initial=False).run()
    R = state.acc_matrix
    assert np.isnan(R[0, 1]) and np.isnan(R[0, 2]) and np.isnan(R[1, 2])
    assert not np.isnan(R[np.tril_indices(3)]).any()
    assert state.initial_acc is None
    assert state.steps_per_task == [5, 5, 5]  # ceil(40 / 8)


# -- task-IL masking ----------------------------------------------------------------------------

def test_task_il_predictions_stay_in_the_task():
    stream = tiny_stream(num_tasks=3, scenario="task_il")
    learner = learner_for(stream, "naive")
    with torch.no_grad():
        # Make the last unit win everywhere: unmasked, everything would be predicted as class 5.
        learner.model.head.bias.zero_()
        learner.model.head.bias[5] = 1e4
    x, _ = learner.test_tensors(stream.tasks[0])
    assert set(learner.predict(x, None).tolist()) == {5}
    for t in range(3):
        pred = learner.predict(x, t)
        assert set(pred.tolist()) <= {2 * t, 2 * t + 1}
    # Task 2 owns unit 5: all its samples are predicted 5, so accuracy = share of label 5.
    acc = learner.evaluate(stream.tasks)
    y2 = stream.tasks[2].test_y
    assert acc[2] == pytest.approx(100.0 * (y2 == 5).mean())


def test_task_il_loss_uses_only_the_task_units():
    stream = tiny_stream(num_tasks=3, scenario="task_il")
    learner = learner_for(stream, "naive")
    logits = torch.randn(4, 6)
    y = torch.tensor([2, 3, 4, 5])
    t = torch.tensor([1, 1, 2, 2])
    loss = learner.criterion(logits, y, t)
    # By hand: a softmax over each sample's own two units.
    manual = 0.0
    for i in range(4):
        units = [2 * int(t[i]), 2 * int(t[i]) + 1]
        manual += -torch.log_softmax(logits[i, units], 0)[units.index(int(y[i]))]
    assert loss.item() == pytest.approx(manual.item() / 4, rel=1e-6)
    # Without masking (class-IL) the loss is the plain cross-entropy.
    stream_c = tiny_stream(num_tasks=3, scenario="class_il")
    learner_c = learner_for(stream_c, "naive")
    assert learner_c.masks is False
    assert learner_c.criterion(logits, y, None).item() == pytest.approx(F.cross_entropy(logits, y).item())


# -- EWC's Fisher -------------------------------------------------------------------------------

def brute_force_fisher(learner, x, y, t):
    """Mean of each sample's squared gradient, one backward pass per sample."""
    model = learner.model
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        logits = learner.masked(model(x[i:i + 1]), t[i:i + 1] if t is not None else None)
        loss = F.cross_entropy(logits, y[i:i + 1])
        grads = torch.autograd.grad(loss, params)
        for acc, g in zip(total, grads):
            acc += g * g
    model.train()
    return [s / len(x) for s in total]


@pytest.mark.parametrize("scenario", ["domain_il", "task_il"])
def test_fisher_fast_path_equals_per_sample_loop(scenario):
    stream = tiny_stream(num_tasks=3, scenario=scenario, n_train=37)
    learner = learner_for(stream, backbone={"dropout": 0.5})  # dropout: the Fisher is taken in eval mode
    task = stream.tasks[1]
    x = learner.to_input(task.train_x)
    y = torch.from_numpy(task.train_y)
    t = torch.full((len(y),), task.id) if learner.masks else None
    fast = fisher_diagonal(learner, x, y, t, batch_size=8)  # 37 = 4 x 8 + 5: a partial batch
    assert learner.model.training  # the mode is restored
    slow = brute_force_fisher(learner, x, y, t)
    assert len(fast) == len(slow) == 6  # three linear layers, weight and bias each
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-4, atol=1e-9)
    assert all(float(f.sum()) > 0 for f in fast)


def test_vmap_path_equals_per_sample_loop_for_a_cnn():
    stream = tiny_stream(num_tasks=1, n_train=12, side=8)
    learner = learner_for(stream, backbone={"type": "cnn", "channels": [3], "width": 5})
    x = learner.to_input(stream.tasks[0].train_x)
    y = torch.from_numpy(stream.tasks[0].train_y)
    fast = fisher_diagonal(learner, x, y, None, batch_size=5)
    slow = brute_force_fisher(learner, x, y, None)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("fn", ["square", "abs"])
def test_linear_and_vmap_paths_agree(fn):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(11, 5)
    y = torch.randint(0, 3, (11,))

    def loss(out, idx):
        return F.cross_entropy(out, y[idx], reduction="none")

    a = per_sample_grad_sum(model, loss, x, fn, batch_size=4)
    b = per_sample_grad_sum(model, loss, x, fn, batch_size=4, force_vmap=True)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-8)


# -- EWC's penalty ------------------------------------------------------------------------------

def hand_penalty(strength, terms, params):
    """strength * sum_k sum_i Omega_k,i (theta_i - theta*_k,i)^2 as a differentiable expression."""
    total = 0.0
    for omega, anchor in terms:
        for o, a, p in zip(omega, anchor, params):
            total = total + (o * (p - a) ** 2).sum()
    return strength * total


def random_omega(params, gen):
    return [torch.rand(p.shape, generator=gen) for p in params]


def shift_params(params, gen, scale=0.3):
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_penalty_value_and_gradient_match_autograd():
    stream = tiny_stream()
    learner = learner_for(stream, algo={"ewc_lambda": 3.0})
    part = learner.parts[0]
    assert isinstance(part, EWCPart) and part.strength == 1.5  # lambda / 2
    gen = torch.Generator().manual_seed(0)
    params = part.params
    assert part.penalty() == 0.0
    omega = random_omega(params, gen)
    anchor = [p.detach().clone() for p in params]
    part.consolidate(omega)
    shift_params(params, gen)

    expected = hand_penalty(1.5, [(omega, anchor)], params)
    assert part.penalty() == pytest.approx(expected.item(), rel=1e-5)
    auto = torch.autograd.grad(expected, params)
    # after_backward adds the penalty's gradient to p.grad analytically.
    for p in params:
        p.grad = torch.zeros_like(p)
    part.after_backward()
    for p, g in zip(params, auto):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    # ... on top of what backward left there.
    base = [torch.randn(p.shape, generator=gen) for p in params]
    for p, b in zip(params, base):
        p.grad = b.clone()
    part.after_backward()
    for p, b, g in zip(params, base, auto):
        torch.testing.assert_close(p.grad, b + g, rtol=1e-5, atol=1e-6)


def test_penalty_keeps_one_term_per_past_task():
    stream = tiny_stream()
    learner = learner_for(stream, algo={"ewc_lambda": 2.0})
    part = learner.parts[0]
    gen = torch.Generator().manual_seed(1)
    params = part.params
    terms = []
    for _ in range(2):
        omega = random_omega(params, gen)
        terms.append((omega, [p.detach().clone() for p in params]))
        part.consolidate(omega)
        shift_params(params, gen)
    assert part.num_snapshots == 2
    two = hand_penalty(1.0, terms, params)
    only_last = hand_penalty(1.0, terms[1:], params)
    assert part.penalty() == pytest.approx(two.item(), rel=1e-5)
    assert abs(two.item() - only_last.item()) > 1e-3  # the first task's term is really there
    auto = torch.autograd.grad(two, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    part.after_backward()
    for p, g in zip(params, auto):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_ewc_training_consolidates_each_task_fisher(monkeypatch):
    """Run EWC through the loop; the penalty at the end is the sum of each task's term, with the
    Fisher computed (by hand, per sample) at that task's final parameters."""
    stream = tiny_stream(num_tasks=2, n_train=24)
    # A large step size moves the parameters well away from task 0's anchor.
    learner = learner_for(stream, algo={"ewc_lambda": 4.0, "fisher_samples": None}, optimizer={"lr": 0.5})
    part = learner.parts[0]
    recorded = []
    original = EWCPart.importance

    def spy(self, task):
        omega = original(self, task)
        x = learner.train_x
        slow = brute_force_fisher(learner, x, learner.train_y, None)
        for f, s in zip(omega, slow):
            torch.testing.assert_close(f, s, rtol=1e-4, atol=1e-9)
        recorded.append(([o.clone() for o in omega], [p.detach().clone() for p in self.params]))
        return omega

    monkeypatch.setattr(EWCPart, "importance", spy)
    ContinualLoop(learner, stream, eval_initial=False).run()
    assert len(recorded) == 2 and part.num_snapshots == 2
    expected = hand_penalty(2.0, recorded, part.params)
    # penalty() expands the squares (sum Omega theta^2 - 2 theta sum Omega theta* + ...), which
    # loses float32 precision relative to the size of those sums, not of the penalty.
    scale = 2.0 * sum(float((o * p.detach() ** 2).sum()) for omega, _ in recorded
                      for o, p in zip(omega, part.params))
    assert expected.item() > 1e-3 * scale
    assert part.penalty() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6 * scale)
    # The anchor of task 1 is the parameters at its end, i.e. the final ones: its term is 0 now.
    assert hand_penalty(2.0, recorded[1:], part.params).item() == pytest.approx(0.0, abs=1e-10)


def test_ewc_fisher_samples_limits_the_estimate(monkeypatch):
    stream = tiny_stream(num_tasks=1, n_train=40)
    learner = learner_for(stream, algo={"fisher_samples": 10})
    sizes = []
    import cl_runner.backends.torch.algorithms.ewc as ewc_mod

    real = ewc_mod.fisher_diagonal

    def spy(learner_, x, *a, **k):
        sizes.append(len(x))
        return real(learner_, x, *a, **k)

    monkeypatch.setattr(ewc_mod, "fisher_diagonal", spy)
    ContinualLoop(learner, stream, eval_initial=False).run()
    assert sizes == [10]


# -- training failures --------------------------------------------------------------------------

def test_divergence_names_task_and_step():
    stream = tiny_stream(num_tasks=2)
    learner = learner_for(stream, "naive", optimizer={"lr": 1e30})
    with pytest.raises(TrainingDivergedError) as ei:
        ContinualLoop(learner, stream, eval_initial=False).run()
    msg = str(ei.value)
    assert "task 1 (of" in msg and "step" in msg and "optimizer.lr" in msg


def test_joint_trains_on_the_union_of_seen_tasks():
    stream = tiny_stream(num_tasks=3, scenario="task_il", n_train=10)
    learner = learner_for(stream, "joint")
    x, y, tid = learner.train_arrays(stream.tasks[1])
    assert len(y) == 20 and tid.tolist() == [0] * 10 + [1] * 10
    np.testing.assert_array_equal(y, np.concatenate([stream.tasks[0].train_y, stream.tasks[1].train_y]))
    final = learner_for(stream, "joint", algo={"mode": "final"})
    assert len(final.train_arrays(stream.tasks[0])[1]) == 0
    assert len(final.train_arrays(stream.tasks[2])[1]) == 30


@pytest.mark.parametrize("scenario", ["domain_il", "task_il"])
def test_weighted_fisher_weights_each_sample_by_its_probability(scenario):
    """fisher: weighted (Mammoth's online EWC): mean_i p(y_i | x_i) g_i^2, by a per-sample loop."""
    stream = tiny_stream(num_tasks=3, scenario=scenario, n_train=37)
    learner = learner_for(stream)
    task = stream.tasks[1]
    x = learner.to_input(task.train_x)
    y = torch.from_numpy(task.train_y)
    t = torch.full((len(y),), task.id) if learner.masks else None
    got = fisher_diagonal(learner, x, y, t, batch_size=8, kind="weighted")
    params = list(learner.model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        logits = learner.masked(learner.model(x[i:i + 1]), t[i:i + 1] if t is not None else None)
        loss = F.cross_entropy(logits, y[i:i + 1])
        prob = float(torch.exp(-loss.detach()))
        for acc, g in zip(expected, torch.autograd.grad(loss, params)):
            acc += prob * g * g
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e / len(x), rtol=1e-4, atol=1e-12)
    plain = fisher_diagonal(learner, x, y, t, batch_size=8)
    assert all(bool((g <= p + 1e-12).all()) for g, p in zip(got, plain))  # p <= 1


@pytest.mark.parametrize("scenario", ["domain_il", "task_il"])
def test_batch_fisher_is_the_squared_mean_gradient(scenario):
    """fisher: batch (GEM's EWC): (d/dtheta mean_i loss_i)^2, whatever the chunk size."""
    stream = tiny_stream(num_tasks=3, scenario=scenario, n_train=37)
    learner = learner_for(stream, backbone={"dropout": 0.5})
    task = stream.tasks[1]
    x = learner.to_input(task.train_x)
    y = torch.from_numpy(task.train_y)
    t = torch.full((len(y),), task.id) if learner.masks else None
    got = fisher_diagonal(learner, x, y, t, batch_size=8, kind="batch")
    assert learner.model.training
    learner.model.eval()
    learner.model.zero_grad()
    torch.nn.functional.cross_entropy(learner.masked(learner.model(x), t), y).backward()
    expected = [p.grad ** 2 for p in learner.model.parameters()]
    learner.model.train()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-12)
    per_sample = fisher_diagonal(learner, x, y, t, batch_size=8)
    # (mean g)^2 <= mean g^2 elementwise (Jensen), and strictly smaller somewhere.
    assert all(bool((g <= p + 1e-9).all()) for g, p in zip(got, per_sample))
    assert any(bool((g < p - 1e-9).any()) for g, p in zip(got, per_sample))
