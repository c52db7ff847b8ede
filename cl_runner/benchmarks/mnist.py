"""Split, Permuted and Rotated MNIST and Fashion-MNIST."""

from __future__ import annotations

import numpy as np

from cl_runner.benchmarks.builder import Recipe, register_benchmark, subset_rows, take_subset, task_rng
from cl_runner.benchmarks.pixels import GatherPlan, PixelGather, gather_all, rotation_index
from cl_runner.benchmarks.stream import Stream, Task
from cl_runner.benchmarks.transforms import permute_pixels, rotate
from cl_runner.data.datasets import ImageDataset
from cl_runner.errors import ConfigError

SUBSET, TEST_SUBSET, PERMUTATION, ANGLES, CLASS_ORDER = 1, 2, 3, 4, 5


def _input_domain_stream(name, bcfg, ds: ImageDataset, seed, num_tasks, scenario, transform,
                         pixel_index=None) -> Stream:
    """Tasks that share the label set and differ by an input transform (permuted, rotated).

    domain_il: one 10-way output shared by all tasks. task_il / class_il: task t's labels are
    shifted to 10t..10t+9 (10*T outputs); task-IL restricts logits to the task's ten units.

    ``pixel_index(t)``, where given, returns task t's transform as a pixel remap (an int32 index
    over H*W, -1 for a zero pixel) and the task's info, or None; such tasks are gathered from the
    source splits (benchmarks/pixels.py) and the stream carries the plan, which the disk cache
    stores instead of the pixels. Other tasks go through ``transform(t, x_train, x_test)``.
    """
    k = ds.num_classes
    shared = scenario == "domain_il"
    plan = GatherPlan(bases={"train": ds.train_x, "test": ds.test_x})
    parts = []
    for t in range(num_tasks):
        rtr = subset_rows(len(ds.train_y), bcfg.subset, task_rng(seed, t, SUBSET))
        rte = subset_rows(len(ds.test_y), bcfg.test_subset, task_rng(seed, t, TEST_SUBSET))
        ytr = ds.train_y if rtr is None else ds.train_y[rtr]
        yte = ds.test_y if rte is None else ds.test_y[rte]
        remap = pixel_index(t) if pixel_index is not None else None
        if remap is not None:
            index, info = remap
            plan.parts[(t, "train_x")] = PixelGather("train", index, rtr)
            plan.parts[(t, "test_x")] = PixelGather("test", index, rte)
            xtr = xte = None
        else:
            xtr = ds.train_x if rtr is None else ds.train_x[rtr]
            xte = ds.test_x if rte is None else ds.test_x[rte]
            xtr, xte, info = transform(t, xtr, xte)
        parts.append([xtr, ytr, xte, yte, info])
    gather = None
    if plan.parts:
        keys = list(plan.parts)
        gather = {}
        for key, x in zip(keys, gather_all(plan.bases, [plan.parts[key] for key in keys], record=gather)):
            parts[key[0]][0 if key[1] == "train_x" else 2] = x
    tasks = []
    for t, (xtr, ytr, xte, yte, info) in enumerate(parts):
        offset = 0 if shared else k * t
        tasks.append(Task(id=t, train_x=np.ascontiguousarray(xtr), train_y=ytr + offset,
                          test_x=np.ascontiguousarray(xte), test_y=yte + offset,
                          classes=np.arange(offset, offset + k), info=info))
    return Stream(name=name, scenario=scenario, tasks=tasks,
                  num_outputs=k if shared else k * num_tasks,
                  input_shape=tuple(ds.train_x.shape[1:]), mean=ds.mean, std=ds.std,
                  plan=plan if plan.parts else None, gather=gather)


def rotation_jitter_mode(value) -> str | None:
    """``rotation_jitter`` as None (off), "sample" or "task"; anything else is a ConfigError."""
    if value is False or value is None or value == "false":
        return None
    if value is True or value in ("true", "sample"):
        return "sample"
    if value == "task":
        return "task"
    raise ConfigError(f"config key 'benchmark.rotation_jitter': '{value}' is not one of false, "
                      "sample (or true), task.")


def build_rotated(bcfg, ds, seed, num_tasks, scenario):
    step = float(bcfg.per_task_rotation)

    def transform(t, xtr, xte):
        jitter = rotation_jitter_mode(bcfg.rotation_jitter)
        if jitter == "sample":
            # Each sample's angle is uniform inside the task's bin.
            rng = task_rng(seed, t, ANGLES)
            a_tr = rng.uniform(t * step, (t + 1) * step, size=len(xtr))
            a_te = rng.uniform(t * step, (t + 1) * step, size=len(xte))
            info = {"angle_range": [t * step, (t + 1) * step]}
        elif jitter == "task":
            # One angle for the whole task (train and test), uniform inside its bin: GEM's
            # mnist_rotations draws its tasks this way.
            a_tr = a_te = float(task_rng(seed, t, ANGLES).uniform(t * step, (t + 1) * step))
            info = {"angle": a_tr}
        else:
            a_tr = a_te = t * step
            info = {"angle": t * step}
        return (rotate(xtr, a_tr, bcfg.interpolation), rotate(xte, a_te, bcfg.interpolation), info)

    def pixel_index(t):
        # One nearest-neighbour angle for the task: a fixed remap of the pixels.
        jitter = rotation_jitter_mode(bcfg.rotation_jitter)
        if jitter == "sample" or bcfg.interpolation != "nearest":
            return None
        if jitter == "task":
            angle = float(task_rng(seed, t, ANGLES).uniform(t * step, (t + 1) * step))
        else:
            angle = t * step
        return rotation_index(angle, *ds.train_x.shape[2:]), {"angle": angle}

    return _input_domain_stream(bcfg.name, bcfg, ds, seed, num_tasks, scenario, transform, pixel_index)


