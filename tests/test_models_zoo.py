"""Tests for the model-zoo families: DenseNet, PyramidNet, ResNeXt, Shake-Shake and ResNet-9.

Parameter counts against the papers' tables, every SPEC section 4 configuration, forward and
backward on CPU for small configurations, configuration errors, the Shake-Shake forward and
backward coefficients, and the memory-efficient DenseNet against the plain one.
"""
import itertools
import math

import pytest
import torch
from torch import nn

import models
import optim
from models.airbench import ConvGroup, PatchWhitening
from models.densenet import DenseLayer
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
    ('airbench', dict(n_channels=[64, 256]), '--n_channels [64, 256]: airbench needs three widths'),
    ('airbench', dict(n_channels=[64, 0, 256]), '--n_channels 0: airbench needs a positive integer'),
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
