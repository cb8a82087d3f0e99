#!/usr/bin/env python
"""Operators dispatched from Python per training step, eager against --compile: the CPU-side proxy for
the kernel launches a GPU step costs, and what --compile saves of them.

torch.profiler records every operator; an operator whose parent is none was called by Python itself
(the step's code, or the wrapper of a compiled region), one nested under another was called by that
operator or by compiled code. The figure per step is the top-level count over the timed steps of
``Trainer.train_one_epoch`` (the loader's batches and the epoch's own start and end included, hence a
long enough epoch) divided by the steps; the total of all recorded operators is printed beside it.
Not counted: events that dispatch no operator (see ``_is_not_an_operator``).

    python benchmarks/step_ops.py --archs resnet_preact20 wrn16_4 --settings default mixup_ema sam
    python benchmarks/step_ops.py --backend aot_eager      # the same graphs without inductor's code generation
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_rate import ARCHS as STEP_RATE_ARCHS, build_trainer  # noqa: E402

ARCHS = {**STEP_RATE_ARCHS, 'resnet_preact8': ['--arch', 'resnet_preact', '--depth', '8', '--base_channels', '4']}
SETTINGS = {
    'default': [],
    'mixup_ema': ['--use_mixup', '--ema_decay', '0.999'],
    'sam': ['--use_sam'],
}


def count(arch, setting, compiled, steps, batch_size, backend):
    """(top-level operators per step, all operators per step, seconds per step, compile seconds)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    argv = ['--device', 'cpu', '--scheduler', 'cosine', *ARCHS[arch], *SETTINGS[setting]]
    trainer, loader, test_loader = build_trainer(argv + (['--compile'] if compiled else []), batch_size, steps + 2, 2,
                                                 compile_backend=backend)
    compile_seconds = trainer.compile_ahead(loader, test_loader) if compiled else 0.0
    trainer.train_one_epoch(_Steps(loader, 2), 1)  # warm: the first steps of each region
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        start = time.perf_counter()
        trainer.train_one_epoch(_Steps(loader, steps), 2)
        seconds = time.perf_counter() - start
    events = [event for event in recorded.events() if event.device_type.name == 'CPU']
    top_level = [event for event in events if event.cpu_parent is None and not _is_not_an_operator(event.name)]
    return len(top_level) / steps, len(events) / steps, seconds / steps, compile_seconds


def _is_not_an_operator(name):
    """Events that dispatch no operator: the profiler's annotations of Python code (``Optimizer.step#...``),
    dynamo's guard checks, and the autograd engine moving a gradient into ``.grad`` (AccumulateGrad, which
    launches nothing while the gradients were set to None)."""
    return '#' in name or name == 'TorchDynamo Cache Lookup' or name.endswith('AccumulateGrad')


class _Steps:
    """The first ``steps`` batches of a loader, as an epoch (set_epoch, len, order as the loader's)."""

    def __init__(self, loader, steps):
        self.loader, self.steps = loader, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index == self.steps:
                break
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--archs', nargs='+', default=['resnet_preact20', 'wrn16_4'], choices=list(ARCHS))
    parser.add_argument('--settings', nargs='+', default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--backend', default='inductor', help='torch.compile backend of the compiled rows')
    parser.add_argument('--json', help='also write the figures here')
    args = parser.parse_args()
    rows = []
    print(f'{"arch":16s} {"setting":10s} {"mode":9s} {"top-level ops/step":>18s} {"all ops/step":>12s} '
          f'{"ms/step (CPU)":>13s} {"compile s":>9s}')
    for arch in args.archs:
        for setting in args.settings:
            for compiled in (False, True):
                top, everything, seconds, compile_seconds = count(arch, setting, compiled, args.steps,
                                                                  args.batch_size, args.backend)
                mode = args.backend if compiled else 'eager'
                rows.append(dict(arch=arch, setting=setting, mode=mode, top_level_ops_per_step=top,
                                 all_ops_per_step=everything, ms_per_step=1000 * seconds,
                                 compile_seconds=compile_seconds))
                print(f'{arch:16s} {setting:10s} {mode:9s} {top:18.1f} {everything:12.1f} {1000 * seconds:13.1f} '
                      f'{compile_seconds:9.1f}', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'torch': __import__('torch').__version__, 'steps': args.steps, 'batch_size': args.batch_size,
                       'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
