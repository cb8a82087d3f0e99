"""Opt-in checks on the real CIFAR-10 copy and MNIST test set in ../shared/data.

    python -m pytest -m realdata
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_main

SHARED_DATA = os.path.join(ROOT, '..', 'shared', 'data')
pytestmark = pytest.mark.realdata


@pytest.fixture(scope='module')
def real_cifar10(tmp_path_factory):
    script = os.path.join(SHARED_DATA, 'unpack_cifar10.py')
    if not os.path.isfile(script):
        pytest.skip('../shared/data is not beside the checkout')
    root = str(tmp_path_factory.mktemp('real_cifar10'))
    subprocess.run([sys.executable, script, root, '--limit', '5000'], check=True, capture_output=True)
    return root


def test_loss_decreases_on_real_cifar10(real_cifar10, tmp_path):
    outdir = tmp_path / 'run'
    assert run_main(['--arch', 'resnet_preact', '--depth', '8', '--base_channels', '16', '--epochs', '3',
                     '--batch_size', '64', '--scheduler', 'cosine', '--base_lr', '0.1', '--device', 'cpu',
                     '--no-tensorboard', '--dataset_dir', real_cifar10, '--outdir', str(outdir)]) == 0
    log = json.load(open(outdir / 'log.json'))
    assert log[-1]['train_loss'] < log[0]['train_loss'] < 2.3
    assert log[-1]['test_accuracy'] > 0.3  # chance is 0.1
