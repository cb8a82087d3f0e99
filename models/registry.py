"""Registry mapping ``--arch`` names to model builders.

A builder is a function taking plain keyword arguments named like the command-line
flags (``depth``, ``base_channels``, ``block_type``, ...) plus ``num_classes`` and
``in_channels``, which always come from the dataset.  ``register_model`` may attach
the training defaults of the original tool's config for that architecture
(epochs, batch size, learning rate, schedule); ``main.py`` applies them when the user
gives only ``--arch``.
"""
import inspect

_BUILDERS = {}
_TRAIN_DEFAULTS = {}

# Arguments that come from the dataset, never from model flags.
DATA_ARGS = ('num_classes', 'in_channels')


class ModelConfigError(ValueError):
    """A model flag has a value the architecture cannot be built with.

    The message starts with the flag, e.g. ``--depth 21: ...``, so that main.py can
    print it as the one-line error a user sees.
    """


def register_model(name, **train_defaults):
    """Decorator registering ``builder`` under ``name``; a duplicate name is an error."""
    def decorator(builder):
        if name in _BUILDERS:
            raise ValueError(f'model {name!r} is registered twice')
        _BUILDERS[name] = builder
        _TRAIN_DEFAULTS[name] = dict(train_defaults)
        return builder
    return decorator


def list_models():
    return sorted(_BUILDERS)


def get_builder(name):
    if name not in _BUILDERS:
        raise KeyError(f'unknown arch {name!r}; known: {", ".join(list_models())}')
    return _BUILDERS[name]


def model_params(name):
    """The builder's model flags (without the dataset arguments) and their defaults."""
    signature = inspect.signature(get_builder(name))
    return {p.name: p.default for p in signature.parameters.values()
            if p.name not in DATA_ARGS and p.kind == p.KEYWORD_ONLY}


def train_defaults(name):
    get_builder(name)
    return dict(_TRAIN_DEFAULTS[name])


def create_model(name, num_classes=10, in_channels=3, **model_kwargs):
    """Build ``name``; kwargs that are None are dropped so the builder's defaults apply."""
    builder = get_builder(name)
    known = model_params(name)
    kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        flags = ', '.join(f'--{k}' for k in unknown)
        raise ModelConfigError(f'{flags} does not apply to --arch {name}')
    return builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
