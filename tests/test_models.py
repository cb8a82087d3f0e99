"""Tests for the models package, driven by its registry (models.list_models()).

Every registered model: forward and backward on CIFAR- and MNIST-shaped inputs, no NaN, eval
deterministic, its defaults inside its flags' domains. The registry: flag types, help and domains
(one table, ``models.registry.FLAGS``), create_model's one check per flag, the errors of invalid
configurations, model_kwargs and model_cost, and the recorded state_dict signatures of existing
configurations (tests/data/model_signatures.json), so that checkpoints written before a refactor still
load after it. Parameter counts against the papers in one table. Then each family's own behaviour:
the design options of the residual networks measured through forward hooks, DenseNet's
memory-efficient path, PyramidNet's widths and ShakeDrop, Shake-Shake's coefficients, ResNet-9's
ghost batch norm and CELU, airbench's whitening, the transformers' windows, masks and CIFAR sizing,
stochastic depth, the dual path split and --init's re-initialization.
"""
import argparse
import collections
import inspect
import itertools
import json
import math
import os
import re
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch
from torch import nn

import flags
import models
import optim
from models import ModelConfigError, create_model, model_params, train_defaults
from models.airbench import ConvGroup, PatchWhitening
from models.common import RelativePositionBias, reinitialize
from models.densenet import DenseLayer
from models.mobilevit import fold, unfold
from models.pyramidnet import ShakeDrop, linear_survival_probabilities
from models.resnet9 import GhostBatchNorm2d, conv_bn_act
from models.shake_shake import ShakeShakeBlock, shake_shake_mix
from models.stochastic_depth import StochasticDepthBlock
from models.swin import SwinBlock, shifted_window_mask, stage_windows, window_merge, window_partition

ARCHS = models.list_models()
INPUTS = [(3, 32, 10), (3, 32, 100), (1, 28, 10)]


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def build_on_meta(arch, **kwargs):
    """Build without allocating or initializing real weights: only shapes are needed for counts."""
    with torch.device('meta'):
        return models.create_model(arch, **kwargs)


def build_small(arch, in_channels=3, size=32, num_classes=10):
    return models.create_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=size,
                               **models.get_test_config(arch))


def config_id(arch, flags):
    return arch + '-' + '-'.join(f'{value}' for value in flags.values())


# ----------------------------------------------------------------------------- every registered model

@pytest.mark.parametrize('arch', ARCHS)
def test_every_model_registers_a_small_test_config(arch):
    config = models.get_test_config(arch)
    assert config is not None, f'register {arch!r} with test_config=dict(...), a network of a few thousand parameters'
    with torch.device('meta'):
        model = models.create_model(arch, **config)
    # small enough for the CPU budget of the model tests (about 2 minutes); resnext keeps its 256-1024
    # stage widths whatever the bottleneck width, 0.76 M parameters at depth 11
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


# Configurations beyond the registered test_config that the forward/backward test builds too: the
# families' options (bottleneck blocks, SE gates, dropout, DenseNet's memory-efficient path, ...).
VARIANTS = [
    ('vgg', dict(n_channels=[4, 8, 8, 16, 16])),
    ('vgg', dict(n_channels=[8, 16], n_layers=[1, 2], use_bn=False)),
    ('resnet', dict(depth=11, base_channels=4, block_type='bottleneck')),
    ('resnet', dict(depth=8, base_channels=8, se_reduction=4)),
    ('resnet_preact', dict(depth=11, base_channels=4, block_type='bottleneck', widening_factor=2,
                           preact_stage=[True, False, False], remove_first_relu=True,
                           add_last_bn=True)),
    ('se_resnet_preact', dict(depth=11, base_channels=4, block_type='bottleneck')),
    ('wrn', dict(depth=10, widening_factor=2, base_channels=4, drop_rate=0.3, se_reduction=2)),
    ('densenet', dict(depth=10, block_type='basic', growth_rate=4)),
    ('densenet', dict(depth=10, block_type='bottleneck', growth_rate=4, drop_rate=0.1)),
    ('densenet', dict(depth=10, block_type='bottleneck', growth_rate=4, memory_efficient=True)),
    ('pyramidnet', dict(depth=11, block_type='bottleneck', pyramid_alpha=8, base_channels=4)),
    ('pyramidnet', dict(depth=8, block_type='basic', pyramid_alpha=8, base_channels=4, use_shakedrop=True)),
    ('resnet9', dict(base_channels=8)),
    ('resnet9', dict(base_channels=4, activation='celu', ghost_bn_splits=2, head_scale=0.0625)),
]
CONFIGS = [(arch, models.get_test_config(arch) or {}) for arch in ARCHS] + VARIANTS
# in training these skip whole blocks, whose parameters then get no gradient
SKIPS_BLOCKS = {'resnet_stochastic_depth'}
CORE_ARCHS = {'vgg', 'resnet', 'resnet_preact', 'wrn', 'se_resnet_preact'}


def test_forward_backward_configs_cover_every_registered_model():
    assert CORE_ARCHS <= set(ARCHS)
    assert [arch for arch, _ in CONFIGS[:len(ARCHS)]] == ARCHS
    assert {arch for arch, _ in VARIANTS} <= set(ARCHS)
    assert all(flags != models.get_test_config(arch) for arch, flags in VARIANTS)


