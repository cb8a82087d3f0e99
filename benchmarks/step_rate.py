#!/usr/bin/env python
"""Training steps per second through main.py's Trainer, and two checkouts of the code side by side.

Each step is the whole of ``Trainer.train_step`` (regularizer, forward, loss, backward, optimizer,
scheduler, EMA) on batches of the device pipeline (uint8 images held on the device, batched crop,
flip and normalization), after warm-up steps; the clock stops after a device synchronization.

    python benchmarks/step_rate.py --archs resnet_preact20 wrn16_4 --device cpu
    # the same steps timed for another checkout (e.g. `git worktree add /tmp/before 77dcebc`) and
    # this one, alternating rounds in fresh processes, medians and the ratio printed:
    python benchmarks/step_rate.py --compare /tmp/before --archs resnet_preact20 wrn16_4 --device cpu
    # this checkout eager against --compile (the compile excluded: it runs in the warm-up steps)
    python benchmarks/step_rate.py --compare_flags=--compile --archs resnet_preact20 wrn16_4 --device cpu

Flags after ``--`` go to main.py's parser (e.g. ``-- --ema_decay 0.999 --use_mixup``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = {
    'resnet_preact20': ['--arch', 'resnet_preact', '--depth', '20'],
    'wrn16_4': ['--arch', 'wrn', '--depth', '16', '--widening_factor', '4'],
    'resnet_preact56': ['--arch', 'resnet_preact', '--depth', '56'],
    'wrn28_10': ['--arch', 'wrn', '--depth', '28', '--widening_factor', '10'],
    'airbench': ['--arch', 'airbench'],
    'resnet9': ['--arch', 'resnet9'],
}


def build_trainer(argv, batch_size, n_batches, epochs, **options):
    """main.py's Trainer for its flags ``argv`` (``--device`` among them) over ``n_batches`` batches of random
    CIFAR-sized images in the device pipeline (crop, flip, normalization), with a cosine schedule over
    ``epochs`` of them: (trainer, training loader, a test loader of one batch). ``options``: more Trainer
    keywords. Imports whatever checkout comes first on sys.path."""
    import torch
    import augmentations
    import dataloader
    import engine
    import main
    import optim
    import utils
    args = main.parse_args(['--outdir', 'unused', '--batch_size', str(batch_size), '--no-tensorboard', *argv])
    device = utils.resolve_device(args.device)
    info = dataloader.DATASETS['CIFAR10']
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size * n_batches, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (len(images),), generator=generator)
    loader = dataloader.DeviceLoader(images, labels, info, batch_size, device, True, random_crop_padding=4,
                                     horizontal_flip=True)
    test_loader = dataloader.DeviceLoader(images[:batch_size], labels[:batch_size], info, batch_size, device, False)
    model = engine.build_model(args, info, device)
    optimizer = optim.build_optimizer(model, **optim.optimizer_kwargs(args))
    scheduler = optim.build_scheduler(optimizer, scheduler='cosine', epochs=epochs, steps_per_epoch=len(loader))
    regularizer = augmentations.BatchRegularizer(info.num_classes, **augmentations.regularizer_kwargs(args))
    trainer = engine.Trainer(model, optimizer, scheduler, regularizer, device, total_steps=epochs * len(loader),
                             **options, **engine.trainer_kwargs(args))
    return trainer, loader, test_loader


def measure(source, arch, device_name, steps, warmup, batch_size, extra):
    """Steps per second of ``source``'s Trainer for ``arch`` (imports the modules from ``source``)."""
    sys.path.insert(0, source)
    import torch
    trainer, loader, _ = build_trainer([*ARCHS[arch], '--device', device_name, *extra], batch_size, 4, 10)
    device = trainer.device
    trainer.model.train()

    def batches():
        while True:
            yield from loader
    stream = batches()
    for _ in range(warmup):
        trainer.train_step(*next(stream))
    synchronize = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(*next(stream))
    synchronize()
    return steps / (time.perf_counter() - start)


def compare(args, extra):
    """Alternate fresh processes of the two checkouts (or of this one without and with ``--compare_flags``),
    ``rounds`` times per architecture."""
    if args.compare_flags is not None:
        sources = {'before': (HERE, []), 'after': (HERE, args.compare_flags.split())}
    else:
        sources = {'before': (os.path.abspath(args.compare), []), 'after': (HERE, [])}
    rates = {arch: {name: [] for name in sources} for arch in args.archs}
    for round_index in range(args.rounds):
        for arch in args.archs:
            for name, (source, flags) in sources.items():
                with tempfile.NamedTemporaryFile(suffix='.json') as out:
                    command = [sys.executable, os.path.abspath(__file__), '--source', source, '--archs', arch,
                               '--device', args.device, '--steps', str(args.steps), '--warmup', str(args.warmup),
                               '--batch_size', str(args.batch_size), '--json', out.name, '--', *extra, *flags]
                    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                    rates[arch][name].append(json.load(open(out.name))[arch])
                print(f'round {round_index + 1} {arch} {name}: {rates[arch][name][-1]:.3f} steps/s', flush=True)
    print(f'\n{"arch":<18}{"before (median)":>17}{"after (median)":>16}{"after/before":>14}')
    summary = {}
    for arch in args.archs:
        before, after = (statistics.median(rates[arch][name]) for name in sources)
        summary[arch] = {'before': rates[arch]['before'], 'after': rates[arch]['after'], 'ratio': after / before}
        print(f'{arch:<18}{before:>17.3f}{after:>16.3f}{after / before:>13.2f}x')
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--archs', nargs='+', default=['resnet_preact20', 'wrn16_4'], choices=list(ARCHS))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--source', default=HERE, help='the checkout whose code is timed')
    parser.add_argument('--compare', help='another checkout to time against this one, alternating')
    parser.add_argument('--compare_flags', help='time this checkout without and with these main.py flags '
                                                '(e.g. --compile), alternating')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--json', help='write the figures to this file')
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != '--']
    if args.compare or args.compare_flags is not None:
        figures = compare(args, extra)
    else:
        figures = {arch: measure(args.source, arch, args.device, args.steps, args.warmup, args.batch_size, extra)
                   for arch in args.archs}
        for arch, rate in figures.items():
            print(f'{arch}: {rate:.3f} steps/s (batch {args.batch_size}, {args.device})')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(figures, f, indent=2)


if __name__ == '__main__':
    main()
