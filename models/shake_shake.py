"""Shake-Shake regularized 3-branch ResNets for CIFAR-sized inputs.

Gastaldi, "Shake-Shake regularization", arXiv 1705.07485. Where the paper leaves details
open, the author's Lua code (github.com/xgastaldi/shake-shake) decides; differences from
hysts' PyTorch port are noted inline.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import ClassifierHead, StagedNetwork, blocks_per_stage, conv1x1, conv3x3, initialize_weights
from models.registry import ModelConfigError, register_model

# Width of the first convolution in the author's code, whatever the network width.
STEM_CHANNELS = 16


class ShakeShakeMix(torch.autograd.Function):
    """``alpha * x1 + (1 - alpha) * x2`` forward, gradients ``beta * g`` and ``(1 - beta) * g``.

    The backward pass deliberately uses another coefficient than the forward pass (section 2.1).
    """

    @staticmethod
    def forward(ctx, branch1, branch2, alpha, beta):
        ctx.save_for_backward(beta)
        return alpha * branch1 + (1 - alpha) * branch2

    @staticmethod
    def backward(ctx, grad_output):
        beta, = ctx.saved_tensors
        return beta * grad_output, (1 - beta) * grad_output, None, None


def shake_shake_mix(branch1, branch2, alpha, beta):
    """Mix two branch outputs with ``alpha`` in forward and ``beta`` in backward.

    ``alpha`` and ``beta`` broadcast against the branches: shape (N, 1, 1, 1) per image,
    (1, 1, 1, 1) per batch.
    """
    return ShakeShakeMix.apply(branch1, branch2, alpha, beta)


def sample_shake_coefficient(shake, per_image, like):
    """Uniform(0, 1) coefficients shaped for ``like`` (per image or one per batch); 0.5 if not ``shake``."""
    shape = (like.size(0) if per_image else 1,) + (1,) * (like.dim() - 1)
    if shake:
        return torch.rand(shape, device=like.device, dtype=like.dtype)
    return torch.full(shape, 0.5, device=like.device, dtype=like.dtype)


class ResidualBranch(nn.Module):
    """ReLU-conv3x3-BN-ReLU-conv3x3-BN, the first conv carrying the stride."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        # not in place: the input also feeds the other branch and the shortcut
        y = self.conv1(F.relu(x))
        y = self.conv2(F.relu(self.bn1(y), inplace=True))
        return self.bn2(y)


class ShakeShakeShortcut(nn.Module):
    """ReLU, two paths of 1x1 average pooling (stride) + conv1x1 to half the width each,
    the second on the input shifted by one pixel, concatenated, then BN (section 2.2.1)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.stride = stride
        self.conv1 = conv1x1(in_channels, out_channels // 2)
        self.conv2 = conv1x1(in_channels, out_channels // 2)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = F.relu(x)
        path1 = self.conv1(F.avg_pool2d(x, kernel_size=1, stride=self.stride))
        # Shift one pixel right and down (zero row/column in, last row/column out) as the
        # author's SpatialZeroPadding(1, -1, 1, -1), so the strided sampling sees the other
        # pixels; hysts shifts left and up instead.
        shifted = F.pad(x, (1, -1, 1, -1))
        path2 = self.conv2(F.avg_pool2d(shifted, kernel_size=1, stride=self.stride))
        return self.bn(torch.cat([path1, path2], dim=1))


class ShakeShakeBlock(nn.Module):
    """Two residual branches mixed by Shake-Shake, plus an identity or projection shortcut."""

    def __init__(self, in_channels, out_channels, stride, shake_forward=True, shake_backward=True,
                 shake_image=True):
        super().__init__()
        self.shake_forward = shake_forward
        self.shake_backward = shake_backward
        self.shake_image = shake_image
        self.branch1 = ResidualBranch(in_channels, out_channels, stride)
        self.branch2 = ResidualBranch(in_channels, out_channels, stride)
        self.shortcut = nn.Identity()
        if in_channels != out_channels or stride != 1:
            self.shortcut = ShakeShakeShortcut(in_channels, out_channels, stride)

    def forward(self, x):
        branch1 = self.branch1(x)
        branch2 = self.branch2(x)
        if self.training:
            alpha = sample_shake_coefficient(self.shake_forward, self.shake_image, branch1)
            beta = sample_shake_coefficient(self.shake_backward, self.shake_image, branch1)
            mixed = shake_shake_mix(branch1, branch2, alpha, beta)
        else:
            # at test time the branches are averaged (expected value of alpha)
            mixed = 0.5 * (branch1 + branch2)
        return self.shortcut(x) + mixed


class ShakeShakeNet(StagedNetwork):
    """conv3x3(16)-BN stem, stages of Shake-Shake blocks, ReLU, global pooling, linear."""

    def __init__(self, blocks_per_stage, stage_channels, shake_forward=True, shake_backward=True,
                 shake_image=True, num_classes=10, in_channels=3):
        super().__init__()
        # The author's code has no ReLU after the stem BN (each branch and the shortcut start
        # with one) but one before pooling; hysts does the opposite and its stem is base_channels wide.
        self.conv = conv3x3(in_channels, STEM_CHANNELS)
        self.bn = nn.BatchNorm2d(STEM_CHANNELS)
        channels = self.add_stages(ShakeShakeBlock, STEM_CHANNELS, stage_channels, blocks_per_stage,
                                   shake_forward=shake_forward, shake_backward=shake_backward,
                                   shake_image=shake_image)
        self.head = ClassifierHead(channels, num_classes)
        self.num_features = channels
        initialize_weights(self)

    def forward_features(self, x):
        x = self.bn(self.conv(x))
        x = self.forward_stages(x)
        return F.relu(x)


@register_model('shake_shake', test_config=dict(depth=8, base_channels=4),
                epochs=1800, batch_size=128, base_lr=0.2, weight_decay=1e-4,
                scheduler='cosine', lr_min=0.0)
def shake_shake(*, depth=26, base_channels=96, shake_forward=True, shake_backward=True,
                shake_image=True, num_classes=10, in_channels=3):
    """Shake-Shake-{depth} 2x{base_channels}d (depth = 6n+2), e.g. 26 2x96d.

    ``shake_forward`` / ``shake_backward``: random alpha / beta in Uniform(0, 1), else 0.5
    ("Even"); ``shake_image``: a coefficient per image, else one per mini-batch. The paper's
    S-S-I is (True, True, True), S-E-I (True, False, True), E-E-E (False, False, any).
    """
    if base_channels % 2:
        raise ModelConfigError(f'--base_channels {base_channels}: shake_shake needs a positive even '
                               'width (the projection shortcut concatenates two halves)')
    # two 3x3 convolutions per block (both branches run in parallel), plus stem and classifier
    n_blocks = blocks_per_stage(depth, 2, arch='shake_shake')
    stage_channels = [base_channels * 2 ** index for index in range(3)]
    return ShakeShakeNet([n_blocks] * 3, stage_channels, bool(shake_forward), bool(shake_backward),
                         bool(shake_image), num_classes, in_channels)
