"""Mode Connectivity SGD (Mirzadeh et al. 2021, "Linear Mode Connectivity in Multitask and
Continual Learning", ICLR).

Each task t (from 0) runs two stages.

1. Continual stage: plain SGD on the task's data, starting from the previous MC-SGD solution
   w_bar_{t-1}, with the learning rate ``optimizer.lr * algo.lr_decay ** t`` (times the
   optimizer's own per-task decay, 1 by default) and fresh optimizer state. Its end point is the
   continual minimum w_hat_t. For the first task this is the whole method: w_bar_0 = w_hat_0.

2. Mode-connectivity stage (``lmc_policy: offline``, once at the end of each task t >= 1): an
   episodic memory keeps ``per_task_memory_samples`` random training samples of every task. With
   M_<t the memory of the previous tasks, M_t the current task's stored samples, and
   alpha_k = k / n for k = 0..n (n = ``lmc_line_samples``, so n + 1 points including both ends),
   w starts at w_bar_{t-1} + ``lmc_init_position`` * (w_hat_t - w_bar_{t-1}) and minimises

       J(w) = 1/(n+1) sum_k L_{M_<t}(w_bar_{t-1} + alpha_k (w - w_bar_{t-1}))
            + 1/(n+1) sum_k L_{M_t}  (w_hat_t    + alpha_k (w - w_hat_t)),

   the mean cross-entropy on the memory along the line from w to the previous solution plus
   the mean cross-entropy on the current task along the line from w to the continual minimum:
   a w whose straight paths to both minima stay low-loss for the tasks each minimum is good at.
   The update direction is the one of the paper's released code: at every sampled point the
   gradient of the loss with respect to the network's weights *at that point*, averaged over the
   points of each line and summed over the two lines,

       g(w) = 1/(n+1) sum_k grad L_{M_<t}(p_k) + 1/(n+1) sum_k grad L_{M_t}(q_k),

   (the chain rule through the interpolation would weight each term by alpha_k; the reference
   does not, so the points near the two minima count as much as w itself). The optimiser is SGD
   (``lmc_lr``, ``lmc_momentum``) over ``lmc_epochs`` epochs; an epoch walks a permutation of
   M_<t in batches of ``lmc_batch_size``, each paired with a batch of M_t (cycled when M_t is
   smaller). The losses are taken with the network in evaluation mode (no dropout; batch-norm
   statistics fixed), as in the reference. The result is w_bar_t, which is evaluated and from
   which the next task starts.

All n + 1 points of a line are evaluated in one vectorised call (``torch.func.vmap`` over
stacked weights), so a step is two batched forward/backward passes whatever n is. In task-IL
each loss uses the sample's task units.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, grad_and_value, vmap

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.backends.torch.memory import ReplayMemory, derived_seed
from cl_runner.backends.torch.optim import set_lr, task_lr
from cl_runner.registry import ALGORITHMS


def line_gradient(learner: TorchLearner, anchor: list[torch.Tensor], w: list[torch.Tensor], n: int,
                  x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Mean over alpha_k = k/n (k = 0..n) of the loss gradient at anchor + alpha_k (w - anchor),
    each taken with respect to the weights at that point; also returns the mean loss."""
    model = learner.model
    names = [name for name, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())
    alphas = torch.arange(n + 1, device=w[0].device, dtype=w[0].dtype) / n

    def point_loss(params, xb, yb):
        logits = functional_call(model, ({**dict(zip(names, params)), **buffers}), (xb,))
        return learner.criterion(logits, yb, t)

    stacked = tuple(a + alphas.view(-1, *([1] * a.dim())) * (p - a) for a, p in zip(anchor, w))
    grads, losses = vmap(grad_and_value(point_loss), in_dims=(0, None, None))(stacked, x, y)
    return [g.mean(0) for g in grads], losses.mean()


