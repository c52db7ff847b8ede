"""Backbones for the PyTorch backend.

Every backbone is ``features`` (input -> representation) followed by a linear ``head`` over all
output units; task-IL restricts the head's outputs to the task's units (one head per task as
slices of one layer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cl_runner.registry import BACKBONES


class Backbone(nn.Module):
    def __init__(self, features: nn.Module, feature_dim: int, num_outputs: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, num_outputs)
        self.feature_dim = feature_dim
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


@BACKBONES.register("mlp", backend="torch")
def mlp(cfg, input_shape, num_outputs: int) -> Backbone:
    """Linear + activation (``activation``: ReLU or tanh) (+ dropout) layers, then the head.
    ``batch_norm``: every linear layer without a bias and followed by ``BatchNorm1d``, the output
    layer too (a ``Sequential`` head):
    GDumb's MNIST MLP (drimpossible/GDumb src/models/mnist/mlp.py and src/models/layers.py
    FCBlock / FinalBlock)."""
    bn = bool(getattr(cfg, "batch_norm", False))
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = int(math.prod(input_shape))
    activation = ACTIVATIONS[getattr(cfg, "activation", "relu")]
    for _ in range(cfg.n_hidden_layers):
        if bn:
            layers += [nn.Linear(width_in, cfg.width, bias=False), nn.BatchNorm1d(cfg.width), activation()]
        else:
            layers += [nn.Linear(width_in, cfg.width), activation()]
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width_in = cfg.width
    model = Backbone(nn.Sequential(*layers), width_in, num_outputs)
    if bn:
        model.head = nn.Sequential(nn.Linear(width_in, num_outputs, bias=False), nn.BatchNorm1d(num_outputs))
    return model


@BACKBONES.register("cnn", backend="torch")
def cnn(cfg, input_shape, num_outputs: int) -> Backbone:
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in cfg.channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, cfg.width), nn.ReLU()]
    if cfg.dropout > 0:
        layers.append(nn.Dropout(cfg.dropout))
    return Backbone(nn.Sequential(*layers), cfg.width, num_outputs)


def build_backbone(cfg, input_shape, num_outputs: int) -> Backbone:
    model = BACKBONES.get(cfg.type, backend="torch")(cfg, tuple(input_shape), num_outputs)
    head = getattr(cfg, "head", "fixed")
    if head != "fixed":  # a head that grows with the stream (cl_runner/backends/torch/heads.py)
        from cl_runner.backends.torch.heads import make_head

        model.head = make_head(head, model.feature_dim, num_outputs, getattr(cfg, "init", "default"))
    if getattr(cfg, "init", "default") == "xavier_uniform":
        xavier_init(model)
    elif getattr(cfg, "init", "default") == "kaiming_normal":
        kaiming_init(model)
    elif getattr(cfg, "init", "default") == "truncated_normal":
        truncated_normal_init(model)
    return model


def truncated_normal_init(model: nn.Module, std: float = 0.1, bias: float = 0.1) -> None:
    """Weights from N(0, std^2) truncated at 2 std and constant biases, for every linear and
    convolutional layer: TensorFlow's ``truncated_normal_initializer(stddev=0.1)`` and
    ``constant_initializer(0.1)`` (facebookresearch/agem model/model.py:24-60)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.constant_(m.bias, bias)


def xavier_init(model: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every linear and convolutional layer."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def kaiming_init(model: nn.Module) -> None:
    """He-normal weights (N(0, 2 / fan_in): ``nn.init.kaiming_normal_``'s defaults) and zero biases
    for every linear and convolutional layer."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


from cl_runner.backends.torch import resnet  # noqa: E402,F401  (registers resnet18)
