"""Replay methods against their reference code, by hand: what the memory stores and how it is
replayed with augmentation (Mammoth utils/buffer.py), DER++'s two memory forward passes
(Mammoth models/derpp.py), A-GEM's per-class ring memory (facebookresearch/agem), and GDumb's
re-initialisation under ``backbone.init``. Both backends where the method exists on both."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_runner import catalog
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.config import validate_config
from cl_runner.errors import ConfigError

torch_backend = catalog.load_backend("torch")
jax_backend = catalog.load_backend("jax")

from cl_runner.backends.jax import memory as jax_memory  # noqa: E402
from cl_runner.backends.torch.memory import ReplayMemory as TorchMemory  # noqa: E402

PAD = 2
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def cifar_like_stream(num_tasks=2, n_train=16, side=6, seed=0) -> Stream:
    """Random colour images, two classes per task (class-IL)."""
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(num_tasks):
        classes = np.array([2 * t, 2 * t + 1])
        y = np.tile(classes, n_train // 2).astype(np.int64)
        x = rng.integers(0, 256, (n_train, 3, side, side), dtype=np.uint8)
        tasks.append(Task(id=t, train_x=x, train_y=y, test_x=x[:4], test_y=y[:4], classes=classes))
    return Stream(name="colour", scenario="class_il", tasks=tasks, num_outputs=2 * num_tasks,
                  input_shape=(3, side, side), mean=MEAN, std=STD)


def windows(img: np.ndarray, p: int = PAD) -> list[np.ndarray]:
    """Every crop of the normalised image ``img`` (C, H, W) from the image padded by p pixels of
    a black pixel's normalised value (-mean/std), and its mirror image, built by hand."""
    c, h, w = img.shape
    fill = -np.asarray(MEAN, np.float32) / np.asarray(STD, np.float32)
    padded = np.repeat(np.repeat(fill[:, None, None], h + 2 * p, 1), w + 2 * p, 2)
    padded[:, p:p + h, p:p + w] = img
    out = []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            win = padded[:, dy:dy + h, dx:dx + w]
            out += [win, win[:, :, ::-1]]
    return out


def window_index(row: np.ndarray, img: np.ndarray) -> int:
    """Which window of ``img`` ``row`` is (asserts it is one)."""
    hits = [i for i, w in enumerate(windows(img)) if np.allclose(row, w, atol=1e-6)]
    assert hits, "a replayed input is not a padded, possibly mirrored, window of its stored image"
    return hits[0]


REPLAY_ALGOS = {
    "er": {"mem_size": 64, "replay_batch_size": 4},
    "der": {"mem_size": 64, "replay_batch_size": 4, "alpha": 0.5},
    "derpp": {"mem_size": 64, "replay_batch_size": 4, "alpha": 0.5, "beta": 0.5},
    "agem": {"mem_policy": "ring", "mem_per_task": 16, "replay_batch_size": 4},
}


def torch_learner(name, stream, augment=True, **algo):
    cfg = validate_config({"algo": {"name": name, **REPLAY_ALGOS.get(name, {}), **algo},
                           "backbone": {"type": "cnn", "channels": [2], "width": 8},
                           "benchmark": {"batch_size": 8, "augment": augment, "crop_padding": PAD},
                           "optimizer": {"lr": 0.05}})[0]
    torch.manual_seed(0)
    return torch_backend.build_learner(cfg, stream, torch.device("cpu"), 0)


def jax_learner(name, stream, augment=True, **sections):
    algo = {"name": name, **REPLAY_ALGOS.get(name, {}), **sections.pop("algo", {})}
    cfg = validate_config({"backend": {"name": "jax"}, "algo": algo,
                           "backbone": {"width": 8, "n_hidden_layers": 1, **sections.pop("backbone", {})},
                           "benchmark": {"batch_size": 8, "augment": augment, "crop_padding": PAD},
                           "optimizer": {"lr": 0.05}, **sections})[0]
    return jax_backend.build_learner(cfg, stream, jax_backend.resolve_device("cpu"), 0)


def torch_memory_of(learner):
    return learner.memory if hasattr(learner, "memory") else learner.parts[0].memory


# -- point: the memory keeps the input before augmentation, and replays it augmented afresh ----------

