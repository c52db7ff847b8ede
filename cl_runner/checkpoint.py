"""Checkpoints: everything needed to continue a run from its last complete task.

A checkpoint holds the learner's state (model, optimizer, algorithm state such as old
parameters, importances and memories, its shuffling RNG), the global RNG states, the loop's
metrics so far and the config. It is written atomically after every task, so an interrupted
run (Ctrl-C, SIGTERM, a crash) always leaves the last complete task's checkpoint, never half
of one. Resuming with a different config is an error naming the keys that differ.
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np

from cl_runner.errors import CheckpointError
from cl_runner.utils.io import atomic_write_bytes

FILENAME = "checkpoint.pt"
FORMAT = 1
# Keys that do not change the numbers a run produces; they may differ on resume.
NEUTRAL_KEYS = {"resume", "progress", "loggers", "data_dir", "cache_dir", "results_file", "checkpoint",
                "threads", "wandb", "expected", "source", "version", "objective"}


def _torch_rng() -> dict[str, Any]:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return {}
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_torch_rng(state: dict[str, Any]) -> None:
    if not state:
        return
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, learner, loop_state, config: dict) -> None:
    payload = {
        "format": FORMAT,
        "config": config,
        "learner": learner.state_dict(),
        "loop": loop_state.__dict__.copy(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": _torch_rng()},
    }
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write_bytes(path, buf.getvalue())


def load(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}. resume=true continues the run "
                              f"in this run's directory (set hydra.run.dir=<old run dir>); "
                              f"resume=<old run dir> continues that run here.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as ex:  # noqa: BLE001 - unpickling fails in many ways
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(ex).__name__}: {ex}). "
                              f"Delete it to start the run again from the beginning.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a clrun checkpoint of format {FORMAT}.")
    return payload


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def schema_defaults(config: dict) -> dict[str, Any]:
    """The flattened default of every key of a run config like ``config`` (same algorithm and
    plugins): what a key means when a config does not have it. {} if they cannot be built."""
    from cl_runner.config import validate_config

    algo = config.get("algo") or {}
    try:
        typed, _ = validate_config({"algo": {"name": algo.get("name"), "plugins": algo.get("plugins") or []}})
    except Exception:  # noqa: BLE001 - an unknown algorithm: no defaults to offer
        return {}
    from omegaconf import OmegaConf

    return _flatten(OmegaConf.to_container(typed, resolve=True))


def config_differences(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ between a checkpoint's config and the current one. A key
    the checkpoint's config lacks (one added to clrun after the checkpoint was written) counts
    only when the current value is not its default, the behaviour the checkpoint was made with."""
    a = {k: v for k, v in _flatten(saved).items() if k.split(".")[0] not in NEUTRAL_KEYS}
    b = {k: v for k, v in _flatten(current).items() if k.split(".")[0] not in NEUTRAL_KEYS}
    diff = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
    if any(k not in a for k in diff):
        defaults = schema_defaults(current)
        diff = [k for k in diff if k in a or k not in defaults or defaults[k] != b.get(k)]
    return sorted(diff)


def restore(payload: dict, learner, loop_state, config: dict, path: Path) -> None:
    diff = config_differences(payload["config"], config)
    if diff:
        shown = ", ".join(f"{k} ({_flatten(payload['config']).get(k)!r} -> {_flatten(config).get(k)!r})"
                          for k in diff[:8])
        raise CheckpointError(f"checkpoint {path} was made with a different config: {shown}. "
                              f"Resume with the same config, or start a new run without resume.")
    try:
        learner.load_state_dict(payload["learner"])
    except Exception as ex:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} does not fit this model/algorithm ({ex}).") from None
    for k, v in payload["loop"].items():
        setattr(loop_state, k, v)
    rng = payload["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    _set_torch_rng(rng["torch"])
