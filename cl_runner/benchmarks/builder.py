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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cl_runner.benchmarks.pixels import GatherPlan, PixelGather, gather_all, small_pages
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.data.datasets import (ImageDataset, default_cache_dir, default_data_dir, find_files,
                                     load_image_dataset)
from cl_runner.registry import BENCHMARKS

CACHE_FORMAT = 3  # 2: nearest rotation computed in fixed point, as PIL does; 3: pixel-remap plans


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
            return load_cached(path)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(path, ignore_errors=True)  # a damaged cache entry is rebuilt
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
    return stream


def save_cached(stream: Stream, path: Path) -> None:
    """Write the stream under ``path`` atomically (a temporary folder renamed into place).

    Images that are pixel remaps of the source splits (``stream.plan``) are stored as the plan:
    the source splits once and each task's index. The other arrays are stored as .npy files and,
    once written, replaced in the stream by read-only memory maps of their files, so the built
    copy is freed task by task and the run reads the same pages the cache holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    plan = stream.plan
    planned = {} if plan is None else plan.parts
    try:
        tasks_meta = []
        for t in stream.tasks:
            gathered = {}
            for part in ("train_x", "train_y", "test_x", "test_y"):
                g = planned.get((t.id, part))
                if g is not None:
                    np.save(tmp / f"task{t.id}_{part}_index.npy", g.index)
                    if g.rows is not None:
                        np.save(tmp / f"task{t.id}_{part}_rows.npy", g.rows)
                    gathered[part] = {"split": g.split, "rows": g.rows is not None}
                    continue
                file = tmp / f"task{t.id}_{part}.npy"
                np.save(file, getattr(t, part))
                setattr(t, part, np.load(file, mmap_mode="r"))
            tasks_meta.append({"id": t.id, "classes": t.classes.tolist(), "info": t.info,
                               "gathered": gathered})
        splits = sorted({g.split for g in planned.values()})
        for split in splits:
            np.save(tmp / f"base_{split}.npy", plan.bases[split])
        meta = {"name": stream.name, "scenario": stream.scenario, "num_outputs": stream.num_outputs,
                "input_shape": list(stream.input_shape), "mean": list(stream.mean),
                "std": list(stream.std), "tasks": tasks_meta, "bases": splits, "format": CACHE_FORMAT}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "meta.json").is_file():  # another process won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_cached(path: Path) -> Stream:
    meta = json.loads((path / "meta.json").read_text())
    plan = GatherPlan(bases={s: np.load(path / f"base_{s}.npy", mmap_mode="r") for s in meta["bases"]})
    arrays = []
    for tm in meta["tasks"]:
        parts = {}
        for part in ("train_x", "train_y", "test_x", "test_y"):
            g = tm["gathered"].get(part)
            if g is None:
                parts[part] = np.load(path / f"task{tm['id']}_{part}.npy", mmap_mode="r")
                continue
            rows = np.load(path / f"task{tm['id']}_{part}_rows.npy") if g["rows"] else None
            plan.parts[(tm["id"], part)] = PixelGather(
                g["split"], np.load(path / f"task{tm['id']}_{part}_index.npy"), rows)
        arrays.append(parts)
    keys = list(plan.parts)
    gather = {} if keys else None
    for key, x in zip(keys, gather_all(plan.bases, [plan.parts[key] for key in keys], record=gather)):
        arrays[key[0]][key[1]] = x
    tasks = [Task(id=tm["id"], classes=np.asarray(tm["classes"], dtype=np.int64), info=tm["info"],
                  **parts) for tm, parts in zip(meta["tasks"], arrays)]
    return Stream(name=meta["name"], scenario=meta["scenario"], tasks=tasks,
                  num_outputs=meta["num_outputs"], input_shape=tuple(meta["input_shape"]),
                  mean=tuple(meta["mean"]), std=tuple(meta["std"]), plan=plan if plan.parts else None,
                  gather=gather)


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