@pytest.mark.parametrize("name", list(REPLAY_ALGOS))
def test_torch_memory_stores_unaugmented_inputs_and_replays_them_augmented_afresh(name, monkeypatch):
    stream = cifar_like_stream()
    learner = torch_learner(name, stream)
    memory = torch_memory_of(learner)
    learner.on_before_task(stream.tasks[0])
    clean = learner.train_x.numpy().copy()  # the task's normalised images, not augmented
    learner.train_epoch(stream.tasks[0], 0)
    # Every stored row is one of the task's images exactly (a crop or flip would not be): the 16
    # samples of the epoch, each once, with its label.
    stored = memory.x[:16].numpy()
    match = [next((j for j in range(16) if np.array_equal(r, clean[j])), None) for r in stored]
    assert None not in match and sorted(match) == list(range(16))
    assert memory.y[:16].tolist() == [int(stream.tasks[0].train_y[j]) for j in match]

    # Task 1: the memory batch is always slots 0..3; record every forward pass's input.
    learner.on_before_task(stream.tasks[1])
    fixed = torch.arange(4)
    monkeypatch.setattr(memory, "sample", lambda k, before_task=None: fixed[:k])
    inputs = []
    model = learner.model
    learner.train_forward = lambda x: (inputs.append(x.detach().numpy().copy()), model(x))[1]
    for epoch in range(3):
        learner.train_epoch(stream.tasks[1], epoch)
    replays = [x[8:] if name == "er" else x for x in inputs if (name == "er") or len(x) == 4]
    passes = {"er": 1, "der": 1, "derpp": 2, "agem": 1}[name]
    assert len(replays) == 6 * passes  # 2 steps per epoch, 3 epochs
    versions = {s: set() for s in range(4)}
    for batch in replays:
        for s in range(4):
            versions[s].add(window_index(batch[s], stored[s]))
    # A new crop and flip each time a sample is replayed (p = 1/50 that two draws coincide).
    assert all(len(v) >= 3 for v in versions.values()), versions
    # The stream samples of task 1 entered the memory as they are, too.
    clean1 = learner.to_input(stream.tasks[1].train_x).numpy()
    rows = memory.x[memory.t == 1].numpy() if name == "agem" else memory.x[16:32].numpy()
    assert len(rows) == 16 and all(any(np.array_equal(r, c) for c in clean1) for r in rows)


def test_torch_der_stores_the_logits_of_the_augmented_batch():
    """Mammoth's DER stores ``outputs.data``: the logits of the step's (augmented) batch, next to
    the un-augmented input (models/der.py:34-45)."""
    stream = cifar_like_stream()
    learner = torch_learner("der", stream)
    memory = learner.parts[0].memory
    learner.on_before_task(stream.tasks[0])
    seen = []
    model = learner.model
    learner.train_forward = lambda x: (seen.append(x.detach().clone()), model(x))[1]
    learner.train_epoch(stream.tasks[0], 0)
    clean = learner.train_x
    first = seen[0]  # the first step's augmented batch; its samples took slots 0..7
    for s in range(8):
        j = next(j for j in range(16) if torch.equal(memory.x[s], clean[j]))
        window_index(first[s].numpy(), clean[j].numpy())  # the step trained on a crop of it
    # Logits of the augmented batch with the weights before the first step: recompute them.
    torch.manual_seed(0)
    fresh = torch_learner("der", stream)
    with torch.no_grad():
        torch.testing.assert_close(memory.logits[:8], fresh.model(first))


@pytest.mark.parametrize("name", list(REPLAY_ALGOS))
def test_jax_memory_stores_unaugmented_inputs(name):
    stream = cifar_like_stream()
    jl = jax_learner(name, stream)
    jl.on_before_task(stream.tasks[0])
    carry, x, y, t, mask = jl.epoch_inputs()
    carry, _ = jl.train_step(carry, jnp.arange(8), None, x, y, t, mask)  # eagerly: one step
    mem = carry[2][0]["memory"]
    # Reservoir and ring both put the first 8 samples of task 0 in slots 0..7, as they are.
    np.testing.assert_array_equal(np.asarray(mem["x"][:8]), np.asarray(x[:8]))
    np.testing.assert_array_equal(np.asarray(mem["y"][:8]), np.asarray(y[:8]))


