"""Averaged Gradient Episodic Memory (Chaudhry et al. 2019, "Efficient Lifelong Learning with
A-GEM", ICLR) on the JAX backend.

Each task keeps an episodic memory of its samples (by default a ring of ``mem_per_task`` slots
per task: the task's last samples). At every step, with g the gradient of the stream batch's
loss and g_ref the gradient of the loss on ``replay_batch_size`` samples drawn from the memories
of the previous tasks, the update uses

    g~ = g - (min(g . g_ref, 0) / g_ref . g_ref) g_ref,

so that, to first order, the step does not increase the average loss on the memory. The dot
products run over all parameters at once. The reference gradient and the projection are
computed inside the compiled step (``adjust_grads``) from the memory in the part's state; the
draw is restricted to tasks before the current one (its id is in the state too). With an empty
memory g_ref = 0 and the update is g (fine-tuning); the reference pass is then skipped. In
task-IL the reference loss uses each memory sample's task units. With ``benchmark.augment``
the memory keeps the stream's inputs before augmentation and the reference batch is augmented
afresh when drawn. ``mem_policy: class_ring`` is the reference code's episodic memory (each
class of each task keeps its last ``mem_per_class`` samples; memory.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.backends.jax.memory import SAMPLE, MemoryPart
from cl_runner.registry import ALGORITHMS

tmap = jax.tree_util.tree_map


def tree_dot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def agem_project(grads, ref):
    """``grads`` projected as A-GEM does against ``ref`` (no branch: the coefficient
    min(g . g_ref, 0) / (g_ref . g_ref) is zero when the gradients do not conflict)."""
    dot = tree_dot(grads, ref)
    ref_sq = tree_dot(ref, ref)
    coef = jnp.minimum(dot, 0.0) / jnp.maximum(ref_sq, jnp.finfo(ref_sq.dtype).tiny)
    return tmap(lambda g, r: g - coef * r, grads, ref)


class AGEMPart(MemoryPart):
    def reference_gradient(self, params, state, batch):
        mx, my, mt, _, valid = batch

        def memory_loss(p):
            return self.masked_ce(state, self.forward(p, state, mx), my, mt, valid)

        return jax.grad(memory_loss)(params)

    def adjust_grads(self, params, state, grads):
        batch = self.draw(state, self.replay_batch_size, SAMPLE, before_task=state["task"])
        # Nothing stored from earlier tasks (the first task): g_ref = 0, g unchanged; the
        # reference pass is skipped then.
        return jax.lax.cond(jnp.any(batch[-1]),
                            lambda g: agem_project(g, self.reference_gradient(params, state, batch)),
                            lambda g: g, grads)


@ALGORITHMS.register("agem", backend="jax")
class AGEM(JaxLearner):
    part_classes = (AGEMPart,)
