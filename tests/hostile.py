"""Files that would run code and damaged files, for tests/test_dataloader_files.py (the library calls),
tests/test_runs.py (run folders) and tests/test_main_fuzz.py (the same files through main.py's command line)."""
import json
import os
import pickle
import shlex
import struct
import zipfile
import zlib

import numpy as np
import torch

from conftest import write_cifar10, write_image_folder


class CodeRunner:
    """An object whose unpickling runs a shell command that creates the file ``marker``: what a full
    unpickler (pickle.load, torch.load without weights_only) does with a hostile file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(self.marker)}',)


CIFAR10_FOLDER = 'cifar-10-batches-py'


def cifar10_batch(n=40, num_classes=10, seed=0):
    """The dict of a real CIFAR-10 batch file (labels a list of ints, data N x 3072 uint8)."""
    rng = np.random.default_rng(seed)
    return {'batch_label': 'tiny', 'labels': [int(label) for label in rng.integers(0, num_classes, n)],
            'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'filenames': [f'{i}.png' for i in range(n)]}


def _without(batch, key):
    return {name: value for name, value in batch.items() if name != key}


# Damaged CIFAR-10 files: the file, what it holds instead (a dict, or bytes written as they are), and a
# part of the one-line error that names what is wrong.
def damaged_cifar10_files():
    batch = cifar10_batch()
    good = pickle.dumps(batch, protocol=2)
    return {
        'short_labels': ('data_batch_2', {**batch, 'labels': batch['labels'][:-1]}, '(39 labels for 40 images)'),
        'label_10': ('data_batch_3', {**batch, 'labels': batch['labels'][:5] + [10] + batch['labels'][6:]},
                     '(label 10 of image 5 is outside the 10 classes (0 to 9))'),
        'label_negative': ('test_batch', {**batch, 'labels': [-1] + batch['labels'][1:]},
                           '(label -1 of image 0 is outside the 10 classes'),
        'empty_test_batch': ('test_batch', {**batch, 'labels': [], 'data': np.zeros((0, 3072), np.uint8)},
                             '(no images)'),
        'float_data': ('data_batch_1', {**batch, 'data': batch['data'].astype(np.float32)},
                       '(UnpicklingError: an array of dtype <f4, not of integers)'),
        'int64_data': ('data_batch_1', {**batch, 'data': batch['data'].astype(np.int64)},
                       "('data' is an array of int64, not of uint8)"),
        'partial_image': ('data_batch_4', {**batch, 'data': batch['data'][:, :3000]},
                          "('data' holds 120000 bytes, not a whole number of 3x32x32 images)"),
        'string_labels': ('data_batch_5', {**batch, 'labels': [str(label) for label in batch['labels']]},
                          "('labels' is not a list of integers)"),
        'ragged_labels': ('data_batch_5', {**batch, 'labels': [[1], [2, 3]] * 20},
                          "('labels' is not a list of integers)"),
        'no_labels': ('data_batch_1', _without(batch, 'labels'), "(no 'labels' entry)"),
        'a_list': ('data_batch_1', [batch['data'], batch['labels']], '(it holds a list, not a dict)'),
        'object_array': ('data_batch_1', {**batch, 'data': np.array([7] * 3072, dtype=object)},
                         '(UnpicklingError: an array of Python objects)'),
        'truncated': ('data_batch_2', good[:len(good) // 2], 'is not a valid CIFAR10 batch file (UnpicklingError'),
        'garbage': ('test_batch', bytes(range(256)) * 4, 'is not a valid CIFAR10 batch file ('),
        'numpy_module_missing': ('data_batch_1', good.replace(b'numpy._core.multiarray', b'numpy._core.gone_module'),
                                 'refused: the pickle calls numpy._core.gone_module._reconstruct'),
    }


def write_damaged_cifar10(root, kind):
    """A tiny CIFAR-10 in ``root`` with the file of damage ``kind`` replaced: (path of that file, the
    expected part of the error)."""
    file_name, content, expected = damaged_cifar10_files()[kind]
    write_cifar10(root)
    path = os.path.join(root, CIFAR10_FOLDER, file_name)
    with open(path, 'wb') as f:
        f.write(content if isinstance(content, bytes) else pickle.dumps(content, protocol=2))
    return path, expected


def write_payload_cifar10(root, file_name, marker, protocol=2):
    """A tiny CIFAR-10 in ``root`` whose ``file_name`` (a batch or batches.meta) runs ``touch marker``
    when a full unpickler reads it; the path of that file."""
    write_cifar10(root)
    path = os.path.join(root, CIFAR10_FOLDER, file_name)
    content = {'label_names': CodeRunner(marker)} if file_name == 'batches.meta' else {
        **cifar10_batch(), 'data': CodeRunner(marker)}
    with open(path, 'wb') as f:
        pickle.dump(content, f, protocol=protocol)
    return path


def _png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def write_bomb_png(path, side):
    """A PNG of a few bytes whose header says side x side grey pixels (a decompression bomb)."""
    header = struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header) + _png_chunk(b'IDAT', zlib.compress(b''))
                + _png_chunk(b'IEND', b''))
    return path


def write_png(path, side=16):
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def truncate(path, keep=0.5):
    with open(path, 'r+b') as f:
        f.truncate(int(os.path.getsize(path) * keep))
    return path


def write_bad_images(folder):
    """{kind: path} of images that PIL refuses: truncated, not an image, decompression bombs above
    PIL's error and its warning sizes, and a folder named like an image."""
    os.makedirs(folder, exist_ok=True)
    paths = {kind: os.path.join(folder, f'{kind}.png')
             for kind in ('truncated', 'not_an_image', 'bomb', 'bomb_warning_size', 'folder')}
    truncate(write_png(paths['truncated'], side=64))
    with open(paths['not_an_image'], 'w') as f:
        f.write('not an image\n')
    write_bomb_png(paths['bomb'], 20000)  # 4e8 pixels: PIL raises DecompressionBombError
    write_bomb_png(paths['bomb_warning_size'], 12000)  # 1.44e8 pixels: PIL only warns
    os.makedirs(paths['folder'], exist_ok=True)
    return paths