def test_jax_memory_batches_are_augmented_afresh_and_er_trains_on_them():
    stream = cifar_like_stream()
    jl = jax_learner("er", stream)
    part = jl.parts[0]
    jl.on_before_task(stream.tasks[0])
    carry, x, y, t, mask = jl.epoch_inputs()
    carry, _ = jl.train_step(carry, jnp.arange(4), None, x, y, t, mask)  # 4 samples stored
    state = carry[2][0]
    stored = np.asarray(state["memory"]["x"][:4])
    versions = {s: set() for s in range(4)}
    for i in range(8):
        st = {**state, "key": jax.random.PRNGKey(100 + i)}
        slots, _ = part.memory.sample(st["memory"], jax.random.fold_in(st["key"], jax_memory.SAMPLE), 4)
        mx = np.asarray(part.draw(st, 4, jax_memory.SAMPLE)[0])
        for row, s in zip(mx, np.asarray(slots)):
            versions[int(s)].add(window_index(row, stored[s]))
    assert all(len(v) >= 3 for v in versions.values()), versions
    # ER's loss is the mean cross-entropy over the stream batch and that augmented memory batch.
    params = carry[0]
    xb = x[4:12]
    loss, _ = jl.loss_and_logits(params, carry[2], xb, y[4:12], None, None, mask, None)
    mx, my, _, _, _ = part.draw(state, 4, jax_memory.SAMPLE)
    logits = jl.model.apply({"params": params}, jnp.concatenate([xb, mx]))
    manual = F.cross_entropy(torch.tensor(np.asarray(logits)),
                             torch.tensor(np.asarray(jnp.concatenate([y[4:12], my])), dtype=torch.long))
    assert float(loss) == pytest.approx(float(manual), rel=1e-5)


def test_without_augmentation_the_replayed_inputs_are_the_stored_ones(monkeypatch):
    stream = cifar_like_stream()
    learner = torch_learner("er", stream, augment=False)
    learner.on_before_task(stream.tasks[0])
    learner.train_epoch(stream.tasks[0], 0)
    learner.on_before_task(stream.tasks[1])
    monkeypatch.setattr(learner.memory, "sample", lambda k, before_task=None: torch.arange(4))
    inputs = []
    model = learner.model
    learner.train_forward = lambda x: (inputs.append(x.detach().clone()), model(x))[1]
    learner.train_epoch(stream.tasks[1], 0)
    for x in inputs:
        torch.testing.assert_close(x[8:], learner.memory.x[:4], rtol=0, atol=0)


LAMAML = {"mem_size": 64, "replay_batch_size": 4, "glances": 2, "n_inner_updates": 2}


def test_torch_lamaml_memory_stores_unaugmented_inputs_and_replays_them_augmented_afresh(monkeypatch):
    """La-MAML's reservoir keeps the batch before augmentation (stream_inputs) and each glance's
    memory samples are cropped and flipped afresh (replay_inputs): every replayed row is one
    window of its stored image, and a slot replayed 12 times shows several windows."""
    stream = cifar_like_stream()
    learner = torch_learner("lamaml", stream, **LAMAML)
    learner.on_before_task(stream.tasks[0])
    clean = learner.train_x.numpy().copy()
    learner.train_epoch(stream.tasks[0], 0)
    stored = learner.memory.x[:16].numpy()
    match = [next((j for j in range(16) if np.array_equal(r, clean[j])), None) for r in stored]
    assert None not in match and sorted(match) == list(range(16))

    learner.on_before_task(stream.tasks[1])
    monkeypatch.setattr(learner.memory, "sample", lambda k, before_task=None: torch.arange(4)[:k])
    meta_batches = []
    update = learner.meta_update
    learner.meta_update = lambda x, y, t, mx, my, mt: (meta_batches.append(mx.detach().numpy().copy()),
                                                       update(x, y, t, mx, my, mt))[1]
    for epoch in range(3):
        learner.train_epoch(stream.tasks[1], epoch)
    assert len(meta_batches) == 12  # 2 steps x 2 glances x 3 epochs
    versions = {s: set() for s in range(4)}
    for mx in meta_batches:
        assert mx.shape[0] == 12  # the 8 stream samples, then the 4 memory samples
        for s in range(4):
            versions[s].add(window_index(mx[8 + s], stored[s]))
    assert all(len(v) >= 3 for v in versions.values()), versions
    clean1 = learner.to_input(stream.tasks[1].train_x).numpy()
    rows = learner.memory.x[16:32].numpy()
    assert all(any(np.array_equal(r, c) for c in clean1) for r in rows)


def test_torch_lamaml_without_augmentation_replays_the_stored_rows(monkeypatch):
    stream = cifar_like_stream()
    learner = torch_learner("lamaml", stream, augment=False, **LAMAML)
    learner.on_before_task(stream.tasks[0])
    learner.train_epoch(stream.tasks[0], 0)
    learner.on_before_task(stream.tasks[1])
    monkeypatch.setattr(learner.memory, "sample", lambda k, before_task=None: torch.arange(4)[:k])
    seen = []
    update = learner.meta_update
    learner.meta_update = lambda x, y, t, mx, my, mt: (seen.append(mx[8:].detach().clone()),
                                                       update(x, y, t, mx, my, mt))[1]
    learner.train_epoch(stream.tasks[1], 1)
    assert len(seen) == 4
    for mx in seen:
        torch.testing.assert_close(mx, learner.memory.x[:4], rtol=0, atol=0)


