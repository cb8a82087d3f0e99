"""Files that would run code, damaged files, and the modes of the files a run writes.

CIFAR's pickles are read by dataloader.read_cifar_pickle, which admits only the parts of numpy arrays;
checkpoints by torch.load(weights_only=True); images by dataloader.open_image. Each refusal is one
UsageError line naming the file (main.py prints it and exits with 2). These are the library calls;
tests/test_main_fuzz.py sends the same files through main.py's command line.
"""
import json
import multiprocessing
import os
import pickle
import stat

import numpy as np
import pytest
import torch

import dataloader
import flags
import utils
from conftest import TINY_RUN, run_main, write_cifar10, write_cifar100, write_mnist_family
from hostile import (CodeRunner, damaged_cifar10_files, deeply_nested_json, write_bad_images, write_damaged_cifar10,
                     write_image_folder_with_bad_image, write_payload_cifar10, write_png)
from utils import UsageError

CPU = torch.device('cpu')


def refusal(call):
    """The message of the UsageError that ``call()`` raises, checked to be one line."""
    with pytest.raises(UsageError) as raised:
        call()
    message = str(raised.value)
    assert '\n' not in message and 'Traceback' not in message
    return message


# ----------------------------------------------------------------------------- pickles that run code

READERS = {  # what reads each file: training, --evaluate (the test split), class names (--predict)
    'data_batch_1': lambda root: dataloader.load_split(root, 'CIFAR10', train=True),
    'test_batch': lambda root: dataloader.load_split(root, 'CIFAR10', train=False),
    'batches.meta': lambda root: dataloader.cifar_class_names(root, 'CIFAR10'),
}


@pytest.mark.parametrize('protocol', [0, 2, 4])
@pytest.mark.parametrize('file_name', sorted(READERS))
def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path, file_name, protocol):
    marker = str(tmp_path / 'ran')
    path = write_payload_cifar10(str(tmp_path / 'data'), file_name, marker, protocol)
    message = refusal(lambda: READERS[file_name](str(tmp_path / 'data')))
    assert not os.path.exists(marker)
    assert message == (f'--dataset_dir: {path}: refused: the pickle calls posix.system, which is none of the numpy '
                       f'array parts CIFAR files hold (a pickle that calls a function can run code)')


def test_the_payload_is_live(tmp_path):
    """The full unpickler the loader used before runs the payload: the test above tests something."""
    marker = str(tmp_path / 'ran')
    path = write_payload_cifar10(str(tmp_path / 'data'), 'data_batch_1', marker)
    with open(path, 'rb') as f:
        pickle.load(f, encoding='latin1')
    assert os.path.exists(marker)


@pytest.mark.parametrize('global_name', [b'builtins\neval', b'subprocess\nPopen', b'copyreg\n_reconstructor',
                                         b'numpy\nload', b'numpy.core.multiarray\n_vec_string',
                                         b'torch._utils\n_rebuild_tensor_v2'])
def test_only_the_numpy_array_parts_are_admitted(tmp_path, global_name):
    path = tmp_path / 'batch'
    path.write_bytes(b'\x80\x02c' + global_name + b'\nX\x01\x00\x00\x00x\x85R.')  # GLOBAL, ('x',), REDUCE
    message = refusal(lambda: dataloader.read_cifar_pickle(str(path)))
    assert f'refused: the pickle calls {global_name.decode().replace(chr(10), ".")},' in message


def test_a_pickle_cannot_rewrite_the_stand_ins(tmp_path):
    """BUILD with a slot state sets attributes of what it builds: not of the reader's own classes."""
    path = tmp_path / 'batch'
    path.write_bytes(b'\x80\x02cnumpy\nndarray\nN}X\x07\x00\x00\x00resolveK\x01s\x86b.')
    refusal(lambda: dataloader.read_cifar_pickle(str(path)))
    assert not hasattr(dataloader._NdarrayClass, 'resolve')


def test_checkpoint_that_runs_code_is_refused_unrun(tmp_path):
    marker, path = str(tmp_path / 'ran'), str(tmp_path / 'checkpoint.pth')
    torch.save({'model': {'weight': torch.zeros(2)}, 'extra': CodeRunner(marker)}, path)
    message = refusal(lambda: utils.load_checkpoint(path))
    assert not os.path.exists(marker)
    assert message.startswith(f'checkpoint {path} is corrupt or not a checkpoint (UnpicklingError: ')


