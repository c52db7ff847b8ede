"""Gradient Episodic Memory (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual
Learning", NeurIPS).

Each task keeps an episodic memory of ``mem_per_task`` samples (a ring: the task's latest
samples). At every step, with g the gradient of the stream batch's loss and G the matrix whose
rows g_k are the gradients of the loss on each *past* task's memory, the update must not
increase any past task's memory loss to first order: <g~, g_k> >= 0 for every k. When g already
satisfies every constraint it is used as is; otherwise g~ = G^T v + g, with v the solution of the
paper's dual quadratic program

    min_v  1/2 v^T (G G^T + eps I) v + g^T G^T v     subject to  v >= gamma,

solved with ``quadprog``. gamma = ``memory_strength`` is the paper's margin, which biases the
projection toward updates that lower the past losses (the paper's released code bounds v below
by it, as here). eps = ``qp_eps`` is the released code's constant 1e-3, added at every solve
(facebookresearch/GradientEpisodicMemory model/gem.py:70-88); gamma = eps = 0 gives the exact
projection onto the cone of allowed gradients. Each past
task's gradient comes from a forward and backward pass over its own memory, the dot products and
G G^T are computed on the device, and only the t x t problem goes to the host. In task-IL each memory's loss uses its task's output units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_runner.algorithms.replay import _solve_qp, gem_dual
from cl_runner.backends.torch.learner import Part, TorchLearner
from cl_runner.backends.torch.memory import ReplayMemory
from cl_runner.registry import ALGORITHMS


@torch.no_grad()
def gem_project(g: torch.Tensor, G: torch.Tensor, margin: float, eps: float = 1e-3) -> tuple[torch.Tensor, bool]:
    """(g~, projected): g itself when <g, g_k> >= 0 for every row g_k of G, else G^T v + g with
    v from :func:`gem_dual` (margin ``margin``, ``eps`` I added to G G^T)."""
    dots = G @ g
    if not bool((dots < 0).any()):
        return g, False
    gram = (G @ G.T).double().cpu().numpy()
    v = gem_dual(gram, dots.double().cpu().numpy(), margin, eps)
    return g + torch.from_numpy(v).to(G) @ G, True


class GEMPart(Part):
    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        _solve_qp()  # a missing package fails at the start, not at the second task
        self.memory = ReplayMemory("ring", learner.stream.input_shape, learner.device, learner.seed,
                                   per_task=int(cfg.mem_per_task), num_tasks=learner.stream.num_tasks,
                                   num_outputs=learner.num_outputs())
        self.margin = float(cfg.memory_strength)
        self.eps = float(cfg.qp_eps)
        self.task_id = 0
        self.projections = 0  # steps whose gradient was projected (for inspection)
        self._pending = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        # Read each time: a growing head (backbone.head) adds parameters during the stream.
        return [p for p in self.learner.model.parameters() if p.requires_grad]

    def on_before_task(self, task) -> None:
        self.task_id = task.id

    def extra_loss(self, x, y, logits):
        self._pending = (x, y)  # stored after the step
        return None

    def past_gradients(self) -> torch.Tensor:
        """(past tasks, parameters): row k is the gradient of the mean loss on task k's memory.

        One forward and backward pass per past task over that task's memory only (as the paper's
        code): the cost per step is one pass over the whole memory, whatever the number of tasks.
        """
        learner, mem = self.learner, self.memory
        params = self.params
        rows = []
        with torch.enable_grad():
            for k in range(self.task_id):
                mx, my, mt = mem.task_rows(k)  # views: no gather of the whole memory per step
                if len(my) == 0:
                    rows.append(torch.zeros(sum(p.numel() for p in params), device=mem.x.device))
                    continue
                tk = mt if learner.masks else None
                loss = F.cross_entropy(learner.masked(learner.model(mx), tk), my)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                       for g, p in zip(grads, params)]))
        return torch.stack(rows)

    def after_backward(self) -> None:
        if self.task_id == 0:
            return
        G = self.past_gradients()
        params = self.params
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        g = torch.cat([gr.reshape(-1) for gr in grads])
        new, projected = gem_project(g, G, self.margin, self.eps)
        if not projected:
            return
        self.projections += 1
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = new[offset:offset + n].view_as(p).clone()
            offset += n

    def after_step(self) -> None:
        x, y = self._pending
        self._pending = None
        self.memory.add(x, y, self.task_id)

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state) -> None:
        self.memory.load_state_dict(state["memory"])


@ALGORITHMS.register("gem", backend="torch")
class GEM(TorchLearner):
    part_classes = (GEMPart,)