@pytest.mark.parametrize('in_channels, size, num_classes', INPUTS, ids=['cifar10', 'cifar100', 'mnist'])
@pytest.mark.parametrize('arch, flags', CONFIGS, ids=[config_id(a, f) for a, f in CONFIGS])
def test_forward_backward(arch, flags, in_channels, size, num_classes):
    torch.manual_seed(0)
    model = models.create_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=size, **flags)
    images = torch.randn(4, in_channels, size, size)
    targets = torch.arange(4) % num_classes
    model.train()
    logits = model(images)
    assert logits.shape == (4, num_classes)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, targets).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and arch not in SKIPS_BLOCKS:
            assert parameter.grad is not None, name
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    if arch != 'airbench':  # airbench's whitening filters are zero until initialized from the training images
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert first_conv.weight.grad.abs().sum() > 0
    # in eval every trainable parameter takes part
    model.zero_grad(set_to_none=True)
    model.eval()
    logits = model(images)
    assert logits.shape == (4, num_classes) and torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, targets).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    with torch.no_grad():
        assert model(torch.randn(3, in_channels, size, size)).shape == (3, num_classes)


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
def test_builder_has_a_docstring_and_its_module_cites_the_paper(arch):
    builder = models.registry.get_builder(arch)
    assert builder.__doc__, f'{arch}: the builder needs a docstring (--list_archs and the flags use it)'
    module = inspect.getmodule(builder)
    assert 'arXiv' in module.__doc__ or 'myrtle.ai' in module.__doc__, f'{module.__name__}: cite the paper'


def as_flag_value(value):
    """A builder default as the value of its flag: a tuple is the list a user gives."""
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize('arch', ARCHS)
def test_builder_defaults_lie_in_their_flags_domains(arch):
    """The registry shows the builders' defaults (--list_archs); each is a value the flag accepts."""
    specs = models.model_flags()
    for flag, default in models.model_params(arch).items():
        assert default is not inspect.Parameter.empty, f'{arch}: --{flag} needs a default'
        specs[flag].domain.check(as_flag_value(default))
        if default is not None:
            models.registry.check_flag(specs[flag], default, arch)  # what create_model checks


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


# Blocks of models/common.py that main.py uses (--init), not the families.
COMMON_FOR_MAIN = {'INIT_SCHEMES', 'reinitialize'}


def test_common_holds_only_what_two_families_share():
    """A layer or helper that one family alone uses lives in that family's file (timm's rule)."""
    folder = os.path.dirname(models.__file__)
    common = open(os.path.join(folder, 'common.py')).read()
    names = re.findall(r'^(?:def|class) (\w+)|^([A-Z_]+) =', common, flags=re.MULTILINE)
    names = [a or b for a, b in names if not (a or b).startswith('_')]
    families = {filename: open(os.path.join(folder, filename)).read() for filename in sorted(os.listdir(folder))
                if filename.endswith('.py') and filename not in ('__init__.py', 'common.py', 'registry.py')}
    for name in names:
        users = [filename for filename, source in families.items() if re.search(rf'\b{name}\b', source)]
        if name in COMMON_FOR_MAIN:
            assert not users, name
            continue
        assert len(users) >= 2, f'models.common.{name} is used by {users or "no family"}: move it there'
    assert 'GhostBatchNorm2d' not in names and 'ShakeDrop' not in names


# ----------------------------------------------------------------------------- model flags and their domains

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


def test_a_flag_without_a_table_entry_gets_a_domain_from_its_type():
    registry = models.registry

    def builder(*, width: int = None, ratio=0.5, names: list[str] = None, sizes=(2, 3), switches=(True,),
                scales=(0.5, 1), mode: typing.Literal['x', 'y'] = 'x', label='a', flag=True, num_classes=10,
                in_channels=3):
        """A builder."""
        return nn.Linear(in_channels, num_classes)

    saved = dict(registry._BUILDERS), dict(registry._TRAIN_DEFAULTS), dict(registry._TEST_CONFIGS)
    try:
        registry.register_model('zz_test_builder')(builder)
        specs = registry.model_flags()
        expected = {'width': 'an integer', 'ratio': 'a finite number', 'flag': 'true or false (1/0, yes/no)',
                    'mode': 'one of x, y', 'label': 'a string',
                    'names': 'a JSON list of strings (e.g. ["1"])', 'sizes': 'a JSON list of integers (e.g. [0,1])',
                    'switches': 'a JSON list of booleans (true/false) (e.g. [true,false])',
                    'scales': 'a JSON list of finite numbers (e.g. [0.5])'}
        for flag, words in expected.items():
            assert specs[flag].domain.optional and specs[flag].domain.check(None) is None, flag
            assert specs[flag].domain._describe() == words, flag
        assert isinstance(registry.create_model('zz_test_builder', width=-3, names=['a'], sizes=[1]), nn.Linear)
        for flag, value, words in [('width', 1.5, 'an integer'), ('mode', 'z', 'one of x, y'),
                                   ('names', [1], 'a JSON list of strings'),
                                   ('sizes', ['a'], 'a JSON list of integers'),
                                   ('flag', 'yes', 'true or false'), ('ratio', float('inf'), 'a finite number')]:
            with pytest.raises(ModelConfigError) as error:
                registry.create_model('zz_test_builder', **{flag: value})
            assert str(error.value).startswith(f'--{flag} {flags.show(value)}: zz_test_builder needs {words}')
    finally:
        registry._BUILDERS, registry._TRAIN_DEFAULTS, registry._TEST_CONFIGS = saved[0], saved[1], saved[2]


KIND_DOMAINS = {'int': flags.Int, 'float': flags.Real, 'bool': flags.Bool, 'list': flags.ListOf,
                'str': (flags.Choice, flags.Text)}


def test_flag_table_agrees_with_the_builders():
    """Every entry of models.registry.FLAGS names a builder argument, optional and of the argument's type
    (the choices of a Literal annotation are the domain's); every builder argument has an entry."""
    specs = models.model_flags()
    assert set(models.registry.FLAGS) == set(specs)
    assert list(specs) == list(models.registry.FLAGS)  # --help lists them in the table's order
    for flag, (help_text, domain) in models.registry.FLAGS.items():
        spec = specs[flag]
        assert spec.domain is domain and domain.optional, flag
        assert isinstance(domain, KIND_DOMAINS[spec.kind]), flag
        if spec.choices:
            assert domain.choices == spec.choices, flag
        assert spec.help == help_text or help_text is None and spec.help, flag
    assert models.model_flag_names() == list(specs)


