"""Output layers that grow during the stream (``backbone.head``).

* ``fixed`` (the default): one linear layer over every output unit from the start; task-IL masks
  each task's units.
* ``incremental`` (class-IL, domain-IL): output units are added when a task brings classes not
  seen before; the softmax runs over the classes seen so far only.
* ``multihead`` (task-IL): a new linear head per task over that task's units.

A growing head is a list of linear chunks, each owning a set of output units. Its forward
returns every output unit as the rest of the learner expects (``(N, num_outputs)``); units no
chunk owns yet read -inf, so they take no probability and are never predicted. New chunks are
added to the optimizer as a new parameter group, so the state (momentum buffers, Adam moments)
of the existing parameters is kept as it is. A chunk whose units are not used by a step (an old
task's head in task-IL) gets no gradient, and PyTorch's optimizers leave such parameters alone.
"""

from __future__ import annotations


import torch
from torch import nn

from cl_runner.errors import ConfigError

HEADS = ("fixed", "incremental", "multihead")
_SCENARIOS = {"incremental": ("class_il", "domain_il"), "multihead": ("task_il",)}


class GrowingHead(nn.Module):
    def __init__(self, kind: str, feature_dim: int, num_outputs: int, init: str = "default"):
        super().__init__()
        self.kind = kind
        self.feature_dim = feature_dim
        self.num_outputs = num_outputs
        self.init = init
        self.chunks = nn.ModuleList()
        self.register_buffer("owned", torch.zeros(num_outputs, dtype=torch.bool))
        self.register_buffer("index", torch.zeros(0, dtype=torch.long))

    def chunk_units(self, k: int) -> torch.Tensor:
        return getattr(self, f"units_{k}")

    def chunks_with_units(self):
        return [(chunk, self.chunk_units(k)) for k, chunk in enumerate(self.chunks)]

    def add_chunk(self, units: torch.Tensor) -> nn.Linear:
        device = self.owned.device
        units = units.to(device=device, dtype=torch.long)
        if bool(self.owned[units].any()):
            raise ValueError(f"output units {units.tolist()} already belong to a head")
        chunk = nn.Linear(self.feature_dim, len(units)).to(device)
        if self.init == "xavier_uniform":
            nn.init.xavier_uniform_(chunk.weight)
            nn.init.zeros_(chunk.bias)
        elif self.init == "kaiming_normal":
            nn.init.kaiming_normal_(chunk.weight)
            nn.init.zeros_(chunk.bias)
        elif self.init == "truncated_normal":
            nn.init.trunc_normal_(chunk.weight, std=0.1, a=-0.2, b=0.2)
            nn.init.constant_(chunk.bias, 0.1)
        self.register_buffer(f"units_{len(self.chunks)}", units.clone())
        self.chunks.append(chunk)
        self.owned[units] = True
        self.index = torch.cat([self.index, units])
        return chunk

    def grow(self, task, task_units: torch.Tensor, scenario: str) -> list[nn.Parameter]:
        """Add what ``task`` needs (``task_units``: its output units, boolean); the new parameters."""
        if scenario not in _SCENARIOS[self.kind]:
            raise ConfigError(f"backbone.head={self.kind} is not defined for the {scenario} scenario (it "
                              f"supports: {', '.join(_SCENARIOS[self.kind])}); use backbone.head=fixed"
                              f"{' or multihead' if scenario == 'task_il' else ' or incremental'}.")
        task_units = task_units.to(self.owned.device)
        if self.kind == "multihead":
            units = task_units.nonzero().squeeze(1)
        else:
            units = (task_units & ~self.owned).nonzero().squeeze(1)
        if len(units) == 0:
            return []
        return list(self.add_chunk(units).parameters())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h.new_full((h.shape[0], self.num_outputs), float("-inf"))
        if not len(self.chunks):
            return out
        z = torch.cat([chunk(h) for chunk in self.chunks], dim=1)
        return out.index_copy(1, self.index, z)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Grow to the saved chunks first, so a fresh head loads a grown one's state.
        k = len(self.chunks)
        while f"{prefix}units_{k}" in state_dict:
            self.add_chunk(state_dict[f"{prefix}units_{k}"])
            k += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, chunks={len(self.chunks)}, owned={int(self.owned.sum())}/{self.num_outputs}"


def make_head(kind: str, feature_dim: int, num_outputs: int, init: str = "default") -> nn.Module:
    if kind not in HEADS:
        raise ConfigError(f"config key 'backbone.head': '{kind}' is not one of {', '.join(HEADS)}.")
    if kind == "fixed":
        return nn.Linear(feature_dim, num_outputs)
    return GrowingHead(kind, feature_dim, num_outputs, init)


def grow_head(model: nn.Module, optimizer: torch.optim.Optimizer, task, task_units: torch.Tensor,
              scenario: str) -> None:
    """Before ``task``: grow the model's head if it is a growing one, and give the optimizer the new
    parameters (a new group with the current learning rate; the other groups' state kept)."""
    head = getattr(model, "head", None)
    if isinstance(head, GrowingHead):
        head.grow(task, task_units, scenario)
        add_missing_params(optimizer, model)


def release_unused_head_grads(model: nn.Module, output_mask: torch.Tensor, task_ids: torch.Tensor) -> None:
    """Multi-head, after backward: the heads of tasks absent from the batch got an exactly zero
    gradient (their units are masked); drop it (``grad = None``) so that the optimizer skips them as
    if they had not been in the graph: no momentum or weight-decay step moves an unused head."""
    head = getattr(model, "head", None)
    if not isinstance(head, GrowingHead) or head.kind != "multihead":
        return
    used = output_mask[task_ids].any(0).cpu()
    for chunk, units in head.chunks_with_units():
        if not bool(used[units.cpu()].any()):
            for p in chunk.parameters():
                p.grad = None


def add_missing_params(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Give the optimizer the model's trainable parameters it does not have: one new group per
    chunk of a growing head (in the order they grew, so a saved optimizer state loads onto a
    regrown head), then one group for any others."""
    have = {id(p) for group in optimizer.param_groups for p in group["params"]}
    head = getattr(model, "head", None)
    modules = list(head.chunks) if isinstance(head, GrowingHead) else []
    for module in [*modules, model]:
        new = [p for p in module.parameters() if p.requires_grad and id(p) not in have]
        if new:
            optimizer.add_param_group({"params": new, "lr": optimizer.param_groups[0]["lr"]})
            have.update(id(p) for p in new)
