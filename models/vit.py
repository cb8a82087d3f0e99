"""Vision Transformer from "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(Dosovitskiy et al., arXiv 2010.11929), sized for 32x32 images.

The image is cut into (image_size / patch_size)^2 patches (patch 4: an 8x8 grid on CIFAR, 7x7 on
28x28 digits), each linearly embedded to ``embed_dim`` (a ``patch_size``-strided convolution), a
class token is prepended and a learned position embedding added (eq. 1); then ``depth`` pre-norm
transformer blocks, multi-head self-attention with ``num_heads`` heads and an MLP of ``mlp_ratio`` x
``embed_dim`` with GELU (eq. 2-3); a final LayerNorm and a linear classifier on the class token
(eq. 4). The defaults are the CIFAR tricks collection's ``vision_transformer``: 384 wide, 7 blocks,
8 heads, MLP 1536, patches of 4 pixels (12.5 M parameters; 47.6 MiB of float32 weights in its
table). Blocks are dropped per sample with rates rising to ``drop_path_rate`` (stochastic depth).
"""
import torch
import torch.nn as nn

from models.common import TransformerBlock, check_multiple, initialize_transformer_weights, linear_drop_rates
from models.registry import TRANSFORMER_RECIPE, ModelConfigError, register_model


class VisionTransformer(nn.Module):
    """patch_embed, class token and position embedding, ``blocks.block1..n``, norm, linear ``head``."""

    def __init__(self, image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, drop_path_rate,
                 num_classes, in_channels):
        super().__init__()
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, embed_dim))
        self.blocks = nn.Sequential()
        for index, rate in enumerate(linear_drop_rates(drop_path_rate, depth)):
            self.blocks.add_module(f'block{index + 1}', TransformerBlock(embed_dim, num_heads, mlp_ratio, rate))
        self.norm = nn.LayerNorm(embed_dim)
        self.num_features = embed_dim
        self.head = nn.Linear(embed_dim, num_classes)
        initialize_transformer_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        return self.norm(x)

    def forward(self, x):
        # the classifier reads the class token
        return self.head(self.forward_features(x)[:, 0])


@register_model('vit', test_config=dict(embed_dim=16, depth=1, num_heads=2), **TRANSFORMER_RECIPE)
def vit(*, patch_size=4, embed_dim=384, depth=7, num_heads=8, mlp_ratio=4.0, drop_path_rate=0.1,
        num_classes=10, in_channels=3, image_size=32):
    """ViT with patches of ``patch_size`` pixels (12.5 M parameters at the defaults)."""
    arch = 'vit'
    check_multiple('--embed_dim', embed_dim, num_heads, '--num_heads', arch)
    if image_size % patch_size:
        raise ModelConfigError(f'--patch_size {patch_size}: {arch} needs a divisor of the image size ({image_size})')
    return VisionTransformer(image_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, float(drop_path_rate),
                             num_classes, in_channels)
