"""The JAX backend's online EWC, SI, MAS, LwF, ER, DER, DER++ and A-GEM against the PyTorch
backend: final accuracies on real data, importances and trajectories step for step, penalties
that follow the state of the latest task (nothing frozen into the compiled epoch), compilation
counts, and the device replay memory."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from cl_runner.backends.jax.algorithms.agem import agem_project  # noqa: E402
from cl_runner.backends.jax.algorithms.mas import mas_importance  # noqa: E402
from cl_runner.backends.jax.memory import ReplayMemory  # noqa: E402
from cl_runner.backends.torch.algorithms.mas import mas_importance as torch_mas  # noqa: E402
from cl_runner.benchmarks import build_stream  # noqa: E402
from cl_runner.core.loop import ContinualLoop  # noqa: E402
from cl_runner.errors import ConfigError  # noqa: E402
from cl_runner.registry import ALGORITHMS, PLUGINS  # noqa: E402
from test_jax_backend import (  # noqa: E402
    assert_tree_close, copy_torch_weights, cross_entropy, jax_learner, snapshot, tiny_stream,
    torch_layers, torch_learner, torch_to_tree, typed_cfg,
)

tmap = jax.tree_util.tree_map
NEW = ("ewc_online", "si", "mas", "lwf", "er", "der", "derpp", "agem")


def torch_list_to_tree(tensors, jl):
    """PyTorch per-parameter tensors (weight, bias per layer, in order) as a JAX parameter tree."""
    n = len(tensors) // 2
    return torch_to_tree([(tensors[2 * i], tensors[2 * i + 1]) for i in range(n)], jl.params)


def test_new_methods_are_registered_for_jax():
    for name in NEW:
        assert "jax" in ALGORITHMS.entry(name).backends
    for name in ("ewc_online", "si", "mas"):
        assert PLUGINS.get(name, backend="jax") is not None


# -- 1. final accuracy on real data ------------------------------------------------------------------

PARITY_ALGOS = {
    "naive": {}, "ewc": {"ewc_lambda": 10.0}, "ewc_online": {"ewc_lambda": 10.0, "ewc_gamma": 0.9},
    "si": {"si_c": 0.1}, "mas": {"mas_lambda": 0.1, "mas_samples": 500}, "lwf": {"alpha": 1.0},
    "er": {"mem_size": 200}, "der": {"mem_size": 200, "alpha": 0.3},
    "derpp": {"mem_size": 200, "alpha": 0.3, "beta": 0.5},
    "agem": {"mem_per_task": 100, "replay_batch_size": 64},
}
# Points of final average accuracy (jax - torch) allowed, each from the differences measured at
# learner seeds 0-4 (no memory) or 0-9 (replay memories), listed in the test's docstring.
PARITY_TOLERANCE = {"naive": 1.0, "ewc": 1.0, "ewc_online": 1.0, "si": 1.0, "mas": 1.0, "lwf": 1.0,
                    "er": 4.0, "der": 5.0, "derpp": 3.0, "agem": 7.0}


@pytest.fixture(scope="module")
def small_permuted_mnist(shared_data_dir, tmp_path_factory):
    cfg = typed_cfg("jax", benchmark={"name": "permutedmnist", "num_tasks": 3, "subset": 1000,
                                      "test_subset": 1000, "batch_size": 10})
    return build_stream(cfg.benchmark, 0, shared_data_dir, tmp_path_factory.mktemp("pmnist-parity"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PARITY_ALGOS))
def test_final_accuracy_matches_pytorch(small_permuted_mnist, name):
    """Permuted MNIST (the real files), 3 tasks of 1000 training and 1000 test images, MLP
    784-100-100-10, SGD lr 0.05, batch 10, one epoch, seed 0, the hyperparameters of
    PARITY_ALGOS on both backends, the same initial weights (copied) and the same sample order
    (the PyTorch learner is given the JAX learner's permutations, as in test_jax_parity2.py).

    Without a replay memory nothing else is random (EWC's and MAS's samples are drawn alike on
    both backends), so the runs are the same computation up to the kernels' rounding. Measured
    (jax - torch, points) at learner seeds 0-4: 0.00 for naive, EWC, online EWC, SI and LwF at
    every seed, MAS -0.10 0 0 0 0. Tolerance: 1 point (30 of the 3000 test images).

    ER, DER, DER++ and A-GEM also draw memory insertions and replay batches, from different
    generators on each backend, so their runs differ as two seeds of one backend would. Measured
    at learner seeds 0-9 (jax - torch, points): ER -0.27 +2.00 -1.33 +0.43 +0.57 +1.23 -0.47
    +1.90 -0.37 -0.10 (mean +0.36, sd 1.08); DER -2.17 -1.77 -0.63 +1.20 -0.30 +0.37 +2.77 -1.17
    +0.13 +0.53 (-0.10, 1.46); DER++ -0.23 +1.67 -0.77 +0.47 +0.17 +0.53 -0.77 +0.67 +0.97 -0.43
    (+0.23, 0.79); A-GEM +3.90 +0.53 +0.37 -0.90 -1.40 -0.67 +2.83 +1.33 +3.20 +0.80 (+1.00,
    1.81). Tolerance: |mean| + 3 sd, rounded up (4, 5, 3 and 7 points). With each backend's
    own sample order the spread is about twice as large (A-GEM: sd 3.56, up to 8.3 points),
    which is why the order is shared."""
    from test_jax_parity2 import jax_order

    kw = dict(algo=PARITY_ALGOS[name], backbone={"width": 100}, optimizer={"lr": 0.05},
              benchmark={"name": "permutedmnist", "batch_size": 10, "eval_batch_size": 1000})
    tl = torch_learner(small_permuted_mnist, name, **kw)
    tl.set_threads(1, 2)
    jl = copy_torch_weights(tl, jax_learner(small_permuted_mnist, name, **kw))
    with jax_order(jl):
        t_acc = ContinualLoop(tl, small_permuted_mnist).run().acc_matrix[-1].mean()
    j_acc = ContinualLoop(jl, small_permuted_mnist).run().acc_matrix[-1].mean()
    assert t_acc > 70 and j_acc > 70
    assert abs(j_acc - t_acc) <= PARITY_TOLERANCE[name], (name, t_acc, j_acc)


# -- 2. importances and trajectories, step for step --------------------------------------------------

@pytest.mark.parametrize("name,scenario,algo", [
    ("ewc_online", "domain_il", {"ewc_lambda": 50.0, "ewc_gamma": 0.5, "fisher_samples": None}),
    ("si", "domain_il", {"si_c": 1.0, "si_xi": 0.1}),
    ("si", "task_il", {"si_c": 1.0, "si_xi": 0.05}),
    ("mas", "domain_il", {"mas_lambda": 2.0}),
    ("mas", "task_il", {"mas_lambda": 2.0, "mas_samples": 10}),
    ("lwf", "class_il", {"alpha": 2.0, "temperature": 2.0}),
    ("lwf", "task_il", {"alpha": 2.0, "temperature": 3.0}),
])
def test_trajectory_and_importances_match_pytorch(name, scenario, algo):
    """One batch per task (the sample order cannot matter) and the same initial weights: the two
    backends follow the same trajectory through 3 tasks x 3 epochs, so the importances (the
    running Fisher with its decay, SI's path integrals over 3 steps per task, MAS's gradient of
    the output norm), the anchors, the penalty and the distillation terms are the same."""
    stream = tiny_stream(num_tasks=3, scenario=scenario, n_train=16, side=6)
    kw = dict(algo=algo, benchmark={"batch_size": 16}, optimizer={"lr": 0.1, "momentum": 0.5})
    tl = torch_learner(stream, name, **kw)
    jl = copy_torch_weights(tl, jax_learner(stream, name, **kw))
    ts = ContinualLoop(tl, stream, epochs_per_task=3).run()
    js = ContinualLoop(jl, stream, epochs_per_task=3).run()
    expected = torch_to_tree([(m.weight, m.bias) for m in torch_layers(tl.model)], jl.params)
    assert_tree_close(jl.params, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(js.epoch_losses, ts.epoch_losses, rtol=1e-4)
    np.testing.assert_array_equal(js.acc_matrix, ts.acc_matrix)
    if name != "lwf":
        jp, tp = jl.parts[0], tl.parts[0]
        assert jp.num_snapshots == tp.num_snapshots == 3
        omega = jp.state["omega"]
        assert_tree_close(omega, torch_list_to_tree(tp.omega, jl), rtol=2e-4, atol=1e-8)
        assert_tree_close(jp.anchor(), torch_list_to_tree(tp.anchor(), jl), rtol=1e-4, atol=1e-6)
        assert all(float(jnp.sum(o)) > 0 for o in jax.tree_util.tree_leaves(omega))
        if name == "si":
            assert_tree_close(jp.state["w"], torch_list_to_tree(tp.w, jl), rtol=2e-3, atol=1e-8)


@pytest.mark.parametrize("scenario,n", [("domain_il", 37), ("task_il", 21)])
def test_mas_importance_matches_pytorch_and_a_per_sample_loop(scenario, n):
    stream = tiny_stream(num_tasks=3, scenario=scenario, n_train=n, side=8)
    tl = torch_learner(stream, "mas")
    jl = copy_torch_weights(tl, jax_learner(stream, "mas"))
    task = stream.tasks[1]
    tt = torch.full((n,), task.id) if tl.masks else None
    expected = torch_list_to_tree(torch_mas(tl, tl.to_input(task.train_x), tt, batch_size=8), jl)
    x = jl.to_input(task.train_x)
    jt = jnp.full((n,), task.id, jnp.int32) if jl.masks else None
    got = mas_importance(jl, jl.params, x, jt, batch_size=8)
    assert_tree_close(got, expected, rtol=1e-4, atol=1e-9)

    def norm(p, xi):  # by hand: one sample at a time, the task's units only in task-IL
        out = jl.model.apply({"params": p}, xi[None])[0]
        if jl.masks:
            out = out * jl.mask_table[task.id]
        return jnp.sum(out ** 2)

    grad = jax.jit(jax.grad(norm))
    total = tmap(jnp.zeros_like, jl.params)
    for i in range(n):
        total = tmap(lambda s, g: s + jnp.abs(g), total, grad(jl.params, x[i]))
    assert_tree_close(got, tmap(lambda s: s / n, total), rtol=1e-4, atol=1e-9)


# -- 3. the penalty follows the latest task's state (nothing closed over) ----------------------------

@pytest.mark.parametrize("name,algo", [
    ("ewc", {"ewc_lambda": 50.0, "fisher_samples": None}),
    ("si", {"si_c": 5.0}),
    ("mas", {"mas_lambda": 5.0}),
])
def test_penalty_after_task_two_pulls_toward_task_two_parameters(name, algo):
    """Plain SGD, one batch per task. After tasks 1 and 2 each step of task 3 must be
    theta <- theta - lr * (task gradient + sum_k 2 s Omega_k (theta - theta*_k)) with the
    snapshots as they are after task 2: for SI and MAS one term anchored at the task-2
    parameters with the accumulated Omega; for EWC one term per task. The epoch program was
    compiled during task 1 (all-zero importances, anchor = nothing): had it closed over the
    state, task 3 would train without the penalty, or toward task 1's parameters."""
    lr = 0.1
    stream = tiny_stream(num_tasks=3, n_train=16)
    jl = jax_learner(stream, name, algo=algo, optimizer={"lr": lr}, benchmark={"batch_size": 16})
    part = jl.parts[0]
    s = part.strength
    omegas, thetas = [], []
    for task in stream.tasks[:2]:
        jl.on_before_task(task)
        for epoch in range(2):
            jl.train_epoch(task, epoch)
        jl.on_after_training(task)
        jl.on_after_task(task)
        omegas.append(snapshot(part.state["omega"]))
        thetas.append(snapshot(jl.params))
    if name == "ewc":  # one term per task: Omega_2 alone is the sum's increase
        terms = [(omegas[0], thetas[0]), (tmap(np.subtract, omegas[1], omegas[0]), thetas[1])]
        wrong = [(omegas[1], thetas[0])]
    else:  # one running term, anchored at the end of task 2
        terms = [(omegas[1], thetas[1])]
        wrong = [(omegas[1], thetas[0])]
    if name != "ewc":  # the stored anchor is theta_2 (wherever Omega > 0: elsewhere it is moot)
        assert_tree_close(part.anchor(), tmap(lambda o, a: np.where(o > 0, a, 0), omegas[1], thetas[1]),
                          rtol=1e-5, atol=1e-6)

    task = stream.tasks[2]
    jl.on_before_task(task)
    x, y = jl.train_x, jl.train_y

    def ce(p):
        return jnp.mean(cross_entropy(jl.model.apply({"params": p}, x), y))

    def sgd_step(terms, p):
        pen = tmap(jnp.zeros_like, p)
        for omega, theta in terms:
            pen = tmap(lambda o, om, a, q: o + 2 * s * om * (q - a), pen, omega, theta, p)
        return tmap(lambda q, g, h: q - lr * (g + h), p, jax.grad(ce)(p), pen)

    for epoch in range(2):  # at the first step theta = theta_2: the running term is 0 there
        before = snapshot(jl.params)
        jl.train_epoch(task, epoch)
        expected = sgd_step(terms, before)
        assert_tree_close(jl.params, expected, rtol=1e-4, atol=1e-6)
    wrong_step = sgd_step(wrong, before)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(wrong_step)))
    assert diff > 1e-4  # the check tells the two anchors apart
    # The traced penalty gradient at an arbitrary point: toward the task-2 state.
    rng = np.random.default_rng(0)
    point = tmap(lambda a: a + rng.standard_normal(a.shape).astype(np.float32), before)
    hand = tmap(jnp.zeros_like, point)
    for omega, theta in terms:
        hand = tmap(lambda o, om, a, q: o + 2 * s * om * (q - a), hand, omega, theta, point)
    assert_tree_close(part.penalty_grad(point, part.state), hand, rtol=1e-4, atol=1e-5)
    assert jl.trace_counts["epoch"] == 1 and jl._epoch_fn._cache_size() == 1