@ALGORITHMS.register("mcsgd", backend="torch")
class MCSGD(TorchLearner):
    def __init__(self, cfg, stream, device, seed):
        super().__init__(cfg, stream, device, seed)
        algo = cfg.algo
        self.memory = ReplayMemory("ring", stream.input_shape, device, seed,
                                   per_task=int(algo.per_task_memory_samples), num_tasks=stream.num_tasks,
                                   num_outputs=self.num_outputs())
        self.lmc_generator = torch.Generator(device=device).manual_seed(derived_seed(seed, 4242))
        self.w_bar: list[torch.Tensor] | None = None  # the previous task's MC-SGD solution
        self.last_lmc: dict = {}

    def params(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def on_before_task(self, task) -> None:
        super().on_before_task(task)
        lr = task_lr(self.cfg.optimizer, task.id) * float(self.cfg.algo.lr_decay) ** task.id
        set_lr(self.optimizer, lr)
        self.optimizer.state.clear()  # the continual stage starts afresh from w_bar_{t-1}

    def on_after_training(self, task) -> None:
        algo = self.cfg.algo
        # Store the task's share of the episodic memory: a uniformly random subset.
        n = len(self.train_y)
        k = min(int(algo.per_task_memory_samples), n)
        pick = torch.randperm(n, generator=self.lmc_generator, device=self.device)[:k]
        self.memory.add(self.train_x[pick], self.train_y[pick], task.id)
        if self.w_bar is not None and task.id > 0 and int(algo.lmc_epochs) > 0:
            self.mode_connectivity(task)
        self.w_bar = [p.detach().clone() for p in self.params()]
        super().on_after_training(task)  # composed parts (plugins) see the final w_bar_t

    def mode_connectivity(self, task) -> None:
        """Replace the model's weights (w_hat_t) by w_bar_t, the minimiser of J (module docstring)."""
        algo = self.cfg.algo
        params = self.params()
        w_prev = self.w_bar
        w_hat = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, a, b in zip(params, w_prev, w_hat):
                p.copy_(a + float(algo.lmc_init_position) * (b - a))
        opt = torch.optim.SGD(params, lr=float(algo.lmc_lr), momentum=float(algo.lmc_momentum))
        bs, n = int(algo.lmc_batch_size), int(algo.lmc_line_samples)
        per_task = self.memory.per_task  # the current task's ring slots
        cur = torch.arange(task.id * per_task, task.id * per_task + min(self.memory.task_counts[task.id], per_task),
                           device=self.device)
        was_training = self.model.training
        self.model.eval()
        losses = []
        for _ in range(int(algo.lmc_epochs)):
            prev = self.memory.sample(self.memory.capacity, before_task=task.id)
            steps = math.ceil(max(len(prev), len(cur)) / bs)
            cur_order = cur[torch.randperm(len(cur), generator=self.lmc_generator, device=self.device)]
            prev_idx = _cycled(prev, steps * bs)
            cur_idx = _cycled(cur_order, steps * bs)
            for s in range(steps):
                w = [p.detach() for p in params]
                mx, my, mt, _ = self.memory.get(prev_idx[s * bs:(s + 1) * bs])
                g_prev, l_prev = line_gradient(self, w_prev, w, n, mx, my, mt if self.masks else None)
                cx, cy, ct, _ = self.memory.get(cur_idx[s * bs:(s + 1) * bs])
                g_cur, l_cur = line_gradient(self, w_hat, w, n, cx, cy, ct if self.masks else None)
                for p, a, b in zip(params, g_prev, g_cur):
                    p.grad = a + b
                opt.step()
                losses.append(l_prev + l_cur)
        for p in params:
            p.grad = None
        self.model.train(was_training)
        self.last_lmc = {"steps": len(losses), "objective": float(torch.stack(losses).mean()) if losses else None}

    def state_dict(self):
        state = super().state_dict()
        state["mcsgd"] = {"memory": self.memory.state_dict(), "w_bar": self.w_bar,
                          "generator": self.lmc_generator.get_state()}
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        own = state["mcsgd"]
        self.memory.load_state_dict(own["memory"])
        self.w_bar = [w.to(self.device) for w in own["w_bar"]] if own["w_bar"] is not None else None
        self.lmc_generator.set_state(own["generator"])


def _cycled(idx: torch.Tensor, total: int) -> torch.Tensor:
    """``idx`` repeated until it has ``total`` entries."""
    return idx.repeat(math.ceil(total / max(len(idx), 1)))[:total]
