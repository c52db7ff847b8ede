"""Learning without Forgetting (Li & Hoiem 2016, ECCV; 2017, TPAMI) on the JAX backend, the
method of ``cl_runner/backends/torch/algorithms/lwf.py`` (see its docstring for the references).

At the start of each task after the first, the current parameters become the previous model
(kept in eval mode: no dropout). Every step's loss is

    w_ce * CE  +  w_kd * alpha_t * L_old,   L_old = - sum_j y'_j log yhat'_j,

the cross-entropy between the previous model's and the current model's outputs on the current
batch, both softened with temperature T (the paper's modified cross-entropy, lambda_o = alpha,
no factor T^2 unless ``temperature_squared``); w_ce and w_kd come from ``alpha_rule``. Which
outputs are distilled depends on the scenario, as on the PyTorch backend: class-IL, the logits of
every class of the previous tasks as one softmax (with ``distill_units=seen`` the current model's
softmax covers every class seen so far); domain-IL, all output units; task-IL, each previous
task's head as its own softmax, the terms summed (or averaged, ``head_reduction``) over the heads.

The previous model's parameters, the tables of distilled units (one row per softmax, the
previous model's and the current model's units; rows of no unit distil nothing), the units of the
cross-entropy, the two loss weights and an on/off flag (off during the first task) are the part's
state, arguments of the compiled epoch: each task's epochs see the model as it was at that
task's start, with one program for every task. The warm-up of the new output units (the same as
the PyTorch backend's) is its own compiled program, run from ``on_before_task``. With
``teacher_inputs=not_aug`` the previous model sees the step's images before augmentation and
normalisation (Mammoth's recorded logits; see the PyTorch backend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.algorithms.distillation import check_lwf_stream, lwf_loss_weights, per_task_value
from cl_runner.backends.jax.augment import random_crop_flip
from cl_runner.backends.jax.learner import JaxLearner, Part, cross_entropy
from cl_runner.backends.jax.memory import check_no_batch_norm, derived_seed
from cl_runner.registry import ALGORITHMS


def head_distillation_loss(logits, old_logits, heads, temperature: float, weights=None, student_heads=None,
                           kd_reduction: str = "sum", head_reduction: str = "sum"):
    """Mean over the batch (over the samples of weight 1 when weighted) of the distillation terms
    of the heads (rows of ``heads``: the previous model's units of each softmax; ``student_heads``:
    the current model's, None for the same), summed or averaged (``head_reduction``) over the
    heads; per head -sum_{j} softmax(old / T)_j log softmax(new / T)_j, divided by the number of
    units of the current model's softmax when ``kd_reduction`` is mean. A head of no unit adds 0
    (and, in the mean over heads, does not count)."""
    student = heads if student_heads is None else student_heads
    keep_old, keep_new = heads[None], student[None]  # (1, H, U)
    big_negative = jnp.finfo(logits.dtype).min / 4  # finite, so an empty head gives no NaN
    new = jnp.where(keep_new, (logits / temperature)[:, None, :], big_negative)
    old = jnp.where(keep_old, (old_logits / temperature)[:, None, :], big_negative)
    terms = jax.nn.softmax(old, axis=2) * jax.nn.log_softmax(new, axis=2)
    per_head = -jnp.sum(jnp.where(keep_new, terms, 0.0), axis=2)  # (N, H)
    units = jnp.sum(student, axis=1)
    if kd_reduction == "mean":
        per_head = per_head / jnp.maximum(units, 1)
    per_sample = jnp.sum(per_head, axis=1)
    if head_reduction == "mean":
        per_sample = per_sample / jnp.maximum(jnp.sum(units > 0), 1)
    if weights is None:
        return jnp.mean(per_sample)
    return jnp.sum(per_sample * weights) / jnp.sum(weights)


class LwFPart(Part):
    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        check_lwf_stream(cfg, learner.stream)
        self.temperature = float(cfg.temperature)
        self.kd_reduction = str(cfg.kd_reduction)
        self.head_reduction = str(cfg.head_reduction)
        rows = learner.stream.num_tasks if learner.masks else 1
        units = learner.num_outputs()
        self.state = learner.put({"teacher": learner.params,
                                  "heads": np.zeros((rows, units), bool),
                                  "student_heads": np.zeros((rows, units), bool),
                                  "ce_units": np.ones(units, bool),
                                  "ce_weight": np.ones((), np.float32),
                                  "kd_weight": np.ones((), np.float32),
                                  "active": np.zeros((), np.float32)})
        self.warmup_key = learner.put(jax.random.PRNGKey(derived_seed(learner.seed, 4711)))
        self._warmup_fn = jax.jit(self._warmup_program)

    def on_before_task(self, task) -> None:
        learner, cfg = self.learner, self.cfg
        check_no_batch_norm(learner, "lwf")
        table = np.asarray(learner.mask_table)
        seen = table[: task.id + 1].any(0)
        old = table[: task.id].any(0)
        ce_weight, kd_weight = lwf_loss_weights(cfg.alpha_rule, task.id, int(old.sum()), int(seen.sum()))
        kd_weight *= per_task_value(cfg.alpha, task.id, "algo.alpha")
        if cfg.temperature_squared:
            kd_weight *= self.temperature ** 2
        if learner.masks:
            heads = np.zeros_like(table)
            heads[: task.id] = table[: task.id]
            student = heads
        else:
            heads = old[None]
            student = seen[None] if cfg.distill_units == "seen" else heads
        ce_units = seen if cfg.ce_units == "seen" else np.ones_like(seen)
        self.state = learner.put({"teacher": learner.params, "heads": heads, "student_heads": student,
                                  "ce_units": ce_units, "ce_weight": np.float32(ce_weight),
                                  "kd_weight": np.float32(kd_weight), "active": np.float32(task.id > 0)})
        if task.id > 0 and cfg.warmup_epochs:
            self.warm_up(task)

    def warm_up(self, task) -> None:
        """Train the new task's output units alone (the PyTorch backend's warm-up)."""
        learner = self.learner
        lr = self.cfg.warmup_lr if self.cfg.warmup_lr is not None else learner.cfg.optimizer.lr
        new_units = learner.mask_table[task.id]
        params, key = learner.params, self.warmup_key
        for _ in range(int(self.cfg.warmup_epochs)):
            params, key = self._warmup_fn(params, key, learner.train_x, learner.train_y, new_units,
                                          jnp.float32(lr))
        learner.params, self.warmup_key = params, key

    def _warmup_program(self, params, key, x, y, new_units, lr):
        """One warm-up epoch: shuffled batches (the last one padded and masked out, as the
        learner's epoch), plain SGD on the output layer's parameters only."""
        learner = self.learner
        model = learner.model
        n, bs = y.shape[0], learner.batch_size
        num_batches = -(-n // bs)
        pad = num_batches * bs - n
        key, perm_key = jax.random.split(key)
        perm = jax.random.permutation(perm_key, n).astype(jnp.int32)
        batches = jnp.concatenate([perm, jnp.zeros(pad, jnp.int32)]).reshape(num_batches, bs)
        weights = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)]).reshape(num_batches, bs)
        augment = learner._augment

        def head_logits(head_params, feats):
            return model.apply({"params": {**params, "head": head_params}}, feats,
                               method=lambda m, f: m.head(f))

        def step(carry, batch_and_weights):
            head, key = carry
            batch, w = batch_and_weights
            xb = x[batch]
            if augment is not None:
                key, augment_key = jax.random.split(key)
                xb = random_crop_flip(augment_key, xb, *augment)
            feats = jax.lax.stop_gradient(model.apply({"params": params}, xb, train=False, method="embed"))

            def loss_fn(h):
                logits = jnp.where(new_units, head_logits(h, feats), -jnp.inf)
                return jnp.sum(cross_entropy(logits, y[batch]) * w) / jnp.sum(w)

            grads = jax.grad(loss_fn)(head)
            return (jax.tree_util.tree_map(lambda p, g: p - lr * g, head, grads), key), None

        (head, key), _ = jax.lax.scan(step, (params["head"], key), (batches, weights))
        return {**params, "head": head}, key

    def teacher_input(self, x):
        """The previous model's input for the step's batch ``x`` (``teacher_inputs``; traced)."""
        if self.cfg.teacher_inputs != "not_aug":
            return x
        learner = self.learner
        return learner.stream_inputs(x) * learner._std + learner._mean  # undo (x / 255 - mean) / std

    def extra_loss(self, params, state, x, y, logits, weights):
        def distil(_):
            old = self.learner.model.apply({"params": state["teacher"]}, self.teacher_input(x), train=False)
            return head_distillation_loss(logits, jax.lax.stop_gradient(old), state["heads"], self.temperature,
                                          weights, state["student_heads"], self.kd_reduction,
                                          self.head_reduction)

        # The previous model's forward pass runs only once there is a previous model.
        loss = jax.lax.cond(state["active"] > 0, distil, lambda _: jnp.zeros((), logits.dtype), None)
        return state["kd_weight"] * loss

    def state_dict(self):
        return {**super().state_dict(), "warmup_key": np.asarray(self.warmup_key)}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if "warmup_key" in state:
            self.warmup_key = self.learner.put(jnp.asarray(state["warmup_key"]))


@ALGORITHMS.register("lwf", backend="jax")
class LwF(JaxLearner):
    part_classes = (LwFPart,)

    def loss_from_logits(self, params, part_states, x, y, t, weights, mask_table, logits):
        """The task loss weighted by ``alpha_rule``'s w_ce (over the units of the classes seen so
        far with ``ce_units=seen``), plus the parts' terms."""
        state = part_states[0]
        logits_ce = jnp.where(state["ce_units"], logits, -jnp.inf)
        loss = state["ce_weight"] * self.criterion(logits_ce, y, t, mask_table, weights)
        for i, p in self._loss_parts:
            extra = p.extra_loss(params, part_states[i], x, y, logits, weights)
            if extra is not None:
                loss = loss + extra
        return loss
