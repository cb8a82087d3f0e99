"""summarize.py on run folders written here (no training), and the lr finder's plot."""
import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest

import optim
import summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def write_run(folder, seed=0, test_accuracies=(0.5, 0.7, 0.9), finished=True, epochs=3, epoch_time=10.0,
              environment=None, **settings):
    """A run folder as main.py leaves it: config.json, log.json and (once finished) summary.json."""
    os.makedirs(folder, exist_ok=True)
    settings = {'arch': 'resnet', 'depth': 20, 'base_lr': 0.1, 'epochs': epochs, 'dataset': 'CIFAR10',
                'dataset_dir': 'data', 'seed': seed, 'outdir': str(folder), 'device': 'cpu', 'resume': False,
                **settings}
    config = {'settings': settings, 'explicit_flags': sorted(settings),
              'environment': environment or {'torch': '2.14.1', 'device': 'cpu'}}
    log = [{'epoch': epoch, 'train_accuracy': min(accuracy + 0.05, 1.0), 'test_accuracy': accuracy,
            'epoch_time': epoch_time} for epoch, accuracy in enumerate(test_accuracies, 1)]
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f)
    with open(os.path.join(folder, 'log.json'), 'w') as f:
        json.dump(log, f)
    if finished:
        with open(os.path.join(folder, 'summary.json'), 'w') as f:
            json.dump({'final_test_accuracy': test_accuracies[-1], 'final_test_error': 1 - test_accuracies[-1],
                       'best_test_accuracy': max(test_accuracies), 'epochs': len(test_accuracies)}, f)


def run_summarize(capsys, *argv):
    status = summarize.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def as_json(capsys, *argv):
    status, out, err = run_summarize(capsys, '--json', '--no-plots', *argv)
    assert status == 0, err
    return {row['experiment']: row for row in json.loads(out)}, err


def test_statistics_against_hand_values(tmp_path, capsys):
    # final errors 10, 20, 40 %: median 20, mean 70/3, sample std sqrt(((10-70/3)^2+(20-70/3)^2+(40-70/3)^2)/2)
    for seed, (final, best) in enumerate([(0.9, 0.9), (0.8, 0.85), (0.6, 0.75)]):
        write_run(tmp_path / 'r20' / 'cutout' / str(seed), seed, test_accuracies=(0.3, best, final),
                  epoch_time=10.0 + seed)
    gpu = {'torch': '2.11.0+cu130', 'device': 'cuda:0', 'gpu': 'NVIDIA H100 80GB HBM3', 'gpu_count': 1}
    write_run(tmp_path / 'r20' / 'plain' / '0', environment=gpu)
    rows, err = as_json(capsys, tmp_path)
    assert err == ''
    row = rows['r20/cutout']
    assert row['finished'] == 3 and row['in_progress'] == 0 and row['group'] == str(tmp_path / 'r20')
    assert row['error_median'] == pytest.approx(20.0)
    assert row['error_mean'] == pytest.approx(70 / 3)
    assert row['error_std'] == pytest.approx(math.sqrt(700 / 3))
    assert row['final_errors'] == pytest.approx([10.0, 20.0, 40.0])
    assert row['best_error_median'] == pytest.approx(15.0)  # best errors 10, 15, 25
    assert row['wall_time_s'] == pytest.approx(33.0)  # median of 3 x 10, 3 x 11, 3 x 12 s
    assert (row['epochs_done_min'], row['epochs_done_max'], row['epochs_planned']) == (3, 3, 3)
    assert row['hardware'] == ['CPU, torch 2.14.1'] and row['differing_settings'] == {}
    assert rows['r20/plain']['hardware'] == ['NVIDIA H100 80GB HBM3, torch 2.11.0+cu130']
    assert rows['r20/plain']['error_std'] is None  # one run has no spread

    status, out, _ = run_summarize(capsys, tmp_path, '--no-plots')
    lines = out.splitlines()
    assert lines[0].startswith('| experiment | runs | test error % (median) | mean ± std |')
    assert 'selected on test set' in lines[0] and 'epochs (done/planned)' in lines[0]
    assert '| r20/cutout | 3 | 20.00 | 23.33 ± 15.28 | 15.00 | 3/3 | 33 s | CPU, torch 2.14.1 | – |' in lines


