"""Tests for the models of the CIFAR tricks collection (SPEC section 6): transformers sized for 32x32
and modern CNNs with CIFAR stems. Parameter counts against the other toolkit's table and code or the
papers' stated configurations, and the mechanisms the papers describe: shifted-window masks, relative
position biases, MobileViT's unfolding, stochastic depth's coins and test-time scaling, the dual path
split, and the CIFAR sizing of every transformer on 32x32 and 28x28 inputs.
"""
import math

import pytest
import torch

import models
from models.common import RelativePositionBias
from models.mobilevit import fold, unfold
from models.stochastic_depth import StochasticDepthBlock
from models.swin import SwinBlock, shifted_window_mask, stage_windows, window_merge, window_partition


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def build_on_meta(arch, **kwargs):
    with torch.device('meta'):
        return models.create_model(arch, **kwargs)


def mib_to_parameters(mib):
    """The CIFAR tricks README lists 'weight:M', the MiB of the float32 state_dict: parameters and
    BN buffers at 4 bytes each (its ViT, 12,470,026 parameters when built from its code, is 47.57 MiB)."""
    return mib * 2 ** 20 / 4


TOOLKIT = 'CIFAR tricks README table (pprp/pytorch-cifar-tricks), weight:M in MiB of float32 weights'
KUANGLIU = 'kuangliu/pytorch-cifar, copied by the CIFAR tricks collection (lib/models/cnn), counted from its code'

# (arch, build arguments, reference parameter count, what is counted, source). The toolkit's
# table counts the state_dict (buffers too); the papers count ImageNet networks with 1000 classes,
# which the builders reproduce with num_classes=1000 (and image_size/patch_size/window_size where
# the paper's network depends on them).
REFERENCES = [
    # transformers
    ('vit', {}, mib_to_parameters(47.6), 'state', TOOLKIT),
    ('cvt', {}, mib_to_parameters(75), 'state', TOOLKIT),
    ('swin_t', {}, mib_to_parameters(104), 'state', TOOLKIT),
    ('swin_s', {}, mib_to_parameters(184), 'state', TOOLKIT),
    ('mobilevit_s', {}, mib_to_parameters(19.2), 'state', TOOLKIT),
    ('mobilevit_xs', {}, mib_to_parameters(7.78), 'state', TOOLKIT),
    ('mobilevit_s', dict(num_classes=1000), 5.6e6, 'params', 'arXiv 2110.02178 Table 1 (MobileViT-S)'),
    ('mobilevit_xs', dict(num_classes=1000), 2.3e6, 'params', 'arXiv 2110.02178 Table 1 (MobileViT-XS)'),
    ('mobilevit_xxs', dict(num_classes=1000), 1.3e6, 'params', 'arXiv 2110.02178 Table 1 (MobileViT-XXS)'),
    ('coatnet_0', dict(num_classes=1000, image_size=224), 25e6, 'params', 'arXiv 2106.04803 Table 5 (CoAtNet-0)'),
    ('coatnet_1', dict(num_classes=1000, image_size=224), 42e6, 'params', 'arXiv 2106.04803 Table 5 (CoAtNet-1)'),
    ('coatnet_2', dict(num_classes=1000, image_size=224), 75e6, 'params', 'arXiv 2106.04803 Table 5 (CoAtNet-2)'),
    ('cvt', dict(num_classes=1000), 20e6, 'params', 'arXiv 2103.15808 Table 3 (CvT-13)'),
    ('swin_t', dict(num_classes=1000, image_size=224, patch_size=4, window_size=7), 28e6, 'params',
     'arXiv 2103.14030 Table 1 (Swin-T)'),
    ('swin_s', dict(num_classes=1000, image_size=224, patch_size=4, window_size=7), 50e6, 'params',
     'arXiv 2103.14030 Table 1 (Swin-S)'),
    # CNNs
    ('resnet18', dict(num_classes=1000), 11.7e6, 'params', 'arXiv 1512.03385 Table 1 / torchvision (ResNet-18)'),
    ('resnet34', dict(num_classes=1000), 21.8e6, 'params', 'arXiv 1512.03385 / torchvision (ResNet-34)'),
    ('resnet50', dict(num_classes=1000), 25.6e6, 'params', 'arXiv 1512.03385 / torchvision (ResNet-50)'),
    ('preact_resnet18', {}, 11_171_146, 'params', KUANGLIU + ' (PreActResNet18)'),
    ('senet18', {}, 11_260_354, 'params', KUANGLIU + ' (SENet18)'),
    ('regnetx_200mf', dict(num_classes=1000), 2.7e6, 'params', 'arXiv 2003.13678 Table (RegNetX-200MF)'),
    ('regnety_400mf', dict(num_classes=1000), 4.3e6, 'params', 'arXiv 2003.13678 Table (RegNetY-400MF)'),
    ('densenet121', dict(num_classes=1000), 8.0e6, 'params', 'arXiv 1608.06993 (DenseNet-121 on ImageNet)'),
    ('dla', {}, 16_291_386, 'params', KUANGLIU + ' (DLA)'),
    ('googlenet', dict(num_classes=1000), 6.8e6, 'params', 'arXiv 1409.4842 Table 1 (sum of its params column)'),
    ('efficientnet_b0', dict(num_classes=1000), 5.3e6, 'params', 'arXiv 1905.11946 Table 2 (EfficientNet-B0)'),
    ('mobilenet', dict(num_classes=1000), 4.2e6, 'params', 'arXiv 1704.04861 Table 8 (1.0 MobileNet-224)'),
    ('mobilenetv2', dict(num_classes=1000), 3.4e6, 'params', 'arXiv 1801.04381 Table 4 (MobileNetV2 1.0)'),
    ('dpn26', {}, 11_574_842, 'params', KUANGLIU + ' (DPN26)'),
    ('dpn92', dict(num_classes=1000), 37.7e6, 'params', 'arXiv 1707.01629 Table 2 (DPN-92)'),
    ('resnet_stochastic_depth', {}, 1.7e6, 'params', 'arXiv 1603.09382 trains the 110-layer ResNet of '
                                                     'arXiv 1512.03385 Table 6 (1.7 M)'),
]


