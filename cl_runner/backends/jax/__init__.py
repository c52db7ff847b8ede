"""The JAX backend (flax linen models, optax optimizers, one compiled program per epoch)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import jax


def cpu_devices_chosen() -> bool:
    """Whether the environment sets the number of JAX CPU devices."""
    return "JAX_NUM_CPU_DEVICES" in os.environ or \
        "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")


def _split_cpu() -> None:
    """One JAX CPU device per usable core, so that several seeds (``seeds=[...]``) train as one
    program per device, side by side (jax/seeds.py); a single run uses the first device, whose
    math library still uses every core. Only possible before JAX's first computation in this
    process, and left alone when JAX_NUM_CPU_DEVICES or XLA's host device count is set."""
    if cpu_devices_chosen():
        return
    from cl_runner.sweeps import usable_cores

    try:
        jax.config.update("jax_num_cpu_devices", usable_cores())
    except (RuntimeError, AttributeError):  # JAX already runs: its devices stay as they are
        pass


_split_cpu()

from cl_runner.backends.jax import algorithms, backbones, learner, optim  # noqa: E402,F401
from cl_runner.errors import ConfigError  # noqa: E402
from cl_runner.registry import ALGORITHMS  # noqa: E402

NAME = "jax"

# JAX logs at INFO each accelerator platform it probes and does not find ("Unable to initialize
# backend 'tpu'"); Hydra's logging shows INFO, so every CPU run would print it.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


@dataclass(frozen=True)
class JaxDevice:
    """A JAX device with the face the runner expects of a device: ``type`` ("cpu", "cuda", ...)
    and a printable name ("cpu", "cuda:0")."""

    jax: jax.Device

    @property
    def type(self) -> str:
        platform = self.jax.platform
        return "cuda" if platform in ("gpu", "cuda") else platform

    def __str__(self) -> str:
        return "cpu" if self.type == "cpu" else f"{self.type}:{self.jax.id}"


def _devices(platform: str) -> list:
    try:
        return jax.devices(platform)
    except RuntimeError:
        return []


def resolve_device(name: str) -> JaxDevice:
    if name == "auto":
        return JaxDevice(jax.devices()[0])
    if name == "cpu":
        return JaxDevice(jax.devices("cpu")[0])
    if name.startswith("cuda"):
        gpus = _devices("gpu")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if not gpus:
            raise ConfigError(f"device={name} was asked for but JAX sees no GPU (is jax[cuda] "
                              f"installed?); use device=cpu or device=auto.")
        if index >= len(gpus):
            raise ConfigError(f"device={name} was asked for but JAX sees only {len(gpus)} GPU(s).")
        return JaxDevice(gpus[index])
    raise ConfigError(f"device '{name}' is not known to the jax backend; use auto, cpu, cuda or cuda:N.")


def seed_devices(device: JaxDevice, n: int, cores: int | None = None) -> list[JaxDevice]:
    """The device of each of ``n`` seeds trained together on ``device``: on the CPU the seeds are
    spread in contiguous, balanced groups over the CPU devices, at most ``cores`` of them (the
    run's share of the machine; None: the cores it may use) unless JAX_NUM_CPU_DEVICES chose their
    number; one program per group, side by side. On an accelerator they all stay on it."""
    if device.type != "cpu":
        return [device] * n
    from cl_runner.sweeps import usable_cores

    cpus = _devices("cpu")
    limit = len(cpus) if cpu_devices_chosen() and cores is None else (cores or usable_cores())
    groups = max(1, min(n, len(cpus), limit))
    return [JaxDevice(cpus[i * groups // n]) for i in range(n)]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's and NumPy's global generators (JAX has no global RNG: the learner's keys
    come from the seed). ``deterministic`` asks XLA for deterministic GPU kernels; it takes
    effect only if no JAX computation has run yet in this process (CPU runs are deterministic
    either way)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    if deterministic:
        flag = "--xla_gpu_deterministic_ops=true"
        flags = os.environ.get("XLA_FLAGS", "")
        if flag not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def build_learner(cfg, stream, device, seed: int):
    cls = ALGORITHMS.get(cfg.algo.name, backend=NAME)
    if not isinstance(device, JaxDevice):
        device = resolve_device(str(device))
    return cls(cfg, stream, device, seed)


def versions() -> dict:
    from importlib import metadata

    out = {"jax": jax.__version__}
    for dist in ("jaxlib", "flax", "optax"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