# ----------------------------------------------------------------------------- damaged CIFAR and MNIST files

@pytest.mark.parametrize('kind', sorted(damaged_cifar10_files()))
def test_damaged_cifar_batch_is_one_line_naming_file_and_fault(tmp_path, kind):
    path, expected = write_damaged_cifar10(str(tmp_path), kind)
    train = not path.endswith('test_batch')
    message = refusal(lambda: dataloader.load_split(str(tmp_path), 'CIFAR10', train=train))
    assert message.startswith(f'--dataset_dir: {path}') and expected in message, message


def test_cifar100_label_outside_its_100_classes(tmp_path):
    root = write_cifar100(str(tmp_path))
    path = os.path.join(root, 'cifar-100-python', 'test')
    with open(path, 'rb') as f:
        batch = pickle.load(f, encoding='latin1')
    batch['fine_labels'][3] = 100
    with open(path, 'wb') as f:
        pickle.dump(batch, f, protocol=2)
    dataloader.load_split(root, 'CIFAR100', train=True)  # the other file is fine
    message = refusal(lambda: dataloader.load_split(root, 'CIFAR100', train=False))
    assert message == (f'--dataset_dir: {path} is not a valid CIFAR100 batch file (label 100 of image 3 is '
                       f'outside the 100 classes (0 to 99))')


def test_mnist_label_outside_its_classes(tmp_path):
    root = write_mnist_family(str(tmp_path), compress=False)
    path = os.path.join(root, 'MNIST', 'raw', 't10k-labels-idx1-ubyte')
    with open(path, 'r+b') as f:
        f.seek(8 + 7)  # past the magic number and the count: the label of image 7
        f.write(bytes([12]))
    message = refusal(lambda: dataloader.load_split(root, 'MNIST', train=False))
    assert message == f'--dataset_dir: {path}: label 12 of image 7 is outside the 10 classes (0 to 9)'


def test_damaged_meta_file_is_refused(tmp_path):
    path = os.path.join(write_cifar10(str(tmp_path)), 'cifar-10-batches-py', 'batches.meta')
    with open(path, 'wb') as f:
        pickle.dump({'label_names': ['cat', 'dog']}, f, protocol=2)
    message = refusal(lambda: dataloader.cifar_class_names(str(tmp_path), 'CIFAR10', flag='--predict'))
    assert message == (f"--predict: {path} is not a valid CIFAR10 meta file (no list of 10 class names under "
                       f"'label_names')")
    assert dataloader.cifar_class_names(str(tmp_path / 'elsewhere'), 'CIFAR10') is None


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize('kind', ['truncated', 'not_an_image', 'bomb', 'bomb_warning_size', 'folder'])
def test_open_image_refuses_what_pil_refuses_in_one_line(tmp_path, kind):
    path = write_bad_images(str(tmp_path))[kind]
    message = refusal(lambda: dataloader.open_image(path, 'RGB'))
    assert message.startswith(f'--predict {path}: cannot read the image (')
    if kind.startswith('bomb'):
        assert 'could be decompression bomb DOS attack' in message


def test_open_image_converts_a_good_image(tmp_path):
    path = write_png(str(tmp_path / 'good.png'), side=12)
    rgb, grey = dataloader.open_image(path, 'RGB'), dataloader.open_image(path, 'L')
    assert (rgb.mode, rgb.size, grey.mode) == ('RGB', (12, 12), 'L')
    assert np.asarray(rgb).any()  # decoded, and the file closed behind it


def test_image_folder_unreadable_training_image_refused_before_training(tmp_path):
    path = write_image_folder_with_bad_image(str(tmp_path), 'train')  # read for the normalization statistics
    message = refusal(lambda: dataloader.build_data('ImageFolder', str(tmp_path), 4, CPU, num_workers=0))
    assert message.startswith(f'--dataset_dir {path}: cannot read the image (image file is truncated')


