"""ResNet-18 for 32 x 32 (CIFAR) and 64 x 64 (Tiny ImageNet) images (PyTorch backend).

The CIFAR variant of He et al. 2016's ResNet-18 used throughout continual learning: a 3x3
stride-1 stem convolution with no max pooling, four stages of two BasicBlocks with nf, 2nf, 4nf
and 8nf filters (the last three stages start with stride 2; a block whose shape changes adds a
1x1 convolution + batch norm on its shortcut), batch norm after every convolution, global
average pooling, then the linear head over all output units. Convolutions have no bias.

``backbone.nf`` sets the base width: 20 is the reduced ResNet-18 of GEM (Lopez-Paz & Ranzato
2017) and A-GEM (Chaudhry et al. 2019); 64 is the full-width one of DER (Buzzega et al. 2020),
11,173,962 parameters with 10 outputs. GEM's code pools with a fixed 4x4 window, which is global
pooling on 32 x 32 inputs; global average pooling is used here for every input size (as DER's
code does), so the feature size is 8nf for Tiny ImageNet too.

``backbone.precision: bf16`` runs the features under ``torch.autocast`` in bfloat16 (parameters,
batch-norm statistics and the head stay float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl_runner.backends.torch.backbones import Backbone
from cl_runner.backends.resnet_config import check_resnet_config
from cl_runner.registry import BACKBONES

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetFeatures(nn.Module):
    """Input (N, C, H, W) -> (N, 8 nf) features."""

    def __init__(self, in_channels: int, nf: int, blocks=(2, 2, 2, 2), bf16: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        stages, cin = [], nf
        for i, n in enumerate(blocks):
            cout = nf * 2 ** i
            layers = []
            for b in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (b == 0 and i > 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = cin
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            out = out.mean(dim=(2, 3))
        return out.float()


@BACKBONES.register("resnet18", backend="torch")
def resnet18(cfg, input_shape, num_outputs: int) -> Backbone:
    nf, bf16 = check_resnet_config(cfg)
    feats = ResNetFeatures(int(input_shape[0]), nf, bf16=bf16)
    return Backbone(feats, feats.out_dim, num_outputs)
