"""Several seeds of one experiment trained together: one vmapped program per epoch (JAX backend).

``clrun backend=jax seeds=[0,1,2,3,4]`` builds one ordinary :class:`JaxLearner` per seed, each
with its own :class:`ContinualLoop`, callbacks and output folder, and drives the loops in lock
step. The host-side work stays per seed (the parts' ``on_before_task`` / ``on_after_training``
hooks such as EWC's Fisher, callbacks, checkpoints). Only the epoch and the evaluation run as one
program for all seeds: the per-seed epoch-program arguments (parameters, optimizer state, the
parts' states, PRNG key; see ``JaxLearner.epoch_inputs``) are stacked into one batched pytree,
``jax.vmap(learner._epoch_program)`` runs all seeds in one compiled program, and the result is
sliced back into each learner (``JaxLearner.finish_epoch``). The training and test data enter the
program once, unbatched, when they are the same for every seed (Rotated MNIST without
subsets...), and stacked per seed when the stream depends on the seed (Permuted MNIST, subsets,
``class_order: seed``...).

Seed 0's learner traces the program for all, so an algorithm's traced code (``_epoch_program``,
``train_step``, the parts' ``extra_loss`` / ``adjust_grads`` / ``after_step``) must read what
differs between seeds only from its arguments (the state), never from ``self`` -- the rule the
learner already sets for what differs between tasks. An algorithm whose class (or part) sets
``vectorize_seeds = False``, or that overrides ``train_epoch`` / ``evaluate`` without setting
``vectorize_seeds = True``, runs its seeds one after another instead (see
:func:`vectorization_blocker`); so does an epoch whose per-seed states cannot be stacked (different
shapes), with a printed message.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.backends.jax.learner import JaxLearner


def vectorization_blocker(learner_cls, part_classes=()) -> str | None:
    """Why the seeds of this algorithm cannot share one program (None: they can)."""
    for cls in (learner_cls, *part_classes):
        flag = getattr(cls, "vectorize_seeds", None)
        if flag is False:
            return f"{cls.__name__} sets vectorize_seeds = False"
    if getattr(learner_cls, "vectorize_seeds", None) is True:
        return None
    for method in ("train_epoch", "evaluate"):
        if getattr(learner_cls, method) is not getattr(JaxLearner, method):
            return (f"{learner_cls.__name__} overrides {method} (set vectorize_seeds = True on the class if "
                    f"its seeds may share the default vmapped epoch and evaluation)")
    return None


def stack(trees):
    """One pytree whose leaves are the per-seed leaves stacked on a new leading axis."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree, n: int) -> list:
    """The inverse of :func:`stack`: the per-seed pytrees."""
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], tree) for i in range(n)]


