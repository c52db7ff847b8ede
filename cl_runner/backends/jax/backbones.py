"""Backbones for the JAX backend (flax linen), architecturally identical to the PyTorch ones.

Every backbone is ``features`` (input -> representation) followed by a linear ``head`` over all
output units; task-IL restricts the head's outputs to the task's units. ``backbone.head``
incremental / multihead use this same full head: the learner masks the units of the tasks not
started yet and keeps the optimizer off unused units, which gives the PyTorch backend's growing
head's results without parameter shapes that change (see heads.py).

Inputs arrive as (N, C, H, W) like on the PyTorch backend. Convolutions run in (N, H, W, C)
internally (XLA's preferred layout on CPU) and the feature map is flattened in (C, H, W) order,
so a flattened conv feature has the same meaning on both backends and weights can be copied
across by transposing only.

Parameters are drawn from the same distributions as PyTorch's defaults for ``nn.Linear`` and
``nn.Conv2d``: weights from kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in),
1/sqrt(fan_in)), and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fan_in = in_features, or
in_channels * kernel height * kernel width), so the two backends start from the same function
class and the same scale. The learner draws these values with NumPy (:func:`init_params`), which
needs no compilation; ``model.init`` draws them from a JAX key.

Parameter tree: ``{"features": {"layers_0": {"kernel", "bias"}, "layers_1": ...}, "head": {...}}``
with the layers in forward order (a conv kernel is (kh, kw, in, out), a dense one (in, out)).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.registry import BACKBONES


def torch_uniform(fan_in: int) -> Callable:
    """Initialiser drawing U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default bound)."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


class Dense(nn.Module):
    """y = x W + b with PyTorch's default initialisation (``use_bias`` False: y = x W)."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_uniform(fan_in), (fan_in, self.features))
        if not self.use_bias:
            return x @ kernel
        bias = self.param("bias", torch_uniform(fan_in), (self.features,))
        return x @ kernel + bias


class BatchNorm1d(nn.Module):
    """PyTorch's ``nn.BatchNorm1d`` on (N, F): in training each feature is normalised with the
    batch's mean and biased variance, and the running averages move by ``momentum`` towards the
    batch mean and the *unbiased* batch variance (as PyTorch's; flax's BatchNorm uses the biased
    one); in evaluation the running averages are used. Scale 1 and shift 0 at the start; the
    running averages are the ``batch_stats`` collection (mean 0, var 1), which the JAX learner
    carries as a part's state (learner.BatchStats)."""

    momentum: float = 0.1
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool = False):
        f = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (f,))
        shift = self.param("bias", nn.initializers.zeros, (f,))
        if not self.is_initializing() and not self.has_variable("batch_stats", "mean"):
            from cl_runner.errors import ConfigError

            raise ConfigError(
                "backbone.batch_norm=true, and this code applies the model without its running "
                "averages: on backend=jax a batch-norm MLP supports the learner's own training and "
                "evaluation (naive, joint, gdumb) but not algorithms that run the model themselves; "
                "use backend=torch or backbone.batch_norm=false.")
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((f,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((f,), jnp.float32))
        if train:
            mean = jnp.mean(x, axis=0)
            var = jnp.mean((x - mean) ** 2, axis=0)
            if not self.is_initializing():
                n = x.shape[0]
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x - mean) / jnp.sqrt(var + self.eps) * scale + shift


class Conv(nn.Module):
    """k x k stride-1 convolution with zero padding on NHWC, PyTorch's default initialisation.

    ``impl="im2col"`` computes it as one matrix product over the k*k shifted copies of the
    padded input; its gradients are matrix products, slices and pads too. On CPU this is what
    runs fast inside the compiled epoch loop: XLA:CPU lowers the kernel-gradient convolution
    inside a ``while`` loop to a slow generic loop (measured on the default CNN at batch 10:
    ~10 steps/s with ``lax.conv`` in the scanned epoch, ~90 with im2col). ``impl="lax"`` uses
    ``lax.conv_general_dilated`` (cuDNN on GPUs). Both give the same numbers up to rounding.
    """

    features: int
    kernel_size: int = 3
    padding: int = 1
    impl: str = "im2col"

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        k, pad = self.kernel_size, self.padding
        fan_in = cin * k * k
        kernel = self.param("kernel", torch_uniform(fan_in), (k, k, cin, self.features))
        bias = self.param("bias", torch_uniform(fan_in), (self.features,))
        if self.impl == "lax":
            y = jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=[(pad, pad)] * 2,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y + bias
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        h, w = xp.shape[1] - k + 1, xp.shape[2] - k + 1
        cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)
        return cols @ kernel.reshape(k * k * cin, self.features) + bias