def test_lwf_distils_the_model_of_the_latest_task_start():
    """During task 3 the previous model is the one at the end of task 2 (not task 1's, nor the
    initial model the program was compiled with)."""
    stream = tiny_stream(num_tasks=3, scenario="class_il", n_train=16)
    jl = jax_learner(stream, "lwf", algo={"alpha": 1.0}, benchmark={"batch_size": 16})
    ends = []
    for task in stream.tasks:
        jl.on_before_task(task)
        assert_tree_close(jl.parts[0].state["teacher"], jl.params, rtol=0, atol=0)
        jl.train_epoch(task, 0)
        jl.on_after_task(task)
        ends.append(snapshot(jl.params))
    state = jl.parts[0].state
    assert_tree_close(state["teacher"], ends[1], rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(state["heads"])[0], np.arange(6) < 4)  # tasks 1-2's classes
    assert float(state["active"]) == 1.0
    assert jl._epoch_fn._cache_size() == 1


# -- 4. compilation counts ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,scenario,algo", [
    ("ewc_online", "domain_il", {}), ("si", "task_il", {}), ("mas", "domain_il", {}),
    ("lwf", "task_il", {}), ("lwf", "class_il", {}), ("er", "class_il", {"mem_size": 30}),
    ("er", "task_il", {"mem_policy": "class_balanced", "mem_size": 30}),
    ("der", "domain_il", {"mem_size": 30}), ("derpp", "task_il", {"mem_size": 30}),
    ("agem", "class_il", {"mem_per_task": 10, "replay_batch_size": 8}),
])
def test_programs_compile_once_over_three_tasks(name, scenario, algo):
    stream = tiny_stream(num_tasks=3, scenario=scenario, n_train=44)  # 44 = 5 x 8 + 4: padded
    jl = jax_learner(stream, name, algo=algo, training={"epochs_per_task": 2})
    state = ContinualLoop(jl, stream, epochs_per_task=2).run()
    assert np.isfinite(state.epoch_losses).all()
    extra = {"ewc_online": {"fisher": 1}, "mas": {"mas": 1}}.get(name, {})
    assert dict(jl.trace_counts) == {"epoch": 1, "eval": 1, **extra}
    assert jl._epoch_fn._cache_size() == 1 and jl._eval_fn._cache_size() == 1
    for programs in ("_fisher_programs", "_mas_programs"):
        for program in getattr(jl, programs, {}).values():
            assert program._cache_size() == 1
    if name in ("er", "der", "derpp", "agem"):  # the memory filled inside the compiled epochs
        part = jl.parts[0]
        seen = int(part.state["memory"]["seen"])
        assert seen == 3 * 2 * 44  # the padding is never offered
        assert len(part) == part.memory.capacity


