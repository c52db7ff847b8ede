"""Several seeds of one experiment trained together: one compiled program per epoch (JAX backend).

``clrun backend=jax seeds=[0,1,2,3,4]`` builds one ordinary :class:`JaxLearner` per seed, each
with its own :class:`ContinualLoop`, callbacks and output folder, and drives the loops in lock
step. The host-side work stays per seed (the parts' ``on_before_task`` / ``on_after_training``
hooks such as EWC's Fisher, callbacks, checkpoints). Only the epoch and the evaluation run as one
program for all seeds: the per-seed epoch-program arguments (parameters, optimizer state, the
parts' states, PRNG key; see ``JaxLearner.epoch_inputs``) are stacked into one batched pytree,
one compiled program trains every seed, and the result is sliced back into each learner
(``JaxLearner.finish_epoch``). The training and test data enter the program once, unbatched, when
they are the same for every seed (Rotated MNIST without subsets...; the seeds then also share one
converted copy of each task's images), and stacked per seed when the stream depends on the seed
(Permuted MNIST, subsets, ``class_order: seed``...).

How the program holds the seeds (``backend.seed_program``): ``vmap`` batches their arithmetic
(``jax.vmap(learner._epoch_program)``), which suits accelerators; ``unroll`` scans once over the
steps and takes every seed's step in turn inside each iteration, which on a CPU runs the plain
matrix products XLA does fastest and gives each seed exactly the numbers of its own run, but
compiles slower; ``auto`` (the default) unrolls on a CPU for runs of ``SeedGroup.long_run_steps``
steps or more. Such runs on a CPU also spread the seeds over the CPU devices (one per core, see
``backends/jax/__init__.py``; also whenever JAX_NUM_CPU_DEVICES is set): each device's cohort of
seeds is one program, and the cohorts run side by side.

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
from cl_runner.errors import ConfigError


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


def training_steps(stream, batch_size: int, epochs: int) -> int:
    """Training steps of one seed's run: every task's batches, every epoch."""
    bs = max(1, int(batch_size))
    return int(epochs) * sum(-(-t.num_train // bs) for t in stream.tasks)


def stack(trees):
    """One pytree whose leaves are the per-seed leaves stacked on a new leading axis."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree, n: int) -> list:
    """The inverse of :func:`stack`: the per-seed pytrees."""
    return [jax.tree_util.tree_map(lambda a, i=i: a[i], tree) for i in range(n)]


