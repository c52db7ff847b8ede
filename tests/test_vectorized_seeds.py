"""Several seeds in one run (``seeds=[...]``): on the jax backend all seeds train in one vmapped
program per epoch and give each seed's numbers exactly as its own run does; torch runs them one
after another; aggregate.json holds the mean and sample std over seeds."""

from __future__ import annotations

import functools
import io
import json
import statistics

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from rich.console import Console  # noqa: E402

from cl_runner import catalog  # noqa: E402
from cl_runner.config import validate_config  # noqa: E402
from cl_runner.core.loop import ContinualLoop  # noqa: E402
from cl_runner.errors import ConfigError  # noqa: E402
from cl_runner.experiment import aggregate_results, run_experiment  # noqa: E402

jax_backend = catalog.load_backend("jax")
from cl_runner.backends.jax.learner import JaxLearner, Part  # noqa: E402
from cl_runner.backends.jax.seeds import SeedGroup, vectorization_blocker  # noqa: E402
from cl_runner.benchmarks.stream import Stream, Task  # noqa: E402

from conftest import read_results, run_clrun  # noqa: E402

CPU = jax_backend.resolve_device("cpu")
SEEDS = [0, 1, 2]


def quiet() -> Console:
    return Console(file=io.StringIO())


def tiny_run(data_dir, algo: str, benchmark: str = "rotatedmnist", backend: str = "jax", num_tasks: int = 3,
             epochs: int = 2, backend_extra: dict | None = None, **extra) -> dict:
    return {"data_dir": str(data_dir), "progress": False, "loggers": [], "checkpoint": False, "device": "cpu",
            "benchmark": {"name": benchmark, "num_tasks": num_tasks, "batch_size": 32, "eval_batch_size": 200},
            "backbone": {"type": "mlp", "width": 32}, "algo": {"name": algo},
            "backend": {"name": backend, **(backend_extra or {})}, "training": {"epochs_per_task": epochs}, **extra}


def assert_same_run(alone: dict, together: dict) -> None:
    """Same accuracy matrix (counts of correct predictions, so exactly), initial accuracies, and
    per-epoch losses to float rounding."""
    np.testing.assert_array_equal(np.array(together["acc_matrix"], float), np.array(alone["acc_matrix"], float))
    np.testing.assert_array_equal(np.array(together["initial_acc"], float), np.array(alone["initial_acc"], float))
    np.testing.assert_allclose(together["epoch_losses"], alone["epoch_losses"], rtol=1e-5, atol=1e-6)
    for key in ("avg_acc", "forgetting", "bwt", "fwt", "steps", "seed"):
        assert together[key] == pytest.approx(alone[key], abs=1e-9)


# -- vectorised == each seed alone ----------------------------------------------------------------

@pytest.mark.parametrize("program", ["vmap", "unroll"])
@pytest.mark.parametrize("algo, bench", [("naive", "rotatedmnist"), ("ewc", "permutedmnist")])
def test_vectorized_seeds_match_each_seed_alone(tiny_data_dir, tmp_path, algo, bench, program):
    """Rotated MNIST: one stream shared by every seed (data enter the program unbatched);
    Permuted MNIST: each seed its own permutations (data stacked per seed). EWC's Fisher runs per
    seed between the programs and its importance sums are batched state. Both ways of sharing
    the program (backend.seed_program)."""
    out = tmp_path / "together"
    agg = run_experiment({**tiny_run(tiny_data_dir, algo, bench, backend_extra={"seed_program": program}),
                          "seeds": SEEDS}, out, console=quiet())
    assert agg["vectorized"] is True
    # One compilation of the epoch program and one of the evaluation for 3 seeds x 3 tasks x 2 epochs.
    assert agg["compilations"] == {"epoch": 1, "eval": 1}
    for s in SEEDS:
        alone = run_experiment(tiny_run(tiny_data_dir, algo, bench, seed=s), tmp_path / f"alone{s}",
                               console=quiet())
        together = read_results(out / f"seed={s}")
        assert together["config"]["seed"] == s and together["config"]["seeds"] is None
        assert together["vectorized_seeds"] == SEEDS
        assert_same_run(alone, together)
    accs = [read_results(out / f"seed={s}")["avg_acc"] for s in SEEDS]
    assert len(set(accs)) > 1  # the seeds really are different runs
    if bench == "permutedmnist":  # the permutations depend on the seed: the seeds' data differ
        first = [read_results(out / f"seed={s}")["initial_acc"] for s in SEEDS]
        assert first[0] != first[1]