# -- the device memory ----------------------------------------------------------------------------------

def offer(memory, mem, key, batches, task=0):
    insert = jax.jit(memory.insert)
    for b, (x, y) in enumerate(batches):
        mem = insert(mem, jax.random.fold_in(key, b), x, y, jnp.int32(task), jnp.ones(y.shape, bool))
    return mem


def test_reservoir_keeps_every_sample_with_equal_probability():
    """Algorithm R over 200 samples in batches of 10 into 20 slots, over 400 independent runs:
    each sample is kept with probability 20 / 200 = 0.1 (binomial sd 0.015), early or late."""
    memory = ReplayMemory("reservoir", (1,), capacity=20)
    ids = jnp.arange(200, dtype=jnp.float32).reshape(20, 10, 1)

    def run(key):
        mem = tmap(jnp.asarray, memory.init())

        def body(m, b):
            x = ids[b]
            return memory.insert(m, jax.random.fold_in(key, b), x, jnp.zeros(10, jnp.int32), jnp.int32(0),
                                 jnp.ones(10, bool)), None

        mem, _ = jax.lax.scan(body, mem, jnp.arange(20))
        return mem["x"][:20, 0], mem["seen"]

    kept, seen = jax.vmap(run)(jax.random.split(jax.random.PRNGKey(0), 400))
    assert (np.asarray(seen) == 200).all()
    kept = np.asarray(kept).astype(int)
    assert all(len(set(row)) == 20 for row in kept)  # 20 distinct samples in the 20 slots
    freq = np.bincount(kept.ravel(), minlength=200) / 400
    assert abs(freq[:100].mean() - 0.1) < 0.01 and abs(freq[100:].mean() - 0.1) < 0.01
    assert freq[:20].mean() == pytest.approx(0.1, abs=0.03)  # the first 20 are not favoured


