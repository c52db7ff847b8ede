"""GDumb (Prabhu, Torr & Dokania 2020, "GDumb: A Simple Approach that Questions Our Progress in
Continual Learning", ECCV).

GDumb takes no training step on the stream. A greedy sampler fills a memory of ``mem_size``
samples, and after each task a model is trained *from scratch* on the memory alone:

* Sampler (the paper's Algorithm 1). Each sample (x, y) of the task, in a random order, is
  stored if the memory has a free slot. Otherwise, with k_c = K / (classes seen, y's included),
  if y's class holds fewer than k_c samples, a random sample of the class holding the most is
  evicted and (x, y) takes its slot; else (x, y) is dropped. The memory so tends to equal counts
  per class. The decisions depend only on labels and counts, so they are made on the host over
  the label array; the images are then written to the device memory in one indexed copy.
* Retraining. The model's parameters are re-initialised as the backbone was built
  (``backbone.init``), from a seed drawn from the learner's generator (so a resumed run draws
  the same), and trained for ``epochs`` over the memory with a
  fresh SGD (``lr``, ``momentum``, ``weight_decay``), batches of ``batch_size`` and
  gradient-norm clipping at ``clip_grad_norm``. ``lr_schedule: sgdr`` is the paper's code: one warm-up epoch at lr / 10,
  then cosine annealing with warm restarts of 1, 2, 4, ... epochs from lr down toward ``lr_min``,
  the rate set once per epoch. The run's ``optimizer`` section is not used (GDumb's recipe is its
  own); ``benchmark.augment`` augments its batches as it does every training batch; the paper's
  CutMix (used for its image datasets, not MNIST) is not applied.
* Prediction: in class-IL and domain-IL only the classes present in the memory can be predicted
  (the paper masks the others); in task-IL the task's units, as for every algorithm.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cl_runner.algorithms.memories import GreedyClassBalancedSampler, sgdr_lr
from cl_runner.backends.torch.backbones import xavier_init
from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.backends.torch.memory import derived_seed
from cl_runner.registry import ALGORITHMS


class GreedyClassBalancedMemory(GreedyClassBalancedSampler):
    """GDumb's memory: images, labels and task ids on the device; the sampler's decisions on the
    host (cl_runner/algorithms/memories.py)."""

    def __init__(self, capacity: int, input_shape, device, seed: int):
        super().__init__(capacity, seed)
        self.device = torch.device(device)
        self.x = torch.zeros((self.capacity, *input_shape), device=self.device)
        self.y = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        self.t = torch.zeros(self.capacity, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def offer(self, x: torch.Tensor, y: torch.Tensor, labels: np.ndarray, task_id: int) -> None:
        """Offer samples (device tensors ``x``, ``y``; ``labels`` the same labels on the host)."""
        dst = self.plan(labels)
        src = np.flatnonzero(dst >= 0)
        if len(src) == 0:
            return
        s = torch.from_numpy(src).to(self.device)
        d = torch.from_numpy(dst[src]).to(self.device)
        self.x[d] = x[s]
        self.y[d] = y[s]
        self.t[d] = task_id

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler_state(), "x": self.x.clone(), "y": self.y.clone(), "t": self.t.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_sampler_state(state)
        self.x, self.y, self.t = (state[k].to(self.device) for k in ("x", "y", "t"))


@ALGORITHMS.register("gdumb", backend="torch")
class GDumb(TorchLearner):
    refuses_plugins = "it takes no training step on the stream, so a plugin has nothing to act on"

    def __init__(self, cfg, stream, device, seed):
        super().__init__(cfg, stream, device, seed)
        self.memory = GreedyClassBalancedMemory(cfg.algo.mem_size, stream.input_shape, device,
                                                derived_seed(seed, 9001))
        self.seen = torch.zeros(self.num_outputs(), dtype=torch.bool, device=device)

    def train_epoch(self, task, epoch: int) -> dict:
        """The sampler sees the task's samples once (in a random order); no step is taken."""
        if epoch == 0:
            perm = torch.randperm(len(self.train_y), generator=self.generator).to(self.device)
            y = self.train_y[perm]
            self.memory.offer(self.train_x[perm], y, y.cpu().numpy(), task.id)
        return {"steps": 0, "loss": float("nan")}

    def on_after_training(self, task) -> None:
        super().on_after_training(task)
        self.retrain()
        self.seen.zero_()
        self.seen[torch.as_tensor(self.memory.classes(), dtype=torch.long, device=self.device)] = True

    def reinitialize(self) -> None:
        """Fresh parameters drawn as the backbone's were (``backbone.init``: PyTorch's defaults,
        or Glorot-uniform weights and zero biases), and fresh batch-norm statistics."""
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if getattr(self.cfg.backbone, "init", "default") == "xavier_uniform":
                xavier_init(self.model)

    def retrain(self) -> list[float]:
        """Train the re-initialised model on the memory; returns each epoch's mean loss."""
        a = self.cfg.algo
        self.reinitialize()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay, foreach=True)
        n, bs = len(self.memory), int(a.batch_size)
        mx, my, mt = self.memory.x[:n], self.memory.y[:n], self.memory.t[:n]
        self.model.train()
        losses = []
        for epoch in range(int(a.epochs)):
            lr = sgdr_lr(epoch, a.lr, a.lr_min) if a.lr_schedule == "sgdr" else a.lr
            for group in opt.param_groups:
                group["lr"] = lr
            perm = torch.randperm(n, generator=self.generator).to(self.device)
            total = torch.zeros((), device=self.device)
            for lo in range(0, n, bs):
                idx = perm[lo:lo + bs]
                xb = mx[idx]
                if getattr(self, "augment", None) is not None:  # benchmark.augment, as for every step
                    xb = self.augment(xb)
                logits = self.train_forward(xb)
                loss = self.criterion(logits, my[idx], mt[idx] if self.masks else None)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if a.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, a.clip_grad_norm)
                opt.step()
                total += loss.detach() * len(idx)
            losses.append(total / max(n, 1))
        return [float(v) for v in losses]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: int | None) -> torch.Tensor:
        if self.masks or not bool(self.seen.any()):
            return super().predict(x, task_id)
        return self.model(x).masked_fill(~self.seen, float("-inf")).argmax(dim=1)

    def state_dict(self):
        return {**super().state_dict(), "gdumb_memory": self.memory.state_dict(), "seen": self.seen.clone()}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["gdumb_memory"])
        self.seen = state["seen"].to(self.device)
