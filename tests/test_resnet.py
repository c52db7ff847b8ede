"""ResNet-18 (CIFAR stem, BasicBlocks [2,2,2,2], batch norm) on both backends: the published
parameter counts, shapes, the same function on both backends, and batch-norm state in the JAX
learner."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cl_runner import catalog
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.config import validate_config
from cl_runner.core.loop import ContinualLoop
from cl_runner.errors import ConfigError

jax_backend = catalog.load_backend("jax")
torch_backend = catalog.load_backend("torch")
from cl_runner.backends.jax.backbones import build_backbone as jax_backbone  # noqa: E402
from cl_runner.backends.jax.backbones import init_params  # noqa: E402
from cl_runner.backends.jax.resnet import init_batch_stats  # noqa: E402
from cl_runner.backends.torch.backbones import build_backbone as torch_backbone  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: one thread is fastest, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resnet_cfg(backend="torch", **backbone):
    cfg = {"backend": {"name": backend}, "algo": {"name": "naive"},
           "backbone": {"type": "resnet18", **backbone}, "benchmark": {"batch_size": 16}}
    return validate_config(cfg)[0]


def hand_count(nf: int, k: int, cin: int = 3) -> int:
    """Parameters of the CIFAR ResNet-18 by hand: 3x3 convs without bias, batch norm (scale and
    shift per channel) after each, 1x1 conv + BN shortcuts where a stage starts, a k-way head."""
    total = cin * nf * 9 + 2 * nf                      # stem conv + BN
    c = nf
    for stage in range(4):
        out = nf * 2 ** stage
        for block in range(2):
            total += c * out * 9 + 2 * out + out * out * 9 + 2 * out
            if c != out:                               # the first block of stages 2-4
                total += c * out + 2 * out
            c = out
    return total + 8 * nf * k + k


def torch_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def jax_count(params) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(params)))


def test_parameter_counts_match_the_published_architecture():
    full = resnet_cfg(nf=64).backbone
    assert torch_count(torch_backbone(full, (3, 32, 32), 10)) == 11_173_962   # the CIFAR ResNet-18
    assert hand_count(64, 10) == 11_173_962
    reduced = resnet_cfg(nf=20).backbone
    for k in (10, 100):
        expected = hand_count(20, k)
        assert torch_count(torch_backbone(reduced, (3, 32, 32), k)) == expected
        model = jax_backbone(reduced, (3, 32, 32), k)
        assert jax_count(init_params(model, (3, 32, 32), 0)) == expected
    assert hand_count(20, 100) == 1_094_750 + 90 * 161  # 10 -> 100 outputs adds 90 * (160 + 1)
    model = jax_backbone(full, (3, 32, 32), 10)
    assert jax_count(init_params(model, (3, 32, 32), 0)) == 11_173_962
    # Batch-norm running averages are state, not parameters: a mean and a variance per channel.
    channels = 20 * (1 + 2 * 2 + 2 * 2 * 2 + 4 * 2 * 2 + 8 * 2 * 2) + 20 * (2 + 4 + 8)
    stats = init_batch_stats(jax_backbone(reduced, (3, 32, 32), 10), (3, 32, 32))
    assert jax_count(stats) == 2 * channels


@pytest.mark.parametrize("side", [32, 64])
def test_forward_backward_shapes_on_both_backends(side):
    cfg = resnet_cfg(nf=4).backbone
    x = np.random.default_rng(0).standard_normal((3, 3, side, side)).astype(np.float32)
    tm = torch_backbone(cfg, (3, side, side), 7)
    out = tm(torch.as_tensor(x))
    assert out.shape == (3, 7) and tm.features(torch.as_tensor(x)).shape == (3, 32)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tm.parameters())
    jm = jax_backbone(cfg, (3, side, side), 7)
    params = init_params(jm, (3, side, side), 0)
    stats = init_batch_stats(jm, (3, side, side))

    def loss(p):
        y, _ = jm.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y ** 2), y

    grads, y = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert y.shape == (3, 7)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))


def torch_to_jax(model, params_like, stats_like):
    """The PyTorch ResNet's weights and running averages as JAX trees."""
    params = jax.tree_util.tree_map(np.array, params_like)
    stats = jax.tree_util.tree_map(np.array, stats_like)

    def node(tree, name):
        parts = name.split(".")
        if parts[0] == "head":
            return tree["head"], parts[1:]
        path = ["features"]
        parts = parts[1:]
        if parts[0].startswith("layer") and len(parts) > 2:
            path.append(f"{parts[0]}_{parts[1]}")
            parts = parts[2:]
            if parts[0] == "shortcut":
                parts = [("shortcut_conv" if parts[1] == "0" else "shortcut_bn"), *parts[2:]]
        for key in path:
            tree = tree[key]
        return tree[parts[0]], parts[1:]

    for name, value in list(model.named_parameters()) + list(model.named_buffers()):
        v = value.detach().numpy().copy()  # not a view: the torch buffers move in training
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith(("running_mean", "running_var")):
            leaf, _ = node(stats, name)
            leaf["mean" if name.endswith("mean") else "var"] = v
            continue
        leaf, _ = node(params, name)
        if name.endswith("weight") and v.ndim == 4:
            leaf["kernel"] = v.transpose(2, 3, 1, 0)
        elif name.startswith("head"):
            leaf["kernel" if name.endswith("weight") else "bias"] = v.T if v.ndim == 2 else v
        else:  # batch norm
            leaf["scale" if name.endswith("weight") else "bias"] = v
    return params, stats


