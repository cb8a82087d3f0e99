"""Datasets, standard transforms and loaders.

The built-in datasets are small (CIFAR-10 is 150 MB as uint8), so each split is read once
from its standard on-disk files into a uint8 tensor and kept on the training device;
``DeviceLoader`` then shuffles, crops, flips and normalizes whole batches with tensor
operations.  ``WorkersLoader`` is the classic per-sample DataLoader with worker processes:
the path for image-folder datasets and the reference the batched path is checked against.

In a distributed run (``shard=(rank, world_size)``) every rank holds the whole dataset and takes
its part of each batch: the training batches are those of one process with the global batch,
cut into consecutive per-rank slices, and the evaluation batches are dealt out whole, so that each
test image is scored exactly once and in the batch it would have in a single process.
"""
import functools
import gzip
import io
import math
import os
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import augmentations
from flags import UsageError, first_line
from utils import derived_seed, get_rng_state, set_rng_state


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple
    std: tuple
    horizontal_flip: bool


DATASETS = {
    'CIFAR10': DatasetInfo('CIFAR10', 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    'CIFAR100': DatasetInfo('CIFAR100', 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    'MNIST': DatasetInfo('MNIST', 1, 28, 10, (0.1307,), (0.3081,), False),
    'FashionMNIST': DatasetInfo('FashionMNIST', 1, 28, 10, (0.2860,), (0.3530,), True),
    'KMNIST': DatasetInfo('KMNIST', 1, 28, 10, (0.1904,), (0.3475,), False),
}
DATASET_CHOICES = list(DATASETS) + ['ImageFolder']

_CIFAR_FILES = {
    'CIFAR10': ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)], ['test_batch'], 'labels'),
    'CIFAR100': ('cifar-100-python', ['train'], ['test'], 'fine_labels'),
}
_IDX_FILES = {True: ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
              False: ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
# Set to 1 (or true/yes) on machines without network: a missing dataset is then an error saying where to
# place its files, as with --no-download (an explicit --download still fetches).
OFFLINE_ENV = 'CIFAR_TOOLKIT_OFFLINE'


def offline():
    """Whether OFFLINE_ENV turns the default download off."""
    return os.environ.get(OFFLINE_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on')


def default_dataset_dir(dataset):
    """Where --dataset_dir points unless given: torchvision's download folder of ``dataset``."""
    return os.path.expanduser(os.path.join('~/.torchvision/datasets', dataset))


_TORCHVISION_CLASSES = {'CIFAR10': 'CIFAR10', 'CIFAR100': 'CIFAR100', 'MNIST': 'MNIST',
                        'FashionMNIST': 'FashionMNIST', 'KMNIST': 'KMNIST'}


# ----------------------------------------------------------------------------- CIFAR's pickles
# The CIFAR files are Python pickles, and a full unpickler calls whatever function a pickle names: a
# batch file from someone else could run any code. The reader below admits only the few names that
# numpy arrays are pickled with, and hands them to stand-ins that do nothing but np.frombuffer with
# an integer dtype; everything else in the real files is dicts, lists, strings and ints, which the
# unpickler builds without calling anything.

# integer and bool typecodes only: no object, string or structured dtypes
_ARRAY_TYPECODES = frozenset(f'{kind}{size}' for kind in 'iu' for size in (1, 2, 4, 8)) | {'b1'}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a function or class that the CIFAR reader does not admit."""


class _Sealed(type):
    """The class of the stand-in classes: a pickle's BUILD could otherwise set their attributes (their
    methods included) for every later read in this process."""

    def __setattr__(cls, name, value):
        raise AttributeError(f'{cls.__name__} is read-only')


class _NdarrayClass(metaclass=_Sealed):
    """Stands for ``numpy.ndarray`` in a pickle: only ever the first argument of ``_reconstruct``."""


class _DtypeSpec(metaclass=_Sealed):
    """What a pickle says of a dtype: ``numpy.dtype(typecode, align, copy)``, then its state."""

    def __init__(self, typecode, align=False, copy=False):
        self.typecode, self.byteorder = typecode, '|'

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 5 or any(part is not None for part in state[2:5]):
            raise pickle.UnpicklingError('a dtype with fields or subarrays')
        self.byteorder = state[1]

    def resolve(self):
        if self.typecode not in _ARRAY_TYPECODES or self.byteorder not in ('<', '>', '|', '='):
            raise pickle.UnpicklingError(f'an array of dtype {self.byteorder}{self.typecode}, not of integers')
        dtype = np.dtype(self.typecode)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in '<>' else dtype


def _array_from_bytes(raw, dtype, shape, fortran_order):
    if isinstance(raw, str):  # a Python 2 byte string, read with encoding='latin1' (the original files)
        raw = raw.encode('latin1')
    if not isinstance(raw, (bytes, bytearray)):
        raise pickle.UnpicklingError('an array of Python objects')
    if not isinstance(dtype, _DtypeSpec):
        raise pickle.UnpicklingError('an array without a dtype')
    dtype = dtype.resolve()
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f'an array of shape {shape!r}')
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise pickle.UnpicklingError(f'an array of shape {shape} with {len(raw)} bytes of data')
    return np.frombuffer(raw, dtype).reshape(shape, order='F' if fortran_order else 'C')


class _ArrayState:
    """An array as a pickle builds it: ``_reconstruct(ndarray, (0,), b'b')``, then ``__setstate__``."""

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 5:  # version 1 of ndarray's state
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise pickle.UnpicklingError('an array state of an unknown layout')
        shape, dtype, fortran_order, raw = state
        self.array = _array_from_bytes(raw, dtype, shape, fortran_order)


def _reconstruct(cls, shape, typecode):
    if cls is not _NdarrayClass:
        raise pickle.UnpicklingError('_reconstruct of a class other than numpy.ndarray')
    return _ArrayState()


def _frombuffer(buffer, dtype, shape, order):  # protocol 5's ndarray
    return _array_from_bytes(buffer, dtype, shape, order == 'F')


def _scalar(dtype, raw):  # a numpy integer outside an array
    return _array_from_bytes(raw, dtype, (), False)[()]


def _latin1_encode(text, encoding='latin1'):  # how protocol 2 writes bytes under Python 3
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError(f'_codecs.encode to {encoding!r}')
    return text.encode('latin1')


def _empty_bytes():  # how protocol 2 writes b'' (an empty array's data): bytes(), never bytes(n)
    return b''


# numpy 1 wrote numpy.core, numpy 2 writes numpy._core
_ADMITTED_GLOBALS = {
    **{(f'numpy.{core}.multiarray', '_reconstruct'): _reconstruct for core in ('core', '_core')},
    **{(f'numpy.{core}.multiarray', 'scalar'): _scalar for core in ('core', '_core')},
    **{(f'numpy.{core}.numeric', '_frombuffer'): _frombuffer for core in ('core', '_core')},
    ('numpy', 'ndarray'): _NdarrayClass,
    ('numpy', 'dtype'): _DtypeSpec,
    ('_codecs', 'encode'): _latin1_encode,
    ('__builtin__', 'bytes'): _empty_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        admitted = _ADMITTED_GLOBALS.get((module, name))
        if admitted is None:
            raise _RefusedGlobal(f'{module}.{name}')
        return admitted


def _materialized(value):
    return value.array if isinstance(value, _ArrayState) else value


def read_cifar_pickle(path, what='a CIFAR file', flag='--dataset_dir'):
    """The object pickled in the CIFAR file ``path`` (a batch, ``batches.meta`` or CIFAR-100's ``meta``),
    read without running code.

    Admitted: what the real files hold, dicts, lists, strings, bytes, numbers, and numpy arrays of
    integers (top-level values of the dict, where the real files have them, come back as arrays).
    A pickle that names any other function or class (``os.system``, a numpy module this numpy lacks)
    is refused unread, and a damaged one too, each as a UsageError naming ``flag`` and the file.
    """
    try:
        with open(path, 'rb') as f:
            content = f.read()
    except OSError as error:
        raise UsageError(f'{flag}: {path}: cannot read it ({error.strerror or error})') from None
    try:
        value = _CifarUnpickler(io.BytesIO(content), encoding='latin1').load()
    except _RefusedGlobal as refused:
        raise UsageError(f'{flag}: {path}: refused: the pickle calls {refused}, which is none of the numpy '
                         f'array parts CIFAR files hold (a pickle that calls a function can run code)') from None
    except Exception as error:  # only the stand-ins above run: whatever fails, the file is damaged
        raise UsageError(f'{flag}: {path} is not {what} ({type(error).__name__}: {_first_line(error)})') from None
    if isinstance(value, dict):
        return {key: _materialized(item) for key, item in value.items()}
    return _materialized(value)


def _first_line(error, limit=200):
    return first_line(error, limit) or type(error).__name__


def _label_problem(labels, n_images, num_classes):
    """Why ``labels`` (an int64 array) cannot label ``n_images`` images of ``num_classes`` classes, or None."""
    if n_images == 0:
        return 'no images'
    if len(labels) != n_images:
        return f'{len(labels)} labels for {n_images} images'
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        index = int(outside.argmax())
        return f'label {labels[index]} of image {index} is outside the {num_classes} classes (0 to {num_classes - 1})'
    return None


def _integer_list(value):
    """``value`` (a list of ints or an integer array) as a 1-D int64 array, or None if it is something else."""
    if not isinstance(value, (list, np.ndarray)):
        return None
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError):  # ragged nesting, ints beyond 64 bits
        return None
    if array.ndim != 1 or (array.size and array.dtype.kind not in 'iu'):
        return None
    return array.astype(np.int64)


def _cifar_batch(path, name, label_key):
    """(uint8 images N x 3 x 32 x 32, int64 labels N) of one CIFAR batch file, or a UsageError saying what
    is wrong with it."""
    what = f'a valid {name} batch file'
    batch = read_cifar_pickle(path, what)

    def invalid(reason):
        return UsageError(f'--dataset_dir: {path} is not {what} ({reason})')
    if not isinstance(batch, dict):
        raise invalid(f'it holds a {type(batch).__name__}, not a dict')
    for key in ('data', label_key):
        if key not in batch:
            raise invalid(f'no {key!r} entry')
    data = batch['data']
    if not isinstance(data, np.ndarray):
        raise invalid(f"'data' is a {type(data).__name__}, not an array of uint8")
    if data.dtype != np.uint8:
        raise invalid(f"'data' is an array of {data.dtype}, not of uint8")
    if data.size % (3 * 32 * 32):
        raise invalid(f"'data' holds {data.size} bytes, not a whole number of 3x32x32 images")
    labels = _integer_list(batch[label_key])
    if labels is None:
        raise invalid(f'{label_key!r} is not a list of integers')
    problem = _label_problem(labels, data.size // (3 * 32 * 32), DATASETS[name].num_classes)
    if problem:
        raise invalid(problem)
    return data.reshape(-1, 3, 32, 32), labels


# the meta file of each CIFAR (in its folder of _CIFAR_FILES) and the key of its class names
CIFAR_META = {'CIFAR10': ('batches.meta', 'label_names'), 'CIFAR100': ('meta', 'fine_label_names')}


def cifar_class_names(root, name, flag='--dataset_dir'):
    """The class names in the meta file (``batches.meta``, CIFAR-100's ``meta``) of the CIFAR ``name``
    under ``root``; None where there is no such file. A damaged or refused file is a UsageError."""
    file_name, key = CIFAR_META[name]
    path = os.path.join(root, _CIFAR_FILES[name][0], file_name)
    if not os.path.isfile(path):
        return None
    what = f'a valid {name} meta file'
    meta = read_cifar_pickle(path, what, flag)
    names = meta.get(key) if isinstance(meta, dict) else None
    num_classes = DATASETS[name].num_classes
    if not (isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names)):
        raise UsageError(f'{flag}: {path} is not {what} (no list of {num_classes} class names under {key!r})')
    return tuple(names)


def _read_cifar(root, name, train):
    folder, train_files, test_files, label_key = _CIFAR_FILES[name]
    directory = os.path.join(root, folder)
    images, labels = [], []
    for file_name in train_files if train else test_files:
        path = os.path.join(directory, file_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        batch_images, batch_labels = _cifar_batch(path, name, label_key)
        images.append(batch_images)
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _open_maybe_gz(base_path):
    for path, opener in ((base_path, open), (base_path + '.gz', gzip.open)):
        if os.path.isfile(path):
            return path, opener
    raise FileNotFoundError(base_path)


def _read_idx(path, opener, expected_ndim):
    """Parse an idx file (LeCun's MNIST format): magic, big-endian sizes, uint8 payload."""
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
        magic = int.from_bytes(raw[0:4], 'big')
        ndim = magic & 0xFF
        if magic >> 8 != 0x08 or ndim != expected_ndim:
            raise ValueError(f'magic number {magic:#x} is not a uint8 idx file of {expected_ndim} dims')
        shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
        payload = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if payload.size != int(np.prod(shape)):
            raise ValueError(f'expected {int(np.prod(shape))} values, found {payload.size} (truncated?)')
    except (OSError, EOFError, ValueError) as error:
        raise UsageError(f'--dataset_dir: {path} is not a valid idx file ({error})') from None
    return payload.reshape(shape)


def _read_mnist_family(root, name, train):
    images_name, labels_name = _IDX_FILES[train]
    candidates = [os.path.join(root, name, 'raw'), os.path.join(root, name), root]
    for directory in candidates:
        try:
            images_path, images_open = _open_maybe_gz(os.path.join(directory, images_name))
            labels_path, labels_open = _open_maybe_gz(os.path.join(directory, labels_name))
        except FileNotFoundError:
            continue
        images = _read_idx(images_path, images_open, 3)
        labels = _read_idx(labels_path, labels_open, 1)
        if len(images) != len(labels):
            raise UsageError(f'--dataset_dir: {images_path} has {len(images)} images but '
                             f'{labels_path} has {len(labels)} labels')
        problem = _label_problem(labels, len(images), DATASETS[name].num_classes)
        if problem:
            raise UsageError(f'--dataset_dir: {labels_path}: {problem}')
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
    raise FileNotFoundError(os.path.join(candidates[0], images_name))


def _expected_location(root, name):
    if name in _CIFAR_FILES:
        return os.path.join(root, _CIFAR_FILES[name][0]) + '/'
    return os.path.join(root, name, 'raw') + '/ (train-images-idx3-ubyte[.gz], ...)'


# Where torchvision fetches each dataset from (its first mirror), for the messages.
_SOURCES = {
    'CIFAR10': 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
    'CIFAR100': 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
    'MNIST': 'https://ossci-datasets.s3.amazonaws.com/mnist/',
    'FashionMNIST': 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',
    'KMNIST': 'http://codh.rois.ac.jp/kmnist/dataset/kmnist/',
}


def _source(name):
    if name in _CIFAR_FILES:
        return _SOURCES[name]
    return _SOURCES[name] + '{' + ','.join(f'{file}.gz' for train in (True, False) for file in _IDX_FILES[train]) + '}'


def _by_hand(root, name):
    """Where the files of ``name`` go when placed by hand."""
    if name in _CIFAR_FILES:
        return f'extract it in {root} so that {os.path.join(root, _CIFAR_FILES[name][0])}/ holds its batch files'
    return (f'put its four files (or them gunzipped) in {os.path.join(root, name, "raw")}/')


def _download(root, name):
    """Fetch ``name`` with torchvision (which verifies each archive's MD5) into ``root``.

    torchvision downloads and extracts into a fresh temporary folder beside ``root``; once both
    splits read back, the dataset's folder is renamed into ``root`` in one step. An interrupted or
    failed download so leaves nothing in ``root`` that could later read as a dataset (a killed one
    leaves a ``.NAME.download-*`` folder beside it, which nothing reads).
    """
    import shutil
    import tempfile
    from torchvision import datasets
    root = os.path.abspath(root)
    folder = _CIFAR_FILES[name][0] if name in _CIFAR_FILES else name
    target = os.path.join(root, folder)
    if os.path.exists(target):
        raise UsageError(f'--dataset_dir: {target} exists but does not hold a complete {name}; remove it to '
                         f'download {name} again, or complete it by hand ({_expected_location(root, name)})')
    url = _source(name)
    parent = os.path.dirname(root)
    created = _missing_folders(parent)  # removed again if the download fails: a failure leaves no trace
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(root)}.download-')
    except OSError as error:
        _remove_empty(created)
        raise UsageError(f'--dataset_dir {root}: cannot create a download folder beside it '
                         f'({error.strerror or error})') from None
    succeeded = False
    try:
        dataset_class = getattr(datasets, _TORCHVISION_CLASSES[name])
        try:
            for train in (True, False):
                dataset_class(staging, train=train, download=True)
        except Exception as error:  # network failures surface as many exception types
            raise UsageError(f'{name} is not in {root} and could not be downloaded from {url} '
                             f'({type(error).__name__}: {first_line(error)}); without network, download it elsewhere and '
                             f'{_by_hand(root, name)}, or pass --no-download') from None
        reader = _read_cifar if name in _CIFAR_FILES else _read_mnist_family
        for train in (True, False):
            try:
                reader(staging, name, train)
            except FileNotFoundError as missing:
                raise UsageError(f'the {name} that torchvision downloaded from {url} lacks '
                                 f'{os.path.basename(missing.args[0])}') from None
        try:
            os.makedirs(root, exist_ok=True)
            os.rename(os.path.join(staging, folder), target)
        except OSError as error:
            if not os.path.isdir(target):  # not another process that placed it first
                raise UsageError(f'--dataset_dir {root}: cannot move the downloaded {name} into place '
                                 f'({error.strerror or error})') from None
        succeeded = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not succeeded:
            _remove_empty(created)


def _missing_folders(path):
    """The folders ``os.makedirs(path)`` would create, deepest first."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_empty(folders):
    for folder in folders:
        try:
            os.rmdir(folder)  # only an empty one: whatever else put something there keeps it
        except OSError:
            break


def load_split(root, name, train, download=False):
    """One split of a built-in dataset as (uint8 images N x C x H x W, int64 labels N); a missing
    dataset is fetched first when ``download``."""
    reader = _read_cifar if name in _CIFAR_FILES else _read_mnist_family
    try:
        return reader(root, name, train)
    except FileNotFoundError as missing:
        if not download:
            raise UsageError(f'--dataset_dir: {name} files not found: looked for '
                             f'{_expected_location(root, name)} (missing {missing.args[0]}); downloading is off '
                             f'(--no-download, {OFFLINE_ENV}=1 or --dry_run): pass --download to fetch them, or fetch '
                             f'{_source(name)} and {_by_hand(root, name)}') from None
    _download(root, name)
    return reader(root, name, train)


def missing(root, name):
    """Whether a file of the built-in dataset ``name`` is absent from ``root`` (its contents unread)."""
    if name in _CIFAR_FILES:
        folder, train_files, test_files, _ = _CIFAR_FILES[name]
        return not all(os.path.isfile(os.path.join(root, folder, file)) for file in train_files + test_files)
    directories = [os.path.join(root, name, 'raw'), os.path.join(root, name), root]
    names = [file for train in (True, False) for file in _IDX_FILES[train]]

    def present(directory, file):
        return os.path.isfile(os.path.join(directory, file)) or os.path.isfile(os.path.join(directory, f'{file}.gz'))
    return not any(all(present(directory, file) for file in names) for directory in directories)


def split_validation(images, labels, val_ratio, split_seed=0):
    """Hold out ``val_ratio`` of the training set, the same images for every --seed."""
    generator = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(len(labels), generator=generator)
    n_val = int(round(len(labels) * val_ratio))
    if n_val < 1 or n_val >= len(labels):
        raise UsageError(f'--val_ratio {val_ratio}: leaves {len(labels) - n_val} training and '
                         f'{n_val} validation images')
    val_index, train_index = order[:n_val], order[n_val:]
    return (images[train_index], labels[train_index]), (images[val_index], labels[val_index])


# Images augmented at a time when an epoch starts: bounds the temporary memory of the crop's gathers.
AUGMENT_CHUNK = 16384


class DeviceLoader:
    """Batches from a uint8 tensor dataset held on ``device``, augmented as whole batches.

    Training batches: shuffled, an optional augmentation policy (``policy``, an
    :class:`augmentations.AugmentPolicy`: AutoAugment, RandAugment, TrivialAugment or AugMix, on
    groups of images), padded random crop (zero or reflect padding), horizontal flip (random, or
    alternating per image across epochs), then normalized to float32, for the whole epoch when it starts
    (:meth:`_augmented_epoch`): a batch is a view. Evaluation batches are views of the split, normalized
    once. ``set_epoch`` tells the loader which epoch comes next (alternating flip depends on it, so a
    resumed run flips as an uninterrupted one).

    ``shard=(rank, world_size)``: ``batch_size`` is this rank's part of a global batch of
    ``batch_size * world_size``. Training: each epoch's permutation is drawn from a generator
    seeded with (``seed``, epoch), the same on every rank and for any number of ranks, and global
    batch k is cut into consecutive slices, rank r taking slice r; every image is seen once per
    epoch across the ranks (the tail that does not fill a global batch is dropped, as in one
    process). The alternating-flip phases belong to the images, so an image flips on every other
    epoch whichever rank it goes to. Evaluation: the single-process batches of ``batch_size`` are
    dealt out, rank r taking batches r, r + world_size, ... (``engine.merge_sharded_batches`` puts
    per-batch results back in order). With ``seed`` None (a plain single-process run) the
    permutation comes from the global generator, as it always has.
    """

    def __init__(self, images, labels, info, batch_size, device, train, random_crop_padding=0,
                 horizontal_flip=False, policy=None, drop_last=None, padding_mode='zeros',
                 flip_mode='random', shard=(0, 1), seed=None):
        if flip_mode not in ('random', 'alternating'):
            raise ValueError(f'flip_mode {flip_mode!r}: choose random or alternating')
        self.rank, self.world_size = shard
        self.seed = seed
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.info = info
        self.batch_size = batch_size
        self.device = device
        self.train = train
        self.random_crop_padding = random_crop_padding
        self.padding_mode = padding_mode
        self.horizontal_flip = horizontal_flip
        self.policy = augmentations.as_policy(policy)
        self.normalize = augmentations.Normalize(info.mean, info.std)
        # drawn from the CPU generator so that a given --seed fixes it on every device
        self.flip_phase = (torch.rand(len(labels)) < 0.5).to(device) if flip_mode == 'alternating' else None
        self.epoch = 1
        self.order = None  # the current epoch's order (saved by a mid-epoch checkpoint)
        self.augment_rng = None  # the random state the current epoch's augmentation was drawn from (saved too)
        self._resume = None
        self._normalized = None
        global_batch = batch_size * self.world_size if train else batch_size
        # A last batch of one image breaks BatchNorm in training, so full batches only there.
        self.drop_last = train and len(labels) > global_batch if drop_last is None else drop_last
        if train and self.world_size > 1 and len(labels) < global_batch:
            raise UsageError(f'--batch_size {global_batch}: the {len(labels)} training images do not fill one '
                             f'global batch')

    @property
    def num_samples(self):
        return len(self.labels)

    def __len__(self):
        return len(self._batch_starts())

    def _batch_starts(self):
        """Where this rank's batches start in the epoch's order of images."""
        if self.train:
            global_batch = self.batch_size * self.world_size
            count = self.num_samples // global_batch if self.drop_last else -(-self.num_samples // global_batch)
            return range(self.rank * self.batch_size, count * global_batch, global_batch)
        count = -(-self.num_samples // self.batch_size)
        return range(self.rank * self.batch_size, count * self.batch_size, self.world_size * self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def epoch_order(self):
        """The order in which the coming epoch visits the images (all ranks' batches)."""
        if not self.train:
            return torch.arange(self.num_samples, device=self.device)
        if self.seed is None:
            return torch.randperm(self.num_samples, device=self.device)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=generator).to(self.device)

    def start_at(self, order, batch, augment_rng=None):
        """The next epoch visits the images in ``order`` (a saved :attr:`order`) from its batch ``batch``
        on, drawing no new permutation, and draws its augmentation from ``augment_rng`` (a saved
        :attr:`augment_rng`): a run resumed from a mid-epoch checkpoint sees what the uninterrupted run
        saw."""
        self._resume = (torch.as_tensor(order).to(self.device), int(batch), augment_rng)

    def __iter__(self):
        first, augment_rng = 0, None
        if self._resume is not None:
            (order, first, augment_rng), self._resume = self._resume, None
        else:
            order = self.epoch_order()
        self.order = order
        batches = self._augmented_epoch(order, augment_rng) if self.train else self._test_batches()
        yield from batches[first:]
        self.epoch += 1

    def _augmented_epoch(self, order, augment_rng=None):
        """This rank's training batches of the epoch, augmented and normalized when the epoch starts, a few
        large operations on chunks of AUGMENT_CHUNK images, so that a batch is only a view of the result
        (the step launches no pipeline kernels). The random state the draws start from is kept in
        :attr:`augment_rng`; a resumed epoch given the interrupted one's draws the same augmentation."""
        resumed_from = None
        if augment_rng is not None:
            resumed_from = get_rng_state()
            set_rng_state(augment_rng)
        self.augment_rng = get_rng_state()
        slices = [order[start:start + self.batch_size] for start in self._batch_starts()]
        index = torch.cat(slices) if slices else order[:0]
        epoch_flip = None
        if self.horizontal_flip and self.flip_phase is not None:
            epoch_flip = augmentations.alternating_flip(self.flip_phase, self.epoch)
        images = torch.cat([self.augment(self.images[part], None if epoch_flip is None else epoch_flip[part])
                            for part in index.split(AUGMENT_CHUNK)]) if len(index) else self.images[index]
        if resumed_from is not None:
            set_rng_state(resumed_from)
        sizes = [len(part) for part in slices]
        return list(zip(self.normalize(images).split(sizes), self.labels[index].split(sizes)))

    def example_batch(self):
        """A batch as this loader yields them (the first images, augmented and normalized for training), for
        compiling ahead (:meth:`engine.Trainer.compile_ahead`): one batch's work, where iterating would
        augment the whole epoch first."""
        images, labels = self.images[:self.batch_size], self.labels[:self.batch_size]
        return self.normalize(self.augment(images) if self.train else images), labels

    def _test_batches(self):
        """The evaluation batches: views of the normalized split, normalized once and kept."""
        if self._normalized is None:
            self._normalized = self.normalize(self.images)
        return [(self._normalized[start:start + self.batch_size], self.labels[start:start + self.batch_size])
                for start in self._batch_starts()]

    def augment(self, images, flip=None):
        """The training augmentation of one batch of uint8 images: the policy (before the crop, as
        the workers pipeline and the papers' code apply it), then crop and flip."""
        if self.policy is not None:
            images = self.policy(images)
        return augmentations.random_crop(images, self.random_crop_padding, self.horizontal_flip,
                                         padding_mode=self.padding_mode, flip=flip)


class TensorImageDataset(torch.utils.data.Dataset):
    """uint8 tensors served one image at a time through torchvision transforms."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(self.images[index]), self.labels[index]


def build_sample_transform(info, train, random_crop_padding=0, horizontal_flip=False,
                           policy=None, from_pil=False, image_size=None):
    """Per-sample torchvision transform equivalent to DeviceLoader's batched one (the augmentation
    policy drawn per image: ``policy.sample_transform()``)."""
    from torchvision import transforms
    steps = []
    if from_pil:
        if image_size:
            steps.append(transforms.Resize((image_size, image_size)))
        steps.append(transforms.PILToTensor())
    if train:
        policy = augmentations.as_policy(policy)
        if policy is not None:
            steps.append(policy.sample_transform())
        if random_crop_padding > 0:
            steps.append(transforms.RandomCrop(info.image_size, padding=random_crop_padding))
        if horizontal_flip:
            steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ConvertImageDtype(torch.float32), transforms.Normalize(info.mean, info.std)]
    return transforms.Compose(steps)


def open_image(path, mode, flag='--predict'):
    """The image file ``path`` decoded and converted to ``mode`` ('RGB', 'L'), or a UsageError naming
    ``flag`` and the file for whatever PIL refuses: an unknown format, a truncated or corrupt file, a
    folder, and a decompression bomb. PIL warns (DecompressionBombWarning) about an image of more than
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels and raises DecompressionBombError, which is no OSError, from
    twice that; both are refused here, from the header, before anything is decoded."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert(mode)  # decodes the whole file now, while its errors name it
    except Exception as error:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise UsageError(f'{flag} {path}: cannot read the image ({_first_line(error)})') from None


class _Unreadable:
    """A sample whose file could not be read, as a value: a worker process that raised would reach the
    main process as its traceback's text, no longer one line."""

    def __init__(self, message):
        self.message = message


class _UnreadableAsValues(torch.utils.data.Dataset):
    """``dataset`` whose UsageErrors (an image file that :func:`open_image` refused) come back as
    :class:`_Unreadable` samples, which :func:`_collate` passes on and WorkersLoader raises."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except UsageError as error:
            return _Unreadable(str(error))


def _collate(samples):
    unreadable = next((sample for sample in samples if isinstance(sample, _Unreadable)), None)
    return unreadable if unreadable is not None else torch.utils.data.default_collate(samples)


class WorkersLoader(torch.utils.data.DataLoader):
    """A DataLoader that moves each batch to ``device`` (pinned, non-blocking on CUDA).

    ``shard=(rank, world_size)``: training samples through ``DistributedSampler`` (shuffled with
    ``seed`` + epoch, ``set_epoch`` each epoch, the tail that does not divide among the ranks
    dropped, never padded with repeats); evaluation deals out whole batches as DeviceLoader does.
    """

    def __init__(self, dataset, batch_size, device, train, num_workers, shard=(0, 1), seed=0):
        rank, world_size = shard
        dataset = _UnreadableAsValues(dataset)
        options = dict(num_workers=num_workers, pin_memory=device.type == 'cuda', persistent_workers=num_workers > 0,
                       collate_fn=_collate)
        if world_size == 1 and train:
            super().__init__(dataset, batch_size=batch_size, sampler=ResumableSampler(
                torch.utils.data.RandomSampler(dataset)), drop_last=len(dataset) > batch_size, **options)
        elif world_size == 1:
            super().__init__(dataset, batch_size=batch_size, shuffle=False, **options)
        elif train:
            if len(dataset) // world_size < batch_size:
                raise UsageError(f'--batch_size {batch_size * world_size}: the {len(dataset)} training images do '
                                 f'not fill one global batch')
            sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed,
                                                          drop_last=True)
            super().__init__(dataset, batch_size=batch_size, sampler=ResumableSampler(sampler), drop_last=True,
                             **options)
        else:
            # this rank's batches one after another: consecutive groups of batch_size are exactly
            # those batches, because only the last batch of the test set can be short
            batches = range(rank, -(-len(dataset) // batch_size), world_size)
            indices = [i for b in batches for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))]
            super().__init__(dataset, batch_size=batch_size, sampler=indices, **options)
        self.device = device

    @property
    def num_samples(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        """Reshuffle a distributed run's shards (DeviceLoader's alternating flip depends on it too)."""
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.set_epoch(epoch)

    @property
    def order(self):
        return self.sampler.order if isinstance(self.sampler, ResumableSampler) else None

    def start_at(self, order, batch, augment_rng=None):
        """As :meth:`DeviceLoader.start_at`: the next epoch takes the samples of ``order`` from batch
        ``batch`` on. The order is that of the interrupted epoch; with worker processes
        (--num_workers > 0) the random augmentation of the remaining images is drawn anew."""
        self.sampler.start_at(order, batch * self.batch_size)

    def example_batch(self):
        """As :meth:`DeviceLoader.example_batch`: the first batch of an epoch."""
        return next(iter(self))

    def close(self):
        """Stop the worker processes now. Their iterator persists from epoch to epoch; left to the garbage
        collector, its teardown (queues closed under their feeder threads) comes at a random later moment,
        in whatever runs then, with a multiprocessing traceback on stderr."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            iterator._shutdown_workers()

    def __iter__(self):
        resuming = isinstance(self.sampler, ResumableSampler) and self.sampler.resuming
        # a new iterator draws its workers' base seed from the global generator; a resumed epoch's
        # random state was saved after that draw, so the draw is undone
        rng_state = torch.get_rng_state() if resuming else None
        iterator = super().__iter__()
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        for batch in iterator:
            if isinstance(batch, _Unreadable):
                self.close()
                raise UsageError(batch.message)
            images, labels = batch
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))


