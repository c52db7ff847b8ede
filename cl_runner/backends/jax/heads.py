"""Output layers that grow during the stream (``backbone.head``) on the JAX backend.

The PyTorch backend (``cl_runner/backends/torch/heads.py``) grows its head: ``incremental``
(class-IL, domain-IL) adds a linear chunk for the output units of classes not seen before when a
task brings them; ``multihead`` (task-IL) adds a linear chunk over each task's units. Units no
chunk owns read -inf (no probability, never predicted); a chunk whose units a step does not use
(an old task's head in task-IL) gets no optimizer step at all.

Growing parameter shapes would mean one compilation per task here, so the JAX backend allocates
the full head (one linear layer over every output unit, the same parameter tree as
``head=fixed``) up front and reproduces the growing head exactly:

* **Ownership.** The learner's task-IL table ``mask_table`` (an argument of every compiled
  program) keeps the rows of the tasks started so far; the rows of later tasks are all False
  until their task starts (:meth:`GrowingHead.table`). The units owned are the union of the rows,
  ``mask_table.any(0)``, and ``JaxLearner.masked`` / evaluation set every other unit to -inf:
  the softmax runs over the units seen so far, as on PyTorch, in the one compiled program.
  Copies of the table kept in parts' states (replay memories) are refreshed with it.
* **Untouched until owned, untouched while unused.** After each optimizer step the head's
  columns (kernel columns and bias entries) of units not used by the step keep their old values
  *and* their old optimizer state (momentum, Adam moments): ``incremental`` uses the owned units;
  ``multihead`` the units of the tasks whose samples enter the learner's task loss
  (``criterion``): the stream batch's, and ER's replayed samples' (PyTorch drops the gradient of
  the other chunks, so the optimizer skips them; the task ids it uses are the ones given to its
  training step, which for ER include the replayed samples'). A head reached only through
  another loss term (LwF's distillation, DER's replayed logits) is not moved, on either backend.
  Algorithms that replace the learner's ``train_step`` altogether do not get this filter. A
  unit's weights therefore stay at their initial draw (the same distribution PyTorch's new chunk
  is drawn from: U(+-1/sqrt(fan_in))) until its task starts, and its momentum buffer starts from
  zero, as a new parameter group's does.

With ``backbone.init=xavier_uniform`` each chunk's columns are drawn with the Glorot bound of
the chunk's own size, as PyTorch's chunks are. One difference remains: with
``optimizer.type=adam`` the bias correction of the moments uses the optimizer's global step
count, while PyTorch counts the steps of each chunk from its creation; with SGD (with or without
momentum, weight decay, Nesterov) the two backends are identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.errors import ConfigError

HEADS = ("fixed", "incremental", "multihead")
_SCENARIOS = {"incremental": ("class_il", "domain_il"), "multihead": ("task_il",)}


class GrowingHead:
    """The host-side bookkeeping of a growing head, and the traced step filter."""

    def __init__(self, learner, kind: str):
        if kind not in HEADS:
            raise ConfigError(f"config key 'backbone.head': '{kind}' is not one of {', '.join(HEADS)}.")
        scenario = learner.stream.scenario
        if scenario not in _SCENARIOS[kind]:
            raise ConfigError(f"backbone.head={kind} is not defined for the {scenario} scenario (it "
                              f"supports: {', '.join(_SCENARIOS[kind])}); use backbone.head=fixed"
                              f"{' or multihead' if scenario == 'task_il' else ' or incremental'}.")
        self.kind = kind
        self.full = np.array(learner.mask_table, dtype=bool)
        self.num_outputs = self.full.shape[1]
        self._probe = None      # traced, inside a step's gradient only (value_and_grad)
        self.step_used = None   # traced, from value_and_grad to the step's keep_unused
        if kind == "multihead":
            count = self.full.sum(0)
            if (count > 1).any():
                units = np.flatnonzero(count > 1).tolist()
                raise ConfigError(f"backbone.head=multihead needs disjoint output units per task; units "
                                  f"{units} belong to several tasks.")
        if getattr(learner.cfg.backbone, "init", "default") == "xavier_uniform":
            learner.params = self._xavier_per_chunk(learner)

    def chunks(self) -> list[np.ndarray]:
        """The output units of each chunk PyTorch would add, in order (empty ones left out)."""
        out, owned = [], np.zeros(self.full.shape[1], bool)
        for row in self.full:
            units = row if self.kind == "multihead" else row & ~owned
            if units.any():
                out.append(np.flatnonzero(units))
            owned |= row
        return out

    def _xavier_per_chunk(self, learner):
        """Glorot bounds of each chunk's own fan_out, as PyTorch's new chunk (the full head's
        kernel was drawn with the bound of all the units; rescaling a uniform draw keeps it uniform)."""
        kernel = np.array(learner.params["head"]["kernel"])
        fan_in, total = kernel.shape
        full_bound = np.sqrt(6.0 / (fan_in + total))
        for units in self.chunks():
            kernel[:, units] *= np.sqrt(6.0 / (fan_in + len(units))) / full_bound
        return learner.put({**learner.params, "head": {**learner.params["head"], "kernel": kernel}})

    def table(self, task_id: int) -> np.ndarray:
        """The mask table while task ``task_id`` trains: the rows of tasks 0..task_id."""
        out = np.zeros_like(self.full)
        out[: task_id + 1] = self.full[: task_id + 1]
        return out

    # -- traced ----------------------------------------------------------------------------------
    def value_and_grad(self, fn):
        """``jax.value_and_grad(fn, has_aux=True)`` that also leaves in ``step_used`` the units of
        the tasks whose samples entered the learner's task loss (``criterion``) in this step.

        PyTorch keeps the heads of the task ids given to its training step (the stream batch's,
        and ER's replayed samples'); a loss term outside the criterion (a distillation, DER's
        replayed logits) does not count there. Here ``criterion`` adds sum(probe * units) with
        probe = 0 (:meth:`mark_used`): the loss and the parameters' gradient are unchanged and
        the gradient with respect to the probe is the units its samples used."""
        def wrapped(params, probe, *args):
            self._probe = probe
            try:
                return fn(params, *args)
            finally:
                self._probe = None

        def run(params, *args):
            probe = jnp.zeros(self.num_outputs, jnp.float32)
            value, (grads, used) = jax.value_and_grad(wrapped, argnums=(0, 1), has_aux=True)(params, probe, *args)
            self.step_used = used != 0
            return value, grads

        return run

    def mark_used(self, losses, t, weights, mask_table):
        """``losses`` (per sample), plus a zero term whose probe gradient marks the units used."""
        if self._probe is None or t is None:
            return losses
        rows = mask_table[t]
        if weights is not None:
            rows = rows & (weights > 0)[:, None]
        units = jnp.any(rows, axis=0).astype(losses.dtype)
        return losses + jnp.sum(self._probe * units)  # adds 0; d/d probe of the mean: the units

    def used_units(self, t, weights, mask_table, marked=None):
        """Boolean (num_outputs,): the head units the step may move (``marked``: the units
        :meth:`value_and_grad` saw used by the task loss)."""
        owned = jnp.any(mask_table, axis=0)
        if self.kind == "incremental" or t is None:
            return owned
        rows = mask_table[t]
        if weights is not None:
            rows = rows & (weights > 0)[:, None]
        used = jnp.any(rows, axis=0)
        if marked is not None:
            used = used | marked
        return used & owned

    def keep_unused(self, old_params, new_params, old_opt_state, new_opt_state, used):
        """``new_params`` and ``new_opt_state`` with the head columns of units not ``used`` taken
        from the old ones."""
        head = old_params["head"]
        shapes = {tuple(head["kernel"].shape), tuple(head["bias"].shape)}

        def select(old, new):
            return jnp.where(used, new, old)  # broadcasts over the last (unit) axis

        params = {**new_params, "head": jax.tree_util.tree_map(select, head, new_params["head"])}

        def state_leaf(path, old, new):
            in_head = any(getattr(k, "key", None) == "head" for k in path)
            if in_head and hasattr(new, "shape") and tuple(new.shape) in shapes and new.ndim >= 1:
                return select(old, new)
            return new

        opt_state = jax.tree_util.tree_map_with_path(state_leaf, old_opt_state, new_opt_state)
        return params, opt_state


def build_head(learner):
    """The learner's :class:`GrowingHead`, or None for ``backbone.head=fixed``."""
    kind = getattr(learner.cfg.backbone, "head", "fixed") or "fixed"
    if kind == "fixed":
        return None
    return GrowingHead(learner, kind)


def refresh_tables(learner, table: np.ndarray) -> None:
    """Give the learner (and the parts keeping a copy in their state) the mask table ``table``,
    with the placement of the old one (no recompilation)."""
    learner.mask_table = learner.put(np.asarray(table))
    for part in learner.parts:
        state = part.state
        if isinstance(state, dict) and "mask_table" in state:
            part.state = {**state, "mask_table": learner.put(np.asarray(table))}
