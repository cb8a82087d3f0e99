"""The files a run writes, compared with those recorded before engine.py and runs.py left main.py.

Each case trains a tiny model on the tiny CIFAR-10 of conftest with one thread and compares the
run's log.json, summary.json and config.json (timing fields, paths and the environment aside)
with ``tests/data/run_outputs/<case>.json``: a refactoring that changes what a run computes or
records fails here. ``UPDATE_RUN_OUTPUTS=1`` rewrites the records (only for an intended change,
named in the commit).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import runs
from conftest import ROOT, TINY_RUN, run_main

RECORDS = os.path.join(os.path.dirname(__file__), 'data', 'run_outputs')
TIMING = ('time', 'images_per_sec')
# settings that name this machine's folders, or that a test passes on purpose to reach a state
PATH_SETTINGS = ('outdir', 'dataset_dir', 'config', 'teacher', 'weights', 'evaluate', 'predict')

CASES = {
    'plain': TINY_RUN + ['--seed', '3'],
    'mixup_ema': TINY_RUN + ['--use_mixup', '--ema_decay', '0.9', '--scheduler', 'cosine'],
    'sam': TINY_RUN + ['--use_sam', '--use_cutout', '--cutout_size', '8'],
    'airbench_muon': ['--arch', 'airbench', '--n_channels', '[8,16,16]', '--epochs', '2', '--batch_size', '40',
                      '--device', 'cpu', '--no-tensorboard', '--optimizer', 'muon', '--base_lr', '0.5',
                      '--scheduler', 'linear', '--whiten_bias_epochs', '1', '--use_label_smoothing',
                      '--alternating_flip', '--padding_mode', 'reflect', '--random_crop_padding', '2',
                      '--tta', 'flip_translate', '--lookahead_every', '2', '--head_lr_factor', '4'],
}


def _sanitize_records(records):
    return [{key: value for key, value in record.items() if not key.endswith(TIMING)} for record in records]


def read_outputs(outdir):
    """What a run wrote, without what differs between machines and moments."""
    with open(os.path.join(outdir, 'log.json')) as f:
        log = _sanitize_records(json.load(f))
    with open(os.path.join(outdir, 'summary.json')) as f:
        summary = json.load(f)
    with open(os.path.join(outdir, 'config.json')) as f:
        config = json.load(f)
    config.pop('environment', None)
    config.pop('command_line', None)
    config['settings'] = {key: value for key, value in config['settings'].items() if key not in PATH_SETTINGS}
    config['explicit_flags'] = [name for name in config['explicit_flags'] if name not in PATH_SETTINGS]
    return {'log': log, 'summary': summary, 'config': config, 'files': sorted(
        name for name in os.listdir(outdir) if name != 'tensorboard')}


def check_against_record(name, outputs):
    path = os.path.join(RECORDS, f'{name}.json')
    if os.environ.get('UPDATE_RUN_OUTPUTS') == '1':
        os.makedirs(RECORDS, exist_ok=True)
        with open(path, 'w') as f:
            json.dump(outputs, f, indent=1, sort_keys=True)
            f.write('\n')
    with open(path) as f:
        recorded = json.load(f)
    # JSON round trip: tuples become lists and keys strings, as in the record
    assert json.loads(json.dumps(outputs)) == recorded


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('name', sorted(CASES))
def test_run_outputs_unchanged(name, cifar10_dir, tmp_path, one_thread):
    outdir = str(tmp_path / 'run')
    assert run_main(CASES[name] + ['--dataset_dir', cifar10_dir, '--outdir', outdir]) == 0
    check_against_record(name, read_outputs(outdir))


def test_resumed_run_outputs_unchanged(cifar10_dir, tmp_path, one_thread, monkeypatch):
    """A run stopped by SIGTERM inside epoch 1 and resumed writes what the record holds."""
    outdir = str(tmp_path / 'run')
    argv = TINY_RUN + ['--dataset_dir', cifar10_dir, '--outdir', outdir]
    monkeypatch.setenv('TOOLKIT_TEST_KILL_AT', 'step:3:TERM')
    assert run_main(argv) == 143
    monkeypatch.delenv('TOOLKIT_TEST_KILL_AT')
    assert run_main(argv + ['--resume']) == 0
    check_against_record('resumed', read_outputs(outdir))


def test_two_rank_run_outputs_unchanged(cifar10_dir, tmp_path):
    """A 2-process torchrun run (gloo, one thread per rank) writes what the record holds."""
    outdir = str(tmp_path / 'run')
    environment = {**os.environ, 'OMP_NUM_THREADS': '1', 'CIFAR_TOOLKIT_OFFLINE': '1'}
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
               os.path.join(ROOT, 'main.py'), *TINY_RUN, '--dataset_dir', cifar10_dir, '--outdir', outdir]
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    outputs = read_outputs(outdir)
    outputs['config'].pop('distributed')  # the rendezvous details are the same; the backend name is recorded
    check_against_record('two_ranks', outputs)


def test_summary_error_rate_is_rounded_for_reading_and_the_accuracies_keep_every_digit():
    """1 - 0.285 is 0.7150000000000001 in floating point: summary.json says 0.715, while the accuracies,
    which programs (summarize.py) read, are the logged ones unchanged."""
    log = [{'epoch': 1, 'test_accuracy': 0.3}, {'epoch': 2, 'test_accuracy': 0.285}]
    summary = runs.summarize(log, 'test')
    assert 1 - 0.285 != 0.715
    assert json.dumps(summary['final_test_error']) == '0.715'
    assert (summary['final_test_accuracy'], summary['best_test_accuracy']) == (0.285, 0.3)
    assert runs.summarize([{'epoch': 1, 'val_accuracy': 0.1 + 0.2}], 'val')['final_val_error'] == 0.7
    # the rounding loses nothing of a real test set's error rate: k errors in 10,000 read k / 10,000
    for k in range(10001):
        error = runs.summarize([{'epoch': 1, 'test_accuracy': (10000 - k) / 10000}], 'test')['final_test_error']
        assert error == k / 10000, k
