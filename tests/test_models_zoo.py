"""Tests for the model-zoo families: DenseNet, PyramidNet, ResNeXt, Shake-Shake and ResNet-9.

Parameter counts against the papers' tables, every SPEC section 4 configuration, forward and
backward on CPU for small configurations, configuration errors, the Shake-Shake forward and
backward coefficients, the memory-efficient DenseNet against the plain one, and ResNet-9's
options from Page's final recipe (default init, CELU, ghost batch norm, head scale).
"""
import itertools
import json
import math

import pytest
import torch
from torch import nn

import models
import optim
from conftest import run_main
from models.airbench import ConvGroup, PatchWhitening
from models.resnet9 import GhostBatchNorm2d
from models.densenet import DenseLayer
from models.resnet9 import conv_bn_act
from models.shake_shake import ShakeShakeBlock, shake_shake_mix


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def build_on_meta(arch, **kwargs):
    """Build without allocating or initializing real weights: only shapes are needed for counts."""
    with torch.device('meta'):
        return models.create_model(arch, **kwargs)


# (arch, flags, published parameter count in millions as printed in the paper). The papers
# print one decimal: a count passes within that rounding or 1%, whichever is larger.
PAPER_PARAMETER_COUNTS = [
    # DenseNet, arXiv 1608.06993, Table 2
    ('densenet', dict(depth=40, block_type='basic', growth_rate=12), 1.0),
    ('densenet', dict(depth=100, block_type='basic', growth_rate=12), 7.0),
    ('densenet', dict(depth=100, block_type='basic', growth_rate=24), 27.2),
    ('densenet', dict(depth=100, block_type='bottleneck', growth_rate=12), 0.8),
    ('densenet', dict(depth=250, block_type='bottleneck', growth_rate=24), 15.3),
    ('densenet', dict(depth=190, block_type='bottleneck', growth_rate=40), 25.6),
    # PyramidNet, arXiv 1610.02915, Table 4. The authors' Lua code gives 0.1-0.2 M more than the
    # table for every row (no width rounding rule reproduces all rows); alpha=84 is 2.7% above.
    ('pyramidnet', dict(depth=110, block_type='basic', pyramid_alpha=84), (3.8, 0.11)),
    ('pyramidnet', dict(depth=110, block_type='basic', pyramid_alpha=270), 28.3),
    ('pyramidnet', dict(depth=164, block_type='bottleneck', pyramid_alpha=270), 27.0),
    ('pyramidnet', dict(depth=272, block_type='bottleneck', pyramid_alpha=200), 26.0),
    # ResNeXt, arXiv 1611.05431, Table 7
    ('resnext', dict(depth=29, cardinality=8, base_channels=64), 34.4),
    ('resnext', dict(depth=29, cardinality=16, base_channels=64), 68.1),
    # Shake-Shake, arXiv 1705.07485, Table 1
    ('shake_shake', dict(depth=26, base_channels=32), 2.9),
    ('shake_shake', dict(depth=26, base_channels=64), 11.7),
    ('shake_shake', dict(depth=26, base_channels=96), 26.2),
]


def config_id(arch, flags):
    return arch + '-' + '-'.join(f'{value}' for value in flags.values())


@pytest.mark.parametrize('arch, flags, paper_millions', PAPER_PARAMETER_COUNTS,
                         ids=[config_id(a, f) for a, f, _ in PAPER_PARAMETER_COUNTS])
def test_parameter_count_matches_paper(arch, flags, paper_millions):
    count = count_parameters(build_on_meta(arch, **flags)) / 1e6
    if isinstance(paper_millions, tuple):
        paper_millions, tolerance = paper_millions
    else:
        tolerance = max(0.01 * paper_millions, 0.05)
    assert abs(count - paper_millions) <= tolerance, f'{count:.3f} M vs {paper_millions} M'


# Every configuration of these families in SPEC section 4, CIFAR-10 heads.
SPEC_CONFIGS = [
    ('densenet', dict(depth=100, block_type='basic', growth_rate=12)),
    ('densenet', dict(depth=100, block_type='bottleneck', growth_rate=12)),
    ('pyramidnet', dict(depth=110, block_type='basic', pyramid_alpha=84)),
    ('pyramidnet', dict(depth=110, block_type='basic', pyramid_alpha=270)),
    ('pyramidnet', dict(depth=164, block_type='bottleneck', pyramid_alpha=270)),
    ('resnext', dict(depth=29, cardinality=4, base_channels=64)),
    ('resnext', dict(depth=29, cardinality=8, base_channels=64)),
    ('shake_shake', dict(depth=26, base_channels=32)),
    ('shake_shake', dict(depth=26, base_channels=64)),
    ('shake_shake', dict(depth=26, base_channels=96)),
]


@pytest.mark.parametrize('arch, flags', SPEC_CONFIGS, ids=[config_id(a, f) for a, f in SPEC_CONFIGS])
def test_spec_configurations_build(arch, flags):
    model = build_on_meta(arch, **flags)
    assert count_parameters(model) > 0
    if arch == 'resnext':
        grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert len(grouped) == 9 and all(m.groups == flags['cardinality'] for m in grouped)
        # d x C channels in the first stage's grouped convolution, doubling per stage
        assert [m.in_channels for m in grouped[::3]] == [64 * flags['cardinality'] * 2 ** s for s in range(3)]


