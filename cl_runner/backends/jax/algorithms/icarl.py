"""iCaRL: incremental classifier and representation learning (Rebuffi et al. 2017, CVPR) on the
JAX backend, the method of ``cl_runner/backends/torch/algorithms/icarl.py``.

* Training data of a task: its own samples and the exemplars of every class seen before. The
  loss is the paper's sigmoid binary cross-entropy: every output unit u gets the term
  b_u(x) = - [ t_u log g_u(x) + (1 - t_u) log(1 - g_u(x)) ] (g_u = sigmoid of unit u), with
  t_u = g_u(x) under the model as it was before the task for the previous tasks' classes
  ("old"), one-hot for the others; averaged over the batch and, by ``algo.loss_reduction``,
  over every output unit (``original``) or over the units of the classes seen so far
  (``mammoth``), as on the PyTorch backend (its docstring cites the references). The previous
  model's parameters, the units with one-hot targets and the old units (as masks over the
  output units), the number of units averaged over and an on/off flag are the part's state,
  arguments of the compiled epoch.
* After training (host side, between programs): K = ``mem_size`` exemplars in all, m = K //
  (classes seen) per class; old classes keep their first m, each new class gets m chosen by
  herding on the L2-normalised features (``mem_policy: random``: a random order). The features
  come from one compiled feature program over fixed-size chunks; herding itself runs in NumPy
  float64 (herding.py).
* Classification: nearest mean of exemplars, mu_y the mean of the features of class y's
  exemplars; x goes to argmin_y ||phi(x) - mu_y|| over the seen classes (in task-IL over its
  task's classes). With ``algo.normalize_features`` the features are L2-normalised (herding too)
  and mu_y is normalised again; with ``algo.flip_means`` each mean also averages over the
  exemplars' horizontal flips. Before the first task ends the network's outputs decide. The
  means, the seen classes and the flag are arguments of the evaluation program (one
  compilation).

Features phi are the backbone's ``embed`` (the input of its head). The training set grows by the
exemplars, so the epoch program is compiled once per distinct training-set size (typically once
for the first task and once for each later task whose size differs). Seeds run one after another
(the evaluation reads the class means, which the vmapped evaluation does not carry).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.algorithms.replay import icarl_flip_means
from cl_runner.backends.jax.herding import ExemplarMemory, l2_normalize
from cl_runner.backends.jax.learner import JaxLearner, Part
from cl_runner.backends.jax.memory import check_no_batch_norm, derived_seed
from cl_runner.registry import ALGORITHMS


def sigmoid_bce(logits, targets, units, mean_units, weights=None):
    """Binary cross-entropy of sigmoid outputs over the output units marked in ``units`` (a bool
    mask over the last axis), summed over those units and divided by ``mean_units`` (their share
    of a mean over that many units), averaged over the batch (over the samples of weight 1 when
    weighted)."""
    elementwise = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    per_sample = jnp.sum(jnp.where(units[None, :], elementwise, 0.0), axis=1) / mean_units
    if weights is None:
        return jnp.mean(per_sample)
    return jnp.sum(per_sample * weights) / jnp.sum(weights)


def nearest_mean(features, means, allowed, normalize: bool = True):
    """Index of the closest row of ``means`` (units, d) for each feature row (L2-normalised first
    when ``normalize``), among the ``allowed`` units ((units,) bool)."""
    f = features
    if normalize:
        norm = jnp.sqrt(jnp.sum(features * features, axis=1, keepdims=True))
        f = features / jnp.maximum(norm, 1e-12)
    dist = jnp.sqrt(jnp.sum((f[:, None, :] - means[None, :, :]) ** 2, axis=2))
    return jnp.argmin(jnp.where(allowed[None, :], dist, jnp.inf), axis=1)


class ICaRLPart(Part):
    """The loss's state: the previous model (distillation targets), the units with one-hot
    targets ("label"), the previous tasks' old units and the number of units averaged over."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        units = learner.num_outputs()
        self.reduction = str(cfg.loss_reduction)
        self.state = learner.put({"teacher": learner.params, "label": np.zeros(units, bool),
                                  "old": np.zeros(units, bool), "mean_units": np.ones((), np.float32),
                                  "active": np.zeros((), np.float32)})

    def on_before_task(self, task) -> None:
        learner = self.learner
        check_no_batch_norm(learner, "icarl")
        table = np.asarray(learner.mask_table)
        new = table[task.id]
        old = table[: task.id].any(0) & ~new
        # The units the loss is averaged over: the seen ones (mammoth, or a growing head, which
        # owns only those), else every output unit.
        growing = getattr(learner.cfg.backbone, "head", "fixed") != "fixed"
        averaged = new | old if self.reduction == "mammoth" or growing else np.ones_like(new)
        self.state = learner.put({"teacher": learner.params, "label": averaged & ~old, "old": old,
                                  "mean_units": np.float32(averaged.sum()),
                                  "active": np.float32(task.id > 0 and bool(old.any()))})

    def extra_loss(self, params, state, x, y, logits, weights):
        """The old classes' part of the loss: sigmoid BCE toward the previous model's outputs."""
        def distil(_):
            old = self.learner.model.apply({"params": state["teacher"]}, x, train=False)
            targets = jax.nn.sigmoid(jax.lax.stop_gradient(old))
            return sigmoid_bce(logits, targets, state["old"], state["mean_units"], weights)

        return jax.lax.cond(state["active"] > 0, distil, lambda _: jnp.zeros((), logits.dtype), None)


