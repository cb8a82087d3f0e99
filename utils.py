"""Small shared helpers: argument types, seeding, atomic JSON and checkpoint I/O, meters."""
import json
import os
import platform
import random
import sys
import tempfile

import numpy as np
import torch


class UsageError(Exception):
    """Bad input from the user: main.py prints the message as one line and exits with 2."""


def str2bool(value):
    """argparse type accepting true/false/1/0/yes/no (any case)."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ('true', '1', 'yes', 'y', 'on'):
        return True
    if lowered in ('false', '0', 'no', 'n', 'off'):
        return False
    raise ValueError(f'expected true/false/1/0/yes/no, got {value!r}')


str2bool.__name__ = 'boolean'


def number(value):
    """argparse type for a count that may be fractional: '160' -> 160, '9.9' -> 9.9."""
    parsed = float(value)
    return int(parsed) if parsed.is_integer() and '.' not in str(value) else parsed


number.__name__ = 'number'


def json_list(value):
    """argparse type for JSON lists such as '[80,120]' or '[true,false,false]'."""
    if isinstance(value, (list, tuple)):
        return list(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f'{value!r} is not valid JSON ({error.msg})') from None
    if not isinstance(parsed, list):
        raise ValueError(f'{value!r} is not a JSON list')
    return parsed


json_list.__name__ = 'JSON list'


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state():
    """RNG states as tensors and plain types, loadable with torch.load(weights_only=True)."""
    numpy_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *numpy_state[2:]],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    python_state = state['python']
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _atomic_write(path, write):
    """Write to a temporary file in the same folder, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp_path = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_json(obj, path):
    """Atomically write ``obj`` as indented JSON; unknown types (torch versions, devices) as str."""
    text = json.dumps(obj, indent=2, default=str) + '\n'
    _atomic_write(path, lambda f: f.write(text.encode()))


def load_json(path, what='file'):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f'{what} {path}: no such file') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f'{what} {path}: not valid JSON ({error})') from None


def save_checkpoint(state, path):
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location='cpu'):
    """Load a checkpoint as data only (weights_only=True): a checkpoint is never code."""
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path}: no such file')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, garbage bytes, or a pickle with code in it
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
        raise UsageError(f'checkpoint {path} is corrupt or not a checkpoint '
                         f'({type(error).__name__}: {first_line[:200]})') from None


def environment_info(device):
    info = {
        'python': sys.version.split()[0],
        'platform': platform.platform(),
        'torch': torch.__version__,
        'cuda': torch.version.cuda,
        'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        'device': str(device),
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        info['gpu_count'] = torch.cuda.device_count()
    return info


class AverageMeter:
    """Running sample-weighted mean."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def update(self, value, n=1):
        # value may be a device tensor: summing it without .item() keeps the GPU queue full.
        self.total = self.total + value * n
        self.count += n

    @property
    def average(self):
        return float(self.total) / max(self.count, 1)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
