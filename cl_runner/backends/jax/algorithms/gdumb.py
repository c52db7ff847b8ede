"""GDumb (Prabhu, Torr & Dokania 2020, "GDumb: A Simple Approach that Questions Our Progress in
Continual Learning", ECCV) on the JAX backend, the method of
``cl_runner/backends/torch/algorithms/gdumb.py``.

GDumb takes no training step on the stream. A greedy sampler fills a memory of ``mem_size``
samples, and after each task a model is trained *from scratch* on the memory alone:

* Sampler (the paper's Algorithm 1), over the task's samples in a random order: a sample is
  stored if the memory has a free slot; otherwise, with k_c = K / (classes seen, its own
  included), if its class holds fewer than k_c samples a random sample of the largest class is
  evicted and it takes the slot, else it is dropped. The decisions depend only on labels and
  counts and are made on the host over the label array (NumPy generator seeded from the run's
  seed); the memory keeps the raw images (uint8) on the host.
* Retraining. The parameters are re-initialised (from a seed drawn from the learner's host
  generator) and trained for ``epochs`` over the memory with a fresh SGD (``lr``, ``momentum``,
  ``weight_decay``), batches of ``batch_size`` and gradient-norm clipping at
  ``clip_grad_norm``; ``lr_schedule: sgdr`` is the paper's (one warm-up epoch at lr / 10, then
  cosine cycles of 1, 2, 4, ... epochs from lr toward ``lr_min``, set once per epoch). The whole
  retraining is one compiled program: a ``lax.scan`` over the epochs' learning rates (an
  argument) whose body is the learner's own epoch program (its shuffle, then a scan over the
  memory's batches, the last one padded and masked), run with GDumb's optimizer and batch size.
  It is compiled once per distinct memory size: while the memory fills (one size per task until
  it is full), then never again.
  The run's ``optimizer`` section is not used; ``benchmark.augment`` augments the batches.
* Prediction: in class-IL and domain-IL only the classes present in the memory (a mask, an
  argument of the evaluation program); in task-IL the task's units, as for every algorithm.

Seeds run one after another (the retraining is a program of its own, run between tasks).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cl_runner.algorithms.memories import GreedyClassBalancedSampler, sgdr_lr
from cl_runner.backends.jax.backbones import init_params
from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.backends.jax.memory import derived_seed
from cl_runner.backends.jax.optim import set_lr, sgd
from cl_runner.errors import ConfigError
from cl_runner.registry import ALGORITHMS


class GreedyClassBalancedMemory(GreedyClassBalancedSampler):
    """GDumb's memory, on the host: raw images, labels and task ids; the sampler's decisions
    are cl_runner/algorithms/memories.py's, as on the PyTorch backend."""

    def __init__(self, capacity: int, input_shape, seed: int):
        super().__init__(capacity, seed)
        self.x = np.zeros((self.capacity, *input_shape), np.uint8)
        self.y = np.zeros(self.capacity, np.int64)
        self.t = np.zeros(self.capacity, np.int64)

    def offer(self, x: np.ndarray, labels: np.ndarray, task_id: int) -> None:
        """Offer raw images ``x`` with ``labels`` (host arrays, in the order to offer them)."""
        dst = self.plan(labels)
        src = np.flatnonzero(dst >= 0)
        if len(src) == 0:
            return
        self.x[dst[src]] = np.asarray(x)[src]
        self.y[dst[src]] = np.asarray(labels)[src]
        self.t[dst[src]] = task_id

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler_state(), "x": self.x.copy(), "y": self.y.copy(), "t": self.t.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_sampler_state(state)
        self.x, self.y, self.t = (np.array(state[k]) for k in ("x", "y", "t"))


