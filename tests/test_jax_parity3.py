"""The JAX backend's growing heads (``backbone.head``), MC-SGD, La-MAML, PNN and KCL against the
PyTorch backend: whole trajectories from the same weights where the sample order cannot differ
(one batch per task), the methods' own steps from the same weights and batches (La-MAML's
meta-update, MC-SGD's line gradient and mode-connectivity stage, KCL's kernel-ridge logits), and
final accuracies on a small real stream."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from cl_runner.backends.jax.algorithms.lamaml import piece_ids  # noqa: E402
from cl_runner.backends.jax.algorithms.mcsgd import line_gradient  # noqa: E402
from cl_runner.backends.torch import heads as torch_heads  # noqa: E402
from cl_runner.backends.torch.algorithms import pnn as torch_pnn  # noqa: E402
from cl_runner.backends.torch.algorithms.mcsgd import line_gradient as torch_line_gradient  # noqa: E402
from cl_runner.benchmarks import build_stream  # noqa: E402
from cl_runner.core.loop import ContinualLoop  # noqa: E402
from cl_runner.errors import ConfigError  # noqa: E402
from cl_runner.registry import ALGORITHMS  # noqa: E402
from test_jax_backend import (  # noqa: E402
    assert_tree_close, copy_torch_weights, jax_learner, snapshot, tiny_stream, torch_layers,
    torch_learner, torch_to_tree, typed_cfg,
)
from test_jax_parity import torch_list_to_tree  # noqa: E402

tmap = jax.tree_util.tree_map


def test_methods_are_registered_for_jax():
    for name in ("mcsgd", "lamaml", "pnn", "kcl"):
        assert "jax" in ALGORITHMS.entry(name).backends


# -- growing heads -----------------------------------------------------------------------------------

def linear_tree(m, bias=True) -> dict:
    out = {"kernel": m.weight.detach().numpy().T.copy()}
    if bias:
        out["bias"] = m.bias.detach().numpy().copy()
    return out


@pytest.mark.parametrize("scenario,kind,opt", [
    ("class_il", "incremental", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    ("task_il", "multihead", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
])
def test_growing_head_matches_pytorch_step_for_step(monkeypatch, scenario, kind, opt):
    """One batch per task, 3 tasks x 2 epochs, SGD with momentum and weight decay. The JAX head
    is the full head with each PyTorch chunk's initial weights copied to its units; the units of
    tasks not started yet must stay untouched (weights and momentum, as absent chunks are) and
    read -inf, old heads in task-IL must not move (PyTorch drops their gradient), so the losses,
    accuracies (0 for the classes not seen yet), final weights and logits are the same."""
    stream = tiny_stream(num_tasks=3, scenario=scenario, n_train=16, side=6)
    kw = dict(backbone={"head": kind}, benchmark={"batch_size": 16}, optimizer=opt)
    tl = torch_learner(stream, "naive", **kw)
    feats = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in torch_layers(tl.model)]
    chunks = []
    add_chunk = torch_heads.GrowingHead.add_chunk

    def record(self, units):
        chunk = add_chunk(self, units)
        chunks.append((units.clone(), linear_tree(chunk)))
        return chunk

    monkeypatch.setattr(torch_heads.GrowingHead, "add_chunk", record)
    ts = ContinualLoop(tl, stream, epochs_per_task=2).run()
    monkeypatch.undo()

    jl = jax_learner(stream, "naive", **kw)
    tree = snapshot(jl.params)
    tree["features"] = torch_to_tree(feats + [(torch.zeros(1, 1), torch.zeros(1))], jl.params)["features"]
    for units, lin in chunks:
        tree["head"]["kernel"][:, units.numpy()] = lin["kernel"]
        tree["head"]["bias"][units.numpy()] = lin["bias"]
    start = snapshot(tree)
    jl.params = jl.put(tmap(jnp.asarray, tree))
    js = ContinualLoop(jl, stream, epochs_per_task=2).run()

    np.testing.assert_allclose(js.epoch_losses, ts.epoch_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(js.acc_matrix, ts.acc_matrix)
    head = tl.model.head
    kernel, bias = np.asarray(jl.params["head"]["kernel"]), np.asarray(jl.params["head"]["bias"])
    for chunk, units in head.chunks_with_units():
        u = units.numpy()
        np.testing.assert_allclose(kernel[:, u], chunk.weight.detach().numpy().T, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(bias[u], chunk.bias.detach().numpy(), rtol=1e-4, atol=1e-6)
    owned = head.owned.numpy()
    np.testing.assert_array_equal(kernel[:, ~owned], start["head"]["kernel"][:, ~owned])
    x = stream.tasks[0].test_x
    with torch.no_grad():
        t_logits = tl.model(tl.to_input(x)).numpy()
    j_logits = np.asarray(jl.masked(jl.model.apply({"params": jl.params}, jl.to_input(x)), None, jl.mask_table))
    np.testing.assert_array_equal(np.isfinite(j_logits), np.isfinite(t_logits))
    fin = np.isfinite(t_logits)
    np.testing.assert_allclose(j_logits[fin], t_logits[fin], rtol=1e-4, atol=1e-5)
    assert jl.trace_counts["epoch"] == 1  # one program for every task, whatever the head owns


@pytest.mark.parametrize("name,algo,moves", [("naive", {}, False), ("er", {"mem_size": 20}, True),
                                             ("lwf", {"alpha": 1.0}, False)])
def test_multihead_moves_old_heads_only_through_the_task_loss(name, algo, moves):
    """As on PyTorch: during task 1 the head of task 0 moves when replayed task-0 samples enter the
    task loss (ER), and stays put when no task-0 sample does (naive) or only a distillation term
    reaches it (LwF; PyTorch drops that gradient). Momentum would move it otherwise."""
    stream = tiny_stream(num_tasks=2, scenario="task_il", n_train=16, side=6)
    jl = jax_learner(stream, name, algo=algo, backbone={"head": "multihead"}, benchmark={"batch_size": 8},
                     optimizer={"lr": 0.1, "momentum": 0.9})
    loop = ContinualLoop(jl, stream)
    seen = {}

    def after_task(task):
        seen[task.id] = np.asarray(jl.params["head"]["kernel"])[:, :2].copy()

    jl.on_after_task = lambda task, f=jl.on_after_task: (after_task(task), f(task))[1]
    loop.run()
    assert (not np.array_equal(seen[0], seen[1])) == moves


def test_growing_head_in_the_wrong_scenario_is_a_clear_error():
    with pytest.raises(ConfigError, match="multihead"):
        jax_learner(tiny_stream(scenario="class_il"), "naive", backbone={"head": "multihead"})
    with pytest.raises(ConfigError, match="incremental"):
        jax_learner(tiny_stream(scenario="task_il"), "naive", backbone={"head": "incremental"})


# -- MC-SGD ------------------------------------------------------------------------------------------

def test_mcsgd_line_gradient_and_mode_connectivity_stage_match_pytorch():
    """The gradient averaged over the n + 1 points of a line (each at its point's weights), and a
    whole mode-connectivity stage (init on the line, SGD with momentum on the two lines' summed
    gradients, 3 active steps then skipped padding steps) from the same weights, memory and batch
    indices."""
    stream = tiny_stream(num_tasks=3, scenario="task_il", n_train=24, side=6)
    algo = {"per_task_memory_samples": 8, "lmc_batch_size": 6, "lmc_line_samples": 4, "lmc_lr": 0.1,
            "lmc_momentum": 0.8, "lmc_init_position": 0.3}
    tl = torch_learner(stream, "mcsgd", algo=algo)
    jl = copy_torch_weights(tl, jax_learner(stream, "mcsgd", algo=algo))
    g = torch.Generator().manual_seed(0)
    w_hat = [p.detach().clone() for p in tl.model.parameters()]
    w_prev = [p + 0.2 * torch.randn(p.shape, generator=g) for p in w_hat]
    x = tl.to_input(np.concatenate([stream.tasks[0].train_x[:8], stream.tasks[1].train_x[:8]]))
    y = torch.from_numpy(np.concatenate([stream.tasks[0].train_y[:8], stream.tasks[1].train_y[:8]]))
    t = torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)])
    jx, jy, jt = jnp.asarray(x.numpy()), jnp.asarray(y.numpy(), jnp.int32), jnp.asarray(t.numpy(), jnp.int32)
    tree = lambda ts: jl.put(tmap(jnp.asarray, torch_list_to_tree(ts, jl)))  # noqa: E731

    grads, loss = torch_line_gradient(tl, w_prev, w_hat, 4, x[:6], y[:6], t[:6])
    jgrads, jloss = jax.jit(lambda *a: line_gradient(jl, a[0], a[1], 4, *a[2:]))(
        tree(w_prev), tree(w_hat), jx[:6], jy[:6], jt[:6], jl.mask_table)
    assert_tree_close(jgrads, torch_list_to_tree(grads, jl), rtol=1e-4, atol=1e-7)
    assert abs(float(jloss) - float(loss)) < 1e-5

    # The stage: previous-task slots 0..7, current-task slots 8..15, 3 steps of 6.
    rng = np.random.default_rng(0)
    prev_rows = np.stack([rng.permutation(8)[:6] for _ in range(3)])
    cur_rows = 8 + np.stack([rng.permutation(8)[:6] for _ in range(3)])
    w = [a + 0.3 * (b - a) for a, b in zip(w_prev, w_hat)]
    params = [torch.nn.Parameter(p.clone()) for p in w]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.8)
    for s in range(3):
        g_prev, _ = torch_line_gradient(tl, w_prev, [p.detach() for p in params], 4, x[prev_rows[s]],
                                        y[prev_rows[s]], t[prev_rows[s]])
        g_cur, _ = torch_line_gradient(tl, w_hat, [p.detach() for p in params], 4, x[cur_rows[s]],
                                       y[cur_rows[s]], t[cur_rows[s]])
        for p, a, b in zip(params, g_prev, g_cur):
            p.grad = a + b
        opt.step()
    pad = 2  # steps beyond the task's need: skipped
    active = np.r_[np.ones(3, bool), np.zeros(pad, bool)]
    prow = np.concatenate([prev_rows, np.zeros((pad, 6), int)]).astype(np.int32)
    crow = np.concatenate([cur_rows, np.zeros((pad, 6), int)]).astype(np.int32)
    w0 = tmap(lambda a, b: a + 0.3 * (b - a), tree(w_prev), tree(w_hat))
    frozen = jnp.zeros(jl.num_outputs(), bool)
    got, losses = jl._lmc_fn(w0, tree(w_prev), tree(w_hat), frozen, jx, jy, jt, jnp.asarray(prow),
                             jnp.asarray(crow), jnp.asarray(active), jl.mask_table)
    assert_tree_close(got, torch_list_to_tree([p.detach() for p in params], jl), rtol=1e-4, atol=1e-6)
    assert float(losses[3]) == 0.0 and float(losses[0]) > 0


# -- La-MAML -----------------------------------------------------------------------------------------

def test_lamaml_pieces_are_torch_tensor_split():
    for n, k in [(10, 5), (7, 5), (3, 5), (16, 3), (11, 4), (1, 5)]:
        ids, count = piece_ids(jnp.int32(n), 16, k)
        pieces = torch.tensor_split(torch.arange(n), min(k, n))
        expected = np.full(16, k)
        for j, p in enumerate(pieces):
            expected[p.numpy()] = j
        np.testing.assert_array_equal(np.asarray(ids), expected)
        assert int(count) == len(pieces)


@pytest.mark.parametrize("scenario,second_order,sync,n_inner,inner_clip", [
    ("task_il", False, False, 3, 0.5), ("domain_il", True, True, 3, 0.5), ("domain_il", False, False, None, None),
])
def test_lamaml_meta_update_matches_pytorch(scenario, second_order, sync, n_inner, inner_clip):
    """One meta-update (3 inner steps with clamped gradients, or one unclamped step per sample,
    the meta-loss over the batch and 5 memory samples, both meta-gradients clipped, alpha then the
    weights) from the same weights, learning rates (perturbed away from their uniform start, some
    below zero) and batches: the same new weights and learning rates on both backends."""
    stream = tiny_stream(num_tasks=2, scenario=scenario, n_train=12, side=6)
    kw = dict(algo={"second_order": second_order, "sync_update": sync, "n_inner_updates": n_inner,
                    "grad_clip_norm": 0.5, "inner_grad_clip": inner_clip},
              benchmark={"batch_size": 12}, optimizer={"lr": 0.1, "momentum": 0.5})
    tl = torch_learner(stream, "lamaml", **kw)
    jl = copy_torch_weights(tl, jax_learner(stream, "lamaml", **kw))
    task = stream.tasks[1]
    x, y = tl.to_input(task.train_x), torch.from_numpy(task.train_y)
    t = torch.full((12,), 1) if tl.masks else None
    mx = torch.cat([x, tl.to_input(stream.tasks[0].train_x[:5])])
    my = torch.cat([y, torch.from_numpy(stream.tasks[0].train_y[:5])])
    mt = torch.cat([t, torch.zeros(5, dtype=torch.long)]) if t is not None else None
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in tl.alpha:
            a.add_(0.15 * torch.randn(a.shape, generator=g))
    assert any(bool((a < 0).any()) for a in tl.alpha)
    alpha0 = jl.put(tmap(jnp.asarray, torch_list_to_tree([a.detach().clone() for a in tl.alpha], jl)))
    loss = tl.meta_update(x, y, t, mx, my, mt)

    def j(a, dtype=None):
        return None if a is None else jnp.asarray(a.numpy(), dtype)

    piece, k = piece_ids(jnp.int32(12), 12, jl.pieces_max(12))
    params, alpha, _, jloss = jax.jit(jl.meta_update)(
        jl.params, alpha0, jl.opt_state, j(x), j(y, jnp.int32), j(t, jnp.int32), piece, k, j(mx), j(my, jnp.int32),
        j(mt, jnp.int32), jnp.ones(17), jl.mask_table, jax.random.PRNGKey(0))
    assert abs(float(jloss) - float(loss)) < 1e-5
    assert_tree_close(params, torch_to_tree([(m.weight, m.bias) for m in torch_layers(tl.model)], jl.params),
                      rtol=1e-4, atol=1e-6)
    assert_tree_close(alpha, torch_list_to_tree([a.detach() for a in tl.alpha], jl), rtol=1e-4, atol=1e-6)


def same_draws(monkeypatch, tl, jl):
    """Both La-MAML learners draw the same samples: each epoch and each glance in the stored
    order, and memory batches by one fixed rule, (seen + i) mod stored, on both backends (the
    reservoir itself is deterministic while it is not full). What is left is arithmetic."""
    monkeypatch.setattr(torch, "randperm", lambda n, generator=None, **kw: torch.arange(n))
    monkeypatch.setattr(jax.random, "permutation", lambda key, n: jnp.arange(n))
    monkeypatch.setattr(tl, "glance_order", lambda n: torch.arange(n))
    monkeypatch.setattr(jl, "glance_order", lambda key, w: jnp.argsort(2.0 * (w <= 0), stable=True))

    def torch_sample(k, before_task=None):
        stored = min(tl.memory.seen, tl.memory.capacity)
        return None if stored == 0 else (tl.memory.seen + torch.arange(min(k, stored))) % stored

    cap = jl.part.memory.capacity

    def jax_sample(mem, key, k, before_task=None):
        stored = jnp.minimum(mem["seen"], cap)
        i = jnp.arange(min(int(k), cap))
        return (mem["seen"] + i) % jnp.maximum(stored, 1), i < stored

    monkeypatch.setattr(tl.memory, "sample", torch_sample)
    monkeypatch.setattr(jl.part.memory, "sample", jax_sample)


@pytest.mark.slow
def test_lamaml_runs_match_pytorch_step_for_step(monkeypatch, shared_data_dir, tmp_path):
    """Permuted MNIST, 2 tasks of 50 images, 2 epochs, MLP 784-100-100, batch 10, the defaults
    (one unclamped single-sample inner step per sample) with 2 glances and 10 replayed samples,
    the same weights and the same draws (:func:`same_draws`): 20 batches, every glance's meta-batch
    built from a memory that the first glance of each batch of a first epoch fills, so the insertion
    point, the task boundary and the second epoch (no insertion) all count. The backends compute
    the same run (measured: weights within 2e-7, the same accuracies). Over longer runs the
    difference of float rounding grows by about 1.7x per batch (measured on this stream: 2e-8
    after 5 batches, 3e-5 after 20, 6e-2 after 60 of one task), which is why the whole-run test
    below compares accuracies with a tolerance from a measured spread."""
    cfg = typed_cfg("jax", benchmark={"name": "permutedmnist", "num_tasks": 2, "subset": 50, "test_subset": 500,
                                      "batch_size": 10})
    stream = build_stream(cfg.benchmark, 0, shared_data_dir, tmp_path)
    kw = dict(algo={"glances": 2, "mem_size": 200, "replay_batch_size": 10}, backbone={"width": 100},
              benchmark={"name": "permutedmnist", "batch_size": 10, "eval_batch_size": 500})
    tl = torch_learner(stream, "lamaml", **kw)
    tl.set_threads(1, 1)
    jl = copy_torch_weights(tl, jax_learner(stream, "lamaml", **kw))
    same_draws(monkeypatch, tl, jl)
    ts = ContinualLoop(tl, stream, epochs_per_task=2).run()
    js = ContinualLoop(jl, stream, epochs_per_task=2).run()
    assert tl.memory.seen == int(jl.part.state["memory"]["seen"]) == 100
    assert_tree_close(jl.params, torch_to_tree([(m.weight, m.bias) for m in torch_layers(tl.model)], jl.params),
                      rtol=1e-4, atol=2e-6)
    assert_tree_close(jl.part.state["alpha"], torch_list_to_tree([a.detach() for a in tl.alpha], jl),
                      rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(js.acc_matrix, ts.acc_matrix, atol=0.21)  # at most one test image of 500
    assert ts.acc_matrix[-1].mean() > 20


def test_lamaml_fills_its_memory_in_first_epochs_only_with_one_program():
    stream = tiny_stream(num_tasks=2, scenario="task_il", n_train=13, side=6)
    jl = jax_learner(stream, "lamaml", algo={"glances": 1, "n_inner_updates": 1, "mem_size": 100},
                     benchmark={"batch_size": 4})
    ContinualLoop(jl, stream, epochs_per_task=2).run()
    mem = jl.parts[0].state["memory"]
    assert int(mem["seen"]) == 26  # 13 per task, first epoch only, the padding not offered
    assert jl.trace_counts["epoch"] == 1
    with pytest.raises(ConfigError, match="head"):
        jax_learner(tiny_stream(scenario="task_il"), "lamaml", backbone={"head": "multihead"})


# -- PNN ---------------------------------------------------------------------------------------------

def lateral_tree(lat) -> dict:
    e = {"out": linear_tree(lat.out, bias=False)}
    if lat.kind == "adapter":
        e["alpha"] = lat.alpha.detach().numpy().copy()
        e["project"] = linear_tree(lat.project)
    if lat.bias is not None:
        e["bias"] = lat.bias.detach().numpy().copy()
    return e


def column_tree(col) -> dict:
    d = {f"layers_{i}": linear_tree(layer) for i, layer in enumerate(col.layers)}
    d["out"] = linear_tree(col.out)
    for i, lat in enumerate(col.laterals):
        d[f"lat_{i}"] = lateral_tree(lat)
    if col.input_lateral is not None:
        d["lat_in"] = lateral_tree(col.input_lateral)
    return d


@pytest.mark.parametrize("scenario,lateral,agem", [("task_il", "adapter", False), ("domain_il", "linear", True)])
def test_pnn_matches_pytorch_step_for_step(monkeypatch, scenario, lateral, agem):
    """Every PyTorch column's initial weights copied (columns are created when their task starts),
    one batch per task, SGD with momentum and weight decay: the same losses, accuracies and final
    columns; earlier columns do not move. ``agem``: A-GEM's variant (laterals from the input too,
    a bias per earlier column, truncated-normal init)."""
    stream = tiny_stream(num_tasks=3, scenario=scenario, n_train=16, side=6)
    kw = dict(algo={"lateral": lateral, "lateral_from_input": agem, "lateral_bias": agem},
              benchmark={"batch_size": 16}, optimizer={"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
              backbone={"init": "truncated_normal" if agem else "default"})
    tl = torch_learner(stream, "pnn", **kw)
    cols = [column_tree(tl.model.columns[0])]
    add_column = torch_pnn.ProgressiveNet.add_column

    def record(self):
        col = add_column(self)
        cols.append(column_tree(col))
        return col

    monkeypatch.setattr(torch_pnn.ProgressiveNet, "add_column", record)
    ts = ContinualLoop(tl, stream, epochs_per_task=2).run()
    monkeypatch.undo()
    assert ("lat_in" in cols[2] and "bias" in cols[2]["lat_0"]) == agem
    jl = jax_learner(stream, "pnn", **kw)
    assert jax.tree_util.tree_structure(jl.params["columns"]["col_2"]) == \
        jax.tree_util.tree_structure(tmap(jnp.asarray, cols[2]))
    jl.params = jl.put(tmap(jnp.asarray, {"columns": {f"col_{k}": c for k, c in enumerate(cols)}}))
    js = ContinualLoop(jl, stream, epochs_per_task=2).run()
    np.testing.assert_allclose(js.epoch_losses, ts.epoch_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(js.acc_matrix, ts.acc_matrix)
    final = {"columns": {f"col_{k}": column_tree(c) for k, c in enumerate(tl.model.columns)}}
    assert_tree_close(jl.params, final, rtol=1e-4, atol=1e-6)
    assert jl.trace_counts["epoch"] == 1


# -- KCL ---------------------------------------------------------------------------------------------

def test_kcl_task_logits_match_pytorch():
    """The kernel-ridge logits (random features from the posterior's bases, ridge solve on the
    coreset, scale and shift) and KL(q || p) from the same weights, queries, coreset, eps and b;
    the one-hot targets over all units give the task's columns and zeros elsewhere."""
    stream = tiny_stream(num_tasks=3, scenario="task_il", n_train=40, side=6)
    kw = dict(algo={"coreset_size": 10, "num_features": 64}, benchmark={"batch_size": 8, "scenario": "task_il"})
    tl = torch_learner(stream, "kcl", **kw)
    jl = jax_learner(stream, "kcl", **kw)
    m = tl.model
    feats = torch_to_tree([(lay.weight, lay.bias) for lay in torch_layers(m.features)]
                          + [(torch.zeros(1, 1), torch.zeros(1))], {"features": jl.params["features"], "head": {}})

    def net(seq):
        return {f"l{i}": linear_tree(seq[k]) for i, k in enumerate((0, 2, 4))}

    jl.params = jl.put(tmap(jnp.asarray, {
        "features": feats["features"], "posterior": net(m.posterior.net), "prior": net(m.prior.net),
        "ridge": m.ridge.detach().numpy() + np.float32(0.3), "scale": m.scale.detach().numpy() * 1.5,
        "shift": m.shift.detach().numpy() + 0.2}))
    with torch.no_grad():
        m.ridge.add_(0.3), m.scale.mul_(1.5), m.shift.add_(0.2)
    task = stream.tasks[1]
    x, cx = tl.to_input(task.train_x[:8]), tl.to_input(task.train_x[10:20])
    cy = torch.nn.functional.one_hot(torch.from_numpy(task.train_y[10:20]) - 2, 2).float()
    g = torch.Generator().manual_seed(0)
    eps, b = torch.randn(64, 8, generator=g), 6.28 * torch.rand(64, generator=g)
    with torch.no_grad():
        out, kl = m.task_logits(x, cx, cy, 1, eps, b)
    j = lambda a: jnp.asarray(a.numpy())  # noqa: E731
    full_y = jnp.zeros((10, 6)).at[:, 2:4].set(j(cy))
    jout, jkl = jl.task_logits(jl.params, jl.embed(jl.params, j(x), False), jl.embed(jl.params, j(cx), False),
                               full_y, 1, j(eps), j(b))
    np.testing.assert_allclose(np.asarray(jout)[:, 2:4], out.numpy(), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(jout)[:, [0, 1, 4, 5]], 0.2, atol=1e-6)  # shift only
    assert abs(float(jkl) - float(kl)) < 1e-4 * max(1.0, abs(float(kl)))


