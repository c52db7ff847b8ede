"""Training steps replayed from a CUDA graph (backends/torch/graphs.py).

Without a GPU, the chunked epoch runs its chunks eagerly: the tests check that it trains on the
same batches in the same order as the step-by-step epoch (bit for bit), and which steps may be
recorded on a CUDA device. The recording itself is checked where a GPU exists."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console

from cl_runner import catalog, resources
from cl_runner.experiment import run_experiment

catalog.load_backend("torch")
from cl_runner.backends.torch import learner as learner_module  # noqa: E402
from cl_runner.backends.torch.graphs import StepGraph, graph_refusal  # noqa: E402

from test_torch_learner import learner_for, tiny_stream  # noqa: E402


def run(tiny_data_dir, tmp_path, algo, chunks, name, scenario="permutedmnist", **algo_keys):
    """A 2-task run; ``chunks``: the epochs train in eager chunks of that many steps."""
    benchmark = {"name": "permutedmnist", "num_tasks": 2, "subset": 203, "batch_size": 10,
                 "eval_batch_size": 200}
    if scenario == "task_il":
        benchmark = {"name": "splitmnist", "scenario": "task_il", "num_tasks": 2, "subset": 97,
                     "batch_size": 10, "eval_batch_size": 200}
    cfg = {"seed": 3, "data_dir": str(tiny_data_dir), "cache_dir": str(tmp_path / "cache"),
           "progress": False, "loggers": [], "checkpoint": False, "threads": 1,
           "algo": {"name": algo, **algo_keys}, "benchmark": benchmark,
           "backbone": {"width": 32, "dropout": 0.2},
           "optimizer": {"lr": 0.05, "momentum": 0.9}}
    return run_experiment(cfg, tmp_path / name, console=Console(file=io.StringIO()))


@pytest.fixture
def eager_chunks(monkeypatch):
    """Make a CPU learner take the chunked path wherever a CUDA device would record its steps."""
    made = []

    def step_graph(self, step_callbacks):
        if graph_refusal(self, step_callbacks, "cuda") is not None:
            return None
        made.append(StepGraph(self, made_steps[0], capture=False))
        return made[-1]

    made_steps = [7]
    monkeypatch.setattr(learner_module.TorchLearner, "_step_graph", step_graph)
    return made, made_steps


@pytest.mark.parametrize("algo,scenario,keys", [
    ("naive", "permutedmnist", {}),
    ("ewc", "permutedmnist", {"ewc_lambda": 100.0}),
    ("mas", "permutedmnist", {}),
    ("naive", "task_il", {}),
])
def test_chunked_epochs_train_exactly_as_step_by_step(tiny_data_dir, tmp_path, eager_chunks, monkeypatch,
                                                       algo, scenario, keys):
    made, steps = eager_chunks
    # 203 samples: 20 whole batches and one of 3; chunks of 7: two chunks, then 6 single steps
    chunked = run(tiny_data_dir, tmp_path, algo, 7, "chunked", scenario, **keys)
    assert made and all(g.steps == 7 for g in made)
    monkeypatch.undo()
    plain = run(tiny_data_dir, tmp_path, algo, 0, "plain", scenario, **keys)
    np.testing.assert_array_equal(chunked["acc_matrix"], plain["acc_matrix"])
    assert chunked["epoch_losses"] == plain["epoch_losses"]


def test_a_chunk_as_long_as_the_epoch_and_one_longer(tiny_data_dir, tmp_path, eager_chunks, monkeypatch):
    made, steps = eager_chunks
    steps[0] = 20  # exactly the whole batches of the epoch
    whole = run(tiny_data_dir, tmp_path, "naive", 20, "whole")
    steps[0] = 21  # longer than the epoch: no chunk runs
    longer = run(tiny_data_dir, tmp_path, "naive", 21, "longer")
    monkeypatch.undo()
    plain = run(tiny_data_dir, tmp_path, "naive", 0, "plain")
    for res in (whole, longer):
        np.testing.assert_array_equal(res["acc_matrix"], plain["acc_matrix"])
        assert res["epoch_losses"] == plain["epoch_losses"]


def test_the_chunk_reads_its_batches_from_the_index_buffer():
    stream = tiny_stream(num_tasks=1, n_train=40)
    learner = learner_for(stream, name="naive", benchmark={"batch_size": 4})
    learner.on_before_task(stream.tasks[0])
    seen = []
    learner.train_step = lambda x, y, t: seen.append((x.clone(), y.clone())) or torch.tensor(float(len(seen)))
    graph = StepGraph(learner, 3, capture=False)
    samples = torch.tensor([5, 1, 9, 0, 2, 2, 7, 3, 39, 38, 11, 4])
    losses = graph(samples)
    assert losses.tolist() == [1.0, 2.0, 3.0]
    for k, (x, y) in enumerate(seen):
        idx = samples[4 * k:4 * k + 4]
        assert torch.equal(x, learner.train_x[idx]) and torch.equal(y, learner.train_y[idx])


def test_which_steps_a_cuda_device_may_record():
    stream = tiny_stream(num_tasks=2)

    def refusal(name="naive", **sections):
        learner = learner_for(stream, name=name, **sections)
        learner.on_before_task(stream.tasks[0])
        return graph_refusal(learner, [], "cuda")

    for name in ("naive", "ewc", "mas"):
        assert refusal(name) is None, name
    assert refusal(backend={"cuda_graphs": False}) == "backend.cuda_graphs=false"
    assert "plain MLP" in refusal(backend={"compile": True})
    assert "plain MLP" in refusal(backend={"fused_step": False})
    assert "plain MLP" in refusal("lwf")  # a distillation term
    assert "plain MLP" in refusal(backbone={"type": "cnn"})
    assert "own training step" in refusal("er")
    assert "gradient hooks" in refusal("si")
    assert "plain SGD" in refusal(optimizer={"type": "adam"})
    assert refusal("agem") is not None
    # on a CPU nothing is recorded
    learner = learner_for(stream, name="naive")
    learner.on_before_task(stream.tasks[0])
    assert graph_refusal(learner, [], "cpu") == "the device is not a CUDA GPU"
    assert learner._step_graph([]) is None
    assert graph_refusal(learner, [object()], "cuda") == "a callback runs at every step"


def test_the_schema_and_the_torch_config_have_the_switch():
    from cl_runner.config import validate_config

    typed, _ = validate_config({"backend": {"name": "torch"}})
    assert typed.backend.cuda_graphs is True
    typed, _ = validate_config({"backend": {"name": "torch", "cuda_graphs": False}})
    assert typed.backend.cuda_graphs is False
    conf = resources.CONF_DIR / "backend" / "torch.yaml"
    assert "cuda_graphs: true" in conf.read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_recorded_steps_equal_eager_steps_on_a_gpu():
    """On a GPU: the replayed chunks take the same steps as the eager ones (without dropout,
    whose draws a recording takes from other offsets of the generator)."""
    from cl_runner.backends import torch as torch_backend
    from cl_runner.config import validate_config

    stream = tiny_stream(num_tasks=1, n_train=400)
    cfg, _ = validate_config({"algo": {"name": "naive"}, "backbone": {"width": 32, "dropout": 0.0},
                              "benchmark": {"batch_size": 10}})
    results = []
    for capture in (True, False):
        torch.manual_seed(0)
        learner = torch_backend.build_learner(cfg, stream, torch.device("cuda"), 0)
        learner.on_before_task(stream.tasks[0])
        graph = StepGraph(learner, 5, capture=capture)
        perm = torch.randperm(400, generator=torch.Generator().manual_seed(1)).cuda()
        losses = [graph(perm[i * 50:(i + 1) * 50]).clone() for i in range(8)]
        torch.cuda.synchronize()
        assert (graph.graph is not None) == capture
        results.append((torch.cat(losses), [p.detach().clone() for p in learner.model.parameters()]))
    (la, pa), (lb, pb) = results
    torch.testing.assert_close(la, lb)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b)
