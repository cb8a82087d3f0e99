"""PyramidNet (additive widening) for CIFAR-sized inputs.

Han, Kim and Kim, "Deep Pyramidal Residual Networks", arXiv 1610.02915. Shortcuts are
parameter-free (2x2 average pooling and zero channels), the paper's choice over projection
shortcuts, which it found to overfit (section 3). ``use_shakedrop`` adds ShakeDrop (Yamada et al.,
"ShakeDrop Regularization for Deep Residual Learning", arXiv 1802.02375) at the end of every
residual branch, as the authors' code adds it to PyramidNet (imenurok/ShakeDrop, pyramidnet.lua).
"""
import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import (ClassifierHead, StagedNetwork, conv1x1, conv3x3, initialize_weights, linear_drop_rates,
                           residual_blocks_per_stage, zero_padded_shortcut)
from models.registry import ModelConfigError, register_model


class ShakeDropFunction(torch.autograd.Function):
    """``x`` where ``gate`` is True, ``alpha * x`` elsewhere; the gradient by ``beta`` instead of ``alpha``.

    ShakeDrop (Yamada et al., arXiv 1802.02375, eq. 8, ``b + alpha - b alpha`` with b in {0, 1}): where
    the Bernoulli gate is on the branch passes unchanged both ways; where it is off the forward pass
    scales by ``alpha`` and the backward pass by an independent ``beta``. The tensors broadcast
    against ``x``; ``gate`` is boolean, so a kept branch is passed exactly, without rounding.
    """

    @staticmethod
    def forward(ctx, x, gate, alpha, beta):
        ctx.save_for_backward(gate, beta)
        return x * torch.where(gate, 1.0, alpha)

    @staticmethod
    def backward(ctx, grad_output):
        gate, beta = ctx.saved_tensors
        return grad_output * torch.where(gate, 1.0, beta), None, None, None


class ShakeDrop(nn.Module):
    """ShakeDrop on a residual branch, which survives (passes unchanged) with probability ``survival``.

    Training: one Bernoulli gate per batch and alpha in ``alpha_range``, beta in ``beta_range``
    uniform per element, as the authors' code draws them (imenurok/ShakeDrop, ShakeDrop.lua: one
    ``torch.rand(1)`` gate per forward pass, ``uniform()`` over the whole output) and the paper
    states ("independent uniform random variables in each element", alpha in [-1, 1], beta in
    [0, 1]). Every draw happens on the branch's device, so a step never waits for it. Evaluation:
    the expectation ``survival + (1 - survival) * E[alpha]``, i.e. ``survival`` for alpha in [-1, 1].
    """

    def __init__(self, survival, alpha_range=(-1.0, 1.0), beta_range=(0.0, 1.0)):
        super().__init__()
        self.survival = survival
        self.alpha_range, self.beta_range = tuple(alpha_range), tuple(beta_range)

    def expected_scale(self):
        return self.survival + (1 - self.survival) * sum(self.alpha_range) / 2

    def forward(self, x):
        if not self.training:
            return x * self.expected_scale()
        gate = torch.rand((1,) * x.dim(), device=x.device) < self.survival
        (alpha_low, alpha_high), (beta_low, beta_high) = self.alpha_range, self.beta_range
        alpha = torch.rand_like(x).mul_(alpha_high - alpha_low).add_(alpha_low)
        beta = torch.rand_like(x).mul_(beta_high - beta_low).add_(beta_low)
        return ShakeDropFunction.apply(x, gate, alpha, beta)

    def extra_repr(self):
        return f'survival={self.survival:.4g}, alpha_range={self.alpha_range}, beta_range={self.beta_range}'


def linear_survival_probabilities(final_survival, n_blocks):
    """ShakeDrop's linear decay rule (arXiv 1802.02375, from stochastic depth, arXiv 1603.09382):
    block l of L survives with probability ``1 - (l / L)(1 - final_survival)``, the last with
    ``final_survival`` (0.5 in the paper)."""
    return [1 - rate for rate in linear_drop_rates(1 - final_survival, n_blocks)]