@pytest.mark.parametrize('arch, kwargs, reference, counted, source', REFERENCES,
                         ids=[f'{a}-{int(r)}' for a, _, r, _, _ in REFERENCES])
def test_parameter_count_within_5_percent_of_reference(arch, kwargs, reference, counted, source):
    model = build_on_meta(arch, **kwargs)
    if counted == 'state':
        count = sum(value.numel() for value in model.state_dict().values())
    else:
        count = count_parameters(model)
    assert abs(count / reference - 1) <= 0.05, f'{arch}: {count:,} vs {reference:,.0f} ({source})'


# kuangliu/pytorch-cifar's networks, which the CIFAR tricks collection copies: same layers, same count
EXACT_KUANGLIU = {'resnet18': 11_173_962, 'resnet34': 21_282_122, 'resnet50': 23_520_842,
                  'densenet121': 6_956_298, 'dla': 16_291_386, 'dpn26': 11_574_842, 'dpn92': 34_236_634}


@pytest.mark.parametrize('arch', sorted(EXACT_KUANGLIU))
def test_cifar_stem_cnns_match_the_reference_code_exactly(arch):
    assert count_parameters(build_on_meta(arch)) == EXACT_KUANGLIU[arch]


# ---------------------------------------------------------------- CIFAR sizing of the transformers

