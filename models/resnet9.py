"""ResNet-9, the fast CIFAR-10 network of the DAWNBench line of work.

David Page, "How to train your ResNet" (myrtle.ai blog series, 2018-2019, part 4 "Architecture";
no arXiv version): the network behind 94% CIFAR-10 test accuracy in 24 epochs (79 s on one V100).
Part 8 "Bag of tricks" adds CELU activations, ghost batch norm and a smaller output scale, among
training changes, for 94.1% in 10 epochs (26 s); those are options here (reference code: myrtle.ai's
cifar10-fast, ``bag_of_tricks.ipynb`` and ``new_dawn.py``).
"""
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import conv3x3
from models.registry import ModelConfigError, register_model

# Page scales the logits by 1/8, keeping them small at initialization (his tuned value); his
# final network, with BN scales frozen at 1, uses 1/16.
HEAD_SCALE = 0.125
# Page's CELU alpha in his final network, whose BN scales are frozen at 1. With learnable scales
# he used 0.075; freezing them at 1 instead of their mid-training value of about 1/4 rescales
# alpha by 4 (and the BN-bias lr and weight decay by 16 and 1/16) for the same function.
CELU_ALPHA = 0.3


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


def conv_bn_act(in_channels, out_channels, activation='relu', celu_alpha=CELU_ALPHA, ghost_bn_splits=1):
    """conv3x3 (no bias) - BN (ghost BN with ``ghost_bn_splits`` > 1) - ReLU or CELU."""
    layers = nn.Sequential()
    layers.add_module('conv', conv3x3(in_channels, out_channels))
    if ghost_bn_splits > 1:
        layers.add_module('bn', GhostBatchNorm2d(out_channels, num_splits=ghost_bn_splits))
    else:
        layers.add_module('bn', nn.BatchNorm2d(out_channels))
    if activation == 'celu':
        layers.add_module('act', nn.CELU(celu_alpha, inplace=True))
    else:
        layers.add_module('act', nn.ReLU(inplace=True))
    return layers


class Residual(nn.Module):
    """``x + f(x)`` where ``f`` is two conv-BN-activation layers of the same width."""

    def __init__(self, channels, **layer_kwargs):
        super().__init__()
        self.block1 = conv_bn_act(channels, channels, **layer_kwargs)
        self.block2 = conv_bn_act(channels, channels, **layer_kwargs)

    def forward(self, x):
        return x + self.block2(self.block1(x))


class ResNet9(nn.Module):
    """prep, then three stages of conv-BN-activation + 2x2 max-pool (residual after stages 1 and 3),
    global max-pool and a bias-free linear layer scaled by ``head_scale``.

    ``stage1..3`` are Page's layer1..3; with ``base_channels=64`` widths are 64-128-256-512.
    Weights keep PyTorch's default initialization, as in Page's code (cifar10-fast builds its
    ``nn.Conv2d`` and ``nn.Linear`` layers without re-initializing them): conv and linear weights
    uniform in +-1/sqrt(fan_in) (``kaiming_uniform_`` with a=sqrt(5)), BN scale 1 and bias 0.
    """

    def __init__(self, base_channels=64, num_classes=10, in_channels=3, activation='relu',
                 celu_alpha=CELU_ALPHA, ghost_bn_splits=1, head_scale=HEAD_SCALE):
        super().__init__()
        layer_kwargs = dict(activation=activation, celu_alpha=celu_alpha, ghost_bn_splits=ghost_bn_splits)
        widths = [base_channels * 2 ** index for index in range(4)]
        self.prep = conv_bn_act(in_channels, widths[0], **layer_kwargs)
        for index in range(3):
            stage = nn.Sequential()
            stage.add_module('conv', conv_bn_act(widths[index], widths[index + 1], **layer_kwargs))
            stage.add_module('pool', nn.MaxPool2d(2))
            if index != 1:
                stage.add_module('residual', Residual(widths[index + 1], **layer_kwargs))
            self.add_module(f'stage{index + 1}', stage)
        self.fc = nn.Linear(widths[3], num_classes, bias=False)
        self.num_features = widths[3]
        self.head_scale = head_scale

    def forward_features(self, x):
        x = self.prep(x)
        x = self.stage1(x)
        x = self.stage2(x)
        return self.stage3(x)

    def forward(self, x):
        # global max-pool: Page's MaxPool2d(4) on the 4x4 map of a 32x32 input, for any size
        x = F.adaptive_max_pool2d(self.forward_features(x), 1).flatten(1)
        return self.fc(x) * self.head_scale


@register_model('resnet9', test_config=dict(base_channels=4),
                epochs=24, batch_size=512, base_lr=0.4, weight_decay=5e-4, momentum=0.9, nesterov=True,
                scheduler='linear', warmup_epochs=5, warmup_method='linear', warmup_start_factor=0.0, lr_min=0.0,
                use_cutout=True, cutout_size=8)
def resnet9(*, base_channels=64, activation: Literal['relu', 'celu'] = 'relu', celu_alpha=CELU_ALPHA,
            ghost_bn_splits=1, head_scale=HEAD_SCALE, num_classes=10, in_channels=3):
    """ResNet-9 (Page's DAWNBench network, about 6.57 M parameters at ``base_channels=64``).

    Training defaults are Page's published recipe restated for a batch-mean loss: 24 epochs,
    batch 512, SGD with Nesterov momentum 0.9, lr rising linearly from 0 to 0.4 over 5 epochs
    and falling linearly to 0 at epoch 24, 8x8 Cutout on top of pad-4 crop and flip. Page sums
    the loss over the batch and uses lr 0.4 / 512 with weight decay 5e-4 * 512; for SGD that
    is the same update as lr 0.4 and weight decay 5e-4 on the batch-mean loss, which is what
    ``main.py`` computes, so those are the values here.

    The defaults build that 24-epoch network. Page's final 10-epoch network ("Bag of tricks") uses
    ``activation='celu'`` (CELU, arXiv 1704.07483, with ``celu_alpha`` 0.3), ``ghost_bn_splits=16``
    (:class:`GhostBatchNorm2d`, 32 images per group at batch 512) and ``head_scale=1/16``;
    ``run_experiments.sh fast_resnet9`` has the whole recipe. None of them changes the parameters.
    """
    if activation != 'celu' and celu_alpha != CELU_ALPHA:
        raise ModelConfigError(f'--celu_alpha {celu_alpha}: applies only with --activation celu')
    return ResNet9(base_channels=base_channels, num_classes=num_classes, in_channels=in_channels,
                   activation=activation, celu_alpha=celu_alpha, ghost_bn_splits=ghost_bn_splits,
                   head_scale=head_scale)