@ALGORITHMS.register("gdumb", backend="jax")
class GDumb(JaxLearner):
    vectorize_seeds = False

    def __init__(self, cfg, stream, device, seed):
        if cfg.algo.plugins:
            raise ConfigError("algo=gdumb takes no training step on the stream, so it has nothing for "
                              f"algo.plugins={list(cfg.algo.plugins)} to act on; remove the plugins.")
        super().__init__(cfg, stream, device, seed)
        a = cfg.algo
        self.memory = GreedyClassBalancedMemory(a.mem_size, stream.input_shape, derived_seed(seed, 9001))
        self.host_rng = np.random.default_rng(derived_seed(seed, 9002))
        self.seen = np.zeros(self.num_outputs(), bool)
        # The compiled epoch trains on the memory with GDumb's own SGD and batch size.
        self.tx = sgd(SimpleNamespace(lr=float(a.lr), momentum=float(a.momentum), nesterov=False,
                                      weight_decay=float(a.weight_decay), grad_clip_norm=a.clip_grad_norm,
                                      grad_clip_value=None))
        self.batch_size = int(a.batch_size)
        self._opt_init = jax.jit(self.tx.init)
        self.opt_state = self.put(set_lr(self._opt_init(self.params), float(a.lr)))
        self.retrain_losses: list[float] = []
        self._retrain_fn = jax.jit(self._retrain_program)

    def train_epoch(self, task, epoch: int) -> dict:
        """The sampler sees the task's samples once (in a random order); no step is taken."""
        if epoch == 0:
            x, y, _ = self.train_arrays(task)
            perm = self.host_rng.permutation(len(y))
            self.memory.offer(np.asarray(x)[perm], np.asarray(y)[perm], task.id)
        return {"steps": 0, "loss": float("nan")}

    def on_after_training(self, task) -> None:
        super().on_after_training(task)
        self.retrain_losses = self.retrain()
        self.seen = np.zeros(self.num_outputs(), bool)
        self.seen[np.asarray(self.memory.classes(), dtype=np.int64)] = True

    def reinitialize(self) -> None:
        seed = int(self.host_rng.integers(2**31 - 1))
        self.params = self.put(init_params(self.model, self.stream.input_shape, seed,
                                           getattr(self.cfg.backbone, "init", "default")))
        if self._stats_index is not None:
            from cl_runner.backends.jax.resnet import init_batch_stats

            self.parts[self._stats_index].state = self.put(init_batch_stats(self.model, self.stream.input_shape))

    def retrain(self) -> list[float]:
        """Train the re-initialised model on the memory; returns each epoch's mean loss."""
        a = self.cfg.algo
        self.reinitialize()
        self.opt_state = self.put(set_lr(self._opt_init(self.params), float(a.lr)))
        n = len(self.memory)
        if n == 0:
            return []
        x = self.to_input(self.memory.x[:n])
        y = self.put(self.memory.y[:n].astype(np.int32))
        t = self.put(self.memory.t[:n].astype(np.int32)) if self.masks else None
        bs = self.batch_size
        sizes = np.full(-(-n // bs), bs, np.float64)
        sizes[-1] = n - bs * (len(sizes) - 1)
        lrs = [sgdr_lr(e, a.lr, a.lr_min) if a.lr_schedule == "sgdr" else a.lr for e in range(int(a.epochs))]
        carry = (self.params, self.opt_state, tuple(p.state for p in self.parts), self.key)
        carry, losses = self._retrain_fn(carry, self.put(np.asarray(lrs, np.float32)), x, y, t, self.mask_table)
        self.params, self.opt_state, part_states, self.key = carry
        for p, s in zip(self.parts, part_states):
            p.state = s
        losses = np.asarray(losses)  # (epochs, steps)
        out = [float(np.dot(np.asarray(v), sizes) / n) for v in losses]
        if self.check_finite and not all(np.isfinite(out)):
            from cl_runner.errors import TrainingDivergedError

            raise TrainingDivergedError(f"GDumb's retraining on the memory diverged (epoch losses {out}); "
                                        f"lower algo.lr or set algo.clip_grad_norm.")
        return out

    def _retrain_program(self, carry, lrs, x, y, t, mask_table):
        """All epochs of a retraining in one program: a scan over the epochs' learning rates,
        each epoch the learner's epoch program (its own shuffle and scan over the batches)."""
        self.trace_counts["retrain"] += 1

        def epoch(c, lr):
            params, opt_state, part_states, key = c
            hyper = dict(opt_state.hyperparams)
            hyper["learning_rate"] = lr.astype(hyper["learning_rate"].dtype)
            opt_state = opt_state._replace(hyperparams=hyper)
            return self._epoch_program((params, opt_state, part_states, key), x, y, t, mask_table)

        return jax.lax.scan(epoch, carry, lrs)

    # -- evaluation ----------------------------------------------------------------------------
    def eval_params(self):
        return {"inner": super().eval_params(), "seen": self.put(self.seen)}

    def _logits(self, params, x, units):
        """Logits restricted to ``units`` (a bool mask: the task's units) or, when None, to the
        classes in the memory (all of them before there is a memory)."""
        logits = self.eval_model.apply(self._variables(params["inner"]), x, train=False)
        if units is not None:
            return jnp.where(units, logits, -jnp.inf)
        seen = params["seen"]
        return jnp.where(jnp.any(seen) & ~seen[None, :], -jnp.inf, logits)

    def _eval_program(self, params, x, y, mask_table, task_id, task_il: bool = False):
        self.trace_counts["eval"] += 1
        units = mask_table[task_id] if self.masks or task_il else None

        def batch(args):
            xb, yb = args
            return jnp.sum(jnp.argmax(self._logits(params, xb, units), axis=1) == yb)

        return jnp.sum(jax.lax.map(batch, (x, y)))

    def predict(self, x, task_id: int | None = None):
        if self.masks:  # task-IL: the task's units (all units without a task id)
            units = self.mask_table[task_id] if task_id is not None else jnp.ones(self.num_outputs(), bool)
        else:
            units = None
        return jnp.argmax(self._logits(self.eval_params(), x, units), axis=1)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "gdumb_memory": self.memory.state_dict(), "seen": self.seen.copy(),
                "host_rng": self.host_rng.bit_generator.state}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["gdumb_memory"])
        self.seen = np.asarray(state["seen"], bool)
        self.host_rng.bit_generator.state = state["host_rng"]
