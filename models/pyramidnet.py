"""PyramidNet (additive widening) for CIFAR-sized inputs.

Han, Kim and Kim, "Deep Pyramidal Residual Networks", arXiv 1610.02915.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

from models.common import ClassifierHead, blocks_per_stage, conv1x1, conv3x3, initialize_weights
from models.registry import ModelConfigError, register_model


def _zero_padded_shortcut(x, out_channels, stride):
    """Parameter-free shortcut: 2x2 average pooling when downsampling, zero channels appended."""
    # the paper's choice over projection shortcuts, which it found to overfit (section 3)
    if stride > 1:
        x = F.avg_pool2d(x, kernel_size=2, stride=stride)
    extra_channels = out_channels - x.size(1)
    if extra_channels > 0:
        x = F.pad(x, (0, 0, 0, 0, 0, extra_channels))
    return x


class BasicBlock(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN: no ReLU on the input or after the addition (Fig. 6(d))."""

    expansion = 1

    def __init__(self, in_channels, width, stride):
        super().__init__()
        self.stride = stride
        self.out_channels = width
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, width, stride)  # downsample with the first conv
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, x):
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        y = self.bn3(y)
        return y + _zero_padded_shortcut(x, self.out_channels, self.stride)


class BottleneckBlock(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN with ``4 * width`` output channels."""

    expansion = 4

    def __init__(self, in_channels, width, stride):
        super().__init__()
        self.stride = stride
        self.out_channels = width * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)  # downsample with the 3x3 conv
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, self.out_channels)
        self.bn4 = nn.BatchNorm2d(self.out_channels)

    def forward(self, x):
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        y = self.conv3(F.relu(self.bn3(y), inplace=True))
        y = self.bn4(y)
        return y + _zero_padded_shortcut(x, self.out_channels, self.stride)


BLOCK_TYPES = ('basic', 'bottleneck')


def pyramid_widths(base_channels, pyramid_alpha, n_blocks):
    """Width of each of ``n_blocks`` blocks: ``base + k * alpha / n_blocks`` rounded half up.

    Equation (2) of the paper; rounding as floor(x + 0.5) in the authors' Lua code.
    """
    step = pyramid_alpha / n_blocks
    return [int(math.floor(base_channels + (index + 1) * step + 0.5)) for index in range(n_blocks)]


class PyramidNet(nn.Module):
    """Three stages of pyramidal residual blocks, widths growing by ``alpha / N`` per block."""

    def __init__(self, depth=272, block_type='bottleneck', pyramid_alpha=200, base_channels=16,
                 num_classes=10, in_channels=3):
        super().__init__()
        block = BottleneckBlock if block_type == 'bottleneck' else BasicBlock
        layers_per_block = 3 if block_type == 'bottleneck' else 2
        n_blocks = blocks_per_stage(depth, layers_per_block, arch=f'pyramidnet with {block_type} blocks')
        widths = pyramid_widths(base_channels, pyramid_alpha, 3 * n_blocks)

        # conv-BN stem without ReLU, as in the authors' code: every block starts with BN
        self.conv = conv3x3(in_channels, base_channels)
        self.bn1 = nn.BatchNorm2d(base_channels)
        channels = base_channels
        for stage_index in range(3):
            stage = nn.Sequential()
            for block_index in range(n_blocks):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                unit = block(channels, widths[stage_index * n_blocks + block_index], stride)
                stage.add_module(f'block{block_index + 1}', unit)
                channels = unit.out_channels
            self.add_module(f'stage{stage_index + 1}', stage)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = ClassifierHead(channels, num_classes)
        self.num_features = channels
        initialize_weights(self)

    def forward_features(self, x):
        x = self.bn1(self.conv(x))
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        # the blocks end without ReLU, so BN-ReLU before pooling
        return F.relu(self.bn2(x), inplace=True)

    def forward(self, x):
        return self.head(self.forward_features(x))


@register_model('pyramidnet', epochs=300, batch_size=128, base_lr=0.1, weight_decay=1e-4,
                scheduler='multistep', milestones=[150, 225], lr_decay=0.1)
def pyramidnet(*, depth=272, block_type='bottleneck', pyramid_alpha=200, base_channels=16,
               num_classes=10, in_channels=3):
    """PyramidNet with additive widening: depth = 6n+2 (basic) or 9n+2 (bottleneck).

    The width grows from ``base_channels`` by ``pyramid_alpha / (3n)`` per block, so the
    last block is ``base_channels + pyramid_alpha`` wide (times 4 for bottleneck blocks).
    """
    if block_type not in BLOCK_TYPES:
        raise ModelConfigError(f'--block_type {block_type}: pyramidnet supports {", ".join(BLOCK_TYPES)}')
    if pyramid_alpha < 0:
        raise ModelConfigError(f'--pyramid_alpha {pyramid_alpha}: must be >= 0')
    if base_channels < 1:
        raise ModelConfigError(f'--base_channels {base_channels}: must be a positive integer')
    return PyramidNet(depth=depth, block_type=block_type, pyramid_alpha=pyramid_alpha,
                      base_channels=base_channels, num_classes=num_classes, in_channels=in_channels)