def test_in_progress_missing_and_corrupt_runs(tmp_path, capsys):
    experiment = tmp_path / 'exp'
    write_run(experiment / '0', 0, test_accuracies=(0.5, 0.7, 0.9))
    write_run(experiment / '1', 1, test_accuracies=(0.5, 0.7, 0.8))
    write_run(experiment / '2', 2, test_accuracies=(0.4,), finished=False)  # in progress: epoch 1 of 3
    write_run(experiment / '3', 3)
    (experiment / '3' / 'log.json').write_text('[{"epoch": 1, "test_acc')  # corrupt
    write_run(experiment / '4', 4)
    os.remove(experiment / '4' / 'log.json')  # started, no epoch logged
    write_run(experiment / '5', 5)
    (experiment / '5' / 'summary.json').write_text('not json')
    (experiment / '6').mkdir()  # an empty folder is no run: nothing to say
    write_run(experiment / '7', 7)
    (experiment / '7' / 'log.json').write_text('{"epoch": 1}')  # JSON, but not a list of records
    write_run(experiment / '8', 8)
    (experiment / '8' / 'summary.json').write_text('{"final_test_accuracy": null}')
    rows, err = as_json(capsys, tmp_path)
    row = rows['exp']
    assert (row['finished'], row['in_progress']) == (2, 1)
    assert row['final_errors'] == pytest.approx([10.0, 20.0])  # only finished runs count
    assert (row['epochs_done_min'], row['epochs_done_max']) == (1, 3)
    bad = err.splitlines()
    assert len(bad) == 5
    assert bad[0].startswith(f'{experiment / "3"}: skipped: log.json is not readable JSON')
    assert bad[1] == f'{experiment / "4"}: skipped: no log.json (not started, or not a run folder)'
    assert bad[2].startswith(f'{experiment / "5"}: skipped: summary.json is not readable JSON')
    assert bad[3] == f'{experiment / "7"}: skipped: log.json is not a list of epoch records'
    assert bad[4].startswith(f'{experiment / "8"}: skipped: unexpected values in log.json or summary.json')

    _, out, _ = run_summarize(capsys, tmp_path, '--no-plots')
    assert '| exp | 2 + 1 in progress | 15.00 | 15.00 ± 7.07 | 15.00 | 1-3/3 | 30 s |' in out


def test_runs_with_differing_settings_are_named(tmp_path, capsys):
    write_run(tmp_path / 'exp' / '0', 0, base_lr=0.1)
    write_run(tmp_path / 'exp' / '1', 1, base_lr=0.2, device='cuda', resume=True)  # device/resume: run-only
    write_run(tmp_path / 'exp' / '2', 2, base_lr=0.1, use_cutout=True)
    rows, _ = as_json(capsys, tmp_path)
    assert rows['exp']['differing_settings'] == {
        'base_lr': {'0': 0.1, '1': 0.2, '2': 0.1},
        'use_cutout': {'0': '(not recorded)', '1': '(not recorded)', '2': True}}
    _, out, _ = run_summarize(capsys, tmp_path, '--no-plots')
    assert '| exp * |' in out
    assert ('* exp: settings differ between runs: base_lr (0: 0.1, 1: 0.2, 2: 0.1); '
            'use_cutout (0: "(not recorded)", 1: "(not recorded)", 2: true)') in out.splitlines()


def test_different_epochs_are_different_settings(tmp_path, capsys):
    write_run(tmp_path / 'exp' / '0', 0, epochs=3)
    write_run(tmp_path / 'exp' / '1', 1, epochs=300)
    rows, _ = as_json(capsys, tmp_path)
    assert list(rows['exp']['differing_settings']) == ['epochs']
    assert rows['exp']['epochs_planned'] == [3, 300]


def test_csv_output(tmp_path, capsys):
    write_run(tmp_path / 'a' / '0', 0)
    write_run(tmp_path / 'a' / '1', 1, test_accuracies=(0.5, 0.8), finished=False)
    write_run(tmp_path / 'b' / '0', 0, base_lr=0.2)
    write_run(tmp_path / 'b' / '1', 1, base_lr=0.4)
    status, out, _ = run_summarize(capsys, '--csv', '--no-plots', tmp_path)
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [row['experiment'] for row in rows] == ['a', 'b']
    assert rows[0]['finished'] == '1' and rows[0]['in_progress'] == '1'
    assert float(rows[0]['error_median']) == pytest.approx(10.0) and rows[0]['error_std'] == ''
    assert rows[0]['epochs_done_min'] == '2' and rows[0]['hardware'] == 'CPU, torch 2.14.1'
    assert rows[1]['differing_settings'] == 'base_lr' and rows[0]['differing_settings'] == ''


