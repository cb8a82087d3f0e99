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
choices), and takes its help text and its domain (the values it may take, a :class:`flags.Domain`)
from :data:`FLAGS`; a flag missing there takes its help from an ``Args:`` line of the builder's
docstring and a domain derived from its type. A flag shared by several builders must have one type
everywhere. :func:`create_model` checks every given flag against its domain, so that a builder checks
only what relates flags to one another or to the network (depth = 6n+2, one entry per stage, a width
split into heads). The registry also holds the training recipes that families share
(:data:`CNN_RECIPE`, :data:`TRANSFORMER_RECIPE`), :func:`model_kwargs` (the model flags of a run's
settings) and :func:`model_cost` (parameters and multiply-adds).

This module imports torch only inside :func:`model_cost`, so that the command line can be built
without torch.
"""
import collections.abc
import dataclasses
import functools
import inspect
import json
import re
import typing

from flags import Bool, Choice, Domain, Int, ListOf, Real, Text, UsageError, show

_BUILDERS = {}
_TRAIN_DEFAULTS = {}
_TEST_CONFIGS = {}

# Arguments that come from the dataset, never from model flags.
DATA_ARGS = ('num_classes', 'in_channels', 'image_size')

_LIST = (1, None)  # a list of one or more entries; how many a network needs is its builder's rule
# Every model flag's help, in the order ``--help`` lists them, and its domain: the values one flag may
# take whatever the arch (optional: unset means the builder's default). main.py uses the domain as the
# flag's argparse type and create_model checks every given value against it, so the builders check
# only relations (depth = 6n+2, one entry per stage, a width split into heads). A help of None takes
# the ``Args:`` line of a builder's docstring; a flag missing here gets its help from that line, else
# names the archs that accept it, and a domain derived from its type (:func:`model_flags`).
FLAGS = {
    'depth': ('number of layers', Int(1, optional=True)),
    'base_channels': ('channels of the first stage', Int(1, optional=True)),
    'block_type': ('residual block: basic (two 3x3 convs) or bottleneck (1x1-3x3-1x1)',
                   Choice(('basic', 'bottleneck'), optional=True)),
    'n_channels': ("vgg: channels per stage, e.g. '[64,128,256,512,512]'", ListOf(Int(1), _LIST, optional=True)),
    'n_layers': ("vgg: conv layers per stage, e.g. '[2,2,3,3,3]'", ListOf(Int(1), _LIST, optional=True)),
    'use_bn': ('vgg: batch norm after each conv', Bool(optional=True)),
    'remove_first_relu': ('resnet_preact', Bool(optional=True)),
    'add_last_bn': ('resnet_preact', Bool(optional=True)),
    'preact_stage': ("resnet_preact, e.g. '[true,false,false]'", ListOf(Bool(), _LIST, optional=True)),
    'widening_factor': ('wrn, resnet_preact', Int(1, optional=True)),
    'drop_rate': ('dropout (wrn, densenet)', Real(0, 1, '[)', optional=True)),
    'growth_rate': ('densenet k', Int(1, optional=True)),
    'compression_rate': ('densenet-BC transition compression', Real(0, 1, '(]', optional=True)),
    'memory_efficient': ('densenet: recompute concatenations in backward (less memory)', Bool(optional=True)),
    'pyramid_alpha': ('pyramidnet widening', Int(0, optional=True)),
    'cardinality': ('resnext groups', Int(1, optional=True)),
    'shake_forward': ('shake_shake: random alpha', Bool(optional=True)),
    'shake_backward': ('shake_shake: random beta', Bool(optional=True)),
    'shake_image': ('shake_shake: per image (true) or per batch', Bool(optional=True)),
    'se_reduction': ('squeeze-and-excitation reduction ratio', Int(1, optional=True)),
    'activation': ("resnet9: activation (celu: Page's final recipe)", Choice(('relu', 'celu'), optional=True)),
    'celu_alpha': ('resnet9 with --activation celu: CELU alpha (0.3)', Real(0, None, '()', optional=True)),
    'ghost_bn_splits': ('resnet9: ghost batch norm, BN statistics per 1/N of each training batch inside one '
                        'forward pass (unlike --subdivision: no extra passes, no gradient accumulation)',
                        Int(1, optional=True)),
    'head_scale': ("resnet9: logit scale (0.125; Page's final recipe 1/16); airbench: default-initialized "
                   'head times this (airbench94: 1/9) instead of a unit-variance head / width',
                   Real(0, None, '()', optional=True)),
    'n_blocks': ("blocks (or transformer layers) per stage, e.g. '[2,2,6,2]'", ListOf(Int(1), _LIST, optional=True)),
    'width_multiplier': ('multiplies every width (MobileNet alpha, EfficientNet width coefficient)',
                         Real(0, None, '()', optional=True)),
    'depth_multiplier': ('efficientnet: multiplies the blocks per stage (depth coefficient), rounded up',
                         Real(0, None, '()', optional=True)),
    'group_width': ('regnet: channels per group of the 3x3 convolutions', Int(1, optional=True)),
    'drop_path_rate': ('stochastic depth: drop probability of the last block, rising linearly from 0 '
                       '(arXiv 1603.09382)', Real(0, 1, '[)', optional=True)),
    'patch_size': ('side of the square patches that become tokens (vit, swin)', Int(1, optional=True)),
    'embed_dim': ('transformer width (vit; swin: of the first stage)', Int(1, optional=True)),
    'num_heads': ('attention heads (vit, mobilevit)', Int(1, optional=True)),
    'head_dim': ('channels per attention head (coatnet, cvt, swin: heads = width / head_dim)', Int(1, optional=True)),
    'mlp_ratio': ('vit: hidden width of the MLP over the embedding width', Real(0, None, '()', optional=True)),
    'embed_dims': ("mobilevit: transformer width of each MobileViT block, e.g. '[144,192,240]'",
                   ListOf(Int(1), _LIST, optional=True)),
    'window_size': ('swin: side of the attention windows (divides every feature map)', Int(1, optional=True)),
    'shakedrop_survival': (None, Real(0, 1, optional=True)),
    'use_shakedrop': (None, Bool(optional=True)),
}

# ----------------------------------------------------------------------------- training recipes

# The recipes the families added with the CIFAR tricks collection register as their defaults.
# CNNs: kuangliu/pytorch-cifar's main.py, whose models that collection copies: SGD with lr 0.1,
# momentum 0.9 without Nesterov, weight decay 5e-4, batch 128, cosine annealing to 0 over 200
# epochs, pad-4 random crop and horizontal flip.
CNN_RECIPE = dict(epochs=200, batch_size=128, optimizer='sgd', base_lr=0.1, momentum=0.9, nesterov=False,
                  weight_decay=5e-4, scheduler='cosine', lr_min=0.0)
# Transformers trained from scratch: the CIFAR-10 recipe of Compact Transformers (Hassani et al.,
# arXiv 2104.05704; SHI-Labs/Compact-Transformers configs/datasets/cifar10.yml): AdamW with lr 5.5e-4
# and weight decay 0.06 (none on norms and biases, timm's rule), batch 128, 300 epochs, 10 warmup
# epochs from lr 1e-5, cosine to 1e-5, label smoothing 0.1, CutMix (alpha 1; theirs alternates it
# with Mixup 0.8 per batch), Random Erasing with probability 0.25 and random pixels, and RandAugment
# with 2 operations of magnitude 9 (timm's rand-m9; torchvision's RandAugment here).
TRANSFORMER_RECIPE = dict(epochs=300, batch_size=128, optimizer='adamw', base_lr=5.5e-4, weight_decay=0.06,
                          no_weight_decay_on_bn=True, scheduler='cosine', lr_min=1e-5, warmup_epochs=10,
                          warmup_start_factor=1e-5 / 5.5e-4, use_label_smoothing=True,
                          label_smoothing_epsilon=0.1, use_cutmix=True, cutmix_alpha=1.0,
                          use_random_erasing=True, random_erasing_prob=0.25, random_erasing_fill='random',
                          use_randaugment=True, randaugment_ops=2, randaugment_magnitude=9)


@dataclasses.dataclass
class FlagSpec:
    """A model flag: ``kind`` is bool, int, float, str or list; ``choices`` only for str flags;
    ``domain`` the values it may take (a :class:`flags.Domain`, optional: None leaves the builder's
    default), which is also its argparse type."""
    name: str
    kind: str
    help: str
    archs: list
    choices: tuple = None
    domain: Domain = None


class ModelConfigError(UsageError):
    """A model flag has a value the architecture cannot be built with.

    The message starts with the flag, e.g. ``--depth 21: ...``, so that main.py can
    print it as the one-line error a user sees (a :class:`flags.UsageError`).
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


