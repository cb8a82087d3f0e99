"""Tests for the core CNN families (vgg, resnet, resnet_preact, wrn, se_resnet_preact): parameter
counts against the papers' tables, forward/backward on CIFAR and MNIST shapes, the design options
measured through forward hooks, closed-form parameter differences, and flag validation."""
import math

import pytest
import torch
from torch import nn

import models
from models import ModelConfigError, create_model, model_params, train_defaults

CORE_ARCHS = {'vgg', 'resnet', 'resnet_preact', 'wrn', 'se_resnet_preact'}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def shortcut_parameters(model):
    return sum(p.numel() for name, p in model.named_parameters() if '.shortcut.' in name)


# (arch, flags, figure as printed in the paper in millions, subtract projection shortcuts?)
# He et al. 1512.03385 Table 6 counts CIFAR ResNets with parameter-free (option A) shortcuts;
# ours project with conv+BN (option B), so the comparison leaves those out.
PAPER_COUNTS = [
    ('resnet', dict(depth=20), '0.27', True),
    ('resnet', dict(depth=32), '0.46', True),
    ('resnet', dict(depth=44), '0.66', True),
    ('resnet', dict(depth=56), '0.85', True),
    ('resnet', dict(depth=110), '1.7', True),
    ('resnet_preact', dict(depth=164, block_type='bottleneck'), '1.7', False),  # 1603.05027 Table 2
    ('wrn', dict(depth=28, widening_factor=10), '36.5', False),  # 1605.07146 Table 3
    ('wrn', dict(depth=16, widening_factor=8), '11.0', False),
]


@pytest.mark.parametrize('arch, flags, paper_millions, without_projections', PAPER_COUNTS,
                         ids=[f'{a}-{f}' for a, f, _, _ in PAPER_COUNTS])
def test_parameter_count_rounds_to_paper_figure(arch, flags, paper_millions, without_projections):
    model = create_model(arch, **flags)
    count = count_parameters(model)
    if without_projections:
        count -= shortcut_parameters(model)
    # the paper rounds to its last printed digit: the true count is within half a unit of it
    decimals = len(paper_millions.split('.')[1])
    tolerance = 0.5 * 10 ** -decimals
    assert abs(count / 1e6 - float(paper_millions)) <= tolerance + 1e-12, count


def test_resnet_projection_shortcuts_only_where_shape_changes():
    model = create_model('resnet', depth=20, base_channels=16)
    # 1x1 conv + BN (weight, bias) at the entries of stage 2 (16->32) and stage 3 (32->64)
    expected = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert shortcut_parameters(model) == expected
    projected = {name.split('.shortcut.')[0] for name, _ in model.named_parameters() if '.shortcut.' in name}
    assert projected == {'stage2.block1', 'stage3.block1'}


def test_bottleneck_stages_are_four_times_wider():
    model = create_model('resnet_preact', depth=164, block_type='bottleneck')
    assert model.stage1.block1.conv3.out_channels == 64
    assert model.stage3.block18.conv3.out_channels == 256
    assert model.stage3.block18.conv2.out_channels == 64
    assert model.head.fc.in_features == 256


# Small configurations of every builder in this family, fast on a CPU.
SMALL_CONFIGS = [
    ('vgg', dict(n_channels=[4, 8, 8, 16, 16])),
    ('vgg', dict(n_channels=[8, 16], n_layers=[1, 2], use_bn=False)),
    ('resnet', dict(depth=8, base_channels=4)),
    ('resnet', dict(depth=11, base_channels=4, block_type='bottleneck')),
    ('resnet', dict(depth=8, base_channels=8, se_reduction=4)),
    ('resnet_preact', dict(depth=8, base_channels=4)),
    ('resnet_preact', dict(depth=11, base_channels=4, block_type='bottleneck', widening_factor=2,
                           preact_stage=[True, False, False], remove_first_relu=True,
                           add_last_bn=True)),
    ('se_resnet_preact', dict(depth=8, base_channels=8, se_reduction=4)),
    ('se_resnet_preact', dict(depth=11, base_channels=4, block_type='bottleneck')),
    ('wrn', dict(depth=10, widening_factor=1, base_channels=4)),
    ('wrn', dict(depth=10, widening_factor=2, base_channels=4, drop_rate=0.3, se_reduction=2)),
]
INPUTS = [(3, 32, 10), (3, 32, 100), (1, 28, 10)]


