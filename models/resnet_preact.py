"""Pre-activation ResNet from "Identity Mappings in Deep Residual Networks" (He et al., arXiv 1603.05027).

Blocks are BN-ReLU-conv with nothing after the addition. Options follow
hysts/pytorch_image_classification:

- ``preact_stage[i]``: the first block of stage i applies its BN-ReLU before the split, so
  the shortcut also sees the activated input (the paper's design for the blocks that change
  width); otherwise only the residual branch is pre-activated.
- ``remove_first_relu`` / ``add_last_bn``: drop the first ReLU and add a BN at the end of the
  residual branch, as found better in "Deep Pyramidal Residual Networks" (Han et al.,
  arXiv 1610.02915).
- ``widening_factor`` multiplies the stage widths (the stem stays at ``base_channels``).

Bottleneck stages are 64/128/256 channels wide for base 16 (ResNet-164 of the paper, 1.7 M
parameters); hysts' stage 1 keeps only ``base_channels`` there. Width- or resolution-changing
shortcuts are 1x1 convolutions without BN.
"""
import torch.nn as nn
import torch.nn.functional as F

from models.common import (ClassifierHead, SqueezeExcite, check_positive_int, conv1x1, conv3x3,
                           initialize_weights, residual_blocks_per_stage)
from models.registry import ModelConfigError, register_model
from models.resnet import check_se_reduction


def preact_shortcut(in_channels, out_channels, stride):
    """Identity when shapes match, else a bias-free 1x1 convolution (arXiv 1603.05027)."""
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    return conv1x1(in_channels, out_channels, stride)


class PreActBlockBase(nn.Module):
    """The parts shared by the pre-activation blocks: first BN, optional last BN, SE, shortcut."""

    def __init__(self, in_channels, out_channels, stride, preact, remove_first_relu, add_last_bn,
                 se_reduction):
        super().__init__()
        self.preact = preact
        self.remove_first_relu = remove_first_relu
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.last_bn = nn.BatchNorm2d(out_channels) if add_last_bn else nn.Identity()
        self.se = SqueezeExcite(out_channels, se_reduction) if se_reduction else nn.Identity()
        self.shortcut = preact_shortcut(in_channels, out_channels, stride)

    def residual(self, x):
        raise NotImplementedError

    def forward(self, x):
        if self.preact:
            # shortcut after the pre-activation
            x = F.relu(self.bn1(x))
            y = x
        else:
            # pre-activation only on the residual branch
            y = self.bn1(x)
            if not self.remove_first_relu:
                y = F.relu(y)
        y = self.residual(y)
        y = self.se(self.last_bn(y))
        return y + self.shortcut(x)


class PreActBasicBlock(PreActBlockBase):
    """BN-ReLU-conv3x3 (downsampling) -> BN-ReLU-[dropout]-conv3x3."""

    expansion = 1

    def __init__(self, in_channels, out_channels, stride, preact=False, remove_first_relu=False,
                 add_last_bn=False, se_reduction=None, drop_rate=0.0):
        super().__init__(in_channels, out_channels, stride, preact, remove_first_relu,
                         add_last_bn, se_reduction)
        self.drop_rate = drop_rate
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)

    def residual(self, x):
        y = self.conv1(x)
        y = F.relu(self.bn2(y))
        # dropout between the two convolutions, after BN-ReLU, as in the WRN authors' code
        if self.drop_rate > 0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        return self.conv2(y)


class PreActBottleneckBlock(PreActBlockBase):
    """BN-ReLU-conv1x1 -> BN-ReLU-conv3x3 (downsampling) -> BN-ReLU-conv1x1 (4x expansion)."""

    expansion = 4

    def __init__(self, in_channels, out_channels, stride, preact=False, remove_first_relu=False,
                 add_last_bn=False, se_reduction=None):
        super().__init__(in_channels, out_channels, stride, preact, remove_first_relu,
                         add_last_bn, se_reduction)
        bottleneck_channels = out_channels // self.expansion
        self.conv1 = conv1x1(in_channels, bottleneck_channels)
        self.bn2 = nn.BatchNorm2d(bottleneck_channels)
        self.conv2 = conv3x3(bottleneck_channels, bottleneck_channels, stride)
        self.bn3 = nn.BatchNorm2d(bottleneck_channels)
        self.conv3 = conv1x1(bottleneck_channels, out_channels)

    def residual(self, x):
        y = self.conv1(x)
        y = self.conv2(F.relu(self.bn2(y)))
        return self.conv3(F.relu(self.bn3(y)))


