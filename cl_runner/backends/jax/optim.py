"""Optimizers for the JAX backend (optax); the rate of each task and epoch is cl_runner/core/schedule.py's.

Each optimizer is built with ``optax.inject_hyperparams``, so the learning rate is a value in the
optimizer *state* (``state.hyperparams["learning_rate"]``), passed into the compiled epoch like
the parameters: changing it between tasks (``optimizer.lr_decay``) or epochs
(``optimizer.schedule``) costs no recompilation and cannot be frozen at its first value.

The update rules are PyTorch's:

* SGD: g <- g + weight_decay * theta (before momentum); buf <- momentum * buf + g;
  step = g + momentum * buf (Nesterov) or buf; theta <- theta - lr * step.
* Adam: g <- g + weight_decay * theta (L2, not AdamW); bias-corrected moments, eps = 1e-8
  outside the square root; theta <- theta - lr * m_hat / (sqrt(v_hat) + eps).

Gradient clipping comes first, on the full gradient (task loss plus any analytic regulariser
term), as on the PyTorch backend before ``optimizer.step()``: the global norm
(``optimizer.grad_clip_norm``, ``clip_grad_norm_``), then each element to +-``grad_clip_value``
(``clip_grad_value_``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cl_runner.core.schedule import task_lr  # noqa: F401  (re-exported: the per-task rate)
from cl_runner.errors import ConfigError
from cl_runner.registry import OPTIMIZERS

LR_DTYPE = jnp.float32


def _clip(max_norm, max_value=None) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(float(max_norm)) if max_norm else optax.identity(),
        optax.clip(float(max_value)) if max_value else optax.identity(),
    )


def _sgd(learning_rate, momentum: float, nesterov: bool, weight_decay: float, grad_clip_norm,
         grad_clip_value=None):
    return optax.chain(
        _clip(grad_clip_norm, grad_clip_value),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.trace(decay=momentum, nesterov=nesterov) if momentum else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )


def _adam(learning_rate, b1: float, b2: float, weight_decay: float, grad_clip_norm,
          grad_clip_value=None):
    return optax.chain(
        _clip(grad_clip_norm, grad_clip_value),
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
        optax.scale_by_learning_rate(learning_rate),
    )


@OPTIMIZERS.register("sgd", backend="jax")
def sgd(cfg) -> optax.GradientTransformation:
    if cfg.nesterov and not cfg.momentum:
        raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0.")
    factory = optax.inject_hyperparams(
        _sgd, static_args=("momentum", "nesterov", "weight_decay", "grad_clip_norm", "grad_clip_value"),
        hyperparam_dtype=LR_DTYPE)
    return factory(learning_rate=float(cfg.lr), momentum=float(cfg.momentum), nesterov=bool(cfg.nesterov),
                   weight_decay=float(cfg.weight_decay), grad_clip_norm=cfg.grad_clip_norm,
                   grad_clip_value=cfg.grad_clip_value)


@OPTIMIZERS.register("adam", backend="jax")
def adam(cfg) -> optax.GradientTransformation:
    b1, b2 = (float(b) for b in cfg.betas)
    factory = optax.inject_hyperparams(
        _adam, static_args=("b1", "b2", "weight_decay", "grad_clip_norm", "grad_clip_value"),
        hyperparam_dtype=LR_DTYPE)
    return factory(learning_rate=float(cfg.lr), b1=b1, b2=b2, weight_decay=float(cfg.weight_decay),
                   grad_clip_norm=cfg.grad_clip_norm, grad_clip_value=cfg.grad_clip_value)


def build_optimizer(cfg) -> optax.GradientTransformation:
    return OPTIMIZERS.get(cfg.type, backend="jax")(cfg)


def get_lr(opt_state) -> float:
    return float(opt_state.hyperparams["learning_rate"])


def set_lr(opt_state, lr: float):
    """A copy of ``opt_state`` with learning rate ``lr``.

    The new value has the old one's dtype and placement (a committed array on the same device):
    a compiled program is cached per argument type *and* placement, so anything else would cost
    a second compilation.
    """
    hyper = dict(opt_state.hyperparams)
    old = hyper["learning_rate"]
    new = jnp.asarray(lr, dtype=LR_DTYPE)
    if isinstance(old, jax.Array) and old.committed:
        new = jax.device_put(new, old.sharding)
    hyper["learning_rate"] = new
    return opt_state._replace(hyperparams=hyper)