@pytest.mark.parametrize("algo", ["si", "mas", "er", "der", "agem", "gem"])
def test_more_algorithms_vectorized_match_each_seed_alone(tiny_data_dir, tmp_path, algo):
    """The other methods whose seeds share one program, unrolled as on a CPU (each step takes
    every seed's step in turn): SI's path integral, MAS's importance, the replay memories with
    their counters and keys, A-GEM's projection and GEM's quadratic program (a host callback under
    a traced condition) give each seed the run it has alone."""
    out = tmp_path / "together"
    run = functools.partial(tiny_run, tiny_data_dir, algo, num_tasks=2, epochs=1,
                            backend_extra={"seed_program": "unroll"})
    agg = run_experiment({**run(), "seeds": [0, 1]}, out, console=quiet())
    assert agg["vectorized"] is True and agg["compilations"]["epoch"] == 1
    for s in (0, 1):
        alone = run_experiment(run(seed=s), tmp_path / f"alone{s}", console=quiet())
        assert_same_run(alone, read_results(out / f"seed={s}"))


def test_seed_program_choice_and_bad_values(monkeypatch):
    cfg = validate_config({"backend": {"name": "jax"}, "backbone": {"width": 8}, "benchmark": {"batch_size": 8}})[0]
    stream = synthetic_stream(0)
    loops = [ContinualLoop(JaxLearner(cfg, stream, CPU, s), stream) for s in (0, 1)]
    assert SeedGroup(loops).program == "vmap"  # auto, a short run (3 tasks x 6 steps)
    monkeypatch.setattr(SeedGroup, "long_run_steps", 18)
    assert SeedGroup(loops).program == "unroll"  # auto, on the CPU, a run this long
    cfg.backend.seed_program = "vmap"
    assert SeedGroup(loops).program == "vmap"

    class OwnProgram(JaxLearner):
        def _epoch_program(self, carry, x, y, t, mask_table):
            return super()._epoch_program(carry, x, y, t, mask_table)

    cfg.backend.seed_program = "unroll"
    own = [ContinualLoop(OwnProgram(cfg, stream, CPU, s), stream) for s in (0, 1)]
    assert SeedGroup(own).program == "vmap"  # a replaced epoch program is always vmapped
    cfg.backend.seed_program = "loop"
    with pytest.raises(ConfigError, match="seed_program='loop' is not one of auto, vmap, unroll"):
        SeedGroup(loops)


def test_aggregate_file_is_the_mean_and_sample_std_of_the_seeds(tiny_data_dir, tmp_path):
    agg = run_experiment({**tiny_run(tiny_data_dir, "naive"), "seeds": [3, 5]}, tmp_path, console=quiet())
    saved = json.loads((tmp_path / "aggregate.json").read_text())
    assert saved["seeds"] == [3, 5] and saved["runs"] == ["seed=3/results.json", "seed=5/results.json"]
    for m in ("avg_acc", "forgetting", "bwt", "fwt"):
        values = [read_results(tmp_path / f"seed={s}")[m] for s in (3, 5)]
        a, b = values
        assert saved["metrics"][m]["values"] == values
        assert saved["metrics"][m]["mean"] == pytest.approx((a + b) / 2)
        # sample std of two values: |a - b| / sqrt(2)
        assert saved["metrics"][m]["std"] == pytest.approx(abs(a - b) / 2 ** 0.5)
        assert saved[m] == agg[m] == pytest.approx((a + b) / 2)