@ALGORITHMS.register("icarl", backend="jax")
class ICaRL(JaxLearner):
    part_classes = (ICaRLPart,)
    vectorize_seeds = False

    def __init__(self, cfg, stream, device, seed):
        super().__init__(cfg, stream, device, seed)
        self.normalize = bool(cfg.algo.normalize_features)
        self.flip_means = icarl_flip_means(cfg)
        self.memory = ExemplarMemory(int(cfg.algo.mem_size), cfg.algo.mem_policy, derived_seed(seed, 4242),
                                     normalize=self.normalize)
        self.feature_dim = int(self.model.feature_dim)
        self.class_means = None  # (output units, d) NumPy; rows of unseen classes unused
        self.seen = np.zeros(self.num_outputs(), bool)
        self._features_fn = jax.jit(self._features_program)

    # -- training ------------------------------------------------------------------------------
    def train_arrays(self, task):
        x, y, t = super().train_arrays(task)
        stored = self.memory.arrays()
        if stored is None:
            return x, y, t
        return (np.concatenate([np.asarray(x), stored[0]]), np.concatenate([np.asarray(y), stored[1]]),
                np.concatenate([t, stored[2]]))

    def loss_from_logits(self, params, part_states, x, y, t, weights, mask_table, logits):
        """The loss's terms of the units that are not old (one-hot targets: 0 for every exemplar
        of an old class and for the units of classes not seen yet) plus the parts' terms (the
        distillation)."""
        state = part_states[0]
        units = jnp.arange(logits.shape[1], dtype=y.dtype)
        targets = (y[:, None] == units[None, :]).astype(logits.dtype)
        loss = sigmoid_bce(logits, targets, state["label"], state["mean_units"], weights)
        for i, p in self._loss_parts:
            extra = p.extra_loss(params, part_states[i], x, y, logits, weights)
            if extra is not None:
                loss = loss + extra
        return loss

    # -- exemplars and class means -------------------------------------------------------------
    def _features_program(self, params, x):
        self.trace_counts["features"] += 1
        return self.eval_model.apply({"params": params}, x, train=False, method="embed")

    def image_features(self, images: np.ndarray) -> np.ndarray:
        """phi of raw images (N, C, H, W) as NumPy float32 (N, d): chunks of ``eval_batch_size``
        (the last one padded), so the feature program is compiled once."""
        n, bs = len(images), self.eval_batch_size
        out = []
        for lo in range(0, n, bs):
            chunk = np.asarray(images[lo:lo + bs])
            k = len(chunk)
            if k < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - k, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(self._features_fn(self.params, self.to_input(chunk)))[:k])
        return np.concatenate(out) if out else np.zeros((0, self.feature_dim), np.float32)

    def on_after_training(self, task) -> None:
        super().on_after_training(task)
        self.memory.add_task(task, self.image_features)
        self.update_class_means()

    def exemplar_mean(self, images: np.ndarray) -> np.ndarray:
        """mu of one class's exemplars (uint8 images): the mean of their (normalised) features;
        with ``flip_means`` the average of that and the same mean over the images flipped
        horizontally; normalised again when the features are."""
        def mean_of(x: np.ndarray) -> np.ndarray:
            feats = self.image_features(x)
            return (l2_normalize(feats) if self.normalize else feats).mean(0)

        mu = mean_of(images)
        if self.flip_means:
            mu = (mu + mean_of(np.ascontiguousarray(images[..., ::-1]))) / 2
        return l2_normalize(mu[None])[0] if self.normalize else mu

    def update_class_means(self) -> None:
        """mu_y for every class that has exemplars."""
        means = np.zeros((self.num_outputs(), self.feature_dim), np.float32)
        self.seen = np.zeros(self.num_outputs(), bool)
        for c, (images, _) in self.memory.sets.items():
            means[c] = self.exemplar_mean(images)
            self.seen[c] = True
        self.class_means = means

    # -- evaluation ----------------------------------------------------------------------------
    def eval_params(self):
        means = self.class_means if self.class_means is not None else \
            np.zeros((self.num_outputs(), self.feature_dim), np.float32)
        return {"params": self.params, "means": self.put(means), "seen": self.put(self.seen),
                "nme": self.put(np.asarray(self.class_means is not None))}

    def _predict(self, variables, x, units):
        """Predicted units for inputs ``x``: the nearest class mean among the seen classes (and
        among ``units``, a bool mask, unless None), or before there are means the largest
        output (among ``units``)."""
        params = variables["params"]
        feats = self.eval_model.apply({"params": params}, x, train=False, method="embed")
        logits = self.eval_model.apply({"params": params}, feats, method=lambda m, f: m.head(f))
        allowed = variables["seen"]
        if units is not None:
            logits = jnp.where(units, logits, -jnp.inf)
            allowed = allowed & units
        by_means = nearest_mean(feats, variables["means"], allowed, self.normalize)
        return jnp.where(variables["nme"], by_means, jnp.argmax(logits, axis=1))

    def _eval_program(self, params, x, y, mask_table, task_id, task_il: bool = False):
        self.trace_counts["eval"] += 1
        units = mask_table[task_id] if self.masks or task_il else None

        def batch(args):
            xb, yb = args
            return jnp.sum(self._predict(params, xb, units) == yb)

        return jnp.sum(jax.lax.map(batch, (x, y)))

    def predict(self, x, task_id: int | None = None):
        units = self.mask_table[task_id] if self.masks and task_id is not None else None
        return self._predict(self.eval_params(), x, units)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "exemplars": self.memory.state_dict(),
                "class_means": None if self.class_means is None else np.array(self.class_means),
                "seen": self.seen.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["exemplars"])
        self.class_means = None if state["class_means"] is None else np.asarray(state["class_means"], np.float32)
        self.seen = np.asarray(state["seen"], bool)
