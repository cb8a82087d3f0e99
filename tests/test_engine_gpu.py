"""CUDA paths: the device pipeline, bf16/fp16 autocast, channels_last and compile on a GPU.

    python -m pytest -q -m gpu
"""
import json

import pytest
import torch

import augmentations
import dataloader
from conftest import TINY_RUN, run_main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]


def test_device_pipeline_statistics_on_cuda():
    torch.manual_seed(0)
    n = 8000
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[0, :, 10, 5] = 255
    cropped = augmentations.random_crop(image.expand(n, -1, -1, -1).cuda(), 4, horizontal_flip=True)
    position = cropped[:, 0].float().flatten(1).argmax(1).cpu()
    rows, cols = position // 32, position % 32
    assert set(rows.tolist()) == set(range(6, 15))
    assert abs((cols > 15).float().mean() - 0.5) < 5 * (0.25 / n) ** 0.5
    cut = augmentations.cutout(torch.ones(n, 3, 32, 32, device='cuda'), size=8, inside=True)
    assert torch.all((cut[:, 0] == 0).sum((1, 2)) == 64)


@pytest.mark.parametrize('flags', [[], ['--precision', 'bf16', '--channels_last'],
                                   ['--precision', 'fp16', '--use_mixup'], ['--compile', '--precision', 'bf16']])
def test_training_runs_on_cuda(flags, cifar10_dir, tmp_path):
    argv = [a for a in TINY_RUN if a not in ('--device', 'cpu')]
    assert run_main([*argv, '--device', 'cuda', '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'r'),
                     *flags]) == 0
    log = json.load(open(tmp_path / 'r' / 'log.json'))
    assert log[-1]['train_images_per_sec'] > 0
    config = json.load(open(tmp_path / 'r' / 'config.json'))
    assert config['environment']['device'].startswith('cuda') and config['environment']['gpu']


def test_device_loader_keeps_data_on_gpu(cifar10_dir):
    data = dataloader.build_data('CIFAR10', cifar10_dir, 32, torch.device('cuda'))
    images, labels = next(iter(data.train_loader))
    assert images.is_cuda and labels.is_cuda and data.train_loader.images.is_cuda


def test_device_timer_counts_the_queued_gpu_work():
    """CUDA events time the work queued after the start, not the host's queueing of it."""
    import time
    import utils
    a = torch.randn(4096, 4096, device='cuda')
    torch.cuda.synchronize()
    timer = utils.DeviceTimer('cuda')
    host_start = time.perf_counter()
    for _ in range(50):
        a = a @ a / 64
    queued = time.perf_counter() - host_start
    elapsed = timer.elapsed()
    waited = time.perf_counter() - host_start
    assert queued < elapsed <= waited * 1.05
