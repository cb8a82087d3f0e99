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
              environment=None, test_images=10000, lrs=None, data=None, **settings):
    """A run folder as main.py leaves it: config.json, log.json (with each evaluation's images/s and time,
    whose product is the ``test_images`` counted) and, once finished, summary.json. ``data``: config.json's
    "data" object, which main.py does not write yet."""
    os.makedirs(folder, exist_ok=True)
    settings = {'arch': 'resnet', 'depth': 20, 'base_lr': 0.1, 'epochs': epochs, 'dataset': 'CIFAR10',
                'dataset_dir': 'data', 'seed': seed, 'outdir': str(folder), 'device': 'cpu', 'resume': False,
                **settings}
    config = {'settings': settings, 'explicit_flags': sorted(settings),
              'environment': environment or {'torch': '2.14.1', 'device': 'cpu'}}
    if data is not None:
        config['data'] = data
    lrs = [settings['base_lr']] * len(test_accuracies) if lrs is None else lrs
    log = [{'epoch': epoch, 'lr': lr, 'train_accuracy': min(accuracy + 0.05, 1.0), 'test_accuracy': accuracy,
            'test_time': 0.5, 'test_images_per_sec': test_images / 0.5, 'epoch_time': epoch_time}
           for epoch, accuracy, lr in zip(range(1, len(test_accuracies) + 1), test_accuracies, lrs)]
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
    assert ('| r20/cutout | 3 | 20.00 | 23.33 ± 15.28 | 15.00 | 3/3 | 33 s | CPU, torch 2.14.1 '
            '| CIFAR10 (data): 10,000 test | – |') in lines


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


def test_data_column_names_each_experiments_data(tmp_path, capsys):
    """Experiments on different data side by side: the column says what each ran on. Counts come from
    config.json's "data" where recorded, else the evaluated images counted in log.json."""
    write_run(tmp_path / 'results' / 'short' / '0', dataset_dir='.data/c10k', test_images=2000)
    write_run(tmp_path / 'results' / 'full' / '0', dataset='CIFAR100', dataset_dir='/scratch/cifar100',
              data={'dataset': 'CIFAR100', 'train_images': 50000, 'test_images': 10000, 'test_split': 'test'})
    write_run(tmp_path / 'results' / 'default_folder' / '0', dataset_dir=None, test_images=10000)
    rows, _ = as_json(capsys, tmp_path / 'results')
    assert rows['short']['data'] == ['CIFAR10 (c10k): 2,000 test'] and rows['short']['differing_data'] == {}
    assert rows['full']['data'] == ['CIFAR100 (cifar100): 50,000 train, 10,000 test']
    assert rows['default_folder']['data'] == ['CIFAR10: 10,000 test']
    _, out, _ = run_summarize(capsys, tmp_path / 'results', '--no-plots')
    lines = out.splitlines()
    assert lines[0].split(' | ')[-2:] == ['data (images)', 'published % |']
    assert '| short | 1 | 10.00 |' in out
    assert any(line.endswith('| CIFAR10 (c10k): 2,000 test | – |') for line in lines)
    assert any(line.startswith('| full |') and '| CIFAR100 (cifar100): 50,000 train, 10,000 test |' in line
               for line in lines)
    _, out, _ = run_summarize(capsys, '--csv', '--no-plots', tmp_path / 'results')
    assert {row['experiment']: row['data'] for row in csv.DictReader(io.StringIO(out))}['short'] == \
        'CIFAR10 (c10k): 2,000 test'


def test_runs_on_different_data_are_flagged(tmp_path, capsys):
    # seed 1 ran on the full set: another folder, another test count (dataset_dir is a run-only flag)
    write_run(tmp_path / 'exp' / '0', 0, dataset_dir='.data/c10k', test_images=2000)
    write_run(tmp_path / 'exp' / '1', 1, dataset_dir='.data', test_images=10000)
    # one run records the data object, the other not: the parts both know agree, so one description
    write_run(tmp_path / 'same' / '0', 0, test_images=10000)
    write_run(tmp_path / 'same' / '1', 1, test_images=10000,
              data={'dataset': 'CIFAR10', 'train_images': 50000, 'test_images': 10000, 'test_split': 'test'})
    rows, _ = as_json(capsys, tmp_path)
    assert rows['exp']['differing_data'] == {'0': 'CIFAR10 (c10k): 2,000 test', '1': 'CIFAR10 (.data): 10,000 test'}
    assert rows['exp']['differing_settings'] == {}
    assert rows['same']['differing_data'] == {}
    assert rows['same']['data'] == ['CIFAR10 (data): 50,000 train, 10,000 test']
    _, out, _ = run_summarize(capsys, tmp_path, '--no-plots')
    lines = out.splitlines()
    assert any(line.startswith('| exp * |') and '| differ: CIFAR10 (.data): 10,000 test; CIFAR10 (c10k): 2,000 test |'
               in line for line in lines)
    assert '* exp: data differ between runs: 0: CIFAR10 (c10k): 2,000 test; 1: CIFAR10 (.data): 10,000 test' in lines
    assert any(line.startswith('| same |') for line in lines)


