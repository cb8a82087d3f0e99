"""Swin Transformer from "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(Liu et al., arXiv 2103.14030), sized for 32x32 images.

Section 3.1 and Fig. 3: a patch embedding (``patch_size`` x ``patch_size`` patches linearly embedded
to C channels, LayerNorm), then four stages of pre-norm transformer blocks whose attention is
restricted to non-overlapping ``window_size`` x ``window_size`` windows, every second block shifting
the windows by half a window (cyclic shift and masks, section 3.2) so information crosses window
borders; attention carries a learned relative position bias (eq. 4). Between stages, patch
merging concatenates each 2x2 neighbourhood (4C channels, LayerNorm) and projects it to 2C.
Swin-T: C = 96, [2, 2, 6, 2] blocks; Swin-S: [2, 2, 18, 2]; heads of 32 channels (3, 6, 12, 24
heads), MLPs 4 x, stochastic depth 0.2 and 0.3; 28 M and 50 M parameters with 1000 classes at
224x224 (patches of 4, windows of 7).

CIFAR sizing: patches of 2 pixels and windows of 4, so a 32x32 image gives 16x16, 8x8, 4x4 and 2x2
maps; as in the authors' code a window never exceeds its map (the 4x4 and 2x2 stages attend over
the whole map, without shift), so every window divides its map. Inputs are zero-padded on the
bottom and right to a multiple of patch_size x 8 (28x28 digits to 32x32), where merging halves
even maps only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import (Attention, Mlp, RelativePositionBias, check_length, check_multiple, drop_path_layer,
                           initialize_transformer_weights, linear_drop_rates)
from models.registry import TRANSFORMER_RECIPE, ModelConfigError, register_model

N_STAGES = 4
# logit of the pairs a shifted window must not attend to (the authors' -100)
MASKED = -100.0


def window_partition(x, window):
    """(B, H, W, C) -> (B, number of windows, window * window, C), windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.transpose(2, 3).reshape(batch, -1, window * window, channels)


def window_merge(windows, height, width):
    """The inverse of :func:`window_partition`."""
    batch, _, tokens, channels = windows.shape
    window = int(tokens ** 0.5)
    x = windows.reshape(batch, height // window, width // window, window, window, channels)
    return x.transpose(2, 3).reshape(batch, height, width, channels)


def shifted_window_mask(height, width, window, shift, device):
    """(windows, N, N) additive mask: after the cyclic shift, tokens that came from different image
    regions share a window but must not attend to each other (section 3.2, Fig. 4)."""
    region = torch.zeros(height, width, device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
        region[rows, cols] = label
    labels = window_partition(region[None, :, :, None], window)[0, :, :, 0]
    return (labels[:, :, None] != labels[:, None, :]).float() * MASKED


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention with relative position bias, then MLP; on (B, H, W, C) maps."""

    def __init__(self, dim, num_heads, window, shift, drop_path=0.0):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.relative_bias = RelativePositionBias(window, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x):
        height, width = x.shape[1:3]
        y = self.norm1(x)
        bias = self.relative_bias()
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            bias = bias + shifted_window_mask(height, width, self.window, self.shift, x.device)[:, None]
        y = window_merge(self.attn(window_partition(y, self.window), bias), height, width)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C), LayerNorm, linear to 2C: half the resolution."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    """patch_embed and its norm, ``stage1..4`` (patch merging, then blocks), norm, pooling, linear ``head``."""

    def __init__(self, embed_dim, blocks_per_stage, head_dim, windows, patch_size, drop_path_rate, num_classes,
                 in_channels):
        super().__init__()
        self.pad_multiple = patch_size * 2 ** (N_STAGES - 1)
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        rates = iter(linear_drop_rates(drop_path_rate, sum(blocks_per_stage)))
        dim = embed_dim
        for index, (n_blocks, (window, shift)) in enumerate(zip(blocks_per_stage, windows)):
            stage = nn.Sequential()
            if index > 0:
                stage.add_module('downsample', PatchMerging(dim))
                dim *= 2
            for block in range(n_blocks):
                # regular and shifted windows alternate (Fig. 3(b))
                stage.add_module(f'block{block + 1}', SwinBlock(dim, dim // head_dim, window,
                                                                shift if block % 2 else 0, next(rates)))
            self.add_module(f'stage{index + 1}', stage)
        self.norm = nn.LayerNorm(dim)
        self.num_features = dim
        self.head = nn.Linear(dim, num_classes)
        initialize_transformer_weights(self)

    def forward_features(self, x):
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % self.pad_multiple, 0, -height % self.pad_multiple))
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        return self.norm(self.stage4(x))

    def forward(self, x):
        return self.head(self.forward_features(x).mean(dim=(1, 2)))


def stage_windows(image_size, patch_size, window_size, arch):
    """(window, shift) per stage: a window as large as the map where the map is not larger (no
    shift), else ``window_size``, which must divide the map (the authors' rule)."""
    multiple = patch_size * 2 ** (N_STAGES - 1)
    side = -(-image_size // multiple) * multiple // patch_size
    windows = []
    for _ in range(N_STAGES):
        if side <= window_size:
            windows.append((side, 0))
        elif side % window_size:
            raise ModelConfigError(f'--window_size {window_size}: {arch} needs a window that divides each '
                                   f'feature map larger than it ({side}x{side} for {image_size}x{image_size} '
                                   f'images and --patch_size {patch_size})')
        else:
            windows.append((window_size, window_size // 2))
        side //= 2
    return windows


def build_swin(arch, embed_dim, n_blocks, head_dim, window_size, patch_size, drop_path_rate, image_size,
               num_classes, in_channels):
    check_length('--n_blocks', n_blocks, N_STAGES, arch)
    check_multiple('--embed_dim', embed_dim, head_dim, '--head_dim', arch)
    windows = stage_windows(image_size, patch_size, window_size, arch)
    return SwinTransformer(embed_dim, list(n_blocks), head_dim, windows, patch_size, float(drop_path_rate),
                           num_classes, in_channels)


SWIN_TEST_CONFIG = dict(embed_dim=8, n_blocks=[2, 1, 1, 1], head_dim=4)


@register_model('swin_t', test_config=SWIN_TEST_CONFIG, **TRANSFORMER_RECIPE)
def swin_t(*, embed_dim=96, n_blocks=(2, 2, 6, 2), head_dim=32, window_size=4, patch_size=2, drop_path_rate=0.2,
           num_classes=10, in_channels=3, image_size=32):
    """Swin-T for CIFAR (27.5 M parameters)."""
    return build_swin('swin_t', embed_dim, n_blocks, head_dim, window_size, patch_size, drop_path_rate,
                      image_size, num_classes, in_channels)


@register_model('swin_s', test_config=SWIN_TEST_CONFIG, **TRANSFORMER_RECIPE)
def swin_s(*, embed_dim=96, n_blocks=(2, 2, 18, 2), head_dim=32, window_size=4, patch_size=2, drop_path_rate=0.3,
           num_classes=10, in_channels=3, image_size=32):
    """Swin-S for CIFAR (48.8 M parameters)."""
    return build_swin('swin_s', embed_dim, n_blocks, head_dim, window_size, patch_size, drop_path_rate,
                      image_size, num_classes, in_channels)
