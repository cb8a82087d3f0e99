"""ResNet with stochastic depth from "Deep Networks with Stochastic Depth" (Huang, Sun, Liu, Sedra and
Weinberger, arXiv 1603.09382).

The paper's CIFAR network is the 110-layer ResNet of He et al. (arXiv 1512.03385, 1.7 M parameters):
a 16-channel stem and three stages of 16/32/64 channels with n = (depth - 2) / 6 = 18 post-activation
basic blocks each, whose shortcuts are parameter-free where the shape changes (2x2 average pooling
and zero channels, option A, as the authors' Torch code ``ResidualDrop.lua``). In training, the
residual branch of block l of L survives a mini-batch with probability p_l = 1 - l / L (1 - p_L)
(the linear decay rule, eq. 4; p_L = 0.5, so ``drop_path_rate`` = 1 - p_L = 0.5) and is skipped,
not computed, when it does not; at test time it is scaled by p_l (eq. 5). The coins come from the
CPU generator, so a step never waits for the device.

Training defaults are the authors' (``main.lua``): 500 epochs, batch 128, SGD with Nesterov momentum
0.9, lr 0.1 divided by 10 at 50% and 75% of training, weight decay 1e-4.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import (ConvStemNetwork, conv3x3, linear_drop_rates, residual_blocks_per_stage,
                           zero_padded_shortcut)
from models.registry import register_model


class StochasticDepthBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN added to a parameter-free shortcut, then ReLU; the branch is
    skipped in training with probability ``drop_rate`` and scaled by ``1 - drop_rate`` in eval."""

    def __init__(self, in_channels, out_channels, stride, drop_rate=0.0):
        super().__init__()
        self.stride, self.out_channels, self.drop_rate = stride, out_channels, drop_rate
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def residual(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(y))

    def forward(self, x):
        shortcut = zero_padded_shortcut(x, self.out_channels, self.stride)
        if not self.training:
            return F.relu(shortcut + (1 - self.drop_rate) * self.residual(x))
        # one coin per block and mini-batch; a dropped block costs nothing but its shortcut
        if self.drop_rate > 0 and torch.rand(()).item() < self.drop_rate:
            return F.relu(shortcut)
        return F.relu(shortcut + self.residual(x))


@register_model('resnet_stochastic_depth', test_config=dict(depth=8, base_channels=4),
                epochs=500, batch_size=128, base_lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                scheduler='multistep', milestones=[250, 375], lr_decay=0.1,
                # a dropped block's parameters get no gradient: DDP must not wait for them
                find_unused_parameters=True)
def resnet_stochastic_depth(*, depth=110, base_channels=16, drop_path_rate=0.5, num_classes=10, in_channels=3):
    """ResNet-``depth`` (6n+2) with stochastic depth, the last block dropping with ``drop_path_rate``."""
    n_blocks = residual_blocks_per_stage(depth, 'basic', 'resnet_stochastic_depth')
    stage_channels = [base_channels * 2 ** index for index in range(3)]
    rates = [dict(drop_rate=rate) for rate in linear_drop_rates(float(drop_path_rate), 3 * n_blocks)]
    # a conv-BN-ReLU stem, stages of stochastic-depth blocks whose drop rates rise linearly, pooling, linear
    return ConvStemNetwork(StochasticDepthBlock, [n_blocks] * 3, stage_channels, base_channels, num_classes,
                           in_channels, per_block_kwargs=rates)
