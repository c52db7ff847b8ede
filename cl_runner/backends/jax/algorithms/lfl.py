"""Less-Forgetful Learning (Jung et al. 2018, AAAI, "Less-forgetful learning for domain
expansion in deep neural networks") on the JAX backend, the method of
``cl_runner/backends/torch/algorithms/lfl.py``.

Start each new task from the previous network, fix the weights of the output units of the
previous tasks, and train on the new data with

    L_t(x)  +  lambda_e * L_e(x),   L_e(x) = 1/2 || f_old(x) - f(x) ||_2^2,

f the representation fed to the output layer (the backbone's ``embed``) and f_old that of the
previous network, L_e averaged over the batch (``feature_distance=mse``: the mean over the
feature units of (f - f_old)^2, Avalanche's and SequeL's scale; ``lambda_e`` may list one value
per task). Both f and f_old are computed without dropout (SequeL's JAX LFL: ``training=False``;
Avalanche: ``model.eval()``). In domain-IL every output unit is old after the first task and the
whole output layer is frozen; in class- and task-IL only the previous tasks' units
(``freeze_head``).

The previous parameters, the frozen units (a mask over the output units), their saved head
weights, lambda_e of the task and an on/off flag are the part's state, arguments of the compiled
epoch. The frozen units are written back after every optimizer step inside the compiled step (so
momentum or weight decay cannot move them): the part wraps the learner's ``train_step`` when it
is attached, so this also holds when LfL is a plugin of another algorithm. f(x) is a second
forward pass of the feature extractor (in eval mode) beside the step's own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.algorithms.distillation import check_per_task_value, per_task_value
from cl_runner.backends.jax.learner import JaxLearner, Part
from cl_runner.backends.jax.memory import check_no_batch_norm
from cl_runner.registry import ALGORITHMS, PLUGINS


def feature_loss(features, old_features, weights=None, distance: str = "half_sq"):
    """Mean over the batch (over the samples of weight 1 when weighted) of 1/2 ||f - f_old||^2
    (half_sq), or of the mean over the feature units of (f - f_old)^2 (mse)."""
    squares = (features - old_features) ** 2
    if distance == "mse":
        per_sample = jnp.mean(squares, axis=1)
    else:
        per_sample = 0.5 * jnp.sum(squares, axis=1)
    if weights is None:
        return jnp.mean(per_sample)
    return jnp.sum(per_sample * weights) / jnp.sum(weights)


def restore_head(params, frozen, saved):
    """``params`` with the output units marked in ``frozen`` set back to ``saved`` (a head
    subtree {"kernel": (d, units), "bias": (units,)})."""
    head = params["head"]
    new_head = {"kernel": jnp.where(frozen[None, :], saved["kernel"], head["kernel"]),
                "bias": jnp.where(frozen, saved["bias"], head["bias"])}
    return {**params, "head": {**head, **new_head}}


class LFLPart(Part):
    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        check_per_task_value(cfg.lambda_e, "algo.lambda_e", learner.stream.num_tasks)
        self.distance = str(cfg.feature_distance)
        self.freeze_head = bool(cfg.freeze_head)
        self.state = learner.put({
            "teacher": learner.params,
            "active": np.zeros((), np.float32),
            "lambda_e": np.float32(per_task_value(cfg.lambda_e, 0, "algo.lambda_e")),
            "frozen": np.zeros(learner.num_outputs(), bool),
            "saved_head": learner.params["head"],
        })
        self._wrap_train_step(learner)

    def _wrap_train_step(self, learner) -> None:
        """After every optimizer step, write the frozen output units back (traced)."""
        step = learner.train_step

        def train_step(carry, *args):
            (params, opt_state, part_states, key), loss = step(carry, *args)
            i = learner.parts.index(self)
            state = part_states[i]
            params = restore_head(params, state["frozen"], state["saved_head"])
            return (params, opt_state, part_states, key), loss

        learner.train_step = train_step

    def on_before_task(self, task) -> None:
        learner = self.learner
        check_no_batch_norm(learner, "lfl")
        frozen = np.zeros(learner.num_outputs(), bool)
        if task.id > 0 and self.freeze_head:
            frozen = np.asarray(learner.mask_table)[: task.id].any(0)
        lambda_e = per_task_value(self.cfg.lambda_e, task.id, "algo.lambda_e")
        self.state = learner.put({**self.state, "teacher": learner.params, "active": np.float32(task.id > 0),
                                  "lambda_e": np.float32(lambda_e), "frozen": frozen,
                                  "saved_head": learner.params["head"]})

    def extra_loss(self, params, state, x, y, logits, weights):
        model = self.learner.model

        def penalty(_):
            target = model.apply({"params": state["teacher"]}, x, train=False, method="embed")
            feats = model.apply({"params": params}, x, train=False, method="embed")
            return feature_loss(feats, jax.lax.stop_gradient(target), weights, self.distance)

        loss = jax.lax.cond(state["active"] > 0, penalty, lambda _: jnp.zeros((), logits.dtype), None)
        return state["lambda_e"] * loss


@ALGORITHMS.register("lfl", backend="jax")
class LFL(JaxLearner):
    part_classes = (LFLPart,)


PLUGINS.register("lfl", backend="jax")(LFLPart)
