"""Tests driven by the model registry itself, and the recorded signatures of existing configurations.

Every test here is parametrized over ``models.list_models()``: a new model file is tested as soon as
it registers a builder with its ``test_config``, without editing a list. The signature test pins
the parameter count and the sorted state_dict keys and shapes of every configuration recorded in
``tests/data/model_signatures.json`` (SPEC section 4's networks, the defaults and the small test
configurations), so that checkpoints written before a refactor still load after it.
"""
import inspect
import json
import os
import re
import typing

import pytest
import torch
from torch import nn

import models

SIGNATURES_PATH = os.path.join(os.path.dirname(__file__), 'data', 'model_signatures.json')

# (arch, flags, num_classes, in_channels) recorded in the fixture. The SPEC section 4 networks
# (with their regularization rows' variants), each arch's defaults, and the small configurations
# the tests build; a few with 100 classes or one input channel (28x28 images for the transformers,
# whose position tables follow the image size), whose head and stem differ.
SIGNATURE_CONFIGS = [
    # SPEC section 4
    ('vgg', {}, 10, 3),
    ('resnet', dict(depth=110), 10, 3),
    ('resnet_preact', dict(depth=110), 10, 3),
    ('resnet_preact', dict(depth=164, block_type='bottleneck'), 10, 3),
    ('wrn', dict(depth=28, widening_factor=10), 10, 3),
    ('densenet', dict(depth=100, block_type='basic', growth_rate=12), 10, 3),
    ('densenet', dict(depth=100, block_type='bottleneck', growth_rate=12), 10, 3),
    ('pyramidnet', dict(depth=110, block_type='basic', pyramid_alpha=84), 10, 3),
    ('pyramidnet', dict(depth=110, block_type='basic', pyramid_alpha=270), 10, 3),
    ('pyramidnet', dict(depth=164, block_type='bottleneck', pyramid_alpha=270), 10, 3),
    ('resnext', dict(depth=29, cardinality=4, base_channels=64), 10, 3),
    ('resnext', dict(depth=29, cardinality=8, base_channels=64), 10, 3),
    ('shake_shake', dict(depth=26, base_channels=32), 10, 3),
    ('shake_shake', dict(depth=26, base_channels=64), 10, 3),
    ('shake_shake', dict(depth=26, base_channels=96), 10, 3),
    ('se_resnet_preact', {}, 10, 3),
    ('resnet_preact', dict(depth=20, widening_factor=4), 10, 3),
    ('resnet_preact', dict(depth=56, remove_first_relu=True, add_last_bn=True,
                           preact_stage=[True, False, False]), 10, 3),
    ('resnet_preact', dict(depth=20), 100, 3),
    ('resnet_preact', dict(depth=20), 10, 1),
    ('resnet', dict(depth=56, se_reduction=16), 10, 3),
    ('wrn', dict(depth=16, widening_factor=8, se_reduction=16), 10, 3),
    ('wrn', dict(depth=28, widening_factor=10), 100, 3),
    ('resnet9', {}, 10, 3),
    ('resnet9', dict(activation='celu', ghost_bn_splits=16, head_scale=0.0625), 10, 3),
    ('airbench', {}, 10, 3),
    ('airbench', dict(head_scale=1 / 9), 10, 1),
    ('densenet', dict(depth=40, block_type='basic', growth_rate=12, drop_rate=0.2), 100, 3),
    ('vgg', dict(use_bn=False), 10, 1),
    # small configurations of tests/test_models_core.py, test_models_zoo.py and test_main.py
    ('vgg', dict(n_channels=[4, 8, 8, 16, 16]), 10, 3),
    ('vgg', dict(n_channels=[8, 16], n_layers=[1, 2], use_bn=False), 10, 3),
    ('vgg', dict(n_channels=[4, 8], n_layers=[1, 1]), 10, 1),
    ('resnet', dict(depth=8, base_channels=4), 10, 3),
    ('resnet', dict(depth=11, base_channels=4, block_type='bottleneck'), 10, 3),
    ('resnet', dict(depth=8, base_channels=8, se_reduction=4), 100, 3),
    ('resnet_preact', dict(depth=8, base_channels=4), 10, 3),
    ('resnet_preact', dict(depth=11, base_channels=4, block_type='bottleneck', widening_factor=2,
                           preact_stage=[True, False, False], remove_first_relu=True, add_last_bn=True), 10, 3),
    ('se_resnet_preact', dict(depth=8, base_channels=8, se_reduction=4), 10, 3),
    ('se_resnet_preact', dict(depth=11, base_channels=4, block_type='bottleneck'), 10, 1),
    ('wrn', dict(depth=10, widening_factor=1, base_channels=4), 10, 3),
    ('wrn', dict(depth=10, widening_factor=2, base_channels=4, drop_rate=0.3, se_reduction=2), 10, 3),
    ('densenet', dict(depth=10, block_type='basic', growth_rate=4), 10, 3),
    ('densenet', dict(depth=10, block_type='bottleneck', growth_rate=4, memory_efficient=True), 10, 1),
    ('pyramidnet', dict(depth=8, block_type='basic', pyramid_alpha=8, base_channels=4), 10, 3),
    ('pyramidnet', dict(depth=11, block_type='bottleneck', pyramid_alpha=8, base_channels=4), 100, 3),
    ('resnext', dict(depth=11, cardinality=2, base_channels=4), 10, 3),
    ('shake_shake', dict(depth=8, base_channels=4), 10, 1),
    ('resnet9', dict(base_channels=8), 10, 3),
    ('airbench', dict(n_channels=[8, 16, 16]), 10, 3),
    # the models of the CIFAR tricks collection (issue 14), at their defaults
    *[(arch, {}, 10, 3) for arch in (
        'coatnet_0', 'coatnet_1', 'coatnet_2', 'cvt', 'densenet121', 'dla', 'dpn26', 'dpn92', 'efficientnet_b0',
        'googlenet', 'mobilenet', 'mobilenetv2', 'mobilevit_s', 'mobilevit_xs', 'mobilevit_xxs', 'preact_resnet18',
        'regnetx_200mf', 'regnety_400mf', 'resnet18', 'resnet34', 'resnet50', 'resnet_stochastic_depth', 'senet18',
        'swin_s', 'swin_t', 'vit')],
    ('vit', {}, 10, 1),
    ('swin_t', {}, 100, 1),
    ('coatnet_0', {}, 10, 1),
]


