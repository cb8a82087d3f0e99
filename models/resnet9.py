"""ResNet-9, the fast CIFAR-10 network of the DAWNBench line of work.

David Page, "How to train your ResNet" (myrtle.ai blog series, 2018, part 4 "Architecture";
no arXiv version): the network behind 94% CIFAR-10 test accuracy in 24 epochs (79 s on one V100).
"""
import torch.nn as nn
import torch.nn.functional as F

from models.common import conv3x3, initialize_weights
from models.registry import ModelConfigError, register_model

# Page scales the logits by 1/8, keeping them small at initialization (his tuned value).
HEAD_SCALE = 0.125


def conv_bn_relu(in_channels, out_channels):
    """conv3x3 (no bias) - BN - ReLU."""
    layers = nn.Sequential()
    layers.add_module('conv', conv3x3(in_channels, out_channels))
    layers.add_module('bn', nn.BatchNorm2d(out_channels))
    layers.add_module('relu', nn.ReLU(inplace=True))
    return layers


class Residual(nn.Module):
    """``x + f(x)`` where ``f`` is two conv-BN-ReLU layers of the same width."""

    def __init__(self, channels):
        super().__init__()
        self.block1 = conv_bn_relu(channels, channels)
        self.block2 = conv_bn_relu(channels, channels)

    def forward(self, x):
        return x + self.block2(self.block1(x))


class ResNet9(nn.Module):
    """prep, then three stages of conv-BN-ReLU + 2x2 max-pool (residual after stages 1 and 3),
    global max-pool and a bias-free linear layer scaled by ``HEAD_SCALE``.

    ``stage1..3`` are Page's layer1..3; with ``base_channels=64`` widths are 64-128-256-512.
    """

    def __init__(self, base_channels=64, num_classes=10, in_channels=3):
        super().__init__()
        widths = [base_channels * 2 ** index for index in range(4)]
        self.prep = conv_bn_relu(in_channels, widths[0])
        for index in range(3):
            stage = nn.Sequential()
            stage.add_module('conv', conv_bn_relu(widths[index], widths[index + 1]))
            stage.add_module('pool', nn.MaxPool2d(2))
            if index != 1:
                stage.add_module('residual', Residual(widths[index + 1]))
            self.add_module(f'stage{index + 1}', stage)
        self.fc = nn.Linear(widths[3], num_classes, bias=False)
        self.num_features = widths[3]
        initialize_weights(self)

    def forward_features(self, x):
        x = self.prep(x)
        x = self.stage1(x)
        x = self.stage2(x)
        return self.stage3(x)

    def forward(self, x):
        # global max-pool: Page's MaxPool2d(4) on the 4x4 map of a 32x32 input, for any size
        x = F.adaptive_max_pool2d(self.forward_features(x), 1).flatten(1)
        return self.fc(x) * HEAD_SCALE


@register_model('resnet9', epochs=24, batch_size=512, base_lr=0.4, weight_decay=5e-4,
                momentum=0.9, nesterov=True, scheduler='linear', warmup_epochs=5,
                warmup_method='linear', warmup_start_factor=0.0, lr_min=0.0,
                use_cutout=True, cutout_size=8)
def resnet9(*, base_channels=64, num_classes=10, in_channels=3):
    """ResNet-9 (Page's DAWNBench network, about 6.57 M parameters at ``base_channels=64``).

    Training defaults are Page's published recipe restated for a batch-mean loss: 24 epochs,
    batch 512, SGD with Nesterov momentum 0.9, lr rising linearly from 0 to 0.4 over 5 epochs
    and falling linearly to 0 at epoch 24, 8x8 Cutout on top of pad-4 crop and flip. Page sums
    the loss over the batch and uses lr 0.4 / 512 with weight decay 5e-4 * 512; for SGD that
    is the same update as lr 0.4 and weight decay 5e-4 on the batch-mean loss, which is what
    ``main.py`` computes, so those are the values here.
    """
    if base_channels < 1:
        raise ModelConfigError(f'--base_channels {base_channels}: must be a positive integer')
    return ResNet9(base_channels=base_channels, num_classes=num_classes, in_channels=in_channels)