@pytest.mark.parametrize('flags, features', [
    (dict(depth=100, block_type='basic', growth_rate=12), 16 + 3 * 32 * 12),
    # 24 -> +16k = 216 -> 108 -> +192 = 300 -> 150 -> +192 = 342
    (dict(depth=100, block_type='bottleneck', growth_rate=12), 342),
    (dict(depth=40, block_type='bottleneck', growth_rate=12, compression_rate=1.0), 24 + 3 * 6 * 12),
])
def test_densenet_feature_width(flags, features):
    assert build_on_meta('densenet', **flags).num_features == features


@pytest.mark.parametrize('flags', [dict(depth=110, block_type='basic', pyramid_alpha=84),
                                   dict(depth=164, block_type='bottleneck', pyramid_alpha=270),
                                   dict(depth=20, block_type='basic', pyramid_alpha=7, base_channels=5)])
def test_pyramidnet_widens_additively_to_base_plus_alpha(flags):
    model = build_on_meta('pyramidnet', **flags)
    expansion = 4 if flags['block_type'] == 'bottleneck' else 1
    assert model.num_features == (flags.get('base_channels', 16) + flags['pyramid_alpha']) * expansion
    widths = [block.out_channels // expansion for stage in (model.stage1, model.stage2, model.stage3)
              for block in stage]
    steps = [b - a for a, b in zip([flags.get('base_channels', 16)] + widths, widths)]
    step = flags['pyramid_alpha'] / len(widths)
    assert all(math.floor(step) <= s <= math.ceil(step) for s in steps)


def test_resnet9_parameter_count_closed_form():
    base, classes = 64, 10
    convs = 3 * base + base * 2 * base + 2 * (2 * base) ** 2 + 2 * base * 4 * base \
        + 4 * base * 8 * base + 2 * (8 * base) ** 2
    batch_norms = 2 * (base + 3 * 2 * base + 4 * base + 3 * 8 * base)
    expected = 9 * convs + batch_norms + 8 * base * classes
    count = count_parameters(build_on_meta('resnet9'))
    assert count == expected
    assert 6.5e6 < count < 6.6e6


SMALL_CONFIGS = [
    ('densenet', dict(depth=10, block_type='basic', growth_rate=4)),
    ('densenet', dict(depth=10, block_type='bottleneck', growth_rate=4, drop_rate=0.1)),
    ('densenet', dict(depth=10, block_type='bottleneck', growth_rate=4, memory_efficient=True)),
    ('pyramidnet', dict(depth=8, block_type='basic', pyramid_alpha=8, base_channels=4)),
    ('pyramidnet', dict(depth=11, block_type='bottleneck', pyramid_alpha=8, base_channels=4)),
    ('resnext', dict(depth=11, cardinality=2, base_channels=4)),
    ('shake_shake', dict(depth=8, base_channels=4)),
    ('resnet9', dict(base_channels=8)),
]
INPUTS = [(3, 32, 10), (3, 32, 100), (1, 28, 10)]


@pytest.mark.parametrize('arch, flags', SMALL_CONFIGS, ids=[config_id(a, f) for a, f in SMALL_CONFIGS])
@pytest.mark.parametrize('in_channels, size, num_classes', INPUTS, ids=['cifar10', 'cifar100', 'mnist'])
def test_small_models_forward_backward(arch, flags, in_channels, size, num_classes):
    torch.manual_seed(0)
    model = models.create_model(arch, num_classes=num_classes, in_channels=in_channels, **flags)
    model.train()
    logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, in_channels, size, size)).shape == (3, num_classes)


def test_children_are_named_by_stage_and_block():
    for arch, flags in SMALL_CONFIGS[::2]:
        names = {name for name, _ in build_on_meta(arch, **flags).named_modules()}
        assert {'stage1', 'stage2', 'stage3'} <= names, arch
        if arch != 'resnet9':
            assert 'stage1.block1' in names and 'stage3.block1' in names, arch


@pytest.mark.parametrize('arch, flags, message_start', [
    ('densenet', dict(depth=101), '--depth 101: densenet with bottleneck blocks needs depth = 6n+4'),
    ('densenet', dict(depth=101, block_type='basic'), '--depth 101: densenet with basic blocks needs depth = 3n+4'),
    ('densenet', dict(block_type='wide'), '--block_type wide'),
    ('densenet', dict(growth_rate=0), '--growth_rate 0'),
    ('densenet', dict(compression_rate=0.0), '--compression_rate 0.0'),
    ('densenet', dict(compression_rate=1.5), '--compression_rate 1.5'),
    ('densenet', dict(drop_rate=1.0), '--drop_rate 1.0'),
    ('pyramidnet', dict(depth=21, block_type='basic'), '--depth 21: pyramidnet with basic blocks needs depth = 6n+2'),
    ('pyramidnet', dict(depth=57), '--depth 57: pyramidnet with bottleneck blocks needs depth = 9n+2'),
    ('pyramidnet', dict(block_type='preact'), '--block_type preact'),
    ('pyramidnet', dict(pyramid_alpha=-1), '--pyramid_alpha -1'),
    ('resnext', dict(depth=30), '--depth 30: resnext needs depth = 9n+2'),
    ('resnext', dict(cardinality=0), '--cardinality 0'),
    ('shake_shake', dict(depth=25), '--depth 25: shake_shake needs depth = 6n+2'),
    ('shake_shake', dict(base_channels=5), '--base_channels 5'),
    ('resnet9', dict(base_channels=0), '--base_channels 0'),
    ('resnet9', dict(depth=9), '--depth does not apply to --arch resnet9'),
    ('resnet9', dict(activation='gelu'), '--activation gelu: resnet9 needs one of relu, celu'),
    ('resnet9', dict(activation='celu', celu_alpha=0.0), '--celu_alpha 0.0: resnet9 needs a number > 0'),
    ('resnet9', dict(celu_alpha=0.075), '--celu_alpha 0.075: applies only with --activation celu'),
    ('resnet9', dict(ghost_bn_splits=0), '--ghost_bn_splits 0: resnet9 needs an integer >= 1'),
    ('resnet9', dict(head_scale=0.0), '--head_scale 0.0: resnet9 needs a number > 0'),
    ('resnet', dict(activation='celu'), '--activation does not apply to --arch resnet'),
    ('wrn', dict(celu_alpha=0.3), '--celu_alpha does not apply to --arch wrn'),
    ('airbench', dict(ghost_bn_splits=16), '--ghost_bn_splits does not apply to --arch airbench'),
    ('densenet', dict(head_scale=0.0625), '--head_scale does not apply to --arch densenet'),
    ('airbench', dict(n_channels=[64, 256]), '--n_channels [64, 256]: airbench needs three widths'),
    ('airbench', dict(n_channels=[64, 0, 256]), '--n_channels [64, 0, 256]: airbench needs a JSON list of 1 or more integers >= 1'),
    ('airbench', dict(depth=8), '--depth does not apply to --arch airbench'),
])
def test_invalid_configuration_names_the_flag(arch, flags, message_start):
    with pytest.raises(models.ModelConfigError) as error:
        models.create_model(arch, **flags)
    assert str(error.value).startswith(message_start)


