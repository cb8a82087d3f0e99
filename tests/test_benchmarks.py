"""The benchmark scripts run end to end on tiny data (their figures are not asserted: speed
is measured by running them, not by unit tests)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_throughput_script_runs_all_pipelines(cifar10_dir, tmp_path):
    out = tmp_path / 'throughput.json'
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'throughput.py'),
                             '--dataset_dir', cifar10_dir, '--archs', 'none', 'resnet20', '--batch_size', '20',
                             '--steps', '3', '--num_workers', '0', '--device', 'cpu', '--json', str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.load(open(out))['results']
    assert [r['arch'] for r in figures] == ['none', 'resnet20']
    assert set(figures[0]['images_per_sec']) == {'device', 'workers', 'torchvision'}
    assert 'no data loading' in figures[1]['images_per_sec']
    assert all(rate > 0 for r in figures for rate in r['images_per_sec'].values())
    assert 'vs torchvision' in result.stdout


def test_time_to_accuracy_script_reports_runs(cifar10_dir, tmp_path):
    out = tmp_path / 'tta.json'
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'time_to_accuracy.py'),
                             '--runs', '2', '--recipe', 'fast_resnet9', '--json', str(out),
                             '--keep', str(tmp_path / 'runs'), '--', '--base_channels', '4', '--epochs', '3',
                             '--batch_size', '20', '--dataset_dir', cifar10_dir, '--device', 'cpu'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(out))
    assert [run['seed'] for run in summary['runs']] == [0, 1]
    assert summary['accuracy_min'] <= summary['accuracy_mean'] <= summary['accuracy_max']
    assert summary['wall_time_mean'] > 0
    assert all(run['accuracy_of'] == 'ema_test_accuracy' for run in summary['runs'])  # the recipe keeps an EMA
    assert '2 runs: test accuracy mean' in result.stdout
    config = json.load(open(tmp_path / 'runs' / 'seed0' / 'config.json'))['settings']
    assert config['arch'] == 'resnet9' and config['tta'] == 'flip' and config['bn_bias_lr_factor'] == 64
    assert config['epochs'] == 3 and config['precision'] == 'bf16'