def test_small_configs_cover_every_core_arch():
    assert CORE_ARCHS <= set(models.list_models())
    assert {arch for arch, _ in SMALL_CONFIGS} == CORE_ARCHS


@pytest.mark.parametrize('in_channels, size, num_classes', INPUTS,
                         ids=[f'{c}x{s}x{s}-{k}' for c, s, k in INPUTS])
@pytest.mark.parametrize('arch, flags', SMALL_CONFIGS, ids=[f'{a}-{i}' for i, (a, _) in enumerate(SMALL_CONFIGS)])
def test_forward_and_backward(arch, flags, in_channels, size, num_classes):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes, in_channels=in_channels, **flags)
    images = torch.randn(2, in_channels, size, size)
    logits = model(images)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, num_classes - 1])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('size', [20, 28, 32, 33])
def test_vgg_pools_round_up_instead_of_collapsing(size):
    model = create_model('vgg', n_channels=[4, 4, 4, 4, 8], n_layers=[1, 1, 1, 1, 1], in_channels=1)
    images = torch.randn(2, 1, size, size)
    # five halvings rounding up: ceil(size / 32), so 28x28 MNIST keeps a 1x1 map (floor gives 0)
    side = math.ceil(size / 32)
    assert model.forward_features(images).shape == (2, 8, side, side)
    assert model(images).shape == (2, 10)