@pytest.mark.parametrize('size', [32, 28])
def test_transformer_feature_maps_for_small_images(size):
    small = dict(image_size=size, in_channels=1 if size == 28 else 3)
    vit = models.create_model('vit', **small, **models.get_test_config('vit'))
    assert vit.pos_embed.shape[1] == (size // 4) ** 2 + 1
    coatnet = models.create_model('coatnet_0', **small, **models.get_test_config('coatnet_0'))
    # S0 keeps the resolution: the transformer stages see image/8 and image/16 (rounded up)
    assert coatnet.stage3.block1.relative_bias.height == math.ceil(size / 8)
    assert coatnet.stage4.block1.relative_bias.height == math.ceil(size / 16)
    features = coatnet.forward_features(torch.randn(2, small['in_channels'], size, size))
    assert features.shape[-2:] == (math.ceil(size / 16),) * 2
    swin = models.create_model('swin_t', **small, **models.get_test_config('swin_t'))
    # 28x28 is padded to 32x32: maps 16, 8, 4, 2; windows of 4, shifted by 2 in every second block where
    # the map is larger than the window, else as large as the map and not shifted
    assert stage_windows(size, patch_size=2, window_size=4, arch='swin_t') == [(4, 2), (4, 2), (4, 0), (2, 0)]
    assert (swin.stage1.block1.shift, swin.stage1.block2.shift, swin.stage4.block1.window) == (0, 2, 2)
    assert swin.forward_features(torch.randn(2, small['in_channels'], size, size)).shape[1:3] == (2, 2)


def test_swin_builds_the_papers_network_at_224():
    assert stage_windows(224, patch_size=4, window_size=7, arch='swin_t') == [(7, 3)] * 3 + [(7, 0)]


def test_swin_window_must_divide_the_feature_maps():
    with pytest.raises(models.ModelConfigError, match=r'^--window_size 3: swin_t needs a window that divides'):
        models.create_model('swin_t', window_size=3, **{k: v for k, v in models.get_test_config('swin_t').items()})


def test_vit_patch_must_divide_the_image():
    with pytest.raises(models.ModelConfigError, match=r'^--patch_size 5: vit needs a divisor of the image size \(32\)'):
        models.create_model('vit', patch_size=5, **models.get_test_config('vit'))
    with pytest.raises(models.ModelConfigError, match=r'^--embed_dim 10: vit needs a multiple of --num_heads \(4\)'):
        models.create_model('vit', embed_dim=10, num_heads=4, depth=1)


# ---------------------------------------------------------------- Swin: shifted windows

def test_window_partition_and_merge_are_inverse():
    x = torch.randn(2, 8, 12, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2, 6, 16, 3)
    torch.testing.assert_close(windows[0, 1].reshape(4, 4, 3), x[0, :4, 4:8])  # row-major windows
    torch.testing.assert_close(window_merge(windows, 8, 12), x)


def test_shifted_window_attention_never_crosses_the_cyclic_wrap():
    """After the cyclic shift, the bottom-right window holds the image's corners; the masks let
    each token attend only within its own region, so the output at the top-left pixel depends on
    the top-left shift x shift square of the input alone (section 3.2, Fig. 4)."""
    torch.manual_seed(0)
    window, shift, side = 4, 2, 8
    block = SwinBlock(dim=4, num_heads=1, window=window, shift=shift).double()
    x = torch.randn(1, side, side, 4, dtype=torch.float64, requires_grad=True)
    block(x)[0, 0, 0].sum().backward()
    # masked logits are -100 (the authors' value), so their weight is exp(-100), not exactly 0
    depends = x.grad[0].abs().sum(-1) > 1e-20
    expected = torch.zeros(side, side, dtype=torch.bool)
    expected[:shift, :shift] = True
    assert torch.equal(depends, expected)
    # a token in the middle sees its whole shifted window: rows and columns 2..5
    x.grad = None
    block(x)[0, 3, 3].sum().backward()
    depends = x.grad[0].abs().sum(-1) > 1e-20
    expected = torch.zeros(side, side, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(depends, expected)


def test_shifted_window_mask_blocks_pairs_from_different_regions():
    mask = shifted_window_mask(8, 8, window=4, shift=2, device='cpu')
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region
    assert torch.all(mask.diagonal(dim1=1, dim2=2) == 0)  # a token always sees itself
    # the bottom-right window holds four 2x2 regions: each token sees 4 of the 16
    assert torch.all((mask[3] == 0).sum(-1) == 4)


def test_relative_position_bias_depends_on_the_offset_only():
    bias = RelativePositionBias(3, 4, num_heads=2)
    with torch.no_grad():
        bias.table.copy_(torch.randn_like(bias.table))
    table = bias()
    assert table.shape == (2, 12, 12)
    coords = [(r, c) for r in range(3) for c in range(4)]
    by_offset = {}
    for i, (ri, ci) in enumerate(coords):
        for j, (rj, cj) in enumerate(coords):
            by_offset.setdefault((ri - rj, ci - cj), []).append(table[:, i, j])
    assert len(by_offset) == (2 * 3 - 1) * (2 * 4 - 1)
    for values in by_offset.values():
        assert all(torch.equal(value, values[0]) for value in values)
    assert len(torch.unique(table[0])) == len(by_offset)


# ---------------------------------------------------------------- MobileViT

def test_mobilevit_unfold_groups_pixels_at_the_same_position_of_each_patch():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = unfold(x)
    assert tokens.shape == (2 * 4, 6, 3)  # P = 4 sequences per image, N = 2 x 3 patches, d = 3
    # sequence 1 of image 0: the top-right pixel of every 2x2 patch, patches in row-major order
    torch.testing.assert_close(tokens[1, :, 0], x[0, 0, 0::2, 1::2].flatten())
    torch.testing.assert_close(fold(tokens, x.shape), x)


def test_mobilevit_odd_maps_are_resized_for_the_transformer():
    config = models.get_test_config('mobilevit_xxs')
    model = models.create_model('mobilevit_xxs', in_channels=1, image_size=28, **config)
    captured = []
    model.stage3.mobilevit.transformer.register_forward_hook(lambda m, i, o: captured.append(i[0].shape))
    model(torch.randn(2, 1, 28, 28))
    # stage 3 sees 7x7 (28 / 2 / 2), resized to 8x8: 4 x 2 sequences of 16 patches
    assert captured == [torch.Size([8, 16, 8])]


# ---------------------------------------------------------------- stochastic depth

def test_stochastic_depth_skips_whole_branches_in_training_and_scales_them_in_eval():
    torch.manual_seed(0)
    block = StochasticDepthBlock(4, 4, stride=1, drop_rate=0.25).double()
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    block.eval()
    with torch.no_grad():
        expected = torch.relu(x + 0.75 * block.residual(x))
        torch.testing.assert_close(block(x), expected)
        block.train()
        outputs = [block(x) for _ in range(400)]
    skipped = sum(torch.equal(out, torch.relu(x)) for out in outputs)
    # one coin per mini-batch: the whole batch keeps or skips the branch, a quarter of the time
    assert all(torch.equal(out, torch.relu(x)) or not torch.isclose(out, torch.relu(x)).all() for out in outputs)
    assert abs(skipped / 400 - 0.25) < 0.07


def test_stochastic_depth_rates_decay_linearly_to_the_last_block():
    model = build_on_meta('resnet_stochastic_depth')
    rates = [block.drop_rate for stage in (model.stage1, model.stage2, model.stage3) for block in stage]
    assert len(rates) == 54
    assert rates[0] == pytest.approx(0.5 / 54) and rates[-1] == pytest.approx(0.5)
    assert all(b - a == pytest.approx(0.5 / 54) for a, b in zip(rates, rates[1:]))
    # parameter-free shortcuts, as the authors' code (option A): only convolutions, BN and the head
    assert not any('shortcut' in name for name, _ in model.named_parameters())


# ---------------------------------------------------------------- CNN structure

def test_dual_path_block_adds_residual_and_appends_dense_channels():
    torch.manual_seed(0)
    model = models.create_model('dpn26', n_blocks=[2, 1, 1, 1], width_multiplier=0.125, cardinality=4)
    first, second = model.stage1.block1, model.stage1.block2
    residual, dense = 32, 2  # 256 and 16 at width 1/8
    x = torch.randn(2, 8, 8, 8)
    y = first(x)
    assert y.shape[1] == residual + 2 * dense  # the projection's dense channels, then the new ones
    z = second(y)
    assert z.shape[1] == residual + 3 * dense
    # the dense path keeps the earlier channels as they were (before the final ReLU, which they passed already)
    torch.testing.assert_close(z[:, residual:residual + 2 * dense], y[:, residual:])
    # the last stage: residual 256 plus (1 block + 2) x 16 dense channels... of which 2 x 16 from one block
    assert model.num_features == 256 + 2 * 16
