"""Stable SGD's regime, LFL's feature loss and frozen output units, the growing heads (incremental
and multi-head) and their optimizer state, PNN's frozen columns (zero forgetting), and KCL's
kernel ridge regression, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_runner import catalog
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.config import validate_config
from cl_runner.errors import ConfigError

torch_backend = catalog.load_backend("torch")
from cl_runner.backends.torch.algorithms.kcl import (gaussian_kl, kernel_ridge_predict,  # noqa: E402
                                                     random_features)
from cl_runner.backends.torch.algorithms.lfl import LFLPart, feature_loss  # noqa: E402
from cl_runner.backends.torch.heads import GrowingHead  # noqa: E402

CPU = torch.device("cpu")


def random_stream(num_tasks=3, scenario="class_il", n_train=40, side=5, seed=0) -> Stream:
    """Small random images; two classes per task in class/task-IL, ten shared ones in domain-IL."""
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


def make_learner(stream, name, algo=None, backbone=None, benchmark=None, seed=0, **sections):
    cfg = {"algo": {"name": name, **(algo or {})},
           "backbone": {"width": 8, "n_hidden_layers": 1, **(backbone or {})},
           "benchmark": {"batch_size": 8, "normalize": stream.name != "hand",
                         "scenario": stream.scenario, **(benchmark or {})},
           **sections}
    typed, _ = validate_config(cfg)
    torch.manual_seed(seed)
    return torch_backend.build_learner(typed, stream, CPU, seed)


def train_tasks(learner, tasks):
    for task in tasks:
        learner.on_before_task(task)
        learner.train_epoch(task, 0)
        learner.on_after_training(task)
        learner.on_after_task(task)


def clone_params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# -- Stable SGD ------------------------------------------------------------------------------------

def test_stable_sgd_decays_the_lr_per_task_and_applies_dropout():
    """The regime as the learner sees it: the batch size, dropout after the hidden ReLU, and the
    rate of task t (from 0) max(lr * gamma ** (t + 1), floor) (the reference counts tasks from 1)."""
    stream = random_stream(num_tasks=3)
    learner = make_learner(stream, "stable_sgd", algo={"lr": 0.2, "lr_decay": 0.5, "dropout": 0.25,
                                                       "batch_size": 4, "lr_min": 0.03}, optimizer={"lr": 0.01})
    assert learner.batch_size == 4
    assert learner.cfg.backbone.dropout == 0.25 and learner.cfg.optimizer.lr == 0.2
    assert learner.cfg.optimizer.momentum == 0.8 and learner.cfg.optimizer.reset == "epoch"
    drops = [m for m in learner.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert [m.p for m in drops] == [0.25]
    for task, lr in zip(stream.tasks, [0.1, 0.05, 0.03]):
        learner.on_before_task(task)
        assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
        learner.on_before_epoch(task, 0)
        assert len(learner.optimizer.state) == 0  # a new optimizer every epoch
        steps = learner.train_epoch(task, 0)["steps"]
        assert steps == 10  # 40 samples in batches of 4
        assert all("momentum_buffer" in s for s in learner.optimizer.state.values())
        learner.on_after_task(task)
    # Dropout is on in training: a quarter of the hidden units are zeroed, the rest scaled by 4/3.
    x = learner.to_input(stream.tasks[0].train_x)
    learner.model.train()
    hidden = learner.model.features[:3](x)  # flatten, linear, relu
    dropped = learner.model.features(x)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], hidden[kept] / 0.75)
    zero_rate = float(((dropped == 0) & (hidden != 0)).sum() / (hidden != 0).sum())
    assert 0.15 < zero_rate < 0.35
    learner.model.eval()
    torch.testing.assert_close(learner.model.features(x), hidden)


def test_stable_sgd_null_keys_keep_the_sections_and_bad_values_are_errors():
    stream = random_stream(num_tasks=2)
    nulls = {k: None for k in ("lr", "lr_decay", "lr_decay_offset", "lr_min", "momentum", "reset", "dropout",
                               "batch_size")}
    learner = make_learner(stream, "stable_sgd", algo=nulls,
                           optimizer={"lr": 0.03, "lr_decay": 0.9}, benchmark={"batch_size": 5})
    assert learner.batch_size == 5
    assert not any(isinstance(m, torch.nn.Dropout) for m in learner.model.modules())
    learner.on_before_task(stream.tasks[1])
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.03 * 0.9)
    assert learner.cfg.optimizer.momentum == 0.0 and learner.cfg.optimizer.reset == "never"
    with pytest.raises(ConfigError, match="algo.dropout"):
        make_learner(stream, "stable_sgd", algo={"dropout": 1.0})
    with pytest.raises(ConfigError, match="algo.lr_decay"):
        make_learner(stream, "stable_sgd", algo={"lr_decay": 0.0})


# -- LFL -------------------------------------------------------------------------------------------

def test_lfl_feature_loss_by_hand():
    # One-pixel images x in {0, 0.2, 0.4, 1}; two hidden ReLU units. The previous model's features
    # are (x, 2x); the current ones (3x, x): 1/2 ||f - f_old||^2 = 1/2 (4 + 1) x^2 = 2.5 x^2, whose
    # batch mean is 2.5 * (0 + 0.04 + 0.16 + 1) / 4 = 0.75; times lambda_e = 2.
    pixels = np.array([0, 51, 102, 255], dtype=np.uint8).reshape(-1, 1, 1, 1)
    tasks = [Task(id=t, train_x=pixels, train_y=np.zeros(4, dtype=np.int64), test_x=pixels,
                  test_y=np.zeros(4, dtype=np.int64), classes=np.array([0, 1])) for t in range(2)]
    stream = Stream(name="hand", scenario="domain_il", tasks=tasks, num_outputs=2, input_shape=(1, 1, 1),
                    mean=(0.0,), std=(1.0,))
    learner = make_learner(stream, "lfl", algo={"lambda_e": 2.0}, backbone={"width": 2})
    part = learner.parts[0]
    assert isinstance(part, LFLPart)
    layer = learner.model.features[1]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [2.0]]))
        layer.bias.zero_()
    learner.on_before_task(stream.tasks[0])
    x = learner.train_x
    assert part.extra_loss(x, None, learner.model(x)) is None  # nothing to keep close to yet
    learner.on_after_task(stream.tasks[0])
    learner.on_before_task(stream.tasks[1])
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0], [1.0]]))
    loss = part.extra_loss(x, None, learner.model(x))
    assert float(loss.detach()) == pytest.approx(2.0 * 0.75, rel=1e-6)
    assert float(feature_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]))) == pytest.approx(2.5)
    # The loss pulls the features back toward the previous model's: its gradient on the first
    # unit's weight is lambda_e * mean((3x - x) * x) = 2 * 2 * 0.3 = 1.2.
    loss.backward()
    assert float(layer.weight.grad[0, 0]) == pytest.approx(1.2, rel=1e-5)


@pytest.mark.parametrize("scenario", ["class_il", "domain_il"])
def test_lfl_freezes_the_previous_output_units(scenario):
    stream = random_stream(num_tasks=2, scenario=scenario)
    learner = make_learner(stream, "lfl", algo={"lambda_e": 0.5}, optimizer={"lr": 0.1, "momentum": 0.9})
    train_tasks(learner, stream.tasks[:1])
    head = learner.model.head
    before_w, before_b = head.weight.detach().clone(), head.bias.detach().clone()
    features_before = clone_params(learner.model.features)
    train_tasks(learner, stream.tasks[1:])
    old = slice(0, 2) if scenario == "class_il" else slice(0, 10)
    assert torch.equal(head.weight[old], before_w[old]) and torch.equal(head.bias[old], before_b[old])
    if scenario == "class_il":  # the new task's units are trained
        assert not torch.equal(head.weight[2:4], before_w[2:4])
    after = clone_params(learner.model.features)
    assert any(not torch.equal(after[k], features_before[k]) for k in after)  # the features do move


def test_lfl_is_a_plugin():
    stream = random_stream(num_tasks=2)
    learner = make_learner(stream, "naive", algo={"plugins": ["lfl"], "lambda_e": 0.3})
    assert isinstance(learner.parts[0], LFLPart) and learner.parts[0].lambda_e == 0.3


# -- growing heads ---------------------------------------------------------------------------------

def test_incremental_head_grows_and_keeps_the_old_units_and_their_momentum():
    stream = random_stream(num_tasks=3, scenario="class_il")
    learner = make_learner(stream, "naive", backbone={"head": "incremental"},
                           optimizer={"lr": 0.1, "momentum": 0.9})
    head = learner.model.head
    assert isinstance(head, GrowingHead) and len(head.chunks) == 0
    train_tasks(learner, stream.tasks[:1])
    assert len(head.chunks) == 1 and head.chunk_units(0).tolist() == [0, 1]
    x = learner.to_input(stream.tasks[0].test_x)
    logits = learner.model(x)
    assert torch.isinf(logits[:, 2:]).all() and torch.isfinite(logits[:, :2]).all()
    chunk0 = head.chunks[0]
    w0 = chunk0.weight.detach().clone()
    buf0 = learner.optimizer.state[chunk0.weight]["momentum_buffer"].clone()
    learner.on_before_task(stream.tasks[1])  # grows: units 2, 3
    assert len(head.chunks) == 2 and head.chunk_units(1).tolist() == [2, 3]
    assert torch.equal(chunk0.weight, w0)
    assert torch.equal(learner.optimizer.state[chunk0.weight]["momentum_buffer"], buf0)
    chunk1 = head.chunks[1]
    assert len(learner.optimizer.param_groups) == 3  # backbone, chunk 0, chunk 1
    assert learner.optimizer.param_groups[2]["params"] == [chunk1.weight, chunk1.bias]
    assert chunk1.weight not in learner.optimizer.state  # no state yet
    w1 = chunk1.weight.detach().clone()
    learner.train_epoch(stream.tasks[1], 0)
    assert not torch.equal(chunk1.weight, w1)  # the new units are trained
    assert "momentum_buffer" in learner.optimizer.state[chunk1.weight]
    assert torch.isfinite(learner.model(x)[:, :4]).all() and torch.isinf(learner.model(x)[:, 4:]).all()


def test_multihead_adds_a_head_per_task_and_leaves_the_old_heads_alone():
    stream = random_stream(num_tasks=3, scenario="task_il")
    learner = make_learner(stream, "naive", backbone={"head": "multihead"},
                           optimizer={"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01})
    head = learner.model.head
    train_tasks(learner, stream.tasks[:1])
    chunk0 = head.chunks[0]
    w0, b0 = chunk0.weight.detach().clone(), chunk0.bias.detach().clone()
    buf0 = learner.optimizer.state[chunk0.weight]["momentum_buffer"].clone()
    train_tasks(learner, stream.tasks[1:])
    assert [head.chunk_units(k).tolist() for k in range(3)] == [[0, 1], [2, 3], [4, 5]]
    # No gradient reaches task 0's head while tasks 1 and 2 train: weights, biases and the momentum
    # buffer are exactly as they were (momentum and weight decay did not move them either).
    assert torch.equal(chunk0.weight, w0) and torch.equal(chunk0.bias, b0)
    assert torch.equal(learner.optimizer.state[chunk0.weight]["momentum_buffer"], buf0)
    assert all(head.chunks[k].weight in learner.optimizer.state for k in (1, 2))


def test_growing_head_state_round_trip_and_errors():
    stream = random_stream(num_tasks=3, scenario="class_il")
    learner = make_learner(stream, "naive", backbone={"head": "incremental"}, optimizer={"momentum": 0.9})
    train_tasks(learner, stream.tasks[:2])
    state = learner.state_dict()
    fresh = make_learner(stream, "naive", backbone={"head": "incremental"}, optimizer={"momentum": 0.9}, seed=5)
    fresh.load_state_dict(state)
    x = learner.to_input(stream.tasks[1].test_x)
    torch.testing.assert_close(fresh.model(x), learner.model(x))
    chunk = fresh.model.head.chunks[1]
    torch.testing.assert_close(fresh.optimizer.state[chunk.weight]["momentum_buffer"],
                               learner.optimizer.state[learner.model.head.chunks[1].weight]["momentum_buffer"])
    with pytest.raises(ConfigError, match="multihead is not defined for the class_il"):
        make_learner(stream, "naive", backbone={"head": "multihead"}).on_before_task(stream.tasks[0])
    with pytest.raises(ConfigError, match="backbone.head"):
        make_learner(stream, "naive", backbone={"head": "growing"})


# -- PNN -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["task_il", "domain_il"])
def test_pnn_earlier_columns_are_frozen_and_nothing_is_forgotten(scenario):
    stream = random_stream(num_tasks=3, scenario=scenario)
    learner = make_learner(stream, "pnn", backbone={"n_hidden_layers": 2},
                           optimizer={"lr": 0.1, "momentum": 0.9})
    train_tasks(learner, stream.tasks[:1])
    acc0 = learner.evaluate(stream.tasks[:1])[0]
    col0 = clone_params(learner.model.columns[0])
    train_tasks(learner, stream.tasks[1:2])
    col1 = clone_params(learner.model.columns[1])
    train_tasks(learner, stream.tasks[2:])
    model = learner.model
    assert len(model.columns) == 3
    assert all(torch.equal(v, col0[k]) for k, v in model.columns[0].named_parameters())
    assert all(torch.equal(v, col1[k]) for k, v in model.columns[1].named_parameters())
    assert learner.evaluate(stream.tasks[:1])[0] == acc0  # exactly preserved
    # Column 2 has lateral adapters fed by columns 0 and 1 (2 columns x 8 units), and they learned.
    lateral = model.columns[2].laterals[0]
    assert lateral.project.in_features == 16 and lateral.alpha.grad is not None
    trainable = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    assert trainable == {id(p) for p in model.columns[2].parameters()}
    # The column of task 2 reads the earlier columns: changing column 0 changes its output.
    x = learner.to_input(stream.tasks[2].test_x)
    model.eval()
    out = model(x, 2).clone()
    with torch.no_grad():
        model.columns[0].layers[0].weight.mul_(2.0)
    assert not torch.allclose(model(x, 2), out)


def test_pnn_agem_laterals_are_the_sum_of_one_map_per_earlier_column():
    """A-GEM's PNN (facebookresearch/agem model/model.py:445-475): column 2's layer i adds, for each
    earlier column tt, U_w h_pnn[tt][i] + U_b, with h_pnn[tt][0] the input. Computed here map by
    map from the blocks of clrun's concatenated weights and its per-column biases."""
    from cl_runner.backends.torch.algorithms.pnn import ProgressiveNet

    torch.manual_seed(0)
    net = ProgressiveNet((1, 2, 2), 3, 2, 2, 0.0, "linear", from_input=True, lateral_bias=True,
                         init="truncated_normal")
    for _ in range(3):
        net.add_column()
    x = torch.rand(5, 4)

    def lin(layer, h):
        return h @ layer.weight.T + layer.bias

    def by_hand(k):  # column k's hidden activations and output
        cols = [by_hand(j) for j in range(k)]
        c = net.columns[k]
        acts = [x]
        for i in range(3):  # two hidden layers, then the output layer
            z = lin(c.layers[i], acts[-1]) if i < 2 else lin(c.out, acts[-1])
            lat = None if k == 0 else c.input_lateral if i == 0 else c.laterals[i - 1]
            for tt in range(k):
                width = cols[tt][i].shape[1]
                w_tt = lat.out.weight[:, tt * width:(tt + 1) * width]
                z = z + cols[tt][i] @ w_tt.T + lat.bias[tt]
            acts.append(torch.relu(z) if i < 2 else z)
        return acts

    with torch.no_grad():
        torch.testing.assert_close(net(x, 2), by_hand(2)[-1])
    c2 = net.columns[2]
    assert c2.input_lateral.out.in_features == 2 * 4 and c2.laterals[0].bias.shape == (2, 3)
    # the truncated normal (std 0.1, cut at 2 std) and the biases of 0.1, lateral ones included
    weights = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, torch.nn.Linear)])
    assert float(weights.abs().max()) <= 0.2 and 0.05 < float(weights.std()) < 0.1
    assert torch.all(c2.layers[0].bias == 0.1) and torch.all(c2.laterals[1].bias == 0.1)