def _gids(artists, kind):
    return sorted(a.get_gid()[len(kind) + 1:] for a in artists if (a.get_gid() or '').startswith(kind + ':'))


def test_overlay_figure_of_a_table(tmp_path, capsys):
    """One figure per top-level folder: a test-error line per experiment (median), its min-max band where
    there are several runs, train error dashed, and the learning rate in a second panel."""
    pytest.importorskip('matplotlib')
    cosine = [0.1, 0.075, 0.025]
    for seed, accuracies in enumerate([(0.5, 0.7, 0.9), (0.6, 0.8, 0.85), (0.55, 0.75, 0.8)]):
        write_run(tmp_path / 'results' / 'rp56' / 'cutout' / str(seed), seed, test_accuracies=accuracies, lrs=cosine)
    write_run(tmp_path / 'results' / 'rp56' / 'plain' / '0', lrs=[0.2, 0.02, 0.002])
    write_run(tmp_path / 'results' / 'vgg15' / '0')
    experiments = summarize.collect([tmp_path / 'results'], pytest.fail)
    planned = summarize.plot_groups(experiments, str(tmp_path / 'figures'))
    assert [(path, [e['name'] for e in members]) for path, _, members in planned] == [
        (str(tmp_path / 'figures' / 'results.png'), ['vgg15']),
        (str(tmp_path / 'figures' / 'rp56.png'), ['rp56/cutout', 'rp56/plain'])]
    _, title, members = planned[1]
    figure = summarize.overlay_figure(members, title)
    error_axes, lr_axes = figure.axes
    assert _gids(error_axes.lines, 'test') == ['rp56/cutout', 'rp56/plain']
    assert _gids(error_axes.lines, 'train') == ['rp56/cutout', 'rp56/plain']
    assert _gids(error_axes.collections, 'band') == ['rp56/cutout']  # one run: no band
    cutout = next(line for line in error_axes.lines if line.get_gid() == 'test:rp56/cutout')
    assert list(cutout.get_xdata()) == [1, 2, 3] and list(cutout.get_ydata()) == pytest.approx([45, 25, 15])
    assert next(l for l in error_axes.lines if l.get_gid() == 'train:rp56/cutout').get_linestyle() == '--'
    labels = error_axes.get_legend().get_texts()
    assert [t.get_text() for t in labels[:2]] == ['cutout: 15.00% median (3 runs)', 'plain: 10.00% (1 run)']
    assert _gids(lr_axes.lines, 'lr') == ['rp56/cutout', 'rp56/plain'] and 'learning rate' in lr_axes.get_ylabel()
    assert list(next(l for l in lr_axes.lines if l.get_gid() == 'lr:rp56/cutout').get_ydata()) == cosine
    assert lr_axes.get_yscale() == 'log'  # 0.2 to 0.002
    assert list(lr_axes.get_xticks()) == [1, 2, 3] and lr_axes.get_xlim() == (0.5, 3.5)

    status, _, err = run_summarize(capsys, tmp_path / 'results', '--plots', tmp_path / 'figures')
    assert status == 0 and sorted(os.listdir(tmp_path / 'figures')) == ['results.png', 'rp56.png']
    assert png_size(tmp_path / 'figures' / 'rp56.png') == (1000, 640) and str(tmp_path / 'figures' / 'rp56.png') in err


