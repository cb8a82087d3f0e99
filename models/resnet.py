"""CIFAR ResNet from "Deep Residual Learning for Image Recognition" (He et al., arXiv 1512.03385).

Three stages of 16/32/64 channels (times 4 for bottlenecks) at strides 1/2/2, post-activation
blocks (ReLU after the addition). Where a block changes the width or resolution its shortcut is
a 1x1 convolution followed by BN (the paper's option B, as hysts/pytorch_image_classification
does); the paper's CIFAR networks used parameter-free zero-padding shortcuts (option A), so their
parameter counts are ours minus those two or three projections.
"""
import torch.nn as nn
import torch.nn.functional as F

from models.common import (ClassifierHead, SqueezeExcite, check_positive_int, conv1x1, conv3x3,
                           initialize_weights, residual_blocks_per_stage)
from models.registry import ModelConfigError, register_model


def projection_shortcut(in_channels, out_channels, stride):
    """Identity when shapes match, else 1x1 conv + BN (option B of arXiv 1512.03385)."""
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


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


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, three stages of ``blocks_per_stage`` blocks, global pooling, linear."""

    def __init__(self, block, blocks_per_stage, base_channels, num_classes, in_channels,
                 se_reduction=None):
        super().__init__()
        self.conv = conv3x3(in_channels, base_channels)
        self.bn = nn.BatchNorm2d(base_channels)
        # stage widths (16, 32, 64) x expansion, so ResNet-164's stages end in 64/128/256 channels
        stage_channels = [base_channels * block.expansion * 2 ** index for index in range(3)]
        channels = base_channels
        for index, out_channels in enumerate(stage_channels):
            stride = 1 if index == 0 else 2
            stage = nn.Sequential()
            for block_index in range(blocks_per_stage):
                stage.add_module(f'block{block_index + 1}',
                                 block(channels, out_channels, stride if block_index == 0 else 1,
                                       se_reduction=se_reduction))
                channels = out_channels
            self.add_module(f'stage{index + 1}', stage)
        self.num_features = channels
        self.head = ClassifierHead(channels, num_classes)
        initialize_weights(self)

    def forward_features(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.stage1(x)
        x = self.stage2(x)
        return self.stage3(x)

    def forward(self, x):
        return self.head(self.forward_features(x))


def check_se_reduction(se_reduction, arch):
    """None or 0 switches squeeze-and-excitation off; otherwise a positive reduction ratio."""
    if se_reduction:
        check_positive_int('--se_reduction', se_reduction, arch)
    elif se_reduction not in (None, 0):
        raise ModelConfigError(f'--se_reduction {se_reduction}: {arch} needs a positive integer '
                               'or 0 (off)')


@register_model('resnet', epochs=160, batch_size=128, base_lr=0.1, weight_decay=1e-4,
                scheduler='multistep', milestones=[80, 120], lr_decay=0.1)
def resnet(*, depth=110, base_channels=16, block_type='basic', se_reduction=None,
           num_classes=10, in_channels=3):
    """CIFAR ResNet-``depth`` (6n+2 basic or 9n+2 bottleneck); se_reduction adds SE gates."""
    n_blocks = residual_blocks_per_stage(depth, block_type, 'resnet')
    check_positive_int('--base_channels', base_channels, 'resnet')
    check_se_reduction(se_reduction, 'resnet')
    block = BasicBlock if block_type == 'basic' else BottleneckBlock
    return ResNet(block, n_blocks, base_channels, num_classes, in_channels, se_reduction)