def test_jax_lamaml_memory_stores_unaugmented_inputs_and_replays_them_augmented_afresh(monkeypatch):
    """JAX: the batch from before random_crop_flip enters the memory; the memory samples of a
    glance are augmented with a key of their own. One glance per step, so the meta-batch is
    concrete when train_step runs eagerly."""
    stream = cifar_like_stream()
    jl = jax_learner("lamaml", stream, algo={**LAMAML, "glances": 1})
    part = jl.parts[0]
    jl.on_before_task(stream.tasks[0])
    carry, x, y, t, mask = jl.epoch_inputs()
    carry, _ = jl.train_step(carry, jnp.arange(8), None, x, y, t, mask)
    mem = carry[2][0]["memory"]
    np.testing.assert_array_equal(np.asarray(mem["x"][:8]), np.asarray(x[:8]))
    stored = np.asarray(mem["x"][:8])

    drawn, meta = [], []
    sample = part.memory.sample
    def recorded_sample(*a):
        slots, valid = sample(*a)
        drawn.append(np.asarray(slots))
        return slots, valid

    monkeypatch.setattr(part.memory, "sample", recorded_sample)
    update = jl.meta_update
    monkeypatch.setattr(jl, "meta_update", lambda *a: (meta.append(np.asarray(a[8])), update(*a))[1])
    for i in range(12):  # the same state, a different step key each time
        jl.train_step((*carry[:3], jax.random.PRNGKey(100 + i)), jnp.arange(8, 16), None, x, y, t, mask)
    versions = {}
    for slots, mx in zip(drawn, meta):
        for row, s in zip(mx[8:], slots):
            versions.setdefault(int(s), set()).add(window_index(row, stored[s]))
    # 48 replays of 8 stored samples: each replayed row is a window of its stored image, and
    # the windows vary from one replay to the next.
    assert sum(len(v) for v in versions.values()) >= 2 * len(versions), versions


# -- point: DER++ runs each memory batch through a forward pass of its own ----------------------------