@pytest.mark.parametrize('flag', sorted(models.model_flags()))
def test_create_model_checks_every_flag_against_its_domain(flag):
    spec = models.model_flags()[flag]
    arch = spec.archs[0]
    with pytest.raises(ModelConfigError) as error:
        models.create_model(arch, **{flag: '@invalid'})
    assert str(error.value) == f'--{flag} @invalid: {arch} needs {spec.domain._describe()}'
    assert isinstance(error.value, flags.UsageError) and isinstance(error.value, ValueError)


# (arch, flags, what the message starts with, words it contains): a flag outside its domain (create_model's
# check, the domain's words) or a relation a builder checks (depth arithmetic, one entry per stage, ...).
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
    ('densenet', dict(depth=101), '--depth 101: densenet with bottleneck blocks needs depth = 6n+4', None),
    ('densenet', dict(depth=101, block_type='basic'), '--depth 101: densenet with basic blocks needs depth = 3n+4',
     None),
    ('densenet', dict(block_type='wide'), '--block_type wide', None),
    ('densenet', dict(growth_rate=0), '--growth_rate 0', None),
    ('densenet', dict(compression_rate=0.0), '--compression_rate 0.0', None),
    ('densenet', dict(compression_rate=1.5), '--compression_rate 1.5', None),
    ('densenet', dict(drop_rate=1.0), '--drop_rate 1.0', None),
    ('pyramidnet', dict(depth=21, block_type='basic'), '--depth 21: pyramidnet with basic blocks needs depth = 6n+2',
     None),
    ('pyramidnet', dict(depth=57), '--depth 57: pyramidnet with bottleneck blocks needs depth = 9n+2', None),
    ('pyramidnet', dict(block_type='preact'), '--block_type preact', None),
    ('pyramidnet', dict(pyramid_alpha=-1), '--pyramid_alpha -1', None),
    ('resnext', dict(depth=30), '--depth 30: resnext needs depth = 9n+2', None),
    ('resnext', dict(cardinality=0), '--cardinality 0', None),
    ('shake_shake', dict(depth=25), '--depth 25: shake_shake needs depth = 6n+2', None),
    ('shake_shake', dict(base_channels=5), '--base_channels 5', None),
    ('resnet9', dict(base_channels=0), '--base_channels 0', None),
    ('resnet9', dict(depth=9), '--depth does not apply to --arch resnet9', None),
    ('resnet9', dict(activation='gelu'), '--activation gelu: resnet9 needs one of relu, celu', None),
    ('resnet9', dict(activation='celu', celu_alpha=0.0), '--celu_alpha 0.0: resnet9 needs a number > 0', None),
    ('resnet9', dict(celu_alpha=0.075), '--celu_alpha 0.075: applies only with --activation celu', None),
    ('resnet9', dict(ghost_bn_splits=0), '--ghost_bn_splits 0: resnet9 needs an integer >= 1', None),
    ('resnet9', dict(head_scale=0.0), '--head_scale 0.0: resnet9 needs a number > 0', None),
    ('resnet', dict(activation='celu'), '--activation does not apply to --arch resnet', None),
    ('wrn', dict(celu_alpha=0.3), '--celu_alpha does not apply to --arch wrn', None),
    ('airbench', dict(ghost_bn_splits=16), '--ghost_bn_splits does not apply to --arch airbench', None),
    ('densenet', dict(head_scale=0.0625), '--head_scale does not apply to --arch densenet', None),
    ('airbench', dict(n_channels=[64, 256]), '--n_channels [64, 256]: airbench needs three widths', None),
    ('airbench', dict(n_channels=[64, 0, 256]),
     '--n_channels [64, 0, 256]: airbench needs a JSON list of 1 or more integers >= 1', None),
    ('airbench', dict(depth=8), '--depth does not apply to --arch airbench', None),
    ('airbench', dict(head_scale=0), '--head_scale 0: airbench', None),
    ('swin_t', dict(models.get_test_config('swin_t'), window_size=3),
     '--window_size 3: swin_t needs a window that divides', None),
    ('vit', dict(models.get_test_config('vit'), patch_size=5),
     '--patch_size 5: vit needs a divisor of the image size (32)', None),
    ('vit', dict(embed_dim=10, num_heads=4, depth=1), '--embed_dim 10: vit needs a multiple of --num_heads (4)', None),
    ('pyramidnet', dict(depth=20, block_type='basic', shakedrop_survival=0.5), '--shakedrop_survival 0.5',
     'needs --use_shakedrop'),
    ('pyramidnet', dict(depth=20, block_type='basic', use_shakedrop=True, shakedrop_survival=1.5),
     '--shakedrop_survival 1.5', None),
    # the domains' ends, and values the library accepted before its flags' domains did not
    ('resnet', dict(depth=0), '--depth 0: resnet needs an integer >= 1', None),
    ('mobilenet', dict(width_multiplier=0.0), '--width_multiplier 0.0: mobilenet needs a number > 0', None),
    ('efficientnet_b0', dict(depth_multiplier=-1.0), '--depth_multiplier -1.0: efficientnet_b0 needs a number > 0',
     None),
    ('vit', dict(drop_path_rate=1.0), '--drop_path_rate 1.0: vit needs a number in [0, 1)', None),
    ('vit', dict(mlp_ratio=float('nan')), '--mlp_ratio NaN: vit needs a number > 0', None),
    ('regnetx_200mf', dict(group_width=0), '--group_width 0: regnetx_200mf needs an integer >= 1', None),
    ('densenet121', dict(n_blocks=[6, 0, 24, 16]),
     '--n_blocks [6, 0, 24, 16]: densenet121 needs a JSON list of 1 or more integers >= 1', None),
    ('pyramidnet', dict(pyramid_alpha=8.5), '--pyramid_alpha 8.5: pyramidnet needs an integer >= 0', None),
    ('shake_shake', dict(shake_image=1), '--shake_image 1: shake_shake needs true or false', None),
    ('resnet', dict(se_reduction=0), '--se_reduction 0: resnet needs an integer >= 1', None),
    ('swin_t', dict(n_blocks=[2, 2, 6]), '--n_blocks [2, 2, 6]: swin_t needs 4 entries, one per stage', None),
    ('coatnet_0', dict(n_channels=[64, 96, 192, 384, 770]), '--n_channels 770: coatnet_0 needs a multiple of '
     '--head_dim (32)', None),
]


