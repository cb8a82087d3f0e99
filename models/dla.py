"""DLA from "Deep Layer Aggregation" (Yu, Wang, Shelhamer and Darrell, arXiv 1707.06484).

Hierarchical deep aggregation (section 3.2): the nodes of a tree are roots, 1x1 conv-BN-ReLU layers
over the concatenated outputs of their children, so features of several depths merge at every
node; a level-2 tree also feeds its root the output of the block on its input. The CIFAR network is
kuangliu/pytorch-cifar's DLA, which the CIFAR tricks collection trains: DLA-34's levels and widths
(a stem and two conv levels of 16, 16 and 32 channels, then trees of levels 1, 2, 2, 1 and widths
64, 128, 256, 512 over basic residual blocks) with a 3x3 stride-1 stem and the first tree at
stride 1, so a 32x32 image ends in a 4x4 map. Widths scale with ``base_channels`` (16).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import ClassifierHead, ConvBNAct, StagedNetwork, conv3x3, initialize_weights, projection_shortcut
from models.registry import CNN_RECIPE, register_model

# (level, width / base_channels, stride) of the four trees
TREES = [(1, 4, 1), (2, 8, 2), (2, 16, 2), (1, 32, 2)]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (projection) shortcut, then ReLU."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = projection_shortcut(in_channels, out_channels, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class Tree(nn.Module):
    """Aggregation node of level 1 or 2: level 1 aggregates two residual blocks (``left``, ``right``);
    level 2 aggregates the block that starts it (``first``), a level-1 ``subtree`` and two more
    blocks. ``root``: a 1x1 conv-BN-ReLU over the concatenated outputs of the children."""

    def __init__(self, in_channels, out_channels, stride, level):
        super().__init__()
        self.level = level
        if level == 2:
            # the block on the tree's input also feeds the root (iterative deep aggregation)
            self.first = BasicBlock(in_channels, out_channels, stride)
            self.subtree = Tree(in_channels, out_channels, stride, level=1)
            self.left = BasicBlock(out_channels, out_channels)
        else:
            self.left = BasicBlock(in_channels, out_channels, stride)
        self.right = BasicBlock(out_channels, out_channels)
        self.root = ConvBNAct((4 if level == 2 else 2) * out_channels, out_channels, kernel_size=1)

    def forward(self, x):
        children = []
        if self.level == 2:
            children.append(self.first(x))
            x = self.subtree(x)
            children.append(x)
        x = self.left(x)
        children.append(x)
        x = self.right(x)
        children.append(x)
        return self.root(torch.cat(children, dim=1))


class DLA(StagedNetwork):
    """Stem and two conv levels, four aggregation trees ``stage1..4``, global pooling, linear."""

    def __init__(self, base_channels, num_classes, in_channels):
        super().__init__()
        self.stem = ConvBNAct(in_channels, base_channels)
        self.level1 = ConvBNAct(base_channels, base_channels)
        self.level2 = ConvBNAct(base_channels, 2 * base_channels)
        channels = 2 * base_channels
        for index, (level, multiple, stride) in enumerate(TREES):
            self.add_module(f'stage{index + 1}', Tree(channels, multiple * base_channels, stride, level))
            channels = multiple * base_channels
        self.num_stages = len(TREES)
        self.num_features = channels
        self.head = ClassifierHead(channels, num_classes)
        initialize_weights(self)

    def forward_features(self, x):
        x = self.level2(self.level1(self.stem(x)))
        return self.forward_stages(x)


@register_model('dla', test_config=dict(base_channels=2), **CNN_RECIPE)
def dla(*, base_channels=16, num_classes=10, in_channels=3):
    """DLA-34 for CIFAR (16.3 M parameters)."""
    return DLA(base_channels, num_classes, in_channels)