def config_key(arch, flags, num_classes, in_channels):
    return f'{arch} {json.dumps(flags, sort_keys=True)} classes={num_classes} channels={in_channels}'


def signature(arch, flags, num_classes, in_channels):
    """Parameter count and the sorted state_dict entries 'key shape' of a model built on the meta device
    (for 28x28 images when it has one input channel, else 32x32)."""
    with torch.device('meta'):
        model = models.create_model(arch, num_classes=num_classes, in_channels=in_channels,
                                    image_size=28 if in_channels == 1 else 32, **flags)
    entries = [f'{key} {"x".join(map(str, value.shape))}' for key, value in model.state_dict().items()]
    return {'n_params': sum(p.numel() for p in model.parameters()), 'state_dict': sorted(entries)}


def load_signatures():
    with open(SIGNATURES_PATH) as f:
        return json.load(f)


def write_signatures(path=SIGNATURES_PATH):
    """Record the signatures of SIGNATURE_CONFIGS; for adding configurations, never to accept a change."""
    records = {config_key(*config): signature(*config) for config in SIGNATURE_CONFIGS}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(records, f, indent=0, sort_keys=True)
        f.write('\n')


def test_every_signature_config_is_recorded():
    recorded = load_signatures()
    assert sorted(config_key(*config) for config in SIGNATURE_CONFIGS) == sorted(recorded)


@pytest.mark.parametrize('config', SIGNATURE_CONFIGS, ids=[config_key(*c) for c in SIGNATURE_CONFIGS])
def test_parameter_count_and_state_dict_keys_are_unchanged(config):
    expected = load_signatures()[config_key(*config)]
    actual = signature(*config)
    assert actual['n_params'] == expected['n_params']
    missing = sorted(set(expected['state_dict']) - set(actual['state_dict']))
    unexpected = sorted(set(actual['state_dict']) - set(expected['state_dict']))
    assert not missing and not unexpected, f'missing {missing[:5]}, unexpected {unexpected[:5]}'
    assert actual['state_dict'] == expected['state_dict']


# ----------------------------------------------------------------------------- every registered model

ARCHS = models.list_models()
INPUTS = [(3, 32, 10), (3, 32, 100), (1, 28, 10)]


def build_small(arch, in_channels=3, size=32, num_classes=10):
    return models.create_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=size,
                               **models.get_test_config(arch))


