"""Dual Path Networks (Chen, Li, Xiao, Jin, Yan and Feng, arXiv 1707.01629).

Each block is a ResNeXt bottleneck (1x1, 3x3 grouped by ``cardinality``, 1x1, BN and ReLU after
each) whose output splits in two paths (section 3, eq. 4): ``residual`` channels added to the
residual path, and ``dense`` new channels appended to the densely connected path, which grows by
``dense`` per block. The first block of a stage projects both paths (1x1 conv-BN, the stage's
stride). DPN-92 (Table 1): stages with bottleneck widths 96, 192, 384, 768, residual widths 256,
512, 1024, 2048, dense increments 16, 32, 24, 128 and 3, 4, 20, 3 blocks, G = 32; 37.7 M parameters
with 1000 classes. After block i (from 0) a stage is residual + (i + 2) x dense channels wide.

CIFAR stem and the DPN-26 configuration (2 blocks per stage) as kuangliu/pytorch-cifar, which the
CIFAR tricks collection trains: a 3x3 convolution of 64 channels at stride 1 instead of the 7x7/2
convolution and max-pool, so a 32x32 image ends in a 4x4 map. ``width_multiplier`` scales every
width (for small test networks).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import (ClassifierHead, ConvBNAct, StagedNetwork, check_length, check_multiple, conv1x1, conv3x3,
                           initialize_weights, make_stage, scale_widths)
from models.registry import CNN_RECIPE, register_model

STEM_CHANNELS = 64
# bottleneck, residual and dense widths of the four stages (Table 1)
BOTTLENECK_CHANNELS = (96, 192, 384, 768)
RESIDUAL_CHANNELS = (256, 512, 1024, 2048)
DENSE_CHANNELS = (16, 32, 24, 128)


class DualPathBlock(nn.Module):
    """Grouped bottleneck whose output adds ``residual_channels`` to the residual path and appends
    ``dense_channels`` to the dense path; ``project`` (a stage's first block) projects the input.

    ``out_channels``, the block's output width (the input's plus ``dense_channels``, or residual +
    2 x dense after a projection), is what :func:`make_stage` chains; the other widths set it.
    """

    def __init__(self, in_channels, out_channels, stride, bottleneck_channels, residual_channels,
                 dense_channels, cardinality, project=False):
        super().__init__()
        self.residual_channels = residual_channels
        self.conv1 = conv1x1(in_channels, bottleneck_channels)
        self.bn1 = nn.BatchNorm2d(bottleneck_channels)
        self.conv2 = conv3x3(bottleneck_channels, bottleneck_channels, stride, groups=cardinality)
        self.bn2 = nn.BatchNorm2d(bottleneck_channels)
        self.conv3 = conv1x1(bottleneck_channels, residual_channels + dense_channels)
        self.bn3 = nn.BatchNorm2d(residual_channels + dense_channels)
        self.shortcut = nn.Identity()
        if project:
            self.shortcut = ConvBNAct(in_channels, residual_channels + dense_channels, kernel_size=1,
                                      stride=stride, activation=None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        x = self.shortcut(x)
        split = self.residual_channels
        # residual path: sum; dense path: the shortcut's dense channels, then the new ones
        out = torch.cat([x[:, :split] + y[:, :split], x[:, split:], y[:, split:]], dim=1)
        return F.relu(out)


class DPN(StagedNetwork):
    """Stem conv-BN-ReLU, four stages of dual path blocks (strides 1, 2, 2, 2), pooling, linear."""

    def __init__(self, blocks_per_stage, bottleneck_channels, residual_channels, dense_channels, cardinality,
                 stem_channels, num_classes, in_channels):
        super().__init__()
        self.stem = ConvBNAct(in_channels, stem_channels)
        channels = stem_channels
        for index, n_blocks in enumerate(blocks_per_stage):
            residual, dense = residual_channels[index], dense_channels[index]
            widths = [residual + (block + 2) * dense for block in range(n_blocks)]
            projections = [dict(project=block == 0) for block in range(n_blocks)]
            self.add_module(f'stage{index + 1}', make_stage(
                DualPathBlock, channels, widths, n_blocks, 1 if index == 0 else 2, projections,
                bottleneck_channels=bottleneck_channels[index], residual_channels=residual,
                dense_channels=dense, cardinality=cardinality))
            channels = widths[-1]
        self.num_stages = len(blocks_per_stage)
        self.num_features = channels
        self.head = ClassifierHead(channels, num_classes)
        initialize_weights(self)

    def forward_features(self, x):
        return self.forward_stages(self.stem(x))


def build_dpn(arch, n_blocks, width_multiplier, cardinality, num_classes, in_channels):
    check_length('--n_blocks', n_blocks, 4, arch)
    bottleneck = scale_widths(BOTTLENECK_CHANNELS, width_multiplier)
    for width in bottleneck:
        check_multiple('--width_multiplier', width, cardinality, '--cardinality (the bottleneck widths)', arch)
    stem_channels, = scale_widths([STEM_CHANNELS], width_multiplier)
    return DPN(list(n_blocks), bottleneck, scale_widths(RESIDUAL_CHANNELS, width_multiplier),
               scale_widths(DENSE_CHANNELS, width_multiplier), cardinality, stem_channels, num_classes, in_channels)


@register_model('dpn26', test_config=dict(n_blocks=[1, 1, 1, 1], width_multiplier=0.125, cardinality=4),
                **CNN_RECIPE)
def dpn26(*, n_blocks=(2, 2, 2, 2), width_multiplier=1.0, cardinality=32, num_classes=10, in_channels=3):
    """DPN-26 for CIFAR (11.6 M parameters): DPN-92's widths with 2 blocks per stage."""
    return build_dpn('dpn26', n_blocks, width_multiplier, cardinality, num_classes, in_channels)


@register_model('dpn92', test_config=dict(n_blocks=[1, 1, 1, 1], width_multiplier=0.125, cardinality=4),
                **CNN_RECIPE)
def dpn92(*, n_blocks=(3, 4, 20, 3), width_multiplier=1.0, cardinality=32, num_classes=10, in_channels=3):
    """DPN-92 for CIFAR (34.2 M parameters)."""
    return build_dpn('dpn92', n_blocks, width_multiplier, cardinality, num_classes, in_channels)