def test_ring_keeps_each_tasks_latest_samples_and_sampling_respects_before_task():
    memory = ReplayMemory("ring", (1,), per_task=4, num_tasks=2)
    mem = tmap(jnp.asarray, memory.init())
    key = jax.random.PRNGKey(0)
    batch = [(jnp.arange(i, i + 3, dtype=jnp.float32)[:, None], jnp.zeros(3, jnp.int32)) for i in (0, 3, 6)]
    mem = offer(memory, mem, key, batch, task=0)  # samples 0..8: task 0 keeps 5..8
    assert sorted(np.asarray(mem["x"][:4, 0]).astype(int).tolist()) == [5, 6, 7, 8]
    mem = offer(memory, mem, key, [(jnp.full((2, 1), 50.0), jnp.ones(2, jnp.int32))], task=1)
    assert np.asarray(mem["filled"]).tolist() == [True] * 4 + [True, True, False, False, False]
    slots, valid = memory.sample(mem, key, 8, before_task=1)  # task 0's four only
    chosen = np.asarray(slots)[np.asarray(valid)]
    assert sorted(chosen.tolist()) == [0, 1, 2, 3]
    slots, valid = memory.sample(mem, key, 3)
    assert np.asarray(valid).all() and len(set(np.asarray(slots).tolist())) == 3


