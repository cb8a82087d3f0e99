"""VGG-style network from "Very Deep Convolutional Networks for Large-Scale Image Recognition"
(Simonyan and Zisserman, arXiv 1409.1556), with batch normalization (arXiv 1502.03167).

Stage i has ``n_layers[i]`` 3x3 conv(-BN)-ReLU layers of ``n_channels[i]`` channels and ends in
a 2x2 max-pool; the defaults give the 15-layer, 64-channel CIFAR variant of
hysts/pytorch_image_classification. The classifier is global average pooling and one linear
layer: on 32x32 inputs the last map is 1x1, so this equals hysts' flatten + linear.
"""
import torch.nn as nn

from models.common import ClassifierHead, StagedNetwork, conv3x3, initialize_weights
from models.registry import ModelConfigError, register_model


def make_vgg_stage(in_channels, out_channels, n_layers, use_bn):
    """conv1[-bn1]-relu1 ... convN[-bnN]-reluN, pool; every child has its own name."""
    stage = nn.Sequential()
    for index in range(1, n_layers + 1):
        if use_bn:
            stage.add_module(f'conv{index}', conv3x3(in_channels, out_channels))
            stage.add_module(f'bn{index}', nn.BatchNorm2d(out_channels))
        else:
            stage.add_module(f'conv{index}', nn.Conv2d(in_channels, out_channels, 3, padding=1))
        stage.add_module(f'relu{index}', nn.ReLU(inplace=True))
        in_channels = out_channels
    # ceil_mode: odd sizes round up, so 28x28 inputs go 14-7-4-2-1 instead of collapsing to 0
    stage.add_module('pool', nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
    return stage


class VGG(StagedNetwork):
    """Stages of 3x3 convolutions separated by max-pooling, then a linear classifier."""

    def __init__(self, n_channels, n_layers, use_bn, num_classes, in_channels):
        super().__init__()
        channels = in_channels
        for index, (out_channels, layers) in enumerate(zip(n_channels, n_layers)):
            self.add_module(f'stage{index + 1}', make_vgg_stage(channels, out_channels, layers, use_bn))
            channels = out_channels
        self.num_stages = len(n_channels)
        self.num_features = channels
        self.head = ClassifierHead(channels, num_classes)
        initialize_weights(self)

    def forward_features(self, x):
        return self.forward_stages(x)


@register_model('vgg', test_config=dict(n_channels=[4, 8, 8, 16, 16], n_layers=[1, 1, 1, 1, 1]),
                epochs=160, batch_size=128, base_lr=0.1, weight_decay=1e-4, scheduler='multistep',
                milestones=[80, 120], lr_decay=0.1)
def vgg(*, n_channels=(64, 128, 256, 512, 512), n_layers=(2, 2, 3, 3, 3), use_bn=True,
        num_classes=10, in_channels=3):
    """VGG with ``n_layers[i]`` convs of ``n_channels[i]`` channels in stage i."""
    if len(n_channels) != len(n_layers):
        raise ModelConfigError(
            f'--n_channels {list(n_channels)}: vgg needs one entry per stage, as many as '
            f'--n_layers {list(n_layers)} ({len(n_channels)} != {len(n_layers)})')
    return VGG(list(n_channels), list(n_layers), bool(use_bn), num_classes, in_channels)