def conv_batch_stats(learner, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased variance of the first convolution's output on ``x``: what the
    first batch-norm layer normalises with (computed from the weights, outside the model)."""
    w = learner.model.features.conv1.weight.detach()
    h = F.conv2d(x, w, padding=1).double().numpy()
    n = h.shape[0] * h.shape[2] * h.shape[3]
    mean = h.mean(axis=(0, 2, 3))
    var = ((h - mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3)) / (n - 1)
    return mean, var


def test_torch_derpp_batch_norm_statistics_are_those_of_three_separate_passes(monkeypatch):
    """One DER++ step on a ResNet: the stream batch, the logit batch and the label batch each go
    through the network on their own (Mammoth models/derpp.py:34-58), so the first batch norm's
    running averages move three times, each with its own batch's statistics (momentum 0.1)."""
    stream = cifar_like_stream()
    cfg = validate_config({"algo": {"name": "derpp", "mem_size": 64, "replay_batch_size": 4},
                           "backbone": {"type": "resnet18", "nf": 2},
                           "benchmark": {"batch_size": 8}, "optimizer": {"lr": 0.05}})[0]
    torch.manual_seed(0)
    learner = torch_backend.build_learner(cfg, stream, torch.device("cpu"), 0)
    part = learner.parts[0]
    learner.on_before_task(stream.tasks[0])
    learner.train_epoch(stream.tasks[0], 0)  # 16 samples stored in slots 0..15
    learner.on_before_task(stream.tasks[1])
    draws = iter([torch.tensor([0, 5, 2, 7]), torch.tensor([6, 1, 3, 11])])
    monkeypatch.setattr(part.memory, "sample", lambda k, before_task=None: next(draws))
    bn = learner.model.features.bn1
    mean, var = bn.running_mean.double().numpy().copy(), bn.running_var.double().numpy().copy()
    tracked = int(bn.num_batches_tracked)
    x, y = learner.train_x[:8], learner.train_y[:8]
    batches = [x, part.memory.x[[0, 5, 2, 7]], part.memory.x[[6, 1, 3, 11]]]
    stats = [conv_batch_stats(learner, b) for b in batches]  # with the weights before the step
    learner.model.train()
    learner.train_step(x, y, None)
    for m, v in stats:
        mean = 0.9 * mean + 0.1 * m
        var = 0.9 * var + 0.1 * v
    np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == tracked + 3
    # One pass over both memory batches together would have given other averages.
    joint = conv_batch_stats(learner, torch.cat(batches[1:]))
    assert not np.allclose(stats[1][1], joint[1], rtol=1e-3)


def test_jax_derpp_memory_batches_have_forward_passes_of_their_own():
    """On the JAX backend (no batch norm with replay methods) each memory batch's pass draws its
    own dropout: the extra loss is alpha * MSE on the first batch's pass plus beta * CE on the
    second batch's pass, each computed here with its own key."""
    stream = cifar_like_stream()
    alpha, beta = 0.7, 0.4
    jl = jax_learner("derpp", stream, augment=False, algo={"alpha": alpha, "beta": beta},
                     backbone={"dropout": 0.5})
    part = jl.parts[0]
    jl.on_before_task(stream.tasks[0])
    carry, x, y, t, mask = jl.epoch_inputs()
    carry, _ = jl.train_step(carry, jnp.arange(8), None, x, y, t, mask)
    state, params = carry[2][0], carry[0]
    extra = part.extra_loss(params, state, x[8:16], y[8:16], None, None)
    mx, _, _, mz, _ = part.draw(state, 4, jax_memory.SAMPLE)
    mx2, my2, _, _, _ = part.draw(state, 4, jax_memory.SAMPLE_2)

    def apply(inp, purpose):
        return jl.model.apply({"params": params}, inp, train=True,
                              rngs={"dropout": jax.random.fold_in(state["key"], purpose)})

    out, out2 = apply(mx, jax_memory.DROPOUT), apply(mx2, jax_memory.DROPOUT_2)
    ce = F.cross_entropy(torch.tensor(np.asarray(out2)), torch.tensor(np.asarray(my2), dtype=torch.long))
    expected = alpha * float(jnp.mean((out - mz) ** 2)) + beta * float(ce)
    assert float(extra) == pytest.approx(expected, rel=1e-5)
    # The dropout masks of the two passes differ (their keys do).
    same = apply(mx, jax_memory.DROPOUT_2)
    assert not np.allclose(np.asarray(same), np.asarray(out))


# -- point: A-GEM's episodic memory, a ring per class of each task ------------------------------------

# Hand case: 2 slots per class; task 0 has classes [0, 1], task 1 classes [3, 2] (in that order),
# so the rings are (0,0): slots 0-1, (0,1): 2-3, (1,3): 4-5, (1,2): 6-7.
# Task 0 offers ids 0..6 with labels 0,1,0 | 0,1,0 | 1 (three batches): class 0 gets ids 0, 2, 3,
# 5 at ring positions 0, 1, 0, 1 -> slot 0 = 3, slot 1 = 5; class 1 gets ids 1, 4, 6 at positions
# 0, 1, 0 -> slot 2 = 6, slot 3 = 4. Task 1 offers ids 10..14 with labels 2,2,2,3,2 and id 15 of
# label 0 (not a class of task 1: not kept) in one batch: class 2 gets 10, 11, 12, 14 at positions
# 0, 1, 0, 1 -> slot 6 = 12, slot 7 = 14 (the batch's later samples win); class 3 gets 13 -> slot 4.
RING_TASK_CLASSES = [[0, 1], [3, 2]]
RING_BATCHES = [(0, [0, 1, 2], [0, 1, 0]), (0, [3, 4, 5], [0, 1, 0]), (0, [6], [1]),
                (1, [10, 11, 12, 13, 14, 15], [2, 2, 2, 3, 2, 0])]
RING_EXPECTED = {0: 3, 1: 5, 2: 6, 3: 4, 4: 13, 6: 12, 7: 14}  # slot -> id; slot 5 stays empty


def test_class_ring_layout():
    from cl_runner.algorithms.memories import class_ring_layout

    capacity, start = class_ring_layout(RING_TASK_CLASSES, 2, num_outputs=4)
    assert capacity == 8
    assert start.tolist() == [[0, 2, -1, -1], [-1, -1, 6, 4]]
    # Domain-IL (every task has every class): a block of per_class * classes per task.
    capacity, start = class_ring_layout([[0, 1, 2]] * 3, 13, num_outputs=3)
    assert capacity == 117 and start[2].tolist() == [78, 91, 104]


def test_torch_class_ring_by_hand():
    memory = TorchMemory("class_ring", (1,), torch.device("cpu"), 0, num_outputs=4, per_class=2,
                         task_classes=RING_TASK_CLASSES)
    assert memory.capacity == 8
    for task, ids, labels in RING_BATCHES:
        memory.add(torch.tensor(ids, dtype=torch.float32)[:, None], torch.tensor(labels), task_id=task)
    filled = memory.filled[:8].tolist()
    assert filled == [s in RING_EXPECTED for s in range(8)] and len(memory) == 7
    for s, i in RING_EXPECTED.items():
        assert memory.x[s, 0].item() == i and memory.t[s].item() == (0 if s < 4 else 1)
    assert memory.y[[0, 2, 4, 6]].tolist() == [0, 1, 3, 2]
    for _ in range(10):
        assert sorted(memory.sample(100, before_task=1).tolist()) == [0, 1, 2, 3]
    assert sorted(memory.sample(100).tolist()) == sorted(RING_EXPECTED)
    assert memory.sample(3, before_task=0) is None
    # The state round trip keeps the ring positions: one more sample of class 0 in task 0 goes to
    # ring position 4 % 2 = 0, slot 0.
    other = TorchMemory("class_ring", (1,), torch.device("cpu"), 1, num_outputs=4, per_class=2,
                        task_classes=RING_TASK_CLASSES)
    other.load_state_dict(memory.state_dict())
    other.add(torch.tensor([[99.0]]), torch.tensor([0]), task_id=0)
    assert other.x[0, 0].item() == 99 and other.x[1, 0].item() == 5


def test_jax_class_ring_by_hand():
    memory = jax_memory.ReplayMemory("class_ring", (1,), num_outputs=4, per_class=2,
                                     task_classes=RING_TASK_CLASSES)
    assert memory.capacity == 8
    mem = jax.tree_util.tree_map(jnp.asarray, memory.init())
    key = jax.random.PRNGKey(0)
    for task, ids, labels in RING_BATCHES:
        # A padded batch: two extra rows of weight 0 that must not be offered.
        x = jnp.asarray(ids + [77, 78], jnp.float32)[:, None]
        y = jnp.asarray(labels + [labels[0], labels[0]], jnp.int32)
        valid = jnp.asarray([True] * len(ids) + [False, False])
        mem = memory.insert(mem, key, x, y, jnp.int32(task), valid)
    filled = np.asarray(mem["filled"][:8]).tolist()
    assert filled == [s in RING_EXPECTED for s in range(8)] and memory.size(mem) == 7
    for s, i in RING_EXPECTED.items():
        assert float(mem["x"][s, 0]) == i and int(mem["t"][s]) == (0 if s < 4 else 1)
    for k in range(10):
        slots, valid = memory.sample(mem, jax.random.PRNGKey(k), 8, before_task=1)
        assert sorted(np.asarray(slots)[np.asarray(valid)].tolist()) == [0, 1, 2, 3]
    slots, valid = memory.sample(mem, key, 8)
    assert sorted(np.asarray(slots)[np.asarray(valid)].tolist()) == sorted(RING_EXPECTED)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_agem_class_ring_from_the_config(backend):
    stream = cifar_like_stream(num_tasks=3)
    algo = {"mem_policy": "class_ring", "mem_per_class": 3}
    if backend == "torch":
        memory = torch_memory_of(torch_learner("agem", stream, **algo))
    else:
        memory = jax_learner("agem", stream, algo=algo).parts[0].memory
    assert memory.policy == "class_ring" and memory.capacity == 3 * 2 * 3


@pytest.mark.parametrize("algo, words", [
    ({"name": "agem", "mem_policy": "class_ring"}, ["algo.mem_per_class"]),
    ({"name": "er", "mem_per_class": 5}, ["'algo.mem_per_class'", "mem_policy=class_ring"]),
    ({"name": "der", "mem_policy": "class_ring", "mem_per_class": 0}, ["'algo.mem_per_class' must be a positive"]),
])
def test_class_ring_config_errors_name_the_key(algo, words):
    with pytest.raises(ConfigError) as ei:
        validate_config({"algo": algo})
    for w in words:
        assert w in str(ei.value)


# -- point: GDumb's re-initialisation follows backbone.init -------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_gdumb_reinitialisation_respects_xavier_init(backend):
    """Glorot-uniform weights (bound sqrt(6 / (fan_in + fan_out))) and zero biases after every
    re-initialisation, not PyTorch's default (biases U(+-1/sqrt(fan_in)))."""
    stream = cifar_like_stream()
    sections = {"algo": {"name": "gdumb", "mem_size": 8, "epochs": 1},
                "backbone": {"width": 16, "n_hidden_layers": 1, "init": "xavier_uniform"}}
    if backend == "torch":
        cfg = validate_config(sections)[0]
        learner = torch_backend.build_learner(cfg, stream, torch.device("cpu"), 0)
        linears = [m for m in learner.model.modules() if isinstance(m, torch.nn.Linear)]
        before = [m.weight.detach().clone() for m in linears]
        learner.reinitialize()
        assert all(not torch.equal(w, m.weight) for w, m in zip(before, linears))  # new draws
        layers = [(m.weight.detach().numpy().T, m.bias.detach().numpy()) for m in linears]  # (in, out)
    else:
        cfg = validate_config({"backend": {"name": "jax"}, **sections})[0]
        learner = jax_backend.build_learner(cfg, stream, jax_backend.resolve_device("cpu"), 0)
        learner.reinitialize()
        flat = jax.tree_util.tree_leaves_with_path(learner.params)
        kernels = [np.asarray(v) for p, v in flat if "kernel" in jax.tree_util.keystr(p)]
        biases = [np.asarray(v) for p, v in flat if "bias" in jax.tree_util.keystr(p)]
        layers = list(zip(kernels, biases))
    assert len(layers) == 2
    for w, b in layers:
        fan_in, fan_out = w.shape
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.all(b == 0)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound  # uniform up to the bound
        assert abs(float(w.std()) - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3)


# -- GDumb's MNIST MLP: linear layers without bias, each followed by batch norm ------------------------

def test_batch_norm_mlp_by_hand_on_both_backends():
    """backbone.batch_norm: x -> BN(x W1) -> ReLU -> BN(. W2) (GDumb src/models/layers.py FCBlock and
    FinalBlock, no biases). Training normalises with the batch's mean and biased variance and
    moves the running averages by 0.1 towards the mean and the unbiased variance (PyTorch's
    BatchNorm1d); evaluation uses the running averages. Checked against NumPy on both backends."""
    from cl_runner.backends.jax.backbones import build_backbone as jax_build
    from cl_runner.backends.jax.resnet import init_batch_stats
    from cl_runner.backends.torch.backbones import build_backbone as torch_build

    cfg = validate_config({"backbone": {"width": 5, "n_hidden_layers": 1, "batch_norm": True}})[0].backbone
    torch.manual_seed(0)
    tm = torch_build(cfg, (1, 3, 3), 4)
    lin1, lin2 = tm.features[1], tm.head[0]
    assert lin1.bias is None and lin2.bias is None
    assert [type(m).__name__ for m in tm.features] == ["Flatten", "Linear", "BatchNorm1d", "ReLU"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 1, 3, 3)).astype(np.float32)
    w1, w2 = lin1.weight.detach().double().numpy(), lin2.weight.detach().double().numpy()

    def bn(h):
        m, v = h.mean(0), h.var(0)
        return (h - m) / np.sqrt(v + 1e-5), m, h.var(0, ddof=1)

    h1, m1, u1 = bn(x.reshape(6, -1).astype(np.float64) @ w1.T)
    z, m2, u2 = bn(np.maximum(h1, 0) @ w2.T)
    stats = {"m1": 0.1 * m1, "v1": 0.9 + 0.1 * u1, "m2": 0.1 * m2, "v2": 0.9 + 0.1 * u2}
    tm.train()
    np.testing.assert_allclose(tm(torch.as_tensor(x)).detach().numpy(), z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tm.features[2].running_mean.numpy(), stats["m1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tm.features[2].running_var.numpy(), stats["v1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tm.head[1].running_var.numpy(), stats["v2"], rtol=1e-5, atol=1e-6)

    jm = jax_build(cfg, (1, 3, 3), 4)
    ones = lambda n: {"scale": np.ones(n, np.float32), "bias": np.zeros(n, np.float32)}  # noqa: E731
    params = {"features": {"layers_0": {"kernel": w1.T.astype(np.float32)}, "norm_0": ones(5)},
              "head": {"linear": {"kernel": w2.T.astype(np.float32)}, "norm": ones(4)}}
    batch_stats = init_batch_stats(jm, (1, 3, 3))
    out, new = jm.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(out), z, rtol=1e-4, atol=1e-5)
    got = new["batch_stats"]
    np.testing.assert_allclose(np.asarray(got["features"]["norm_0"]["mean"]), stats["m1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["features"]["norm_0"]["var"]), stats["v1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["head"]["norm"]["mean"]), stats["m2"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["head"]["norm"]["var"]), stats["v2"], rtol=1e-5, atol=1e-6)
    # Evaluation: the running averages, the same on both backends.
    tm.eval()
    with torch.no_grad():
        ref = tm(torch.as_tensor(x)).numpy()
    ev = jm.apply({"params": params, "batch_stats": got}, x, train=False)
    np.testing.assert_allclose(np.asarray(ev), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="running averages"):
        jm.apply({"params": params}, x, train=False)


