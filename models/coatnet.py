"""CoAtNet from "CoAtNet: Marrying Convolution and Attention for All Data Sizes" (Dai, Liu, Le and Tan,
arXiv 2106.04803), sized for 32x32 images.

Five stages (section 3.2, the C-C-T-T layout): S0 a stem of two 3x3 convolutions, S1 and S2
MBConv blocks, S3 and S4 transformer blocks with relative attention (eq. 3: a learned bias per
head and relative offset, over the whole feature map). Table 3: L = [2, 2, 3, 5, 2] blocks of
D = [64, 96, 192, 384, 768] channels for CoAtNet-0; CoAtNet-1: L = [2, 2, 6, 14, 2]; CoAtNet-2: L as
CoAtNet-1, D = [128, 128, 256, 512, 1024] (the table prints 1026). All blocks are pre-norm (BN
before MBConv, LayerNorm before attention and MLP); MBConv expands to 4 x its output width with a
3x3 depthwise convolution and SE of 1/4 of its input width, attention heads are 32 wide and MLPs
4 x, activations GELU (section 4). The first block of each stage after S0 halves the resolution
(eq. 5): x <- Proj(Pool(x)) + Conv(DepthConv(Conv(Norm(x), stride 2))) for MBConv and
x <- Proj(Pool(x)) + Attention(Pool(Norm(x))) for transformers. Parameters at 224x224 with 1000
classes: 25 M, 42 M and 75 M (Table 5; these builders give 24.6 M, 42.0 M and 74.1 M). Stochastic
depth 0.2, 0.3 and 0.5, the rates of the paper's ImageNet-1K runs.

CIFAR sizing: S0 keeps the resolution (the paper halves it), so a 32x32 image reaches the
transformers at 4x4 (S3) and 2x2 (S4) instead of 1x1 in the last stage. The relative position
tables are sized by the feature maps, hence by ``image_size``. The CIFAR tricks collection's
CoAtNets (17.0, 32.2 and 54.5 M parameters in its table) give every attention 8 heads of 32
channels whatever the width and expand MBConv by the input width; these follow the paper.
"""
import torch.nn as nn
import torch.nn.functional as F

from models.common import (Attention, ConvBNAct, Mlp, RelativePositionBias, SqueezeExcite, check_length,
                           check_multiple, drop_path_layer, initialize_transformer_weights, linear_drop_rates)
from models.registry import TRANSFORMER_RECIPE, register_model

BLOCK_TYPES = ('conv', 'conv', 'transformer', 'transformer')


def half(size):
    """The side of a map after a stride-2 pool or convolution (rounding up)."""
    return (size + 1) // 2


class MBConvBlock(nn.Module):
    """Pre-norm MBConv: BN, 1x1 expansion to 4 x the output width (stride 2 when downsampling), 3x3
    depthwise, SE, 1x1 projection, each conv but the last followed by BN and GELU; the shortcut is
    Proj(Pool(x)) when downsampling."""

    def __init__(self, in_channels, out_channels, downsample, drop_path=0.0):
        super().__init__()
        hidden = 4 * out_channels
        stride = 2 if downsample else 1
        self.norm = nn.BatchNorm2d(in_channels)
        self.expand = ConvBNAct(in_channels, hidden, kernel_size=1, stride=stride, activation=nn.GELU)
        self.depthwise = ConvBNAct(hidden, hidden, groups=hidden, activation=nn.GELU)
        self.se = SqueezeExcite(hidden, hidden_channels=max(1, in_channels // 4), activation=F.gelu)
        self.project = nn.Conv2d(hidden, out_channels, kernel_size=1)
        self.shortcut = nn.Identity()
        if downsample:
            self.shortcut = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1),
                                          nn.Conv2d(in_channels, out_channels, kernel_size=1))
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(self.norm(x)))))
        return self.shortcut(x) + self.drop_path(y)


class RelativeTransformerBlock(nn.Module):
    """Pre-norm transformer block over a ``size`` x ``size`` map with relative attention over the
    whole map, ``out_channels / head_dim`` heads; when downsampling, attention reads the pooled map
    and maps it to ``out_channels``, and the shortcut is Proj(Pool(x))."""

    def __init__(self, in_channels, out_channels, size, head_dim, downsample, drop_path=0.0):
        super().__init__()
        num_heads = out_channels // head_dim
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if downsample else nn.Identity()
        self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if downsample else nn.Identity()
        self.norm1 = nn.LayerNorm(in_channels)
        self.attn = Attention(in_channels, num_heads, head_dim, out_dim=out_channels)
        self.relative_bias = RelativePositionBias(size, size, num_heads)
        self.norm2 = nn.LayerNorm(out_channels)
        self.mlp = Mlp(out_channels, 4 * out_channels)
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x):
        x = self.pool(x)
        tokens = x.flatten(2).transpose(1, 2)
        shortcut = self.shortcut(x).flatten(2).transpose(1, 2)
        tokens = shortcut + self.drop_path(self.attn(self.norm1(tokens), self.relative_bias()))
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return tokens.transpose(1, 2).unflatten(2, x.shape[-2:])


