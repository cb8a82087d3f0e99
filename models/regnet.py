"""RegNetX and RegNetY from "Designing Network Design Spaces" (Radosavovic, Kosaraju, Girshick, He and
Dollar, arXiv 2003.13678).

A RegNet is a stem and four stages of X blocks: 1x1 conv, 3x3 group conv (groups of ``group_width``
channels, the stage's stride), 1x1 conv, each with BN and ReLU, the ReLU of the last one after the
addition of a projection shortcut where the shape changes (section 4; bottleneck ratio b = 1, so the
three convolutions keep the stage's width). RegNetY adds a squeeze-and-excitation gate after the 3x3
convolution whose hidden width is 1/4 of the block's input width (section 5). The stage depths d_i
and widths w_i are the quantized linear parameterization of section 3.3, as the paper's Appendix
tables and pycls list them:

- RegNetX-200MF: d = [1, 1, 4, 7], w = [24, 56, 152, 368], g = 8 (2.7 M parameters on ImageNet);
- RegNetY-400MF: d = [1, 3, 6, 6], w = [48, 104, 208, 440], g = 8 (4.3 M parameters on ImageNet).

CIFAR stem as kuangliu/pytorch-cifar (whose RegNets the CIFAR tricks collection trains): a 3x3
convolution at stride 1 instead of the 3x3 stride-2 one, and stage strides 1, 1, 2, 2 instead of
2, 2, 2, 2, so a 32x32 image ends in a 8x8 map; the stem is the paper's 32 channels wide.
"""
import torch.nn as nn
import torch.nn.functional as F

from models.common import (ConvStemNetwork, SqueezeExcite, check_length, check_multiple, conv1x1, conv3x3,
                           projection_shortcut)
from models.registry import CNN_RECIPE, register_model

STEM_CHANNELS = 32
STAGE_STRIDES = [1, 1, 2, 2]


class XBlock(nn.Module):
    """1x1 - 3x3 group conv (stride) - [SE] - 1x1, BN after each, ReLU after the first two and the sum."""

    def __init__(self, in_channels, out_channels, stride, group_width, se_ratio=0.0):
        super().__init__()
        self.conv1 = conv1x1(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, stride, groups=out_channels // group_width)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.se = nn.Identity()
        if se_ratio:
            # RegNetY: the gate's width follows the block's input width (pycls's w_se = round(w_in * se_r))
            self.se = SqueezeExcite(out_channels, hidden_channels=int(round(in_channels * se_ratio)))
        self.conv3 = conv1x1(out_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = projection_shortcut(in_channels, out_channels, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.se(y)))
        return F.relu(y + self.shortcut(x))


def build_regnet(arch, n_blocks, n_channels, group_width, se_ratio, num_classes, in_channels):
    check_length('--n_blocks', n_blocks, 4, arch)
    check_length('--n_channels', n_channels, 4, arch)
    for width in n_channels:
        check_multiple('--n_channels', width, group_width, '--group_width', arch)
    # a conv-BN-ReLU stem, four stages of X blocks (strides 1, 1, 2, 2), global pooling, linear
    return ConvStemNetwork(XBlock, list(n_blocks), list(n_channels), STEM_CHANNELS, num_classes, in_channels,
                           STAGE_STRIDES, group_width=group_width, se_ratio=se_ratio)


@register_model('regnetx_200mf', test_config=dict(n_blocks=[1, 1, 1, 1], n_channels=[8, 8, 16, 16],
                                                  group_width=8), **CNN_RECIPE)
def regnetx_200mf(*, n_blocks=(1, 1, 4, 7), n_channels=(24, 56, 152, 368), group_width=8,
                  num_classes=10, in_channels=3):
    """RegNetX-200MF with a CIFAR stem (2.3 M parameters)."""
    return build_regnet('regnetx_200mf', n_blocks, n_channels, group_width, 0.0, num_classes, in_channels)


@register_model('regnety_400mf', test_config=dict(n_blocks=[1, 1, 1, 1], n_channels=[8, 8, 16, 16],
                                                  group_width=8), **CNN_RECIPE)
def regnety_400mf(*, n_blocks=(1, 3, 6, 6), n_channels=(48, 104, 208, 440), group_width=8,
                  num_classes=10, in_channels=3):
    """RegNetY-400MF with a CIFAR stem (3.9 M parameters): RegNetX blocks with SE gates."""
    return build_regnet('regnety_400mf', n_blocks, n_channels, group_width, 0.25, num_classes, in_channels)
