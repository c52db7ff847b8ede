"""A training step for MLP backbones written out in tensor operations.

At the batch sizes of the MNIST continual-learning protocols (10 samples), an eager PyTorch step
spends most of its time in the framework, not in arithmetic: building the autograd graph, running
the engine, and ``torch.optim.SGD.step``'s bookkeeping. For a backbone made only of linear layers,
ReLUs (or tanh) and dropout, the backward pass is a few matrix products, so :class:`FusedMLPStep` computes
the forward pass, the cross-entropy loss and every parameter's gradient directly, with the same
ATen kernels autograd would call (``addmm``, ``threshold_backward``, ``nll_loss_backward``,
``_log_softmax_backward_data`` ...), and writes the gradients to ``p.grad``. Everything after
backward (the parts' ``after_backward`` gradient terms, clipping, the optimizer) is unchanged.

:func:`sgd_step` does ``torch.optim.SGD``'s update with the same ``_foreach`` kernels and the
optimizer's own momentum buffers, without its per-call wrappers. On a CPU, native.py does that
update (with EWC's or MAS's penalty gradient) in one C pass where it can.

The learner (``TorchLearner.choose_step``) takes this path for an MLP backbone with a fixed head
and no ``torch.compile``. With the plain (optionally task-masked) cross-entropy and no part adding
a loss term, :meth:`FusedMLPStep.__call__` is the whole step. Otherwise :meth:`FusedMLPStep.forward`
gives the logits as a leaf tensor, autograd differentiates the step's loss with respect to them
(and through any graph a part builds itself), and :meth:`FusedMLPStep.backward` adds the rest.
``backend.fused_step=false`` turns it off. tests/test_fused_step.py checks the gradients, the SGD
update and every algorithm's whole run against the autograd path: they are equal bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

aten = torch.ops.aten


def _direct(overload):
    """The operator's C++ callable where this torch exposes it (skipping the Python-level
    dispatch of ``torch.ops``), else the overload itself."""
    return getattr(overload, "_op", overload)


_threshold_backward = _direct(aten.threshold_backward.default)
_tanh_backward = _direct(aten.tanh_backward.default)
_nll_loss_forward = _direct(aten.nll_loss_forward.default)
_nll_loss_backward = _direct(aten.nll_loss_backward.default)
_log_softmax_backward = _direct(aten._log_softmax_backward_data.default)

_MEAN = 1  # at::Reduction::Mean
_IGNORE_INDEX = -100


class FusedMLPStep:
    """Forward, loss and gradients of ``Backbone(features=[Flatten, (Linear, ReLU|Tanh, Dropout?)*],
    head=Linear)`` for one batch. Use :meth:`for_model` (None where the model has another shape)."""

    def __init__(self, hidden: list[tuple[nn.Linear, nn.Dropout | None]], head: nn.Linear, tanh: bool = False):
        self.hidden = hidden
        self.tanh = tanh  # the hidden layers' nonlinearity: tanh, else ReLU
        self.head = head
        self.params = [p for lin, _ in (*hidden, (head, None)) for p in (lin.weight, lin.bias)]
        # Post-accumulate-grad hooks (e.g. SI reading the data loss's gradient) run as autograd
        # would run them; looked up when the step is built (a learner rebuilds it every task).
        self.hooks = {id(p): tuple(hooks.values()) for p in self.params
                      if (hooks := getattr(p, "_post_accumulate_grad_hooks", None))}
        self._one: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: nn.Module) -> "FusedMLPStep | None":
        features = getattr(model, "features", None)
        head = getattr(model, "head", None)
        if type(features) is not nn.Sequential or type(head) is not nn.Linear or head.bias is None:
            return None
        modules = list(features)
        if modules and type(modules[0]) is nn.Flatten and modules[0].start_dim == 1 and modules[0].end_dim == -1:
            modules = modules[1:]
        hidden: list[tuple[nn.Linear, nn.Dropout | None]] = []
        kinds = set()
        i = 0
        while i < len(modules):
            lin = modules[i]
            if type(lin) is not nn.Linear or lin.bias is None or i + 1 >= len(modules) \
                    or type(modules[i + 1]) not in (nn.ReLU, nn.Tanh):
                return None
            kinds.add(type(modules[i + 1]))
            i += 2
            drop = None
            if i < len(modules) and type(modules[i]) is nn.Dropout:
                drop = modules[i]
                i += 1
            hidden.append((lin, drop))
        if len(kinds) > 1:
            return None
        step = cls(hidden, head, tanh=kinds == {nn.Tanh})
        # The model's parameters must be exactly these (in this order), all trainable.
        if [id(p) for p in model.parameters()] != [id(p) for p in step.params] or \
                not all(p.requires_grad for p in step.params):
            return None
        return step

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The logits of the batch (computed without a graph) and what :meth:`backward` needs."""
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        a = x.reshape(x.shape[0], -1)
        saved = []
        for lin, drop in self.hidden:
            h = torch.addmm(lin.bias, a, lin.weight.t())
            h = h.tanh_() if self.tanh else h.relu_()
            noise = None
            if drop is not None and drop.training and drop.p > 0:
                out, noise = _dropout(h, drop.p)
            else:
                out = h
            saved.append((a, h, noise))
            a = out
        saved.append(a)
        return torch.addmm(self.head.bias, a, self.head.weight.t()), saved

    @torch.no_grad()
    def backward(self, saved: list, g: torch.Tensor, accumulate: bool = False) -> None:
        """Back-propagate ``g`` (the gradient of the loss with respect to the logits) into every
        parameter's ``.grad``: set it, or with ``accumulate`` add to the one already there."""
        self._backward(saved, g, accumulate)

    def _backward(self, saved: list, g: torch.Tensor, accumulate: bool = False) -> None:
        self._set_grads(self.head, g, saved[-1], accumulate)
        weight = self.head.weight
        for (lin, drop), (a_in, h, noise) in zip(reversed(self.hidden), reversed(saved[:-1])):
            d = g.mm(weight)
            if noise is not None:
                d = _dropout_backward(d, noise, drop.p)
            g = _tanh_backward(d, h) if self.tanh else _threshold_backward(d, h, 0)
            self._set_grads(lin, g, a_in, accumulate)
            weight = lin.weight

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
        """The mean cross-entropy loss of the batch (a 0-dim tensor); sets every parameter's
        ``.grad`` to the loss's gradient. ``invalid``: a bool mask (batch, outputs) of logits set
        to -inf before the loss (task-IL)."""
        z, saved = self._forward(x)
        if invalid is not None:
            z = z.masked_fill(invalid, float("-inf"))
        logp = torch.log_softmax(z, 1)
        loss, total_weight = _nll_loss_forward(logp, y, None, _MEAN, _IGNORE_INDEX)
        one = self._one
        if one is None or one.device != loss.device or one.dtype != loss.dtype:
            one = self._one = torch.ones_like(loss)
        g = _nll_loss_backward(one, logp, y, None, _MEAN, _IGNORE_INDEX, total_weight)
        g = _log_softmax_backward(g, logp, 1, logp.dtype)
        if invalid is not None:
            g = g.masked_fill(invalid, 0.0)
        self._backward(saved, g)
        return loss

    def _set_grads(self, lin: nn.Linear, g: torch.Tensor, a: torch.Tensor, accumulate: bool = False) -> None:
        for p, grad in ((lin.weight, g.t().mm(a)), (lin.bias, g.sum(0))):
            if accumulate and p.grad is not None:
                p.grad.add_(grad)
            else:
                p.grad = grad
        if self.hooks:
            for p in (lin.weight, lin.bias):
                for hook in self.hooks.get(id(p), ()):
                    hook(p)


