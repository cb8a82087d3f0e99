"""MobileNet (v1) from "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications" (Howard et al., arXiv 1704.04861).

Table 1: a 3x3 convolution of 32 channels, then thirteen depthwise separable layers (3x3 depthwise
conv-BN-ReLU, 1x1 pointwise conv-BN-ReLU) of 64, 128, 128, 256, 256, 512 (x6) and 1024 (x2)
channels, average pooling and the classifier; 4.2 M parameters with 1000 classes, 3.2 M with 10.
``width_multiplier`` is the paper's alpha (section 3.3): every width times alpha.

CIFAR strides as kuangliu/pytorch-cifar's MobileNet, which the CIFAR tricks collection trains:
stride 1 in the stem and in the 64-channel layer, 2 where the width doubles, so a 32x32 image
ends in a 2x2 map (the paper downsamples 32 times). The layers are ``stage1..13``.
"""
import torch.nn as nn

from models.common import ClassifierHead, ConvBNAct, StagedNetwork, initialize_weights, scale_widths
from models.registry import CNN_RECIPE, register_model

STEM_CHANNELS = 32
# (channels, stride) of the depthwise separable layers
LAYERS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1)]


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU (Fig. 3)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.depthwise = ConvBNAct(in_channels, in_channels, stride=stride, groups=in_channels)
        self.pointwise = ConvBNAct(in_channels, out_channels, kernel_size=1)


class MobileNet(StagedNetwork):
    """Stem conv-BN-ReLU, depthwise separable layers ``stage1..N``, global pooling, linear."""

    def __init__(self, layers, stem_channels, num_classes, in_channels):
        super().__init__()
        self.stem = ConvBNAct(in_channels, stem_channels)
        channels = self.add_stages(DepthwiseSeparable, stem_channels, [width for width, _ in layers],
                                   [1] * len(layers), [stride for _, stride in layers])
        self.num_features = channels
        self.head = ClassifierHead(channels, num_classes)
        initialize_weights(self)

    def forward_features(self, x):
        return self.forward_stages(self.stem(x))


@register_model('mobilenet', test_config=dict(width_multiplier=0.125), **CNN_RECIPE)
def mobilenet(*, width_multiplier=1.0, num_classes=10, in_channels=3):
    """MobileNet-``width_multiplier`` for CIFAR (3.2 M parameters at 1.0)."""
    widths = scale_widths([width for width, _ in LAYERS], width_multiplier)
    stem_channels, = scale_widths([STEM_CHANNELS], width_multiplier)
    return MobileNet(list(zip(widths, [stride for _, stride in LAYERS])), stem_channels, num_classes, in_channels)
