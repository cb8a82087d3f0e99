"""GoogLeNet from "Going Deeper with Convolutions" (Szegedy et al., arXiv 1409.4842).

Nine Inception modules (Fig. 2(b)): 1x1, 1x1-3x3, 1x1-5x5 and 3x3 max-pool-1x1 branches,
concatenated; the widths are the paper's Table 1 (3a ... 5b), 1024 channels at the end. Each
convolution is followed by BN and ReLU (BN-Inception, arXiv 1502.03167, as kuangliu/pytorch-cifar
and the CIFAR tricks collection do). CIFAR stem as kuangliu's: one 3x3 convolution to 192 channels
at stride 1 in place of the 7x7/2 convolution, max-pools and 1x1/3x3 convolutions of the paper's
stem, and the two max-pools after 3b and 4e only, so a 32x32 image ends in an 8x8 map; no
auxiliary classifiers. ``width_multiplier`` scales every width (for small test networks).
"""
import torch
import torch.nn as nn

from models.common import ClassifierHead, ConvBNAct, StagedNetwork, initialize_weights, scale_widths
from models.registry import CNN_RECIPE, register_model

STEM_CHANNELS = 192
# Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj; stages 3, 4 and 5
INCEPTION_STAGES = [
    [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64)],
    [(192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
     (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128)],
    [(256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)],
]


class Inception(nn.Module):
    """Four parallel branches concatenated: 1x1; 1x1-3x3; 1x1-5x5; 3x3 max-pool-1x1."""

    def __init__(self, in_channels, n1x1, n3x3_reduce, n3x3, n5x5_reduce, n5x5, pool_projection):
        super().__init__()
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_projection
        self.branch1 = ConvBNAct(in_channels, n1x1, kernel_size=1)
        self.branch2 = nn.Sequential(ConvBNAct(in_channels, n3x3_reduce, kernel_size=1),
                                     ConvBNAct(n3x3_reduce, n3x3, kernel_size=3))
        self.branch3 = nn.Sequential(ConvBNAct(in_channels, n5x5_reduce, kernel_size=1),
                                     ConvBNAct(n5x5_reduce, n5x5, kernel_size=5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                     ConvBNAct(in_channels, pool_projection, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class GoogLeNet(StagedNetwork):
    """Stem, Inception stages 3, 4 and 5 (named ``stage1..3``, a 3x3/2 max-pool starting stages 4
    and 5), global pooling, linear."""

    def __init__(self, stage_widths, stem_channels, num_classes, in_channels):
        super().__init__()
        self.stem = ConvBNAct(in_channels, stem_channels)
        channels = stem_channels
        for index, modules in enumerate(stage_widths):
            stage = nn.Sequential()
            if index > 0:
                stage.add_module('pool', nn.MaxPool2d(3, stride=2, padding=1))
            for block_index, widths in enumerate(modules):
                block = Inception(channels, *widths)
                stage.add_module(f'block{block_index + 1}', block)
                channels = block.out_channels
            self.add_module(f'stage{index + 1}', stage)
        self.num_stages = len(stage_widths)
        self.num_features = channels
        # the paper's 40% dropout before the classifier
        self.head = ClassifierHead(channels, num_classes, drop_rate=0.4)
        initialize_weights(self)

    def forward_features(self, x):
        return self.forward_stages(self.stem(x))


@register_model('googlenet', test_config=dict(width_multiplier=0.0625), **CNN_RECIPE)
def googlenet(*, width_multiplier=1.0, num_classes=10, in_channels=3):
    """GoogLeNet for CIFAR (5.9 M parameters)."""
    stage_widths = [[tuple(scale_widths(widths, width_multiplier)) for widths in stage] for stage in INCEPTION_STAGES]
    stem_channels, = scale_widths([STEM_CHANNELS], width_multiplier)
    return GoogLeNet(stage_widths, stem_channels, num_classes, in_channels)
