"""Opt-in checks on real CIFAR-10 images: a short training run must learn them.

    CIFAR_TOOLKIT_REALDATA=DIR python -m pytest -q -m realdata

DIR holds ``cifar-10-batches-py/`` (what torchvision downloads: the official release) or
``unpack_cifar10.py`` with its JPEG pack; without the variable, ../shared/data beside the checkout
where it exists. The tests skip in one line when neither holds CIFAR-10.
"""
import json
import os
import pickle
import subprocess
import sys

import pytest

import dataloader
from conftest import realdata_path, run_main

pytestmark = pytest.mark.realdata
N_TRAIN, N_TEST = 5000, 1000


def write_cifar10_subset(source, root, n_train, n_test):
    """The first ``n_train`` training and ``n_test`` test images of the CIFAR-10 in ``source`` (a
    --dataset_dir) as a cifar-10-batches-py/ of their own in ``root``, its class names included."""
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder)
    train, test = (dataloader.load_split(source, 'CIFAR10', train=split) for split in (True, False))
    per_batch = n_train // 5
    batches = [(f'data_batch_{i + 1}', train, i * per_batch, per_batch) for i in range(5)]
    for name, (images, labels), start, n in batches + [('test_batch', test, 0, n_test)]:
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'batch_label': name, 'labels': labels[start:start + n].tolist(),
                         'data': images[start:start + n].reshape(n, 3072).numpy()}, f, protocol=2)
    with open(os.path.join(source, 'cifar-10-batches-py', 'batches.meta'), 'rb') as f:
        meta = f.read()
    with open(os.path.join(folder, 'batches.meta'), 'wb') as f:
        f.write(meta)


@pytest.fixture(scope='module')
def real_cifar10(tmp_path_factory):
    """A --dataset_dir with 5,000 training and 1,000 test images of the real CIFAR-10: the first ones
    of the real-data folder's cifar-10-batches-py/, else of its JPEG pack, unpacked."""
    source = realdata_path('cifar-10-batches-py', 'unpack_cifar10.py',
                           what='cifar-10-batches-py/ (as torchvision downloads it) or unpack_cifar10.py')
    root = str(tmp_path_factory.mktemp('real_cifar10'))
    if source.endswith('.py'):
        subprocess.run([sys.executable, source, root, '--limit', str(N_TRAIN)], check=True, capture_output=True)
    else:
        write_cifar10_subset(os.path.dirname(source), root, N_TRAIN, N_TEST)
    return root


def test_loss_decreases_on_real_cifar10(real_cifar10, tmp_path):
    outdir = tmp_path / 'run'
    assert run_main(['--arch', 'resnet_preact', '--depth', '8', '--base_channels', '16', '--epochs', '3',
                     '--batch_size', '64', '--scheduler', 'cosine', '--base_lr', '0.1', '--device', 'cpu',
                     '--no-tensorboard', '--dataset_dir', real_cifar10, '--outdir', str(outdir)]) == 0
    log = json.load(open(outdir / 'log.json'))
    assert log[-1]['train_loss'] < log[0]['train_loss'] < 2.3
    assert log[-1]['test_accuracy'] > 0.3  # chance is 0.1