class SeedGroup:
    """Runs the loops of several seeds in lock step, training and evaluating them as one program
    per device.

    ``loops[i].learner`` is seed i's learner; all learners are instances of one class built from
    configs that differ only in the seed. The learners on one device form a cohort, which trains
    as one program; the cohorts on different devices (several CPU devices: see
    ``backends/jax/__init__.py``) run at the same time. ``note`` receives the one-line messages
    (fallbacks).
    """

    def __init__(self, loops, note: Callable[[str], None] = print):
        self.loops = list(loops)
        self.learners: list[JaxLearner] = [lp.learner for lp in self.loops]
        self.note = note
        self.n = len(self.learners)
        self.lead = self.learners[0]
        lead_stream = self.lead.stream
        self.shared_stream = all(lr.stream is lead_stream for lr in self.learners)
        if self.shared_stream:  # one converted copy of each task's images per device
            shared: dict = {}
            for lr in self.learners:
                lr.shared_inputs = shared
        by_device: dict = {}
        for i, lr in enumerate(self.learners):
            by_device.setdefault(lr.jax_device, []).append(i)
        #: The learners' indices on each device, in seed order.
        self.cohorts: list[list[int]] = list(by_device.values())
        self._epoch_fns: dict[tuple, Callable] = {}
        self._eval_fns: dict[tuple, Callable] = {}
        self._stacked: dict[tuple, tuple] = {}
        self._test_stacks: dict[tuple, tuple] = {}
        self._noted: set[str] = set()
        self.program = self._choose_program(getattr(self.lead.cfg.backend, "seed_program", "auto"))

    #: From this many training steps per seed on, ``seed_program: auto`` unrolls on a CPU and the
    #: seeds are spread over the CPU devices (experiment.py); shorter runs keep one vmapped
    #: program on one device, which compiles once and soonest. Measured on a 2-core CPU (Rotated
    #: MNIST, MLP 2x256, five seeds): at 2-3 tasks x 6,000 steps unrolled took 50-81 s against
    #: 65-90 s vmapped; at 3 tasks x 1,000 steps two runs disagreed (37.7 s against 16.2 s, then
    #: 24.8 s against 34.8 s), so the short runs keep the older program.
    long_run_steps: int = 10_000

    @classmethod
    def long_run(cls, stream, batch_size: int, epochs: int) -> bool:
        """Whether a seed's run has at least ``long_run_steps`` training steps."""
        return training_steps(stream, batch_size, epochs) >= cls.long_run_steps

    def _choose_program(self, setting: str) -> str:
        """``backend.seed_program``: "vmap" batches the seeds' arithmetic (one batched matrix
        product per layer for all seeds; what accelerators run best); "unroll" takes every seed's
        step in turn inside one scan (plain matrix products, which XLA's CPU backend runs faster
        than its batched ones at these sizes, at the price of a longer compilation); "auto":
        unroll on the CPU for runs of at least ``long_run_steps`` steps, vmap otherwise.
        An algorithm that replaces the epoch program (``_epoch_program``) is always vmapped."""
        if setting not in ("auto", "vmap", "unroll"):
            raise ConfigError(f"backend.seed_program={setting!r} is not one of auto, vmap, unroll "
                              f"(how backend=jax trains several seeds together).")
        if type(self.lead)._epoch_program is not JaxLearner._epoch_program:
            return "vmap"
        if setting == "auto":
            long_run = self.long_run(self.lead.stream, self.lead.batch_size, self.loops[0].epochs_per_task)
            return "unroll" if self.lead.jax_device.platform == "cpu" and long_run else "vmap"
        return setting

    # -- compiled programs -------------------------------------------------------------------
    def epoch_fn(self, axes: tuple) -> Callable:
        """The epoch of a cohort's seeds as one compiled program: (stacked carry, x, y, task ids,
        mask table) -> (stacked carry, losses (seeds, num_batches)); ``axes`` gives each data
        argument's seed axis (0 = one per seed, None = shared). ``program`` says how (see
        :meth:`_choose_program`). jit compiles it once per cohort size and device."""
        if axes not in self._epoch_fns:
            if self.program == "vmap":
                fn = jax.vmap(self.lead._epoch_program, in_axes=(0, *axes))
            else:
                fn = functools.partial(self._unrolled_epoch, axes=axes)
            self._epoch_fns[axes] = jax.jit(fn)
        return self._epoch_fns[axes]

    def _unrolled_epoch(self, carry, *data, axes):
        """The epoch with each step taking every seed's step in turn (``JaxLearner.
        _seeds_epoch_program``), in the stacked form ``epoch_fn`` returns."""
        n = jax.tree_util.tree_leaves(carry)[0].shape[0]
        carries = unstack(carry, n)
        per_seed = [tuple(d if a is None else d[i] for d, a in zip(data, axes)) for i in range(n)]
        carries, losses = self.lead._seeds_epoch_program(carries, per_seed)
        return stack(carries), losses.T

    def eval_fn(self, axes: tuple, task_il: bool = False) -> Callable:
        key = (axes, task_il)
        if key not in self._eval_fns:
            program = functools.partial(self.lead._eval_program, task_il=True) if task_il else self.lead._eval_program
            self._eval_fns[key] = jax.jit(jax.vmap(program, in_axes=(0, *axes, None)))
        return self._eval_fns[key]

    def compilations(self) -> dict[str, int]:
        """How many times the epoch and evaluation programs were compiled (once per cohort size
        and device)."""
        return {"epoch": sum(f._cache_size() for f in self._epoch_fns.values()),
                "eval": sum(f._cache_size() for f in self._eval_fns.values())}

    def _fallback(self, what: str, why: str) -> None:
        if what not in self._noted:
            self._noted.add(what)
            self.note(f"{what}: {why}; running the seeds one after another for it.")

    # -- data --------------------------------------------------------------------------------
    def _data(self, name: str, c: int, arrays: list):
        """(value, axis) for cohort ``c``: the one array its seeds have (axis None), or the stack
        (axis 0).

        Equal arrays are detected once (by value) and then made the same object in every
        learner of the cohort (``name`` is the learner attribute), so later epochs compare by
        identity."""
        first = arrays[0]
        if first is None:
            return None, None
        if all(a is first for a in arrays):
            return first, None
        if all(a.shape == first.shape and a.dtype == first.dtype for a in arrays) and \
                all(bool(jnp.array_equal(a, first)) for a in arrays[1:]):
            for i in self.cohorts[c]:
                setattr(self.learners[i], name, first)
            return first, None
        ids = tuple(id(a) for a in arrays)
        cached = self._stacked.get((name, c))
        if cached is None or cached[0] != ids:
            cached = (ids, jnp.stack(arrays), arrays)  # keep the sources alive: ids stay theirs
            self._stacked[(name, c)] = cached
        return cached[1], 0

    def _stacked_tests(self, c: int, tasks):
        """Cohort ``c``'s per-seed test arrays of one task position, stacked (built once; None:
        sizes differ). The learners' own copies are dropped once stacked."""
        key = (c, tasks[0].id)
        if key not in self._test_stacks:
            learners = [self.learners[i] for i in self.cohorts[c]]
            per_seed = [lr.test_arrays(task) for lr, task in zip(learners, tasks)]
            if len({a[0].shape for a in per_seed}) != 1:
                return None
            self._test_stacks[key] = (jnp.stack([a[0] for a in per_seed]), jnp.stack([a[1] for a in per_seed]))
            for lr, task in zip(learners, tasks):
                lr._test_cache.pop(task.id, None)
        return self._test_stacks[key]

    # -- one epoch, one evaluation -----------------------------------------------------------
    def train_epoch(self, tasks: list, epoch: int) -> list[dict]:
        learners = self.learners
        if any(int(lr.train_y.shape[0]) == 0 for lr in learners):
            return [lr.train_epoch(task, epoch) for lr, task in zip(learners, tasks)]
        if len({int(lr.train_y.shape[0]) for lr in learners}) != 1:
            self._fallback("training", "the seeds' training sets differ in size")
            return [lr.train_epoch(task, epoch) for lr, task in zip(learners, tasks)]
        inputs = [lr.epoch_inputs() for lr in learners]
        calls = []
        for c, members in enumerate(self.cohorts):
            try:
                carry = stack([inputs[i][0] for i in members])
            except (ValueError, TypeError) as ex:
                self._fallback("training", f"the per-seed states cannot be stacked ({str(ex).splitlines()[0]})")
                return [lr.train_epoch(task, epoch) for lr, task in zip(learners, tasks)]
            data, axes = [], []
            for k, name in ((1, "train_x"), (2, "train_y"), (3, "train_t"), (4, "mask_table")):
                value, axis = self._data(name, c, [inputs[i][k] for i in members])
                data.append(value)
                axes.append(axis)
            calls.append((members, carry, data, tuple(axes)))
        start = time.perf_counter()
        pending = [(members, self.epoch_fn(axes)(carry, *data)) for members, carry, data, axes in calls]
        done = [(members, carry, np.asarray(losses)) for members, (carry, losses) in pending]  # waits
        elapsed = time.perf_counter() - start
        stats: list = [None] * self.n
        for members, carry, losses in done:
            for j, (i, c) in enumerate(zip(members, unstack(carry, len(members)))):
                stats[i] = learners[i].finish_epoch(tasks[i], epoch, c, losses[j], elapsed)
        return stats

    def evaluate(self, tasks_per_seed: list[list], task_il: bool = False) -> list[dict[int, float]]:
        """Each seed's accuracies (percent) on its tasks, as ``JaxLearner.evaluate``."""
        learners = self.learners
        pending = []
        for c, members in enumerate(self.cohorts):
            head = learners[members[0]]
            params = stack([learners[i].params for i in members])
            for j, task0 in enumerate(tasks_per_seed[members[0]]):
                tasks = [tasks_per_seed[i][j] for i in members]
                if self.shared_stream:
                    x, y = head.test_arrays(task0)
                    args, axes = (x, y, head.mask_table), (None, None, None)
                else:
                    stacked = self._stacked_tests(c, tasks)
                    if stacked is None:
                        self._fallback("evaluation", "the seeds' test sets differ in size")
                        return [lr.evaluate(ts, task_il=task_il) for lr, ts in zip(learners, tasks_per_seed)]
                    mask, mask_axis = self._data("mask_table", c, [learners[i].mask_table for i in members])
                    args, axes = (*stacked, mask), (0, 0, mask_axis)
                task_id = head.put(np.int32(task0.id))
                fn = self.eval_fn(axes, task_il and not head.masks)
                pending.append((members, tasks, fn(params, *args, task_id)))
        out: list[dict[int, float]] = [{} for _ in learners]
        for members, tasks, correct in pending:
            correct = np.asarray(correct)
            for k, (i, task) in enumerate(zip(members, tasks)):
                out[i][task.id] = 100.0 * int(correct[k]) / max(task.num_test, 1)
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