def test_aggregate_by_hand():
    runs = [{"seed": s, "algo": "ewc", "benchmark": "b", "scenario": "domain_il", "backend": "jax",
             "avg_acc": acc, "forgetting": f, "bwt": -f, "fwt": None}
            for s, acc, f in [(0, 50.0, 1.0), (1, 60.0, 2.0), (2, 70.0, 6.0)]]
    agg = aggregate_results(runs)
    assert agg["metrics"]["avg_acc"] == {"mean": 60.0, "std": pytest.approx(10.0), "values": [50.0, 60.0, 70.0]}
    assert agg["forgetting"] == pytest.approx(3.0)
    assert agg["metrics"]["forgetting"]["std"] == pytest.approx(statistics.stdev([1.0, 2.0, 6.0]))
    assert agg["metrics"]["forgetting"]["std"] == pytest.approx(np.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 9) / 2))
    assert agg["bwt"] == pytest.approx(-3.0)
    assert agg["fwt"] is None and agg["metrics"]["fwt"]["std"] is None
    one = aggregate_results(runs[:1])
    assert one["avg_acc"] == 50.0 and one["metrics"]["avg_acc"]["std"] is None


# -- generic over the parts' state ----------------------------------------------------------------

class PathPart(Part):
    """A part of the SI kind: a state updated after every step (the path integral of -g * dtheta
    and a step counter), a traced loss term that reads the state, and a host-side end-of-task
    hook that rebuilds the state from the parameters (so each seed's state differs)."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, learner.params)
        self.state = learner.put({"path": zeros, "anchor": learner.params, "omega": zeros,
                                  "steps": jnp.zeros((), jnp.int32)})

    def extra_loss(self, params, state, x, y, logits, weights):
        terms = jax.tree_util.tree_map(lambda o, p, a: jnp.sum(o * (p - a) ** 2),
                                       state["omega"], params, state["anchor"])
        return 0.5 * sum(jax.tree_util.tree_leaves(terms))

    def after_step(self, old_params, new_params, grads, state):
        path = jax.tree_util.tree_map(lambda s, g, n, o: s - g * (n - o), state["path"], grads, new_params,
                                      old_params)
        return {**state, "path": path, "steps": state["steps"] + 1}

    def on_after_training(self, task):
        s = self.state
        omega = jax.tree_util.tree_map(lambda w, path, p, a: w + jnp.maximum(path, 0.0) / ((p - a) ** 2 + 0.1),
                                       s["omega"], s["path"], self.learner.params, s["anchor"])
        self.state = {"path": jax.tree_util.tree_map(jnp.zeros_like, s["path"]), "anchor": self.learner.params,
                      "omega": omega, "steps": s["steps"]}


class WithPath(JaxLearner):
    part_classes = (PathPart,)


def synthetic_stream(seed: int, n_train: int = 44) -> Stream:
    rng = np.random.default_rng(seed)
    tasks = [Task(id=t, train_x=rng.integers(0, 256, (n_train, 1, 6, 6), dtype=np.uint8),
                  train_y=rng.integers(0, 10, n_train).astype(np.int64),
                  test_x=rng.integers(0, 256, (30, 1, 6, 6), dtype=np.uint8),
                  test_y=rng.integers(0, 10, 30).astype(np.int64), classes=np.arange(10)) for t in range(3)]
    return Stream(name="synthetic", scenario="domain_il", tasks=tasks, num_outputs=10, input_shape=(1, 6, 6),
                  mean=(0.5,), std=(0.25,))


@pytest.mark.parametrize("program", ["vmap", "unroll"])
def test_any_part_state_is_batched_and_matches_seeds_alone(program):
    """A part with per-step state, a traced loss term and an end-of-task hook; dropout (the
    carried key) on; a padded last batch (44 samples at batch 8); each seed its own data: per
    seed, the same parameters, part state and accuracies as when that seed runs alone; traced
    and compiled once."""
    cfg = validate_config({"backend": {"name": "jax", "seed_program": program}, "algo": {"name": "naive"},
                           "backbone": {"width": 8, "dropout": 0.25}, "benchmark": {"batch_size": 8},
                           "optimizer": {"lr": 0.05, "momentum": 0.9}})[0]
    seeds = [0, 1]
    streams = [synthetic_stream(s) for s in seeds]
    together = [WithPath(cfg, st, CPU, s) for st, s in zip(streams, seeds)]
    group = SeedGroup([ContinualLoop(lr, st, epochs_per_task=2) for lr, st in zip(together, streams)])
    states = group.run()
    assert together[0].trace_counts["epoch"] == 1
    assert group.compilations() == {"epoch": 1, "eval": 1}
    for s, st, lr, state in zip(seeds, streams, together, states):
        alone = WithPath(cfg, st, CPU, s)
        ref = ContinualLoop(alone, st, epochs_per_task=2).run()
        np.testing.assert_array_equal(state.acc_matrix, ref.acc_matrix)
        np.testing.assert_array_equal(state.initial_acc, ref.initial_acc)
        for a, b in zip(jax.tree_util.tree_leaves((lr.params, lr.parts[0].state, lr.opt_state, lr.key)),
                        jax.tree_util.tree_leaves((alone.params, alone.parts[0].state, alone.opt_state,
                                                   alone.key))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        assert int(lr.parts[0].state["steps"]) == 3 * 2 * 6  # tasks x epochs x ceil(44 / 8)
    params = [np.asarray(jax.tree_util.tree_leaves(lr.params)[0]) for lr in together]
    assert not np.allclose(params[0], params[1])


def test_states_that_cannot_be_stacked_fall_back_to_one_seed_at_a_time():
    """Seeds whose part states differ in shape run one after another, with a message."""
    class Ragged(Part):
        def __init__(self, learner, cfg):
            super().__init__(learner, cfg)
            self.state = learner.put(jnp.zeros(learner.seed + 1))

    class WithRagged(JaxLearner):
        part_classes = (Ragged,)

    cfg = validate_config({"backend": {"name": "jax"}, "backbone": {"width": 8}, "benchmark": {"batch_size": 8}})[0]
    stream = synthetic_stream(0)
    notes = []
    learners = [WithRagged(cfg, stream, CPU, s) for s in (0, 1)]
    group = SeedGroup([ContinualLoop(lr, stream) for lr in learners], note=notes.append)
    states = group.run()
    assert len(notes) == 1 and "cannot be stacked" in notes[0] and "one after another" in notes[0]
    ref = ContinualLoop(WithRagged(cfg, stream, CPU, 1), stream).run()
    np.testing.assert_array_equal(states[1].acc_matrix, ref.acc_matrix)


def test_algorithms_that_override_the_epoch_are_not_vectorised():
    class OwnEpoch(JaxLearner):
        def train_epoch(self, task, epoch):
            return super().train_epoch(task, epoch)

    class Declared(OwnEpoch):
        vectorize_seeds = True

    class NoPart(Part):
        vectorize_seeds = False

    assert vectorization_blocker(JaxLearner) is None
    assert "overrides train_epoch" in vectorization_blocker(OwnEpoch)
    assert vectorization_blocker(Declared) is None
    assert "NoPart sets vectorize_seeds = False" in vectorization_blocker(JaxLearner, [NoPart])


# -- torch: one seed after another, same outputs ----------------------------------------------------

def test_torch_runs_seeds_one_after_another_from_the_command_line(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["backend=torch", "algo=naive", "benchmark=rotatedmnist", "benchmark.num_tasks=2", "seeds=[0,1]",
            f"data_dir={tiny_data_dir}", "benchmark.batch_size=32", "benchmark.eval_batch_size=200",
            "backbone.width=32", "progress=false", "loggers=[console]", f"hydra.run.dir={run_dir}"]
    proc = run_clrun(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 seeds one after another" in proc.stderr
    assert "mean ± std" in proc.stdout
    saved = json.loads((run_dir / "aggregate.json").read_text())
    assert saved["vectorized"] is False and saved["seeds"] == [0, 1]
    cfg = tiny_run(tiny_data_dir, "naive", backend="torch", seed=1)
    cfg["benchmark"]["num_tasks"] = 2
    cfg["training"]["epochs_per_task"] = 1
    alone = run_experiment(cfg, tmp_path / "alone", console=quiet())
    assert_same_run(alone, read_results(run_dir / "seed=1"))
    assert saved["metrics"]["avg_acc"]["values"][1] == pytest.approx(alone["avg_acc"])


@pytest.mark.parametrize("algo, bench", [("ewc", "rotatedmnist"), ("naive", "permutedmnist")])
def test_seeds_spread_over_cpu_devices_match_each_seed_alone(tiny_data_dir, tmp_path, algo, bench):
    """With two JAX CPU devices the seeds train as two programs side by side (seeds 0,1 | 2), the
    devices holding a shared stream's images once each (Rotated MNIST) or each seed's own
    (Permuted MNIST); every seed's run is still the run it has alone (here, on one device)."""
    run_dir = tmp_path / "run"
    args = ["backend=jax", f"algo={algo}", f"benchmark={bench}", "benchmark.num_tasks=2", "seeds=[0,1,2]",
            "training.epochs_per_task=2", "backend.seed_program=unroll", f"data_dir={tiny_data_dir}", "benchmark.batch_size=32",
            "benchmark.eval_batch_size=200", "backbone.width=32", "progress=false", "loggers=[console]",
            f"hydra.run.dir={run_dir}"]
    proc = run_clrun(args, cwd=tmp_path, env={"JAX_NUM_CPU_DEVICES": "2"})
    assert proc.returncode == 0, proc.stderr
    assert "on each of 2 CPU devices, side by side: seeds 0,1 | 2" in " ".join(proc.stderr.split())
    saved = json.loads((run_dir / "aggregate.json").read_text())
    assert saved["vectorized"] is True
    for s in (0, 1, 2):
        cfg = tiny_run(tiny_data_dir, algo, bench, num_tasks=2, seed=s)
        alone = run_experiment(cfg, tmp_path / f"alone{s}", console=quiet())
        assert_same_run(alone, read_results(run_dir / f"seed={s}"))