# ---------------------------------------------------------------- Shake-Shake

def test_shake_mix_uses_alpha_forward_and_beta_backward():
    torch.manual_seed(0)
    branch1 = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    branch2 = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    alpha = torch.tensor([0.2, 0.7], dtype=torch.float64).view(2, 1, 1, 1)
    beta = torch.tensor([0.9, 0.4], dtype=torch.float64).view(2, 1, 1, 1)

    mixed = shake_shake_mix(branch1, branch2, alpha, beta)
    (mixed * upstream).sum().backward()

    for n, (a, b) in enumerate([(0.2, 0.9), (0.7, 0.4)]):
        torch.testing.assert_close(mixed[n], a * branch1[n] + (1 - a) * branch2[n])
        torch.testing.assert_close(branch1.grad[n], b * upstream[n])
        torch.testing.assert_close(branch2.grad[n], (1 - b) * upstream[n])


def observe_shake_coefficients(block, inputs, upstream):
    """Run ``block`` and read back, per image, the forward alpha and backward beta it used.

    alpha from the output: out - shortcut = alpha * b1 + (1 - alpha) * b2; beta from the
    gradients reaching the branches: dL/db1 = beta * dL/dout. Both are fitted per image by
    least squares, and the largest residual shows whether one value per image explains all.
    """
    captured = {}

    def capture(name):
        def hook(module, args, output):
            captured[name] = output
            if output.requires_grad:
                output.register_hook(lambda grad: captured.__setitem__(name + '_grad', grad))
        return hook

    handles = [getattr(block, name).register_forward_hook(capture(name))
               for name in ('branch1', 'branch2', 'shortcut')]
    out = block(inputs)
    (out * upstream).sum().backward()
    for handle in handles:
        handle.remove()

    dims = (1, 2, 3)
    branch1, branch2 = captured['branch1'].detach(), captured['branch2'].detach()
    mixed_minus_2 = out.detach() - captured['shortcut'].detach() - branch2
    difference = branch1 - branch2
    alpha = (mixed_minus_2 * difference).sum(dims) / (difference ** 2).sum(dims)
    beta = (captured['branch1_grad'] * upstream).sum(dims) / (upstream ** 2).sum(dims)
    view = (-1, 1, 1, 1)
    residual = max((mixed_minus_2 - alpha.view(view) * difference).abs().max().item(),
                   (captured['branch1_grad'] - beta.view(view) * upstream).abs().max().item(),
                   (captured['branch2_grad'] - (1 - beta).view(view) * upstream).abs().max().item())
    return alpha, beta, residual


FLAG_COMBINATIONS = list(itertools.product([True, False], repeat=3))


def flags_id(flags):
    forward, backward, image = flags
    return ('S' if forward else 'E') + '-' + ('S' if backward else 'E') + '-' + ('I' if image else 'B')