def test_vgg_every_conv_has_its_own_relu_and_bn():
    model = create_model('vgg')
    # hysts' VGG reused one child name 'relu' per stage, silently dropping all but one ReLU
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(relus) == len(batch_norms) == 2 + 2 + 3 + 3 + 3
    keys = model.state_dict().keys()
    assert {'stage1.conv1.weight', 'stage5.conv3.weight', 'stage5.bn3.running_var', 'head.fc.weight'} <= set(keys)
    assert not any(isinstance(m, nn.Conv2d) and m.bias is not None for m in model.modules())
    no_bn = create_model('vgg', use_bn=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    assert all(m.bias is not None for m in no_bn.modules() if isinstance(m, nn.Conv2d))


def test_residual_state_dict_keys_are_stable():
    keys = set(create_model('resnet', depth=20).state_dict())
    assert {'conv.weight', 'stage1.block1.conv1.weight', 'stage3.block3.bn2.running_mean',
            'stage2.block1.shortcut.0.weight', 'head.fc.bias'} <= keys
    assert not any(key.startswith('stage1.block4') for key in keys)
    keys = set(create_model('wrn', depth=16, widening_factor=2).state_dict())
    assert {'stage1.block2.conv2.weight', 'stage3.block1.shortcut.weight', 'bn.weight'} <= keys


def capture_input(module, run):
    """The tensor ``module`` receives while ``run()`` executes."""
    captured = []
    handle = module.register_forward_hook(lambda _, inputs, __: captured.append(inputs[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize('preact', [True, False])
def test_preact_stage_decides_what_the_shortcut_sees(preact):
    torch.manual_seed(0)
    model = create_model('resnet_preact', depth=8, base_channels=4, preact_stage=[preact] * 3)
    images = torch.randn(4, 3, 16, 16)
    shortcut_input = capture_input(model.stage2.block1.shortcut, lambda: model(images))
    # pre-activated: the shortcut receives BN-ReLU output; otherwise the raw block input
    if preact:
        assert shortcut_input.min() >= 0
    else:
        assert shortcut_input.min() < 0


@pytest.mark.parametrize('remove_first_relu', [True, False])
def test_remove_first_relu(remove_first_relu):
    torch.manual_seed(0)
    model = create_model('resnet_preact', depth=14, base_channels=4, remove_first_relu=remove_first_relu)
    images = torch.randn(4, 3, 16, 16)
    conv_input = capture_input(model.stage1.block2.conv1, lambda: model(images))
    if remove_first_relu:
        assert conv_input.min() < 0
    else:
        assert conv_input.min() >= 0


def test_post_activation_blocks_end_in_relu_preact_blocks_do_not():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16)
    post = create_model('resnet', depth=8, base_channels=4)
    pre = create_model('resnet_preact', depth=8, base_channels=4)
    assert capture_input(post.stage2, lambda: post(images)).min() >= 0
    assert capture_input(pre.stage2, lambda: pre(images)).min() < 0


def test_add_last_bn_adds_one_bn_per_block():
    depth, base = 14, 8
    n_blocks = (depth - 2) // 6
    without = count_parameters(create_model('resnet_preact', depth=depth, base_channels=base))
    with_bn = count_parameters(create_model('resnet_preact', depth=depth, base_channels=base, add_last_bn=True))
    assert with_bn - without == sum(2 * n_blocks * base * 2 ** stage for stage in range(3))


@pytest.mark.parametrize('block_type, depth, expansion', [('basic', 14, 1), ('bottleneck', 20, 4)])
def test_se_gate_parameters_closed_form(block_type, depth, expansion):
    base, reduction = 16, 4
    n_blocks = (depth - 2) // (6 if block_type == 'basic' else 9)
    common = dict(depth=depth, base_channels=base, block_type=block_type,
                  preact_stage=[True, False, False], remove_first_relu=True, add_last_bn=True)
    plain = count_parameters(create_model('resnet_preact', **common))
    gated = count_parameters(create_model('se_resnet_preact', se_reduction=reduction, **common))
    # per block: C -> C/r (weights + bias) -> C (weights + bias)
    per_stage = []
    for stage in range(3):
        channels = base * expansion * 2 ** stage
        hidden = channels // reduction
        per_stage.append(channels * hidden + hidden + hidden * channels + channels)
    assert gated - plain == n_blocks * sum(per_stage)


def test_widening_factor_scales_stage_widths():
    model = create_model('resnet_preact', depth=20, widening_factor=4)
    assert model.conv.out_channels == 16
    assert [getattr(model, f'stage{i}').block1.conv2.out_channels for i in (1, 2, 3)] == [64, 128, 256]
    wide = create_model('wrn', depth=16, widening_factor=8)
    assert wide.conv.out_channels == 16
    assert wide.head.fc.in_features == 512


def test_wrn_dropout_only_in_training():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16)
    dropped = create_model('wrn', depth=10, widening_factor=1, base_channels=4, drop_rate=0.5)
    assert not torch.equal(dropped(images), dropped(images))
    dropped.eval()
    assert torch.equal(dropped(images), dropped(images))
    plain = create_model('wrn', depth=10, widening_factor=1, base_channels=4)
    assert torch.equal(plain(images), plain(images))


def test_wrn_initialization_is_the_authors():
    """szagoruyko/wide-residual-networks (MSRinit, FCinit, bnparams) and hysts' models/wrn.py at 1d76092:
    convolutions N(0, 2 / fan_in), BN scales U(0, 1) and shifts 0, classifier U(+-1/sqrt(fan_in)), bias 0."""
    torch.manual_seed(0)
    model = create_model('wrn', depth=10, widening_factor=4)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 1 + 3 * 2 + 3 and all(conv.bias is None for conv in convs.values())
    # the stage-entry convs widen (fan_out = 2 fan_in): fan_in and fan_out stds differ by sqrt(2)
    for name in ('stage2.block1.conv1', 'stage3.block1.conv1', 'stage3.block1.shortcut'):
        conv = convs[name]
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.out_channels == 2 * conv.in_channels
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.03), name
        assert conv.weight.mean().abs().item() < 0.1 * math.sqrt(2 / fan_in), name
    scales = torch.cat([m.weight.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    shifts = torch.cat([m.bias.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    assert 0 <= scales.min() and scales.max() < 1 and scales.mean().item() == pytest.approx(0.5, abs=0.05)
    assert scales.std().item() == pytest.approx(math.sqrt(1 / 12), rel=0.1) and torch.all(shifts == 0)
    fc = model.head.fc
    bound = 1 / math.sqrt(fc.in_features)
    assert 0.9 * bound < fc.weight.abs().max() <= bound and torch.all(fc.bias == 0)


def test_other_families_keep_kaiming_fan_out_and_unit_bn_scales():
    torch.manual_seed(0)
    model = create_model('resnet_preact', depth=20, base_channels=64)
    conv = model.stage3.block1.conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0)
               for m in model.modules() if isinstance(m, nn.BatchNorm2d))


INVALID = [
    ('resnet', dict(depth=21), '--depth 21', '6n+2'),
    ('resnet', dict(depth=21, block_type='bottleneck'), '--depth 21', '9n+2'),
    ('resnet', dict(block_type='wide'), '--block_type wide', 'basic'),
    ('resnet', dict(base_channels=0), '--base_channels 0', 'an integer >= 1'),
    ('resnet_preact', dict(depth=8, preact_stage=[True, False]), '--preact_stage', '3'),
    ('resnet_preact', dict(depth=8, remove_first_relu='maybe'), '--remove_first_relu', 'true or false'),
    ('resnet_preact', dict(depth=8, widening_factor=0), '--widening_factor 0', 'an integer >= 1'),
    ('se_resnet_preact', dict(depth=8, se_reduction=0), '--se_reduction 0', 'an integer >= 1'),
    ('wrn', dict(depth=26), '--depth 26', '6n+4'),
    ('wrn', dict(depth=10, drop_rate=1.0), '--drop_rate 1.0', '[0, 1)'),
    ('vgg', dict(n_channels=[64, 128, 256, 512]), '--n_channels', 'n_layers'),
    ('vgg', dict(n_layers=[2, 2, 0, 3, 3]), '--n_layers [2, 2, 0, 3, 3]', 'integers >= 1'),
    ('vgg', dict(n_channels=[]), '--n_channels []', 'a JSON list of 1 or more'),
]


@pytest.mark.parametrize('arch, flags, prefix, mention', INVALID,
                         ids=[f'{arch} {prefix}' for arch, _, prefix, _ in INVALID])
def test_invalid_configuration_names_the_flag(arch, flags, prefix, mention):
    with pytest.raises(ModelConfigError) as error:
        create_model(arch, **flags)
    assert str(error.value).startswith(prefix)
    assert mention in str(error.value)


# SPEC section 2's table; all SGD momentum 0.9 Nesterov (main.py's defaults).
SPEC_TRAINING = {
    'vgg': (160, 128, 0.1, 1e-4, [80, 120], 0.1),
    'resnet': (160, 128, 0.1, 1e-4, [80, 120], 0.1),
    'resnet_preact': (160, 128, 0.1, 1e-4, [80, 120], 0.1),
    'wrn': (200, 128, 0.1, 5e-4, [60, 120, 160], 0.2),
    'se_resnet_preact': (160, 128, 0.1, 1e-4, [80, 120], 0.1),
}


@pytest.mark.parametrize('arch', sorted(SPEC_TRAINING))
def test_training_defaults_match_spec(arch):
    epochs, batch_size, base_lr, weight_decay, milestones, lr_decay = SPEC_TRAINING[arch]
    assert train_defaults(arch) == dict(epochs=epochs, batch_size=batch_size, base_lr=base_lr,
                                        weight_decay=weight_decay, scheduler='multistep',
                                        milestones=milestones, lr_decay=lr_decay)


def test_model_flag_defaults_match_spec():
    def plain(params):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}

    assert plain(model_params('vgg')) == dict(n_channels=[64, 128, 256, 512, 512], n_layers=[2, 2, 3, 3, 3],
                                              use_bn=True)
    assert plain(model_params('resnet')) == dict(depth=110, base_channels=16, block_type='basic',
                                                 se_reduction=None)
    preact = dict(depth=110, base_channels=16, block_type='basic', widening_factor=1)
    assert plain(model_params('resnet_preact')) == dict(
        preact, preact_stage=[True, True, True], remove_first_relu=False, add_last_bn=False,
        se_reduction=None)
    assert plain(model_params('se_resnet_preact')) == dict(
        preact, preact_stage=[True, False, False], remove_first_relu=True, add_last_bn=True,
        se_reduction=16)
    assert plain(model_params('wrn')) == dict(depth=28, widening_factor=10, base_channels=16, drop_rate=0.0,
                                              se_reduction=None)


def test_create_model_drops_none_and_rejects_foreign_flags():
    model = create_model('resnet', depth=8, base_channels=None, block_type=None, drop_rate=None,
                         n_channels=None, se_reduction=None)
    assert model.conv.out_channels == 16
    assert isinstance(model.stage1.block1.shortcut, nn.Identity)
    with pytest.raises(ModelConfigError, match='^--drop_rate'):
        create_model('resnet', depth=8, drop_rate=0.1)
