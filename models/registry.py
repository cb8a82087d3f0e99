"""Registry mapping ``--arch`` names to model builders, and the model flags generated from them.

A builder is a function taking plain keyword-only arguments named like the command-line flags
(``depth``, ``base_channels``, ``block_type``, ...) plus the dataset's arguments ``num_classes``,
``in_channels`` and, where the network needs it (position embeddings, attention windows),
``image_size``. ``register_model`` attaches

- the training defaults of the architecture's recipe (epochs, batch size, optimizer, schedule,
  augmentation), which ``main.py`` applies when the user gives only ``--arch``;
- ``test_config``, the tiny configuration (a few thousand parameters) the tests build, so that a
  new model file is tested without editing a list.

Every keyword-only argument of every builder is a model flag: :func:`model_flags` derives its type
from the annotation or the default value (bool, int, float, str, list; ``Literal[...]`` gives
choices) and its help text from :data:`FLAG_HELP`, else from an ``Args:`` line of the builder's
docstring. A flag shared by several builders must have one type everywhere.
"""
import dataclasses
import inspect
import re
import typing

_BUILDERS = {}
_TRAIN_DEFAULTS = {}
_TEST_CONFIGS = {}

# Arguments that come from the dataset, never from model flags.
DATA_ARGS = ('num_classes', 'in_channels', 'image_size')

# Help of the model flags, in the order ``--help`` lists them. Flags not listed here take the
# ``Args:`` line of a builder's docstring, or name the archs that accept them.
FLAG_HELP = {
    'depth': 'number of layers',
    'base_channels': 'channels of the first stage',
    'block_type': 'residual block: basic (two 3x3 convs) or bottleneck (1x1-3x3-1x1)',
    'n_channels': "vgg: channels per stage, e.g. '[64,128,256,512,512]'",
    'n_layers': "vgg: conv layers per stage, e.g. '[2,2,3,3,3]'",
    'use_bn': 'vgg: batch norm after each conv',
    'remove_first_relu': 'resnet_preact',
    'add_last_bn': 'resnet_preact',
    'preact_stage': "resnet_preact, e.g. '[true,false,false]'",
    'widening_factor': 'wrn, resnet_preact',
    'drop_rate': 'dropout (wrn, densenet)',
    'growth_rate': 'densenet k',
    'compression_rate': 'densenet-BC transition compression',
    'memory_efficient': 'densenet: recompute concatenations in backward (less memory)',
    'pyramid_alpha': 'pyramidnet widening',
    'cardinality': 'resnext groups',
    'shake_forward': 'shake_shake: random alpha',
    'shake_backward': 'shake_shake: random beta',
    'shake_image': 'shake_shake: per image (true) or per batch',
    'se_reduction': 'squeeze-and-excitation reduction ratio',
    'activation': "resnet9: activation (celu: Page's final recipe)",
    'celu_alpha': 'resnet9 with --activation celu: CELU alpha (0.3)',
    'ghost_bn_splits': 'resnet9: ghost batch norm, BN statistics per 1/N of each training batch inside one '
                       'forward pass (unlike --subdivision: no extra passes, no gradient accumulation)',
    'head_scale': "resnet9: logit scale (0.125; Page's final recipe 1/16); airbench: default-initialized "
                  'head times this (airbench94: 1/9) instead of a unit-variance head / width',
    'n_blocks': "blocks (or transformer layers) per stage, e.g. '[2,2,6,2]'",
    'width_multiplier': 'multiplies every width (MobileNet alpha, EfficientNet width coefficient)',
    'depth_multiplier': 'efficientnet: multiplies the blocks per stage (depth coefficient), rounded up',
    'group_width': 'regnet: channels per group of the 3x3 convolutions',
    'drop_path_rate': 'stochastic depth: drop probability of the last block, rising linearly from 0 '
                      '(arXiv 1603.09382)',
    'patch_size': 'side of the square patches that become tokens (vit, swin)',
    'embed_dim': 'transformer width (vit; swin: of the first stage)',
    'num_heads': 'attention heads (vit, mobilevit)',
    'head_dim': 'channels per attention head (coatnet, cvt, swin: heads = width / head_dim)',
    'mlp_ratio': 'vit: hidden width of the MLP over the embedding width',
    'embed_dims': "mobilevit: transformer width of each MobileViT block, e.g. '[144,192,240]'",
    'window_size': 'swin: side of the attention windows (divides every feature map)',
}


@dataclasses.dataclass
class FlagSpec:
    """A model flag: ``kind`` is bool, int, float, str or list; ``choices`` only for str flags."""
    name: str
    kind: str
    help: str
    archs: list
    choices: tuple = None


class ModelConfigError(ValueError):
    """A model flag has a value the architecture cannot be built with.

    The message starts with the flag, e.g. ``--depth 21: ...``, so that main.py can
    print it as the one-line error a user sees.
    """