class ResumableSampler(torch.utils.data.Sampler):
    """A training sampler that remembers the order it gave this epoch (:attr:`order`) and can start
    the next epoch inside a saved order (:meth:`start_at`) instead of drawing a new one; otherwise
    it is ``sampler`` (same random draws, so runs are unchanged)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.order = None
        self._resume = None

    def set_epoch(self, epoch):
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def start_at(self, order, first):
        self._resume = (torch.as_tensor(order, dtype=torch.int64), int(first))

    @property
    def resuming(self):
        return self._resume is not None

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        first = 0
        if self._resume is not None:
            (self.order, first), self._resume = self._resume, None
        else:
            self.order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
        return iter(self.order[first:].tolist())


# what torchvision's default loader gives (RGB), but a file PIL refuses is one line naming it
_read_folder_image = functools.partial(open_image, mode='RGB', flag='--dataset_dir')


def _nested_image_folder_hint(dataset_dir):
    """A hint where ``dataset_dir`` has no train/ but a folder of its has train/ and test/ (the class
    folders nested one level down, as an unpack script may write them); else ''."""
    try:
        children = sorted(entry.path for entry in os.scandir(dataset_dir) if entry.is_dir())
    except OSError:
        return ''
    nested = [child for child in children
              if os.path.isdir(os.path.join(child, 'train')) and os.path.isdir(os.path.join(child, 'test'))]
    return f' ({nested[0]} has train/ and test/: pass it as --dataset_dir)' if len(nested) == 1 else ''


def _image_folder_info(dataset_dir, image_size):
    from torchvision import datasets
    splits = {}
    for split in ('train', 'test'):
        path = os.path.join(dataset_dir, split)
        if not os.path.isdir(path):
            raise UsageError(f'--dataset_dir: ImageFolder needs {path}/ with one folder per class'
                             + _nested_image_folder_hint(dataset_dir))
        try:
            splits[split] = datasets.ImageFolder(path, loader=_read_folder_image)
        except (FileNotFoundError, RuntimeError) as error:
            raise UsageError(f'--dataset_dir: {path}: {error}') from None
    train_set = splits['train']
    if splits['test'].classes != train_set.classes:
        raise UsageError(f'--dataset_dir: {dataset_dir}: train/ and test/ have different class folders')
    first_image = train_set.loader(train_set.samples[0][0])
    size = image_size or first_image.size[0]
    channels = len(first_image.getbands())
    # Per-channel statistics from up to 1000 training images stand in for the published ones.
    stride = max(1, len(train_set) // 1000)
    pixels = torch.stack([
        build_sample_transform(DatasetInfo('', channels, size, 0, (0.0,) * channels, (1.0,) * channels, False),
                               train=False, from_pil=True, image_size=size)(train_set.loader(path))
        for path, _ in train_set.samples[::stride]])
    mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    info = DatasetInfo('ImageFolder', channels, size, len(train_set.classes), mean, std, True)
    return info, splits


def dataset_info(dataset, dataset_dir, image_size=None, folder_optional=False):
    """The DatasetInfo of a built-in dataset, or of the ImageFolder in ``dataset_dir`` (its class count,
    image size and normalization statistics, read from its training images). ``folder_optional``
    (--list_archs, which only sizes the models): where ``dataset_dir`` holds no ImageFolder, that of 10
    classes of RGB images of ``image_size`` (default 32)."""
    if dataset in DATASETS:
        return DATASETS[dataset]
    if folder_optional and not os.path.isdir(os.path.join(dataset_dir, 'train')):
        return DatasetInfo('ImageFolder', 3, image_size or 32, 10, (), (), True)
    return _image_folder_info(dataset_dir, image_size)[0]


@dataclass
class Data:
    info: DatasetInfo
    train_loader: object
    test_loader: object
    test_split_name: str


def fetch_dataset(dataset, dataset_dir):
    """Download a missing built-in dataset (one process per machine, before the others read it)."""
    if dataset in DATASETS and missing(dataset_dir, dataset):
        _download(dataset_dir, dataset)


def data_kwargs(args):
    """:func:`build_data`'s arguments from the command line's settings, but the batch size, device, policy
    and sharding, which main.py works out."""
    return dict(dataset=args.dataset, dataset_dir=args.dataset_dir, data_pipeline=args.data_pipeline,
                num_workers=args.num_workers, use_random_crop=args.use_random_crop,
                random_crop_padding=args.random_crop_padding, use_horizontal_flip=args.use_horizontal_flip,
                val_ratio=args.val_ratio, download=args.download, image_size=args.image_size,
                test_batch_size=args.test_batch_size, padding_mode=args.padding_mode,
                flip_mode='alternating' if args.alternating_flip else 'random')


def build_data(dataset, dataset_dir, batch_size, device, data_pipeline='device', num_workers=2,
               use_random_crop=True, random_crop_padding=4, use_horizontal_flip=True,
               policy=None, val_ratio=0.0, download=False, image_size=None,
               test_batch_size=None, padding_mode='zeros', flip_mode='random', shard=(0, 1), seed=None):
    """Training and evaluation loaders for ``dataset`` (evaluation on the held-out
    validation split when ``val_ratio`` > 0, else on the test set). In a distributed run
    ``batch_size`` is the batch of one rank and ``shard`` is (rank, world size). ``policy``: an
    :class:`augmentations.AugmentPolicy` for the training images, or None (True: AutoAugment's
    CIFAR-10 policy)."""
    test_batch_size = test_batch_size or max(batch_size, 256)
    sharding = dict(shard=shard, seed=seed)
    if dataset == 'ImageFolder':
        return _build_image_folder_data(dataset_dir, batch_size, test_batch_size, device, num_workers,
                                        use_random_crop, random_crop_padding, use_horizontal_flip,
                                        policy, image_size, sharding)
    if dataset not in DATASETS:
        raise UsageError(f'--dataset {dataset!r}: unknown; choose from {", ".join(DATASET_CHOICES)}')
    info = DATASETS[dataset]
    if image_size is not None:
        raise UsageError(f'--image_size applies to --dataset ImageFolder only ({dataset} images are '
                         f'{info.image_size}x{info.image_size})')
    train_images, train_labels = load_split(dataset_dir, dataset, train=True, download=download)
    if val_ratio > 0:
        (train_images, train_labels), (test_images, test_labels) = split_validation(
            train_images, train_labels, val_ratio)
    else:
        test_images, test_labels = load_split(dataset_dir, dataset, train=False, download=download)
    augment = dict(random_crop_padding=random_crop_padding if use_random_crop else 0,
                   horizontal_flip=use_horizontal_flip and info.horizontal_flip,
                   policy=policy)
    if data_pipeline == 'device':
        train_loader = DeviceLoader(train_images, train_labels, info, batch_size, device, True, **augment,
                                    padding_mode=padding_mode, flip_mode=flip_mode, **sharding)
        test_loader = DeviceLoader(test_images, test_labels, info, test_batch_size, device, False, **sharding)
    elif data_pipeline == 'workers':
        if padding_mode != 'zeros' or flip_mode != 'random':
            raise UsageError('--padding_mode reflect and --alternating_flip need --data_pipeline device')
        train_set = TensorImageDataset(train_images, train_labels, build_sample_transform(info, True, **augment))
        test_set = TensorImageDataset(test_images, test_labels, build_sample_transform(info, False))
        workers = dict(shard=shard, seed=seed or 0)
        train_loader = WorkersLoader(train_set, batch_size, device, True, num_workers, **workers)
        test_loader = WorkersLoader(test_set, test_batch_size, device, False, num_workers, **workers)
    else:
        raise UsageError(f'--data_pipeline {data_pipeline!r}: choose device or workers')
    return Data(info, train_loader, test_loader, 'val' if val_ratio > 0 else 'test')


def _build_image_folder_data(dataset_dir, batch_size, test_batch_size, device, num_workers, use_random_crop,
                             random_crop_padding, use_horizontal_flip, policy, image_size, sharding):
    info, splits = _image_folder_info(dataset_dir, image_size)
    augment = dict(random_crop_padding=random_crop_padding if use_random_crop else 0,
                   horizontal_flip=use_horizontal_flip, policy=policy)
    splits['train'].transform = build_sample_transform(info, True, from_pil=True, image_size=info.image_size,
                                                       **augment)
    splits['test'].transform = build_sample_transform(info, False, from_pil=True, image_size=info.image_size)
    workers = dict(shard=sharding['shard'], seed=sharding['seed'] or 0)
    return Data(info, WorkersLoader(splits['train'], batch_size, device, True, num_workers, **workers),
                WorkersLoader(splits['test'], test_batch_size, device, False, num_workers, **workers), 'test')


# Class names of the built-in datasets, used where the dataset files hold none (CIFAR-10's batches.meta
# and CIFAR-100's meta hold theirs).
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR100_CLASSES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
    caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
    flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
    maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
    plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
    snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout
    tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
CLASS_NAMES = {
    'CIFAR10': CIFAR10_CLASSES, 'CIFAR100': CIFAR100_CLASSES, 'MNIST': tuple('0123456789'),
    'FashionMNIST': ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                     'Ankle boot'),
    # Kuzushiji-MNIST (arXiv 1812.01718): the hiragana of each class, romanized
    'KMNIST': ('o', 'ki', 'su', 'tsu', 'na', 'ha', 'ma', 'ya', 're', 'wo'),
}
def class_names(dataset, dataset_dirs):
    """The class names of ``dataset``: from CIFAR's meta file in the first of ``dataset_dirs`` that has
    one (read as data only, :func:`read_cifar_pickle`), the class folders of an ImageFolder, else the
    built-in lists."""
    for directory in [d for d in dataset_dirs if d]:
        if dataset in CIFAR_META:
            names = cifar_class_names(directory, dataset)
            if names is not None:
                return names
        elif dataset == 'ImageFolder' and os.path.isdir(os.path.join(directory, 'train')):
            from torchvision.datasets.folder import find_classes  # ImageFolder's own class order
            try:
                return tuple(find_classes(os.path.join(directory, 'train'))[0])
            except FileNotFoundError:  # no class folders
                continue
    return CLASS_NAMES.get(dataset)
