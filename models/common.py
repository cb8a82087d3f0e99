"""Building blocks shared by the model families."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import ModelConfigError


def conv3x3(in_channels, out_channels, stride=1, groups=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1,
                     groups=groups, bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def blocks_per_stage(depth, layers_per_block, n_stages=3, extra_layers=2, arch='', flag='--depth'):
    """Solve the papers' depth arithmetic ``depth = n_stages * layers_per_block * n + extra``.

    E.g. a CIFAR ResNet with basic blocks: depth = 3 * 2 * n + 2 = 6n + 2.
    """
    per_n = n_stages * layers_per_block
    n, remainder = divmod(depth - extra_layers, per_n)
    if remainder or n < 1:
        raise ModelConfigError(
            f'{flag} {depth}: {arch} needs depth = {per_n}n+{extra_layers} with n >= 1 '
            f'(e.g. {per_n + extra_layers}, {2 * per_n + extra_layers}, {3 * per_n + extra_layers})')
    return n


def initialize_weights(model):
    """Kaiming-normal (fan_out) convolutions, unit BN scale, zero biases (arXiv 1502.01852)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation gate (Hu et al., arXiv 1709.01507)."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.relu(self.fc1(scale), inplace=True)
        scale = torch.sigmoid(self.fc2(scale))
        return x * scale


class ClassifierHead(nn.Module):
    """Global average pooling followed by a linear layer; works for any input size."""

    def __init__(self, in_features, num_classes):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def check_positive_int(flag, value, arch):
    """Raise ModelConfigError, message starting with ``flag``, unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f'{flag} {value}: {arch} needs a positive integer')


def check_choice(flag, value, choices, arch):
    """Raise ModelConfigError, message starting with ``flag``, unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ModelConfigError(f'{flag} {value}: {arch} accepts {" or ".join(map(str, choices))}')


def residual_blocks_per_stage(depth, block_type, arch):
    """Blocks per stage of a 3-stage CIFAR ResNet (arXiv 1512.03385, 1603.05027).

    Basic blocks have 2 weighted layers, bottlenecks 3; with the stem conv and the
    classifier: depth = 6n+2 (basic) or 9n+2 (bottleneck).
    """
    check_choice('--block_type', block_type, ('basic', 'bottleneck'), arch)
    check_positive_int('--depth', depth, arch)
    layers_per_block = 2 if block_type == 'basic' else 3
    return blocks_per_stage(depth, layers_per_block, arch=f'{arch} with {block_type} blocks')