def test_pnn_state_round_trip_and_class_il_error():
    stream = random_stream(num_tasks=3, scenario="task_il")
    learner = make_learner(stream, "pnn", algo={"lateral": "linear"})
    train_tasks(learner, stream.tasks[:2])
    fresh = make_learner(stream, "pnn", algo={"lateral": "linear"}, seed=3)
    fresh.load_state_dict(learner.state_dict())
    assert fresh.evaluate(stream.tasks) == learner.evaluate(stream.tasks)
    train_tasks(fresh, stream.tasks[2:])
    assert len(fresh.model.columns) == 3
    with pytest.raises(ConfigError, match="not defined for the class_il"):
        make_learner(random_stream(scenario="class_il"), "pnn")


# -- KCL -------------------------------------------------------------------------------------------

def test_kernel_ridge_regression_by_hand():
    # S = [[1, 0], [1, 1]]: K = [[1, 1], [1, 2]]; K + I = [[2, 1], [1, 3]], inverse [[3, -1], [-1, 2]] / 5.
    # Query q = [0, 1]: k(q, S) = [0, 1]; prediction [0, 1] (K + I)^-1 Y = [-1, 2] / 5 for Y = I.
    support = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    pred = kernel_ridge_predict(torch.tensor([[0.0, 1.0]]), support, torch.eye(2), 1.0)
    torch.testing.assert_close(pred, torch.tensor([[-0.2, 0.4]]))
    # With a tiny ridge the support points are fitted exactly (interpolation).
    fit = kernel_ridge_predict(support, support, torch.tensor([[3.0], [-1.0]]), 1e-6)
    torch.testing.assert_close(fit, torch.tensor([[3.0], [-1.0]]), atol=1e-4, rtol=0)
    # Random Fourier features: sqrt(2 / D) cos(h omega^T + b); omega = 0, b = (0, pi/2): (1, 0).
    psi = random_features(torch.ones(1, 3), torch.zeros(2, 3), torch.tensor([0.0, np.pi / 2]))
    torch.testing.assert_close(psi, torch.tensor([[1.0, 0.0]]), atol=1e-6, rtol=0)
    # KL(N(0, 1) || N(1, 4)) = 1/2 (log 4 + (1 + 1) / 4 - 1) = 0.443147 per dimension.
    kl = gaussian_kl(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.full((2,), np.log(4.0)))
    assert float(kl) == pytest.approx(2 * 0.5 * (np.log(4.0) - 0.5), rel=1e-6)


