"""ResNets from "Deep Residual Learning for Image Recognition" (He et al., arXiv 1512.03385).

``resnet``: the paper's CIFAR networks (section 4.2). Three stages of 16/32/64 channels (times 4 for
bottlenecks) at strides 1/2/2, post-activation blocks (ReLU after the addition); with the stem conv
and the classifier, depth = 6n+2 (basic blocks, two weighted layers) or 9n+2 (bottlenecks, three).
Where a block changes the width or resolution its shortcut is a 1x1 convolution followed by BN (the
paper's option B, as hysts/pytorch_image_classification does); the paper's CIFAR networks used
parameter-free zero-padding shortcuts (option A), so their parameter counts are ours minus those two
or three projections.

``resnet18/34/50``: the ImageNet networks of the paper's Table 1, four stages of 64/128/256/512
channels (times 4 for bottlenecks) with [2,2,2,2], [3,4,6,3] and [3,4,6,3] blocks, so depth =
2 * 8 + 2 = 18, 2 * 16 + 2 = 34 and 3 * 16 + 2 = 50; with a CIFAR stem, one 3x3 convolution at
stride 1 and no max-pool in place of the 7x7 stride-2 convolution and pooling, as in
kuangliu/pytorch-cifar (whose ResNet18/34/50 the CIFAR tricks collection trains).
"""
from typing import Literal

import torch.nn as nn
import torch.nn.functional as F

from models.common import (ConvStemNetwork, SqueezeExcite, conv1x1, conv3x3, projection_shortcut,
                           residual_blocks_per_stage)
from models.registry import CNN_RECIPE, register_model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the first one downsamples."""

    expansion = 1

    def __init__(self, in_channels, out_channels, stride, se_reduction=None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcite(out_channels, se_reduction) if se_reduction else nn.Identity()
        self.shortcut = projection_shortcut(in_channels, out_channels, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y = self.se(y)
        # ReLU after the addition: the post-activation design of the original paper
        return F.relu(y + self.shortcut(x))


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (downsampling), 1x1 expand to ``out_channels`` = 4x the bottleneck width."""

    expansion = 4

    def __init__(self, in_channels, out_channels, stride, se_reduction=None):
        super().__init__()
        bottleneck_channels = out_channels // self.expansion
        self.conv1 = conv1x1(in_channels, bottleneck_channels)
        self.bn1 = nn.BatchNorm2d(bottleneck_channels)
        self.conv2 = conv3x3(bottleneck_channels, bottleneck_channels, stride)
        self.bn2 = nn.BatchNorm2d(bottleneck_channels)
        self.conv3 = conv1x1(bottleneck_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcite(out_channels, se_reduction) if se_reduction else nn.Identity()
        self.shortcut = projection_shortcut(in_channels, out_channels, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        y = self.se(y)
        return F.relu(y + self.shortcut(x))


class ResNet(ConvStemNetwork):
    """Stem conv-BN-ReLU, stages of ``blocks_per_stage[i]`` blocks ``stage_channels[i]`` wide (strides
    1, 2, 2, ...), global pooling, linear; ``se_reduction`` adds SE gates to every block."""


BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}


@register_model('resnet', test_config=dict(depth=8, base_channels=4),
                epochs=160, batch_size=128, base_lr=0.1, weight_decay=1e-4,
                scheduler='multistep', milestones=[80, 120], lr_decay=0.1)
def resnet(*, depth=110, base_channels=16, block_type: Literal['basic', 'bottleneck'] = 'basic',
           se_reduction: int = None, num_classes=10, in_channels=3):
    """CIFAR ResNet-``depth`` (6n+2 basic or 9n+2 bottleneck); se_reduction adds SE gates."""
    n_blocks = residual_blocks_per_stage(depth, block_type, 'resnet')
    block = BLOCKS[block_type]
    # stage widths (16, 32, 64) x expansion, so ResNet-164's stages end in 64/128/256 channels
    stage_channels = [base_channels * block.expansion * 2 ** index for index in range(3)]
    return ResNet(block, [n_blocks] * 3, stage_channels, base_channels, num_classes, in_channels,
                  se_reduction=se_reduction)


def imagenet_resnet(arch, block_type, blocks_per_stage, base_channels, num_classes, in_channels):
    """ResNet-18/34/50 of Table 1 with a CIFAR stem: stages ``base_channels`` x (1, 2, 4, 8) x expansion."""
    block = BLOCKS[block_type]
    stage_channels = [base_channels * block.expansion * 2 ** index for index in range(4)]
    return ResNet(block, blocks_per_stage, stage_channels, base_channels, num_classes, in_channels)


@register_model('resnet18', test_config=dict(base_channels=4), **CNN_RECIPE)
def resnet18(*, base_channels=64, num_classes=10, in_channels=3):
    """ResNet-18 with a CIFAR stem (11.2 M parameters): basic blocks [2,2,2,2]."""
    return imagenet_resnet('resnet18', 'basic', [2, 2, 2, 2], base_channels, num_classes, in_channels)


@register_model('resnet34', test_config=dict(base_channels=4), **CNN_RECIPE)
def resnet34(*, base_channels=64, num_classes=10, in_channels=3):
    """ResNet-34 with a CIFAR stem (21.3 M parameters): basic blocks [3,4,6,3]."""
    return imagenet_resnet('resnet34', 'basic', [3, 4, 6, 3], base_channels, num_classes, in_channels)


@register_model('resnet50', test_config=dict(base_channels=4), **CNN_RECIPE)
def resnet50(*, base_channels=64, num_classes=10, in_channels=3):
    """ResNet-50 with a CIFAR stem (23.5 M parameters): bottleneck blocks [3,4,6,3]."""
    return imagenet_resnet('resnet50', 'bottleneck', [3, 4, 6, 3], base_channels, num_classes, in_channels)