def build_permuted(bcfg, ds, seed, num_tasks, scenario):
    pixels = int(np.prod(ds.train_x.shape[2:]))

    def transform(t, xtr, xte):
        if t == 0 and bcfg.first_task_unpermuted:
            return xtr, xte, {"permuted": False}
        perm = task_rng(seed, t, PERMUTATION).permutation(pixels)
        return permute_pixels(xtr, perm), permute_pixels(xte, perm), {"permuted": True}

    def pixel_index(t):
        if t == 0 and bcfg.first_task_unpermuted:
            return np.arange(pixels, dtype=np.int32), {"permuted": False}
        perm = task_rng(seed, t, PERMUTATION).permutation(pixels)
        return perm.astype(np.int32), {"permuted": True}

    return _input_domain_stream(bcfg.name, bcfg, ds, seed, num_tasks, scenario, transform, pixel_index)


def class_order(bcfg, num_classes: int, seed: int) -> list[int]:
    order = bcfg.class_order
    if order is None:
        return list(range(num_classes))
    if order == "seed":
        return [int(c) for c in task_rng(seed, 0, CLASS_ORDER).permutation(num_classes)]
    order = [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        raise ConfigError(f"benchmark.class_order must list each of the {num_classes} classes once, "
                          f"got {order}.")
    return order


def build_split(bcfg, ds, seed, num_tasks, scenario):
    """Classes split into tasks of ``classes_per_task``.

    class_il: labels keep their class index, one output per class.
    task_il: same labels; the logits are restricted to the task's classes.
    domain_il: labels are the position inside the task (0..classes_per_task-1), shared outputs.
    """
    k = ds.num_classes
    per = bcfg.classes_per_task or 2
    if per * num_tasks > k:
        raise ConfigError(f"{bcfg.name}: {num_tasks} tasks x {per} classes needs {num_tasks * per} "
                          f"classes but the dataset has {k}; lower benchmark.num_tasks or "
                          f"benchmark.classes_per_task.")
    order = class_order(bcfg, k, seed)
    tasks = []
    for t in range(num_tasks):
        cls = np.asarray(order[t * per:(t + 1) * per], dtype=np.int64)
        parts = []
        for split, purpose, n in (("train", SUBSET, bcfg.subset), ("test", TEST_SUBSET, bcfg.test_subset)):
            x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
            mask = np.isin(y, cls)
            xs, ys = take_subset(x[mask], y[mask], n, task_rng(seed, t, purpose))
            if scenario == "domain_il":
                lookup = np.full(k, -1, dtype=np.int64)
                lookup[cls] = np.arange(per)
                ys = lookup[ys]
            parts.append((np.ascontiguousarray(xs), ys))
        (xtr, ytr), (xte, yte) = parts
        units = np.arange(per) if scenario == "domain_il" else cls
        tasks.append(Task(id=t, train_x=xtr, train_y=ytr, test_x=xte, test_y=yte, classes=units,
                          info={"classes": cls.tolist()}))
    return Stream(name=bcfg.name, scenario=scenario, tasks=tasks,
                  num_outputs=per if scenario == "domain_il" else k,
                  input_shape=tuple(ds.train_x.shape[1:]), mean=ds.mean, std=ds.std)


for _ds, _suffix in (("mnist", "mnist"), ("fashion-mnist", "fmnist")):
    register_benchmark(f"rotated{_suffix}", Recipe(
        dataset=_ds, default_scenario="domain_il", default_num_tasks=20, build=build_rotated,
        keys=("per_task_rotation", "rotation_jitter", "interpolation"),
        summary=f"{_ds} rotated by t * per_task_rotation degrees in task t"))
    register_benchmark(f"permuted{_suffix}", Recipe(
        dataset=_ds, default_scenario="domain_il", default_num_tasks=20, build=build_permuted,
        keys=("first_task_unpermuted",), seeded=True,
        summary=f"{_ds} with a fixed random pixel permutation per task"))
    register_benchmark(f"split{_suffix}", Recipe(
        dataset=_ds, default_scenario="class_il", default_num_tasks=5, build=build_split,
        keys=("classes_per_task", "class_order"),
        summary=f"{_ds} split into tasks of classes_per_task classes"))