class PreActResNet(nn.Module):
    """Stem conv, three stages of pre-activation blocks, final BN-ReLU, global pooling, linear.

    ``preact_first`` says per stage whether its first block pre-activates the shortcut too;
    ``block_kwargs`` go to every block (remove_first_relu, add_last_bn, se_reduction, drop_rate).
    """

    def __init__(self, block, blocks_per_stage, base_channels, stage_channels, preact_first,
                 num_classes, in_channels, **block_kwargs):
        super().__init__()
        self.conv = conv3x3(in_channels, base_channels)
        channels = base_channels
        for index, out_channels in enumerate(stage_channels):
            stride = 1 if index == 0 else 2
            stage = nn.Sequential()
            for block_index in range(blocks_per_stage):
                first = block_index == 0
                stage.add_module(f'block{block_index + 1}',
                                 block(channels, out_channels, stride if first else 1,
                                       preact=bool(preact_first[index]) and first, **block_kwargs))
                channels = out_channels
            self.add_module(f'stage{index + 1}', stage)
        # the last block ends in a convolution: BN-ReLU before pooling
        self.bn = nn.BatchNorm2d(channels)
        self.num_features = channels
        self.head = ClassifierHead(channels, num_classes)
        initialize_weights(self)

    def forward_features(self, x):
        x = self.conv(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        return F.relu(self.bn(x))

    def forward(self, x):
        return self.head(self.forward_features(x))


def check_bool(flag, value, arch):
    """Booleans from JSON/CLI; 0 and 1 are accepted as well."""
    if value not in (True, False):
        raise ModelConfigError(f'{flag} {value}: {arch} needs true or false')


def build_resnet_preact(arch, depth, base_channels, block_type, widening_factor, preact_stage,
                        remove_first_relu, add_last_bn, se_reduction, num_classes, in_channels):
    """Validate the flags of ``arch`` (resnet_preact or se_resnet_preact) and build it."""
    n_blocks = residual_blocks_per_stage(depth, block_type, arch)
    check_positive_int('--base_channels', base_channels, arch)
    check_positive_int('--widening_factor', widening_factor, arch)
    if not isinstance(preact_stage, (list, tuple)) or len(preact_stage) != 3:
        raise ModelConfigError(f'--preact_stage {preact_stage}: {arch} needs a list of 3 booleans, '
                               'one per stage, e.g. [true,false,false]')
    for value in preact_stage:
        check_bool('--preact_stage', value, arch)
    check_bool('--remove_first_relu', remove_first_relu, arch)
    check_bool('--add_last_bn', add_last_bn, arch)
    check_se_reduction(se_reduction, arch)
    block = PreActBasicBlock if block_type == 'basic' else PreActBottleneckBlock
    stage_channels = [base_channels * widening_factor * block.expansion * 2 ** index
                      for index in range(3)]
    return PreActResNet(block, n_blocks, base_channels, stage_channels, preact_stage,
                        num_classes, in_channels, remove_first_relu=bool(remove_first_relu),
                        add_last_bn=bool(add_last_bn), se_reduction=se_reduction)


@register_model('resnet_preact', epochs=160, batch_size=128, base_lr=0.1, weight_decay=1e-4,
                scheduler='multistep', milestones=[80, 120], lr_decay=0.1)
def resnet_preact(*, depth=110, base_channels=16, block_type='basic', widening_factor=1,
                  preact_stage=(True, True, True), remove_first_relu=False, add_last_bn=False,
                  se_reduction=None, num_classes=10, in_channels=3):
    """Pre-activation ResNet-``depth`` (6n+2 basic or 9n+2 bottleneck), optionally widened."""
    return build_resnet_preact('resnet_preact', depth, base_channels, block_type, widening_factor,
                               preact_stage, remove_first_relu, add_last_bn, se_reduction,
                               num_classes, in_channels)