def flag_defaults(name):
    """The values ``name``'s builder gives its model flags, as the flags hold them (lists, not tuples)."""
    return {flag: list(value) if isinstance(value, tuple) else value for flag, value in model_params(name).items()}


def arch_defaults(name):
    """The settings a run of ``name`` takes unless given: its training defaults and its model flags' values."""
    return {**train_defaults(name), **flag_defaults(name)}


def resolve_model_flags(settings):
    """The model flags of ``settings.arch`` (an argparse Namespace with ``explicit``, the names given) take
    its builder's default where not given, so that config.json and --dry_run show the values the model is
    built with; those of other archs, unless given, are None."""
    defaults = flag_defaults(settings.arch)
    for name in _flag_specs():
        if name not in defaults:
            if name not in settings.explicit:
                setattr(settings, name, None)
        elif getattr(settings, name) is None:
            setattr(settings, name, defaults[name])


def add_model_flags(group):
    """One argparse flag per model flag (:func:`model_flags`) in ``group``: its domain as its type, default
    None, so that the builder's own default applies unless it is given."""
    for name, flag in model_flags().items():
        switch = dict(nargs='?', const=True) if flag.kind == 'bool' else {}
        group.add_argument(f'--{name}', type=flag.domain, choices=flag.choices, help=flag.help, **switch)


