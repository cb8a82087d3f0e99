"""ResNeXt-29 for CIFAR-sized inputs.

Xie, Girshick, Dollar, Tu and He, "Aggregated Residual Transformations for Deep Neural
Networks", arXiv 1611.05431.
"""
import torch.nn as nn
import torch.nn.functional as F

from models.common import ClassifierHead, StagedNetwork, blocks_per_stage, conv1x1, conv3x3, initialize_weights
from models.registry import register_model

# Stem and stage widths of the CIFAR template (section 5.3): a 64-channel 3x3 conv, then
# stages ending in 256, 512 and 1024 channels whatever the cardinality and bottleneck width.
STEM_CHANNELS = 64
STAGE_OUT_CHANNELS = (256, 512, 1024)


class BottleneckBlock(nn.Module):
    """conv1x1-BN-ReLU, grouped conv3x3-BN-ReLU, conv1x1-BN, add, ReLU (Fig. 3(c))."""

    def __init__(self, in_channels, out_channels, stride, group_width, cardinality):
        super().__init__()
        inner_channels = group_width * cardinality
        self.conv1 = conv1x1(in_channels, inner_channels)
        self.bn1 = nn.BatchNorm2d(inner_channels)
        self.conv2 = conv3x3(inner_channels, inner_channels, stride, groups=cardinality)
        self.bn2 = nn.BatchNorm2d(inner_channels)
        self.conv3 = conv1x1(inner_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if in_channels != out_channels or stride != 1:
            # projection shortcut (option B of the ResNet paper), as in the authors' code
            self.shortcut = nn.Sequential()
            self.shortcut.add_module('conv', conv1x1(in_channels, out_channels, stride))
            self.shortcut.add_module('bn', nn.BatchNorm2d(out_channels))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x), inplace=True)  # ReLU after the addition


class ResNeXt(StagedNetwork):
    """Stem, stages of bottleneck blocks, global pooling, linear.

    Stage i has ``blocks_per_stage[i]`` blocks ending in ``stage_channels[i]`` channels, whose grouped
    convolutions have ``cardinality`` groups of ``group_widths[i]`` channels.
    """

    def __init__(self, blocks_per_stage, stage_channels, group_widths, cardinality, num_classes=10, in_channels=3):
        super().__init__()
        self.conv = conv3x3(in_channels, STEM_CHANNELS)
        self.bn = nn.BatchNorm2d(STEM_CHANNELS)
        widths = [dict(group_width=width) for width, n_blocks in zip(group_widths, blocks_per_stage)
                  for _ in range(n_blocks)]
        channels = self.add_stages(BottleneckBlock, STEM_CHANNELS, stage_channels, blocks_per_stage,
                                   per_block_kwargs=widths, cardinality=cardinality)
        self.head = ClassifierHead(channels, num_classes)
        self.num_features = channels
        initialize_weights(self)

    def forward_features(self, x):
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        return self.forward_stages(x)


@register_model('resnext', test_config=dict(depth=11, cardinality=2, base_channels=4),
                epochs=300, batch_size=128, base_lr=0.1, weight_decay=5e-4,
                scheduler='multistep', milestones=[150, 225], lr_decay=0.1)
def resnext(*, depth=29, cardinality=8, base_channels=64, num_classes=10, in_channels=3):
    """ResNeXt-{depth} ``cardinality`` x ``base_channels``d, e.g. 29 8x64d (depth = 9n+2).

    ``base_channels`` is the bottleneck width d of one group in the first stage; as in the
    authors' Lua code it sets only the grouped convolutions' width (d x cardinality,
    doubling per stage), while the stem (64) and stage outputs (256, 512, 1024) are fixed.
    hysts' version ties those to ``base_channels`` too; both agree at d = 64.
    """
    n_blocks = blocks_per_stage(depth, 3, arch='resnext')
    # the bottleneck width d doubles with every stage, like the output width
    group_widths = [base_channels * 2 ** index for index in range(3)]
    return ResNeXt([n_blocks] * 3, STAGE_OUT_CHANNELS, group_widths, cardinality, num_classes, in_channels)
