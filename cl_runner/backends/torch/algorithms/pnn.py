"""Progressive Neural Networks (Rusu et al. 2016, arXiv:1606.04671).

One MLP column per task. Column k's hidden layer i is

    h_i^(k) = ReLU( W_i^(k) h_{i-1}^(k) + sum over earlier columns of the lateral input ),

and its output layer takes the same lateral input from the earlier columns' last hidden layer.
With ``lateral=adapter`` (the paper's adapters) the lateral input of a layer is one small MLP over
the earlier columns' activations concatenated, U_i sigma(V_i (alpha_i * h_{i-1}^(<k))): a learned
scalar alpha_i (initialised at a small random value), a projection V_i onto the column's width
and the lateral weights U_i; with ``lateral=linear`` it is U_i h_{i-1}^(<k) (the basic form).
By default the first hidden layer has no lateral connections (every column sees the same input);
``lateral_from_input`` gives it one lateral map of the input per earlier column, and
``lateral_bias`` a bias to each earlier column's lateral map, as A-GEM's PNN has
(facebookresearch/agem model/model.py:445-475, ``extensible_fc_column_progNN``: for each earlier
column tt, ``U_w h_pnn[tt][i] + U_b`` with ``h_pnn[tt][0]`` the input). A sum of separate maps is
kept as one map over the concatenated activations (the same function and the same gradients); the
biases stay one per earlier column, summed. ``backbone.init`` sets the columns' weights
(``truncated_normal``: A-GEM's N(0, 0.1^2) truncated at 2 std, biases 0.1).

Before each task after the first a new column is added and every earlier column is frozen
(``requires_grad`` off, kept in eval mode); the optimizer is rebuilt over the new column only.
So training task t cannot change what columns 0..t-1 compute: forgetting is exactly zero.

The task id selects the column: during training the current task's, at evaluation the evaluated
task's. This needs the task id at test time: PNN runs in task-IL and in domain-IL with the
task id known at test (class-IL is an error). Every column's output layer covers all output
units (task-IL masks the task's units as for every learner).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cl_runner.backends.torch.learner import TorchLearner
from cl_runner.backends.torch.optim import build_optimizer, set_lr, task_lr
from cl_runner.errors import ConfigError
from cl_runner.registry import ALGORITHMS

#: backbone.init=truncated_normal: weights from N(0, 0.1^2) truncated at 2 std, biases 0.1
#: (TensorFlow's truncated_normal_initializer(stddev=0.1) and constant 0.1: A-GEM's
#: weight_variable / bias_variable, facebookresearch/agem model/model.py:24-60).
TRUNC_STD, TRUNC_BIAS = 0.1, 0.1


class Lateral(nn.Module):
    """The lateral input of one layer of a column from the earlier columns' activations
    (``columns`` earlier columns of ``in_features`` units each, concatenated)."""

    def __init__(self, columns: int, in_features: int, out_features: int, width: int, kind: str, bias: bool):
        super().__init__()
        self.kind = kind
        if kind == "adapter":
            self.alpha = nn.Parameter(torch.empty(()).uniform_(0.0, 0.1))
            self.project = nn.Linear(columns * in_features, width)
            self.out = nn.Linear(width, out_features, bias=False)
        else:
            self.out = nn.Linear(columns * in_features, out_features, bias=False)
        # lateral_bias: one bias per earlier column's map, summed (as a sum of separate maps has)
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(columns, out_features).uniform_(-bound, bound))
        else:
            self.bias = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "adapter":
            h = torch.relu(self.project(self.alpha * h))
        out = self.out(h)
        return out if self.bias is None else out + self.bias.sum(0)


class Column(nn.Module):
    def __init__(self, index: int, input_dim: int, width: int, n_hidden: int, num_outputs: int,
                 dropout: float, lateral: str, from_input: bool = False, lateral_bias: bool = False,
                 init: str = "default"):
        super().__init__()
        self.index = index
        sizes = [input_dim] + [width] * n_hidden
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], num_outputs)
        # laterals[i] feeds layer i + 1 (hidden layers after the first, then the output layer)
        # from the earlier columns' hidden layer i.
        self.laterals = nn.ModuleList(
            Lateral(index, width, b, width, lateral, lateral_bias) for b in [width] * (n_hidden - 1) + [num_outputs]
        ) if index > 0 else nn.ModuleList()
        # from_input: the first hidden layer also takes one lateral map of the input per earlier
        # column (what the earlier columns' layer 0 saw, i.e. the input itself).
        self.input_lateral = Lateral(index, input_dim, width, width, lateral, lateral_bias) \
            if index > 0 and from_input else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_column(self, init)

    def forward(self, x: torch.Tensor, earlier: list[list[torch.Tensor]]):
        """``earlier[i]``: the earlier columns' hidden activations of layer i. Returns this column's
        hidden activations and its output."""
        hidden = []
        h = x
        for i, layer in enumerate(self.layers):
            z = layer(h)
            if i == 0 and self.input_lateral is not None:
                z = z + self.input_lateral(x.repeat(1, self.index))
            if i > 0 and self.index > 0:
                z = z + self.laterals[i - 1](torch.cat(earlier[i - 1], dim=1))
            h = self.dropout(torch.relu(z))
            hidden.append(h)
        z = self.out(h)
        if self.index > 0:
            z = z + self.laterals[-1](torch.cat(earlier[-1], dim=1))
        return hidden, z


def init_column(column: Column, init: str) -> None:
    """``backbone.init`` for a column's linear maps (``default`` keeps PyTorch's); ``truncated_normal``
    also sets the lateral biases, the others zero them."""
    if init == "default":
        return
    for m in column.modules():
        if isinstance(m, nn.Linear):
            if init == "truncated_normal":
                nn.init.trunc_normal_(m.weight, std=TRUNC_STD, a=-2 * TRUNC_STD, b=2 * TRUNC_STD)
            elif init == "xavier_uniform":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, TRUNC_BIAS if init == "truncated_normal" else 0.0)
        elif isinstance(m, Lateral) and m.bias is not None:
            nn.init.constant_(m.bias, TRUNC_BIAS if init == "truncated_normal" else 0.0)


class ProgressiveNet(nn.Module):
    def __init__(self, input_shape, width: int, n_hidden: int, num_outputs: int, dropout: float, lateral: str,
                 from_input: bool = False, lateral_bias: bool = False, init: str = "default"):
        super().__init__()
        self.input_dim = int(math.prod(input_shape))
        self.width, self.n_hidden, self.num_outputs = width, n_hidden, num_outputs
        self.dropout, self.lateral = dropout, lateral
        self.from_input, self.lateral_bias, self.init = from_input, lateral_bias, init
        self.columns = nn.ModuleList()
        self.active = 0  # the column forward() uses

    def add_column(self) -> Column:
        device = next(self.parameters()).device if len(self.columns) else torch.device("cpu")
        column = Column(len(self.columns), self.input_dim, self.width, self.n_hidden, self.num_outputs,
                        self.dropout, self.lateral, self.from_input, self.lateral_bias, self.init).to(device)
        self.columns.append(column)
        return column

    def freeze_columns_before(self, k: int) -> None:
        for column in self.columns[:k]:
            column.requires_grad_(False)
            column.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for column in self.columns:  # frozen columns always compute as at evaluation
            if not any(p.requires_grad for p in column.parameters()):
                column.eval()
        return self

    def forward(self, x: torch.Tensor, column: int | None = None) -> torch.Tensor:
        k = self.active if column is None else column
        x = x.flatten(1)
        earlier: list[list[torch.Tensor]] = [[] for _ in range(self.n_hidden)]
        for j in range(k + 1):
            hidden, out = self.columns[j](x, earlier)
            for i, h in enumerate(hidden):
                earlier[i].append(h)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        while f"{prefix}columns.{len(self.columns)}.out.weight" in state_dict:
            self.add_column()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@ALGORITHMS.register("pnn", backend="torch")
class PNN(TorchLearner):
    refuses_plugins = ("every column is frozen once its task is trained, so there is nothing for a "
                       "regulariser to protect, and the parameter set grows by a column per task")
    refuses_growing_head = "every column has its own output layer already"

    def __init__(self, cfg, stream, device, seed: int):
        bb = cfg.backbone
        if bb.type != "mlp":
            raise ConfigError(f"pnn builds MLP columns; backbone.type={bb.type} is not supported, use backbone=mlp.")
        if bb.n_hidden_layers < 1:
            raise ConfigError("pnn needs at least one hidden layer per column (backbone.n_hidden_layers >= 1).")
        if getattr(bb, "activation", "relu") != "relu":
            raise ConfigError(f"pnn's columns use ReLU (the paper's); backbone.activation={bb.activation} "
                              f"is not supported, use backbone.activation=relu.")
        if getattr(bb, "head", "fixed") != "fixed":
            raise ConfigError(f"pnn has an output layer per column already; use backbone.head=fixed "
                              f"(got {bb.head}).")
        if cfg.backend.compile:
            raise ConfigError("pnn grows its network every task; set backend.compile=false.")
        super().__init__(cfg, stream, device, seed)
        self.model = ProgressiveNet(stream.input_shape, int(bb.width), int(bb.n_hidden_layers),
                                    self.num_outputs(), float(bb.dropout), str(cfg.algo.lateral),
                                    bool(cfg.algo.lateral_from_input), bool(cfg.algo.lateral_bias),
                                    str(getattr(bb, "init", "default")))
        self.model.add_column()
        self.model.to(device)
        self.train_forward = self.model
        self.optimizer = build_optimizer(self.model.columns[0].parameters(), cfg.optimizer)

    def on_before_task(self, task) -> None:
        model = self.model
        while len(model.columns) <= task.id:
            model.add_column()
        if len(model.columns) > 1 and model.active != task.id:
            model.freeze_columns_before(task.id)
            self.optimizer = build_optimizer(model.columns[task.id].parameters(), self.cfg.optimizer)
        model.active = task.id
        model.train(model.training)
        super().on_before_task(task)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: int | None) -> torch.Tensor:
        column = min(task_id, len(self.model.columns) - 1)  # tasks not trained yet: the newest column
        logits = self.model(x, column)
        if self.masks:
            logits = logits.masked_fill(~self.output_mask[task_id], float("-inf"))
        return logits.argmax(dim=1)

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state["model"])
        k = len(self.model.columns) - 1
        self.model.active = k
        self.model.freeze_columns_before(k)
        self.optimizer = build_optimizer(self.model.columns[k].parameters(), self.cfg.optimizer)
        set_lr(self.optimizer, task_lr(self.cfg.optimizer, k))
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
