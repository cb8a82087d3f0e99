"""CvT from "CvT: Introducing Convolutions to Vision Transformers" (Wu, Xiao, Codella, Liu, Dai, Yuan and
Zhang, arXiv 2103.15808), sized for 32x32 images.

Three stages (Table 2, CvT-13): each starts with a convolutional token embedding (a strided
convolution to the stage's width, then LayerNorm) and stacks transformer blocks whose queries,
keys and values are convolutional projections of the token map (section 3.2: a 3x3 depthwise
convolution and BN, then a linear projection; stride 1 for queries, 2 for keys and values, which
cuts the attention's cost by 4); widths 64, 192, 384, 1, 2 and 10 blocks, heads of 64 channels
(1, 3, 6 heads), MLPs 4 x; a class token joins the last stage and the classifier reads it after a
LayerNorm. 20 M parameters with 1000 classes.

CIFAR sizing: the token embeddings are 3x3 convolutions at stride 2, 2, 2 (the paper's 7x7 at
stride 4, then 3x3 at stride 2), so a 32x32 image becomes 16x16, 8x8 and 4x4 token maps.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import (Mlp, check_length, check_multiple, drop_path_layer, initialize_transformer_weights,
                           linear_drop_rates)
from models.registry import TRANSFORMER_RECIPE, register_model

EMBED_KERNEL, EMBED_STRIDE = 3, 2


class ConvProjection(nn.Sequential):
    """3x3 depthwise convolution and BN over the token map (the projection's linear part follows)."""

    def __init__(self, dim, stride):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, stride=stride, padding=1, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)


class ConvAttention(nn.Module):
    """Multi-head attention whose queries (stride 1) and keys and values (stride ``kv_stride``) are
    convolutional projections of the (B, H x W, C) token map; a class token, if any, is projected
    linearly only."""

    def __init__(self, dim, num_heads, kv_stride=2):
        super().__init__()
        self.num_heads = num_heads
        self.conv_q = ConvProjection(dim, 1)
        self.conv_k = ConvProjection(dim, kv_stride)
        self.conv_v = ConvProjection(dim, kv_stride)
        self.proj_q = nn.Linear(dim, dim)
        self.proj_k = nn.Linear(dim, dim)
        self.proj_v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, size, has_cls_token):
        cls_token, tokens = (x[:, :1], x[:, 1:]) if has_cls_token else (x[:, :0], x)
        feature_map = tokens.transpose(1, 2).unflatten(2, size)

        def project(conv, linear):
            projected = torch.cat([cls_token, conv(feature_map).flatten(2).transpose(1, 2)], dim=1)
            return linear(projected).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q = project(self.conv_q, self.proj_q)
        k = project(self.conv_k, self.proj_k)
        v = project(self.conv_v, self.proj_v)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class CvTBlock(nn.Module):
    """Pre-norm block: x + ConvAttention(LN(x)), then x + MLP(LN(x)), with stochastic depth."""

    def __init__(self, dim, num_heads, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x, size, has_cls_token):
        x = x + self.drop_path(self.attn(self.norm1(x), size, has_cls_token))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """Convolutional token embedding (conv, LayerNorm), then ``block1..n``; the last stage adds a class token."""

    def __init__(self, in_channels, dim, depth, num_heads, drop_rates, cls_token):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, EMBED_KERNEL, stride=EMBED_STRIDE, padding=EMBED_KERNEL // 2)
        self.norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        for index in range(depth):
            self.add_module(f'block{index + 1}', CvTBlock(dim, num_heads, drop_rates[index]))
        self.depth = depth

    def forward(self, x):
        x = self.embed(x)
        size = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for index in range(1, self.depth + 1):
            x = getattr(self, f'block{index}')(x, size, self.cls_token is not None)
        return x, size


class CvT(nn.Module):
    """``stage1..3``, then LayerNorm and a linear ``head`` on the class token."""

    def __init__(self, blocks_per_stage, stage_channels, head_dim, drop_path_rate, num_classes, in_channels):
        super().__init__()
        rates = linear_drop_rates(drop_path_rate, sum(blocks_per_stage))
        channels = in_channels
        for index, (depth, dim) in enumerate(zip(blocks_per_stage, stage_channels)):
            stage = CvTStage(channels, dim, depth, dim // head_dim, rates[sum(blocks_per_stage[:index]):],
                             cls_token=index == len(stage_channels) - 1)
            self.add_module(f'stage{index + 1}', stage)
            channels = dim
        self.num_stages = len(stage_channels)
        self.norm = nn.LayerNorm(channels)
        self.num_features = channels
        self.head = nn.Linear(channels, num_classes)
        initialize_transformer_weights(self)
        nn.init.trunc_normal_(getattr(self, f'stage{self.num_stages}').cls_token, std=0.02)

    def forward_features(self, x):
        for index in range(1, self.num_stages):
            tokens, size = getattr(self, f'stage{index}')(x)
            x = tokens.transpose(1, 2).unflatten(2, size)
        tokens, _ = getattr(self, f'stage{self.num_stages}')(x)
        return self.norm(tokens)

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


@register_model('cvt', test_config=dict(n_blocks=[1, 1, 1], n_channels=[8, 16, 16], head_dim=8),
                **TRANSFORMER_RECIPE)
def cvt(*, n_blocks=(1, 2, 10), n_channels=(64, 192, 384), head_dim=64, drop_path_rate=0.1,
           num_classes=10, in_channels=3):
    """CvT-13 for CIFAR (19.6 M parameters)."""
    arch = 'cvt'
    check_length('--n_blocks', n_blocks, 3, arch)
    check_length('--n_channels', n_channels, 3, arch)
    for width in n_channels:
        check_multiple('--n_channels', width, head_dim, '--head_dim', arch)
    return CvT(list(n_blocks), list(n_channels), head_dim, float(drop_path_rate), num_classes, in_channels)