def get_test_config(name):
    """The small configuration registered for the tests (None if the builder registered none)."""
    get_builder(name)
    config = _TEST_CONFIGS[name]
    return None if config is None else dict(config)


def create_model(name, num_classes=10, in_channels=3, image_size=None, **model_kwargs):
    """Build ``name``; kwargs that are None are dropped so the builder's defaults apply.

    Every other kwarg must be a flag of the builder and lie in the flag's domain (:data:`FLAGS`),
    else :class:`ModelConfigError` names it: ``--celu_alpha 0.0: resnet9 needs a number > 0``.
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
    specs = _flag_specs()
    for flag, value in kwargs.items():
        check_flag(specs[flag], value, name)
    if image_size is not None and 'image_size' in inspect.signature(builder).parameters:
        kwargs['image_size'] = image_size
    return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)


def check_flag(spec, value, arch):
    """Raise :class:`ModelConfigError` unless ``value`` lies in the domain of ``spec`` (a tuple is
    taken as the list it stands for, as in the builders' defaults)."""
    try:
        spec.domain.check(list(value) if isinstance(value, tuple) else value)
    except ValueError:
        raise ModelConfigError(f'--{spec.name} {show(value)}: {arch} needs {spec.domain._describe()}') from None


def model_flag_names():
    """The names of the model flags (main.py's model flags), in ``--help`` order."""
    return list(_flag_specs())


def model_kwargs(settings):
    """The model flags of ``settings`` (an argparse Namespace or a dict), None where absent: the keyword
    arguments of :func:`create_model` (timm's ``create_model(args.model, **model_kwargs(args))``)."""
    values = settings if isinstance(settings, collections.abc.Mapping) else vars(settings)
    return {name: values.get(name) for name in _flag_specs()}


def model_cost(arch, info, **model_kwargs):
    """(parameters, forward multiply-adds of one image) of ``arch`` at ``info``'s input size.

    The model is built on the meta device (shapes only, no memory, no initialization) and run in
    eval mode under ``torch.utils.flop_counter.FlopCounterMode``, which counts the FLOPs of
    convolutions, matrix products and attention, two per multiply-add; normalization, activations
    and pooling are not counted, as in the papers' figures (ResNet-20: 41 M, ResNet-110: 253 M).
    ``info``: the dataset's ``num_classes``, ``in_channels`` and ``image_size`` (a
    ``dataloader.DatasetInfo``).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device('meta'):
        model = create_model(arch, num_classes=info.num_classes, in_channels=info.in_channels,
                             image_size=info.image_size, **model_kwargs)
    model.eval()
    images = torch.empty(1, info.in_channels, info.image_size, info.image_size, device='meta')
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def describe_archs(names, info, **model_kwargs):
    """The lines of --list_archs: for each arch of ``names`` (with ``model_kwargs``), its parameters and
    forward multiply-adds at ``info``'s input size (:func:`model_cost`), model flags and training defaults."""
    yield (f'{info.name}: {info.in_channels}x{info.image_size}x{info.image_size} images, {info.num_classes} '
           f'classes; multiply-adds of one forward pass (torch.utils.flop_counter)')
    for name in names:
        n_params, macs = model_cost(name, info, **model_kwargs)
        flags = ', '.join(f'--{k} {json.dumps(v)}' for k, v in {**model_params(name), **model_kwargs}.items())
        defaults = ', '.join(f'{k}={json.dumps(v)}' for k, v in train_defaults(name).items())
        yield (f'{name}: {n_params / 1e6:.2f} M parameters, {macs / 1e6:.1f} M multiply-adds\n'
               f'    model flags: {flags}\n    training defaults: {defaults}')


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


def _list_elements(param):
    """What a list flag's entries are, from the annotation (``list[int]``) or the default's entries."""
    args = typing.get_args(param.annotation)
    if len(args) == 1 and isinstance(args[0], type):
        return [args[0]]
    if isinstance(param.default, (list, tuple)):
        return [type(value) for value in param.default]
    return []


def _derived_domain(kind, choices, element_types):
    """The domain of a flag missing from :data:`FLAGS`: any value of its type (a list's entries of the
    type of its annotation or default's entries: bool, int, str, else numbers), or unset."""
    if kind == 'list':
        types = set(element_types)
        element = Bool() if types == {bool} else Int() if types == {int} else Text() if types == {str} else Real()
        return ListOf(element, optional=True)
    if kind == 'str':
        return Choice(choices, optional=True) if choices else Text(optional=True)
    return {'bool': Bool, 'int': Int, 'float': Real}[kind](optional=True)


def _docstring_help(builder, flag):
    """The text of a line ``flag: text`` in the ``Args:`` section of the builder's docstring."""
    doc = inspect.getdoc(builder) or ''
    section = doc.split('Args:', 1)[1] if 'Args:' in doc else ''
    match = re.search(rf'^\s*{re.escape(flag)}:\s*(.+)$', section, flags=re.MULTILINE)
    return match.group(1).strip() if match else None


def model_flags():
    """Every builder's keyword-only arguments as :class:`FlagSpec`, in :data:`FLAGS` order.

    Raises ValueError when a flag's type cannot be told (default None without annotation in
    every builder) or differs between builders (int and float combine to float).
    """
    return dict(_flag_specs())


def _flag_specs():
    """:func:`model_flags`, computed once per set of registered builders (create_model asks every time)."""
    return _generate_flag_specs(tuple(sorted(_BUILDERS.items())))


@functools.lru_cache(maxsize=1)
def _generate_flag_specs(builders):
    kinds, choices, archs, doc_help, elements = {}, {}, {}, {}, {}
    for arch, builder in builders:
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
            elements.setdefault(flag, []).extend(_list_elements(param))
            doc_help.setdefault(flag, _docstring_help(builder, flag))
    untyped = sorted(set(archs) - set(kinds))
    if untyped:
        raise ValueError(f'cannot tell the type of model flag(s) {", ".join("--" + f for f in untyped)}: '
                         'annotate the builder argument (e.g. `se_reduction: int = None`)')
    order = {flag: index for index, flag in enumerate(FLAGS)}
    names = sorted(archs, key=lambda flag: (order.get(flag, len(order)), flag))
    specs = {}
    for flag in names:
        help_text, domain = FLAGS.get(flag, (None, None))
        help_text = help_text or doc_help[flag] or f'model flag of {", ".join(archs[flag])}'
        domain = domain or _derived_domain(kinds[flag], choices.get(flag), elements[flag])
        specs[flag] = FlagSpec(flag, kinds[flag], help_text, archs[flag], choices.get(flag), domain)
    return specs
