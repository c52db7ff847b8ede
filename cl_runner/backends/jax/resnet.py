"""ResNet-18 for 32 x 32 (CIFAR) and 64 x 64 (Tiny ImageNet) images (JAX backend, flax linen).

The same network as ``backends/torch/resnet.py`` (see there for the architecture and the
``nf`` widths of GEM / A-GEM and DER): 3x3 stride-1 stem, no max pooling, BasicBlocks [2, 2, 2, 2]
with nf, 2nf, 4nf, 8nf filters, batch norm after every convolution, global average pooling, the
linear head. Inputs are (N, C, H, W) as on the PyTorch backend; the convolutions run in NHWC.

Batch norm: in training (``train=True``) each batch is normalised with its own statistics and the
running averages are updated (PyTorch's momentum 0.1 is flax's ``momentum=0.9``); in evaluation
the running averages are used. The running averages are the ``batch_stats`` collection: the JAX
learner keeps it as explicit state beside the parameters (see ``JaxLearner``), carried through
the compiled epoch like every other state. Flax updates the running variance with the biased
batch variance where PyTorch uses the unbiased one (a factor n/(n-1), n = N*H*W values per
channel: 1 + 1/5120 or less at batch 10 on 32 x 32 images).

Convolutions: ``conv_impl="im2col"`` computes each one as a matrix product over the k*k shifted
(and strided) copies of the padded input, which is what runs fast inside the compiled loop on CPU
(see ``backbones.Conv``); ``"lax"`` uses ``lax.conv_general_dilated`` (cuDNN on GPUs).
``precision="bf16"`` computes the convolutions and batch norms in bfloat16 with float32
parameters and statistics.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cl_runner.backends.jax.backbones import Backbone, torch_uniform
from cl_runner.backends.resnet_config import check_resnet_config
from cl_runner.errors import ConfigError
from cl_runner.registry import BACKBONES


class ConvNoBias(nn.Module):
    """k x k convolution with stride and zero padding, no bias, on NHWC (PyTorch's default init)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    impl: str = "lax"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        k, s, pad = self.kernel_size, self.stride, self.padding
        kernel = self.param("kernel", torch_uniform(cin * k * k), (k, k, cin, self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.impl == "lax":
            return jax.lax.conv_general_dilated(x, kernel, window_strides=(s, s), padding=[(pad, pad)] * 2,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
        h = (xp.shape[1] - k) // s + 1
        w = (xp.shape[2] - k) // s + 1
        cols = jnp.concatenate([xp[:, i:i + s * (h - 1) + 1:s, j:j + s * (w - 1) + 1:s, :]
                                for i in range(k) for j in range(k)], axis=-1)
        return cols @ kernel.reshape(k * k * cin, self.features)


class BatchNorm(nn.BatchNorm):
    """flax's BatchNorm, with a clear error when the model is applied without its running
    averages (code that passes only ``{"params": ...}``)."""

    @nn.compact
    def __call__(self, x, *args, **kwargs):
        if not self.is_initializing() and not self.has_variable("batch_stats", "mean"):
            raise ConfigError(
                "resnet18 has batch norm, and this code applies the model without its running "
                "averages: on backend=jax, resnet18 supports the learner's own training and "
                "evaluation (naive, joint) but not yet algorithms that run the model themselves "
                "(EWC's Fisher...); use backend=torch for those.")
        return super().__call__(x, *args, **kwargs)


def batch_norm(train: bool, dtype, name: str):
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
    features: int
    stride: int
    impl: str = "lax"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out = ConvNoBias(self.features, 3, self.stride, 1, self.impl, self.dtype, name="conv1")(x)
        out = nn.relu(batch_norm(train, self.dtype, "bn1")(out))
        out = ConvNoBias(self.features, 3, 1, 1, self.impl, self.dtype, name="conv2")(out)
        out = batch_norm(train, self.dtype, "bn2")(out)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = ConvNoBias(self.features, 1, self.stride, 0, self.impl, self.dtype, name="shortcut_conv")(x)
            x = batch_norm(train, self.dtype, "shortcut_bn")(x)
        return nn.relu(out + x)


class ResNetFeatures(nn.Module):
    """(N, C, H, W) -> (N, 8 nf) features."""

    nf: int
    blocks: Sequence[int] = (2, 2, 2, 2)
    impl: str = "lax"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = jnp.transpose(x, (0, 2, 3, 1))  # NCHW -> NHWC
        h = ConvNoBias(self.nf, 3, 1, 1, self.impl, self.dtype, name="conv1")(h)
        h = nn.relu(batch_norm(train, self.dtype, "bn1")(h))
        for i, n in enumerate(self.blocks):
            for b in range(n):
                h = BasicBlock(self.nf * 2 ** i, 2 if (b == 0 and i > 0) else 1, self.impl, self.dtype,
                               name=f"layer{i + 1}_{b}")(h, train)
        return jnp.mean(h.astype(jnp.float32), axis=(1, 2))


@BACKBONES.register("resnet18", backend="jax")
def resnet18(cfg, input_shape, num_outputs: int, conv_impl: str = "lax") -> Backbone:
    nf, bf16 = check_resnet_config(cfg)
    feats = ResNetFeatures(nf, impl=conv_impl, dtype=jnp.bfloat16 if bf16 else jnp.float32)
    return Backbone(feats, 8 * nf, num_outputs)


def init_batch_stats(model, input_shape) -> dict:
    """The model's ``batch_stats`` collection at its initial values (means 0, variances 1);
    {} for a model without batch norm."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    stats = shapes.get("batch_stats", {})

    def fill(node):
        if isinstance(node, dict):
            return {k: (jnp.zeros(v.shape, v.dtype) if k == "mean" else jnp.ones(v.shape, v.dtype))
                    if not isinstance(v, dict) else fill(v) for k, v in node.items()}
        return node

    return fill(dict(stats))

