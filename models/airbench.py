"""airbench, the network of Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU"
(arXiv 2404.00498), as used by airbench94 and airbench94_muon.

A frozen 2x2 patch-whitening convolution initialized from the training images (section 3.2),
GELU, three conv-pool-BN-GELU-conv-BN-GELU groups of widths 64/256/256 whose convolutions start
as identities (dirac initialization, section 3.3), a 3x3 max-pool and a bias-free linear head
whose output is divided by its input width. BatchNorm keeps its scale fixed at 1, uses
momentum 0.6 in the paper's convention (0.4 in PyTorch's) and eps 1e-12.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import ModelConfigError, register_model


class PatchWhitening(nn.Module):
    """A ``kernel_size`` x ``kernel_size`` convolution whose filters whiten image patches.

    ``initialize_from_images(images)`` sets the filters to the eigenvectors of the patches' (uncentered)
    covariance divided by sqrt(eigenvalue + eps), followed by their negatives, so the layer has
    2 * C * k * k output channels and GELU after it keeps both signs. The filters stay frozen;
    the bias trains (main.py's ``--whiten_bias_epochs`` limits for how long).
    """

    def __init__(self, in_channels, kernel_size=2, eps=5e-4):
        super().__init__()
        self.kernel_size, self.eps = kernel_size, eps
        patch_dim = in_channels * kernel_size ** 2
        self.weight = nn.Parameter(torch.zeros(2 * patch_dim, in_channels, kernel_size, kernel_size),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(2 * patch_dim))

    @property
    def out_channels(self):
        return self.weight.shape[0]

    @torch.no_grad()
    def initialize_from_images(self, images):
        """Whitening filters from ``images`` (N, C, H, W), normalized as the network will see them."""
        k = self.kernel_size
        channels = images.shape[1]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, channels * k * k)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = eigenvectors.T / torch.sqrt(eigenvalues[:, None] + self.eps)
        filters = filters.reshape(-1, channels, k, k).to(self.weight)
        self.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias)


class BatchNormFixedScale(nn.BatchNorm2d):
    """BatchNorm with its scale frozen at 1 (only the bias trains), airbench's settings."""

    def __init__(self, channels, momentum=0.4, eps=1e-12):
        super().__init__(channels, momentum=momentum, eps=eps)
        self.weight.requires_grad_(False)


def dirac_conv3x3(in_channels, out_channels):
    """3x3 'same' convolution without bias; its first ``in_channels`` filters start as identities."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(in_channels, out_channels)])
    return conv


class ConvGroup(nn.Module):
    """conv - max-pool 2 - BN - GELU - conv - BN - GELU (pooling before the first BN)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = dirac_conv3x3(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNormFixedScale(out_channels)
        self.conv2 = dirac_conv3x3(out_channels, out_channels)
        self.norm2 = BatchNormFixedScale(out_channels)

    def forward(self, x):
        x = self.conv1(x)
        x = self.pool(x)
        x = F.gelu(self.norm1(x))
        x = self.conv2(x)
        return F.gelu(self.norm2(x))


class AirbenchNet(nn.Module):
    """whiten - GELU - group1..3 - max-pool 3 - linear x head_scale.

    ``head_scale=None`` is airbench94_muon's head: unit-variance weights, logits divided by the
    width. A number is airbench94's: PyTorch's default init and logits times that (1/9 there).
    """

    def __init__(self, widths=(64, 256, 256), num_classes=10, in_channels=3, whiten_kernel_size=2,
                 head_scale=None):
        super().__init__()
        self.whiten = PatchWhitening(in_channels, whiten_kernel_size)
        channels = [self.whiten.out_channels, *widths]
        for index in range(len(widths)):
            self.add_module(f'group{index + 1}', ConvGroup(channels[index], channels[index + 1]))
        self.pool = nn.MaxPool2d(3)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        if head_scale is None:
            with torch.no_grad():
                self.fc.weight.mul_(1 / self.fc.weight.std())  # unit-variance head, as airbench94_muon
        self.head_scale = 1 / widths[-1] if head_scale is None else head_scale
        self.num_features = widths[-1]

    def forward_features(self, x):
        x = F.gelu(self.whiten(x))
        for index in range(1, 4):
            x = getattr(self, f'group{index}')(x)
        return x

    def forward(self, x):
        # a 3x3 max-pool of the 3x3 map of a 32x32 input (31 after the 2x2 whitening conv, then
        # three halvings); global for any input size down to 28x28
        x = self.pool(self.forward_features(x)).flatten(1)
        return self.fc(x) * self.head_scale


@register_model('airbench', test_config=dict(n_channels=[8, 16, 16]), epochs=8, batch_size=2000)
def airbench(*, n_channels=(64, 256, 256), head_scale: float = None, num_classes=10, in_channels=3):
    """airbench94's network (about 1.97 M parameters at widths 64/256/256).

    The full recipes (Muon or SGD with lookahead, label smoothing 0.2, alternating flip, reflect
    translation, flip and translate TTA, whitening bias for 3 epochs) are
    ``./run_experiments.sh fast_airbench94_muon`` and ``fast_airbench94`` (``--head_scale 0.1111``).
    """
    widths = list(n_channels)
    if len(widths) != 3:
        raise ModelConfigError(f'--n_channels {widths}: airbench needs three widths, e.g. [64,256,256]')
    return AirbenchNet(tuple(widths), num_classes=num_classes, in_channels=in_channels, head_scale=head_scale)
