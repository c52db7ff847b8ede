"""Split CIFAR-10, Split CIFAR-100 and Split Tiny ImageNet (class-IL and task-IL).

The classes are split into ``num_tasks`` tasks of ``classes_per_task`` classes (null: the
dataset's classes divided by the number of tasks, so ``splitcifar100`` is 10 x 10 and
``splitcifar100 benchmark.num_tasks=20`` is 20 x 5), in the standard order 0, 1, ... or, with
``class_order: seed``, in an order drawn from the seed. Tasks are built as for Split MNIST
(``cl_runner/benchmarks/mnist.py``: ``build_split``); the stream carries the per-channel mean and
standard deviation of the training images. The train-time augmentation (``augment: true``:
random crop with ``crop_padding`` and horizontal flip) runs on the device inside each backend's
training step (``backends/<backend>/augment.py``), not here.
"""

from __future__ import annotations

from cl_runner.benchmarks.builder import Recipe, register_benchmark
from cl_runner.benchmarks.mnist import build_split
from cl_runner.errors import ConfigError


class _WithClassesPerTask:
    """``bcfg`` seen with ``classes_per_task`` filled in."""

    def __init__(self, bcfg, classes_per_task: int):
        self._bcfg = bcfg
        self.classes_per_task = classes_per_task

    def __getattr__(self, name):
        return getattr(self._bcfg, name)


def build_split_colour(bcfg, ds, seed, num_tasks, scenario):
    per = bcfg.classes_per_task
    if per is None:
        if ds.num_classes % num_tasks:
            raise ConfigError(f"{bcfg.name}: {ds.num_classes} classes do not split evenly into "
                              f"{num_tasks} tasks; set benchmark.classes_per_task, or a "
                              f"benchmark.num_tasks that divides {ds.num_classes}.")
        per = ds.num_classes // num_tasks
    return build_split(_WithClassesPerTask(bcfg, int(per)), ds, seed, num_tasks, scenario)


for _name, _ds, _tasks, _summary in (
        ("splitcifar10", "cifar10", 5, "CIFAR-10 split into 5 tasks of 2 classes"),
        ("splitcifar100", "cifar100", 10, "CIFAR-100 split into 10 tasks of 10 classes (num_tasks=20: 20 x 5)"),
        ("splittinyimagenet", "tinyimagenet", 10, "Tiny ImageNet split into 10 tasks of 20 classes")):
    register_benchmark(_name, Recipe(
        dataset=_ds, default_scenario="class_il", default_num_tasks=_tasks, build=build_split_colour,
        keys=("classes_per_task", "class_order"), summary=_summary))