# -- final accuracy on real data ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_permuted_mnist(shared_data_dir, tmp_path_factory):
    cfg = typed_cfg("jax", benchmark={"name": "permutedmnist", "num_tasks": 3, "subset": 600,
                                      "test_subset": 1000, "batch_size": 10})
    return build_stream(cfg.benchmark, 0, shared_data_dir, tmp_path_factory.mktemp("pmnist-parity3"))


@pytest.fixture(scope="module")
def small_split_mnist(shared_data_dir, tmp_path_factory):
    cfg = typed_cfg("jax", benchmark={"name": "splitmnist", "scenario": "task_il", "subset": 300,
                                      "test_subset": 300, "batch_size": 10})
    return build_stream(cfg.benchmark, 0, shared_data_dir, tmp_path_factory.mktemp("smnist-parity3"))


# Points of final average accuracy (jax - torch) allowed; mcsgd and kcl: |mean| + 3 sd of the
# differences measured at learner seeds 0-9; La-MAML: 4 sd of the difference measured at seeds 0-7
# (4 x 1.82 = 7.3). See the test's docstring.
ACCURACY_TOLERANCE = {"mcsgd": 26.0, "lamaml": 7.5, "pnn": 1.0, "kcl": 3.0}
# The least final average accuracy either backend must reach (chance: 10%); mcsgd: below the
# lowest of the 20 runs measured (45.3), about its mean - 3 sd.
ACCURACY_FLOOR = {"mcsgd": 35.0, "lamaml": 50.0, "pnn": 50.0, "kcl": 50.0}
ACCURACY_RUNS = {
    "mcsgd": ("small_permuted_mnist", {"per_task_memory_samples": 100, "lmc_line_samples": 5}, {}),
    "lamaml": ("small_permuted_mnist", {"glances": 2, "mem_size": 200, "n_inner_updates": 5}, {}),
    "pnn": ("small_permuted_mnist", {"lateral": "linear"}, {}),
    "kcl": ("small_split_mnist", {"coreset_size": 50, "num_features": 128}, {"scenario": "task_il"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ACCURACY_RUNS))
def test_final_accuracy_matches_pytorch(request, monkeypatch, name):
    """3 tasks of Permuted MNIST (600 training, 1000 test images each; domain-IL) or task-IL Split
    MNIST (KCL; 300 training and test images per task), MLP 784-100-100, SGD lr 0.05, batch 10,
    one epoch, seed 0.

    MC-SGD, La-MAML (2 glances, 5 inner updates: half the cost of one per sample, whose arithmetic
    the step-for-step test above covers) and KCL: the same initial weights for what both
    backends build at the start (MC-SGD, La-MAML: copied; KCL's inference networks are drawn by
    each backend), different sample orders, memory draws, La-MAML batch splits and KCL coresets,
    so the runs differ as two seeds of one backend would (the exact tests above show the
    arithmetic is the same). Measured (jax - torch, points): mcsgd at learner seeds 0-9 +2.87
    +2.63 -3.63 +10.20 -10.43 +4.83 -6.63 +12.43 +8.63 +6.43 (mean +2.7, sd 7.5: MC-SGD's own
    accuracy here swings between seeds, torch 45.3-58.3 and jax 45.7-61.1, and giving both the
    same sample order does not narrow it: sd 7.3 over the same seeds); kcl at seeds 0-9 +0.53
    -0.47 +0.07 +1.13 +0.80 -0.40 -1.00 +0.47 +0.13 -0.13 (mean +0.1, sd 0.6); lamaml (five inner
    updates, as the authors run it) at learner seeds 0-7: +1.93, -2.27, -3.00, +1.27, -1.33,
    -0.07, -0.43, +1.53 (mean -0.30, sd 1.82, as two independent runs: the per-backend sd are
    1.21 and 1.23; accuracies 78-83). Tolerance: ACCURACY_TOLERANCE points.

    PNN: every column's initial weights copied and both backends walk the data in its stored
    order (the permutations replaced by the identity), so the runs are the same computation:
    tolerance 1 point (measured: equal). With each backend's own order the difference is the
    noise of this small stream (measured -4.9 and -8.8 at seeds 0, 1 with one epoch, and jax's
    PNN equals jax's naive learner on task 0 exactly)."""
    fixture, algo, bench = ACCURACY_RUNS[name]
    stream = request.getfixturevalue(fixture)
    kw = dict(algo=algo, backbone={"width": 100}, optimizer={"lr": 0.05},
              benchmark={"name": "splitmnist" if name == "kcl" else "permutedmnist", "batch_size": 10,
                         "eval_batch_size": 500, **bench})
    tl = torch_learner(stream, name, **kw)
    tl.set_threads(1, 2)
    jl = jax_learner(stream, name, **kw)
    if name in ("mcsgd", "lamaml"):
        jl = copy_torch_weights(tl, jl)
    if name == "pnn":  # every column copied, and both backends walk the data in its stored order
        cols = [column_tree(tl.model.columns[0])]
        add_column = torch_pnn.ProgressiveNet.add_column

        def record(self):
            col = add_column(self)
            cols.append(column_tree(col))
            return col

        monkeypatch.setattr(torch_pnn.ProgressiveNet, "add_column", record)
        monkeypatch.setattr(torch, "randperm", lambda n, generator=None, **kw: torch.arange(n))
        t_acc = ContinualLoop(tl, stream).run().acc_matrix[-1].mean()
        monkeypatch.undo()
        jl.params = jl.put(tmap(jnp.asarray, {"columns": {f"col_{k}": c for k, c in enumerate(cols)}}))
        monkeypatch.setattr(jax.random, "permutation", lambda key, n: jnp.arange(n))
        j_acc = ContinualLoop(jl, stream).run().acc_matrix[-1].mean()
        monkeypatch.undo()
    else:
        t_acc = ContinualLoop(tl, stream).run().acc_matrix[-1].mean()
        j_acc = ContinualLoop(jl, stream).run().acc_matrix[-1].mean()
    assert t_acc > ACCURACY_FLOOR[name] and j_acc > ACCURACY_FLOOR[name], (t_acc, j_acc)
    assert jl.trace_counts["epoch"] == 1 and jl.trace_counts["eval"] == 1
    if name == "mcsgd":  # the stage compiled once; 100 samples of every task kept
        assert jl.trace_counts["lmc"] == 1
        assert list(np.bincount(jl.mem["t"][jl.mem["filled"]])) == [100, 100, 100]
    print(name, t_acc, j_acc)
    assert abs(j_acc - t_acc) <= ACCURACY_TOLERANCE[name], (name, t_acc, j_acc)
