#!/usr/bin/env python
"""Train one recipe N times and report test accuracy (mean, std, min, max, runs reaching the target) and time.

The accuracy is the final epoch's, of the EMA weights when the run keeps them (--ema_decay),
else of the trained weights.  Time runs from the first training batch to the end of the final
evaluation (the sum of the train and test times in log.json, each measured between two CUDA
events on a GPU, utils.DeviceTimer); data loading to the device, model construction and, with --compile, the
compilation (done before the first timed step, reported apart) are not in it.  A warm-up run
comes first and is not counted, as airbench does: it fills cuDNN's and the compiler's caches.

    python benchmarks/time_to_accuracy.py --runs 5 -- --arch resnet9 --dataset_dir .data
    python benchmarks/time_to_accuracy.py --runs 5 --recipe fast_airbench94_muon -- --dataset_dir .data

With ``--reference CMD`` a reference trainer (airbench94.py or airbench94_muon.py, fetched into an
ignored folder and given ``cifar10/{train,test}.pt`` there) runs after ours, from ``--reference_dir``,
until it has printed the same number of runs after the same number of warm-up runs; its per-run
accuracy and time are read from the rows it prints (airbench's table: the last two numbers of each
``eval`` row), it is stopped, and the ratio of the mean times is printed with both accuracies.

    python benchmarks/time_to_accuracy.py --runs 5 --recipe fast_airbench94_muon \
        --reference 'python airbench94_muon.py' --reference_dir .gpu/airbench -- --dataset_dir .data

Everything after ``--`` goes to main.py unchanged (seed and outdir are set per run).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import main as trainer  # noqa: E402

def environment_line(main_argv):
    """GPU model, its clock and power limit, torch version: what a timing depends on, on one line."""
    import subprocess
    device = main_argv[main_argv.index('--device') + 1] if '--device' in main_argv[:-1] else 'cuda'
    if not (torch.cuda.is_available() and device.startswith('cuda')):
        return f'# CPU, torch {torch.__version__}'
    try:
        query = subprocess.run(['nvidia-smi', '--query-gpu=name,clocks.sm,clocks.max.sm,power.limit',
                                '--format=csv,noheader'], capture_output=True, text=True, timeout=20)
        gpu = query.stdout.strip().replace('\n', '; ') or torch.cuda.get_device_name()
    except (OSError, subprocess.SubprocessError):
        gpu = torch.cuda.get_device_name()
    return f'# GPU {gpu} (name, SM clock, max SM clock, power limit), torch {torch.__version__}'


def reference_runs(command, directory, runs, warmup_runs, timeout):
    """(accuracy, seconds) of ``runs`` runs of a reference trainer after ``warmup_runs`` warm-up runs.

    The command's table rows ending a run (airbench: ``| ... | eval | ... | tta_val_acc | seconds |``)
    are read as they are printed; the process is stopped once enough have come, or at ``timeout``.
    """
    import shlex
    import subprocess
    import time
    process = subprocess.Popen(shlex.split(command), cwd=directory, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    rows, deadline = [], time.monotonic() + timeout
    try:
        for line in process.stdout:
            cells = [cell.strip() for cell in line.split('|')]
            if 'eval' in cells:
                numbers = [float(cell) for cell in cells if _is_number(cell)]
                rows.append((numbers[-2], numbers[-1]))
                print(f'reference run {len(rows) - warmup_runs}: accuracy {numbers[-2]:.4f}, '
                      f'time {numbers[-1]:.2f}s' + (' (warm-up, not counted)' if len(rows) <= warmup_runs else ''),
                      flush=True)
            if len(rows) >= warmup_runs + runs or time.monotonic() > deadline:
                break
    finally:
        process.kill()
        process.wait()
    return rows[warmup_runs:]


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def describe(accuracies, times, target):
    return {'accuracy_mean': statistics.mean(accuracies), 'accuracy_min': min(accuracies),
            'accuracy_max': max(accuracies),
            'accuracy_std': statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            'wall_time_mean': statistics.mean(times), 'wall_time_min': min(times), 'wall_time_max': max(times),
            'wall_time_std': statistics.stdev(times) if len(times) > 1 else 0.0,
            'runs_reaching_target': sum(a >= target for a in accuracies), 'n_runs': len(accuracies)}


def summary_line(name, summary, target):
    return (f'{name}: {summary["n_runs"]} runs, test accuracy mean {summary["accuracy_mean"]:.4f} '
            f'(min {summary["accuracy_min"]:.4f}, max {summary["accuracy_max"]:.4f}, '
            f'std {summary["accuracy_std"]:.4f}); {summary["runs_reaching_target"]}/{summary["n_runs"]} reach '
            f'{target}; time mean {summary["wall_time_mean"]:.2f}s '
            f'(min {summary["wall_time_min"]:.2f}, max {summary["wall_time_max"]:.2f})')


def _recipe_from_experiments(name):
    """The flags of a named recipe, read from run_experiments.sh so the two never drift apart."""
    import re
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'run_experiments.sh')
    text = open(path).read()
    match = re.search(rf'^{name.upper()}=\((.*?)\)', text, re.S | re.M)
    return match.group(1).split()


RECIPES = ('fast_resnet9', 'fast_airbench94_muon', 'fast_airbench94')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--first_seed', type=int, default=0)
    parser.add_argument('--warmup_runs', type=int, default=1, help='runs before the counted ones, not reported')
    parser.add_argument('--recipe', choices=RECIPES, help='start from a recipe of run_experiments.sh')
    parser.add_argument('--target', type=float, default=0.94, help='accuracy the recipe aims at')
    parser.add_argument('--keep', help='keep the run directories under this folder')
    parser.add_argument('--json', help='write the figures to this file')
    parser.add_argument('--reference', help="a reference trainer's command, e.g. 'python airbench94_muon.py'")
    parser.add_argument('--reference_dir', default='.', help='the folder the reference command runs in')
    parser.add_argument('--reference_timeout', type=float, default=900, help='seconds the reference may run')
    args, main_argv = parser.parse_known_args()
    main_argv = [a for a in main_argv if a != '--']
    if args.recipe:
        main_argv = _recipe_from_experiments(args.recipe) + main_argv
    root = args.keep or tempfile.mkdtemp(prefix='time_to_accuracy-')
    print(environment_line(main_argv), flush=True)
    runs = []
    for index in range(args.warmup_runs + args.runs):
        warmup = index < args.warmup_runs
        seed = args.first_seed + index - args.warmup_runs
        outdir = os.path.join(root, f'warmup{index}' if warmup else f'seed{seed}')
        # each run compiles anew (from the warm on-disk caches); dynamo's in-memory cache would
        # otherwise keep growing with every run's model and fall back to eager at its limit
        torch._dynamo.reset()
        trainer.cli(main_argv + ['--seed', str(10_000 + index if warmup else seed), '--outdir', outdir])
        if warmup:
            continue
        log = [r for r in json.load(open(os.path.join(outdir, 'log.json'))) if r['epoch'] > 0]
        wall_time = sum(r['train_time'] + r.get('test_time', 0.0) for r in log)
        # with --ema_decay the recipe's model is the weight average, so that is the one scored
        source = 'ema_test_accuracy' if 'ema_test_accuracy' in log[-1] else 'test_accuracy'
        runs.append({'seed': seed, 'accuracy': log[-1][source], 'accuracy_of': source,
                     'raw_model_accuracy': log[-1]['test_accuracy'], 'compile_time': log[0].get('compile_time', 0.0),
                     'wall_time': wall_time, 'train_time': sum(r['train_time'] for r in log),
                     'final_eval_time': log[-1]['test_time']})
        print(f'seed {seed}: accuracy {runs[-1]["accuracy"]:.4f} ({source}), time {wall_time:.2f}s'
              + (f' (compiled beforehand in {runs[-1]["compile_time"]:.1f}s)' if runs[-1]['compile_time'] else ''),
              flush=True)
    summary = {'environment': environment_line(main_argv), 'command': main_argv, 'runs': runs,
               **describe([r['accuracy'] for r in runs], [r['wall_time'] for r in runs], args.target)}
    print('\n' + summary_line('ours', summary, args.target))
    if args.reference:
        rows = reference_runs(args.reference, args.reference_dir, args.runs, args.warmup_runs,
                              args.reference_timeout)
        if rows:
            reference = describe([a for a, _ in rows], [t for _, t in rows], args.target)
            summary['reference'] = {'command': args.reference, 'runs': [list(row) for row in rows], **reference}
            summary['time_ratio'] = summary['wall_time_mean'] / reference['wall_time_mean']
            print(summary_line('reference', reference, args.target))
            print(f'time ratio ours / reference: {summary["time_ratio"]:.3f} at accuracy '
                  f'{summary["accuracy_mean"]:.4f} vs {reference["accuracy_mean"]:.4f}')
        else:
            print(f'reference: no run finished within {args.reference_timeout:.0f}s')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(summary, f, indent=2)


if __name__ == '__main__':
    main()
