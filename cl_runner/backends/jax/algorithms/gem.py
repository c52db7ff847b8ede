"""Gradient Episodic Memory (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual
Learning", NeurIPS) on the JAX backend.

Each task keeps an episodic memory of ``mem_per_task`` samples (a ring: the task's latest
samples), device arrays in the part's state filled inside the compiled epoch (memory.py). At
every step, with g the gradient of the stream batch's loss and G the matrix whose rows g_k are
the gradients of the mean loss on each *past* task's memory, the update must not increase any
past task's memory loss to first order: <g~, g_k> >= 0 for every k. When g satisfies every
constraint it is used as is; otherwise g~ = G^T v + g, with v the solution of the paper's dual
quadratic program

    min_v  1/2 v^T (G G^T + eps I) v + g^T G^T v     subject to  v >= gamma,

gamma = ``memory_strength`` (the paper's margin; its released code bounds v below by it) and
eps = ``qp_eps`` (the released code's 1e-3, added at every solve), as on the PyTorch backend.

Inside the compiled step: a loop over the tasks (``lax.map``) in which each past task's row of
G is one forward and backward pass over that task's ``mem_per_task`` slots (a fixed shape; its
empty slots get weight 0) and the rows of the current and later tasks are skipped (zero), then
G g and G G^T. All of it is skipped during the first task (``lax.cond``: nothing is past yet).

Cost of the quadratic program: when some <g, g_k> < 0, the small problem (P = G G^T of shape
num_tasks x num_tasks and q = G g; the host keeps the rows of the past tasks) goes to the host
through ``jax.pure_callback`` and is solved in float64 with ``quadprog`` -- the solver the
PyTorch backend uses, with the same eps and ridge fallback, so both backends get the same v for the same
gradients. Each such step stops the compiled loop for one round trip to Python: measured on a
busy 2-core CPU, ~3 ms per call, which made the steps of tasks 2-3 of a Permuted MNIST run (MLP
784-100-100-10, batch 10, mem_per_task 50, a quarter of the steps projected) ~30% slower than
without the call; on a GPU add one small transfer each way. Steps whose gradient does not
conflict never call the host. The epoch remains one compiled program. In task-IL each memory's
loss uses its task's output units. Under vmapped seeds (``seeds=[...]``) both ``lax.cond`` become
selects: every step computes the past gradients and calls the host once per seed (which returns
v = 0 without a conflict).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.algorithms.replay import _solve_qp, gem_dual
from cl_runner.backends.jax.learner import JaxLearner, Part, cross_entropy
from cl_runner.backends.jax.memory import MemoryPart, ReplayMemory, derived_seed
from cl_runner.registry import ALGORITHMS

tmap = jax.tree_util.tree_map
leaves = jax.tree_util.tree_leaves


def _host_dual(gram, dots, active, margin, eps):
    """The pure_callback body: v (float32, zero outside ``active``, and zero when no active
    constraint is violated)."""
    gram, dots, active = np.asarray(gram), np.asarray(dots), np.asarray(active, bool)
    v = np.zeros(dots.shape, np.float32)
    idx = np.flatnonzero(active)
    if len(idx) and bool((dots[idx] < 0).any()):
        v[idx] = gem_dual(gram[np.ix_(idx, idx)], dots[idx], float(margin), float(eps))
    return v


def tree_rows_dot(G, g):
    """(T,): <G_k, g> for the rows G_k (leading axis) of the pytree ``G``."""
    return sum(jnp.tensordot(a, b, axes=b.ndim) for a, b in zip(leaves(G), leaves(g)))


def tree_gram(G):
    """(T, T): the Gram matrix G G^T of the rows of the pytree ``G``."""
    return sum(jnp.tensordot(a, a, axes=(tuple(range(1, a.ndim)),) * 2) for a in leaves(G))


def gem_project(grads, G, active, margin, eps=1e-3):
    """(g~, projected) for the gradient pytree ``grads`` and the rows ``G`` (a pytree whose leaves
    have a leading task axis) of which those marked ``active`` are constraints: ``grads`` when
    <g, g_k> >= 0 for every active row, else g + G^T v with v from :func:`gem_dual` (traced; the
    QP runs on the host)."""
    dots = tree_rows_dot(G, grads)
    conflict = jnp.any(active & (dots < 0))

    def project(g):
        gram = tree_gram(G)
        # eps goes to the host as the Python float it is (a float32 argument would round 1e-3).
        v = jax.pure_callback(functools.partial(_host_dual, eps=float(eps)),
                              jax.ShapeDtypeStruct(dots.shape, jnp.float32), gram, dots, active,
                              jnp.asarray(margin, jnp.float32), vmap_method="sequential")
        v = jnp.where(active, v, 0.0).astype(dots.dtype)
        return tmap(lambda gl, Gl: gl + jnp.tensordot(v, Gl, axes=1).astype(gl.dtype), g, G)

    return jax.lax.cond(conflict, project, lambda g: g, grads), conflict


class GEMPart(MemoryPart):
    """GEM's per-task ring memory (filled after every step) and the projection of the gradient."""

    def __init__(self, learner, cfg):
        Part.__init__(self, learner, cfg)
        _solve_qp()  # a missing package fails at the start, not at the second task
        self.per_task = int(cfg.mem_per_task)
        self.num_tasks = learner.stream.num_tasks
        self.memory = ReplayMemory("ring", learner.stream.input_shape, per_task=self.per_task,
                                   num_tasks=self.num_tasks, num_outputs=learner.num_outputs())
        self.margin = float(cfg.memory_strength)
        self.eps = float(cfg.qp_eps)
        self.replay_batch_size = self.memory.capacity
        self.host_rng = np.random.default_rng(derived_seed(learner.seed, 7332))
        self.state = learner.put({
            "memory": self.memory.init(),
            "key": jax.random.PRNGKey(derived_seed(learner.seed, 7331)),
            "task": np.zeros((), np.int32),
            "mask_table": np.asarray(learner.mask_table),
        })

    def past_gradients(self, params, state):
        """(G, active): G a pytree like ``params`` with a leading axis of ``num_tasks`` rows, row
        k the gradient of the mean loss on task k's memory (zero unless k is a past task);
        ``active[k]`` marks the past tasks (traced). A loop over the tasks: each past task's
        row is one forward and backward pass over its own ``mem_per_task`` slots; the rows of
        the current and later tasks are skipped."""
        mem, per_task, learner = state["memory"], self.per_task, self.learner
        zeros = tmap(jnp.zeros_like, params)

        def task_gradient(k):
            def grad(_):
                def region(a):
                    return jax.lax.dynamic_slice_in_dim(a, k * per_task, per_task)

                x, y, t, valid = (region(mem[name]) for name in ("x", "y", "t", "filled"))
                # Empty slots: a label among their task's units, so the masked loss stays finite.
                y = jnp.where(valid, y, jnp.argmax(state["mask_table"][t], axis=-1).astype(y.dtype))
                count = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)

                def memory_loss(p):
                    logits = learner.masked(self.forward(p, state, x), t if learner.masks else None,
                                            state["mask_table"])
                    return jnp.sum(jnp.where(valid, cross_entropy(logits, y), 0.0)) / count

                return jax.grad(memory_loss)(params)

            return jax.lax.cond(k < state["task"], grad, lambda _: zeros, None)

        T = self.num_tasks
        G = jax.lax.map(task_gradient, jnp.arange(T, dtype=jnp.int32))
        return G, jnp.arange(T, dtype=jnp.int32) < state["task"]

    def adjust_grads(self, params, state, grads):
        def projected(g):
            G, active = self.past_gradients(params, state)
            return gem_project(g, G, active, self.margin, self.eps)[0]

        # The first task has no past task: no memory pass, g unchanged.
        return jax.lax.cond(state["task"] > 0, projected, lambda g: g, grads)


@ALGORITHMS.register("gem", backend="jax")
class GEM(JaxLearner):
    part_classes = (GEMPart,)