@pytest.mark.parametrize('arch, flags, prefix, mention', INVALID,
                         ids=[f'{arch} {prefix}' for arch, _, prefix, _ in INVALID])
def test_invalid_configuration_names_the_flag(arch, flags, prefix, mention):
    with pytest.raises(ModelConfigError) as error:
        create_model(arch, **flags)
    assert str(error.value).startswith(prefix)
    if mention is not None:
        assert mention in str(error.value)


def test_create_model_drops_none_and_rejects_foreign_flags():
    model = create_model('resnet', depth=8, base_channels=None, block_type=None, drop_rate=None,
                         n_channels=None, se_reduction=None)
    assert model.conv.out_channels == 16
    assert isinstance(model.stage1.block1.shortcut, nn.Identity)
    with pytest.raises(ModelConfigError, match='^--drop_rate'):
        create_model('resnet', depth=8, drop_rate=0.1)


def test_image_size_reaches_only_builders_that_take_it():
    vit = models.create_model('vit', image_size=28, **models.get_test_config('vit'))
    assert vit.pos_embed.shape[1] == 7 * 7 + 1
    resnet = models.create_model('resnet', image_size=28, depth=8, base_channels=4)
    assert resnet(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_registry_module_imports_without_torch():
    """The command line is built from the registry's flags (a later issue parses them before torch loads)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(models.__file__)))
    code = ('import importlib.util, sys; sys.path.insert(0, sys.argv[1]); '
            'spec = importlib.util.spec_from_file_location("registry", sys.argv[2]); '
            'module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); '
            'print(sorted(name for name in sys.modules if name.split(".")[0] == "torch"))')
    out = subprocess.run([sys.executable, '-c', code, root, os.path.join(root, 'models', 'registry.py')],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'


def test_model_kwargs_reads_a_namespace_or_a_dict():
    names = models.model_flag_names()
    namespace = argparse.Namespace(arch='swin_t', n_blocks=[2, 2, 2, 2], drop_path_rate=0.1, depth=None, epochs=3)
    kwargs = models.model_kwargs(namespace)
    assert list(kwargs) == names and 'arch' not in kwargs and 'epochs' not in kwargs
    assert (kwargs['n_blocks'], kwargs['drop_path_rate'], kwargs['depth'], kwargs['window_size']) == \
        ([2, 2, 2, 2], 0.1, None, None)
    assert models.model_kwargs(vars(namespace)) == kwargs
    assert models.model_kwargs({}) == dict.fromkeys(names)
    model = models.create_model('vgg', **models.model_kwargs(dict(n_channels=[4, 8], n_layers=[1, 1], lr=0.1)))
    assert model.num_features == 8


DatasetShape = collections.namedtuple('DatasetShape', 'num_classes in_channels image_size')
CIFAR10_SHAPE, MNIST_SHAPE = DatasetShape(10, 3, 32), DatasetShape(10, 1, 28)


@pytest.mark.parametrize('depth, params_m, macs_m', [(20, 0.27, 41), (56, 0.85, 125), (110, 1.7, 253)])
def test_model_cost_matches_the_papers(depth, params_m, macs_m):
    # He et al., arXiv 1512.03385, table 6 (parameters); 41 M / 125 M / 253 M multiply-adds are the
    # figures quoted for these networks (e.g. Huang et al., arXiv 1608.06993's comparisons)
    params, macs = models.model_cost('resnet', CIFAR10_SHAPE, depth=depth)
    assert params / 1e6 == pytest.approx(params_m, rel=0.03)
    assert macs / 1e6 == pytest.approx(macs_m, rel=0.03)


def test_model_cost_follows_the_input_size_and_the_model_flags():
    _, macs_32 = models.model_cost('resnet', CIFAR10_SHAPE, depth=20)
    _, macs_28 = models.model_cost('resnet', MNIST_SHAPE, depth=20)
    assert macs_28 / macs_32 == pytest.approx((28 / 32) ** 2, rel=0.02)
    params_narrow, macs_narrow = models.model_cost('resnet', CIFAR10_SHAPE, depth=20, base_channels=8)
    assert macs_narrow / macs_32 == pytest.approx(0.25, rel=0.02) and params_narrow < 0.3 * 0.27e6
    _, vit_macs = models.model_cost('vit', CIFAR10_SHAPE, embed_dim=64, depth=2, num_heads=2)
    assert vit_macs > 0  # attention and linear layers are counted
    with pytest.raises(ModelConfigError, match='^--depth 21: resnet'):
        models.model_cost('resnet', CIFAR10_SHAPE, depth=21)


@pytest.mark.parametrize('arch, recipe', [('resnet18', 'CNN_RECIPE'), ('dla', 'CNN_RECIPE'),
                                          ('vit', 'TRANSFORMER_RECIPE'), ('swin_t', 'TRANSFORMER_RECIPE')])
def test_families_register_the_shared_recipes(arch, recipe):
    assert models.train_defaults(arch) == getattr(models.registry, recipe)


# ----------------------------------------------------------------------------- recorded signatures

SIGNATURES_PATH = os.path.join(os.path.dirname(__file__), 'data', 'model_signatures.json')


# (arch, flags, num_classes, in_channels) recorded in the fixture. The networks of the original tool's
# published tables (with their regularization rows' variants), each arch's defaults, and the small
# configurations the tests build; a few with 100 classes or one input channel (28x28 images for the
# transformers, whose position tables follow the image size), whose head and stem differ.
SIGNATURE_CONFIGS = [
    # the original tool's published tables
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
    # small configurations of the tests (tests/test_models.py, test_main.py)
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
    # the models of the CIFAR tricks collection, at their defaults
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


# ----------------------------------------------------------------------------- parameter counts


def printed(millions):
    """A figure as a paper prints it, in millions: the true count is within half a unit of its last digit."""
    decimals = len(millions.split('.')[1])
    return float(millions) * 1e6, 0.5 * 10 ** -decimals * 1e6


def one_decimal(millions):
    """A figure printed with one decimal: within that rounding or 1%, whichever is larger."""
    return millions * 1e6, max(0.01 * millions, 0.05) * 1e6


def within(count, fraction):
    return count, fraction * count


def exact(count):
    return count, 0


def mib_to_parameters(mib):
    """The CIFAR tricks README lists 'weight:M', the MiB of the float32 state_dict: parameters and
    BN buffers at 4 bytes each (its ViT, 12,470,026 parameters when built from its code, is 47.57 MiB)."""
    return mib * 2 ** 20 / 4


TOOLKIT = 'CIFAR tricks README table (pprp/pytorch-cifar-tricks), weight:M in MiB of float32 weights'
KUANGLIU = 'kuangliu/pytorch-cifar, copied by the CIFAR tricks collection (lib/models/cnn), counted from its code'

# (arch, build arguments, what is counted, reference count, tolerance in parameters, source). 'params'
# counts parameters; 'state' the state_dict (buffers too), as the CIFAR tricks table does; 'params
# without projections' leaves out the 1x1 projection shortcuts: He et al. 1512.03385 Table 6 counts CIFAR
# ResNets with parameter-free (option A) shortcuts, ours project with conv+BN (option B). The papers'
# ImageNet networks have 1000 classes, which the builders reproduce with num_classes=1000 (and
# image_size/patch_size/window_size where the paper's network depends on them).
PAPER_COUNTS = [
    # He et al. arXiv 1512.03385 Table 6; 1603.05027 Table 2; 1605.07146 Table 3
    ('resnet', dict(depth=20), 'params without projections', *printed('0.27'), 'arXiv 1512.03385 Table 6'),
    ('resnet', dict(depth=32), 'params without projections', *printed('0.46'), 'arXiv 1512.03385 Table 6'),
    ('resnet', dict(depth=44), 'params without projections', *printed('0.66'), 'arXiv 1512.03385 Table 6'),
    ('resnet', dict(depth=56), 'params without projections', *printed('0.85'), 'arXiv 1512.03385 Table 6'),
    ('resnet', dict(depth=110), 'params without projections', *printed('1.7'), 'arXiv 1512.03385 Table 6'),
    ('resnet_preact', dict(depth=164, block_type='bottleneck'), 'params', *printed('1.7'), 'arXiv 1603.05027 Table 2'),
    ('wrn', dict(depth=28, widening_factor=10), 'params', *printed('36.5'), 'arXiv 1605.07146 Table 3'),
    ('wrn', dict(depth=16, widening_factor=8), 'params', *printed('11.0'), 'arXiv 1605.07146 Table 3'),
    # DenseNet, arXiv 1608.06993, Table 2
    ('densenet', dict(depth=40, block_type='basic', growth_rate=12), 'params', *one_decimal(1.0),
     'arXiv 1608.06993 Table 2'),
    ('densenet', dict(depth=100, block_type='basic', growth_rate=12), 'params', *one_decimal(7.0),
     'arXiv 1608.06993 Table 2'),
    ('densenet', dict(depth=100, block_type='basic', growth_rate=24), 'params', *one_decimal(27.2),
     'arXiv 1608.06993 Table 2'),
    ('densenet', dict(depth=100, block_type='bottleneck', growth_rate=12), 'params', *one_decimal(0.8),
     'arXiv 1608.06993 Table 2'),
    ('densenet', dict(depth=250, block_type='bottleneck', growth_rate=24), 'params', *one_decimal(15.3),
     'arXiv 1608.06993 Table 2'),
    ('densenet', dict(depth=190, block_type='bottleneck', growth_rate=40), 'params', *one_decimal(25.6),
     'arXiv 1608.06993 Table 2'),
    # PyramidNet, arXiv 1610.02915, Table 4. The authors' Lua code gives 0.1-0.2 M more than the
    # table for every row (no width rounding rule reproduces all rows); alpha=84 is 2.7% above.
    ('pyramidnet', dict(depth=110, block_type='basic', pyramid_alpha=84), 'params', 3.8e6, 0.11e6,
     'arXiv 1610.02915 Table 4'),
    ('pyramidnet', dict(depth=110, block_type='basic', pyramid_alpha=270), 'params', *one_decimal(28.3),
     'arXiv 1610.02915 Table 4'),
    ('pyramidnet', dict(depth=164, block_type='bottleneck', pyramid_alpha=270), 'params', *one_decimal(27.0),
     'arXiv 1610.02915 Table 4'),
    ('pyramidnet', dict(depth=272, block_type='bottleneck', pyramid_alpha=200), 'params', *one_decimal(26.0),
     'arXiv 1610.02915 Table 4'),
    # ResNeXt, arXiv 1611.05431, Table 7
    ('resnext', dict(depth=29, cardinality=8, base_channels=64), 'params', *one_decimal(34.4),
     'arXiv 1611.05431 Table 7'),
    ('resnext', dict(depth=29, cardinality=16, base_channels=64), 'params', *one_decimal(68.1),
     'arXiv 1611.05431 Table 7'),
    # Shake-Shake, arXiv 1705.07485, Table 1
    ('shake_shake', dict(depth=26, base_channels=32), 'params', *one_decimal(2.9), 'arXiv 1705.07485 Table 1'),
    ('shake_shake', dict(depth=26, base_channels=64), 'params', *one_decimal(11.7), 'arXiv 1705.07485 Table 1'),
    ('shake_shake', dict(depth=26, base_channels=96), 'params', *one_decimal(26.2), 'arXiv 1705.07485 Table 1'),
    # ResNet-9 and airbench: their closed forms (test_resnet9_parameter_count_closed_form,
    # test_airbench_parameter_count)
    ('resnet9', {}, 'params', *exact(6_573_120), "Page, myrtle.ai 'How to train your ResNet' 4 (about 6.57 M)"),
    ('airbench', {}, 'params', *exact(1_972_792), 'arXiv 2404.00498 (about 1.97 M)'),
    # the CIFAR tricks collection's transformers, within 5% of its table
    ('vit', {}, 'state', *within(mib_to_parameters(47.6), 0.05), TOOLKIT),
    ('cvt', {}, 'state', *within(mib_to_parameters(75), 0.05), TOOLKIT),
    ('swin_t', {}, 'state', *within(mib_to_parameters(104), 0.05), TOOLKIT),
    ('swin_s', {}, 'state', *within(mib_to_parameters(184), 0.05), TOOLKIT),
    ('mobilevit_s', {}, 'state', *within(mib_to_parameters(19.2), 0.05), TOOLKIT),
    ('mobilevit_xs', {}, 'state', *within(mib_to_parameters(7.78), 0.05), TOOLKIT),
    # the papers' ImageNet networks, within 5%
    ('mobilevit_s', dict(num_classes=1000), 'params', *within(5.6e6, 0.05), 'arXiv 2110.02178 Table 1 (MobileViT-S)'),
    ('mobilevit_xs', dict(num_classes=1000), 'params', *within(2.3e6, 0.05),
     'arXiv 2110.02178 Table 1 (MobileViT-XS)'),
    ('mobilevit_xxs', dict(num_classes=1000), 'params', *within(1.3e6, 0.05),
     'arXiv 2110.02178 Table 1 (MobileViT-XXS)'),
    ('coatnet_0', dict(num_classes=1000, image_size=224), 'params', *within(25e6, 0.05),
     'arXiv 2106.04803 Table 5 (CoAtNet-0)'),
    ('coatnet_1', dict(num_classes=1000, image_size=224), 'params', *within(42e6, 0.05),
     'arXiv 2106.04803 Table 5 (CoAtNet-1)'),
    ('coatnet_2', dict(num_classes=1000, image_size=224), 'params', *within(75e6, 0.05),
     'arXiv 2106.04803 Table 5 (CoAtNet-2)'),
    ('cvt', dict(num_classes=1000), 'params', *within(20e6, 0.05), 'arXiv 2103.15808 Table 3 (CvT-13)'),
    ('swin_t', dict(num_classes=1000, image_size=224, patch_size=4, window_size=7), 'params', *within(28e6, 0.05),
     'arXiv 2103.14030 Table 1 (Swin-T)'),
    ('swin_s', dict(num_classes=1000, image_size=224, patch_size=4, window_size=7), 'params', *within(50e6, 0.05),
     'arXiv 2103.14030 Table 1 (Swin-S)'),
    ('resnet18', dict(num_classes=1000), 'params', *within(11.7e6, 0.05),
     'arXiv 1512.03385 Table 1 / torchvision (ResNet-18)'),
    ('resnet34', dict(num_classes=1000), 'params', *within(21.8e6, 0.05), 'arXiv 1512.03385 / torchvision (ResNet-34)'),
    ('resnet50', dict(num_classes=1000), 'params', *within(25.6e6, 0.05), 'arXiv 1512.03385 / torchvision (ResNet-50)'),
    ('preact_resnet18', {}, 'params', *within(11_171_146, 0.05), KUANGLIU + ' (PreActResNet18)'),
    ('senet18', {}, 'params', *within(11_260_354, 0.05), KUANGLIU + ' (SENet18)'),
    ('regnetx_200mf', dict(num_classes=1000), 'params', *within(2.7e6, 0.05), 'arXiv 2003.13678 Table (RegNetX-200MF)'),
    ('regnety_400mf', dict(num_classes=1000), 'params', *within(4.3e6, 0.05), 'arXiv 2003.13678 Table (RegNetY-400MF)'),
    ('densenet121', dict(num_classes=1000), 'params', *within(8.0e6, 0.05),
     'arXiv 1608.06993 (DenseNet-121 on ImageNet)'),
    ('dla', {}, 'params', *within(16_291_386, 0.05), KUANGLIU + ' (DLA)'),
    ('googlenet', dict(num_classes=1000), 'params', *within(6.8e6, 0.05),
     'arXiv 1409.4842 Table 1 (sum of its params column)'),
    ('efficientnet_b0', dict(num_classes=1000), 'params', *within(5.3e6, 0.05),
     'arXiv 1905.11946 Table 2 (EfficientNet-B0)'),
    ('mobilenet', dict(num_classes=1000), 'params', *within(4.2e6, 0.05),
     'arXiv 1704.04861 Table 8 (1.0 MobileNet-224)'),
    ('mobilenetv2', dict(num_classes=1000), 'params', *within(3.4e6, 0.05),
     'arXiv 1801.04381 Table 4 (MobileNetV2 1.0)'),
    ('dpn26', {}, 'params', *within(11_574_842, 0.05), KUANGLIU + ' (DPN26)'),
    ('dpn92', dict(num_classes=1000), 'params', *within(37.7e6, 0.05), 'arXiv 1707.01629 Table 2 (DPN-92)'),
    ('resnet_stochastic_depth', {}, 'params', *within(1.7e6, 0.05),
     'arXiv 1603.09382 trains the 110-layer ResNet of arXiv 1512.03385 Table 6 (1.7 M)'),
    # kuangliu/pytorch-cifar's networks, which the CIFAR tricks collection copies: same layers, same count
    ('resnet18', {}, 'params', *exact(11_173_962), KUANGLIU + ' (ResNet18)'),
    ('resnet34', {}, 'params', *exact(21_282_122), KUANGLIU + ' (ResNet34)'),
    ('resnet50', {}, 'params', *exact(23_520_842), KUANGLIU + ' (ResNet50)'),
    ('densenet121', {}, 'params', *exact(6_956_298), KUANGLIU + ' (DenseNet121)'),
    ('dla', {}, 'params', *exact(16_291_386), KUANGLIU + ' (DLA)'),
    ('dpn26', {}, 'params', *exact(11_574_842), KUANGLIU + ' (DPN26)'),
    ('dpn92', {}, 'params', *exact(34_236_634), KUANGLIU + ' (DPN92)'),
]


def shortcut_parameters(model):
    return sum(p.numel() for name, p in model.named_parameters() if '.shortcut.' in name)


def counted(model, what):
    if what == 'state':
        return sum(value.numel() for value in model.state_dict().values())
    count = count_parameters(model)
    return count - shortcut_parameters(model) if what == 'params without projections' else count


@pytest.mark.parametrize('arch, kwargs, what, reference, tolerance, source', PAPER_COUNTS,
                         ids=[f'{config_id(a, k)}-{int(r)}' + ('-exact' if t == 0 else '')
                              for a, k, _, r, t, _ in PAPER_COUNTS])
def test_parameter_count_matches_the_reference(arch, kwargs, what, reference, tolerance, source):
    count = counted(build_on_meta(arch, **kwargs), what)
    assert abs(count - reference) <= tolerance + 1e-6, \
        f'{arch}: {count:,} vs {reference:,.0f} +- {tolerance:,.0f} ({source})'


# ----------------------------------------------------------------------------- residual networks and VGG

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


# ----------------------------------------------------------------------------- training and model flag defaults

# The original tool's per-architecture configs (epochs, batch, lr, wd, milestones, lr decay); all SGD
# momentum 0.9 Nesterov (main.py's defaults).
ORIGINAL_TRAINING = {
    'vgg': (160, 128, 0.1, 1e-4, [80, 120], 0.1),
    'resnet': (160, 128, 0.1, 1e-4, [80, 120], 0.1),
    'resnet_preact': (160, 128, 0.1, 1e-4, [80, 120], 0.1),
    'wrn': (200, 128, 0.1, 5e-4, [60, 120, 160], 0.2),
    'se_resnet_preact': (160, 128, 0.1, 1e-4, [80, 120], 0.1),
}


@pytest.mark.parametrize('arch', sorted(ORIGINAL_TRAINING))
def test_training_defaults_match_the_original_configs(arch):
    epochs, batch_size, base_lr, weight_decay, milestones, lr_decay = ORIGINAL_TRAINING[arch]
    assert train_defaults(arch) == dict(epochs=epochs, batch_size=batch_size, base_lr=base_lr,
                                        weight_decay=weight_decay, scheduler='multistep',
                                        milestones=milestones, lr_decay=lr_decay)


def test_model_flag_defaults_match_the_original_configs():
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


ORIGINAL_CONFIGS = {
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


@pytest.mark.parametrize('arch', sorted(ORIGINAL_CONFIGS))
def test_defaults_follow_the_original_configs(arch):
    model_defaults, training = ORIGINAL_CONFIGS[arch]
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


def test_airbench_training_defaults():
    defaults = models.train_defaults('airbench')
    assert (defaults['epochs'], defaults['batch_size']) == (8, 2000)


# --------------------------------------------------------------------------- DenseNet, PyramidNet, ResNeXt, Shake-Shake

# Every configuration of these families in the original tool's published tables, CIFAR-10 heads.
PUBLISHED_CONFIGS = [
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


@pytest.mark.parametrize('arch, flags', PUBLISHED_CONFIGS, ids=[config_id(a, f) for a, f in PUBLISHED_CONFIGS])
def test_published_configurations_build(arch, flags):
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


@pytest.mark.parametrize('arch, flags', [
    ('densenet', dict(depth=10, block_type='basic', growth_rate=4)),
    ('densenet', dict(depth=10, block_type='bottleneck', growth_rate=4, memory_efficient=True)),
    ('pyramidnet', dict(depth=11, block_type='bottleneck', pyramid_alpha=8, base_channels=4)),
    ('shake_shake', dict(depth=8, base_channels=4)),
])
def test_children_are_named_by_stage_and_block(arch, flags):
    names = {name for name, _ in build_on_meta(arch, **flags).named_modules()}
    assert {'stage1', 'stage2', 'stage3'} <= names, arch
    assert 'stage1.block1' in names and 'stage3.block1' in names, arch


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


# ----------------------------------------------------------------------------- ShakeDrop (pyramidnet)

def shakedrop_modules(model):
    return [module for module in model.modules() if isinstance(module, ShakeDrop)]


@pytest.mark.parametrize('final, block_type, depth', [(0.5, 'basic', 20), (0.8, 'bottleneck', 20)])
def test_shakedrop_survival_decays_linearly_to_the_last_block(final, block_type, depth):
    flags = {} if final == 0.5 else dict(shakedrop_survival=final)
    model = models.create_model('pyramidnet', depth=depth, block_type=block_type, pyramid_alpha=12,
                                use_shakedrop=True, **flags)
    survival = [module.survival for module in shakedrop_modules(model)]
    n_blocks = len(survival)
    assert n_blocks == 3 * ((depth - 2) // (6 if block_type == 'basic' else 9))
    # p_l = 1 - l / L (1 - p_L), l = 1..L (arXiv 1802.02375, section 4.1)
    assert survival == pytest.approx([1 - (l / n_blocks) * (1 - final) for l in range(1, n_blocks + 1)])
    assert survival[-1] == pytest.approx(final)
    assert linear_survival_probabilities(0.5, 2) == pytest.approx([0.75, 0.5])


def test_shakedrop_adds_no_parameters_and_is_off_by_default():
    plain = models.create_model('pyramidnet', depth=20, block_type='basic', pyramid_alpha=12)
    shaken = models.create_model('pyramidnet', depth=20, block_type='basic', pyramid_alpha=12, use_shakedrop=True)
    assert not shakedrop_modules(plain)
    assert plain.state_dict().keys() == shaken.state_dict().keys()
    assert shaken(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_shakedrop_at_eval_is_its_expectation_in_training():
    torch.manual_seed(0)
    shakedrop = ShakeDrop(0.7)
    x = torch.randn(4, 3, 5, 5)
    assert torch.allclose(shakedrop.eval()(x), 0.7 * x)
    shakedrop.train()
    draws = torch.stack([shakedrop(x) for _ in range(4000)])
    # E[b + alpha - b alpha] = p + (1 - p) E[alpha] = p for alpha uniform in [-1, 1]
    ratio = (draws / x).mean()
    assert ratio.item() == pytest.approx(0.7, abs=0.03)
    # per forward pass one gate: the draws that kept the branch are x exactly, the others are not
    kept = (draws == x).flatten(1).all(1)
    assert 0.6 < kept.float().mean().item() < 0.8
    assert not torch.isclose(draws[~kept], x.expand_as(draws)[~kept]).all()
    # other alpha range: expectation p + (1 - p)(low + high) / 2
    assert torch.allclose(ShakeDrop(0.5, alpha_range=(0, 1)).eval()(x), 0.75 * x)


def test_shakedrop_dropped_branch_scales_forward_by_alpha_and_backward_by_independent_beta():
    torch.manual_seed(0)
    x = torch.rand(2000).add_(0.5).requires_grad_()
    y = ShakeDrop(0.0)(x)  # never survives: forward alpha x, backward beta grad
    y.sum().backward()
    alpha, beta = (y / x).detach(), x.grad
    assert alpha.min() < -0.9 and alpha.max() > 0.9 and (alpha >= -1).all() and (alpha <= 1).all()
    assert beta.min() < 0.05 and beta.max() > 0.95 and (beta >= 0).all() and (beta <= 1).all()
    assert abs(np.corrcoef(alpha.numpy(), beta.numpy())[0, 1]) < 0.1
    x.grad = None
    ShakeDrop(1.0)(x).sum().backward()  # always survives: identity both ways
    assert torch.equal(x.grad, torch.ones_like(x))


def test_shakedrop_pyramidnet_trains_randomly_and_evaluates_deterministically():
    torch.manual_seed(0)
    model = models.create_model('pyramidnet', depth=11, block_type='bottleneck', pyramid_alpha=12,
                                use_shakedrop=True, shakedrop_survival=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    out = model(x)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    outputs = [model(x) for _ in range(3)]
    assert not all(torch.allclose(outputs[0], o) for o in outputs[1:])
    model.eval()
    assert torch.equal(model(x), model(x))


# ----------------------------------------------------------------------------- ResNet-9: Page's final network

def test_resnet9_parameter_count_closed_form():
    base, classes = 64, 10
    convs = 3 * base + base * 2 * base + 2 * (2 * base) ** 2 + 2 * base * 4 * base \
        + 4 * base * 8 * base + 2 * (8 * base) ** 2
    batch_norms = 2 * (base + 3 * 2 * base + 4 * base + 3 * 8 * base)
    expected = 9 * convs + batch_norms + 8 * base * classes
    count = count_parameters(build_on_meta('resnet9'))
    assert count == expected
    assert 6.5e6 < count < 6.6e6


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


# ----------------------------------------------------------------------------- airbench

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


# --------------------------------------------------------------------------- transformers: CIFAR sizing, windows, masks

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


# ----------------------------------------------------------------------------- stochastic depth, dual path networks

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


# ----------------------------------------------------------------------------- --init: re-initializing a built model

def conv_and_linear(model):
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 2000]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return convs, linears


def test_init_kaiming_and_xavier_statistics():
    torch.manual_seed(0)
    model = models.create_model('wrn', depth=10, widening_factor=2)
    reinitialize(model, 'kaiming')
    convs, linears = conv_and_linear(model)
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    reinitialize(model, 'xavier')
    for layer in convs + linears:
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max().item() <= bound
        assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert layer.bias is None or not layer.bias.any()


def test_init_default_is_pytorchs_reset_parameters():
    torch.manual_seed(0)
    model = models.create_model('resnet', depth=20)  # resnet's own init is Kaiming normal, fan_out
    convs, _ = conv_and_linear(model)
    reinitialize(model, 'default')
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_ with a = sqrt(5)
        assert conv.weight.abs().max().item() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


if __name__ == '__main__':
    # PYTHONPATH=. python tests/test_models.py: (re)write the fixture from the current code
    write_signatures()
    print(f'wrote {len(SIGNATURE_CONFIGS)} signatures to {SIGNATURES_PATH}')
