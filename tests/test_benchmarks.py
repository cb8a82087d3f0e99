"""The benchmark scripts run end to end on tiny data (their figures are not asserted: speed
is measured by running them, not by unit tests)."""
import json
import os
import sys

import launch
from conftest import ROOT


def script(name):
    return os.path.join(ROOT, 'benchmarks', name)


def test_throughput_script_runs_all_pipelines(cifar10_dir, tmp_path):
    out = tmp_path / 'throughput.json'
    result = launch.run(script('throughput.py'), [
        '--dataset_dir', cifar10_dir, '--archs', 'none', 'resnet20', '--batch_size', '20', '--steps', '3',
        '--num_workers', '0', '--device', 'cpu', '--json', str(out)], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.load(open(out))['results']
    assert [r['arch'] for r in figures] == ['none', 'resnet20']
    assert set(figures[0]['images_per_sec']) == {'device', 'workers', 'torchvision'}
    assert 'no data loading' in figures[1]['images_per_sec']
    assert all(rate > 0 for r in figures for rate in r['images_per_sec'].values())
    assert 'vs torchvision' in result.stdout


def test_time_to_accuracy_script_reports_runs(cifar10_dir, tmp_path):
    out = tmp_path / 'tta.json'
    result = launch.run(script('time_to_accuracy.py'), [
        '--runs', '2', '--recipe', 'fast_resnet9', '--json', str(out), '--keep', str(tmp_path / 'runs'), '--',
        '--base_channels', '4', '--epochs', '3', '--batch_size', '20', '--ghost_bn_splits', '4', '--dataset_dir',
        cifar10_dir, '--device', 'cpu'], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(out))
    assert [run['seed'] for run in summary['runs']] == [0, 1]
    assert summary['accuracy_min'] <= summary['accuracy_mean'] <= summary['accuracy_max']
    assert summary['wall_time_mean'] > 0
    assert all(run['accuracy_of'] == 'ema_test_accuracy' for run in summary['runs'])  # the recipe keeps an EMA
    assert 'ours: 2 runs, test accuracy mean' in result.stdout
    config = json.load(open(tmp_path / 'runs' / 'seed0' / 'config.json'))['settings']
    assert config['arch'] == 'resnet9' and config['tta'] == 'flip' and config['bn_bias_lr_factor'] == 64
    assert config['epochs'] == 3 and config['precision'] == 'bf16'


def test_time_to_accuracy_reads_a_reference_trainers_runs(cifar10_dir, tmp_path):
    """A stand-in reference prints airbench's table rows forever; the script reads warm-up + N and stops it."""
    fake = tmp_path / 'fake_airbench.py'
    fake.write_text('import itertools, sys\n'
                    'print("|  run  |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |")\n'
                    'for run in itertools.count():\n'
                    '    print(f"|  {run}  |  1  |  0.5  |  0.4  |  |  1.0  |")\n'
                    '    print(f"|       |  eval  |  0.5  |  0.4  |  0.{90 + run % 3}  |  {2 + run}.5  |", flush=True)\n')
    out = tmp_path / 'tta.json'
    result = launch.run(script('time_to_accuracy.py'), [
        '--runs', '2', '--json', str(out), '--reference', f'{sys.executable} {fake}', '--reference_dir',
        str(tmp_path), '--', '--arch', 'resnet', '--depth', '8', '--base_channels', '4', '--epochs', '1',
        '--batch_size', '20', '--dataset_dir', cifar10_dir, '--device', 'cpu', '--no-tensorboard'], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(out))
    assert summary['reference']['runs'] == [[0.91, 3.5], [0.92, 4.5]]  # the warm-up row (0.90, 2.5) dropped
    assert summary['time_ratio'] == summary['wall_time_mean'] / 4.0
    assert 'time ratio ours / reference' in result.stdout


def test_budget_race_sizes_each_recipe_to_the_budget(cifar10_dir, tmp_path):
    out = tmp_path / 'race.json'
    result = launch.run(script('budget_race.py'), [
        '--budget', '3', '--probe_steps', '2', '--recipes', 'fast_airbench94_muon', '--dataset_dir', cifar10_dir,
        '--json', str(out), '--', '--device', 'cpu', '--precision', 'fp32', '--channels_last', 'false', '--compile',
        'false', '--batch_size', '20', '--n_channels', '[4,8,8]', '--test_batch_size', '40'], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    race = json.load(open(out))['results']['fast_airbench94_muon']
    assert race['steps'] == max(1, int((3 - race['probe_eval_time']) / race['probe_step_time']))
    assert 0 <= race['accuracy'] <= 1 and race['accuracy_per_second'] == race['accuracy'] / race['time']
    assert 'fast_airbench94_muon' in result.stdout.splitlines()[-1]


def test_step_ops_and_step_rate_build_the_same_trainer_and_run(tmp_path):
    """step_ops.py (operators per step, eager and compiled with aot_eager) and step_rate.py (steps per second)
    through their shared step_rate.build_trainer; the compiled step dispatches fewer operators from Python."""
    ops = tmp_path / 'ops.json'
    environment = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = launch.run(script('step_ops.py'), [
        '--archs', 'resnet_preact8', '--settings', 'default', '--steps', '2', '--batch_size', '8', '--backend',
        'aot_eager', '--json', str(ops)], timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    eager, compiled = json.load(open(ops))['rows']
    assert (eager['mode'], compiled['mode']) == ('eager', 'aot_eager')
    assert compiled['top_level_ops_per_step'] < eager['top_level_ops_per_step'] / 2
    rate = tmp_path / 'rate.json'
    result = launch.run(script('step_rate.py'), [
        '--archs', 'resnet_preact20', '--steps', '2', '--warmup', '1', '--batch_size', '8', '--json', str(rate), '--',
        '--base_channels', '4'], timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(rate))['resnet_preact20'] > 0