class BasicBlock(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN: no ReLU on the input or after the addition (Fig. 6(d))."""

    expansion = 1

    def __init__(self, in_channels, out_channels, stride, shakedrop_survival=None):
        super().__init__()
        self.stride = stride
        self.out_channels = out_channels
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)  # downsample with the first conv
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shakedrop = None if shakedrop_survival is None else ShakeDrop(shakedrop_survival)

    def forward(self, x):
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        y = self.bn3(y)
        if self.shakedrop is not None:
            y = self.shakedrop(y)
        return y + zero_padded_shortcut(x, self.out_channels, self.stride)


class BottleneckBlock(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN, ``out_channels`` = 4x the bottleneck width."""

    expansion = 4

    def __init__(self, in_channels, out_channels, stride, shakedrop_survival=None):
        super().__init__()
        width = out_channels // self.expansion
        self.stride = stride
        self.out_channels = out_channels
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)  # downsample with the 3x3 conv
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, self.out_channels)
        self.bn4 = nn.BatchNorm2d(self.out_channels)
        self.shakedrop = None if shakedrop_survival is None else ShakeDrop(shakedrop_survival)

    def forward(self, x):
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y), inplace=True))
        y = self.conv3(F.relu(self.bn3(y), inplace=True))
        y = self.bn4(y)
        if self.shakedrop is not None:
            y = self.shakedrop(y)
        return y + zero_padded_shortcut(x, self.out_channels, self.stride)


BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}


def pyramid_widths(base_channels, pyramid_alpha, n_blocks):
    """Width of each of ``n_blocks`` blocks: ``base + k * alpha / n_blocks`` rounded half up.

    Equation (2) of the paper; rounding as floor(x + 0.5) in the authors' Lua code.
    """
    step = pyramid_alpha / n_blocks
    return [int(math.floor(base_channels + (index + 1) * step + 0.5)) for index in range(n_blocks)]


class PyramidNet(StagedNetwork):
    """Stages of pyramidal residual blocks; ``stage_widths[i]`` lists the output width of each block.

    ``shakedrop_survival``: None, or one ShakeDrop survival probability per block of the network.
    """

    def __init__(self, block, stage_widths, base_channels, num_classes, in_channels, shakedrop_survival=None):
        super().__init__()
        # conv-BN stem without ReLU, as in the authors' code: every block starts with BN
        self.conv = conv3x3(in_channels, base_channels)
        self.bn1 = nn.BatchNorm2d(base_channels)
        per_block = None if shakedrop_survival is None else [dict(shakedrop_survival=p) for p in shakedrop_survival]
        channels = self.add_stages(block, base_channels, stage_widths, [len(w) for w in stage_widths],
                                   per_block_kwargs=per_block)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = ClassifierHead(channels, num_classes)
        self.num_features = channels
        initialize_weights(self)

    def forward_features(self, x):
        x = self.bn1(self.conv(x))
        x = self.forward_stages(x)
        # the blocks end without ReLU, so BN-ReLU before pooling
        return F.relu(self.bn2(x), inplace=True)


@register_model('pyramidnet', test_config=dict(depth=8, block_type='basic', pyramid_alpha=8, base_channels=4),
                epochs=300, batch_size=128, base_lr=0.1, weight_decay=1e-4,
                scheduler='multistep', milestones=[150, 225], lr_decay=0.1)
def pyramidnet(*, depth=272, block_type: Literal['basic', 'bottleneck'] = 'bottleneck', pyramid_alpha=200,
               base_channels=16, use_shakedrop=False, shakedrop_survival: float = None, num_classes=10,
               in_channels=3):
    """PyramidNet with additive widening: depth = 6n+2 (basic) or 9n+2 (bottleneck).

    The width grows from ``base_channels`` by ``pyramid_alpha / (3n)`` per block, so the
    last block is ``base_channels + pyramid_alpha`` wide (times 4 for bottleneck blocks).

    Args:
        use_shakedrop: pyramidnet: ShakeDrop on every residual branch (arXiv 1802.02375)
        shakedrop_survival: pyramidnet --use_shakedrop: last block's survival probability (0.5; linear from 1)
    """
    if shakedrop_survival is not None and not use_shakedrop:
        raise ModelConfigError(f'--shakedrop_survival {shakedrop_survival}: needs --use_shakedrop')
    n_blocks = residual_blocks_per_stage(depth, block_type, 'pyramidnet')
    block = BLOCKS[block_type]
    widths = [width * block.expansion for width in pyramid_widths(base_channels, pyramid_alpha, 3 * n_blocks)]
    stage_widths = [widths[index * n_blocks:(index + 1) * n_blocks] for index in range(3)]
    survival = None
    if use_shakedrop:
        shakedrop_survival = 0.5 if shakedrop_survival is None else shakedrop_survival
        survival = linear_survival_probabilities(shakedrop_survival, 3 * n_blocks)
    return PyramidNet(block, stage_widths, base_channels, num_classes, in_channels, survival)
