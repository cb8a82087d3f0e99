"""ResNet-9, the fast CIFAR-10 network of the DAWNBench line of work.

David Page, "How to train your ResNet" (myrtle.ai blog series, 2018-2019, part 4 "Architecture";
no arXiv version): the network behind 94% CIFAR-10 test accuracy in 24 epochs (79 s on one V100).
Part 8 "Bag of tricks" adds CELU activations, ghost batch norm and a smaller output scale, among
training changes, for 94.1% in 10 epochs (26 s); those are options here (reference code: myrtle.ai's
cifar10-fast, ``bag_of_tricks.ipynb`` and ``new_dawn.py``).
"""
from typing import Literal

import torch.nn as nn
import torch.nn.functional as F

from models.common import (GhostBatchNorm2d, check_choice, check_positive_int, check_positive_number,
                           conv3x3)
from models.registry import ModelConfigError, register_model

# Page scales the logits by 1/8, keeping them small at initialization (his tuned value); his
# final network, with BN scales frozen at 1, uses 1/16.
HEAD_SCALE = 0.125
# Page's CELU alpha in his final network, whose BN scales are frozen at 1. With learnable scales
# he used 0.075; freezing them at 1 instead of their mid-training value of about 1/4 rescales
# alpha by 4 (and the BN-bias lr and weight decay by 16 and 1/16) for the same function.
CELU_ALPHA = 0.3
ACTIVATIONS = ('relu', 'celu')


def conv_bn_act(in_channels, out_channels, activation='relu', celu_alpha=CELU_ALPHA, ghost_bn_splits=1):
    """conv3x3 (no bias) - BN (ghost BN with ``ghost_bn_splits`` > 1) - ReLU or CELU."""
    layers = nn.Sequential()
    layers.add_module('conv', conv3x3(in_channels, out_channels))
    if ghost_bn_splits > 1:
        layers.add_module('bn', GhostBatchNorm2d(out_channels, num_splits=ghost_bn_splits))
    else:
        layers.add_module('bn', nn.BatchNorm2d(out_channels))
    if activation == 'celu':
        layers.add_module('act', nn.CELU(celu_alpha, inplace=True))
    else:
        layers.add_module('act', nn.ReLU(inplace=True))
    return layers


class Residual(nn.Module):
    """``x + f(x)`` where ``f`` is two conv-BN-activation layers of the same width."""

    def __init__(self, channels, **layer_kwargs):
        super().__init__()
        self.block1 = conv_bn_act(channels, channels, **layer_kwargs)
        self.block2 = conv_bn_act(channels, channels, **layer_kwargs)

    def forward(self, x):
        return x + self.block2(self.block1(x))


class ResNet9(nn.Module):
    """prep, then three stages of conv-BN-activation + 2x2 max-pool (residual after stages 1 and 3),
    global max-pool and a bias-free linear layer scaled by ``head_scale``.

    ``stage1..3`` are Page's layer1..3; with ``base_channels=64`` widths are 64-128-256-512.
    Weights keep PyTorch's default initialization, as in Page's code (cifar10-fast builds its
    ``nn.Conv2d`` and ``nn.Linear`` layers without re-initializing them): conv and linear weights
    uniform in +-1/sqrt(fan_in) (``kaiming_uniform_`` with a=sqrt(5)), BN scale 1 and bias 0.
    """

    def __init__(self, base_channels=64, num_classes=10, in_channels=3, activation='relu',
                 celu_alpha=CELU_ALPHA, ghost_bn_splits=1, head_scale=HEAD_SCALE):
        super().__init__()
        layer_kwargs = dict(activation=activation, celu_alpha=celu_alpha, ghost_bn_splits=ghost_bn_splits)
        widths = [base_channels * 2 ** index for index in range(4)]
        self.prep = conv_bn_act(in_channels, widths[0], **layer_kwargs)
        for index in range(3):
            stage = nn.Sequential()
            stage.add_module('conv', conv_bn_act(widths[index], widths[index + 1], **layer_kwargs))
            stage.add_module('pool', nn.MaxPool2d(2))
            if index != 1:
                stage.add_module('residual', Residual(widths[index + 1], **layer_kwargs))
            self.add_module(f'stage{index + 1}', stage)
        self.fc = nn.Linear(widths[3], num_classes, bias=False)
        self.num_features = widths[3]
        self.head_scale = head_scale

    def forward_features(self, x):
        x = self.prep(x)
        x = self.stage1(x)
        x = self.stage2(x)
        return self.stage3(x)

    def forward(self, x):
        # global max-pool: Page's MaxPool2d(4) on the 4x4 map of a 32x32 input, for any size
        x = F.adaptive_max_pool2d(self.forward_features(x), 1).flatten(1)
        return self.fc(x) * self.head_scale


@register_model('resnet9', test_config=dict(base_channels=4),
                epochs=24, batch_size=512, base_lr=0.4, weight_decay=5e-4, momentum=0.9, nesterov=True,
                scheduler='linear', warmup_epochs=5, warmup_method='linear', warmup_start_factor=0.0, lr_min=0.0,
                use_cutout=True, cutout_size=8)
def resnet9(*, base_channels=64, activation: Literal['relu', 'celu'] = 'relu', celu_alpha=CELU_ALPHA,
            ghost_bn_splits=1, head_scale=HEAD_SCALE, num_classes=10, in_channels=3):
    """ResNet-9 (Page's DAWNBench network, about 6.57 M parameters at ``base_channels=64``).

    Training defaults are Page's published recipe restated for a batch-mean loss: 24 epochs,
    batch 512, SGD with Nesterov momentum 0.9, lr rising linearly from 0 to 0.4 over 5 epochs
    and falling linearly to 0 at epoch 24, 8x8 Cutout on top of pad-4 crop and flip. Page sums
    the loss over the batch and uses lr 0.4 / 512 with weight decay 5e-4 * 512; for SGD that
    is the same update as lr 0.4 and weight decay 5e-4 on the batch-mean loss, which is what
    ``main.py`` computes, so those are the values here.

    The defaults build that 24-epoch network. Page's final 10-epoch network ("Bag of tricks") uses
    ``activation='celu'`` (CELU, arXiv 1704.07483, with ``celu_alpha`` 0.3), ``ghost_bn_splits=16``
    (:class:`GhostBatchNorm2d`, 32 images per group at batch 512) and ``head_scale=1/16``;
    ``run_experiments.sh fast_resnet9`` has the whole recipe. None of them changes the parameters.
    """
    arch = 'resnet9'
    check_positive_int('--base_channels', base_channels, arch)
    check_choice('--activation', activation, ACTIVATIONS, arch)
    check_positive_number('--celu_alpha', celu_alpha, arch)
    if activation != 'celu' and celu_alpha != CELU_ALPHA:
        raise ModelConfigError(f'--celu_alpha {celu_alpha}: applies only with --activation celu')
    check_positive_int('--ghost_bn_splits', ghost_bn_splits, arch)
    check_positive_number('--head_scale', head_scale, arch)
    return ResNet9(base_channels=base_channels, num_classes=num_classes, in_channels=in_channels,
                   activation=activation, celu_alpha=celu_alpha, ghost_bn_splits=ghost_bn_splits,
                   head_scale=head_scale)
