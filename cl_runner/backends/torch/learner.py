"""The PyTorch learner: plain fine-tuning, and the extension points algorithms build on.

Data lives on the device for the whole task as float tensors; an epoch is one permutation and a
loop over contiguous slices of the permuted tensors (no DataLoader, no per-sample Python).

Algorithm-specific behaviour comes from

* subclass hooks (``on_before_task``, ``on_after_training``, ``train_arrays`` ...), and
* :class:`Part` objects composed onto the learner (``parts``): a regulariser, a replay memory,
  a distillation term. ``algo.plugins=[ewc]`` adds EWC's part to any learner.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cl_runner.backends.torch.augment import build_augment
from cl_runner.backends.torch.backbones import build_backbone
from cl_runner.backends.torch.fused import FusedMLPStep, sgd_step, sgd_step_possible
from cl_runner.backends.torch.graphs import StepGraph, graph_refusal
from cl_runner.backends.torch.heads import add_missing_params, grow_head, release_unused_head_grads
from cl_runner.backends.torch import update as update_paths
from cl_runner.backends.torch.optim import build_optimizer, set_lr, task_lr
from cl_runner.core.learner import Learner
from cl_runner.core.schedule import epoch_lr, has_schedule
from cl_runner.errors import ConfigError, TrainingDivergedError
from cl_runner.registry import ALGORITHMS


class Part:
    """A composable piece of an algorithm. Override only the hooks you need."""

    def __init__(self, learner: "TorchLearner", cfg):
        self.learner = learner
        self.cfg = cfg

    def on_before_task(self, task) -> None: ...
    def on_after_training(self, task) -> None: ...
    def extra_loss(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """A differentiable term added to the step's loss."""
    def after_backward(self) -> None:
        """Adjust ``p.grad`` of the model's parameters before the optimizer step."""
    def after_step(self) -> None: ...
    def state_dict(self) -> dict[str, Any]:
        return {}
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _overrides(obj, name: str) -> bool:
    return getattr(type(obj), name) is not getattr(Part, name)


