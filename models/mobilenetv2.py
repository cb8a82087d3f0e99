"""MobileNetV2 from "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (Sandler, Howard, Zhu,
Zhmoginov and Chen, arXiv 1801.04381).

Table 2: a 3x3 convolution of 32 channels, seven stages of inverted residual blocks (1x1 expansion
by t with ReLU6, 3x3 depthwise conv with ReLU6, linear 1x1 projection; identity shortcut where the
shape is kept) of c = 16, 24, 32, 64, 96, 160, 320 channels in n = 1, 2, 3, 4, 3, 3, 1 blocks with
t = 1, 6, ..., a 1x1 convolution to 1280 channels, pooling and the classifier; 3.4 M parameters
with 1000 classes. ``width_multiplier`` scales every width but the last convolution's (section
6.1), rounded to multiples of 8.

CIFAR strides as kuangliu/pytorch-cifar's MobileNetV2, which the CIFAR tricks collection trains:
stride 1 in the stem and in the 24-channel stage, so a 32x32 image ends in a 4x4 map. Unlike
kuangliu's, blocks that change the width have no shortcut, as in the paper.
"""
import torch.nn as nn

from models.common import ClassifierHead, ConvBNAct, InvertedResidual, StagedNetwork, initialize_weights, make_stage
from models.registry import CNN_RECIPE, register_model

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# (expansion t, channels c, blocks n, stride s) of Table 2, CIFAR strides
STAGES = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(value, divisor=8):
    """Round to the nearest multiple of ``divisor``, not below 90% of ``value`` (the authors' rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class MobileNetV2(StagedNetwork):
    """Stem conv-BN-ReLU6, stages of inverted residuals, 1x1 head conv-BN-ReLU6, pooling, linear."""

    def __init__(self, stages, stem_channels, head_channels, num_classes, in_channels):
        super().__init__()
        self.stem = ConvBNAct(in_channels, stem_channels, activation=nn.ReLU6)
        channels = stem_channels
        for index, (expansion, out_channels, n_blocks, stride) in enumerate(stages):
            self.add_module(f'stage{index + 1}', make_stage(InvertedResidual, channels, out_channels, n_blocks,
                                                             stride, expansion=expansion, activation=nn.ReLU6))
            channels = out_channels
        self.num_stages = len(stages)
        self.head_conv = ConvBNAct(channels, head_channels, kernel_size=1, activation=nn.ReLU6)
        self.num_features = head_channels
        self.head = ClassifierHead(head_channels, num_classes)
        initialize_weights(self)

    def forward_features(self, x):
        x = self.forward_stages(self.stem(x))
        return self.head_conv(x)


@register_model('mobilenetv2', test_config=dict(width_multiplier=0.25), **CNN_RECIPE)
def mobilenetv2(*, width_multiplier=1.0, num_classes=10, in_channels=3):
    """MobileNetV2-``width_multiplier`` for CIFAR (2.2 M parameters at 1.0)."""
    stages = [(expansion, make_divisible(channels * width_multiplier), n_blocks, stride)
              for expansion, channels, n_blocks, stride in STAGES]
    head_channels = make_divisible(HEAD_CHANNELS * width_multiplier) if width_multiplier > 1 else HEAD_CHANNELS
    return MobileNetV2(stages, make_divisible(STEM_CHANNELS * width_multiplier), head_channels,
                       num_classes, in_channels)