def test_seed_devices_are_balanced_contiguous_groups(monkeypatch):
    assert jax_backend.seed_devices(CPU, 5, cores=1) == [CPU] * 5  # one core: one program
    fake = [jax.devices("cpu")[0]] + [f"cpu{i}" for i in range(1, 4)]  # four CPU devices
    monkeypatch.setattr(jax_backend, "_devices", lambda platform: fake)
    names = [d.jax if isinstance(d.jax, str) else "cpu0" for d in jax_backend.seed_devices(CPU, 5, cores=2)]
    assert names == ["cpu0"] * 3 + ["cpu1"] * 2  # 5 seeds on 2 cores: 0,1,2 | 3,4
    names = [d.jax if isinstance(d.jax, str) else "cpu0" for d in jax_backend.seed_devices(CPU, 7, cores=3)]
    assert names == ["cpu0"] * 3 + ["cpu1"] * 2 + ["cpu2"] * 2
    assert len({d.jax for d in jax_backend.seed_devices(CPU, 2, cores=8)}) == 2  # never more groups than seeds


# -- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seeds, extra, message", [
    ([], {}, "empty list"),
    ([0, 1, 0], {}, "repeats a seed"),
    ([0, -1], {}, "non-negative"),
    ([0, 1], {"resume": True}, "resume cannot be combined"),
    (["a"], {}, "seeds"),
])
def test_bad_seeds_are_config_errors(seeds, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"seeds": seeds, **extra})


def test_seeds_replace_seed_in_every_run(tiny_data_dir, tmp_path):
    run_experiment({**tiny_run(tiny_data_dir, "naive"), "seed": 7, "seeds": [2]}, tmp_path, console=quiet())
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["seed=2"]
    assert read_results(tmp_path / "seed=2")["seed"] == 2
    assert json.loads((tmp_path / "aggregate.json").read_text())["metrics"]["avg_acc"]["std"] is None