@pytest.mark.parametrize("backbone, words", [
    ({"type": "cnn", "batch_norm": True}, ["'backbone.batch_norm'", "mlp"]),
    ({"batch_norm": True, "head": "incremental"}, ["backbone.batch_norm=true", "backbone.head=fixed"]),
])
def test_batch_norm_mlp_config_errors(backbone, words):
    with pytest.raises(ConfigError) as ei:
        validate_config({"backbone": backbone})
    for w in words:
        assert w in str(ei.value)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_gdumb_retrains_a_batch_norm_mlp_with_crop_only_augmentation(backend):
    """GDumb's MNIST recipe: a batch-norm MLP retrained on the memory with random crops and no
    flip. Re-initialisation resets the running averages too; the retrained model predicts the
    memory's classes well above chance (class-IL, 4 classes)."""
    from test_resnet import colour_stream

    s = colour_stream()
    stream = Stream(name="colour", scenario="class_il", tasks=s.tasks, num_outputs=4, input_shape=s.input_shape,
                    mean=s.mean, std=s.std)
    sections = {"algo": {"name": "gdumb", "mem_size": 40, "epochs": 16, "batch_size": 8},
                "backbone": {"width": 16, "n_hidden_layers": 1, "batch_norm": True},
                "benchmark": {"augment": True, "crop_padding": 1, "augment_flip": False}}
    if backend == "torch":
        learner = torch_backend.build_learner(validate_config(sections)[0], stream, torch.device("cpu"), 0)
        assert learner.augment.flip is False
        norm = learner.model.features[2]
        stats = lambda: (norm.running_mean.numpy().copy(), norm.running_var.numpy().copy())  # noqa: E731
    else:
        cfg = validate_config({"backend": {"name": "jax"}, **sections})[0]
        learner = jax_backend.build_learner(cfg, stream, jax_backend.resolve_device("cpu"), 0)
        assert learner._augment[2] is False

        def stats():
            s = learner.parts[learner._stats_index].state["features"]["norm_0"]
            return np.asarray(s["mean"]).copy(), np.asarray(s["var"]).copy()
    for task in stream.tasks:
        learner.on_before_task(task)
        learner.train_epoch(task, 0)
        learner.on_after_training(task)
        learner.on_after_task(task)
    mean, var = stats()
    assert np.abs(mean).max() > 1e-3 and np.abs(var - 1).max() > 1e-3  # trained
    accs = learner.evaluate(stream.tasks)
    assert np.mean(list(accs.values())) > 60.0  # chance: 25
    learner.reinitialize()
    mean, var = stats()
    assert np.all(mean == 0) and np.all(var == 1)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_augment_flip_false_crops_without_mirroring(backend):
    """benchmark.augment_flip=false: every training input is a padded window of its image, never a
    mirrored one (GDumb's MNIST transform: RandomCrop only, src/dataloader.py:112-128)."""
    stream = cifar_like_stream(num_tasks=1, n_train=16)
    sections = {"algo": {"name": "naive"}, "backbone": {"width": 8},
                "benchmark": {"batch_size": 16, "augment": True, "crop_padding": PAD, "augment_flip": False}}
    if backend == "torch":
        learner = torch_backend.build_learner(validate_config(sections)[0], stream, torch.device("cpu"), 0)
        learner.on_before_task(stream.tasks[0])
        clean = learner.train_x.numpy()
        out = np.concatenate([learner.augment(learner.train_x).numpy() for _ in range(8)])
    else:
        from cl_runner.backends.jax.augment import random_crop_flip

        cfg = validate_config({"backend": {"name": "jax"}, **sections})[0]
        learner = jax_backend.build_learner(cfg, stream, jax_backend.resolve_device("cpu"), 0)
        learner.on_before_task(stream.tasks[0])
        clean = np.asarray(learner.train_x)
        out = np.concatenate([np.asarray(random_crop_flip(jax.random.PRNGKey(k), learner.train_x, *learner._augment))
                              for k in range(8)])
    shifted = 0
    for i, row in enumerate(out):
        k = window_index(row, clean[i % 16])
        assert k % 2 == 0  # even indices of windows() are the unmirrored crops
        shifted += k != 2 * (PAD * (2 * PAD + 1) + PAD)  # not the centred, unshifted window
    assert shifted > len(out) // 2