@pytest.mark.parametrize('shake_flags', FLAG_COMBINATIONS, ids=[flags_id(f) for f in FLAG_COMBINATIONS])
@pytest.mark.parametrize('stride', [1, 2])
def test_shake_block_coefficients_follow_flags(shake_flags, stride):
    shake_forward, shake_backward, shake_image = shake_flags
    torch.manual_seed(1)
    block = ShakeShakeBlock(2, 2 * stride, stride, shake_forward, shake_backward, shake_image).double()
    block.train()
    inputs = torch.randn(256, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(256, 2 * stride, 4 // stride, 4 // stride, dtype=torch.float64)
    alpha, beta, residual = observe_shake_coefficients(block, inputs, upstream)

    assert residual < 1e-9  # one alpha and one beta per image explain output and gradients
    for coefficient, shaken in ((alpha, shake_forward), (beta, shake_backward)):
        if not shaken:
            torch.testing.assert_close(coefficient, torch.full_like(coefficient, 0.5))
        elif shake_image:
            # independent Uniform(0, 1) per image: 256 draws
            assert coefficient.min() >= 0 and coefficient.max() <= 1
            assert abs(coefficient.mean().item() - 0.5) < 0.06
            assert abs(coefficient.std().item() - math.sqrt(1 / 12)) < 0.04
        else:
            assert coefficient.max() - coefficient.min() < 1e-9  # one value for the whole batch
            assert 0 <= coefficient[0] <= 1
    if shake_forward and shake_backward:
        # beta is drawn independently of alpha, not reused
        assert (alpha - beta).abs().max() > 0.1
        if shake_image:
            correlation = torch.corrcoef(torch.stack([alpha, beta]))[0, 1].item()
            assert abs(correlation) < 0.2


@pytest.mark.parametrize('stride', [1, 2])
def test_shake_block_eval_averages_branches(stride):
    torch.manual_seed(2)
    block = ShakeShakeBlock(4, 4 * stride, stride).double()
    block.train()
    inputs = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    block(inputs)  # move the BN running statistics away from their initial values
    block.eval()
    with torch.no_grad():
        expected = block.shortcut(inputs) + 0.5 * (block.branch1(inputs) + block.branch2(inputs))
        torch.testing.assert_close(block(inputs), expected)


def test_shake_shake_eval_is_deterministic_and_training_is_not():
    torch.manual_seed(3)
    model = models.create_model('shake_shake', depth=8, base_channels=4)
    inputs = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        model.train()
        first, second = model(inputs), model(inputs)
        assert (first - second).abs().max() > 1e-4
        model.eval()
        torch.testing.assert_close(model(inputs), model(inputs), rtol=0, atol=0)


@pytest.mark.parametrize('shake_flags', FLAG_COMBINATIONS, ids=[flags_id(f) for f in FLAG_COMBINATIONS])
def test_shake_shake_every_flag_combination_trains(shake_flags):
    shake_forward, shake_backward, shake_image = shake_flags
    torch.manual_seed(4)
    model = models.create_model('shake_shake', depth=8, base_channels=4, shake_forward=shake_forward,
                                shake_backward=shake_backward, shake_image=shake_image)
    logits = model(torch.randn(3, 3, 16, 16))
    logits.logsumexp(dim=1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_shake_shake_shortcut_second_path_sees_the_shifted_pixels():
    block = ShakeShakeBlock(1, 2, stride=2)
    shortcut = block.shortcut
    with torch.no_grad():
        shortcut.conv1.weight.fill_(1.0)
        shortcut.conv2.weight.fill_(1.0)
    shortcut.eval()  # BN with its initial statistics is the identity (up to eps)
    image = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    with torch.no_grad():
        out = shortcut(image) * math.sqrt(1 + shortcut.bn.eps)
    torch.testing.assert_close(out[0, 0], image[0, 0, ::2, ::2])
    # shifted one pixel right and down: pixel (2i - 1, 2j - 1), zero outside the image
    torch.testing.assert_close(out[0, 1], torch.tensor([[0.0, 0.0], [0.0, 5.0]]))


# ---------------------------------------------------------------- DenseNet

def densenet_pair(**flags):
    torch.manual_seed(5)
    plain = models.create_model('densenet', memory_efficient=False, **flags).double()
    efficient = models.create_model('densenet', memory_efficient=True, **flags).double()
    efficient.load_state_dict(plain.state_dict())
    return plain, efficient


@pytest.mark.parametrize('flags', [dict(depth=10, block_type='bottleneck', growth_rate=4),
                                   dict(depth=10, block_type='basic', growth_rate=4, drop_rate=0.2),
                                   dict(depth=16, block_type='bottleneck', growth_rate=3, drop_rate=0.2)])
def test_memory_efficient_densenet_matches_plain(flags):
    plain, efficient = densenet_pair(**flags)
    inputs = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    results = []
    for model in (plain, efficient):
        model.train()
        torch.manual_seed(6)  # the same dropout masks in both
        logits = model(inputs)
        logits.logsumexp(dim=1).sum().backward()
        results.append(logits)
    torch.testing.assert_close(results[0], results[1])
    for (name, p_plain), p_efficient in zip(plain.named_parameters(), efficient.parameters()):
        torch.testing.assert_close(p_plain.grad, p_efficient.grad, msg=name)
    # recomputation in backward must not update the BN running statistics a second time
    for (name, b_plain), b_efficient in zip(plain.named_buffers(), efficient.buffers()):
        torch.testing.assert_close(b_plain, b_efficient, msg=name)


def saved_activation_elements(model, inputs):
    """Elements of all tensors autograd keeps for the backward pass of one forward."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs)
    return sum(saved)


@pytest.mark.parametrize('block_type, max_ratio', [('bottleneck', 0.75), ('basic', 0.5)])
def test_memory_efficient_densenet_keeps_fewer_activations(block_type, max_ratio):
    # the concatenations grow quadratically with depth and are no longer kept; what remains
    # (per-layer outputs, the bottleneck's 4k channels) grows linearly
    plain, efficient = densenet_pair(depth=40, block_type=block_type, growth_rate=4)
    inputs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ratio = saved_activation_elements(efficient, inputs) / saved_activation_elements(plain, inputs)
    assert ratio < max_ratio


def test_dense_layer_adds_growth_rate_channels():
    layer = DenseLayer(in_channels=5, growth_rate=3, bottleneck=True, drop_rate=0.0, memory_efficient=False)
    out = layer([torch.randn(2, 2, 8, 8), torch.randn(2, 3, 8, 8)])
    assert out.shape == (2, 3, 8, 8)
    assert layer.conv1.out_channels == 12  # 4k bottleneck channels


# ---------------------------------------------------------------- airbench

def test_airbench_parameter_count():
    """airbench94 at widths 64/256/256: 1,972,792 parameters (arXiv 2404.00498 reports about 1.97 M)."""
    model = build_on_meta('airbench')
    whitening_filters, whitening_bias = 24 * 3 * 2 * 2, 24  # 2 x (3 x 2 x 2) filters: eigenvectors and negatives
    convs = 24 * 64 * 9 + 64 * 64 * 9 + 64 * 256 * 9 + 256 * 256 * 9 + 2 * 256 * 256 * 9
    bn_channels = 2 * 64 + 4 * 256
    head = 256 * 10  # no bias
    assert count_parameters(model) == whitening_filters + whitening_bias + convs + 2 * bn_channels + head == 1972792
    # trainable: conv filters + BN biases + whitening bias + head; the whitening filters and the
    # BN scales are frozen
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == convs + bn_channels + whitening_bias + head == 1971352


@pytest.mark.parametrize('in_channels, size, num_classes', INPUTS, ids=['cifar10', 'cifar100', 'mnist'])
def test_airbench_forward_backward(in_channels, size, num_classes):
    torch.manual_seed(0)
    model = models.create_model('airbench', n_channels=[8, 16, 16], num_classes=num_classes, in_channels=in_channels)
    assert model.whiten.out_channels == 2 * in_channels * 4
    model.train()
    logits = model(torch.randn(4, in_channels, size, size))
    assert logits.shape == (4, num_classes) and torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, name
    model.eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(3, in_channels, size, size))
        assert features.shape == (3, 16, 3, 3)  # 31 or 27 after the 2x2 whitening, then three halvings
        pooled = model.pool(features).flatten(1)
        assert torch.allclose(model.fc(pooled) / 16, model.fc(pooled) / model.num_features)
        assert model(torch.randn(3, in_channels, size, size)).shape == (3, num_classes)


def test_airbench_default_widths_on_both_input_shapes():
    model = models.create_model('airbench').eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model = models.create_model('airbench', num_classes=100, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 100)
    assert model.fc.bias is None and model.fc.weight.std().item() == pytest.approx(1.0, rel=1e-4)


def correlated_images(n, channels, size, scale, seed):
    """Gaussian images with strong, anisotropic neighbour-pixel correlations (so a filter with its
    rows and columns swapped does not whiten), correlated channels and a non-zero mean."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, channels, size + 2, size + 2, generator=generator, dtype=torch.float64)
    kernel = torch.tensor([[1.0, 2.0, 1.0], [0.5, 1.0, 0.5], [0.0, 0.25, 0.0]], dtype=torch.float64)
    blurred = torch.nn.functional.conv2d(noise, kernel.expand(channels, 1, 3, 3), groups=channels)
    mixing = 2 * torch.eye(channels, dtype=torch.float64) + torch.rand(channels, channels, generator=generator,
                                                                       dtype=torch.float64)
    return (scale * (torch.einsum('dc,nchw->ndhw', mixing, blurred) + 0.5)).float()


@pytest.mark.parametrize('channels, scale, eps', [(3, 1.0, 1e-6), (3, 0.02, 5e-4), (1, 0.02, 5e-4)])
def test_patch_whitening_whitens_the_patches_it_was_initialized_from(channels, scale, eps):
    images = correlated_images(64, channels, 16, scale, seed=channels)
    layer = PatchWhitening(channels, eps=eps)
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    layer.initialize_from_images(images)
    patch_dim = channels * 4
    assert layer.out_channels == 2 * patch_dim
    # the 2x2 patches' uncentered second moment, computed independently in float64
    patches = torch.nn.functional.unfold(images.double(), kernel_size=2).transpose(1, 2).reshape(-1, patch_dim)
    eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / len(patches))
    assert eigenvalues.max() / eigenvalues.min() > 10  # far from white before the layer
    with torch.no_grad():
        outputs = layer(images).double()
    first, second = outputs[:, :patch_dim], outputs[:, patch_dim:]
    assert torch.allclose(second, -first, atol=1e-5 * first.abs().max().item())
    flat = first.transpose(0, 1).reshape(patch_dim, -1)
    whitened = flat @ flat.T / flat.shape[1]
    # filters eigenvector / sqrt(lambda + eps): second moment diag(lambda / (lambda + eps)), ascending as eigh
    expected = torch.diag(eigenvalues / (eigenvalues + eps))
    assert torch.allclose(whitened, expected, atol=2e-3), (whitened - expected).abs().max()
    identity = torch.eye(patch_dim, dtype=torch.float64)
    if eps / eigenvalues.min() < 1e-4:
        assert torch.allclose(whitened, identity, atol=2e-3)
    else:  # eps comparable to the smallest eigenvalues shrinks those directions
        assert (whitened - identity).abs().max() > 0.05
    assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_airbench_convolutions_start_as_identities_and_bn_scales_are_frozen():
    torch.manual_seed(0)
    for in_channels, out_channels in ((24, 64), (16, 8)):
        group = ConvGroup(in_channels, out_channels)
        for conv in (group.conv1, group.conv2):
            assert conv.bias is None
            shared = min(conv.in_channels, conv.out_channels)
            x = torch.randn(2, conv.in_channels, 6, 6)
            with torch.no_grad():
                y = conv(x)
            assert torch.allclose(y[:, :shared], x[:, :shared], atol=1e-6)  # dirac on the first filters
            if conv.out_channels > shared:
                assert conv.weight[shared:].abs().sum() > 0  # the others keep their random init
        for norm in (group.norm1, group.norm2):
            assert not norm.weight.requires_grad and torch.equal(norm.weight, torch.ones_like(norm.weight))
            assert norm.bias.requires_grad
            assert (norm.momentum, norm.eps) == (0.4, 1e-12)
    model = models.create_model('airbench', n_channels=[8, 16, 16])
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {'whiten.weight'} | {f'group{g}.norm{n}.weight' for g in (1, 2, 3) for n in (1, 2)}


def test_airbench_training_defaults():
    defaults = models.train_defaults('airbench')
    assert (defaults['epochs'], defaults['batch_size']) == (8, 2000)


# ---------------------------------------------------------------- defaults

SPEC_TABLE = {
    'densenet': (dict(depth=100, block_type='bottleneck', growth_rate=12, compression_rate=0.5, drop_rate=0.0),
                 dict(epochs=300, batch_size=64, base_lr=0.1, weight_decay=1e-4, scheduler='multistep',
                      milestones=[150, 225], lr_decay=0.1)),
    'pyramidnet': (dict(depth=272, block_type='bottleneck', pyramid_alpha=200, base_channels=16),
                   dict(epochs=300, batch_size=128, base_lr=0.1, weight_decay=1e-4, scheduler='multistep',
                        milestones=[150, 225], lr_decay=0.1)),
    'resnext': (dict(depth=29, cardinality=8, base_channels=64),
                dict(epochs=300, batch_size=128, base_lr=0.1, weight_decay=5e-4, scheduler='multistep',
                     milestones=[150, 225], lr_decay=0.1)),
    'shake_shake': (dict(depth=26, base_channels=96, shake_forward=True, shake_backward=True, shake_image=True),
                    dict(epochs=1800, batch_size=128, base_lr=0.2, weight_decay=1e-4, scheduler='cosine',
                         lr_min=0.0)),
}


@pytest.mark.parametrize('arch', sorted(SPEC_TABLE))
def test_defaults_follow_spec_table(arch):
    model_defaults, training = SPEC_TABLE[arch]
    params = models.model_params(arch)
    assert {k: params[k] for k in model_defaults} == model_defaults
    defaults = models.train_defaults(arch)
    assert {k: defaults[k] for k in training} == training


def test_resnet9_schedule_is_pages_piecewise_linear():
    """lr 0 -> 0.4 linearly over epochs 0..5, then linearly down to 0 at epoch 24."""
    defaults = models.train_defaults('resnet9')
    assert (defaults['batch_size'], defaults['base_lr'], defaults['epochs']) == (512, 0.4, 24)
    schedule = {k: defaults[k] for k in ('scheduler', 'epochs', 'lr_min', 'warmup_epochs', 'warmup_method',
                                         'warmup_start_factor')}
    steps_per_epoch = 10

    def lr_at(epoch):
        return defaults['base_lr'] * optim.lr_factor(round(epoch * steps_per_epoch), base_lr=defaults['base_lr'],
                                                     steps_per_epoch=steps_per_epoch, **schedule)

    for epoch, expected in [(0, 0.0), (2.5, 0.2), (5, 0.4), (14.5, 0.2), (24, 0.0)]:
        assert lr_at(epoch) == pytest.approx(expected, abs=1e-9), epoch


# ---------------------------------------------------------------- ResNet-9: Page's final network

def test_resnet9_keeps_pytorch_default_init():
    """Page's code never re-initializes: conv and linear weights uniform in +-1/sqrt(fan_in)
    (torch's kaiming_uniform_ with a=sqrt(5)), BN scale 1 and bias 0. Kaiming fan_out normal, the
    other families' init, gives the convolutions 0.54 to 2.45 times this std and unbounded values."""
    torch.manual_seed(0)
    model = models.create_model('resnet9')
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 9
    for layer in layers:
        weight = layer.weight.detach()
        bound = 1 / math.sqrt(weight[0].numel())  # fan_in
        assert weight.abs().max() <= bound
        # the std of U(-b, b) is b / sqrt(3); the sample std of n >= 1728 values is within 1.1% (1 sigma)
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), layer
        if isinstance(layer, nn.Linear):
            fresh = nn.Linear(layer.in_features, layer.out_features, bias=False)
        else:
            fresh = nn.Conv2d(layer.in_channels, layer.out_channels, kernel_size=3, bias=False)
        assert weight.std().item() == pytest.approx(fresh.weight.std().item(), rel=0.1), layer
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 8
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
               for m in norms)


