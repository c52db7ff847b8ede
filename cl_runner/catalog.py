"""Fills the registries with everything that needs no deep-learning library.

Benchmarks and algorithm schemas are plain Python/NumPy and register on import. Backbone,
optimizer and backend *names* are recorded here so configs can be validated before PyTorch or
JAX is imported; each backend registers its implementations under the same names when loaded.
"""

from __future__ import annotations

import importlib

from cl_runner.registry import BACKBONES, BACKENDS, OPTIMIZERS

_loaded = False

BACKEND_MODULES = {
    "torch": "cl_runner.backends.torch",
    "jax": "cl_runner.backends.jax",
}


def load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("cl_runner.benchmarks")
    importlib.import_module("cl_runner.algorithms")
    importlib.import_module("cl_runner.callbacks.loggers")
    for name, summary in {
        "mlp": "fully connected net: n_hidden_layers x width, ReLU, optional dropout",
        "cnn": "small conv net: conv-relu-maxpool blocks (channels) then a width-unit hidden layer",
        "resnet18": "ResNet-18, CIFAR stem (3x3 conv, no max pool), nf base filters (20: GEM, 64: DER), batch norm",
    }.items():
        BACKBONES.register(name, summary=summary)(summary)
    for name, summary in {
        "sgd": "SGD with momentum, Nesterov and weight decay",
        "adam": "Adam (betas, weight decay)",
    }.items():
        OPTIMIZERS.register(name, summary=summary)(summary)
    for name, module in BACKEND_MODULES.items():
        BACKENDS.register(name, summary=module)(module)


def load_backend(name: str):
    """Import backend ``name`` so that its implementations are registered; return the module."""
    load()
    module = BACKENDS.get(name)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as ex:
        if ex.name and ex.name.split(".")[0] in ("jax", "flax", "optax", "torch"):
            extra = "jax" if name == "jax" else "all"
            raise ImportError_(name, ex.name, extra) from None
        raise


def ImportError_(backend: str, missing: str, extra: str):
    from cl_runner.errors import ConfigError

    return ConfigError(
        f"backend '{backend}' needs the package '{missing}', which is not installed. "
        f"Install it with: pip install -e '.[{extra}]'"
    )
