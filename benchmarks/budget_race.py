#!/usr/bin/env python
"""Recipes of run_experiments.sh trained for the same wall-clock budget, side by side.

For each recipe a short probe run measures the time of a training step and of the final (TTA)
evaluation; the recipe then trains for as many steps as fit in ``--budget`` seconds (``--total_steps``,
so its schedule is compressed to that length) and reports its final test accuracy, the time it
took (first batch to final evaluation) and accuracy per second.

    python benchmarks/budget_race.py --budget 600 --dataset_dir .data/c10k -- \\
        --device cpu --precision fp32 --channels_last false --compile false

Flags after ``--`` go to every main.py run (after the recipe's own flags, so they win).
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main as trainer  # noqa: E402
from time_to_accuracy import _recipe_from_experiments  # noqa: E402


def run(argv, outdir):
    trainer.cli(argv + ['--outdir', outdir])
    log = [r for r in json.load(open(os.path.join(outdir, 'log.json'))) if r['epoch'] > 0]
    source = 'ema_test_accuracy' if 'ema_test_accuracy' in log[-1] else 'test_accuracy'
    return {'accuracy': log[-1][source], 'accuracy_of': source, 'train_time': sum(r['train_time'] for r in log),
            'eval_time': log[-1]['test_time'], 'epochs': log[-1]['epoch']}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--budget', type=float, default=600, help='seconds of training + final evaluation')
    parser.add_argument('--recipes', nargs='+', default=['fast_airbench94_muon', 'fast_resnet9'])
    parser.add_argument('--dataset_dir', required=True)
    parser.add_argument('--probe_steps', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', help='write the figures to this file')
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != '--'] + ['--dataset_dir', args.dataset_dir, '--seed', str(args.seed)]
    root = tempfile.mkdtemp(prefix='budget_race-')
    results = {}
    for recipe in args.recipes:
        argv = _recipe_from_experiments(recipe) + extra
        probe = run(argv + ['--total_steps', str(args.probe_steps)], os.path.join(root, f'{recipe}-probe'))
        step_time = probe['train_time'] / args.probe_steps
        steps = max(1, int((args.budget - probe['eval_time']) / step_time))
        result = run(argv + ['--total_steps', str(steps)], os.path.join(root, recipe))
        result.update(steps=steps, probe_step_time=step_time, probe_eval_time=probe['eval_time'],
                      time=result['train_time'] + result['eval_time'])
        result['accuracy_per_second'] = result['accuracy'] / result['time']
        results[recipe] = result
        print(f'{recipe}: {steps} steps ({result["epochs"]} epochs), {result["time"]:.0f}s, test accuracy '
              f'{result["accuracy"]:.4f} ({result["accuracy_of"]})', flush=True)
    print(f'\n{"recipe":<24}{"steps":>7}{"epochs":>8}{"time (s)":>10}{"accuracy":>10}{"accuracy/s":>12}')
    for recipe, r in results.items():
        print(f'{recipe:<24}{r["steps"]:>7}{r["epochs"]:>8}{r["time"]:>10.0f}{r["accuracy"]:>10.4f}'
              f'{r["accuracy_per_second"]:>12.2e}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'budget': args.budget, 'extra': extra, 'results': results}, f, indent=2)


if __name__ == '__main__':
    main()
