"""Train-time augmentation on the device, a whole batch at a time (PyTorch backend).

:func:`random_crop_flip` is the standard CIFAR / Tiny ImageNet recipe (torchvision's
``RandomCrop(size, padding=p)`` then ``RandomHorizontalFlip()``): each image is padded by ``p``
pixels per side, a window of the original size is cut at a uniformly drawn offset in
{0..2p} x {0..2p}, and the window is mirrored left-right with probability 1/2. It is one gather
over the batch (no per-sample Python). torchvision pads the raw image with zeros before
normalising; on normalised inputs the same pixels have the value ``-mean / std`` of their
channel, which is what :class:`BatchAugment` pads with.
"""

from __future__ import annotations

import torch

from cl_runner.errors import ConfigError


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                     fill: torch.Tensor | None = None, flip: bool = True) -> torch.Tensor:
    """Randomly cropped (``padding`` px per side) and horizontally flipped copies of ``x`` (N, C, H, W).

    ``fill``: per-channel value of the padding (shape (C,); None: 0). ``generator`` must live on
    ``x``'s device.
    """
    n, c, h, w = x.shape
    dev = x.device
    p = int(padding)
    if p > 0:
        xp = x.new_empty((n, c, h + 2 * p, w + 2 * p))
        if fill is None:
            xp.zero_()
        else:
            xp.copy_(fill.to(x.dtype).view(1, c, 1, 1).expand_as(xp))
        xp[:, :, p:p + h, p:p + w] = x
        dy = torch.randint(0, 2 * p + 1, (n,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), device=dev, generator=generator)
    else:
        xp = x
        dy = dx = torch.zeros(n, dtype=torch.long, device=dev)
    rows = dy[:, None] + torch.arange(h, device=dev)                       # (N, H)
    cols = torch.arange(w, device=dev).expand(n, w)
    if flip:
        mirrored = torch.rand(n, device=dev, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None], (w - 1) - cols, cols)
    cols = cols + dx[:, None]                                              # (N, W)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return xp[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


class BatchAugment:
    """The benchmark's augmentation for one learner: its own generator on the device (seeded),
    padding with the normalised value of a black pixel; ``flip`` False: the crop only."""

    def __init__(self, padding: int, fill: torch.Tensor, device: torch.device, seed: int, flip: bool = True):
        if int(padding) < 0:
            raise ConfigError(f"config key 'benchmark.crop_padding' must be 0 or more, got {padding}.")
        self.padding = int(padding)
        self.fill = fill.to(device)
        self.flip = bool(flip)
        self.generator = torch.Generator(device=device).manual_seed(int(seed) * 7919 + 17)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return random_crop_flip(x, self.padding, self.generator, self.fill, flip=self.flip)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def build_augment(bcfg, mean, std, device, seed: int) -> BatchAugment | None:
    """The augmentation ``bcfg`` asks for (None when ``augment`` is off). ``mean`` and ``std``
    are the normalisation the learner applies (per channel)."""
    if not getattr(bcfg, "augment", False):
        return None
    fill = -torch.as_tensor(mean, dtype=torch.float32).flatten() / torch.as_tensor(std, dtype=torch.float32).flatten()
    return BatchAugment(getattr(bcfg, "crop_padding", 4), fill, device, seed,
                        flip=bool(getattr(bcfg, "augment_flip", True)))
