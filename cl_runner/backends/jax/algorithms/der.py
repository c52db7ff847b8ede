"""Dark Experience Replay (Buzzega et al. 2020, "Dark Experience for General Continual
Learning: a Strong, Simple Baseline", NeurIPS) on the JAX backend.

A reservoir memory keeps stream samples with the logits the network gave them when they were
seen (the step's forward pass, before its update). Every step adds, to the stream batch's loss,

    alpha * mean over a memory batch of the squared distance || h(x') - z' ||^2

between the current logits h(x') and the stored logits z', averaged over the output units as
well as the samples (a mean squared error, as on the PyTorch backend). DER++ (derpp.py) adds
beta * cross-entropy on a second, independently drawn memory batch. As Mammoth's
(models/der.py:30-47, models/derpp.py:34-58), the stream batch and each memory batch go through
a forward pass of their own (each with its own dropout draw). With ``benchmark.augment`` the
memory keeps the stream's inputs before augmentation and each memory batch is augmented afresh
when drawn (memory.py). The memory, its counters and its PRNG key are the part's state
(memory.py): drawing, the loss and the insertion all run inside the compiled epoch.
"""

from __future__ import annotations

import jax.numpy as jnp

from cl_runner.backends.jax.learner import JaxLearner
from cl_runner.backends.jax.memory import DROPOUT_2, SAMPLE, SAMPLE_2, MemoryPart
from cl_runner.registry import ALGORITHMS


class DERPart(MemoryPart):
    store_logits = True
    #: DER++: also a cross-entropy term, weighted by beta, on a second memory batch.
    use_labels = False

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.alpha = float(cfg.alpha)
        self.beta = float(cfg.beta) if self.use_labels else 0.0

    def extra_loss(self, params, state, x, y, logits, weights):
        k = self.replay_batch_size
        mx, _, _, mz, valid = self.draw(state, k, SAMPLE)
        out = self.forward(params, state, mx)
        w = valid.astype(out.dtype)
        sq = jnp.sum((out - mz) ** 2, axis=1)
        loss = self.alpha * jnp.sum(sq * w) / (jnp.maximum(jnp.sum(w), 1.0) * out.shape[1])
        if self.beta:
            # A second draw and a forward pass of its own (models/derpp.py:44-52).
            mx2, my2, mt2, _, valid2 = self.draw(state, k, SAMPLE_2)
            out2 = self.forward(params, state, mx2, DROPOUT_2)
            loss = loss + self.beta * self.masked_ce(state, out2, my2, mt2, valid2)
        return loss


@ALGORITHMS.register("der", backend="jax")
class DER(JaxLearner):
    part_classes = (DERPart,)
