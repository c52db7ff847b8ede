"""Train-time augmentation on the device, a whole batch at a time (JAX backend).

The same recipe as ``backends/torch/augment.py``: zero-pad each image by ``padding`` pixels per
side, cut a window of the original size at an offset drawn uniformly from {0..2p} x {0..2p},
then mirror it left-right with probability 1/2. :func:`random_crop_flip` is pure and keyed by a
PRNG key, so it runs inside the compiled epoch (``jax.lax.scan``); the shapes are static, the
offsets are data (one gather per batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.errors import ConfigError


def random_crop_flip(key, x, padding: int, fill=None, flip: bool = True):
    """Randomly cropped and horizontally flipped copies of ``x`` (N, C, H, W).

    ``padding`` is static; ``fill`` is the per-channel value of the padding (shape (C,); None: 0).
    """
    n, c, h, w = x.shape
    p = int(padding)
    k_y, k_x, k_f = jax.random.split(key, 3)
    if p > 0:
        base = jnp.zeros((n, c, h + 2 * p, w + 2 * p), x.dtype)
        if fill is not None:
            base = base + jnp.asarray(fill, x.dtype).reshape(1, c, 1, 1)
        xp = base.at[:, :, p:p + h, p:p + w].set(x)
        dy = jax.random.randint(k_y, (n,), 0, 2 * p + 1)
        dx = jax.random.randint(k_x, (n,), 0, 2 * p + 1)
    else:
        xp = x
        dy = dx = jnp.zeros((n,), jnp.int32)
    rows = dy[:, None] + jnp.arange(h)[None, :]
    cols = jnp.broadcast_to(jnp.arange(w)[None, :], (n, w))
    if flip:
        mirrored = jax.random.bernoulli(k_f, 0.5, (n,))
        cols = jnp.where(mirrored[:, None], (w - 1) - cols, cols)
    cols = cols + dx[:, None]
    batch = jnp.arange(n)[:, None, None, None]
    chan = jnp.arange(c)[None, :, None, None]
    return xp[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def augment_settings(bcfg, mean, std):
    """(padding, per-channel fill, flip) for ``bcfg`` -- the arguments of
    :func:`random_crop_flip` after the key and the images -- or None when ``augment`` is off.
    The fill is the normalised value of a black pixel, -mean/std, as when the raw image is
    zero-padded; ``flip`` is ``augment_flip``."""
    if not getattr(bcfg, "augment", False):
        return None
    padding = int(getattr(bcfg, "crop_padding", 4))
    if padding < 0:
        raise ConfigError(f"config key 'benchmark.crop_padding' must be 0 or more, got {padding}.")
    fill = -(np.asarray(mean, np.float32).ravel() / np.asarray(std, np.float32).ravel())
    return padding, fill, bool(getattr(bcfg, "augment_flip", True))