def test_class_balanced_regions_shrink_to_equal_shares():
    memory = ReplayMemory("class_balanced", (1,), capacity=12, num_outputs=4)
    rng = np.random.default_rng(0)
    mem = memory.register_classes(memory.init(), [0, 1], rng)
    mem = tmap(jnp.asarray, mem)
    y = jnp.array([0, 1] * 10, jnp.int32)
    mem = offer(memory, mem, jax.random.PRNGKey(1), [(y[:, None].astype(jnp.float32), y)])
    assert int(jnp.sum(mem["filled"][:12])) == 12  # 6 slots per class, each full
    mem = memory.register_classes(mem, [2, 3], rng)
    filled, ys = np.asarray(mem["filled"][:12]), np.asarray(mem["y"][:12])
    assert filled.sum() == 6 and sorted(ys[filled].tolist()) == [0, 0, 0, 1, 1, 1]
    assert (np.asarray(mem["x"][:12, 0])[filled] == ys[filled]).all()  # rows moved whole
    with pytest.raises(ConfigError, match="raise the memory size"):
        ReplayMemory("class_balanced", (1,), capacity=3, num_outputs=4).register_classes(
            ReplayMemory("class_balanced", (1,), capacity=3, num_outputs=4).init(), [0, 1, 2, 3], rng)


def test_memory_config_errors_name_the_key():
    stream = tiny_stream(num_tasks=3)
    with pytest.raises(ConfigError, match="mem_per_task"):
        jax_learner(stream, "er", algo={"mem_policy": "ring", "mem_size": 2})


