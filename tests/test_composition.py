"""algo.plugins composes a regulariser onto any algorithm, or is refused with a clear error.

For every algorithm of the PyTorch backend, ``algo.plugins=[ewc]`` (``[mas]`` for EWC itself)
either takes part in training (its penalty gradient is applied at the steps of the second task)
or fails at construction with a ConfigError that names algo.plugins; it is never silently ignored.
"""

from __future__ import annotations

import pytest
import torch

from cl_runner import catalog
from cl_runner.core.loop import ContinualLoop
from cl_runner.errors import ConfigError
from cl_runner.registry import ALGORITHMS

from test_torch_learner import learner_for, tiny_stream

catalog.load_backend("torch")
TORCH_ALGOS = sorted(n for n in ALGORITHMS.names() if "torch" in ALGORITHMS.entry(n).backends)
# Algorithms whose own training step leaves no place for a plugin; they must refuse it.
REFUSING = {"gdumb", "kcl", "lamaml", "pnn"}


def _benchmark(scenario: str) -> dict:
    return {"name": "rotatedmnist"} if scenario == "domain_il" else {"name": "splitmnist", "scenario": scenario}


def _scenario(name: str) -> str:
    scenarios = ALGORITHMS.meta(name).get("scenarios") or ("domain_il",)
    return "task_il" if "task_il" in scenarios else scenarios[0]


@pytest.mark.parametrize("name", TORCH_ALGOS)
def test_ewc_plugin_takes_part_or_is_refused(name):
    scenario = _scenario(name)
    stream = tiny_stream(num_tasks=2, scenario=scenario, n_train=24, n_test=8)
    plugin, part_name = ("mas", "MASPart") if name == "ewc" else ("ewc", "EWCPart")
    algo = {"plugins": [plugin]}
    if name in REFUSING:
        with pytest.raises(ConfigError, match="algo.plugins"):
            learner_for(stream, name, algo=algo, benchmark=_benchmark(scenario))
        return
    learner = learner_for(stream, name, algo=algo, benchmark=_benchmark(scenario))
    ewc = [p for p in learner.parts if type(p).__name__ == part_name]
    assert len(ewc) == 1, f"{name}: the {plugin} part is not among the learner's parts"
    calls = {"task": None, "n": 0}
    original = ewc[0].after_backward

    def counted():
        if calls["task"] == 1:
            calls["n"] += 1
        return original()

    ewc[0].after_backward = counted
    loop = ContinualLoop(learner, stream)
    learner.on_before_task = _wrap(learner.on_before_task, calls)
    loop.run()
    assert calls["n"] > 0, f"{name}: the plugin's penalty gradient was never applied on the second task"
    assert any(float(o.abs().sum()) > 0 for o in ewc[0].omega), name


def _wrap(fn, calls):
    def on_before_task(task):
        calls["task"] = task.id
        return fn(task)
    return on_before_task


# Methods that keep state per parameter or per output unit of the network as first built.
REFUSE_GROWING = {"der", "derpp", "ewc", "ewc_online", "lamaml", "mas", "si", "pnn"}


@pytest.mark.parametrize("scenario,head", [("class_il", "incremental"), ("task_il", "multihead")])
def test_growing_heads_run_or_are_refused_for_every_algorithm(scenario, head):
    """backbone.head=incremental/multihead: each algorithm of the scenario trains 3 tasks with the
    growing layer (finite accuracies) or refuses it at construction with an error naming the key."""
    ran = []
    for name in TORCH_ALGOS:
        if scenario not in (ALGORITHMS.meta(name).get("scenarios") or ()):
            continue
        stream = tiny_stream(num_tasks=3, scenario=scenario, n_train=24, n_test=8)
        algo = {"coreset_size": 4} if name == "kcl" else {}
        kw = dict(algo=algo, backbone={"head": head}, benchmark=_benchmark(scenario))
        if name in REFUSE_GROWING:
            with pytest.raises(ConfigError, match="backbone.head"):
                learner_for(stream, name, **kw)
            continue
        state = ContinualLoop(learner_for(stream, name, **kw), stream).run()
        assert torch.isfinite(torch.as_tensor(state.acc_matrix[-1])).all(), name
        ran.append(name)
    assert {"naive", "er", "agem", "lwf"} <= set(ran)
