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


def _cuda_trainer(flags, compile_mode=None):
    """ResNet-preact-20 in bf16 and channels_last on the GPU; with ``compile_mode`` the compiled step."""
    import engine
    import main
    import models
    import optim
    args = main.parse_args(['--outdir', 'unused', '--arch', 'resnet_preact', '--depth', '20', '--precision', 'bf16',
                            '--channels_last', '--scheduler', 'cosine', *flags]
                           + (['--compile', '--compile_mode', compile_mode] if compile_mode else []))
    torch.manual_seed(0)
    model = models.create_model('resnet_preact', depth=20).cuda().to(memory_format=torch.channels_last)
    optimizer = optim.build_optimizer(model, **optim.optimizer_kwargs(args))
    scheduler = optim.build_scheduler(optimizer, scheduler='cosine', epochs=1, steps_per_epoch=8)
    regularizer = augmentations.BatchRegularizer(10, **augmentations.regularizer_kwargs(args))
    return engine.Trainer(model, optimizer, scheduler, regularizer, torch.device('cuda'), total_steps=8,
                          **engine.trainer_kwargs(args))


def _cuda_batches(count):
    generator = torch.Generator(device='cuda').manual_seed(1)
    return [(torch.randn(128, 3, 32, 32, device='cuda', generator=generator),
             torch.randint(0, 10, (128,), device='cuda', generator=generator)) for _ in range(count)]


@pytest.mark.parametrize('flags', [[], ['--use_mixup', '--ema_decay', '0.99'], ['--use_sam']],
                         ids=['default', 'mixup_ema', 'sam'])
def test_cuda_graph_replay_of_the_compiled_step_equals_eager_within_bf16(flags):
    """--compile --compile_mode reduce-overhead (the step's regions replayed as CUDA graphs) trains as the
    eager step does, within bf16's rounding, over steps whose learning rate changes every step."""
    steps = _cuda_batches(5)
    results = []
    for mode in ('reduce-overhead', None):
        trainer = _cuda_trainer(flags, mode)
        torch.manual_seed(7)
        losses = [trainer.train_step(images, labels)[0].item() for images, labels in steps]
        results.append((losses, [p.detach().float().clone() for p in trainer.model.parameters()]))
    (graph_losses, graph_weights), (eager_losses, eager_weights) = results
    assert graph_losses == pytest.approx(eager_losses, rel=2e-2, abs=2e-2)
    for graph, eager in zip(graph_weights, eager_weights):
        assert torch.allclose(graph, eager, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize('mode', ['default', 'reduce-overhead'])
def test_compiled_steps_never_make_the_host_wait(mode):
    """torch.cuda.set_sync_debug_mode('error') over compiled training steps (after the first, which
    compiles): the step, the schedule's learning rates, the meters and the EMA stay on the device."""
    import engine
    trainer = _cuda_trainer(['--use_mixup', '--ema_decay', '0.99'], mode)
    steps = _cuda_batches(6)
    state = engine._EpochState(torch.device('cuda'), 0.0)
    for images, labels in steps[:2]:
        state.update(*trainer.train_step(images, labels), len(labels), trainer.last_nonfinite, trainer.accumulate)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for images, labels in steps[2:]:
            state.update(*trainer.train_step(images, labels), len(labels), trainer.last_nonfinite,
                         trainer.accumulate)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert state.step == len(steps)
