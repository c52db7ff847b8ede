"""The importance-weighted quadratic penalty shared by EWC and its relatives (JAX backend).

penalty(theta) = strength * sum_k sum_i Omega_k,i (theta_i - theta*_k,i)^2

over consolidated snapshots k (one per past task for EWC; a single running one for methods that
keep one anchor). The sums sum_k Omega_k, sum_k Omega_k theta*_k and sum_k Omega_k theta*_k^2
are kept, so the penalty and its gradient 2 * strength * (theta * sum Omega - sum Omega theta*)
cost the same for any number of tasks. The gradient is added analytically to the task loss's
gradient inside the compiled step (``adjust_grads``); the sums are the part's ``state``, an
argument of the compiled epoch, so every epoch sees the sums as they are after the latest
consolidation.
"""

from __future__ import annotations

from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.backends.jax.learner import Part, _restore, to_numpy

tmap = jax.tree_util.tree_map
#: The state entries of the penalty's sums.
PENALTY_KEYS = ("omega", "omega_anchor", "omega_anchor_sq")


class ImportanceRegularizer(Part):
    #: True: each task adds its own (Omega, theta*) term (EWC). False: a single term whose
    #: anchor is the latest parameters and whose Omega the method maintains.
    accumulate_snapshots = False

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        def zeros(p):
            return np.zeros(p.shape, p.dtype)

        self.state = learner.put({
            "omega": tmap(zeros, learner.params),         # sum_k Omega_k
            "omega_anchor": tmap(zeros, learner.params),  # sum_k Omega_k theta*_k
            "omega_anchor_sq": np.zeros((), np.float32),  # sum_k Omega_k theta*_k^2
        })
        self.num_snapshots = 0

    # -- what a method provides ----------------------------------------------------------------
    @property
    def strength(self) -> float:
        raise NotImplementedError

    def importance(self, task):
        """Omega for the task just trained (a pytree like the parameters)."""
        raise NotImplementedError

    # -- shared mechanics ------------------------------------------------------------------------
    def on_after_training(self, task) -> None:
        self.consolidate(self.importance(task))

    def consolidate(self, omega) -> None:
        """Add (accumulate) or set the snapshot (omega, current parameters); any other entries of
        the state (a method's own) are kept."""
        penalty = {k: self.state[k] for k in PENALTY_KEYS}
        new = _consolidate(penalty, omega, self.learner.params, self.accumulate_snapshots)
        self.state = self.learner.put({**self.state, **new})
        self.num_snapshots += 1

    def penalty_grad(self, params, state):
        """d penalty / d theta = 2 * strength * (Omega * theta - Omega theta*) (traced)."""
        s = 2.0 * self.strength
        return tmap(lambda o, oa, p: s * (o * p - oa), state["omega"], state["omega_anchor"], params)

    def adjust_grads(self, params, state, grads):
        return tmap(jnp.add, grads, self.penalty_grad(params, state))

    def penalty_value(self, params, state):
        """The penalty at ``params`` (traced or eager)."""
        terms = tmap(lambda o, oa, p: jnp.sum(o * p * p) - 2.0 * jnp.sum(oa * p),
                     state["omega"], state["omega_anchor"], params)
        return self.strength * (state["omega_anchor_sq"] + sum(jax.tree_util.tree_leaves(terms)))

    def penalty(self) -> float:
        """The penalty's value at the current parameters."""
        if self.num_snapshots == 0:
            return 0.0
        return float(self.penalty_value(self.learner.params, self.state))

    def anchor(self):
        """The parameters the penalty pulls toward: sum Omega theta* / sum Omega (where Omega > 0)."""
        return tmap(lambda o, oa: jnp.where(o > 0, oa / jnp.maximum(o, 1e-30), 0.0),
                    self.state["omega"], self.state["omega_anchor"])

    def state_dict(self) -> dict[str, Any]:
        return {"state": to_numpy(flax.serialization.to_state_dict(self.state)),
                "num_snapshots": self.num_snapshots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = _restore(self.state, state["state"], self.learner.jax_device)
        self.num_snapshots = int(state["num_snapshots"])


def _consolidate_impl(state, omega, params, accumulate: bool):
    omega = tmap(lambda o, p: o.astype(p.dtype), omega, params)
    anchor = tmap(jnp.multiply, omega, params)
    anchor_sq = sum(jnp.sum(o * p * p) for o, p in zip(jax.tree_util.tree_leaves(omega),
                                                      jax.tree_util.tree_leaves(params)))
    if accumulate:
        return {"omega": tmap(jnp.add, state["omega"], omega),
                "omega_anchor": tmap(jnp.add, state["omega_anchor"], anchor),
                "omega_anchor_sq": state["omega_anchor_sq"] + anchor_sq}
    return {"omega": omega, "omega_anchor": anchor,
            "omega_anchor_sq": jnp.asarray(anchor_sq, state["omega_anchor_sq"].dtype)}


_consolidate = jax.jit(_consolidate_impl, static_argnums=3)
