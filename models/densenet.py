"""DenseNet and DenseNet-BC for CIFAR-sized inputs.

Huang, Liu, van der Maaten and Weinberger, "Densely Connected Convolutional Networks",
arXiv 1608.06993. The memory-efficient variant recomputes the concatenation, BN, ReLU and
first convolution of every layer in the backward pass, as in Pleiss et al.,
"Memory-Efficient Implementation of DenseNets", arXiv 1707.06990.

``densenet``: the paper's CIFAR networks (three dense blocks, depth 3n+4 or 6n+4 for DenseNet-BC);
``densenet121``: the ImageNet DenseNet-121 with a CIFAR stem.
"""
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.common import ClassifierHead, StagedNetwork, blocks_per_stage, conv1x1, conv3x3, initialize_weights
from models.registry import CNN_RECIPE, register_model


class DenseLayer(nn.Module):
    """Adds ``growth_rate`` channels computed from the concatenation of all earlier features.

    basic: BN-ReLU-conv3x3; bottleneck (DenseNet-B): BN-ReLU-conv1x1 to ``4 * growth_rate``,
    then BN-ReLU-conv3x3. Dropout follows every convolution when ``drop_rate > 0``.
    """

    def __init__(self, in_channels, growth_rate, bottleneck, drop_rate, memory_efficient):
        super().__init__()
        self.bottleneck = bottleneck
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient
        self.norm1 = nn.BatchNorm2d(in_channels)
        if bottleneck:
            # "we let each 1x1 convolution produce 4k feature-maps" (section 3)
            self.conv1 = conv1x1(in_channels, 4 * growth_rate)
            self.norm2 = nn.BatchNorm2d(4 * growth_rate)
            self.conv2 = conv3x3(4 * growth_rate, growth_rate)
        else:
            self.conv1 = conv3x3(in_channels, growth_rate)

    def _concat_norm_conv(self, features, update_running_stats=True):
        x = torch.cat(features, dim=1)
        norm = self.norm1
        if self.training and not update_running_stats and norm.track_running_stats:
            # Recomputation in backward: the running averages were updated once in forward and
            # must not be updated again, so update throwaway copies (passing None instead would
            # change what batch_norm saves, which the checkpoint rejects).
            x = F.batch_norm(x, norm.running_mean.clone(), norm.running_var.clone(), norm.weight,
                             norm.bias, training=True, momentum=norm.momentum or 0.0, eps=norm.eps)
        else:
            x = norm(x)
        return self.conv1(F.relu(x, inplace=True))

    def _checkpointed_concat_norm_conv(self, features):
        calls = []

        def concat_norm_conv(*inputs):
            calls.append(True)
            return self._concat_norm_conv(inputs, update_running_stats=len(calls) == 1)

        return checkpoint(concat_norm_conv, *features, use_reentrant=False)

    def forward(self, features):
        """``features``: list of tensors (stem output and every earlier layer's output)."""
        needs_grad = torch.is_grad_enabled() and any(f.requires_grad for f in features)
        if self.memory_efficient and needs_grad:
            out = self._checkpointed_concat_norm_conv(features)
        else:
            out = self._concat_norm_conv(features)
        out = F.dropout(out, p=self.drop_rate, training=self.training)
        if self.bottleneck:
            out = self.conv2(F.relu(self.norm2(out), inplace=True))
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (with compression for DenseNet-BC) then 2x2 average pooling."""

    def __init__(self, in_channels, out_channels, drop_rate):
        super().__init__()
        self.drop_rate = drop_rate
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = conv1x1(in_channels, out_channels)

    def forward(self, x):
        x = self.conv(F.relu(self.norm(x), inplace=True))
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class DenseStage(nn.Module):
    """A dense block (children ``block1..n``) optionally followed by a ``transition``."""

    def __init__(self, in_channels, n_layers, growth_rate, bottleneck, drop_rate,
                 memory_efficient, transition_channels=None):
        super().__init__()
        for index in range(n_layers):
            layer = DenseLayer(in_channels + index * growth_rate, growth_rate, bottleneck,
                               drop_rate, memory_efficient)
            self.add_module(f'block{index + 1}', layer)
        self.n_layers = n_layers
        self.out_channels = in_channels + n_layers * growth_rate
        self.transition = None
        if transition_channels is not None:
            self.transition = Transition(self.out_channels, transition_channels, drop_rate)
            self.out_channels = transition_channels

    def forward(self, x):
        # Layers take the list of earlier outputs and concatenate it themselves, so the
        # memory-efficient path can recompute that concatenation instead of storing it.
        features = [x]
        for index in range(self.n_layers):
            features.append(getattr(self, f'block{index + 1}')(features))
        x = torch.cat(features, dim=1)
        if self.transition is not None:
            x = self.transition(x)
        return x


class DenseNet(StagedNetwork):
    """Stem conv, dense stages with transitions between them, BN-ReLU, global pooling, linear.

    ``layers_per_stage[i]`` dense layers in stage i; every transition compresses to
    floor(``compression_rate`` x its input width) and halves the resolution.
    """

    def __init__(self, layers_per_stage, growth_rate, bottleneck, compression_rate, stem_channels,
                 drop_rate=0.0, memory_efficient=False, num_classes=10, in_channels=3):
        super().__init__()
        self.conv = conv3x3(in_channels, stem_channels)
        channels = stem_channels
        for index, n_layers in enumerate(layers_per_stage):
            transition_channels = None
            if index < len(layers_per_stage) - 1:
                # floor(theta * m), as in the authors' Lua code (math.floor(nChannels * reduction))
                transition_channels = max(1, int((channels + n_layers * growth_rate) * compression_rate))
            stage = DenseStage(channels, n_layers, growth_rate, bottleneck, drop_rate,
                               memory_efficient, transition_channels)
            self.add_module(f'stage{index + 1}', stage)
            channels = stage.out_channels
        self.num_stages = len(layers_per_stage)
        self.norm = nn.BatchNorm2d(channels)
        self.head = ClassifierHead(channels, num_classes)
        self.num_features = channels
        initialize_weights(self)

    def forward_features(self, x):
        x = self.conv(x)
        x = self.forward_stages(x)
        return F.relu(self.norm(x), inplace=True)


@register_model('densenet', test_config=dict(depth=10, block_type='bottleneck', growth_rate=4),
                epochs=300, batch_size=64, base_lr=0.1, weight_decay=1e-4,
                scheduler='multistep', milestones=[150, 225], lr_decay=0.1)
def densenet(*, depth=100, block_type: Literal['basic', 'bottleneck'] = 'bottleneck', growth_rate=12,
             compression_rate=0.5, drop_rate=0.0, memory_efficient=False, num_classes=10, in_channels=3):
    """DenseNet-BC (``block_type='bottleneck'``, depth = 6n+4) or DenseNet (``'basic'``, 3n+4).

    As in the paper, ``compression_rate`` (theta) applies to DenseNet-BC only: the basic
    variant is the paper's plain DenseNet, with 16 stem channels and uncompressed
    transitions. ``memory_efficient`` trades compute for memory (arXiv 1707.06990) and gives
    the same outputs, gradients and BN statistics.
    """
    bottleneck = block_type == 'bottleneck'
    # three dense blocks of n layers, 1 (basic) or 2 (bottleneck) convolutions each, plus the stem
    # conv, two transition convs and the classifier: depth = 3n+4 or 6n+4
    n_layers = blocks_per_stage(depth, 2 if bottleneck else 1, extra_layers=4,
                                arch=f'densenet with {block_type} blocks')
    if bottleneck:
        # DenseNet-BC: 2k stem channels and compressed transitions (section 3, "Implementation Details")
        stem_channels = 2 * growth_rate
    else:
        # DenseNet: 16 stem channels and no compression
        stem_channels, compression_rate = 16, 1.0
    return DenseNet([n_layers] * 3, growth_rate, bottleneck, compression_rate, stem_channels, drop_rate,
                    bool(memory_efficient), num_classes, in_channels)


@register_model('densenet121', test_config=dict(growth_rate=4, n_blocks=[1, 2, 1, 1]), **CNN_RECIPE)
def densenet121(*, growth_rate=32, n_blocks=(6, 12, 24, 16), compression_rate=0.5, drop_rate=0.0,
                memory_efficient=False, num_classes=10, in_channels=3):
    """DenseNet-121 of the paper's Table 1 (k = 32, dense blocks of 6/12/24/16 bottleneck layers,
    2 x 58 + stem + 3 transitions + classifier = 121 layers) with a CIFAR stem: one 3x3 convolution
    to 2k channels instead of the 7x7 stride-2 convolution and max-pool, as kuangliu/pytorch-cifar's
    DenseNet121 (7.0 M parameters)."""
    return DenseNet(list(n_blocks), growth_rate, True, compression_rate, 2 * growth_rate, drop_rate,
                    bool(memory_efficient), num_classes, in_channels)
