"""Experience Replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning").

Every step draws a memory batch of ``replay_batch_size`` samples (default: the stream batch
size) and trains on the stream batch concatenated with it: one forward pass and one mean loss
over both. Then the stream batch is offered to the memory (reservoir sampling over the whole
stream by default; ``mem_policy`` chooses class-balanced, per-task or per-class ring memories).
In task-IL each replayed sample's loss uses its own task's output units.

With ``benchmark.augment`` the memory keeps the stream's inputs before augmentation and each
replayed sample is augmented afresh when it is drawn, as Mammoth's ER (models/er.py:29-48: the
buffer gets ``not_aug_inputs`` and ``get_data`` applies ``transform``).
"""

from __future__ import annotations

import torch

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.backends.torch.memory import memory_for
from cl_runner.registry import ALGORITHMS


@ALGORITHMS.register("er", backend="torch")
class ER(TorchLearner):
    def __init__(self, cfg, stream, device, seed):
        super().__init__(cfg, stream, device, seed)
        self.memory = memory_for(self, cfg.algo)
        self.replay_batch_size = int(cfg.algo.replay_batch_size or self.batch_size)
        self.task_id = 0

    def on_before_task(self, task) -> None:
        super().on_before_task(task)
        self.task_id = task.id
        self.memory.register_classes(task.classes)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        idx = self.memory.sample(self.replay_batch_size)
        if idx is None:
            loss = super().train_step(x, y, t)
        else:
            mx, my, mt, _ = self.memory.get(idx)
            loss = super().train_step(torch.cat([x, self.replay_inputs(mx)]), torch.cat([y, my]),
                                      torch.cat([t, mt]) if t is not None else None)
        self.memory.add(self.stream_inputs(x), y, self.task_id)
        return loss

    def state_dict(self):
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"])