class TorchLearner(Learner):
    """Fine-tuning ("naive"): train each task in turn with the task loss only."""

    backend = "torch"
    #: Parts every instance of this algorithm has (on top of ``algo.plugins``).
    part_classes: tuple[type[Part], ...] = ()
    #: Why this algorithm cannot take ``algo.plugins`` (None: it composes them).
    refuses_plugins: str | None = None
    #: Why this algorithm (or part) cannot run with a growing output layer (backbone.head
    #: incremental or multihead); None: it can.
    refuses_growing_head: str | None = None

    def __init__(self, cfg, stream, device: torch.device, seed: int):
        super().__init__(cfg, stream)
        self.device = device
        self.seed = seed
        self.model = build_backbone(cfg.backbone, stream.input_shape, self.num_outputs()).to(device)
        # The training step's forward (and so backward) may be compiled; evaluation and the
        # algorithms' own passes (importances, distillation targets) use the eager module,
        # which shares the parameters.
        self.train_forward = torch.compile(self.model) if cfg.backend.compile else self.model
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optimizer)
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size = int(cfg.benchmark.batch_size)
        self.eval_batch_size = int(cfg.benchmark.eval_batch_size)
        self.grad_clip = cfg.optimizer.grad_clip_norm
        self.grad_clip_value = cfg.optimizer.grad_clip_value
        self.check_finite = bool(cfg.training.check_finite)
        self.progress_every = int(cfg.training.progress_every)
        self._scale = 1.0 / 255.0
        shape = (1, len(stream.mean), 1, 1)
        normalize = bool(cfg.benchmark.normalize)
        self._mean = torch.tensor(stream.mean if normalize else [0.0] * len(stream.mean)).view(shape).to(device)
        self._std = torch.tensor(stream.std if normalize else [1.0] * len(stream.std)).view(shape).to(device)
        # benchmark.augment: random crop + flip of each training batch on the device (augment.py).
        self.augment = build_augment(cfg.benchmark, self._mean, self._std, device, seed)
        # Task-IL: output_mask[t] marks task t's output units.
        self.masks = stream.masks_logits
        mask = torch.zeros(stream.num_tasks, self.num_outputs(), dtype=torch.bool)
        for t in stream.tasks:
            mask[t.id, torch.as_tensor(t.classes)] = True
        self.output_mask = mask.to(device)
        self._test_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.train_x = self.train_y = self.train_t = None
        # During a step of train_epoch: the stream batch before augmentation (see stream_inputs).
        self._unaugmented: torch.Tensor | None = None
        if list(cfg.algo.plugins) and self.refuses_plugins:
            raise ConfigError(f"algo={cfg.algo.name} does not compose algo.plugins="
                              f"{list(cfg.algo.plugins)}: {self.refuses_plugins}; set algo.plugins=[].")
        plugin_classes = [_plugin_class(name) for name in cfg.algo.plugins]
        self.parts: list[Part] = [cls(self, cfg.algo) for cls in (*self.part_classes, *plugin_classes)]
        head = getattr(cfg.backbone, "head", "fixed")
        for obj in (self, *self.parts):
            reason = getattr(obj, "refuses_growing_head", None)
            if head != "fixed" and reason:
                what = (f"algo={cfg.algo.name}" if obj is self or type(obj) in self.part_classes
                        else f"algo.plugins={list(cfg.algo.plugins)}")
                raise ConfigError(f"backbone.head={head} cannot be combined with {what}: {reason}; "
                                  "use backbone.head=fixed (in task-IL the fixed layer's per-task masks give "
                                  "the predictions of a head per task).")
        self._loss_parts = [p for p in self.parts if _overrides(p, "extra_loss")]
        self._grad_parts = [p for p in self.parts if _overrides(p, "after_backward")]
        self._step_parts = [p for p in self.parts if _overrides(p, "after_step")]
        self.fused_step = bool(getattr(cfg.backend, "fused_step", False))
        # the update path after backward (update.py): requested, chosen per task, and its record
        self.update_request = update_paths.requested_path(cfg.backend)
        self.update_record: update_paths.UpdateRecord | None = None
        self._native = None
        self._fused: FusedMLPStep | None = None
        self._fused_plain = False
        self._fused_pending: list | None = None  # during a step: the fused passes to back-propagate
        self._fast_sgd: torch.optim.Optimizer | None = None

    # -- shapes and data ---------------------------------------------------------------------
    def num_outputs(self) -> int:
        n = self.cfg.backbone.num_classes
        return int(n) if n else self.stream.num_outputs

    def to_input(self, x: np.ndarray) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> normalised float32 tensor on the device."""
        x = np.ascontiguousarray(x)
        if not x.flags.writeable:  # memory-mapped from the stream cache
            x = x.copy()
        t = torch.from_numpy(x).to(self.device)
        return t.float().mul_(self._scale).sub_(self._mean).div_(self._std)

    def train_arrays(self, task) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (x, y, task id) arrays to train on for ``task``; joint training overrides this."""
        return task.train_x, task.train_y, np.full(len(task.train_y), task.id, dtype=np.int64)

    def test_tensors(self, task) -> tuple[torch.Tensor, torch.Tensor]:
        if task.id not in self._test_cache:
            self._test_cache[task.id] = (self.to_input(task.test_x),
                                         torch.from_numpy(np.array(task.test_y)).to(self.device))
        return self._test_cache[task.id]

    # -- hooks -------------------------------------------------------------------------------
    def on_before_task(self, task) -> None:
        grow_head(self.model, self.optimizer, task, self.output_mask[task.id], self.stream.scenario)
        set_lr(self.optimizer, task_lr(self.cfg.optimizer, task.id))
        x, y, tid = self.train_arrays(task)
        self.train_x = self.to_input(x)
        self.train_y = torch.from_numpy(np.array(y)).to(self.device)
        self.train_t = torch.from_numpy(np.array(tid)).to(self.device) if self.masks else None
        for p in self.parts:
            p.on_before_task(task)
        self.choose_step()

    def on_before_epoch(self, task, epoch: int) -> None:
        """``optimizer.reset``: a fresh optimizer state (momentum buffers, Adam's moments and step
        count cleared: what a newly built optimizer has) at every task or epoch;
        ``optimizer.schedule``: the epoch's rate, from the rate the task started with (after
        every ``on_before_task`` hook, so an algorithm's own per-task factor is kept)."""
        opt = self.cfg.optimizer
        if epoch == 0:
            self.task_start_lr = float(self.optimizer.param_groups[0]["lr"])
        if opt.reset == "epoch" or (opt.reset == "task" and epoch == 0):
            self.optimizer.state.clear()
        if has_schedule(opt.schedule):
            set_lr(self.optimizer, epoch_lr(self.task_start_lr, opt.schedule, epoch,
                                            int(self.cfg.training.epochs_per_task)))

    def choose_step(self) -> None:
        """Take the fused MLP step (fused.py) where the model (as it is now) is a plain MLP and
        torch.compile is off. With the plain cross-entropy and no part adding a loss term, the
        whole step is fused; otherwise the MLP's forward and backward are, and autograd computes
        only the loss's gradient with respect to the logits (and any graph a part builds itself)."""
        fused = None
        if self.fused_step and not self.cfg.backend.compile:
            fused = FusedMLPStep.for_model(self.model)
        self._fused_plain = (not self._loss_parts
                             and getattr(self.criterion, "__func__", None) is TorchLearner.criterion
                             and getattr(self.masked, "__func__", None) is TorchLearner.masked)
        if fused is not None and fused.hooks and not self._fused_plain:
            fused = None  # autograd would run a parameter's hooks once, not once per branch
        self._fused = fused
        plain_sgd = sgd_step_possible(self.optimizer)
        self._fast_sgd = self.optimizer if self.fused_step and plain_sgd else None
        self._native, record = update_paths.for_learner(
            self.update_request, self.optimizer, self._grad_parts, self.grad_clip or self.grad_clip_value,
            plain_sgd, self._fast_sgd is self.optimizer)
        if self.update_record is not None:  # the steps so far stay counted
            record.steps = self.update_record.steps
        self.update_record = record

    def kernel_record(self) -> dict:
        """Which update path ran (and why, and how many steps each path took): results.json's
        ``kernels.update``."""
        return self.update_record.as_dict() if self.update_record is not None else {}

    def on_after_training(self, task) -> None:
        for p in self.parts:
            p.on_after_training(task)

    def on_after_task(self, task) -> None:
        self.train_x = self.train_y = self.train_t = None

    # -- the step ----------------------------------------------------------------------------
    def masked(self, logits: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """Task-IL: logits outside each sample's task set to -inf; otherwise unchanged."""
        if task_ids is None:
            return logits
        return logits.masked_fill(~self.output_mask[task_ids], float("-inf"))

    def criterion(self, logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(self.masked(logits, t), y)

    def stream_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The step's stream batch as a replay memory stores it: before ``benchmark.augment``.
        ``x`` is the batch the step trains on; while ``train_epoch`` runs a step on an augmented
        batch this is the same batch un-augmented, otherwise ``x`` itself. The references keep
        the raw image and augment it afresh each time they replay it (Mammoth utils/buffer.py
        stores ``not_aug_inputs``; models/er.py:29-48 and models/der.py:30-47 pass
        ``transform`` to ``Buffer.get_data``, utils/buffer.py:89-109)."""
        raw = self._unaugmented
        return x if raw is None else raw

    def replay_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Memory samples about to be trained on: augmented afresh as every stream batch is
        (``benchmark.augment``; a new crop and flip at each replay), else unchanged."""
        return x if self.augment is None else self.augment(x)

    def train_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``x`` in a loss term of the training step (the step's batch, or a
        part's memory batch). Where the step takes the fused MLP pass they are computed by it, as
        a leaf whose gradient, once the step's loss is back-propagated, is passed back through the
        MLP by hand; elsewhere by the (possibly compiled) model under autograd."""
        pending = self._fused_pending
        if pending is None or x.requires_grad:
            return self.train_forward(x)
        z, saved = self._fused.forward(x)
        z.requires_grad_()
        pending.append((saved, z))
        return z

    def train_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        fused = self._fused if not x.requires_grad else None
        if fused is not None and self._fused_plain:
            loss = fused(x, y, None if t is None else ~self.output_mask[t])
        else:
            self._fused_pending = [] if fused is not None else None
            try:
                logits = self.train_logits(x)
                loss = self.criterion(logits, y, t)
                for p in self._loss_parts:
                    extra = p.extra_loss(x, y, logits)
                    if extra is not None:
                        loss = loss + extra
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for saved, z in self._fused_pending or ():
                    if z.grad is not None:
                        fused.backward(saved, z.grad, accumulate=True)
            finally:
                self._fused_pending = None
        if t is not None:
            release_unused_head_grads(self.model, self.output_mask, t)
        native = self._native  # the penalty's gradient and the SGD step in fewer passes (update.py)
        steps = self.update_record.steps if self.update_record is not None else None
        if native is not None and native.optimizer is self.optimizer and native():
            if steps is not None:
                steps[native.name] += 1
        else:
            for p in self._grad_parts:
                p.after_backward()
            self.clip_gradients()
            if self._fast_sgd is self.optimizer:
                sgd_step(self.optimizer)
                fallback = update_paths.FOREACH
            else:
                self.optimizer.step()
                fallback = update_paths.OPTIM
            if steps is not None:
                steps[fallback] += 1
        for p in self._step_parts:
            p.after_step()
        return loss.detach()

    def clip_gradients(self) -> None:
        """``optimizer.grad_clip_norm`` (the global norm), then ``optimizer.grad_clip_value``
        (each element), on the full gradient."""
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.grad_clip_value:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), self.grad_clip_value)

    def train_epoch(self, task, epoch: int) -> dict:
        self.model.train()
        n, bs = len(self.train_y), self.batch_size
        perm = torch.randperm(n, generator=self.generator).to(self.device)
        # Each batch's images are gathered when it is trained (a copy of the whole shuffled
        # task would cost more than the 10-row gathers); labels and task ids are small.
        xs = self.train_x
        ys = self.train_y[perm]
        ts = self.train_t[perm] if self.train_t is not None else None
        num_batches = math.ceil(n / bs)
        losses = torch.zeros(num_batches, device=self.device)
        loop = self.loop
        step_cbs = loop.step_callbacks if loop is not None else []
        start = last = time.perf_counter()
        checked = 0
        base_step = loop.state.global_step if loop is not None else 0
        # On a CUDA GPU, runs of whole batches are replayed from a recording (graphs.py).
        graph = self._step_graph(step_cbs)
        chunk = graph.steps if graph is not None else 0
        whole = n // bs if graph is not None else 0
        every = self.progress_every
        b = 0
        while b < num_batches:
            if b + chunk <= whole and chunk:
                losses[b:b + chunk] = graph(perm[b * bs:(b + chunk) * bs])
                b += chunk
                report = (every and b // every != (b - chunk) // every) or \
                    (not every and time.perf_counter() - last > 0.25)
            else:
                lo = b * bs
                hi = lo + bs
                if step_cbs:
                    for cb in step_cbs:
                        cb.on_before_step(loop, base_step + b)
                xb = xs.index_select(0, perm[lo:hi])
                if self.augment is not None:
                    self._unaugmented = xb
                    xb = self.augment(xb)
                try:
                    loss = self.train_step(xb, ys[lo:hi], ts[lo:hi] if ts is not None else None)
                finally:
                    self._unaugmented = None
                losses[b] = loss
                if step_cbs:
                    for cb in step_cbs:
                        cb.on_after_step(loop, base_step + b, loss)
                b += 1
                report = (every and b % every == 0) or \
                    (not every and (b & 63) == 0 and time.perf_counter() - last > 0.25)
            if report:
                last = time.perf_counter()
                self._check_finite(losses, checked, b, task, epoch, base_step)
                window = losses[checked:b]
                checked = b
                if loop is not None:
                    loop.progress(step=b, steps=num_batches, loss=float(window.mean()),
                                  steps_per_s=b / (last - start))
        self._check_finite(losses, checked, num_batches, task, epoch, base_step)
        elapsed = time.perf_counter() - start
        if loop is not None:
            loop.state.global_step += num_batches
            loop.progress(step=num_batches, steps=num_batches, loss=float(losses[checked:].mean())
                          if checked < num_batches else float(losses[-1]),
                          steps_per_s=num_batches / max(elapsed, 1e-9))
        return {"steps": num_batches, "loss": float(losses.mean()), "time_s": elapsed,
                "steps_per_s": num_batches / max(elapsed, 1e-9)}

    #: Training steps per CUDA-graph recording (graphs.py).
    cuda_graph_steps = 64

    def _step_graph(self, step_callbacks) -> StepGraph | None:
        """The recording of this epoch's steps where the device and the step allow one."""
        if graph_refusal(self, step_callbacks, self.device.type) is not None:
            return None
        return StepGraph(self, self.cuda_graph_steps, capture=self.device.type == "cuda")

    def _check_finite(self, losses, lo: int, hi: int, task, epoch: int, base_step: int) -> None:
        if not self.check_finite or hi <= lo:
            return
        window = losses[lo:hi]
        bad = ~torch.isfinite(window)
        if bool(bad.any()):
            b = lo + int(bad.nonzero()[0, 0])
            value = float(losses[b])
            raise TrainingDivergedError(
                f"the training loss became {value} at task {task.id + 1} (of {self.stream.num_tasks}), "
                f"epoch {epoch + 1}, step {b} (global step {base_step + b}). Lower optimizer.lr "
                f"(now {self.optimizer.param_groups[0]['lr']:g}), set optimizer.grad_clip_norm, "
                f"or lower the algorithm's regularisation strength.")

    # -- threads -----------------------------------------------------------------------------
    train_threads: int | None = None
    eval_threads: int | None = None

    def set_threads(self, train: int, evaluate: int) -> None:
        """CPU intra-op threads for training steps and for evaluation (see choose_threads)."""
        self.train_threads, self.eval_threads = train, evaluate
        torch.set_num_threads(train)

    # -- evaluation --------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: int | None) -> torch.Tensor:
        logits = self.model(x)
        if self.masks and task_id is not None:
            logits = logits.masked_fill(~self.output_mask[task_id], float("-inf"))
        return logits.argmax(dim=1)

    @torch.inference_mode()
    def evaluate(self, tasks, task_il: bool = False) -> dict[int, float]:
        """``task_il``: predict as in the task-IL scenario (``self.masks`` is True while it
        runs, so every ``predict`` keeps to the evaluated task's own output units)."""
        was_training = self.model.training
        self.model.eval()
        if self.eval_threads:
            torch.set_num_threads(self.eval_threads)
        result = {}
        masks, self.masks = self.masks, self.masks or task_il
        try:
            for task in tasks:
                x, y = self.test_tensors(task)
                correct = torch.zeros((), dtype=torch.long, device=self.device)
                for lo in range(0, len(y), self.eval_batch_size):
                    pred = self.predict(x[lo:lo + self.eval_batch_size], task.id)
                    correct += (pred == y[lo:lo + self.eval_batch_size]).sum()
                result[task.id] = 100.0 * float(correct) / max(len(y), 1)
        finally:
            self.masks = masks
        self.model.train(was_training)
        if self.train_threads:
            torch.set_num_threads(self.train_threads)
        return result

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "parts": [p.state_dict() for p in self.parts],
            **({"augment": self.augment.state_dict()} if self.augment is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        add_missing_params(self.optimizer, self.model)  # a grown head's chunks
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        for p, s in zip(self.parts, state["parts"]):
            p.load_state_dict(s)
        if self.augment is not None and "augment" in state:
            self.augment.load_state_dict(state["augment"])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _plugin_class(name: str) -> type[Part]:
    from cl_runner.registry import PLUGINS

    return PLUGINS.get(name, backend="torch")


ALGORITHMS.register("naive", backend="torch")(TorchLearner)