@pytest.mark.parametrize('num_workers', [0, 2])
def test_image_folder_unreadable_image_met_while_loading_is_one_line(tmp_path, num_workers):
    """A worker process's error would reach the main process as its traceback's text; it arrives as the
    one line naming the file."""
    path = write_image_folder_with_bad_image(str(tmp_path), 'test')
    children_before = set(multiprocessing.active_children())
    data = dataloader.build_data('ImageFolder', str(tmp_path), 4, CPU, num_workers=num_workers)
    message = refusal(lambda: list(data.test_loader))
    assert message.startswith(f'--dataset_dir {path}: cannot read the image (image file is truncated')
    # the loader's worker processes are stopped with the error, not left to the garbage collector
    assert set(multiprocessing.active_children()) == children_before


def test_training_run_meeting_an_unreadable_image_exits_2_in_one_line(tmp_path, capsys):
    """Met during the run (an image that the setup does not read), after the run directory exists:
    the run stops with one line naming the file, writes no final weights, and --resume meets it again."""
    root = str(tmp_path / 'folder')
    path = write_image_folder_with_bad_image(root, 'test')
    outdir = str(tmp_path / 'run')
    capsys.readouterr()
    code = run_main([*TINY_RUN, '--epochs', '1', '--dataset', 'ImageFolder', '--dataset_dir', root,
                     '--num_workers', '1', '--outdir', outdir])
    err = capsys.readouterr().err
    # the progress bars of the epoch share stderr; the error is its last line, and the only one
    assert code == 2 and 'Traceback' not in err and err.count(': error: ') == 1, err
    last_line = err.rstrip('\n').splitlines()[-1]
    assert last_line.split(': error: ', 1)[1].startswith(f'--dataset_dir {path}: cannot read the image ('), err
    assert not os.path.exists(os.path.join(outdir, 'model_state.pth'))


# ----------------------------------------------------------------------------- JSON and echoed values

def test_json_nested_deeper_than_the_recursion_limit_is_one_line(tmp_path):
    path = tmp_path / 'deep.json'
    path.write_text(deeply_nested_json(100_000))
    message = refusal(lambda: utils.load_json(str(path), what='--config'))
    assert message.startswith(f'--config {path}: nested deeper than this reader follows')


def test_a_huge_echoed_value_is_cut_to_a_readable_length():
    huge = 'x' * 50_000_000
    shown = flags.show(huge)
    assert shown == 'x' * flags.SHOWN_LENGTH + '... (50,000,000 characters)'
    assert flags.show('resnet') == 'resnet' and flags.show([80, 120]) == '[80, 120]'  # short values as before
    message = str(UsageError(f'--config c.json: "arch": "{huge}" (a JSON string): expected one of a, b (--arch)'))
    assert len(message) < UsageError.MAX_LENGTH + 50
    assert message.startswith('--config c.json: "arch": "xxx') and message.endswith('expected one of a, b (--arch)')
    assert '[49,998,' in message and ' characters] ' in message
    short = '--epochs -1: expected an integer >= 1'
    assert str(UsageError(short)) == short


# ----------------------------------------------------------------------------- modes of the run's files

@pytest.fixture
def restore_umask():
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


@pytest.mark.parametrize('mask', [0o022, 0o002, 0o027, 0o077])
def test_run_files_get_the_mode_the_umask_gives_an_ordinary_file(tmp_path, restore_umask, mask):
    os.umask(mask)
    expected = 0o666 & ~mask
    ordinary = tmp_path / 'ordinary'
    ordinary.write_text('x')
    assert stat.S_IMODE(ordinary.stat().st_mode) == expected
    writers = {'config.json': lambda path: utils.save_json({'a': 1}, path),
               'checkpoint.pth': lambda path: utils.save_checkpoint({'epoch': 1}, path),
               'model_state.pth': lambda path: utils.save_weights({'w': torch.zeros(1)}, path)}
    for name, write in writers.items():
        path = str(tmp_path / name)
        for _ in range(2):  # created, then replaced
            write(path)
            assert stat.S_IMODE(os.stat(path).st_mode) == expected, (name, oct(os.stat(path).st_mode))
    assert sorted(os.listdir(tmp_path)) == sorted(['ordinary', *writers])  # no temporary file left
    with open(tmp_path / 'config.json') as f:
        assert json.load(f) == {'a': 1}
