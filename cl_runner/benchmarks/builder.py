"""Builds a :class:`Stream` from a benchmark config, caching the result on disk.

Every benchmark is a *recipe* registered in ``BENCHMARKS``: a function that receives the
benchmark config, the loaded source dataset and the seed, and returns the stream. The generic
helpers here (subsets, label spaces, the disk cache) are shared by all recipes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cl_runner.benchmarks.pixels import GatherPlan, PixelGather, gather_all, small_pages
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.data.datasets import (ImageDataset, default_cache_dir, default_data_dir, find_files,
                                     load_image_dataset)
from cl_runner.registry import BENCHMARKS

# 2: nearest rotation computed in fixed point, as PIL does; 3: pixel-remap plans; 4: each file's
# SHA-256 and size in meta.json, checked on load.
CACHE_FORMAT = 4
# A writer's temporary folder holds this file locked while it writes (see remove_stale_tmp).
_WRITER_LOCK = ".writer.lock"
# Temporary folders without that lock (older clrun) count as abandoned after this long.
_UNLOCKED_TMP_AGE_S = 24 * 3600


class CacheError(ValueError):
    """A stream cache entry is damaged or incomplete (it is deleted and built again)."""


@dataclass
class Recipe:
    """What a registered benchmark is: its source dataset, defaults and task builder."""

    dataset: str
    default_scenario: str
    default_num_tasks: int
    build: Callable[[Any, ImageDataset, int, int, str], Stream]
    # Which config keys change the stream; the cache key is made of these.
    keys: tuple[str, ...]
    # True when the stream depends on the seed even without subsets (e.g. permutations).
    seeded: bool = False
    summary: str = ""


def register_benchmark(name: str, recipe: Recipe) -> None:
    BENCHMARKS.register(name, dataset=recipe.dataset, summary=recipe.summary,
                        scenario=recipe.default_scenario)(recipe)


def resolve(bcfg) -> tuple[Recipe, int, str]:
    recipe: Recipe = BENCHMARKS.get(bcfg.name)
    num_tasks = bcfg.num_tasks or recipe.default_num_tasks
    scenario = bcfg.scenario or recipe.default_scenario
    return recipe, int(num_tasks), scenario


def _uses_seed(recipe: Recipe, bcfg) -> bool:
    return bool(recipe.seeded or bcfg.subset or bcfg.test_subset
                or getattr(bcfg, "rotation_jitter", False) or bcfg.class_order == "seed")


def source_fingerprint(dataset: str, data_dir) -> list | None:
    """Path, size and modification time of each of the dataset's files (None: not found)."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    files = find_files(root, dataset)
    if files is None:
        return None
    out = []
    for key in sorted(files):
        st = files[key].stat()
        out.append([str(files[key].resolve()), st.st_size, st.st_mtime_ns])
    return out


def cache_key(bcfg, seed: int, source: list | None = None) -> str:
    """The cache entry of a stream: its parameters and the data files it is built from."""
    recipe, num_tasks, scenario = resolve(bcfg)
    params = {k: _plain(getattr(bcfg, k)) for k in recipe.keys}
    params.update(name=bcfg.name, num_tasks=num_tasks, scenario=scenario, subset=bcfg.subset,
                  test_subset=bcfg.test_subset, pad_to=bcfg.pad_to, format=CACHE_FORMAT,
                  seed=seed if _uses_seed(recipe, bcfg) else None, source=source)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return f"{bcfg.name}-{digest}"


def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value)
    except ImportError:  # pragma: no cover
        pass
    return value


