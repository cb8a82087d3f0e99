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


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of ``num_splits`` ghost batches.

    Ghost batch norm (Hoffer et al., arXiv 1705.08741), as David Page used it at batch 512 with 16
    splits ("How to train your ResNet 8: Bag of tricks", myrtle.ai; cifar10-fast's
    ``GhostBatchNorm``): in training, the batch of N images is cut into ``num_splits`` consecutive
    groups of N / num_splits and each group is normalized with its own mean and variance, i.e.
    with the noisier statistics of a small batch, which regularize. Everything else (the
    convolutions, the loss, the backward pass) still runs once on the whole batch.

    Running statistics: Page kept one running mean and variance per split, each updated with
    ``momentum`` as BatchNorm2d does, and averaged them over the splits when switching to eval. The
    update is linear, so that average equals one running buffer updated with the mean over splits
    of the per-split statistics (unbiased variances), which is what this layer keeps: its
    state_dict is BatchNorm2d's. In eval the running statistics are used, like BatchNorm2d; with
    ``num_splits=1`` the layer is BatchNorm2d. Page reshaped the batch so that image i went to split
    i % num_splits; consecutive groups are the same thing for a shuffled batch.

    Unlike ``main.py --subdivision k``, which splits the batch at the trainer (k forward and
    backward passes, gradients accumulated, the running statistics updated k times per step), the
    split here is inside each BN layer of one forward pass: the convolutions keep the whole batch.
    Outputs and gradients of the two agree when the groups are the same (``--subdivision`` uses
    consecutive chunks too); the running statistics do not (one update per step here).

    The batch must divide into ``num_splits`` equal groups; otherwise a :class:`ModelConfigError`
    names ``--ghost_bn_splits`` and ``--batch_size``.
    """

    def __init__(self, num_features, num_splits=1, **kwargs):
        super().__init__(num_features, **kwargs)
        check_positive_int('--ghost_bn_splits', num_splits, 'ghost batch norm')
        self.num_splits = num_splits

    def extra_repr(self):
        return f'{super().extra_repr()}, num_splits={self.num_splits}'

    def forward(self, x):
        use_batch_stats = self.training or self.running_mean is None
        if self.num_splits == 1 or not use_batch_stats:
            return super().forward(x)
        self._check_input_dim(x)
        batch = x.shape[0]
        if batch % self.num_splits:
            raise ModelConfigError(
                f'--ghost_bn_splits {self.num_splits}: a batch of {batch} images does not split into '
                f'{self.num_splits} equal ghost batches; use a --batch_size (divided by --subdivision) '
                f'that is a multiple of {self.num_splits}')
        groups = x.unflatten(0, (self.num_splits, batch // self.num_splits))
        count = groups[0].numel() // self.num_features
        if count < 2:
            raise ValueError(f'ghost batch norm: expected more than 1 value per channel in each of the '
                             f'{self.num_splits} ghost batches when training, got input size {tuple(x.shape)}')
        # statistics in float32 or better also under autocast, as BatchNorm2d computes them
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        var, mean = torch.var_mean(groups.to(stats_dtype), dim=(1, 3, 4), correction=0)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var * (count / (count - 1)))
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        scale = scale.to(x.dtype)[:, None, :, None, None]
        shift = shift.to(x.dtype)[:, None, :, None, None]
        return torch.addcmul(shift, groups, scale).flatten(0, 1)

    @torch.no_grad()
    def _update_running_stats(self, mean, unbiased_var):
        self.num_batches_tracked.add_(1)
        # momentum=None: cumulative average, as in BatchNorm2d
        factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
        self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.mean(0).to(self.running_var.dtype), factor)


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