def test_agem_projection_removes_the_conflicting_component():
    rng = np.random.default_rng(0)
    g = {"a": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.asarray(rng.standard_normal(2))}
    ref = tmap(lambda a: -a + 0.1, g)  # conflicts: g . ref < 0
    dot = lambda u, v: sum(float(jnp.sum(p * q)) for p, q in zip(jax.tree_util.tree_leaves(u),
                                                                  jax.tree_util.tree_leaves(v)))
    assert dot(g, ref) < 0
    out = agem_project(g, ref)
    assert dot(out, ref) == pytest.approx(0.0, abs=1e-5)
    coef = dot(g, ref) / dot(ref, ref)
    assert_tree_close(out, tmap(lambda a, r: a - coef * r, g, ref), rtol=1e-5, atol=1e-6)
    agree = tmap(lambda a: 2 * a, g)  # no conflict: unchanged
    assert_tree_close(agem_project(g, agree), g, rtol=0, atol=0)
    assert_tree_close(agem_project(g, tmap(jnp.zeros_like, g)), g, rtol=0, atol=0)  # empty memory


@pytest.mark.parametrize("name,algo", [("si", {}), ("er", {"mem_policy": "class_balanced", "mem_size": 20}),
                                       ("lwf", {})])
def test_state_dict_restores_the_parts_exactly(name, algo):
    """A learner restored from the state dict after task 1 (SI's path integral and start point,
    a class-balanced memory with its counters, PRNG key and host generator; LwF's previous model)
    trains task 2 exactly like the original."""
    import pickle

    stream = tiny_stream(num_tasks=2, scenario="class_il")
    a = jax_learner(stream, name, algo=algo, backbone={"dropout": 0.2})
    a.on_before_task(stream.tasks[0])
    a.train_epoch(stream.tasks[0], 0)
    a.on_after_training(stream.tasks[0])
    a.on_after_task(stream.tasks[0])
    state = pickle.loads(pickle.dumps(a.state_dict()))
    b = jax_learner(stream, name, algo=algo, seed=7, backbone={"dropout": 0.2})
    b.load_state_dict(state)
    for learner in (a, b):
        learner.on_before_task(stream.tasks[1])
        learner.train_epoch(stream.tasks[1], 0)
    assert_tree_close(a.params, b.params, rtol=0, atol=0)
    assert_tree_close(a.parts[0].state, b.parts[0].state, rtol=0, atol=0)
    assert b._epoch_fn._cache_size() == 1


@pytest.mark.parametrize("algo", ["derpp", "lwf"])
def test_vectorized_seeds_match_each_seed_alone(tiny_data_dir, tmp_path, algo):
    """``seeds=[0, 1]``: the memory (with its counters and keys) and LwF's previous model are
    batched state of the one vmapped epoch, and each seed's run is the run it has alone."""
    import io

    from rich.console import Console

    from cl_runner.experiment import run_experiment
    from conftest import read_results

    def cfg(**extra):
        return {"data_dir": str(tiny_data_dir), "progress": False, "loggers": [], "checkpoint": False,
                "device": "cpu", "backend": {"name": "jax"}, "algo": {"name": algo},
                "benchmark": {"name": "rotatedmnist", "num_tasks": 3, "batch_size": 32, "eval_batch_size": 200},
                "backbone": {"type": "mlp", "width": 32}, "training": {"epochs_per_task": 2}, **extra}

    agg = run_experiment(cfg(seeds=[0, 1]), tmp_path / "together", console=Console(file=io.StringIO()))
    assert agg["vectorized"] is True and agg["compilations"] == {"epoch": 1, "eval": 1}
    for s in (0, 1):
        alone = run_experiment(cfg(seed=s), tmp_path / f"alone{s}", console=Console(file=io.StringIO()))
        together = read_results(tmp_path / "together" / f"seed={s}")
        np.testing.assert_array_equal(np.array(together["acc_matrix"]), np.array(alone["acc_matrix"]))
        np.testing.assert_allclose(together["epoch_losses"], alone["epoch_losses"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["er", "lwf", "mas"])
def test_batch_norm_backbones_are_a_clear_error(name):
    """These methods run forward passes of their own, which on this backend do not carry batch
    norm's running averages: an error naming the way out, before any training."""
    stream = tiny_stream(num_tasks=2, side=8)
    jl = jax_learner(stream, name, backbone={"type": "resnet18"})
    with pytest.raises(ConfigError, match="batch norm.*backend=torch"):
        jl.on_before_task(stream.tasks[0])