def test_kcl_coreset_is_held_out_and_predictions_are_the_closed_form():
    stream = random_stream(num_tasks=2, scenario="task_il", n_train=40)
    learner = make_learner(stream, "kcl", algo={"coreset_size": 6, "num_features": 32, "kl_weight": 0.1},
                           optimizer={"lr": 0.05})
    train_tasks(learner, stream.tasks[:1])
    learner.on_before_task(stream.tasks[1])
    assert sorted(learner.coresets) == [0, 1]
    core = learner.coresets[1]
    assert core["x"].shape[0] == 6 and core["y"].shape == (6, 2)
    assert torch.equal(core["y"].sum(1), torch.ones(6))
    # The coreset is held out: 34 of the 40 samples are trained on, none of them in the coreset.
    assert learner.train_x.shape[0] == 34
    assert not (learner.train_x.flatten(1)[:, None] == core["x"].flatten(1)[None]).all(2).any()
    learner.train_epoch(stream.tasks[1], 0)
    # Predictions are the ridge solution on the stored coreset with the task's fixed bases.
    net = learner.model
    x = learner.to_input(stream.tasks[1].test_x)
    with torch.no_grad():
        h, hc = net.embed(x), net.embed(core["x"])
        mu, logvar = net.posterior(hc.mean(0))
        omega = mu + (0.5 * logvar).exp() * core["eps"]
        psi, psic = random_features(h, omega, core["b"]), random_features(hc, omega, core["b"])
        k = psic @ psic.T
        lam = net.ridge[1].abs() + 0.01
        out = net.scale[1] * (psi @ psic.T) @ torch.linalg.inv(k + lam * torch.eye(6)) @ core["y"] + net.shift[1]
    pred = learner.predict(x, 1)
    assert torch.equal(pred, 2 + out.argmax(1))  # task 1 owns units 2 and 3
    learner.on_after_task(stream.tasks[1])
    fresh = make_learner(stream, "kcl", algo={"coreset_size": 6, "num_features": 32}, seed=4)
    fresh.load_state_dict(learner.state_dict())
    assert torch.equal(fresh.predict(x, 1), pred) and torch.equal(fresh.predict(x, 0), learner.predict(x, 0))
    with pytest.raises(ConfigError, match="not defined for the class_il"):
        make_learner(random_stream(scenario="class_il"), "kcl")


