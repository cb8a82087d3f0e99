"""Pre-activation ResNets: "Identity Mappings in Deep Residual Networks" (He et al., arXiv 1603.05027),
and the networks built from its blocks.

Blocks are BN-ReLU-conv with nothing after the addition; the network ends in BN-ReLU before pooling.
Options follow hysts/pytorch_image_classification:

- ``preact_stage[i]``: the first block of stage i applies its BN-ReLU before the split, so
  the shortcut also sees the activated input (the paper's design for the blocks that change
  width); otherwise only the residual branch is pre-activated.
- ``remove_first_relu`` / ``add_last_bn``: drop the first ReLU and add a BN at the end of the
  residual branch, as found better in "Deep Pyramidal Residual Networks" (Han et al.,
  arXiv 1610.02915).
- ``widening_factor`` multiplies the stage widths (the stem stays at ``base_channels``).

Bottleneck stages are 64/128/256 channels wide for base 16 (ResNet-164 of the paper, 1.7 M
parameters); hysts' stage 1 keeps only ``base_channels`` there. Width- or resolution-changing
shortcuts are 1x1 convolutions without BN. Depth = 6n+2 (basic) or 9n+2 (bottleneck).

The other builders of this file are configurations of the same network:

- ``se_resnet_preact``: "Squeeze-and-Excitation Networks" (Hu et al., arXiv 1709.01507), a gate at
  the end of each residual branch, before the addition (the SE-ResNet module of the paper's Fig. 3),
  with hysts' defaults: no first ReLU, a last BN in every block (arXiv 1610.02915), and only
  stage 1 pre-activating its shortcut.
- ``wrn``: Wide Residual Networks (Zagoruyko and Komodakis, arXiv 1605.07146). WRN-d-k: basic blocks,
  stage widths 16k/32k/64k after a 16-channel stem, n = (d - 4) / 6 blocks per stage; the 4 counts
  the stem conv and the three 1x1 shortcut convs of the stage-entry blocks (24 + 1 + 3 = 28 for
  WRN-28-10), as in the authors' and hysts' code. Dropout, when on, sits between the two
  convolutions of each block. Initialization is the authors' (:func:`initialize_wrn_weights`).
- ``preact_resnet18`` and ``senet18``: four stages of 64/128/256/512 channels with [2,2,2,2] basic
  blocks and a CIFAR stem (one 3x3 convolution), kuangliu/pytorch-cifar's PreActResNet18 and SENet18
  as the CIFAR tricks collection trains them; unlike kuangliu's, both end in the paper's BN-ReLU.
"""
from typing import Literal

import torch.nn as nn
import torch.nn.functional as F

from models.common import (ClassifierHead, SqueezeExcite, StagedNetwork, blocks_per_stage, conv1x1, conv3x3,
                           initialize_weights, residual_blocks_per_stage)
from models.registry import CNN_RECIPE, ModelConfigError, register_model


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


class PreActResNet(StagedNetwork):
    """Stem conv, stages of pre-activation blocks, final BN-ReLU, global pooling, linear.

    ``preact_first`` says per stage whether its first block pre-activates the shortcut too;
    ``block_kwargs`` go to every block (remove_first_relu, add_last_bn, se_reduction, drop_rate).
    """

    def __init__(self, block, blocks_per_stage, stem_channels, stage_channels, preact_first,
                 num_classes, in_channels, **block_kwargs):
        super().__init__()
        self.conv = conv3x3(in_channels, stem_channels)
        preact = [dict(preact=bool(first) and index == 0)
                  for first, n_blocks in zip(preact_first, blocks_per_stage) for index in range(n_blocks)]
        channels = self.add_stages(block, stem_channels, stage_channels, blocks_per_stage,
                                   per_block_kwargs=preact, **block_kwargs)
        # the last block ends in a convolution: BN-ReLU before pooling
        self.bn = nn.BatchNorm2d(channels)
        self.num_features = channels
        self.head = ClassifierHead(channels, num_classes)
        initialize_weights(self)

    def forward_features(self, x):
        x = self.conv(x)
        x = self.forward_stages(x)
        return F.relu(self.bn(x))


BLOCKS = {'basic': PreActBasicBlock, 'bottleneck': PreActBottleneckBlock}


def build_resnet_preact(arch, depth, base_channels, block_type, widening_factor, preact_stage,
                        remove_first_relu, add_last_bn, se_reduction, num_classes, in_channels):
    """Build ``arch`` (resnet_preact or se_resnet_preact): 3 stages of (depth - 2) / 6 or / 9 blocks."""
    n_blocks = residual_blocks_per_stage(depth, block_type, arch)
    if len(preact_stage) != 3:
        raise ModelConfigError(f'--preact_stage {preact_stage}: {arch} needs a list of 3 booleans, '
                               'one per stage, e.g. [true,false,false]')
    block = BLOCKS[block_type]
    stage_channels = [base_channels * widening_factor * block.expansion * 2 ** index
                      for index in range(3)]
    return PreActResNet(block, [n_blocks] * 3, base_channels, stage_channels, preact_stage,
                        num_classes, in_channels, remove_first_relu=bool(remove_first_relu),
                        add_last_bn=bool(add_last_bn), se_reduction=se_reduction)