def test_resnet9_options_keep_parameters_and_state_dict_keys():
    plain = build_on_meta('resnet9')
    final = build_on_meta('resnet9', activation='celu', ghost_bn_splits=16, head_scale=1 / 16)
    assert count_parameters(plain) == count_parameters(final) == 6573120
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in final.state_dict().items()}
    assert sum(isinstance(m, GhostBatchNorm2d) for m in final.modules()) == 8
    assert not any(isinstance(m, GhostBatchNorm2d) for m in plain.modules())


def test_resnet9_activation_option():
    relu_model = models.create_model('resnet9', base_channels=4)
    celu_model = models.create_model('resnet9', base_channels=4, activation='celu')
    assert sum(isinstance(m, nn.ReLU) for m in relu_model.modules()) == 8
    assert not any(isinstance(m, nn.CELU) for m in relu_model.modules())
    celus = [m for m in celu_model.modules() if isinstance(m, nn.CELU)]
    assert len(celus) == 8 and not any(isinstance(m, nn.ReLU) for m in celu_model.modules())
    assert all(m.alpha == 0.3 for m in celus)
    custom = models.create_model('resnet9', base_channels=4, activation='celu', celu_alpha=0.075)
    assert {m.alpha for m in custom.modules() if isinstance(m, nn.CELU)} == {0.075}
    # same weights, different activation: different logits
    celu_model.load_state_dict(relu_model.state_dict())
    inputs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(relu_model(inputs), celu_model(inputs))