def register_model(name, test_config=None, **train_defaults):
    """Decorator registering ``builder`` under ``name``; a duplicate name is an error.

    ``test_config``: the builder's keyword arguments for the tiny model the tests build.
    """
    def decorator(builder):
        if name in _BUILDERS:
            raise ValueError(f'model {name!r} is registered twice')
        unknown = set(test_config or {}) - set(_keyword_params(builder))
        if unknown:
            raise ValueError(f'model {name!r}: test_config has arguments the builder does not take: '
                             f'{", ".join(sorted(unknown))}')
        _BUILDERS[name] = builder
        _TRAIN_DEFAULTS[name] = dict(train_defaults)
        _TEST_CONFIGS[name] = test_config
        return builder
    return decorator


def list_models():
    return sorted(_BUILDERS)


def get_builder(name):
    if name not in _BUILDERS:
        raise KeyError(f'unknown arch {name!r}; known: {", ".join(list_models())}')
    return _BUILDERS[name]


def _keyword_params(builder):
    return {p.name: p for p in inspect.signature(builder).parameters.values()
            if p.name not in DATA_ARGS and p.kind == p.KEYWORD_ONLY}


def model_params(name):
    """The builder's model flags (without the dataset arguments) and their defaults."""
    return {flag: param.default for flag, param in _keyword_params(get_builder(name)).items()}


def train_defaults(name):
    get_builder(name)
    return dict(_TRAIN_DEFAULTS[name])


def get_test_config(name):
    """The small configuration registered for the tests (None if the builder registered none)."""
    get_builder(name)
    config = _TEST_CONFIGS[name]
    return None if config is None else dict(config)


def create_model(name, num_classes=10, in_channels=3, image_size=None, **model_kwargs):
    """Build ``name``; kwargs that are None are dropped so the builder's defaults apply.

    ``image_size`` reaches only the builders that take it (the transformers size position
    embeddings and attention windows by it); None keeps the builder's default (32).
    """
    builder = get_builder(name)
    known = model_params(name)
    kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        flags = ', '.join(f'--{k}' for k in unknown)
        raise ModelConfigError(f'{flags} does not apply to --arch {name}')
    if image_size is not None and 'image_size' in inspect.signature(builder).parameters:
        kwargs['image_size'] = image_size
    return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


# ----------------------------------------------------------------------------- flag generation

_KINDS = {bool: 'bool', int: 'int', float: 'float', str: 'str', list: 'list', tuple: 'list'}


def _kind_of(param):
    """(kind, choices) from the annotation, else from the default value; (None, None) if neither says."""
    annotation = param.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return 'str', typing.get_args(annotation)
    if annotation is not inspect.Parameter.empty:
        origin = typing.get_origin(annotation) or annotation
        if origin in _KINDS:
            return _KINDS[origin], None
    if param.default is None or param.default is inspect.Parameter.empty:
        return None, None
    return _KINDS.get(type(param.default)), None


def _docstring_help(builder, flag):
    """The text of a line ``flag: text`` in the ``Args:`` section of the builder's docstring."""
    doc = inspect.getdoc(builder) or ''
    section = doc.split('Args:', 1)[1] if 'Args:' in doc else ''
    match = re.search(rf'^\s*{re.escape(flag)}:\s*(.+)$', section, flags=re.MULTILINE)
    return match.group(1).strip() if match else None


def model_flags():
    """Every builder's keyword-only arguments as :class:`FlagSpec`, in :data:`FLAG_HELP` order.

    Raises ValueError when a flag's type cannot be told (default None without annotation in
    every builder) or differs between builders (int and float combine to float).
    """
    kinds, choices, archs, doc_help = {}, {}, {}, {}
    for arch in list_models():
        builder = _BUILDERS[arch]
        for flag, param in _keyword_params(builder).items():
            archs.setdefault(flag, []).append(arch)
            kind, flag_choices = _kind_of(param)
            if kind is not None:
                previous = kinds.setdefault(flag, kind)
                if {previous, kind} == {'int', 'float'}:
                    kinds[flag] = 'float'
                elif previous != kind:
                    raise ValueError(f'model flag --{flag} is {previous} in one builder and {kind} in '
                                     f'{arch}; give it one type')
            if flag_choices:
                choices[flag] = tuple(dict.fromkeys(choices.get(flag, ()) + tuple(flag_choices)))
            doc_help.setdefault(flag, _docstring_help(builder, flag))
    untyped = sorted(set(archs) - set(kinds))
    if untyped:
        raise ValueError(f'cannot tell the type of model flag(s) {", ".join("--" + f for f in untyped)}: '
                         'annotate the builder argument (e.g. `se_reduction: int = None`)')
    order = {flag: index for index, flag in enumerate(FLAG_HELP)}
    names = sorted(archs, key=lambda flag: (order.get(flag, len(order)), flag))
    return {flag: FlagSpec(flag, kinds[flag],
                           FLAG_HELP.get(flag) or doc_help[flag] or f'model flag of {", ".join(archs[flag])}',
                           archs[flag], choices.get(flag))
            for flag in names}
