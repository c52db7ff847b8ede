"""Checkpoints: everything needed to continue a run from its last complete task.

A checkpoint holds the learner's state (model, optimizer, algorithm state such as old
parameters, importances and memories, its shuffling RNG), the global RNG states, the loop's
metrics so far and the config. It is written atomically after every task, so an interrupted
run (Ctrl-C, SIGTERM, a crash) always leaves the last complete task's checkpoint, never half
of one. Resuming with a different config is an error naming the keys that differ.

The file (``checkpoint.ckpt``) holds plain data, NumPy arrays and torch tensors only, in
:mod:`cl_runner.utils.arrayfile`'s format: reading one runs no code, whoever wrote it, and a
SHA-256 checksum of its contents is checked before anything is built from it. Format 1
(``checkpoint.pt``, a torch pickle) is refused with a message: unpickling it could run code.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np

from cl_runner.errors import CheckpointError, CheckpointExistsError
from cl_runner.utils import arrayfile
from cl_runner.utils.io import atomic_write_bytes

FILENAME = "checkpoint.ckpt"
# Format 1 (clrun before checksummed checkpoints): a torch pickle under this name.
LEGACY_FILENAME = "checkpoint.pt"
FORMAT = 2
# The sections every checkpoint has (a file with the right format but one missing is corrupt).
SECTIONS = ("config", "learner", "loop", "rng")
# Keys that do not change the numbers a run produces; they may differ on resume.
NEUTRAL_KEYS = {"resume", "overwrite", "progress", "loggers", "data_dir", "cache_dir", "results_file",
                "checkpoint", "threads", "wandb", "expected", "source", "version", "objective"}
# Keys inside sections that cannot change the numbers either: whether the stream is cached, the
# evaluation batch size, how often progress is shown.
NEUTRAL_PATHS = {"benchmark.cache", "benchmark.eval_batch_size", "training.progress_every"}


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
        "config": config,
        "learner": learner.state_dict(),
        "loop": loop_state.__dict__.copy(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": _torch_rng()},
    }
    from cl_runner import __version__

    atomic_write_bytes(path, arrayfile.dumps(payload, meta={"format": FORMAT, "clrun": __version__}))


def _legacy_message(path: Path) -> str:
    return (f"checkpoint {path} was written by an older clrun (format 1, a Python pickle); reading a "
            f"pickle can run any code it holds, so this clrun does not read it. Run again from the "
            f"beginning with overwrite=true (or delete the file), or finish it with the clrun that wrote it.")


def load(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict with ``format`` and the sections of :data:`SECTIONS`;
    a CheckpointError when it is missing, of another format, damaged or incomplete."""
    path = Path(path)
    if not path.is_file():
        legacy = path.with_name(LEGACY_FILENAME)
        if path.name == FILENAME and legacy.is_file():
            raise CheckpointError(_legacy_message(legacy))
        raise CheckpointError(f"no checkpoint to resume from at {path}. resume=true continues the run "
                              f"in this run's directory (set hydra.run.dir=<old run dir>); "
                              f"\"resume='<old run dir>'\" continues that run here.")
    try:
        data = path.read_bytes()
    except OSError as ex:
        raise CheckpointError(f"checkpoint {path} cannot be read ({ex.strerror}).") from None
    if not data.startswith(arrayfile.MAGIC):
        if data.startswith(b"PK\x03\x04") or data.startswith(b"\x80"):  # torch zip / bare pickle
            raise CheckpointError(_legacy_message(path))
    try:
        tree, meta = arrayfile.loads(data)
    except arrayfile.ArrayFileError as ex:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({ex}). Delete it (or run with "
                              f"overwrite=true) to start the run again from the beginning.") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is of format {meta.get('format')!r}; this clrun reads "
                              f"format {FORMAT}. Start the run again with overwrite=true.")
    missing = [k for k in SECTIONS if not isinstance(tree, dict) or not isinstance(tree.get(k), dict)]
    if not missing:
        from cl_runner.core.loop import LoopState

        missing = [f"loop.{f.name}" for f in dataclasses.fields(LoopState) if f.name not in tree["loop"]]
        missing += [f"rng.{k}" for k in ("python", "numpy", "torch") if k not in tree["rng"]]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}. Delete it "
                              f"(or run with overwrite=true) to start the run again from the beginning.")
    return {"format": FORMAT, **tree}


