"""LwF's and LfL's reference behaviours on both backends, each against a NumPy computation of the
formula the reference code runs: the per-task weights (a list, the tasks_seen and classes_seen
rules), van de Ven & Tolias's distillation (softmax over the seen units, mean over units, T^2,
mean over heads), the cross-entropy over the seen classes, Mammoth's warm-up of the new output
units and its previous model's inputs (before augmentation and normalisation), LfL's two feature distances and its dropout-free feature pass, and the errors for keys that
do not fit the stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_runner import catalog
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.config import validate_config
from cl_runner.errors import ConfigError

torch_backend = catalog.load_backend("torch")

CPU = torch.device("cpu")


# -- helpers ------------------------------------------------------------------------------------------

def stream_of(scenario: str, classes_per_task=(2, 2, 2), n_train=12, side=4, seed=0) -> Stream:
    """Random small images; class-IL / task-IL tasks own consecutive units (``classes_per_task``
    of them), domain-IL tasks share two."""
    rng = np.random.default_rng(seed)
    tasks, offset = [], 0
    for t, k in enumerate(classes_per_task):
        classes = np.arange(2) if scenario == "domain_il" else np.arange(offset, offset + k)
        offset += 0 if scenario == "domain_il" else k
        x = rng.integers(0, 256, (n_train, 1, side, side), dtype=np.uint8)
        y = rng.choice(classes, n_train).astype(np.int64)
        tasks.append(Task(id=t, train_x=x, train_y=y, test_x=x, test_y=y, classes=classes))
    outputs = 2 if scenario == "domain_il" else offset
    return Stream(name="synthetic", scenario=scenario, tasks=tasks, num_outputs=outputs,
                  input_shape=(1, side, side), mean=(0.5,), std=(0.25,))


def config(backend, name, algo=None, backbone=None, benchmark=None, **sections):
    cfg = {"backend": {"name": backend}, "algo": {"name": name, **(algo or {})},
           "backbone": {"width": 5, "n_hidden_layers": 1, **(backbone or {})},
           "benchmark": {"batch_size": 8, **(benchmark or {})}, **sections}
    return validate_config(cfg)[0]


def torch_learner(stream, name, seed=0, **sections):
    torch.manual_seed(seed)
    return torch_backend.build_learner(config("torch", name, **sections), stream, CPU, seed)


def jax_learner(stream, name, seed=0, **sections):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    jax_backend = catalog.load_backend("jax")
    return jax_backend.build_learner(config("jax", name, **sections), stream,
                                     jax_backend.resolve_device("cpu"), seed)


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def cross_entropy(z, y, units):
    """Mean over the batch of -log softmax(z[:, units])[y] (y: indices into all units)."""
    pos = {u: i for i, u in enumerate(units)}
    return float(np.mean([-log_softmax(z[n, units])[pos[int(y[n])]] for n in range(len(y))]))


def kd(z, z_old, teacher_units, student_units, T, unit_mean=False):
    """Per sample -sum_{j in teacher} softmax(z_old[teacher] / T)_j log softmax(z[student] / T)_j,
    divided by |student| with ``unit_mean``; the batch mean."""
    p = softmax(z_old[:, teacher_units] / T)
    logq = log_softmax(z[:, student_units] / T)
    cols = [list(student_units).index(u) for u in teacher_units]
    per_sample = -(p * logq[:, cols]).sum(1)
    if unit_mean:
        per_sample = per_sample / len(student_units)
    return float(per_sample.mean())


def perturb_torch(learner, scale=0.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def perturb_jax(learner, scale=0.5, seed=1):
    import jax

    leaves, tree = jax.tree_util.tree_flatten(learner.params)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(v) + scale * rng.standard_normal(np.shape(v)).astype(np.float32) for v in leaves]
    learner.params = learner.put(jax.tree_util.tree_unflatten(tree, leaves))


def torch_total_loss(learner, task, n=8):
    """(total loss of the LwF step on the task's first n samples, logits, previous logits, labels)."""
    x = learner.train_x[:n]
    y = learner.train_y[:n]
    t = learner.train_t[:n] if learner.train_t is not None else None
    z = learner.model(x)
    loss = learner.criterion(z, y, t)
    extra = learner.parts[0].extra_loss(x, y, z)
    if extra is not None:
        loss = loss + extra
    part = learner.parts[0]
    z_old = part.teacher(x) if part.teacher is not None else z
    return float(loss.detach()), z.detach().numpy(), z_old.detach().numpy(), y.numpy()


def jax_total_loss(learner, task, n=8):
    x = learner.train_x[:n]
    y = learner.train_y[:n]
    t = learner.train_t[:n] if learner.train_t is not None else None
    states = tuple(p.state for p in learner.parts)
    z = learner.model.apply({"params": learner.params}, x, train=False)
    loss = learner.loss_from_logits(learner.params, states, x, y, t, None, learner.mask_table, z)
    z_old = learner.model.apply({"params": states[0]["teacher"]}, x, train=False)
    return float(loss), np.asarray(z), np.asarray(z_old), np.asarray(y)


BACKENDS = {"torch": (torch_learner, perturb_torch, torch_total_loss),
            "jax": (jax_learner, perturb_jax, jax_total_loss)}


# -- LwF: per-task weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("rule", ["constant", "tasks_seen", "classes_seen"])
def test_lwf_weights_per_task_by_hand(backend, rule):
    """Class-IL tasks of 3, 1 and 2 classes (units 0-2, 3, 4-5), alpha = [9, 0.5, 2] (entry t while
    task t trains; entry 0 is never used). Task 1: 3 old units of 4 seen, task 2: 4 of 6.
    constant: CE + alpha_t KD; tasks_seen: CE / (t+1) + (1 - 1/(t+1)) alpha_t KD (van de Ven &
    Tolias); classes_seen: (n_new/n_seen) CE + (n_old/n_seen) alpha_t KD (BiC / FACIL)."""
    make, perturb, total = BACKENDS[backend]
    stream = stream_of("class_il", (3, 1, 2))
    learner = make(stream, "lwf", algo={"alpha": [9.0, 0.5, 2.0], "alpha_rule": rule, "temperature": 2.0})
    weights = {"constant": {1: (1, 1), 2: (1, 1)}, "tasks_seen": {1: (1 / 2, 1 / 2), 2: (1 / 3, 2 / 3)},
               "classes_seen": {1: (1 / 4, 3 / 4), 2: (2 / 6, 4 / 6)}}[rule]
    alpha = {1: 0.5, 2: 2.0}
    old_units = {1: [0, 1, 2], 2: [0, 1, 2, 3]}
    learner.on_before_task(stream.tasks[0])
    loss, z, _, y = total(learner, stream.tasks[0])
    assert loss == pytest.approx(cross_entropy(z, y, list(range(6))), rel=1e-5)  # no previous model yet
    learner.on_after_task(stream.tasks[0])
    for t in (1, 2):
        learner.on_before_task(stream.tasks[t])
        perturb(learner, seed=t)
        loss, z, z_old, y = total(learner, stream.tasks[t])
        w_ce, w_kd = weights[t]
        expected = (w_ce * cross_entropy(z, y, list(range(6)))
                    + w_kd * alpha[t] * kd(z, z_old, old_units[t], old_units[t], 2.0))
        assert loss == pytest.approx(expected, rel=1e-5), (rule, t)
        learner.on_after_task(stream.tasks[t])


# -- LwF: van de Ven & Tolias's distillation ----------------------------------------------------------

@pytest.mark.parametrize("backend", list(BACKENDS))
def test_lwf_van_de_ven_class_il_by_hand(backend):
    """Class-IL, task 2 of four 2-class tasks, with van de Ven & Tolias's settings: the
    cross-entropy over the 6 classes seen so far (units 6-7 belong to task 3, not yet started);
    the current model's distillation softmax over the same 6 units, the targets the previous
    model's softmax over the 4 old units and 0 on units 4-5; the per-sample term divided by the 6
    units and multiplied by T^2; the rule tasks_seen (CE / 3 + 2/3 KD)."""
    make, perturb, total = BACKENDS[backend]
    stream = stream_of("class_il", (2, 2, 2, 2))
    T = 2.0
    learner = make(stream, "lwf", algo={"alpha_rule": "tasks_seen", "temperature": T, "temperature_squared": True,
                                        "kd_reduction": "mean", "distill_units": "seen", "ce_units": "seen"})
    for t in range(3):
        learner.on_before_task(stream.tasks[t])
        if t < 2:
            learner.on_after_task(stream.tasks[t])
    perturb(learner)
    loss, z, z_old, y = total(learner, stream.tasks[2])
    seen, old = list(range(6)), list(range(4))
    expected = (cross_entropy(z, y, seen) / 3
                + (2 / 3) * T ** 2 * kd(z, z_old, old, seen, T, unit_mean=True))
    assert loss == pytest.approx(expected, rel=1e-5)
    # The defaults (old units, sum, no T^2, every unit in the CE) give a different number.
    default = cross_entropy(z, y, list(range(8))) + kd(z, z_old, old, old, T)
    assert abs(default - expected) > 1e-2


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("head_reduction", ["sum", "mean"])
def test_lwf_task_il_heads_by_hand(backend, head_reduction):
    """Task-IL, task 2 of three 2-unit tasks: the previous model's heads 0 and 1, each its own
    softmax, kd_reduction=mean (each term divided by its 2 units), summed or averaged over the two
    heads (van de Ven & Tolias average them); the cross-entropy over task 2's units."""
    make, perturb, total = BACKENDS[backend]
    stream = stream_of("task_il", (2, 2, 2))
    learner = make(stream, "lwf", algo={"alpha": 1.5, "temperature": 3.0, "kd_reduction": "mean",
                                        "head_reduction": head_reduction})
    for t in range(3):
        learner.on_before_task(stream.tasks[t])
        if t < 2:
            learner.on_after_task(stream.tasks[t])
    perturb(learner)
    loss, z, z_old, y = total(learner, stream.tasks[2])
    heads = [kd(z, z_old, [0, 1], [0, 1], 3.0, unit_mean=True), kd(z, z_old, [2, 3], [2, 3], 3.0, unit_mean=True)]
    distil = sum(heads) / (2 if head_reduction == "mean" else 1)
    assert loss == pytest.approx(cross_entropy(z, y, [4, 5]) + 1.5 * distil, rel=1e-5)


# -- LwF: Mammoth's warm-up -----------------------------------------------------------------------------

def warm_up_by_hand(feats, W, b, y, new_units, lr, epochs):
    """Full-batch plain SGD on the output layer's rows of ``new_units`` (W: (units, d)), the
    cross-entropy over those units: what the warm-up does when one batch holds the whole task."""
    W, b = W.copy(), b.copy()
    onehot = np.eye(len(new_units))[[new_units.index(int(c)) for c in y]]
    for _ in range(epochs):
        p = softmax(feats @ W[new_units].T + b[new_units])
        g = (p - onehot) / len(y)
        W[new_units] -= lr * g.T @ feats
        b[new_units] -= lr * g.sum(0)
    return W, b


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_lwf_warm_up_trains_only_the_new_units_by_hand(backend):
    """Before task 1 (class-IL, units 2-3 new), two warm-up epochs at lr 0.5 with one batch per
    epoch (batch 16 >= 12 samples): the new units' rows follow two full-batch SGD steps computed
    from the eval-mode features (the backbone has dropout 0.5, which must be off); the features and
    the old units do not move; the previous model is the one from before the warm-up."""
    stream = stream_of("class_il", (2, 2))
    sections = dict(algo={"warmup_epochs": 2, "warmup_lr": 0.5}, backbone={"dropout": 0.5, "width": 5},
                    benchmark={"batch_size": 16})
    if backend == "torch":
        learner = torch_learner(stream, "lwf", **sections)
        learner.on_before_task(stream.tasks[0])  # no warm-up before the first task
        learner.on_after_task(stream.tasks[0])
        perturb_torch(learner)
        model = learner.model
        model.eval()
        x = learner.to_input(stream.tasks[1].train_x)
        with torch.no_grad():
            feats = model.features(x).numpy()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        W, b = model.head.weight.detach().numpy().copy(), model.head.bias.detach().numpy().copy()
        model.train()
        learner.on_before_task(stream.tasks[1])
        assert model.training
        W_after, b_after = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
        for k, v in learner.parts[0].teacher.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        for k, v in model.features.state_dict().items():
            torch.testing.assert_close(v, before["features." + k], rtol=0, atol=0)
    else:
        learner = jax_learner(stream, "lwf", **sections)
        learner.on_before_task(stream.tasks[0])
        learner.on_after_task(stream.tasks[0])
        perturb_jax(learner)
        params = learner.params
        x = learner.to_input(stream.tasks[1].train_x)
        feats = np.asarray(learner.model.apply({"params": params}, x, train=False, method="embed"))
        W, b = np.asarray(params["head"]["kernel"]).T.copy(), np.asarray(params["head"]["bias"]).copy()
        learner.on_before_task(stream.tasks[1])
        W_after = np.asarray(learner.params["head"]["kernel"]).T
        b_after = np.asarray(learner.params["head"]["bias"])
        teacher = learner.parts[0].state["teacher"]
        import jax

        for a, c in zip(jax.tree_util.tree_leaves(teacher), jax.tree_util.tree_leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        for a, c in zip(jax.tree_util.tree_leaves({k: v for k, v in learner.params.items() if k != "head"}),
                        jax.tree_util.tree_leaves({k: v for k, v in params.items() if k != "head"})):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    W_hand, b_hand = warm_up_by_hand(feats, W, b, stream.tasks[1].train_y, [2, 3], 0.5, 2)
    np.testing.assert_array_equal(W_after[:2], W[:2])
    np.testing.assert_array_equal(b_after[:2], b[:2])
    np.testing.assert_allclose(W_after, W_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b_after, b_hand, rtol=1e-5, atol=1e-6)
    assert np.abs(W_after[2:] - W[2:]).max() > 1e-3  # the warm-up did move the new units


# -- LwF: what the previous model sees ----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("teacher_inputs", ["batch", "not_aug"])
def test_lwf_teacher_inputs_by_hand(backend, teacher_inputs, monkeypatch):
    """One training step of task 1 (class-IL, 2 + 2 classes, the 12 samples in one batch) with
    benchmark.augment on, its random crop replaced by a left-right mirror so that the step is
    known. The step's loss is CE(z) + 1.5 KD(z, z_old), z the current model's logits on the
    mirrored normalised images; z_old the previous model's logits on the same inputs (batch), or on
    the images before the mirror and before normalisation, pixel / 255 (not_aug: Mammoth's
    begin_task records them on not_aug_img, ToTensor() alone). The stream normalises with mean
    0.5, std 0.25, so the two differ."""
    stream = stream_of("class_il", (2, 2))
    sections = dict(algo={"alpha": 1.5, "teacher_inputs": teacher_inputs},
                    benchmark={"batch_size": 12, "augment": True})
    task = stream.tasks[1]
    pixels = task.train_x.astype(np.float32) / 255.0
    normalised = (pixels - 0.5) / 0.25
    mirrored = np.ascontiguousarray(normalised[..., ::-1])
    if backend == "torch":
        learner = torch_learner(stream, "lwf", **sections)
        learner.augment = lambda x: x.flip(-1)
        learner.on_before_task(stream.tasks[0])
        learner.on_after_task(stream.tasks[0])
        learner.on_before_task(task)
        perturb_torch(learner)
        with torch.no_grad():
            z = learner.model(torch.from_numpy(mirrored)).numpy()
            teacher = learner.parts[0].teacher
            z_old = {"batch": teacher(torch.from_numpy(mirrored)).numpy(),
                     "not_aug": teacher(torch.from_numpy(pixels)).numpy()}
    else:
        import cl_runner.backends.jax.learner as jax_learner_module

        monkeypatch.setattr(jax_learner_module, "random_crop_flip", lambda key, x, *settings: x[..., ::-1])
        learner = jax_learner(stream, "lwf", **sections)
        learner.on_before_task(stream.tasks[0])
        learner.on_after_task(stream.tasks[0])
        learner.on_before_task(task)
        perturb_jax(learner)
        apply = learner.model.apply
        z = np.asarray(apply({"params": learner.params}, mirrored, train=False))
        teacher = learner.parts[0].state["teacher"]
        z_old = {"batch": np.asarray(apply({"params": teacher}, mirrored, train=False)),
                 "not_aug": np.asarray(apply({"params": teacher}, pixels, train=False))}
    y = task.train_y
    expected = {k: cross_entropy(z, y, [0, 1, 2, 3]) + 1.5 * kd(z, v, [0, 1], [0, 1], 2.0) for k, v in z_old.items()}
    assert abs(expected["batch"] - expected["not_aug"]) > 1e-3
    loss = learner.train_epoch(task, 0)["loss"]
    assert loss == pytest.approx(expected[teacher_inputs], rel=1e-5)


# -- LwF: keys that do not fit the stream ---------------------------------------------------------------

@pytest.mark.parametrize("scenario,algo,match", [
    ("class_il", {"alpha": [1.0, 2.0]}, "lists 2 values but the stream has 3 tasks"),
    ("task_il", {"distill_units": "seen"}, "distill_units=seen is defined for class-IL"),
    ("domain_il", {"ce_units": "seen"}, "ce_units=seen is defined for class-IL"),
    ("class_il", {"head_reduction": "mean"}, "head_reduction=mean averages the heads of a task-IL"),
    ("domain_il", {"alpha_rule": "classes_seen"}, "alpha_rule=classes_seen"),
    ("domain_il", {"warmup_epochs": 1}, "warmup_epochs trains the new task's output units"),
])
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_lwf_keys_that_do_not_fit_the_stream_are_errors(scenario, algo, match, backend):
    make = torch_learner if backend == "torch" else jax_learner
    with pytest.raises(ConfigError, match=match):
        make(stream_of(scenario), "lwf", algo=algo)


@pytest.mark.parametrize("algo,match", [
    ({"alpha_rule": "grow"}, "algo.alpha_rule: 'grow' is not one of constant, tasks_seen, classes_seen"),
    ({"alpha": "big"}, "'algo.alpha' must be a number or a list of numbers"),
    ({"alpha": [1.0, -1.0]}, "'algo.alpha' must be >= 0"),
    ({"kd_reduction": "max"}, "algo.kd_reduction"),
    ({"teacher_inputs": "raw"}, "algo.teacher_inputs: 'raw' is not one of batch, not_aug"),
    ({"warmup_epochs": -1}, "'algo.warmup_epochs' must be >= 0"),
    ({"warmup_lr": 0.0}, "'algo.warmup_lr' must be positive"),
])
def test_lwf_bad_values_are_config_errors(algo, match):
    with pytest.raises(ConfigError, match=match):
        config("torch", "lwf", algo=algo)


# -- LfL --------------------------------------------------------------------------------------------------

def lfl_penalty(backend, learner):
    """(the part's penalty on the task's first 8 samples, current eval-mode features, previous ones)."""
    part = learner.parts[0]
    if backend == "torch":
        x = learner.train_x[:8]
        learner.model.train()
        loss = float(part.extra_loss(x, None, learner.model(x)))
        assert learner.model.features.training  # the eval-mode feature pass leaves the mode as it was
        learner.model.eval()
        with torch.no_grad():
            f, g = learner.model.features(x).numpy(), part.old_features(x).numpy()
        learner.model.train()
        return loss, f, g
    x = learner.train_x[:8]
    params, state = learner.params, part.state
    z = learner.model.apply({"params": params}, x, train=False)
    loss = float(part.extra_loss(params, state, x, None, z, None))
    f = np.asarray(learner.model.apply({"params": params}, x, train=False, method="embed"))
    g = np.asarray(learner.model.apply({"params": state["teacher"]}, x, train=False, method="embed"))
    return loss, f, g


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("distance", ["half_sq", "mse"])
def test_lfl_feature_distances_and_lambda_per_task_by_hand(backend, distance):
    """lambda_e = [7, 0.3]: task 1 uses 0.3. half_sq: 0.3 * mean_n 1/2 sum_d (f - g)^2 (the paper);
    mse: 0.3 * mean_{n,d} (f - g)^2 (Avalanche, SequeL), D = 5 features. The two agree when
    half_sq's lambda_e is 2/D times mse's."""
    stream = stream_of("domain_il", (2, 2))
    make = torch_learner if backend == "torch" else jax_learner
    perturb = perturb_torch if backend == "torch" else perturb_jax
    learner = make(stream, "lfl", algo={"lambda_e": [7.0, 0.3], "feature_distance": distance},
                   backbone={"width": 5, "dropout": 0.5})
    learner.on_before_task(stream.tasks[0])
    learner.on_after_task(stream.tasks[0])
    learner.on_before_task(stream.tasks[1])
    loss0, _, _ = lfl_penalty(backend, learner)
    assert loss0 == 0.0  # at the previous model's weights, with dropout in the backbone: no dropout in f
    perturb(learner)
    loss, f, g = lfl_penalty(backend, learner)
    sq = (f - g) ** 2
    expected = 0.5 * sq.sum(1).mean() if distance == "half_sq" else sq.mean()
    assert loss == pytest.approx(0.3 * expected, rel=1e-5)
    assert 0.5 * sq.sum(1).mean() * (2 / 5) == pytest.approx(sq.mean(), rel=1e-6)  # the conversion


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_lfl_lambda_list_length_and_distance_are_checked(backend):
    make = torch_learner if backend == "torch" else jax_learner
    with pytest.raises(ConfigError, match="'algo.lambda_e' lists 3 values but the stream has 2 tasks"):
        make(stream_of("domain_il", (2, 2)), "lfl", algo={"lambda_e": [1.0, 2.0, 3.0]})
    with pytest.raises(ConfigError, match="algo.feature_distance: 'l1' is not one of half_sq, mse"):
        config(backend, "lfl", algo={"feature_distance": "l1"})
