"""Dark Experience Replay (Buzzega et al. 2020, "Dark Experience for General Continual
Learning: a Strong, Simple Baseline", NeurIPS).

A reservoir memory keeps stream samples with the logits the network gave them when they were
seen (the step's forward pass, before its update). Every step adds, to the stream batch's loss,

    alpha * mean over a memory batch of the squared distance || h(x') - z' ||^2

between the current logits h(x') and the stored logits z'. The squared
distance is averaged over the output units as well as the samples: alpha then weighs a mean
squared error, the scale at which the paper's alpha values were chosen. DER++ (derpp.py) adds
beta * cross-entropy on a second, independently drawn memory batch. The logits are
stored raw (all output units); in task-IL DER++'s cross-entropy uses each sample's task units.

As Mammoth's (models/der.py:30-47, models/derpp.py:34-58): the stream batch, the first memory
batch and DER++'s second memory batch each go through a forward pass of their own, so a network
with batch norm normalises each batch with its own statistics and updates its running averages
once per pass. With ``benchmark.augment`` the memory keeps the stream's inputs before
augmentation (with the logits of the augmented batch the step trained on) and every drawn
memory batch is augmented afresh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_runner.backends.torch.learner import Part, TorchLearner
from cl_runner.backends.torch.memory import memory_for
from cl_runner.registry import ALGORITHMS


class DERPart(Part):
    refuses_growing_head = "its memory stores logits over every output unit, and units not grown yet read -inf"
    #: DER++: also a cross-entropy term, weighted by beta, on a second memory batch.
    use_labels = False

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.memory = memory_for(learner, cfg, store_logits=True)
        self.replay_batch_size = int(cfg.replay_batch_size or learner.batch_size)
        self.alpha = float(cfg.alpha)
        self.beta = float(cfg.beta) if self.use_labels else 0.0
        self.task_id = 0
        self._pending = None

    def on_before_task(self, task) -> None:
        self.task_id = task.id
        self.memory.register_classes(task.classes)

    def extra_loss(self, x, y, logits):
        learner = self.learner
        self._pending = (learner.stream_inputs(x), y, logits.detach())
        first = self.memory.sample(self.replay_batch_size)
        if first is None:
            return None
        mx, _, _, mz = self.memory.get(first)
        loss = self.alpha * F.mse_loss(learner.train_logits(learner.replay_inputs(mx)), mz)
        if self.beta:
            # A second draw and a forward pass of its own (models/derpp.py:44-52).
            mx, my, mt, _ = self.memory.get(self.memory.sample(self.replay_batch_size))
            out = learner.train_logits(learner.replay_inputs(mx))
            masks = mt if learner.masks else None
            loss = loss + self.beta * F.cross_entropy(learner.masked(out, masks), my)
        return loss

    def after_step(self) -> None:
        x, y, z = self._pending
        self._pending = None
        self.memory.add(x, y, self.task_id, logits=z)

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state) -> None:
        self.memory.load_state_dict(state["memory"])


@ALGORITHMS.register("der", backend="torch")
class DER(TorchLearner):
    part_classes = (DERPart,)
