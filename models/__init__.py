"""Model families, one module each; importing the package registers every builder.

Adding a model is one file in this folder: every public module is imported here, its
``@register_model`` builders become ``--arch`` choices and their keyword-only arguments main.py's
model flags (help and domain from ``registry.FLAGS``), and the registry-driven tests
(tests/test_models.py) build each with its registered ``test_config``.
"""
import importlib
import pkgutil

from models.registry import (FlagSpec, ModelConfigError, add_model_flags, arch_defaults, create_model, describe_archs,
                             flag_defaults, get_test_config, list_models, model_cost, model_flag_names, model_flags,
                             model_kwargs, model_params, register_model, resolve_model_flags, train_defaults)

_SUPPORT_MODULES = {'registry', 'common'}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT_MODULES and not _module.name.startswith('_'):
        importlib.import_module(f'{__name__}.{_module.name}')

__all__ = ['FlagSpec', 'ModelConfigError', 'add_model_flags', 'arch_defaults', 'create_model', 'describe_archs',
           'flag_defaults', 'get_test_config', 'list_models', 'model_cost', 'model_flag_names', 'model_flags',
           'model_kwargs', 'model_params', 'register_model', 'resolve_model_flags', 'train_defaults']