def _dropout(h: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.dropout(h, p, training=True)`` as ATen computes it: on CUDA the fused kernel (a bool
    mask), elsewhere a scaled Bernoulli noise tensor multiplied in. Returns (output, what the
    backward needs)."""
    if h.is_cuda and p < 1:
        return aten.native_dropout(h, p, True)
    if p == 1:
        noise = torch.zeros((), dtype=h.dtype, device=h.device)
        return h * noise, noise
    noise = torch.empty_like(h).bernoulli_(1 - p)
    noise.div_(1 - p)
    return h * noise, noise


def _dropout_backward(d: torch.Tensor, saved: torch.Tensor, p: float) -> torch.Tensor:
    if saved.dtype == torch.bool:
        return aten.native_dropout_backward(d, saved, 1.0 / (1.0 - p))
    return d * saved


def sgd_step_possible(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`sgd_step` does exactly what ``optimizer.step()`` would."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    from torch.optim import optimizer as optim_module

    # Step hooks (the optimizer's own or global ones) run only inside step(); where this torch
    # keeps them elsewhere, they cannot be checked, so step() is used.
    for owner, name in ((optimizer, "_optimizer_step_pre_hooks"), (optimizer, "_optimizer_step_post_hooks"),
                        (optim_module, "_global_optimizer_pre_hooks"),
                        (optim_module, "_global_optimizer_post_hooks")):
        hooks = getattr(owner, name, None)
        if hooks is None or len(hooks):
            return False
    return all(not g.get("maximize") and not g.get("differentiable") and not g.get("fused")
               and not isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups)


@torch.no_grad()
def sgd_step(optimizer: torch.optim.SGD) -> None:
    """``torch.optim.SGD.step()`` (foreach implementation) for groups whose parameters are dense."""
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        wd, momentum = group["weight_decay"], group["momentum"]
        dampening, nesterov, lr = group["dampening"], group["nesterov"], group["lr"]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if momentum != 0:
            states = [optimizer.state[p] for p in params]
            bufs = [s.get("momentum_buffer") for s in states]
            if any(b is None for b in bufs):
                bufs = []
                for s, g in zip(states, grads):
                    b = s.get("momentum_buffer")
                    if b is None:
                        b = s["momentum_buffer"] = torch.clone(g).detach()
                    else:
                        b.mul_(momentum).add_(g, alpha=1 - dampening)
                    bufs.append(b)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads, alpha=1 - dampening)
            if nesterov:  # in place, as torch.optim.SGD does
                torch._foreach_add_(grads, bufs, alpha=momentum)
            else:
                grads = bufs
        torch._foreach_add_(params, grads, alpha=-lr)