PREACT_TRAINING = dict(epochs=160, batch_size=128, base_lr=0.1, weight_decay=1e-4,
                       scheduler='multistep', milestones=[80, 120], lr_decay=0.1)


@register_model('resnet_preact', test_config=dict(depth=8, base_channels=4), **PREACT_TRAINING)
def resnet_preact(*, depth=110, base_channels=16, block_type: Literal['basic', 'bottleneck'] = 'basic',
                  widening_factor=1, preact_stage=(True, True, True), remove_first_relu=False,
                  add_last_bn=False, se_reduction: int = None, num_classes=10, in_channels=3):
    """Pre-activation ResNet-``depth`` (6n+2 basic or 9n+2 bottleneck), optionally widened."""
    return build_resnet_preact('resnet_preact', depth, base_channels, block_type, widening_factor,
                               preact_stage, remove_first_relu, add_last_bn, se_reduction,
                               num_classes, in_channels)


@register_model('se_resnet_preact', test_config=dict(depth=8, base_channels=8, se_reduction=4),
                **PREACT_TRAINING)
def se_resnet_preact(*, depth=110, base_channels=16, block_type: Literal['basic', 'bottleneck'] = 'basic',
                     widening_factor=1, preact_stage=(True, False, False), remove_first_relu=True,
                     add_last_bn=True, se_reduction=16, num_classes=10, in_channels=3):
    """Pre-activation ResNet-``depth`` with an SE gate of reduction ``se_reduction`` per block
    (``--arch resnet_preact`` for none)."""
    return build_resnet_preact('se_resnet_preact', depth, base_channels, block_type,
                               widening_factor, preact_stage, remove_first_relu, add_last_bn,
                               se_reduction, num_classes, in_channels)


def initialize_wrn_weights(model):
    """The WRN authors' initialization, applied after the generic one.

    szagoruyko/wide-residual-networks: ``models/utils.lua`` MSRinit and FCinit, ``pytorch/utils.py``;
    hysts' ``models/wrn.py`` at 1d76092, whose WRN-28-10 gave 4.03%: convolutions normal with std
    sqrt(2 / fan_in), BN scales uniform in [0, 1) (Torch7's BatchNormalization default and
    ``bnparams``' ``torch.rand``) and shifts 0, the classifier's weight uniform in +-1/sqrt(fan_in)
    (nn.Linear's default, the same as Torch7's) and its bias 0. The other families use fan_out and
    unit BN scales (``models.common.initialize_weights``).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_in', nonlinearity='relu')
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.0, 1.0)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()
            nn.init.zeros_(module.bias)


def shortcut_preactivation(stem_channels, stage_channels):
    """The stage-entry blocks that change width pre-activate their shortcut too (WRN, kuangliu)."""
    return [stem_channels != stage_channels[0]] + [True] * (len(stage_channels) - 1)


@register_model('wrn', test_config=dict(depth=10, widening_factor=1, base_channels=4),
                epochs=200, batch_size=128, base_lr=0.1, weight_decay=5e-4,
                scheduler='multistep', milestones=[60, 120, 160], lr_decay=0.2)
def wrn(*, depth=28, widening_factor=10, base_channels=16, drop_rate=0.0, se_reduction: int = None,
        num_classes=10, in_channels=3):
    """WRN-``depth``-``widening_factor``; se_reduction adds SE gates (off by default)."""
    n_blocks = blocks_per_stage(depth, layers_per_block=2, extra_layers=4, arch='wrn')
    stage_channels = [base_channels * widening_factor * 2 ** index for index in range(3)]
    model = PreActResNet(PreActBasicBlock, [n_blocks] * 3, base_channels, stage_channels,
                         shortcut_preactivation(base_channels, stage_channels), num_classes, in_channels,
                         drop_rate=float(drop_rate), se_reduction=se_reduction)
    initialize_wrn_weights(model)
    return model


def resnet18_preact(base_channels, se_reduction, num_classes, in_channels):
    stage_channels = [base_channels * 2 ** index for index in range(4)]
    return PreActResNet(PreActBasicBlock, [2, 2, 2, 2], base_channels, stage_channels,
                        shortcut_preactivation(base_channels, stage_channels), num_classes, in_channels,
                        se_reduction=se_reduction)


@register_model('preact_resnet18', test_config=dict(base_channels=4), **CNN_RECIPE)
def preact_resnet18(*, base_channels=64, num_classes=10, in_channels=3):
    """PreAct-ResNet-18 with a CIFAR stem (11.2 M parameters)."""
    return resnet18_preact(base_channels, None, num_classes, in_channels)


@register_model('senet18', test_config=dict(base_channels=8, se_reduction=4), **CNN_RECIPE)
def senet18(*, base_channels=64, se_reduction=16, num_classes=10, in_channels=3):
    """SENet-18: PreAct-ResNet-18 with an SE gate of reduction ``se_reduction`` per block (11.3 M)."""
    return resnet18_preact(base_channels, se_reduction, num_classes, in_channels)
