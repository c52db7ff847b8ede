"""Learning without Forgetting (Li & Hoiem 2016, ECCV; 2017, TPAMI) on the JAX backend.

At the start of each task after the first, the current parameters become the previous model
(kept in eval mode: no dropout). Every step adds to the new task's loss

    alpha * L_old,   L_old = - sum_j y'_j log yhat'_j,

the cross-entropy between the previous model's and the current model's outputs on the current
batch, both softened with temperature T (the paper's modified cross-entropy, lambda_o = alpha,
no factor T^2). Which outputs are distilled depends on the scenario, as on the PyTorch backend:
class-IL, the logits of every class of the previous tasks as one softmax; domain-IL, all output
units; task-IL, each previous task's head as its own softmax, the terms summed over the heads.

The previous model's parameters, the table of distilled heads (one row of output units per
head; rows of no unit distil nothing) and an on/off flag (off during the first task) are the
part's state, arguments of the compiled epoch: each task's epochs see the model as it was at
that task's start, with one program for every task.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.backends.jax.learner import JaxLearner, Part
from cl_runner.backends.jax.memory import check_no_batch_norm
from cl_runner.registry import ALGORITHMS


def head_distillation_loss(logits, old_logits, heads, temperature: float, weights=None):
    """Mean over the batch (over the samples of weight 1 when weighted) of
    -sum_heads sum_{j in head} softmax(old / T)_j log softmax(new / T)_j, each head (a row of
    ``heads``, output units) its own softmax; a head of no unit adds 0."""
    keep = heads[None]  # (1, H, U)
    big_negative = jnp.finfo(logits.dtype).min / 4  # finite, so an empty head gives no NaN
    new = jnp.where(keep, (logits / temperature)[:, None, :], big_negative)
    old = jnp.where(keep, (old_logits / temperature)[:, None, :], big_negative)
    terms = jax.nn.softmax(old, axis=2) * jax.nn.log_softmax(new, axis=2)
    per_sample = -jnp.sum(jnp.where(keep, terms, 0.0), axis=(1, 2))
    if weights is None:
        return jnp.mean(per_sample)
    return jnp.sum(per_sample * weights) / jnp.sum(weights)


class LwFPart(Part):
    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.alpha = float(cfg.alpha)
        self.temperature = float(cfg.temperature)
        rows = learner.stream.num_tasks if learner.masks else 1
        self.state = learner.put({"teacher": learner.params,
                                  "heads": np.zeros((rows, learner.num_outputs()), bool),
                                  "active": np.zeros((), np.float32)})

    def on_before_task(self, task) -> None:
        learner = self.learner
        check_no_batch_norm(learner, "lwf")
        table = np.asarray(learner.mask_table)
        old = table[: task.id]
        if learner.masks:
            heads = np.zeros_like(table)
            heads[: task.id] = old
        else:
            heads = old.any(0, keepdims=True)
        self.state = learner.put({"teacher": learner.params, "heads": heads,
                                  "active": np.float32(task.id > 0)})

    def extra_loss(self, params, state, x, y, logits, weights):
        def distil(_):
            old = self.learner.model.apply({"params": state["teacher"]}, x, train=False)
            return head_distillation_loss(logits, jax.lax.stop_gradient(old), state["heads"],
                                          self.temperature, weights)

        # The previous model's forward pass runs only once there is a previous model.
        loss = jax.lax.cond(state["active"] > 0, distil, lambda _: jnp.zeros((), logits.dtype), None)
        return self.alpha * loss


@ALGORITHMS.register("lwf", backend="jax")
class LwF(JaxLearner):
    part_classes = (LwFPart,)