def test_published_figures_from_run_experiments(tmp_path, capsys, monkeypatch):
    script = tmp_path / 'run_experiments.sh'
    script.write_text('#!/usr/bin/env bash\n'
                      '# published: rp56/cutout 4.96 median of 5\n'
                      '#published: resnet110 6.52\n'
                      '# published: cutout 9.99 a shorter name that also matches\n'
                      '# published: broken\n'
                      'run rp56/cutout --arch resnet_preact  # published: not at line start 1.0\n')
    assert summarize.published_figures(str(script)) == {
        'rp56/cutout': ('4.96', 'median of 5'), 'resnet110': ('6.52', ''),
        'cutout': ('9.99', 'a shorter name that also matches')}
    assert summarize.published_figures(str(tmp_path / 'missing.sh')) == {}
    monkeypatch.setattr(summarize, 'EXPERIMENTS_SCRIPT', str(script))
    write_run(tmp_path / 'results' / 'rp56' / 'cutout' / '0')
    write_run(tmp_path / 'results' / 'resnet110' / '0')
    write_run(tmp_path / 'results' / 'vgg15' / '0')
    rows, _ = as_json(capsys, tmp_path / 'results')
    assert rows['rp56/cutout']['published_error'] == 4.96 and rows['rp56/cutout']['published_runs'] == 'median of 5'
    assert rows['resnet110']['published_error'] == 6.52 and rows['vgg15']['published_error'] is None
    _, out, _ = run_summarize(capsys, tmp_path / 'results' / 'rp56', '--no-plots')  # the name is matched on the path
    assert out.splitlines()[2].endswith('| 4.96 (median of 5) |')


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    status, out, err = run_summarize(capsys, tmp_path / 'missing')
    assert status == 2 and out == ''
    assert err == f'summarize.py: error: {tmp_path / "missing"}: no such folder\n'
    (tmp_path / 'file').write_text('')
    assert run_summarize(capsys, tmp_path / 'file')[0] == 2
    assert run_summarize(capsys)[2].count('\n') == 1  # no PATH: argparse's message, one line
    status, _, err = run_summarize(capsys, tmp_path, '--no-plots')  # nothing to summarize
    assert status == 1 and 'no run folders' in err
    # as a script: the shebang file runs from anywhere
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'summarize.py'), str(tmp_path / 'missing')],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == '' and len(result.stderr.splitlines()) == 1


def png_size(path):
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b'IHDR'
    return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')


