"""Vectorised image transforms applied to a whole task at once (no per-image Python loop)."""

from __future__ import annotations

import math

import numpy as np


def _fixed_point_source_pixels(angles_deg: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer source pixel (x, y) of every output pixel for a nearest-neighbour rotation.

    Computed the way PIL's ``Image.rotate`` does it for images of up to 32767 pixels a side: the
    inverse affine matrix is formed in double precision (angle taken modulo 360, coefficients
    rounded to 15 decimals) and then applied in 16.16 fixed point, so a source coordinate that
    falls on a pixel boundary is resolved exactly as PIL resolves it. Returns two int64 arrays
    of shape (len(angles), h*w); negative values lie outside the image.
    """
    cx, cy = w / 2.0, h / 2.0
    coef = np.empty((len(angles_deg), 6), dtype=np.int64)

    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    for k, angle in enumerate(np.asarray(angles_deg, dtype=np.float64).tolist()):
        # Python floats and the math module, as PIL computes the matrix.
        phi = -math.radians(angle % 360.0)
        a0, a1 = round(math.cos(phi), 15), round(math.sin(phi), 15)
        a3, a4 = round(-math.sin(phi), 15), round(math.cos(phi), 15)
        a2 = a0 * -cx + a1 * -cy + 0.0 + cx
        a5 = a3 * -cx + a4 * -cy + 0.0 + cy
        coef[k] = (fix(a0), fix(a1), fix(a2 + a0 * 0.5 + a1 * 0.5),
                   fix(a3), fix(a4), fix(a5 + a3 * 0.5 + a4 * 0.5))
    ys, xs = np.mgrid[0:h, 0:w]
    xs, ys = xs.reshape(1, -1).astype(np.int64), ys.reshape(1, -1).astype(np.int64)
    c = [coef[:, i:i + 1] for i in range(6)]
    ix = (c[2] + xs * c[0] + ys * c[1]) >> 16
    iy = (c[5] + xs * c[3] + ys * c[4]) >> 16
    return ix, iy


def _source_coords(angles_deg: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates (float) of every output pixel for a rotation by each angle.

    Matches PIL's ``Image.rotate`` (used by torchvision's ``rotate``): counter-clockwise by the
    angle in degrees, about the image centre (w/2, h/2), sampling at pixel centres.
    Returns two arrays of shape (len(angles), h*w).
    """
    phi = -np.deg2rad(np.asarray(angles_deg, dtype=np.float64))[:, None]
    cx, cy = w / 2.0, h / 2.0
    ys, xs = np.mgrid[0:h, 0:w]
    dx = (xs.reshape(-1) + 0.5 - cx)[None, :]
    dy = (ys.reshape(-1) + 0.5 - cy)[None, :]
    cos, sin = np.round(np.cos(phi), 15), np.round(np.sin(phi), 15)
    sx = cos * dx + sin * dy + cx
    sy = -sin * dx + cos * dy + cy
    return sx, sy


def rotate(images: np.ndarray, angles_deg, interpolation: str = "nearest", chunk: int = 8192) -> np.ndarray:
    """Rotate uint8 images (N, C, H, W) by one angle (scalar) or one angle per image (N,).

    Pixels that come from outside the image are 0. ``nearest`` reproduces PIL's default
    resampling exactly; ``bilinear`` interpolates between the four nearest source pixels.
    """
    n, c, h, w = images.shape
    per_image = np.ndim(angles_deg) > 0
    angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    if per_image and len(angles) != n:
        raise ValueError(f"{len(angles)} angles for {n} images")
    flat = images.reshape(n, c, h * w)
    out = np.empty_like(flat)
    if not per_image:
        return _rotate_block(flat, angles, h, w, interpolation).reshape(n, c, h, w)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        out[start:stop] = _rotate_block(flat[start:stop], angles[start:stop], h, w, interpolation)
    return out.reshape(n, c, h, w)


def _rotate_block(flat: np.ndarray, angles: np.ndarray, h: int, w: int, interpolation: str) -> np.ndarray:
    """Rotate (n, C, h*w) by ``angles`` of length 1 (shared) or n (one per image)."""
    padded = None

    def gather(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
        nonlocal padded
        inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        if ix.shape[0] == 1:
            # One angle for the block: a column gather with np.take (several times faster than
            # fancy indexing), then the pixels from outside the image set to 0.
            out = np.take(flat, np.where(inside[0], iy[0] * w + ix[0], 0), axis=2)
            out[:, :, ~inside[0]] = 0
            return out
        if padded is None:
            padded = np.concatenate([flat, np.zeros(flat.shape[:2] + (1,), flat.dtype)], axis=2)
        idx = np.where(inside, iy * w + ix, h * w)  # h*w: the padding pixel, always 0
        return np.take_along_axis(padded, idx[:, None, :], axis=2)

    if interpolation == "nearest":
        return gather(*_fixed_point_source_pixels(angles, h, w))
    if interpolation != "bilinear":
        raise ValueError(f"unknown interpolation '{interpolation}'")
    sx, sy = _source_coords(angles, h, w)  # (A, hw)
    fx, fy = sx - 0.5, sy - 0.5
    x0, y0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    ax, ay = (fx - x0)[:, None, :], (fy - y0)[:, None, :]
    acc = gather(x0, y0) * (1 - ax) * (1 - ay)
    acc += gather(x0 + 1, y0) * ax * (1 - ay)
    acc += gather(x0, y0 + 1) * (1 - ax) * ay
    acc += gather(x0 + 1, y0 + 1) * ax * ay
    return np.clip(np.rint(acc), 0, 255).astype(flat.dtype)


def permute_pixels(images: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """Apply one pixel permutation (over H*W, shared by the channels) to every image."""
    n, c, h, w = images.shape
    # np.take is several times faster than fancy indexing for a gather along the last axis.
    return np.take(images.reshape(n, c, h * w), permutation, axis=2).reshape(n, c, h, w)


def pad(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad images symmetrically to size x size (e.g. 28 -> 32)."""
    n, c, h, w = images.shape
    if size < h or size < w:
        raise ValueError(f"pad_to={size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (0, 0), (top, size - h - top), (left, size - w - left)))