@pytest.mark.parametrize('alpha', [0.075, 0.3])
def test_celu_block_differs_from_relu_only_on_negative_pre_activations(alpha):
    torch.manual_seed(0)
    block = conv_bn_act(3, 6, activation='celu', celu_alpha=alpha).double()
    inputs = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        pre_activation = block.bn(block.conv(inputs))
        outputs = block(inputs)
    negative = pre_activation < 0
    assert negative.float().mean() > 0.3
    expected = torch.where(negative, alpha * torch.expm1(pre_activation / alpha), pre_activation)
    assert torch.allclose(outputs, expected)
    assert torch.equal(outputs[~negative], torch.relu(pre_activation)[~negative])
    assert (outputs[negative] < 0).all() and (outputs[negative] >= -alpha).all()  # ReLU gives 0 there


def ghost_and_chunk_norms(num_splits, channels=3, momentum=0.1, seed=0):
    """A GhostBatchNorm2d with random affine parameters and running statistics, and one BatchNorm2d
    per split holding the same state: Page's per-split layers."""
    torch.manual_seed(seed)
    ghost = GhostBatchNorm2d(channels, num_splits=num_splits, momentum=momentum).double()
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-1, 1)
        ghost.running_mean.uniform_(-1, 1)
        ghost.running_var.uniform_(0.5, 2)
    chunks = [nn.BatchNorm2d(channels, momentum=momentum).double() for _ in range(num_splits)]
    for norm in chunks:
        norm.load_state_dict(ghost.state_dict())
    return ghost, chunks


