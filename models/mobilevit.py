"""MobileViT from "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer"
(Mehta and Rastegari, arXiv 2110.02178), sized for 32x32 images.

Table 4 and Fig. 1(b): a 3x3 stem of 16 channels, then five stages; stages 1 and 2 are MobileNetV2
blocks (1, and 3 blocks), stages 3, 4 and 5 one MobileNetV2 block and a MobileViT block each,
whose transformer has L = 2, 4 and 3 layers of width d; a 1x1 convolution to 4 x the last width,
pooling and the classifier. A MobileViT block models locally (3x3 conv-BN-SiLU, 1x1 conv to d),
then globally: the map is unfolded into 2x2 patches and a transformer attends across the patches
among the pixels at the same position in each patch (the ``P`` sequences of ``N`` tokens of eq. 1),
is folded back, projected to C channels (1x1 conv-BN-SiLU) and fused with the block's input
(concatenation, 3x3 conv-BN-SiLU). The widths, expansion rates and transformer settings (4 heads,
MLP 2d, SiLU, a LayerNorm after the transformer) are the authors' ml-cvnets configurations:

    variant  stage widths              d              MV2 expansion  parameters (1000 classes)
    s        32, 64, 96, 128, 160      144, 192, 240  4              5.6 M
    xs       32, 48, 64, 80, 96        96, 120, 144   4              2.3 M
    xxs      16, 24, 48, 64, 80        64, 80, 96     2              1.3 M

CIFAR strides as the CIFAR tricks collection's MobileViTs: stride 2 in the stem, 1, 1, 2, 2, 1 in
the stages (the paper: 2; 1, 2, 2, 2, 2), so a 32x32 image ends in a 4x4 map and the MobileViT
blocks see 8x8, 4x4 and 4x4 maps. A map whose side is not a multiple of the patch (7x7 from a
28x28 digit) is resized bilinearly to the next multiple for the transformer and back, as ml-cvnets
does.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import (ClassifierHead, ConvBNAct, InvertedResidual, StagedNetwork, TransformerBlock,
                           check_length, check_multiple, initialize_transformer_weights)
from models.registry import TRANSFORMER_RECIPE, register_model

STEM_CHANNELS = 16
STAGE_STRIDES = [1, 1, 2, 2, 1]
PATCH_SIZE = 2
# MobileViT's transformers: 4 heads and an MLP twice as wide as the tokens (ml-cvnets)
NUM_HEADS = 4
MLP_RATIO = 2.0
MOBILE_VIT_DEPTHS = (2, 4, 3)


class MobileViTBlock(nn.Module):
    """Local 3x3 and 1x1 convolutions, a transformer over unfolded 2x2 patches, projection, fusion."""

    def __init__(self, channels, dim, depth, num_heads):
        super().__init__()
        self.local_conv = ConvBNAct(channels, channels, activation=nn.SiLU)
        self.to_tokens = nn.Conv2d(channels, dim, kernel_size=1, bias=False)
        self.transformer = nn.Sequential()
        for index in range(depth):
            self.transformer.add_module(f'block{index + 1}',
                                        TransformerBlock(dim, num_heads, MLP_RATIO, activation=nn.SiLU))
        self.norm = nn.LayerNorm(dim)
        self.project = ConvBNAct(dim, channels, kernel_size=1, activation=nn.SiLU)
        self.fuse = ConvBNAct(2 * channels, channels, activation=nn.SiLU)

    def forward(self, x):
        y = self.to_tokens(self.local_conv(x))
        height, width = y.shape[-2:]
        padded = (math.ceil(height / PATCH_SIZE) * PATCH_SIZE, math.ceil(width / PATCH_SIZE) * PATCH_SIZE)
        if padded != (height, width):
            y = F.interpolate(y, size=padded, mode='bilinear', align_corners=False)
        y = fold(self.norm(self.transformer(unfold(y))), y.shape)
        if padded != (height, width):
            y = F.interpolate(y, size=(height, width), mode='bilinear', align_corners=False)
        return self.fuse(torch.cat([x, self.project(y)], dim=1))


def unfold(x):
    """(B, d, H, W) -> (B * P, N, d): for each of the P = 4 pixel positions in a 2x2 patch, the
    sequence of the N = HW / 4 patches."""
    batch, dim, height, width = x.shape
    x = x.reshape(batch, dim, height // PATCH_SIZE, PATCH_SIZE, width // PATCH_SIZE, PATCH_SIZE)
    return x.permute(0, 3, 5, 2, 4, 1).reshape(batch * PATCH_SIZE ** 2, -1, dim)


def fold(tokens, shape):
    """The inverse of :func:`unfold` back to ``shape`` (B, d, H, W)."""
    batch, dim, height, width = shape
    x = tokens.reshape(batch, PATCH_SIZE, PATCH_SIZE, height // PATCH_SIZE, width // PATCH_SIZE, dim)
    return x.permute(0, 5, 3, 1, 4, 2).reshape(shape)


class MobileViT(StagedNetwork):
    """Stem, ``stage1..5`` (MobileNetV2 blocks, then a MobileViT block in stages 3-5), 1x1 conv, pooling,
    linear."""

    def __init__(self, stage_channels, embed_dims, depths, expansion, num_heads, num_classes, in_channels):
        super().__init__()
        self.stem = ConvBNAct(in_channels, STEM_CHANNELS, stride=2, activation=nn.SiLU)
        channels = STEM_CHANNELS
        mobilenet_blocks = [1, 3, 1, 1, 1]
        for index, (out_channels, stride) in enumerate(zip(stage_channels, STAGE_STRIDES)):
            stage = nn.Sequential()
            for block in range(mobilenet_blocks[index]):
                stage.add_module(f'block{block + 1}', InvertedResidual(
                    channels, out_channels, stride if block == 0 else 1, expansion, activation=nn.SiLU))
                channels = out_channels
            if index >= 2:
                stage.add_module('mobilevit', MobileViTBlock(channels, embed_dims[index - 2], depths[index - 2],
                                                             num_heads))
            self.add_module(f'stage{index + 1}', stage)
        self.num_stages = len(stage_channels)
        self.head_conv = ConvBNAct(channels, 4 * channels, kernel_size=1, activation=nn.SiLU)
        self.num_features = 4 * channels
        self.head = ClassifierHead(4 * channels, num_classes)
        initialize_transformer_weights(self)

    def forward_features(self, x):
        x = self.forward_stages(self.stem(x))
        return self.head_conv(x)


def build_mobilevit(arch, n_channels, embed_dims, n_blocks, num_heads, expansion, num_classes, in_channels):
    check_length('--n_channels', n_channels, 5, arch)
    check_length('--embed_dims', embed_dims, 3, arch)
    check_length('--n_blocks', n_blocks, 3, arch)
    for dim in embed_dims:
        check_multiple('--embed_dims', dim, num_heads, '--num_heads', arch)
    return MobileViT(list(n_channels), list(embed_dims), list(n_blocks), expansion, num_heads, num_classes,
                     in_channels)


MOBILEVIT_TEST_CONFIG = dict(n_channels=[8, 8, 8, 8, 8], embed_dims=[8, 8, 8], n_blocks=[1, 1, 1], num_heads=2)


@register_model('mobilevit_s', test_config=MOBILEVIT_TEST_CONFIG, **TRANSFORMER_RECIPE)
def mobilevit_s(*, n_channels=(32, 64, 96, 128, 160), embed_dims=(144, 192, 240), n_blocks=MOBILE_VIT_DEPTHS,
                num_heads=NUM_HEADS, num_classes=10, in_channels=3):
    """MobileViT-S for CIFAR (4.9 M parameters)."""
    return build_mobilevit('mobilevit_s', n_channels, embed_dims, n_blocks, num_heads, 4, num_classes, in_channels)


@register_model('mobilevit_xs', test_config=MOBILEVIT_TEST_CONFIG, **TRANSFORMER_RECIPE)
def mobilevit_xs(*, n_channels=(32, 48, 64, 80, 96), embed_dims=(96, 120, 144), n_blocks=MOBILE_VIT_DEPTHS,
                 num_heads=NUM_HEADS, num_classes=10, in_channels=3):
    """MobileViT-XS for CIFAR (1.9 M parameters)."""
    return build_mobilevit('mobilevit_xs', n_channels, embed_dims, n_blocks, num_heads, 4, num_classes, in_channels)


@register_model('mobilevit_xxs', test_config=MOBILEVIT_TEST_CONFIG, **TRANSFORMER_RECIPE)
def mobilevit_xxs(*, n_channels=(16, 24, 48, 64, 80), embed_dims=(64, 80, 96), n_blocks=MOBILE_VIT_DEPTHS,
                  num_heads=NUM_HEADS, num_classes=10, in_channels=3):
    """MobileViT-XXS for CIFAR (1.0 M parameters): MobileNetV2 expansion 2."""
    return build_mobilevit('mobilevit_xxs', n_channels, embed_dims, n_blocks, num_heads, 2, num_classes,
                           in_channels)