def max_pool2(x):
    """2x2 max pooling with stride 2 on NHWC, flooring odd sizes (as ``nn.MaxPool2d(2)``)."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh}


class MLPFeatures(nn.Module):
    n_hidden_layers: int
    width: int
    dropout: float = 0.0
    activation: str = "relu"
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = x.reshape((x.shape[0], -1))
        act = ACTIVATIONS[self.activation]
        for i in range(self.n_hidden_layers):
            if self.batch_norm:  # linear without bias, batch norm, activation (as the PyTorch backend's)
                h = Dense(self.width, use_bias=False, name=f"layers_{i}")(h)
                h = act(BatchNorm1d(name=f"norm_{i}")(h, train))
            else:
                h = act(Dense(self.width, name=f"layers_{i}")(h))
            if self.dropout > 0:
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return h


class CNNFeatures(nn.Module):
    channels: Sequence[int]
    width: int
    dropout: float = 0.0
    conv_impl: str = "im2col"

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = jnp.transpose(x, (0, 2, 3, 1))  # NCHW -> NHWC
        for i, out in enumerate(self.channels):
            h = max_pool2(nn.relu(Conv(out, impl=self.conv_impl, name=f"layers_{i}")(h)))
        h = jnp.transpose(h, (0, 3, 1, 2)).reshape((h.shape[0], -1))  # flatten in (C, H, W) order
        h = nn.relu(Dense(self.width, name=f"layers_{len(self.channels)}")(h))
        if self.dropout > 0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return h


class NormedHead(nn.Module):
    """The output layer of a batch-norm MLP: a linear layer without bias, then batch norm."""

    num_outputs: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return BatchNorm1d(name="norm")(Dense(self.num_outputs, use_bias=False, name="linear")(x), train)


class Backbone(nn.Module):
    """``features`` then a linear ``head`` over all ``num_outputs`` units (``batch_norm``: the
    head is a :class:`NormedHead`)."""

    features: nn.Module
    feature_dim: int
    num_outputs: int
    batch_norm: bool = False

    def setup(self):
        self.head = NormedHead(self.num_outputs) if self.batch_norm else Dense(self.num_outputs)

    def __call__(self, x, train: bool = False):
        h = self.embed(x, train)
        return self.head(h, train) if self.batch_norm else self.head(h)

    def embed(self, x, train: bool = False):
        return self.features(x, train)


@BACKBONES.register("mlp", backend="jax")
def mlp(cfg, input_shape, num_outputs: int, conv_impl: str = "lax") -> Backbone:
    width_in = int(math.prod(input_shape))
    feature_dim = cfg.width if cfg.n_hidden_layers > 0 else width_in
    bn = bool(getattr(cfg, "batch_norm", False))
    feats = MLPFeatures(int(cfg.n_hidden_layers), int(cfg.width), float(cfg.dropout),
                        str(getattr(cfg, "activation", "relu")), bn)
    return Backbone(feats, feature_dim, num_outputs, bn)


@BACKBONES.register("cnn", backend="jax")
def cnn(cfg, input_shape, num_outputs: int, conv_impl: str = "lax") -> Backbone:
    feats = CNNFeatures(tuple(int(c) for c in cfg.channels), int(cfg.width), float(cfg.dropout),
                        conv_impl=conv_impl)
    return Backbone(feats, int(cfg.width), num_outputs)


def build_backbone(cfg, input_shape, num_outputs: int, conv_impl: str = "lax") -> Backbone:
    """The backbone ``cfg.type``. ``conv_impl`` ("lax" or "im2col", see :class:`Conv`) only
    changes how convolutions are computed: the parameter tree and the function are the same, so
    modules built with either can share parameters."""
    head = getattr(cfg, "head", "fixed") or "fixed"
    if head not in ("fixed", "incremental", "multihead"):
        from cl_runner.errors import ConfigError

        raise ConfigError(f"config key 'backbone.head': '{head}' is not one of fixed, incremental, multihead.")
    # A growing head (incremental, multihead) is the full head with the units of tasks not started
    # yet masked and left untouched by the optimizer: the learner does that (see heads.py).
    return BACKBONES.get(cfg.type, backend="jax")(cfg, tuple(input_shape), num_outputs, conv_impl=conv_impl)


def truncated_normal(rng: np.random.Generator, std: float, shape) -> np.ndarray:
    """N(0, std^2) draws, each one outside 2 std drawn again (TensorFlow's truncated normal)."""
    out = rng.normal(0.0, std, shape)
    outside = np.abs(out) > 2 * std
    while outside.any():
        out[outside] = rng.normal(0.0, std, int(outside.sum()))
        outside = np.abs(out) > 2 * std
    return out


def init_params(model: Backbone, input_shape, seed: int, init: str = "default"):
    """The model's parameters drawn with NumPy from ``seed``, from the same distributions as the
    layers' own initialisers (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels and biases), or with
    ``init="xavier_uniform"`` Glorot-uniform kernels (U(+-sqrt(6 / (fan_in + fan_out)))) and zero
    biases, or ``init="kaiming_normal"`` He-normal kernels (N(0, 2 / fan_in)) and zero biases, or
    ``init="truncated_normal"`` N(0, 0.1^2) kernels truncated at 2 std and biases 0.1, as on the
    PyTorch backend.

    ``model.init`` would give the same distributions from a JAX key, but compiling the random
    number generation for ~10^5-10^6 values takes seconds on a CPU; this takes milliseconds.
    The parameter tree's structure comes from ``jax.eval_shape`` (tracing only).
    """
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))["params"]
    rng = np.random.default_rng([seed, 5489])

    def layer(node):
        if "scale" in node and not isinstance(node["scale"], dict):  # batch norm: scale 1, shift 0
            return {name: (np.ones if name == "scale" else np.zeros)(leaf.shape, leaf.dtype)
                    for name, leaf in node.items()}
        if "kernel" in node and not isinstance(node["kernel"], dict):
            shape = node["kernel"].shape
            fan_in = int(math.prod(shape[:-1]))
            if init == "xavier_uniform":
                receptive = int(math.prod(shape[:-2]))  # 1 for a dense kernel (in, out)
                bound = math.sqrt(6.0 / (fan_in + receptive * shape[-1]))
                return {name: (rng.uniform(-bound, bound, leaf.shape) if name == "kernel"
                               else np.zeros(leaf.shape)).astype(leaf.dtype)
                        for name, leaf in node.items()}
            if init == "truncated_normal":
                return {name: (truncated_normal(rng, 0.1, leaf.shape) if name == "kernel"
                               else np.full(leaf.shape, 0.1)).astype(leaf.dtype)
                        for name, leaf in node.items()}
            if init == "kaiming_normal":
                std = math.sqrt(2.0 / fan_in) if fan_in > 0 else 0.0
                return {name: (rng.normal(0.0, std, leaf.shape) if name == "kernel"
                               else np.zeros(leaf.shape)).astype(leaf.dtype)
                        for name, leaf in node.items()}
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            return {name: rng.uniform(-bound, bound, leaf.shape).astype(leaf.dtype)
                    for name, leaf in node.items()}
        return {name: layer(child) for name, child in node.items()}

    return layer(shapes)


def parameter_layers(params) -> list[tuple[str, ...]]:
    """Paths of the parameterised layers in forward order: ("features", "layers_0"), ..., ("head",)."""
    names = sorted(params.get("features", {}), key=lambda k: int(k.split("_")[1]))
    return [("features", n) for n in names] + [("head",)]


from cl_runner.backends.jax import resnet  # noqa: E402,F401  (registers resnet18)