def test_plots_one_png_per_experiment(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    write_run(tmp_path / 'results' / 'rp56' / 'cutout' / '0', 0)
    write_run(tmp_path / 'results' / 'rp56' / 'cutout' / '1', 1, test_accuracies=(0.6, 0.8, 0.85))
    write_run(tmp_path / 'results' / 'rp56' / 'cutout' / '2', 2, test_accuracies=(0.6,), finished=False)
    write_run(tmp_path / 'results' / 'vgg15' / '0', 0)
    status, _, err = run_summarize(capsys, tmp_path / 'results', '--plots', tmp_path / 'figures')
    assert status == 0
    for name in ('rp56/cutout.png', 'vgg15.png'):
        path = tmp_path / 'figures' / name
        assert os.path.getsize(path) > 1000 and png_size(path) == (640, 400)
        assert str(path) in err
    status, _, _ = run_summarize(capsys, tmp_path / 'results')  # default: inside each experiment's folder
    assert png_size(tmp_path / 'results' / 'rp56' / 'cutout' / 'error_curves.png') == (640, 400)
    assert len(summarize.find_run_folders(tmp_path / 'results')) == 4  # the PNGs made no folder a run


def test_without_matplotlib_the_table_still_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    write_run(tmp_path / 'exp' / '0')
    status, out, err = run_summarize(capsys, tmp_path)
    assert status == 0 and '| exp | 1 |' in out
    assert err == 'plots skipped: matplotlib is not installed (pip install matplotlib)\n'
    assert not (tmp_path / 'exp' / 'error_curves.png').exists()


def test_readme_block_replaced_between_markers(tmp_path, capsys):
    write_run(tmp_path / 'results' / 'cpu_reg' / 'plain' / '0')
    write_run(tmp_path / 'results' / 'cpu_reg' / 'cutout' / '0', dataset_dir='/data/cifar10_jpeg_q75')
    write_run(tmp_path / 'results' / 'resnet110' / '0', environment={'torch': '2.11', 'device': 'cuda',
                                                                     'gpu': 'NVIDIA H100', 'gpu_count': 8})
    before = '# Measured results\r\n\r\nHand-written text, trailing spaces   \n\n'.encode()
    after = '\n## After the block\n\nmore text, no final newline'.encode()
    readme = tmp_path / 'README.md'
    readme.write_bytes(before + b'<!-- summarize:begin -->\nold table\n<!-- summarize:end -->\n' + after)
    results = tmp_path / 'results'
    status, _, err = run_summarize(capsys, results, '--no-plots', '--readme', readme)
    assert status == 0 and 'rewrote' in err
    text = readme.read_bytes()
    assert text.startswith(before) and text.endswith(after)
    block = text[len(before):-len(after)].decode()
    assert block.startswith('<!-- summarize:begin -->\n') and block.endswith('<!-- summarize:end -->\n')
    assert 'old table' not in block
    assert (f'### `{results}`: 8x NVIDIA H100, torch 2.11; data: CIFAR10 from data\n' in block)
    assert (f'### `{results / "cpu_reg"}`: CPU, torch 2.14.1; data: CIFAR10 from data; '
            f'JPEG copy (CIFAR10 from /data/cifar10_jpeg_q75)\n') in block
    assert '| cpu_reg/cutout | 1 | 10.00 |' in block and '| resnet110 | 1 |' in block
    assert block.count('| experiment |') == 2

    run_summarize(capsys, results, '--no-plots', '--readme', readme)
    assert readme.read_bytes() == text  # a second run changes nothing

    bare = tmp_path / 'bare.md'
    bare.write_bytes(b'# Results\n\nNo block yet.\n')
    run_summarize(capsys, results, '--no-plots', '--readme', bare)
    appended = bare.read_bytes()
    assert appended.startswith(b'# Results\n\nNo block yet.\n\n<!-- summarize:begin -->\n')
    assert appended.endswith(b'<!-- summarize:end -->\n')

    broken = tmp_path / 'broken.md'
    broken.write_bytes(b'<!-- summarize:begin -->\nno end\n')
    status, _, err = run_summarize(capsys, results, '--no-plots', '--readme', broken)
    assert status == 2 and len(err.splitlines()) == 1 and 'summarize:end' in err
    assert broken.read_bytes() == b'<!-- summarize:begin -->\nno end\n'


def lr_result():
    lrs = [1e-5 * 10 ** (i / 10) for i in range(30)]
    losses = [2.0 - 1.5 / (1 + math.exp(-(i - 15) / 3)) for i in range(30)]
    return dict(lrs=lrs, losses=losses, suggested_lr=optim._steepest_descent_lr(lrs, losses), diverged=False)


def test_lr_finder_draws_with_matplotlib(tmp_path):
    pytest.importorskip('matplotlib')
    written = optim.save_lr_range_test(lr_result(), str(tmp_path))
    assert written == [str(tmp_path / 'lr_finder.json'), str(tmp_path / 'lr_finder.png')]
    assert png_size(tmp_path / 'lr_finder.png') == (720, 450)


def test_lr_finder_without_matplotlib_writes_only_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    written = optim.save_lr_range_test(lr_result(), str(tmp_path))
    assert written == [str(tmp_path / 'lr_finder.json')] and os.listdir(tmp_path) == ['lr_finder.json']
    assert json.loads((tmp_path / 'lr_finder.json').read_text())['suggested_lr'] == lr_result()['suggested_lr']
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and 'matplotlib is not installed' in err


def test_experiment_names_are_relative_to_the_results_folder(tmp_path, capsys):
    """Seed folders (numbers) are runs of their parent's experiment; other run folders are experiments
    of their own; names are relative to the nearest results/ folder whichever subfolders are given."""
    write_run(tmp_path / 'results' / 'cpu_reg' / 'plain' / '0', 0)
    write_run(tmp_path / 'results' / 'cpu_seeds' / 'plain' / '0', 0)
    write_run(tmp_path / 'results' / 'cpu_seeds' / 'plain' / '1', 1)
    write_run(tmp_path / 'results' / 'cpu_distributed' / 'ranks1', 0)
    write_run(tmp_path / 'results' / 'cpu_distributed' / 'ranks2', 0)
    write_run(tmp_path / 'results' / 'single_run', 0)
    rows, _ = as_json(capsys, tmp_path / 'results' / 'cpu_reg', tmp_path / 'results' / 'cpu_seeds',
                      tmp_path / 'results' / 'cpu_distributed', tmp_path / 'results' / 'single_run')
    assert sorted(rows) == ['cpu_distributed/ranks1', 'cpu_distributed/ranks2', 'cpu_reg/plain',
                            'cpu_seeds/plain', 'single_run']
    assert rows['cpu_seeds/plain']['finished'] == 2 and rows['cpu_distributed/ranks2']['finished'] == 1
