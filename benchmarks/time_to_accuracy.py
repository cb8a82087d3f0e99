#!/usr/bin/env python
"""Train one recipe N times and report test accuracy (mean, min, max) and wall time.

The accuracy is the final epoch's, of the EMA weights when the run keeps them (--ema_decay),
else of the trained weights.  Wall time runs from the first training batch to the end of the final evaluation (the sum of
each epoch's train and test time in log.json); data loading to the device and model
construction are not in it.  With --compile the first epoch also compiles: the compile time
is estimated as the first epoch's time minus the median of the others and reported apart.

    python benchmarks/time_to_accuracy.py --runs 5 -- --arch resnet9 --dataset_dir .data
    python benchmarks/time_to_accuracy.py --runs 5 --recipe fast_resnet9 -- --dataset_dir .data

Everything after ``--`` goes to main.py unchanged (seed and outdir are set per run).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main as trainer  # noqa: E402

def _recipe_from_experiments(name):
    """The flags of a named recipe, read from run_experiments.sh so the two never drift apart."""
    import re
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'run_experiments.sh')
    text = open(path).read()
    match = re.search(rf'^{name.upper()}=\((.*?)\)', text, re.S | re.M)
    return match.group(1).split()


RECIPES = ('fast_resnet9',)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--first_seed', type=int, default=0)
    parser.add_argument('--recipe', choices=RECIPES, help='start from a recipe of run_experiments.sh')
    parser.add_argument('--target', type=float, default=0.94, help='accuracy the recipe aims at')
    parser.add_argument('--keep', help='keep the run directories under this folder')
    parser.add_argument('--json', help='write the figures to this file')
    args, main_argv = parser.parse_known_args()
    main_argv = [a for a in main_argv if a != '--']
    if args.recipe:
        main_argv = _recipe_from_experiments(args.recipe) + main_argv
    root = args.keep or tempfile.mkdtemp(prefix='time_to_accuracy-')
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.runs):
        outdir = os.path.join(root, f'seed{seed}')
        trainer.cli(main_argv + ['--seed', str(seed), '--outdir', outdir])
        log = [r for r in json.load(open(os.path.join(outdir, 'log.json'))) if r['epoch'] > 0]
        epoch_times = [r['train_time'] + r['test_time'] for r in log]
        compile_time = 0.0
        if '--compile' in main_argv and len(epoch_times) > 2:
            compile_time = max(0.0, epoch_times[0] - statistics.median(epoch_times[1:]))
        # with --ema_decay the recipe's model is the weight average, so that is the one scored
        source = 'ema_test_accuracy' if 'ema_test_accuracy' in log[-1] else 'test_accuracy'
        runs.append({'seed': seed, 'accuracy': log[-1][source], 'accuracy_of': source,
                     'raw_model_accuracy': log[-1]['test_accuracy'], 'compile_time': compile_time,
                     'wall_time': sum(epoch_times) - compile_time})
        print(f'seed {seed}: accuracy {runs[-1]["accuracy"]:.4f} ({source}), wall {runs[-1]["wall_time"]:.1f}s'
              + (f' (+ compile {compile_time:.1f}s)' if compile_time else ''), flush=True)
    accuracies = [r['accuracy'] for r in runs]
    times = [r['wall_time'] for r in runs]
    summary = {
        'command': main_argv, 'runs': runs,
        'accuracy_mean': statistics.mean(accuracies), 'accuracy_min': min(accuracies),
        'accuracy_max': max(accuracies),
        'accuracy_std': statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
        'wall_time_mean': statistics.mean(times), 'wall_time_min': min(times), 'wall_time_max': max(times),
        'runs_reaching_target': sum(a >= args.target for a in accuracies),
    }
    print(f'\n{len(runs)} runs: test accuracy mean {summary["accuracy_mean"]:.4f} '
          f'(min {summary["accuracy_min"]:.4f}, max {summary["accuracy_max"]:.4f}, '
          f'std {summary["accuracy_std"]:.4f}); {summary["runs_reaching_target"]}/{len(runs)} reach '
          f'{args.target}; wall time mean {summary["wall_time_mean"]:.1f}s '
          f'(min {summary["wall_time_min"]:.1f}, max {summary["wall_time_max"]:.1f})')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(summary, f, indent=2)


if __name__ == '__main__':
    main()