@pytest.mark.parametrize("conv_impl", ["lax", "im2col"])
def test_jax_resnet_computes_the_torch_function(conv_impl):
    cfg = resnet_cfg(nf=4).backbone
    torch.manual_seed(0)
    tm = torch_backbone(cfg, (3, 32, 32), 5)
    with torch.no_grad():  # non-trivial batch-norm parameters and statistics
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    jm = jax_backbone(cfg, (3, 32, 32), 5, conv_impl=conv_impl)
    params, stats = torch_to_jax(tm, init_params(jm, (3, 32, 32), 0), init_batch_stats(jm, (3, 32, 32)))
    x = np.random.default_rng(1).standard_normal((6, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected_eval = tm.eval()(torch.as_tensor(x)).numpy()
        old_mean = tm.features.layer2[0].bn1.running_mean.clone().numpy()
        expected_train = tm.train()(torch.as_tensor(x)).numpy()
    got_eval = jm.apply({"params": params, "batch_stats": stats}, x, train=False)
    np.testing.assert_allclose(np.asarray(got_eval), expected_eval, rtol=1e-4, atol=1e-4)
    got_train, upd = jm.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(got_train), expected_train, rtol=1e-4, atol=1e-4)
    # Running averages move as PyTorch's (momentum 0.1).
    new_mean = np.asarray(upd["batch_stats"]["features"]["layer2_0"]["bn1"]["mean"])
    torch_mean = tm.features.layer2[0].bn1.running_mean.numpy()
    assert not np.allclose(new_mean, old_mean)
    np.testing.assert_allclose(new_mean, torch_mean, rtol=1e-4, atol=1e-5)


def test_bad_resnet_keys_are_config_errors():
    with pytest.raises(ConfigError, match="backbone.precision.*fp16.*fp32, bf16"):
        torch_backbone(resnet_cfg(precision="fp16").backbone, (3, 32, 32), 10)
    with pytest.raises(ConfigError, match="backbone.nf"):
        jax_backbone(resnet_cfg(nf=0).backbone, (3, 32, 32), 10)
    # Applying the JAX model without its batch-norm running averages names the problem.
    jm = jax_backbone(resnet_cfg(nf=2).backbone, (3, 8, 8), 4)
    with pytest.raises(ConfigError, match="without its running averages.*backend=torch"):
        jm.apply({"params": init_params(jm, (3, 8, 8), 0)}, np.zeros((1, 3, 8, 8), np.float32))


def test_bf16_runs_and_returns_float32_logits():
    cfg = resnet_cfg(nf=4, precision="bf16").backbone
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    out = torch_backbone(cfg, (3, 32, 32), 10)(torch.as_tensor(x))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    jm = jax_backbone(cfg, (3, 32, 32), 10)
    y = jm.apply({"params": init_params(jm, (3, 32, 32), 0), "batch_stats": init_batch_stats(jm, (3, 32, 32))},
                 x, train=False)
    assert y.dtype == jnp.float32 and bool(jnp.isfinite(y).all())


def colour_stream(num_tasks=2, n_train=64, n_test=48, side=8, seed=0) -> Stream:
    """Task-IL tasks of 2 classes; class c is a bright square whose place depends on c."""
    rng = np.random.default_rng(seed)
    tasks = []
    for t in range(num_tasks):
        cls = np.array([2 * t, 2 * t + 1])

        def make(n):
            y = rng.choice(cls, n)
            x = rng.integers(0, 60, (n, 3, side, side)).astype(np.uint8)
            for c in cls:
                r = (c % 2) * (side // 2)
                x[y == c, c % 3, r:r + side // 2, : side // 2] = 250
            return x, y.astype(np.int64)

        (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
        tasks.append(Task(id=t, train_x=xtr, train_y=ytr, test_x=xte, test_y=yte, classes=cls))
    return Stream(name="colour", scenario="task_il", tasks=tasks, num_outputs=2 * num_tasks,
                  input_shape=(3, side, side), mean=(0.2, 0.2, 0.2), std=(0.3, 0.3, 0.3))


def test_jax_learner_carries_batch_norm_statistics():
    stream = colour_stream()
    cfg = validate_config({"backend": {"name": "jax"}, "algo": {"name": "naive"},
                           "backbone": {"type": "resnet18", "nf": 4},
                           "benchmark": {"batch_size": 16, "augment": True, "crop_padding": 2},
                           "optimizer": {"lr": 0.05}, "training": {"epochs_per_task": 5}})[0]
    jl = jax_backend.build_learner(cfg, stream, jax_backend.resolve_device("cpu"), 0)
    stats0 = jax.tree_util.tree_map(np.array, jl.parts[jl._stats_index].state)
    state = ContinualLoop(jl, stream, epochs_per_task=5).run()
    stats = jl.parts[jl._stats_index].state
    mean = np.asarray(stats["features"]["bn1"]["mean"])
    assert np.abs(mean - stats0["features"]["bn1"]["mean"]).max() > 1e-3  # updated in training
    assert float(np.asarray(state.acc_matrix)[-1].mean()) > 75.0          # task-IL chance: 50
    # Evaluation uses the running averages: it does not depend on the batches it is split into.
    accs = jl.evaluate(stream.tasks)
    jl._test_cache.clear()
    jl.eval_batch_size = 5
    assert jl.evaluate(stream.tasks) == accs
    # The statistics are in the checkpoint and restored from it.
    saved = jl.state_dict()
    jl.parts[jl._stats_index].state = jax.tree_util.tree_map(jnp.zeros_like, stats)
    jl.load_state_dict(saved)
    np.testing.assert_array_equal(np.asarray(jl.parts[jl._stats_index].state["features"]["bn1"]["mean"]), mean)


def test_torch_learner_trains_resnet_with_augmentation():
    stream = colour_stream()
    cfg = validate_config({"algo": {"name": "naive"}, "backbone": {"type": "resnet18", "nf": 4},
                           "benchmark": {"batch_size": 16, "augment": True, "crop_padding": 2},
                           "optimizer": {"lr": 0.05}, "training": {"epochs_per_task": 5}})[0]
    torch.manual_seed(0)
    tl = torch_backend.build_learner(cfg, stream, torch.device("cpu"), 0)
    tl.set_threads(1, 1)
    state = ContinualLoop(tl, stream, epochs_per_task=5).run()
    assert float(np.asarray(state.acc_matrix)[-1].mean()) > 75.0
    assert tl.model.features.bn1.num_batches_tracked.item() == 2 * 5 * 4  # tasks x epochs x steps