def checkpoint_in(resume) -> Path:
    """The checkpoint file ``resume=<path>`` names: the file itself, or the one in that folder."""
    p = Path(str(resume)).expanduser()
    return p if p.suffix in (".ckpt", ".pt") else p / FILENAME


def resume_source(out: Path, resume, overwrite: bool = False) -> Path | None:
    """The checkpoint a run in ``out`` continues from, or None when it starts from the beginning.

    ``resume``: true (the checkpoint in ``out``), ``auto`` (that checkpoint when there is one, else
    start), a path (the checkpoint of another run, continued here), or null/false (start). A run
    that would start in (or bring another run's checkpoint into) a folder holding a checkpoint,
    and so replace it, is refused unless ``overwrite`` is set.
    """
    own = Path(out) / FILENAME
    if not own.is_file() and (Path(out) / LEGACY_FILENAME).is_file() and not overwrite:
        if resume is True or resume == "auto":
            raise CheckpointError(_legacy_message(Path(out) / LEGACY_FILENAME))
        own = Path(out) / LEGACY_FILENAME  # an earlier run's checkpoint all the same
    if resume == "auto":
        return own if own.is_file() else None
    if resume is True:
        return own
    if resume:
        source = checkpoint_in(resume)
        if own.is_file() and not overwrite and source.resolve() != own.resolve():
            raise CheckpointExistsError(f"{out} already holds the checkpoint of another run, which continuing "
                                  f"{source} here would replace. Choose another folder with "
                                  f"hydra.run.dir=<dir>, or add overwrite=true to replace it.")
        return source
    if own.is_file() and not overwrite:
        raise CheckpointExistsError(f"{out} already holds the checkpoint of an earlier run, which this run "
                              f"would replace. Add resume=true to continue that run (resume=auto: "
                              f"continue when a checkpoint exists, else start), or overwrite=true to "
                              f"start again and replace it.")
    return None


def clear_run(out: Path, results_file: str) -> None:
    """Remove what an earlier run left in ``out`` that a new run would mix with its own
    (overwrite=true): the checkpoint, the results and the event log."""
    for name in (FILENAME, LEGACY_FILENAME, results_file, "events.jsonl", "aggregate.json"):
        try:
            (Path(out) / name).unlink()
        except FileNotFoundError:
            pass


def _neutral(key: str) -> bool:
    return key.split(".")[0] in NEUTRAL_KEYS or key in NEUTRAL_PATHS


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
    a = {k: v for k, v in _flatten(saved).items() if not _neutral(k)}
    b = {k: v for k, v in _flatten(current).items() if not _neutral(k)}
    diff = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
    if any(k not in a for k in diff):
        defaults = schema_defaults(current)
        diff = [k for k in diff if k in a or k not in defaults or defaults[k] != b.get(k)]
    return sorted(diff)


def check_config(payload: dict, config: dict, path: Path) -> None:
    """A CheckpointError naming the keys (up to 8) whose values differ between the checkpoint's
    config and ``config``, if any."""
    diff = config_differences(payload["config"], config)
    if diff:
        shown = ", ".join(f"{k} ({_flatten(payload['config']).get(k)!r} -> {_flatten(config).get(k)!r})"
                          for k in diff[:8])
        raise CheckpointError(f"checkpoint {path} was made with a different config: {shown}. "
                              f"Resume with the same config, or start a new run without resume.")


def restore(payload: dict, learner, loop_state, config: dict, path: Path) -> None:
    check_config(payload, config, path)
    try:
        learner.load_state_dict(payload["learner"])
    except Exception as ex:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} does not fit this model/algorithm ({ex}).") from None
    for k, v in payload["loop"].items():
        setattr(loop_state, k, v)
    rng = payload["rng"]
    try:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        _set_torch_rng(rng["torch"])
    except Exception as ex:  # noqa: BLE001 - a state of the wrong shape or type
        raise CheckpointError(f"checkpoint {path} holds random-number states this run cannot use "
                              f"({type(ex).__name__}: {ex}).") from None