def build_stream(bcfg, seed: int, data_dir=None, cache_dir=None, use_cache: bool | None = None) -> Stream:
    """The stream for benchmark config ``bcfg``, from the disk cache when it is there."""
    recipe, num_tasks, scenario = resolve(bcfg)
    use_cache = bcfg.cache if use_cache is None else use_cache
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    # Keyed by the data files too: another copy of the data (or a replaced file) is another stream.
    source = source_fingerprint(recipe.dataset, data_dir)
    path = root / "streams" / cache_key(bcfg, seed, source)
    if use_cache and source is not None and (path / "meta.json").is_file():
        try:
            return _warn_clipped_subsets(load_cached(path), bcfg)
        except Exception as ex:  # noqa: BLE001 - whatever is wrong with an entry, it is rebuilt
            reason = str(ex) if isinstance(ex, CacheError) else f"{type(ex).__name__}: {ex}"
            print(f"clrun: the cached stream {path} is damaged ({reason}); it is deleted and built again.",
                  file=sys.stderr, flush=True)
            shutil.rmtree(path, ignore_errors=True)
    dataset = load_image_dataset(recipe.dataset, data_dir)
    if source is None:  # the files were downloaded just now
        path = root / "streams" / cache_key(bcfg, seed, source_fingerprint(recipe.dataset, data_dir))
    with small_pages():
        stream = recipe.build(bcfg, dataset, seed, num_tasks, scenario)
    if bcfg.pad_to:
        from cl_runner.benchmarks.transforms import pad

        for t in stream.tasks:
            t.train_x, t.test_x = pad(t.train_x, bcfg.pad_to), pad(t.test_x, bcfg.pad_to)
        stream.input_shape = stream.tasks[0].train_x.shape[1:]
        stream.plan = None  # the padded images are no longer the plan's gathers
    if use_cache:
        try:
            save_cached(stream, path)
        except OSError:
            pass  # a read-only cache is not an error; the next run builds again
    return _warn_clipped_subsets(stream, bcfg)