@pytest.mark.parametrize('arch', ARCHS)
def test_every_model_registers_a_small_test_config(arch):
    config = models.get_test_config(arch)
    assert config is not None, f'register {arch!r} with test_config=dict(...), a network of a few thousand parameters'
    with torch.device('meta'):
        model = models.create_model(arch, **config)
    # small enough for the CPU budget of the model tests (about 2 minutes); resnext keeps its 256-1024
    # stage widths whatever the bottleneck width, 0.76 M parameters at depth 11
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.parametrize('in_channels, size, num_classes', INPUTS, ids=['cifar10', 'cifar100', 'mnist'])
@pytest.mark.parametrize('arch', ARCHS)
def test_forward_backward(arch, in_channels, size, num_classes):
    torch.manual_seed(0)
    model = build_small(arch, in_channels, size, num_classes)
    images = torch.randn(4, in_channels, size, size)
    targets = torch.arange(4) % num_classes
    model.train()
    logits = model(images)
    assert logits.shape == (4, num_classes)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, targets).backward()
    # in training, stochastic depth may skip a block and leave its parameters without a gradient
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    # in eval every trainable parameter takes part
    model.zero_grad(set_to_none=True)
    model.eval()
    logits = model(images)
    assert logits.shape == (4, num_classes) and torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, targets).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize('arch', ARCHS)
