"""Experience Replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning")
on the JAX backend.

Every step draws a memory batch of ``replay_batch_size`` samples (default: the stream batch
size) and trains on the stream batch concatenated with it: one forward pass and one mean loss
over both (the memory's entries beyond the samples it holds have weight 0, so the mean is over
the stream batch and min(replay_batch_size, stored) memory samples). Then the stream batch is
offered to the memory (reservoir sampling over the whole stream by default; ``mem_policy``
chooses class-balanced, per-task or per-class ring memories). The memory is device arrays in
the part's state and all of this happens inside the compiled epoch (memory.py). In task-IL each
replayed sample's loss uses its own task's output units. With ``benchmark.augment`` the memory
keeps the stream's inputs before augmentation and the memory batch is augmented afresh when
drawn, as Mammoth's ER (models/er.py:29-48).
"""

from __future__ import annotations

import jax.numpy as jnp

from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.backends.jax.memory import SAMPLE, MemoryPart
from cl_runner.registry import ALGORITHMS


class ERMemoryPart(MemoryPart):
    """ER's memory: stores the stream; the learner reads it in its loss."""


@ALGORITHMS.register("er", backend="jax")
class ER(JaxLearner):
    part_classes = (ERMemoryPart,)

    @property
    def memory_part(self) -> ERMemoryPart:
        return self.parts[0]

    def loss_and_logits(self, params, part_states, x, y, t, weights, mask_table, dropout_key):
        part = self.memory_part
        mx, my, mt, _, valid = part.draw(part_states[0], part.replay_batch_size, SAMPLE)
        n = y.shape[0]
        stream_w = jnp.ones(n, jnp.float32) if weights is None else weights
        xc = jnp.concatenate([x, mx.astype(x.dtype)])
        yc = jnp.concatenate([y, my.astype(y.dtype)])
        tc = jnp.concatenate([t, mt.astype(t.dtype)]) if t is not None else None
        wc = jnp.concatenate([stream_w, valid.astype(jnp.float32)])
        rngs = {"dropout": dropout_key} if dropout_key is not None else None
        logits = self.model.apply({"params": params}, xc, train=True, rngs=rngs)
        loss = self.loss_from_logits(params, part_states, xc, yc, tc, wc, mask_table, logits)
        return loss, logits[:n]