@pytest.mark.parametrize('num_splits, momentum', [(2, 0.1), (4, 0.1), (4, None)])
def test_ghost_batch_norm_normalizes_each_split_with_its_own_statistics(num_splits, momentum):
    ghost, chunks = ghost_and_chunk_norms(num_splits, momentum=momentum)
    for step in range(3):
        inputs = (torch.randn(4 * num_splits, 3, 5, 5, dtype=torch.float64) * 3 + step).requires_grad_()
        outputs = ghost(inputs)
        chunk_inputs = inputs.detach().clone().requires_grad_()
        expected = torch.cat([norm(part) for norm, part in zip(chunks, chunk_inputs.chunk(num_splits))])
        assert torch.allclose(outputs, expected, atol=1e-12)
        # the statistics differ between splits, so the whole-batch BatchNorm2d output is another one
        assert not torch.allclose(outputs, nn.functional.batch_norm(inputs, None, None, ghost.weight, ghost.bias,
                                                                    training=True), atol=1e-3)
        upstream = torch.randn_like(outputs)
        outputs.backward(upstream)
        expected.backward(upstream)
        assert torch.allclose(inputs.grad, chunk_inputs.grad, atol=1e-10)
        assert torch.allclose(ghost.weight.grad, sum(norm.weight.grad for norm in chunks), atol=1e-10)
        assert torch.allclose(ghost.bias.grad, sum(norm.bias.grad for norm in chunks), atol=1e-10)
        for parameter in [ghost.weight, ghost.bias] + [p for norm in chunks for p in norm.parameters()]:
            parameter.grad = None
        # Page's rule: one running buffer per split, averaged over the splits for evaluation
        assert torch.allclose(ghost.running_mean, torch.stack([n.running_mean for n in chunks]).mean(0), atol=1e-12)
        assert torch.allclose(ghost.running_var, torch.stack([n.running_var for n in chunks]).mean(0), atol=1e-12)
        assert int(ghost.num_batches_tracked) == step + 1


def test_ghost_batch_norm_running_statistics_follow_the_reference_rule():
    """running <- (1 - momentum) * running + momentum * mean over splits of the split's mean and
    unbiased variance, computed here from the definition."""
    ghost, _ = ghost_and_chunk_norms(4, momentum=0.2)
    mean_before, var_before = ghost.running_mean.clone(), ghost.running_var.clone()
    inputs = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 0.5
    with torch.no_grad():
        ghost(inputs)
    splits = inputs.reshape(4, 2, 3, 16).transpose(1, 2).reshape(4, 3, 32)  # (split, channel, values)
    split_means, split_vars = splits.mean(-1), splits.var(-1, unbiased=True)
    assert torch.allclose(ghost.running_mean, 0.8 * mean_before + 0.2 * split_means.mean(0))
    assert torch.allclose(ghost.running_var, 0.8 * var_before + 0.2 * split_vars.mean(0))