def test_one_epoch_runs_plot(tmp_path):
    """A 1-epoch run: a marker at epoch 1, one tick, no empty band; several seeds show their spread as a bar."""
    pytest.importorskip('matplotlib')
    write_run(tmp_path / 'results' / 'quick' / 'one' / '0', test_accuracies=(0.3,), epochs=1)
    for seed, accuracy in enumerate((0.35, 0.38, 0.33)):
        write_run(tmp_path / 'results' / 'quick' / 'seeds' / str(seed), seed, test_accuracies=(accuracy,), epochs=1)
    experiments = summarize.collect([tmp_path / 'results'], pytest.fail)
    figure = summarize.overlay_figure(experiments, 'quick')
    error_axes, lr_axes = figure.axes
    one = next(line for line in error_axes.lines if line.get_gid() == 'test:quick/one')
    assert list(one.get_xdata()) == [1] and one.get_marker() == 'o'
    assert _gids(error_axes.collections, 'band') == ['quick/seeds']
    bar = next(c for c in error_axes.collections if c.get_gid() == 'band:quick/seeds')
    assert [list(map(float, segment[:, 1])) for segment in bar.get_segments()] == [pytest.approx([62, 67])]
    assert list(lr_axes.get_xticks()) == [1] and lr_axes.get_xlim() == (0.5, 1.5)
    figure.savefig(tmp_path / 'quick.png')
    assert png_size(tmp_path / 'quick.png') == (1000, 640)


def test_plots_never_go_into_run_or_experiment_folders_by_default(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    write_run(tmp_path / 'results' / 'rp56' / 'cutout' / '0', 0)
    write_run(tmp_path / 'results' / 'rp56' / 'cutout' / '1', 1, test_accuracies=(0.6,), finished=False)
    write_run(tmp_path / 'results' / 'single_run', 0)
    for given in (tmp_path / 'results', tmp_path / 'results' / 'rp56'):
        status, _, err = run_summarize(capsys, given)
        assert status == 0 and 'wrote' in err
    written = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, files in os.walk(tmp_path)
                     for f in files if f.endswith('.png'))
    assert written == [os.path.join('results', 'plots', 'results.png'), os.path.join('results', 'plots', 'rp56.png')]
    assert len(summarize.find_run_folders(tmp_path / 'results')) == 3  # plots/ made no run


def test_user_runs_under_results_are_ignored_by_git():
    """results/ keeps the project's measurements tracked and ignores the rest (a user's runs, plots/):
    every tracked file there stays un-ignored, and the example run folder of the original tool's README
    (results/resnet_preact_56/00) is ignored."""
    try:
        tracked = subprocess.run(['git', 'ls-files', 'results'], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('not a git checkout')
    files = tracked.stdout.splitlines()
    assert 'results/README.md' in files and 'results/.gitignore' in files

    def ignored(paths):
        result = subprocess.run(['git', 'check-ignore', '--no-index', '--stdin'], cwd=ROOT, input='\n'.join(paths),
                                capture_output=True, text=True)
        return result.stdout.splitlines()

    assert ignored(files) == []
    user = ['results/resnet_preact_56/00/config.json', 'results/r20/0/log.json', 'results/x/model_state.pth',
            'results/plots/cpu_seeds.png', 'results/my_table.csv',
            # beside and below the shipped runs: run_experiments.sh's quick checks and new seeds of their rows
            'results/cpu_reg/plain_ep1/0/log.json', 'results/cpu_reg/plain/1/log.json',
            'results/cpu_seeds/plain/3/summary.json', 'results/zoo_cpu/mine/config.json']
    assert ignored(user) == user
    assert not [f for f in files if f.endswith('.png')]  # no generated figures shipped


def test_without_matplotlib_the_table_still_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    write_run(tmp_path / 'exp' / '0')
    status, out, err = run_summarize(capsys, tmp_path)
    assert status == 0 and '| exp | 1 |' in out
    assert err == 'plots skipped: matplotlib is not installed (pip install matplotlib)\n'
    assert not (tmp_path / 'plots').exists()


def test_readme_block_replaced_between_markers(tmp_path, capsys):
    write_run(tmp_path / 'results' / 'cpu_reg' / 'plain' / '0')
    write_run(tmp_path / 'results' / 'cpu_reg' / 'cutout' / '0', dataset_dir='/data/cifar10_jpeg_q75',
              test_images=2000)
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
    assert f'### `{results}`: 8x NVIDIA H100, torch 2.11\n' in block
    assert f'### `{results / "cpu_reg"}`: CPU, torch 2.14.1\n' in block
    assert ('| cpu_reg/cutout | 1 | 10.00 | 10.00 | 10.00 | 3/3 | 30 s | CIFAR10 (cifar10_jpeg_q75): 2,000 test '
            '| – |') in block.splitlines()
    assert '| resnet110 | 1 |' in block
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