def write_image_folder_with_bad_image(root, split):
    """A tiny ImageFolder whose ``split``/dog/1.png is truncated; that file's path."""
    write_image_folder(root)
    return truncate(os.path.join(root, split, 'dog', '1.png'))


def deeply_nested_json(depth):
    return '{"epochs": ' + '[' * depth + ']' * depth + '}'


def flip_bit_in_tensor(path, bit=4):
    """Flip one bit in the middle of the largest tensor's bytes of the torch.save file ``path`` (a bit rotted
    on the disk): torch.load still reads the file, with one wrong value. Returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if '/data/' in info.filename),
                     key=lambda info: info.file_size)
    with open(path, 'r+b') as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack('<HH', f.read(4))
        f.seek(record.header_offset + 30 + name_length + extra_length + record.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ (1 << bit)]))
    return record.filename.split('/', 1)[1]


def write_wrong_run_files(root, state_dict, settings):
    """Weights and run folders that hold the wrong thing or are damaged, in ``root``, for the
    weights ``state_dict`` of a model built with ``settings``: {kind: path}. 'weights ...' and 'config ...'
    are a model_state.pth (beside a config.json of that kind), 'run ...' the folder of a run."""
    def folder(name, config=None, **pth):
        path = os.path.join(root, name)
        os.makedirs(path)
        if config is not None:
            with open(os.path.join(path, 'config.json'), 'w') as f:
                f.write(config if isinstance(config, str) else json.dumps(config))
        for file_name, content in pth.items():
            import utils  # the writer main.py uses: its checksums
            utils.save_checkpoint(content, os.path.join(path, f'{file_name.replace("_prev", ".prev")}.pth'))
        return path
    good = {'settings': settings}
    checkpoint = {'model': state_dict, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 1,
                  'args': settings, 'log': []}
    files = {}
    for kind, content in (('tensor', torch.ones(3)), ('list', [torch.ones(3)]), ('dict of numbers', {'epoch': 3})):
        files[f'weights {kind}'] = os.path.join(folder(f'weights_{kind.replace(" ", "_")}', good, model_state=content),
                                                'model_state.pth')
    for kind, config in (('list', '[1, 2]'), ('null', 'null'), ('settings a list', {'settings': [1]}),
                         ('unknown arch', {'settings': {**settings, 'arch': 'resnet_50'}}),
                         ('bad depth', {'settings': {**settings, 'depth': 'eight'}}), ('not JSON', '{"settings": ')):
        files[f'config {kind}'] = os.path.join(folder(f'config_{kind.replace(" ", "_")}', config,
                                                      model_state=state_dict), 'model_state.pth')
    flipped = folder('flipped_weights', good, model_state=state_dict, checkpoint=checkpoint)
    flip_bit_in_tensor(os.path.join(flipped, 'model_state.pth'))
    files['weights flipped'] = os.path.join(flipped, 'model_state.pth')
    for kind, content in (('tensor', torch.ones(3)), ('list', [1, 2]), ('weights only', state_dict),
                          ('incomplete', {'model': state_dict, 'epoch': 1})):
        files[f'run checkpoint {kind}'] = folder(f'run_checkpoint_{kind.replace(" ", "_")}', good, checkpoint=content)
    files['run flipped'] = folder('run_flipped', good, checkpoint=checkpoint, checkpoint_prev=checkpoint)
    flip_bit_in_tensor(os.path.join(files['run flipped'], 'checkpoint.pth'))
    files['run config list'] = folder('run_config_list', '[1, 2]', checkpoint=checkpoint)
    files['run not a run'] = folder('run_not_a_run')
    with open(os.path.join(files['run not a run'], 'notes.txt'), 'w') as f:
        f.write('mine\n')
    files['run finished without checkpoint'] = folder('run_finished', good, model_state=state_dict)
    for name, text in (('log.json', '[{"epoch": 1, "test_accuracy": 0.5}]'), ('summary.json', '{"epochs": 1}')):
        with open(os.path.join(files['run finished without checkpoint'], name), 'w') as f:
            f.write(text)
    files['run locked'] = folder('run_locked', good, checkpoint=checkpoint)
    return files