def test_ghost_batch_norm_eval_uses_running_statistics():
    ghost, _ = ghost_and_chunk_norms(4)
    ghost.eval()
    state = {k: v.clone() for k, v in ghost.state_dict().items()}
    inputs = torch.randn(6, 3, 5, 5, dtype=torch.float64)  # any batch size in eval
    with torch.no_grad():
        outputs = ghost(inputs)
        single = ghost(inputs[:1])
    expected = (inputs - ghost.running_mean[:, None, None]) / torch.sqrt(ghost.running_var[:, None, None] + ghost.eps)
    expected = expected * ghost.weight[:, None, None] + ghost.bias[:, None, None]
    assert torch.allclose(outputs, expected)
    assert torch.allclose(single, outputs[:1])  # no batch statistics
    assert all(torch.equal(state[k], v) for k, v in ghost.state_dict().items())


def test_ghost_batch_norm_with_one_split_is_batch_norm():
    ghost, (plain,) = ghost_and_chunk_norms(1)
    inputs = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    for mode in (True, False):
        ghost.train(mode)
        plain.train(mode)
        assert torch.equal(ghost(inputs), plain(inputs))
        assert all(torch.equal(a, b) for a, b in zip(ghost.state_dict().values(), plain.state_dict().values()))


def test_ghost_batch_norm_indivisible_batch_names_the_flags():
    ghost = GhostBatchNorm2d(3, num_splits=4)
    with pytest.raises(models.ModelConfigError) as error:
        ghost(torch.randn(6, 3, 4, 4))
    message = str(error.value)
    assert message.startswith('--ghost_bn_splits 4: a batch of 6 images') and '--batch_size' in message
    ghost.eval()
    assert ghost(torch.randn(6, 3, 4, 4)).shape == (6, 3, 4, 4)  # eval: running statistics, any batch


def test_ghost_batch_norm_keeps_channels_last_and_autocast_dtype():
    ghost = GhostBatchNorm2d(8, num_splits=2)
    inputs = torch.randn(4, 8, 6, 6)
    reference = ghost(inputs)
    outputs = ghost(inputs.contiguous(memory_format=torch.channels_last))
    assert outputs.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(outputs, reference, atol=1e-6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = ghost(inputs.bfloat16())
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), reference, atol=0.05)


def test_resnet9_ghost_bn_equals_plain_resnet9_on_each_chunk():
    """One forward of the whole batch with ghost BN = plain ResNet-9 on each chunk (what
    --subdivision runs), outputs and the gradient of the batch-mean loss alike."""
    torch.manual_seed(0)
    ghost = models.create_model('resnet9', base_channels=4, ghost_bn_splits=2).double()
    plain = models.create_model('resnet9', base_channels=4).double()
    plain.load_state_dict(ghost.state_dict())
    inputs = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    logits = ghost(inputs)
    chunk_logits = [plain(chunk) for chunk in inputs.chunk(2)]
    assert torch.allclose(logits, torch.cat(chunk_logits))
    logits.logsumexp(1).mean().backward()
    for chunk in chunk_logits:
        (chunk.logsumexp(1).mean() / 2).backward()  # gradient accumulation over 2 equal chunks
    for (name, a), b in zip(ghost.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-10), name


def test_resnet9_head_scale_scales_the_logits():
    torch.manual_seed(0)
    default = models.create_model('resnet9', base_channels=4).eval()
    halved = models.create_model('resnet9', base_channels=4, head_scale=1 / 16).eval()
    halved.load_state_dict(default.state_dict())
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(halved(inputs), default(inputs) / 2)


def test_resnet9_final_options_train_one_epoch(cifar10_dir, tmp_path):
    argv = ['--arch', 'resnet9', '--base_channels', '4', '--activation', 'celu', '--ghost_bn_splits', '2',
            '--batch_size', '20', '--padding_mode', 'reflect', '--use_cutout', '--cutout_inside', '--cutout_size', '8',
            '--epochs', '1', '--device', 'cpu', '--no-tensorboard', '--dataset_dir', cifar10_dir,
            '--outdir', str(tmp_path / 'run')]
    assert run_main(argv) == 0
    record = json.load(open(tmp_path / 'run' / 'log.json'))[0]
    assert math.isfinite(record['train_loss']) and 0 <= record['test_accuracy'] <= 1
    settings = json.load(open(tmp_path / 'run' / 'config.json'))['settings']
    assert (settings['activation'], settings['ghost_bn_splits'], settings['padding_mode']) == ('celu', 2, 'reflect')


def test_airbench_head_scale_selects_airbench94s_head():
    """No --head_scale: airbench94_muon's unit-variance head over the width; a number: PyTorch's
    default head init (uniform within 1/sqrt(fan_in)) times that number, as airbench94."""
    torch.manual_seed(0)
    muon_head = models.create_model('airbench')
    assert muon_head.fc.weight.std().item() == pytest.approx(1.0, rel=1e-5)
    assert muon_head.head_scale == 1 / 256
    torch.manual_seed(0)
    legacy = models.create_model('airbench', head_scale=1 / 9)
    assert legacy.fc.weight.abs().max().item() <= 1 / 16  # 1/sqrt(256)
    features = torch.randn(2, 256)
    assert torch.allclose(legacy.fc(features) * (1 / 9), legacy.fc(features) / 9)
    images = torch.randn(2, 3, 32, 32)
    legacy.eval()
    expected = legacy.fc(legacy.pool(legacy.forward_features(images)).flatten(1)) / 9
    assert torch.allclose(legacy(images), expected, atol=1e-6)
    with pytest.raises(models.ModelConfigError, match='^--head_scale 0: airbench'):
        models.create_model('airbench', head_scale=0)