# -- from the command line ------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["algo=kcl", "benchmark=splitmnist", "algo.coreset_size=50"],
                                  ["algo=pnn", "benchmark=splitmnist", "benchmark.scenario=task_il"]],
                         ids=["kcl", "pnn"])
def test_cli_runs_on_task_il_split_mnist(tiny_data_dir, tmp_path, args):
    from conftest import TINY, read_results, run_clrun

    run_dir = tmp_path / "run"
    proc = run_clrun([*args, f"data_dir={tiny_data_dir}", *TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = read_results(run_dir)
    assert res["config"]["benchmark"]["scenario"] == "task_il"  # kcl's config picks task-IL itself
    acc = np.asarray(res["acc_matrix"])
    assert acc.shape == (5, 5)
    if args[0] == "algo=kcl":
        assert res["avg_acc"] > 70  # two easy classes per task
    else:  # each task's accuracy stays exactly what it was when its column was trained
        for j in range(5):
            assert (acc[j:, j] == acc[j, j]).all(), acc
        assert res["forgetting"] == 0


# -- KCL on the real MNIST ---------------------------------------------------------------------------

def run_real(data_dir, out, algo: str, **algo_keys) -> dict:
    import io

    from rich.console import Console

    from cl_runner.experiment import run_experiment

    cfg = {"seed": 0, "data_dir": str(data_dir), "progress": False, "loggers": [], "checkpoint": False,
           "threads": 1, "algo": {"name": algo, **algo_keys},
           "benchmark": {"name": "permutedmnist", "scenario": "task_il", "num_tasks": 5, "subset": 1000,
                         "test_subset": 1000, "batch_size": 10, "eval_batch_size": 1000},
           "backbone": {"type": "mlp", "n_hidden_layers": 2, "width": 100},
           "optimizer": {"type": "sgd", "lr": 0.1}, "training": {"epochs_per_task": 1}}
    return run_experiment(cfg, out, console=Console(file=io.StringIO()))


# 5-task Permuted MNIST, task-IL (a head of 10 units per task), 1000 images per task, one epoch,
# batch 10, MLP 2x100, SGD lr 0.1. Measured average accuracy (seeds 0, 1, 2): naive 73.7 / 75.3 /
# 71.6, KCL (coreset 100, D = 256) 84.6 / 83.8 / 84.2.
@pytest.mark.slow
def test_kcl_beats_naive_on_task_il_permuted_mnist(shared_data_dir, tmp_path):
    naive = run_real(shared_data_dir, tmp_path / "naive", "naive")
    kcl = run_real(shared_data_dir, tmp_path / "kcl", "kcl", coreset_size=100, num_features=256)
    assert kcl["avg_acc"] > naive["avg_acc"] + 5, (naive["avg_acc"], kcl["avg_acc"])