class CoAtNet(nn.Module):
    """``stage0`` (stem), ``stage1..4`` of ``blocks_per_stage`` blocks, global pooling, linear ``head``."""

    def __init__(self, blocks_per_stage, stage_channels, head_dim, drop_path_rate, image_size, num_classes,
                 in_channels):
        super().__init__()
        stem = nn.Sequential()
        stem.add_module('conv1', ConvBNAct(in_channels, stage_channels[0], activation=nn.GELU))
        for index in range(1, blocks_per_stage[0]):
            stem.add_module(f'conv{index + 1}', ConvBNAct(stage_channels[0], stage_channels[0], activation=nn.GELU))
        self.stage0 = stem
        rates = iter(linear_drop_rates(drop_path_rate, sum(blocks_per_stage[1:])))
        channels, size = stage_channels[0], image_size
        for index, kind in enumerate(BLOCK_TYPES):
            out_channels, size = stage_channels[index + 1], half(size)
            stage = nn.Sequential()
            for block in range(blocks_per_stage[index + 1]):
                downsample = block == 0
                if kind == 'conv':
                    unit = MBConvBlock(channels, out_channels, downsample, next(rates))
                else:
                    unit = RelativeTransformerBlock(channels, out_channels, size, head_dim, downsample, next(rates))
                stage.add_module(f'block{block + 1}', unit)
                channels = out_channels
            self.add_module(f'stage{index + 1}', stage)
        self.norm = nn.LayerNorm(channels)
        self.num_features = channels
        self.head = nn.Linear(channels, num_classes)
        initialize_transformer_weights(self)

    def forward_features(self, x):
        x = self.stage0(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        return self.stage4(x)

    def forward(self, x):
        x = self.forward_features(x).mean(dim=(2, 3))
        return self.head(self.norm(x))


def build_coatnet(arch, n_blocks, n_channels, head_dim, drop_path_rate, image_size, num_classes, in_channels):
    check_length('--n_blocks', n_blocks, 5, arch)
    check_length('--n_channels', n_channels, 5, arch)
    # the transformer stages' heads split their width
    for width in n_channels[3:5]:
        check_multiple('--n_channels', width, head_dim, '--head_dim', arch)
    return CoAtNet(list(n_blocks), list(n_channels), head_dim, float(drop_path_rate), image_size, num_classes,
                   in_channels)


COATNET_TEST_CONFIG = dict(n_blocks=[1, 1, 1, 1, 1], n_channels=[8, 8, 16, 16, 16], head_dim=8)


@register_model('coatnet_0', test_config=COATNET_TEST_CONFIG, **TRANSFORMER_RECIPE)
def coatnet_0(*, n_blocks=(2, 2, 3, 5, 2), n_channels=(64, 96, 192, 384, 768), head_dim=32, drop_path_rate=0.2,
              num_classes=10, in_channels=3, image_size=32):
    """CoAtNet-0 for CIFAR (23.6 M parameters)."""
    return build_coatnet('coatnet_0', n_blocks, n_channels, head_dim, drop_path_rate, image_size, num_classes,
                         in_channels)


@register_model('coatnet_1', test_config=COATNET_TEST_CONFIG, **TRANSFORMER_RECIPE)
def coatnet_1(*, n_blocks=(2, 2, 6, 14, 2), n_channels=(64, 96, 192, 384, 768), head_dim=32, drop_path_rate=0.3,
              num_classes=10, in_channels=3, image_size=32):
    """CoAtNet-1 for CIFAR (40.7 M parameters)."""
    return build_coatnet('coatnet_1', n_blocks, n_channels, head_dim, drop_path_rate, image_size, num_classes,
                         in_channels)


@register_model('coatnet_2', test_config=COATNET_TEST_CONFIG, **TRANSFORMER_RECIPE)
def coatnet_2(*, n_blocks=(2, 2, 6, 14, 2), n_channels=(128, 128, 256, 512, 1024), head_dim=32,
              drop_path_rate=0.5, num_classes=10, in_channels=3, image_size=32):
    """CoAtNet-2 for CIFAR (72.4 M parameters)."""
    return build_coatnet('coatnet_2', n_blocks, n_channels, head_dim, drop_path_rate, image_size, num_classes,
                         in_channels)
