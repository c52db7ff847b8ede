"""La-MAML (Gupta, Yadav & Paull 2020, "La-MAML: Look-ahead Meta Learning for Continual
Learning", NeurIPS), Algorithm 1, as the authors' MNIST code runs it (montrealrobotics/La-MAML,
model/lamaml.py, model/lamaml_base.py).

Every weight tensor theta has a learnable learning-rate tensor alpha of its shape, initialised to
``alpha_init`` (model/meta/learner.py:283-292). For each incoming batch b, ``glances`` times
(model/lamaml.py:61-112):

1. the meta-batch is b (shuffled) joined with ``replay_batch_size`` samples drawn from a
   reservoir memory of ``mem_size`` samples of the stream seen so far (lamaml_base.py:82-138);
2. from theta_0 = theta the fast weights take one SGD step per sample of b (``n_inner_updates:
   null``; an integer k splits b into k pieces instead), with the learnable rates passed through
   a ReLU: theta_j = theta_{j-1} - relu(alpha) * grad l(theta_{j-1}; b_j) (model/lamaml.py:37-56).
   The inner gradients are not clipped: the reference computes ``torch.clamp`` of each and
   discards the result (lines 51-52); ``inner_grad_clip`` clips them element-wise, as
   lamaml_cifar.py:82-83 does. With ``second_order: false`` they are constants (first-order
   MAML), otherwise the step is differentiated through;
3. the meta-loss L_meta = 1/k sum_{i=1..k} l(theta_i; meta-batch), the meta-batch loss averaged
   over the fast weights after each inner step (model/lamaml.py:89-95; the paper's Algorithm 1
   writes the last term only), is differentiated with respect to theta_0 and alpha; each of the
   two gradients is clipped to global norm ``grad_clip_norm`` (lines 99-100);
4. alpha <- alpha - lr_alpha * grad_alpha L_meta (when ``learn_lr``), then
   theta <- theta - relu(alpha) * grad_theta L_meta with the *updated* alpha
   (``sync_update: false``, the paper's asynchronous update, lines 102-109: a weight whose rate
   went negative is not moved); with ``sync_update: true`` the weights take the configured
   optimizer's step on grad_theta L_meta instead.

The incoming batch enters the memory during its first glance, after that glance's meta-batch was
drawn (the reference pushes each sample inside the first glance's inner loop, lamaml.py:86-87,
and ``push_to_mem`` returns at later glances, lamaml_base.py:66-67), so the later glances can
replay it; during a task's first epoch only. With ``benchmark.augment`` the memory keeps the
batch as it was before augmentation and each replayed sample is augmented afresh, as clrun's
other replay methods do and as Avalanche's La-MAML does (its reservoir keeps dataset items,
transformed when read: avalanche/training/supervised/lamaml_v2.py:292-310,
storage_policy.py:110-124). The authors' CIFAR code instead stores the tensor its loader has
already augmented (dataloaders/idataset.py:111-114, class_incremental_loader.py:135-137,
model/lamaml_cifar.py:114, 126, lamaml_base.py:60-79) and replays it unchanged; on MNIST, without
augmentation, the two are the same. Remaining differences: a memory batch is drawn without
replacement (the reference draws each sample uniformly, with replacement), and the reservoir is
algorithm R (the reference draws the slot from 0..n rather than 0..n-1).
Fast weights are evaluated with ``torch.func.functional_call``; nothing is done per sample in
Python beyond the inner steps themselves. In task-IL each loss uses the sample's task units.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.backends.torch.memory import ReplayMemory
from cl_runner.registry import ALGORITHMS


def _clip_norm_(grads: list[torch.Tensor], max_norm: float | None) -> None:
    """Scale ``grads`` in place so that their global L2 norm is at most ``max_norm``."""
    if not max_norm:
        return
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)


@ALGORITHMS.register("lamaml", backend="torch")
class LaMAML(TorchLearner):
    refuses_growing_head = "its learnable learning rates are allocated per parameter of the network as first built"
    refuses_plugins = ("its meta-update replaces the training step and has no place for a plugin's "
                       "loss or gradient terms")

    def __init__(self, cfg, stream, device, seed):
        super().__init__(cfg, stream, device, seed)
        algo = cfg.algo
        self.memory = ReplayMemory("reservoir", stream.input_shape, device, seed, capacity=int(algo.mem_size),
                                   num_tasks=stream.num_tasks, num_outputs=self.num_outputs())
        self.replay_batch_size = int(algo.replay_batch_size or self.batch_size)
        self.names = [name for name, _ in self.model.named_parameters()]
        self.alpha = [torch.full_like(p, float(algo.alpha_init), requires_grad=True)
                      for p in self.model.parameters()]
        # Plain values: read at every meta-update.
        self.glances = int(algo.glances)
        self.n_inner = int(algo.n_inner_updates) if algo.n_inner_updates is not None else None
        self.second_order = bool(algo.second_order)
        self.clip = float(algo.grad_clip_norm) if algo.grad_clip_norm else None
        self.inner_clip = float(algo.inner_grad_clip) if algo.inner_grad_clip else None
        self.learn_lr = bool(algo.learn_lr)
        self.lr_alpha = float(algo.lr_alpha)
        self.sync_update = bool(algo.sync_update)
        self.task_id = 0
        self.epoch = 0

    def on_before_task(self, task) -> None:
        super().on_before_task(task)
        self.task_id = task.id

    def train_epoch(self, task, epoch: int) -> dict:
        self.epoch = epoch
        return super().train_epoch(task, epoch)

    def forward_with(self, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, dict(zip(self.names, weights)), (x,), strict=False)

    def _grads(self, loss, wrt, create_graph=False) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss, wrt, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]

    def meta_gradients(self, x, y, t, mx, my, mt):
        """(meta-loss, grad_theta, grad_alpha) before clipping: the inner steps on the pieces of
        (x, y, t) (one per sample with ``n_inner_updates: null``), and the meta-loss on
        (mx, my, mt) averaged over the fast weights after each."""
        params = list(self.model.parameters())
        n = len(y)
        k = n if self.n_inner is None else min(self.n_inner, n)
        pieces = torch.tensor_split(torch.arange(n, device=y.device), k)
        clip = self.inner_clip
        k = len(pieces)
        if not self.second_order:
            # First order: the inner gradients g_j are constants, so d theta_i / d theta_0 = I and
            # d theta_i / d alpha = -(g_1 + ... + g_i) * relu'(alpha), relu'(a) = 1 for a > 0, else 0;
            # no graph through the inner steps is needed.
            fast = [p.detach().requires_grad_(True) for p in params]
            alpha = [a.detach() for a in self.alpha]
            rate = [a.relu() for a in alpha]
            g_sum = [torch.zeros_like(p) for p in fast]
            g_theta = [torch.zeros_like(p) for p in fast]
            g_alpha = [torch.zeros_like(p) for p in fast]
            meta_total = torch.zeros((), device=y.device)
            for piece in pieces:
                loss = self.criterion(self.forward_with(fast, x[piece]), y[piece], t[piece] if t is not None else None)
                grads = self._grads(loss, fast)
                if clip:
                    torch._foreach_clamp_min_(grads, -clip)
                    torch._foreach_clamp_max_(grads, clip)
                torch._foreach_add_(g_sum, grads)
                with torch.no_grad():
                    fast = torch._foreach_sub(fast, torch._foreach_mul(rate, grads))
                for w in fast:
                    w.requires_grad_(True)
                meta_loss = self.criterion(self.forward_with(fast, mx), my, mt)
                g_meta = self._grads(meta_loss, fast)
                torch._foreach_add_(g_theta, g_meta)
                torch._foreach_sub_(g_alpha, torch._foreach_mul(g_sum, g_meta))
                meta_total += meta_loss.detach()
            torch._foreach_div_(g_theta, k)
            torch._foreach_div_(g_alpha, k)
            g_alpha = [g * (a > 0).to(g.dtype) for g, a in zip(g_alpha, alpha)]
            return meta_total / k, g_theta, g_alpha
        fast = params
        meta_loss = 0.0
        for piece in pieces:
            loss = self.criterion(self.forward_with(fast, x[piece]), y[piece], t[piece] if t is not None else None)
            grads = self._grads(loss, fast, create_graph=True)
            if clip:
                grads = [g.clamp(-clip, clip) for g in grads]
            fast = [w - a.relu() * g for w, a, g in zip(fast, self.alpha, grads)]
            meta_loss = meta_loss + self.criterion(self.forward_with(fast, mx), my, mt)
        meta_loss = meta_loss / k
        grads = self._grads(meta_loss, [*params, *self.alpha])
        return meta_loss.detach(), grads[:len(params)], grads[len(params):]

    def meta_update(self, x, y, t, mx, my, mt) -> torch.Tensor:
        """One La-MAML update of alpha and the weights from the incoming batch (x, y, t) and the
        meta-batch (mx, my, mt); returns the meta-loss."""
        meta_loss, g_theta, g_alpha = self.meta_gradients(x, y, t, mx, my, mt)
        _clip_norm_(g_theta, self.clip)
        _clip_norm_(g_alpha, self.clip)
        params = list(self.model.parameters())
        with torch.no_grad():
            if self.learn_lr:
                torch._foreach_add_(self.alpha, g_alpha, alpha=-self.lr_alpha)
            if self.sync_update:
                for p, g in zip(params, g_theta):
                    p.grad = g
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            else:
                torch._foreach_sub_(params, torch._foreach_mul([a.relu() for a in self.alpha], g_theta))
        return meta_loss

    def glance_order(self, n: int) -> torch.Tensor:
        """The order of the incoming batch's ``n`` samples in one glance (a fresh shuffle)."""
        return torch.randperm(n, generator=self.generator).to(self.device)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        meta_loss = None
        for glance in range(self.glances):
            perm = self.glance_order(len(y))
            xb, yb, tb = x[perm], y[perm], (t[perm] if t is not None else None)
            idx = self.memory.sample(self.replay_batch_size)
            if idx is None:
                mx, my, mt = xb, yb, tb
            else:
                sx, sy, st, _ = self.memory.get(idx)
                sx = self.replay_inputs(sx)  # benchmark.augment: a fresh crop and flip
                mx, my = torch.cat([xb, sx]), torch.cat([yb, sy])
                mt = torch.cat([tb, st]) if tb is not None else None
            meta_loss = self.meta_update(xb, yb, tb, mx, my, mt)
            if glance == 0 and self.epoch == 0:  # after the first glance's meta-batch was drawn
                self.memory.add(self.stream_inputs(x), y, self.task_id)  # before benchmark.augment
        return meta_loss

    def state_dict(self):
        state = super().state_dict()
        state["lamaml"] = {"alpha": [a.detach().clone() for a in self.alpha],
                           "memory": self.memory.state_dict()}
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        own = state["lamaml"]
        self.alpha = [a.to(self.device).clone().requires_grad_(True) for a in own["alpha"]]
        self.memory.load_state_dict(own["memory"])
