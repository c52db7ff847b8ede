"""Sums over samples of elementwise functions of per-sample gradients (Fisher, MAS importances).

For a linear layer y = W a + b, the gradient of sample i's loss is g_i a_i^T (g_i = dL_i/dy_i),
so for f(v) = v^2 or |v|:  sum_i f(g_i a_i^T) = f(G)^T f(A)  -- one matrix product instead of N
outer products. Models made of linear layers and parameter-free modules take this exact fast
path; any other parameterised layer (conv, ...) takes the general ``torch.func.vmap`` path.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

ELEMENTWISE = {"square": torch.square, "abs": torch.abs}


def _linear_only(model: nn.Module) -> bool:
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not isinstance(module, nn.Linear):
            return False
    return True


def per_sample_grad_sum(model: nn.Module, sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        x: torch.Tensor, fn: str = "square", batch_size: int = 256,
                        force_vmap: bool = False) -> list[torch.Tensor]:
    """sum_i fn(d loss_i / d theta) for every trainable parameter (in ``model.parameters()`` order).

    ``sample_loss(outputs, idx)`` returns the vector of per-sample losses for the model outputs of
    the samples ``x[idx]`` (idx: a LongTensor of indices); it must not mix samples (no batch-norm
    in train mode).
    """
    f = ELEMENTWISE[fn]
    params = [p for p in model.parameters() if p.requires_grad]
    totals = [torch.zeros_like(p) for p in params]
    if _linear_only(model) and not force_vmap:
        _linear_path(model, sample_loss, x, f, batch_size, params, totals)
    else:
        _vmap_path(model, sample_loss, x, f, batch_size, params, totals)
    return totals


def _linear_path(model, sample_loss, x, f, batch_size, params, totals) -> None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    captured: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, inputs, output):
        captured[module] = (inputs[0].detach(), output)

    handles = [m.register_forward_hook(hook) for m in linears]
    index = {id(p): i for i, p in enumerate(params)}
    try:
        for lo in range(0, len(x), batch_size):
            captured.clear()
            with torch.enable_grad():
                out = model(x[lo:lo + batch_size])
                losses = sample_loss(out, torch.arange(lo, lo + len(out), device=x.device))
                outputs = [captured[m][1] for m in linears]
                grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
            for m, g in zip(linears, grads):
                if g is None:
                    continue
                a = captured[m][0]
                if m.weight.requires_grad:
                    totals[index[id(m.weight)]] += f(g).T @ f(a)
                if m.bias is not None and m.bias.requires_grad:
                    totals[index[id(m.bias)]] += f(g).sum(0)
    finally:
        for h in handles:
            h.remove()


def _vmap_path(model, sample_loss, x, f, batch_size, params, totals) -> None:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    values = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    for lo in range(0, len(x), batch_size):
        xb = x[lo:lo + batch_size]

        def one(p, xi, i):
            out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return sample_loss(out, i.unsqueeze(0)).sum()

        idx = torch.arange(lo, lo + len(xb), device=xb.device)
        grads = vmap(grad(one), in_dims=(None, 0, 0))(values, xb, idx)
        for k, n in enumerate(names):
            totals[k] += f(grads[n]).sum(0)
