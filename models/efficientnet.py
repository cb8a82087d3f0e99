"""EfficientNet-B0 from "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks"
(Tan and Le, arXiv 1905.11946).

Table 1: a 3x3 stem of 32 channels, seven stages of MBConv blocks (1x1 expansion by 1 or 6, k x k
depthwise convolution, squeeze-and-excitation of 1/4 of the block's input width, 1x1 linear
projection; Swish activations; identity shortcut where the shape is kept) with 16, 24, 40, 80, 112,
192 and 320 channels in 1, 2, 2, 3, 3, 4 and 1 blocks, then a 1x1 convolution to 1280 channels,
pooling, 20% dropout and the classifier; 5.3 M parameters with 1000 classes. Compound scaling
(eq. 3): ``width_multiplier`` multiplies every width (rounded to a multiple of 8, as the authors'
``round_filters``), ``depth_multiplier`` the blocks per stage (rounded up). Residual branches are
dropped per sample with a rate rising linearly to ``drop_path_rate`` (the authors' drop connect, 0.2).

CIFAR strides as kuangliu/pytorch-cifar's EfficientNetB0, which the CIFAR tricks collection
trains: stride 1 in the stem and in stage 2, so a 32x32 image is downsampled 8 times, to 4x4;
unlike kuangliu's, the network keeps the paper's 1280-channel head convolution.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

from models.common import (ClassifierHead, ConvBNAct, SqueezeExcite, StagedNetwork, drop_path_layer,
                           initialize_weights, linear_drop_rates, make_stage)
from models.registry import CNN_RECIPE, register_model

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# (expansion, channels, blocks, kernel size, stride) of the seven stages of Table 1, CIFAR strides
STAGES = [(1, 16, 1, 3, 1), (6, 24, 2, 3, 1), (6, 40, 2, 5, 2), (6, 80, 3, 3, 2),
          (6, 112, 3, 5, 1), (6, 192, 4, 5, 2), (6, 320, 1, 3, 1)]


def round_channels(channels, width_multiplier, divisor=8):
    """The authors' ``round_filters``: nearest multiple of 8, at least 8 and at least 90% of the target."""
    target = channels * width_multiplier
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * target else rounded


class MBConvBlock(nn.Module):
    """[1x1 expansion-BN-Swish] - kxk depthwise-BN-Swish - SE - 1x1 projection-BN, plus the input
    where the shape is kept (dropped per sample with ``drop_rate`` in training)."""

    def __init__(self, in_channels, out_channels, stride, expansion, kernel_size, drop_rate=0.0):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = ConvBNAct(in_channels, hidden, kernel_size=1, activation=nn.SiLU) if expansion != 1 \
            else nn.Identity()
        self.depthwise = ConvBNAct(hidden, hidden, kernel_size, stride, groups=hidden, activation=nn.SiLU)
        self.se = SqueezeExcite(hidden, hidden_channels=max(1, in_channels // 4), activation=F.silu)
        self.project = ConvBNAct(hidden, out_channels, kernel_size=1, activation=None)
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.drop_path = drop_path_layer(drop_rate)

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        if self.use_shortcut:
            return x + self.drop_path(y)
        return y


class EfficientNet(StagedNetwork):
    """Stem conv-BN-Swish, stages of MBConv blocks, 1x1 head conv-BN-Swish, pooling, dropout, linear."""

    def __init__(self, stages, stem_channels, head_channels, drop_path_rate, num_classes, in_channels):
        super().__init__()
        self.stem = ConvBNAct(in_channels, stem_channels, activation=nn.SiLU)
        rates = iter(linear_drop_rates(drop_path_rate, sum(stage[2] for stage in stages)))
        channels = stem_channels
        for index, (expansion, out_channels, n_blocks, kernel_size, stride) in enumerate(stages):
            blocks = [dict(drop_rate=next(rates)) for _ in range(n_blocks)]
            self.add_module(f'stage{index + 1}', make_stage(MBConvBlock, channels, out_channels, n_blocks, stride,
                                                             blocks, expansion=expansion, kernel_size=kernel_size))
            channels = out_channels
        self.num_stages = len(stages)
        self.head_conv = ConvBNAct(channels, head_channels, kernel_size=1, activation=nn.SiLU)
        self.num_features = head_channels
        self.head = ClassifierHead(head_channels, num_classes, drop_rate=0.2)
        initialize_weights(self)

    def forward_features(self, x):
        x = self.forward_stages(self.stem(x))
        return self.head_conv(x)


@register_model('efficientnet_b0', test_config=dict(width_multiplier=0.25, depth_multiplier=0.1),
                **CNN_RECIPE)
def efficientnet_b0(*, width_multiplier=1.0, depth_multiplier=1.0, drop_path_rate=0.2, num_classes=10,
                    in_channels=3):
    """EfficientNet-B0 for CIFAR (4.0 M parameters)."""
    stages = [(expansion, round_channels(channels, width_multiplier), math.ceil(n_blocks * depth_multiplier),
               kernel_size, stride) for expansion, channels, n_blocks, kernel_size, stride in STAGES]
    return EfficientNet(stages, round_channels(STEM_CHANNELS, width_multiplier),
                        round_channels(HEAD_CHANNELS, width_multiplier), float(drop_path_rate),
                        num_classes, in_channels)