def _warn_clipped_subsets(stream: Stream, bcfg) -> Stream:
    """Say so when ``subset`` / ``test_subset`` asks for more samples than a task has (the task
    then uses all of its samples)."""
    for key, n, sizes in (("subset", bcfg.subset, [t.num_train for t in stream.tasks]),
                          ("test_subset", bcfg.test_subset, [t.num_test for t in stream.tasks])):
        short = [(i + 1, size) for i, size in enumerate(sizes) if n is not None and size < n]
        if short:
            which = ", ".join(f"task {i} has {size}" for i, size in short[:5]) + (", ..." if len(short) > 5 else "")
            print(f"warning: benchmark.{key}={n} is more than some tasks have ({which}); those tasks use "
                  f"all their samples. Set benchmark.{key} to at most {min(s for _, s in short)} to "
                  f"draw the same number from every task.", file=sys.stderr, flush=True)
    return stream


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_synced(file: Path, write) -> dict:
    """Write ``file`` with ``write(f)``, flushed to the disk; its size and SHA-256."""
    with open(file, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": file.stat().st_size, "sha256": _sha256(file)}


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def remove_stale_tmp(streams_dir: Path) -> None:
    """Delete the temporary folders that writers killed mid-write left in ``streams_dir``. A
    writer holds a flock on a file in its folder while it writes, and the kernel drops it when
    the writer dies: a folder whose lock can be taken is abandoned. (Folders without that file
    come from an older clrun and count as abandoned after a day.)"""
    import fcntl

    try:
        candidates = [p for p in streams_dir.iterdir() if p.name.startswith(".tmp-") and p.is_dir()]
    except OSError:
        return
    for tmp in candidates:
        lock_file = tmp / _WRITER_LOCK
        try:
            fd = os.open(lock_file, os.O_RDWR)
        except FileNotFoundError:
            try:
                if time.time() - tmp.stat().st_mtime > _UNLOCKED_TMP_AGE_S:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its writer is alive
        finally:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def save_cached(stream: Stream, path: Path) -> None:
    """Write the stream under ``path`` atomically (a temporary folder renamed into place).

    Images that are pixel remaps of the source splits (``stream.plan``) are stored as the plan:
    the source splits once and each task's index. The other arrays are stored as .npy files and,
    once written, replaced in the stream by read-only memory maps of their files, so the built
    copy is freed task by task and the run reads the same pages the cache holds. Every file is
    flushed to the disk before the folder is renamed into place, and meta.json records each
    file's size and SHA-256 for :func:`load_cached` to check."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    lock_fd = os.open(tmp / _WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # held until this writer is done (or dies)
    plan = stream.plan
    planned = {} if plan is None else plan.parts
    files: dict[str, dict] = {}

    def save(name: str, array: np.ndarray) -> Path:
        files[name] = _write_synced(tmp / name, lambda f: np.save(f, array, allow_pickle=False))
        return tmp / name

    try:
        tasks_meta = []
        for t in stream.tasks:
            gathered = {}
            for part in ("train_x", "train_y", "test_x", "test_y"):
                g = planned.get((t.id, part))
                if g is not None:
                    save(f"task{t.id}_{part}_index.npy", g.index)
                    if g.rows is not None:
                        save(f"task{t.id}_{part}_rows.npy", g.rows)
                    gathered[part] = {"split": g.split, "rows": g.rows is not None}
                    continue
                file = save(f"task{t.id}_{part}.npy", getattr(t, part))
                setattr(t, part, np.load(file, mmap_mode="r"))
            tasks_meta.append({"id": t.id, "classes": t.classes.tolist(), "info": t.info,
                               "gathered": gathered})
        splits = sorted({g.split for g in planned.values()})
        for split in splits:
            save(f"base_{split}.npy", plan.bases[split])
        meta = {"name": stream.name, "scenario": stream.scenario, "num_outputs": stream.num_outputs,
                "input_shape": list(stream.input_shape), "mean": list(stream.mean),
                "std": list(stream.std), "tasks": tasks_meta, "bases": splits, "format": CACHE_FORMAT,
                "files": files}
        _write_synced(tmp / "meta.json", lambda f: f.write(json.dumps(meta).encode()))
        os.unlink(tmp / _WRITER_LOCK)
        _fsync_dir(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "meta.json").is_file():  # another process won the race otherwise
                raise
        _fsync_dir(path.parent)
    finally:
        os.close(lock_fd)
        shutil.rmtree(tmp, ignore_errors=True)


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, dict):
        raise CacheError(f"meta.json holds {type(meta).__name__}, not an object")
    need = {"name": str, "scenario": str, "num_outputs": int, "input_shape": list, "mean": list, "std": list,
            "tasks": list, "bases": list, "format": int, "files": dict}
    for key, kind in need.items():
        if not isinstance(meta.get(key), kind):
            raise CacheError(f"meta.json lacks '{key}'")
    if meta["format"] != CACHE_FORMAT:
        raise CacheError(f"format {meta['format']}, not {CACHE_FORMAT}")
    if not meta["tasks"]:
        raise CacheError("no tasks")
    for tm in meta["tasks"]:
        if not (isinstance(tm, dict) and isinstance(tm.get("id"), int) and isinstance(tm.get("classes"), list)
                and isinstance(tm.get("gathered"), dict) and isinstance(tm.get("info"), dict)):
            raise CacheError("a task's entry in meta.json is incomplete")


def _check_files(path: Path, files: dict) -> None:
    """Every file meta.json lists has its recorded size and SHA-256."""
    for name, rec in files.items():
        if "/" in name or name.startswith("."):
            raise CacheError(f"meta.json names the file {name!r}")
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CacheError(f"{name} is missing") from None
        if not isinstance(rec, dict) or size != rec.get("bytes"):
            raise CacheError(f"{name} has {size} bytes, not the {rec.get('bytes') if isinstance(rec, dict) else '?'} written")
        if _sha256(file) != rec.get("sha256"):
            raise CacheError(f"{name} does not match its checksum")


def _check_stream(stream: Stream) -> None:
    """Shapes, dtypes and label range of a loaded stream."""
    shape = tuple(stream.input_shape)
    for t in stream.tasks:
        for split in ("train", "test"):
            x, y = getattr(t, f"{split}_x"), getattr(t, f"{split}_y")
            if x.dtype != np.uint8 or tuple(x.shape[1:]) != shape:
                raise CacheError(f"task {t.id + 1}'s {split} images are {x.dtype} {x.shape[1:]}, not uint8 {shape}")
            if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
                raise CacheError(f"task {t.id + 1}'s {split} labels do not fit its {len(x)} images")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= stream.num_outputs):
                raise CacheError(f"task {t.id + 1}'s {split} labels lie outside [0, {stream.num_outputs})")
        if len(t.classes) and (t.classes.min() < 0 or t.classes.max() >= stream.num_outputs):
            raise CacheError(f"task {t.id + 1}'s classes lie outside [0, {stream.num_outputs})")


def load_cached(path: Path) -> Stream:
    """The stream cached under ``path``, after checking every file against the size and SHA-256
    in meta.json and every label and pixel index against its range; a CacheError otherwise."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as ex:
        raise CacheError(f"meta.json is unreadable ({ex})") from None
    _check_meta(meta)
    _check_files(path, meta["files"])
    listed = set(meta["files"])

    def load(name: str, mmap: bool = False) -> np.ndarray:
        if name not in listed:
            raise CacheError(f"{name} is not listed in meta.json")
        return np.load(path / name, mmap_mode="r" if mmap else None, allow_pickle=False)

    plan = GatherPlan(bases={s: load(f"base_{s}.npy", mmap=True) for s in meta["bases"]})
    arrays = []
    for tm in meta["tasks"]:
        parts = {}
        for part in ("train_x", "train_y", "test_x", "test_y"):
            g = tm["gathered"].get(part)
            if g is None:
                parts[part] = load(f"task{tm['id']}_{part}.npy", mmap=True)
                continue
            if g.get("split") not in plan.bases:
                raise CacheError(f"task {tm['id'] + 1} gathers from a split that is not cached")
            rows = load(f"task{tm['id']}_{part}_rows.npy") if g.get("rows") else None
            plan.parts[(tm["id"], part)] = PixelGather(g["split"], load(f"task{tm['id']}_{part}_index.npy"), rows)
        arrays.append(parts)
    keys = list(plan.parts)
    gather = {} if keys else None
    try:  # gather_all checks every index and row against its base
        gathered = gather_all(plan.bases, [plan.parts[key] for key in keys], record=gather)
    except ValueError as ex:
        raise CacheError(str(ex)) from None
    for key, x in zip(keys, gathered):
        arrays[key[0]][key[1]] = x
    tasks = [Task(id=tm["id"], classes=np.asarray(tm["classes"], dtype=np.int64), info=tm["info"],
                  **parts) for tm, parts in zip(meta["tasks"], arrays)]
    stream = Stream(name=meta["name"], scenario=meta["scenario"], tasks=tasks,
                    num_outputs=meta["num_outputs"], input_shape=tuple(meta["input_shape"]),
                    mean=tuple(meta["mean"]), std=tuple(meta["std"]), plan=plan if plan.parts else None,
                    gather=gather)
    _check_stream(stream)
    return stream


def subset_rows(total: int, n: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """The sorted rows of ``n`` samples drawn without replacement from ``total`` (None: all)."""
    if n is None or n >= total:
        return None
    return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)


def take_subset(x: np.ndarray, y: np.ndarray, n: int | None, rng: np.random.Generator):
    """``n`` samples drawn without replacement (all of them, in order, when n is None)."""
    idx = subset_rows(len(y), n, rng)
    if idx is None:
        return x, y
    return x[idx], y[idx]


def task_rng(seed: int, task_id: int, purpose: int) -> np.random.Generator:
    """An independent generator per (seed, task, purpose), so tasks can be built in any order."""
    return np.random.default_rng([seed, task_id, purpose])
