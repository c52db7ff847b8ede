"""The ``resnet18`` backbone keys, checked the same way on both backends."""

from __future__ import annotations

from cl_runner.errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def check_resnet_config(cfg) -> tuple[int, bool]:
    """(nf, bf16) from ``backbone.nf`` and ``backbone.precision``, or a ConfigError."""
    nf = int(getattr(cfg, "nf", 64))
    precision = str(getattr(cfg, "precision", "fp32"))
    if nf <= 0:
        raise ConfigError(f"config key 'backbone.nf' must be a positive number of filters, got {nf} "
                          f"(20: GEM / A-GEM's reduced ResNet-18, 64: the full one).")
    if precision not in PRECISIONS:
        raise ConfigError(f"config key 'backbone.precision': '{precision}' is not one of "
                          f"{', '.join(PRECISIONS)}.")
    return nf, precision == "bf16"