class SeedGroup:
    """Runs the loops of several seeds in lock step, training and evaluating them as one program.

    ``loops[i].learner`` is seed i's learner; all learners are instances of one class built from
    configs that differ only in the seed. ``note`` receives the one-line messages (fallbacks).
    """

    def __init__(self, loops, note: Callable[[str], None] = print):
        self.loops = list(loops)
        self.learners: list[JaxLearner] = [lp.learner for lp in self.loops]
        self.note = note
        self.n = len(self.learners)
        self.lead = self.learners[0]
        lead_stream = self.lead.stream
        self.shared_stream = all(lr.stream is lead_stream for lr in self.learners)
        self._epoch_fns: dict[tuple, Callable] = {}
        self._eval_fns: dict[tuple, Callable] = {}
        self._stacked: dict[str, tuple[tuple, jax.Array]] = {}
        self._noted: set[str] = set()

    # -- compiled programs -------------------------------------------------------------------
    def epoch_fn(self, axes: tuple) -> Callable:
        """vmap of the lead learner's epoch program over the carry and the data axes ``axes``
        (x, y, task ids, mask table: 0 = one per seed, None = shared)."""
        if axes not in self._epoch_fns:
            self._epoch_fns[axes] = jax.jit(jax.vmap(self.lead._epoch_program, in_axes=(0, *axes)))
        return self._epoch_fns[axes]

    def eval_fn(self, axes: tuple, task_il: bool = False) -> Callable:
        key = (axes, task_il)
        if key not in self._eval_fns:
            program = functools.partial(self.lead._eval_program, task_il=True) if task_il else self.lead._eval_program
            self._eval_fns[key] = jax.jit(jax.vmap(program, in_axes=(0, *axes, None)))
        return self._eval_fns[key]

    def compilations(self) -> dict[str, int]:
        """How many times the vmapped epoch and evaluation programs were compiled."""
        return {"epoch": sum(f._cache_size() for f in self._epoch_fns.values()),
                "eval": sum(f._cache_size() for f in self._eval_fns.values())}

    def _fallback(self, what: str, why: str) -> None:
        if what not in self._noted:
            self._noted.add(what)
            self.note(f"{what}: {why}; running the seeds one after another for it.")

    # -- data --------------------------------------------------------------------------------
    def _data(self, name: str, arrays: list):
        """(value, axis): the one array every seed has (axis None), or the stack (axis 0).

        Equal arrays are detected once (by value) and then made the same object in every
        learner (``name`` is the learner attribute), so later epochs compare by identity."""
        first = arrays[0]
        if first is None:
            return None, None
        if all(a is first for a in arrays):
            return first, None
        if all(a.shape == first.shape and a.dtype == first.dtype for a in arrays) and \
                all(bool(jnp.array_equal(a, first)) for a in arrays[1:]):
            for lr in self.learners:
                setattr(lr, name, first)
            return first, None
        ids = tuple(id(a) for a in arrays)
        cached = self._stacked.get(name)
        if cached is None or cached[0] != ids:
            cached = (ids, jnp.stack(arrays), arrays)  # keep the sources alive: ids stay theirs
            self._stacked[name] = cached
        return cached[1], 0

    def _stacked_tests(self, tasks):
        """Per-seed test arrays of one task position, stacked (built once; None: sizes differ).
        The learners' own copies are dropped once stacked."""
        key = tasks[0].id
        cache = self.__dict__.setdefault("_test_stacks", {})
        if key not in cache:
            per_seed = [lr.test_arrays(task) for lr, task in zip(self.learners, tasks)]
            if len({a[0].shape for a in per_seed}) != 1:
                return None
            cache[key] = (jnp.stack([a[0] for a in per_seed]), jnp.stack([a[1] for a in per_seed]))
            for lr, task in zip(self.learners, tasks):
                lr._test_cache.pop(task.id, None)
        return cache[key]

    # -- one epoch, one evaluation -----------------------------------------------------------
    def train_epoch(self, tasks: list, epoch: int) -> list[dict]:
        learners = self.learners
        if any(int(lr.train_y.shape[0]) == 0 for lr in learners):
            return [lr.train_epoch(task, epoch) for lr, task in zip(learners, tasks)]
        inputs = [lr.epoch_inputs() for lr in learners]
        try:
            carry = stack([i[0] for i in inputs])
        except (ValueError, TypeError) as ex:
            self._fallback("training", f"the per-seed states cannot be stacked ({str(ex).splitlines()[0]})")
            return [lr.train_epoch(task, epoch) for lr, task in zip(learners, tasks)]
        if len({int(lr.train_y.shape[0]) for lr in learners}) != 1:
            self._fallback("training", "the seeds' training sets differ in size")
            return [lr.train_epoch(task, epoch) for lr, task in zip(learners, tasks)]
        data, axes = [], []
        for k, name in ((1, "train_x"), (2, "train_y"), (3, "train_t"), (4, "mask_table")):
            value, axis = self._data(name, [i[k] for i in inputs])
            data.append(value)
            axes.append(axis)
        start = time.perf_counter()
        carry, losses = self.epoch_fn(tuple(axes))(carry, *data)
        losses = np.asarray(losses)  # waits for the epoch
        elapsed = time.perf_counter() - start
        return [lr.finish_epoch(task, epoch, c, losses[i], elapsed)
                for i, (lr, task, c) in enumerate(zip(learners, tasks, unstack(carry, self.n)))]

    def evaluate(self, tasks_per_seed: list[list], task_il: bool = False) -> list[dict[int, float]]:
        """Each seed's accuracies (percent) on its tasks, as ``JaxLearner.evaluate``."""
        learners = self.learners
        params = stack([lr.params for lr in learners])
        pending = []
        for j, task0 in enumerate(tasks_per_seed[0]):
            tasks = [ts[j] for ts in tasks_per_seed]
            if self.shared_stream:
                x, y = self.lead.test_arrays(task0)
                args, axes = (x, y, self.lead.mask_table), (None, None, None)
            else:
                stacked = self._stacked_tests(tasks)
                if stacked is None:
                    self._fallback("evaluation", "the seeds' test sets differ in size")
                    return [lr.evaluate(ts, task_il=task_il) for lr, ts in zip(learners, tasks_per_seed)]
                mask, mask_axis = self._data("mask_table", [lr.mask_table for lr in learners])
                args, axes = (*stacked, mask), (0, 0, mask_axis)
            task_id = self.lead.put(np.int32(task0.id))
            pending.append((tasks, self.eval_fn(axes, task_il and not self.lead.masks)(params, *args, task_id)))
        out: list[dict[int, float]] = [{} for _ in learners]
        for tasks, correct in pending:
            correct = np.asarray(correct)
            for i, task in enumerate(tasks):
                out[i][task.id] = 100.0 * int(correct[i]) / max(task.num_test, 1)
        return out

    # -- the flow (ContinualLoop.run, for every seed at once) ----------------------------------
    def run(self) -> list:
        loops = self.loops
        lead = loops[0]
        for lp in loops:
            lp.emit("before_fit")
        if lead.eval_initial and lead.state.initial_acc is None and lead.state.completed_tasks == 0:
            accs = self.evaluate([lp.stream.tasks for lp in loops])
            for lp, a in zip(loops, accs):
                lp.state.initial_acc = np.array([a[t.id] for t in lp.stream.tasks])
        for t in range(lead.state.completed_tasks, lead.stream.num_tasks):
            tasks = [lp.stream.tasks[t] for lp in loops]
            start = time.perf_counter()
            for lp, task in zip(loops, tasks):
                lp.state.task, lp.state.epoch = t, -1
                lp.emit("before_task", task)
                lp.emit("before_training", task)
            steps, losses = [0] * self.n, [[] for _ in loops]
            for e in range(lead.epochs_per_task):
                for lp, task in zip(loops, tasks):
                    lp.state.epoch = e
                    lp.emit("before_epoch", task, e)
                stats = self.train_epoch(tasks, e)
                for i, (lp, task) in enumerate(zip(loops, tasks)):
                    steps[i] += stats[i].get("steps", 0)
                    losses[i].append(stats[i].get("loss"))
                    lp.emit("after_epoch", task, e, stats[i])
            for lp, task in zip(loops, tasks):
                lp.emit("after_training", task)
            train_end = time.perf_counter()
            for lp, task in zip(loops, tasks):
                lp.emit("before_eval", task)
            targets = [lp.stream.tasks if lp.eval_on == "all" else lp.stream.tasks[: t + 1] for lp in loops]
            accs = self.evaluate(targets)
            for lp, task, a in zip(loops, tasks, accs):
                for j, acc in a.items():
                    lp.state.acc_matrix[t, j] = acc
            if lead.eval_task_il:
                for lp, a in zip(loops, self.evaluate(targets, task_il=True)):
                    for j, acc in a.items():
                        lp.state.acc_matrix_task_il[t, j] = acc
            for lp, task, a in zip(loops, tasks, accs):
                lp.emit("after_eval", task, a)
            end = time.perf_counter()
            for i, (lp, task) in enumerate(zip(loops, tasks)):
                s = lp.state
                s.train_time_s.append(train_end - start)
                s.eval_time_s.append(end - train_end)
                s.task_time_s.append(end - start)
                s.steps_per_task.append(steps[i])
                s.epoch_losses.append(losses[i])
                s.completed_tasks = t + 1
                lp.emit("after_task", task)
        for lp in loops:
            lp.emit("after_fit")
        return [lp.state for lp in loops]