def test_eval_is_deterministic_and_batch_independent(arch):
    torch.manual_seed(0)
    model = build_small(arch).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        together = model(images)
        alone = model(images[:1])
    torch.testing.assert_close(together[:1], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('arch', ARCHS)
def test_builder_docstring_and_training_defaults(arch):
    builder = models.registry.get_builder(arch)
    assert builder.__doc__, f'{arch}: the builder needs a docstring (--list_archs and the flags use it)'
    module = inspect.getmodule(builder)
    assert 'arXiv' in module.__doc__ or 'myrtle.ai' in module.__doc__, f'{module.__name__}: cite the paper'
    import main
    settings = {action.dest for action in main.get_args_parser()._actions}
    unknown = set(models.train_defaults(arch)) - settings
    assert not unknown, f'{arch}: training defaults that are not main.py settings: {sorted(unknown)}'


def test_no_family_imports_another_family():
    """Shared blocks and validators live in models/common.py; a family file imports only common and registry."""
    folder = os.path.dirname(models.__file__)
    for filename in sorted(os.listdir(folder)):
        if not filename.endswith('.py') or filename in ('__init__.py', 'common.py', 'registry.py'):
            continue
        source = open(os.path.join(folder, filename)).read()
        imported = set(re.findall(r'^from models\.(\w+) import', source, flags=re.MULTILINE))
        imported |= set(re.findall(r'^import models\.(\w+)', source, flags=re.MULTILINE))
        assert imported <= {'common', 'registry'}, f'{filename} imports models.{imported - {"common", "registry"}}'


# ----------------------------------------------------------------------------- generated model flags

# The model flags main.py had before they were generated: type, choices and help text stay the same.
HAND_WRITTEN_FLAGS = {
    'depth': ('int', None, 'number of layers'),
    'base_channels': ('int', None, 'channels of the first stage'),
    'block_type': ('str', ('basic', 'bottleneck'), None),
    'n_channels': ('list', None, "vgg: channels per stage, e.g. '[64,128,256,512,512]'"),
    'n_layers': ('list', None, "vgg: conv layers per stage, e.g. '[2,2,3,3,3]'"),
    'use_bn': ('bool', None, 'vgg: batch norm after each conv'),
    'remove_first_relu': ('bool', None, 'resnet_preact'),
    'add_last_bn': ('bool', None, 'resnet_preact'),
    'preact_stage': ('list', None, "resnet_preact, e.g. '[true,false,false]'"),
    'widening_factor': ('int', None, 'wrn, resnet_preact'),
    'drop_rate': ('float', None, 'dropout (wrn, densenet)'),
    'growth_rate': ('int', None, 'densenet k'),
    'compression_rate': ('float', None, 'densenet-BC transition compression'),
    'memory_efficient': ('bool', None, 'densenet: recompute concatenations in backward (less memory)'),
    'pyramid_alpha': ('int', None, 'pyramidnet widening'),
    'cardinality': ('int', None, 'resnext groups'),
    'shake_forward': ('bool', None, 'shake_shake: random alpha'),
    'shake_backward': ('bool', None, 'shake_shake: random beta'),
    'shake_image': ('bool', None, 'shake_shake: per image (true) or per batch'),
    'se_reduction': ('int', None, 'squeeze-and-excitation reduction ratio'),
    'activation': ('str', ('relu', 'celu'), "resnet9: activation (celu: Page's final recipe)"),
    'celu_alpha': ('float', None, 'resnet9 with --activation celu: CELU alpha (0.3)'),
    'ghost_bn_splits': ('int', None, None),
    'head_scale': ('float', None, None),
}


def model_actions():
    import main
    return {action.dest: action for action in main.get_args_parser()._actions
            if action.dest in main.MODEL_FLAGS}


def test_every_builder_argument_is_a_flag():
    import main
    actions = model_actions()
    for arch in ARCHS:
        assert set(models.model_params(arch)) <= set(actions), arch
    assert set(main.MODEL_FLAGS) == set(models.model_flags())


@pytest.mark.parametrize('flag', sorted(HAND_WRITTEN_FLAGS))
def test_existing_flags_keep_type_choices_and_help(flag):
    kind, choices, help_text = HAND_WRITTEN_FLAGS[flag]
    spec = models.model_flags()[flag]
    assert spec.kind == kind
    assert spec.choices == choices
    if help_text is not None:
        assert spec.help == help_text
    action = model_actions()[flag]
    assert action.help == spec.help and action.default is None
    assert tuple(action.choices) == choices if choices else action.choices is None


def test_generated_flags_parse_like_the_hand_written_ones():
    import main
    args = main.parse_args(['--outdir', 'x', '--arch', 'vgg', '--n_channels', '[64,128]', '--n_layers', '[1,2]',
                            '--use_bn', 'false'])
    assert (args.n_channels, args.n_layers, args.use_bn) == ([64, 128], [1, 2], False)
    args = main.parse_args(['--outdir', 'x', '--arch', 'shake_shake', '--shake_image'])
    assert args.shake_image is True and args.shake_forward is None and args.depth is None
    args = main.parse_args(['--outdir', 'x', '--arch', 'swin_t', '--n_blocks', '[2,2,2,2]', '--drop_path_rate',
                            '0.1', '--window_size', '4'])
    assert (args.n_blocks, args.drop_path_rate, args.window_size) == ([2, 2, 2, 2], 0.1, 4)
    assert main.model_kwargs(args)['n_blocks'] == [2, 2, 2, 2]
    with pytest.raises(main.UsageError, match='--depth deep: expected an integer >= 1'):
        main.parse_args(['--outdir', 'x', '--depth', 'deep'])
    with pytest.raises(main.UsageError, match='--block_type wide: expected one of basic, bottleneck'):
        main.parse_args(['--outdir', 'x', '--block_type', 'wide'])


def test_flag_types_come_from_annotations_defaults_and_docstrings():
    registry = models.registry

    def builder(*, width: int = None, ratio=0.5, names=('a',), mode: typing.Literal['x', 'y'] = 'x',
                flag=True, num_classes=10, in_channels=3, image_size=32):
        """A builder.

        Args:
            width: how wide
        """

    saved = dict(registry._BUILDERS), dict(registry._TRAIN_DEFAULTS), dict(registry._TEST_CONFIGS)
    try:
        registry.register_model('zz_test_builder', test_config=dict(width=2))(builder)
        flags = registry.model_flags()
        assert [flags[name].kind for name in ('width', 'ratio', 'names', 'mode', 'flag')] == \
            ['int', 'float', 'list', 'str', 'bool']
        assert flags['mode'].choices == ('x', 'y') and flags['width'].help == 'how wide'
        assert flags['ratio'].help == 'model flag of zz_test_builder'
        assert 'image_size' not in flags and 'num_classes' not in flags
        with pytest.raises(ValueError, match='registered twice'):
            registry.register_model('zz_test_builder')(builder)
        with pytest.raises(ValueError, match='test_config has arguments the builder does not take: depth'):
            registry.register_model('zz_other', test_config=dict(depth=2))(builder)

        def conflicting(*, ratio='high', num_classes=10, in_channels=3):
            """Another."""
        registry.register_model('zz_conflict')(conflicting)
        with pytest.raises(ValueError, match='--ratio is (str|float) in one builder and (float|str) in zz_'):
            registry.model_flags()
    finally:
        registry._BUILDERS, registry._TRAIN_DEFAULTS, registry._TEST_CONFIGS = \
            saved[0], saved[1], saved[2]


def test_image_size_reaches_only_builders_that_take_it():
    vit = models.create_model('vit', image_size=28, **models.get_test_config('vit'))
    assert vit.pos_embed.shape[1] == 7 * 7 + 1
    resnet = models.create_model('resnet', image_size=28, depth=8, base_channels=4)
    assert resnet(torch.randn(2, 3, 28, 28)).shape == (2, 10)



if __name__ == '__main__':
    # PYTHONPATH=. python tests/test_models_registry.py: (re)write the fixture from the current code
    write_signatures()
    print(f'wrote {len(SIGNATURE_CONFIGS)} signatures to {SIGNATURES_PATH}')
