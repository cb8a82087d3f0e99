"""run_experiments.sh: every published row with its figure and the original tool's settings;
finished runs skipped, interrupted ones resumed, a failed run stopping the script."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, write_cifar10

SCRIPT = os.path.join(ROOT, 'run_experiments.sh')
# the pattern summarize.py reads the published figures with
PUBLISHED_LINE = re.compile(r'^\s*#\s*published:\s+(\S+)\s+(\d+(?:\.\d*)?)\s*(.*?)\s*$')

# Every figure of the original tool's published tables (hysts/pytorch_image_classification's README):
# row -> (test error %, runs)
PUBLISHED_ROWS = {
    'vgg15': ('7.29', 'median of 3'),
    'resnet110': ('6.52', 'median of 3'),
    'resnet_preact110': ('6.47', 'median of 3'),
    'resnet_preact164': ('5.90', 'median of 3'),
    'wrn28_10': ('4.03', 'median of 3'),
    'densenet100_k12': ('3.87', '1 run'),
    'densenet_bc100': ('4.69', 'median of 3'),
    'pyramidnet110_84': ('4.40', 'median of 3'),
    'pyramidnet110_270': ('3.92', '1 run'),
    'pyramidnet164_270': ('3.44', '1 run'),
    'resnext29_4x64d': ('3.89', 'median of 3'),
    'resnext29_8x64d': ('3.97', '1 run'),
    'shake_shake26_2x32d': ('3.68', 'median of 3'),
    'shake_shake26_2x64d': ('2.88', '1 run'),
    'shake_shake26_2x96d': ('2.90', '1 run'),
    'reg_rp20w4/plain': ('4.91', '1 run'),
    'reg_rp20w4/cutout': ('3.71', '1 run'),
    'reg_rp20w4/ricap': ('3.45', '1 run'),
    'reg_wrn/cutout': ('3.19', '1 run'),
    'reg_wrn/mixup': ('3.32', '1 run'),
    'reg_wrn/ricap': ('2.83', '1 run'),
    'reg_wrn/dual_cutout': ('2.87', '1 run'),
    'reg_ss96/cutout': ('2.50', '1 run'),
    'reg_ss96/mixup': ('2.36', '1 run'),
    'reg_ss96/ricap': ('2.10', '1 run'),
    'reg_rp20/plain': ('7.60', 'median of 3'),
    'reg_rp20/label_smoothing_0.01': ('7.21', 'median of 3'),
    'reg_rp20/mixup': ('7.24', 'median of 3'),
    'reg_rp20/ricap': ('6.77', 'median of 3'),
    'reg_rp20/dual_cutout': ('6.24', 'median of 3'),
    'rp56/first_relu_no_last_bn': ('6.47', 'median of 5'),
    'rp56/no_first_relu_last_bn': ('5.85', 'median of 5'),
    'rp56/cosine': ('5.72', 'median of 5'),
    'rp56/cutout': ('4.96', 'median of 5'),
    'rp56/random_erasing': ('5.22', 'median of 5'),
    'rp56/mixup_300ep': ('5.11', 'median of 5'),
    'bs/128_lr0.1': ('8.09', '1 run'),
    'bs/1024_lr0.8': ('8.40', '1 run'),
    'bs/4096_lr3.2': ('10.57', '1 run'),
    'bs/4096_lars_lr0.02': ('8.21', 'median of 3'),
    'bs/4096_no_wd_on_bn': ('8.78', 'median of 3'),
    'bs/4096_ghost128': ('9.73', '1 run'),
    'bs/4096_fp16_pure': ('49.84', '1 run'),
    'bs/4096_mixed_precision': ('10.48', '1 run'),
    'fashion_mnist/plain': ('5.04', 'median of 3'),
    'fashion_mnist/cutout': ('4.49', 'median of 3'),
    'mnist/plain': ('0.40', 'median of 3'),
    'mnist/cutout': ('0.25', 'median of 3'),
    'kmnist/cutout14': ('0.82', 'median of 3'),
}
TINY = ['--depth', '8', '--base_channels', '4', '--batch_size', '20', '--test_batch_size', '40',
        '--device', 'cpu', '--no-tensorboard']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """The environment of the script: `python` (main.py's shebang) is this interpreter."""
    bin_dir = tmp_path_factory.mktemp('bin')
    wrapper = bin_dir / 'python'
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k not in ('SEEDS', 'EXTRA', 'DRY', 'RESULTS_DIR')}
    environment['PATH'] = f'{bin_dir}{os.pathsep}{os.environ.get("PATH", "")}'
    return environment


def script(env, *args, extra_env=None):
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**env, **(extra_env or {})})


@pytest.fixture(scope='module')
def listed(env):
    """--list as {name: (error, runs, argv or None)}."""
    result = script(env, '--list')
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        name, error, runs, command = line.split('\t')
        assert name not in rows, f'{name} listed twice'
        rows[name] = (error, runs, None if command.startswith('(not run') else shlex.split(command))
    return rows


@pytest.fixture(scope='module')
def settings(listed):
    """Each runnable row's command resolved by main.py's own parser."""
    import main
    parsed = {}
    for name, (_, _, argv) in listed.items():
        if argv is not None:
            assert argv[0] == './main.py', name
            parsed[name] = vars(main.parse_args(argv[1:]))
    return parsed


def test_list_has_every_published_figure_and_matches_the_published_lines(listed):
    for name, (error, runs) in PUBLISHED_ROWS.items():
        assert name in listed, f'{name} missing from --list'
        assert listed[name][:2] == (error, runs), name
    published = {}
    with open(SCRIPT) as f:
        for line in f:
            match = PUBLISHED_LINE.match(line)
            if match:
                assert match.group(1) not in published, f'two published lines for {match.group(1)}'
                published[match.group(1)] = (match.group(2), match.group(3))
    assert set(published) <= set(listed), 'a published line without its row'
    for name, (error, runs, _) in listed.items():
        assert published.get(name, ('-', '-')) == (error, runs), name
    assert listed['bs/4096_fp16_pure'][2] is None  # pure FP16: no main.py equivalent


def test_every_row_parses_names_its_epochs_and_writes_under_its_name(listed, settings):
    for name, parsed in settings.items():
        argv = listed[name][2]
        assert '--epochs' in argv, f'{name}: the skip check needs --epochs'
        assert parsed['outdir'] == f'results/{name}/0' and parsed['seed'] == 0


def test_rows_carry_the_original_settings(settings):
    s = settings
    for name, parsed in s.items():
        if name.startswith('rp56/'):
            assert parsed['base_lr'] == 0.2 and parsed['depth'] == 56, name
            stage = [True, True, True] if 'preact_downsampling' in name else [True, False, False]
            assert parsed['preact_stage'] == stage, name
            assert parsed['scheduler'] == ('cosine' if name == 'rp56/cosine' else 'multistep'), name
            assert parsed['epochs'] == (300 if name == 'rp56/mixup_300ep' else 160), name
        if name.startswith(('reg_', 'fashion_mnist/', 'mnist/', 'kmnist/', 'wrn_ricap_b512/')):
            assert parsed['scheduler'] == 'cosine', name
            assert parsed['base_lr'] == (0.1 if name == 'reg_wrn/cutout' else 0.2), name
        if parsed['use_ricap']:
            assert parsed['use_random_crop'] == (name == 'reg_rp20/ricap_random_crop'), name
    assert s['rp56/mixup_300ep']['milestones'] == [150, 225]
    assert s['rp56/no_first_relu_last_bn']['remove_first_relu'] and s['rp56/no_first_relu_last_bn']['add_last_bn']
    assert not s['rp56/first_relu_no_last_bn']['remove_first_relu']
    assert s['rp56/random_erasing']['use_random_erasing'] and s['rp56/cutout']['cutout_size'] == 16
    for name, batch, lr in [('densenet_bc100', 32, 0.05), ('resnext29_4x64d', 32, 0.025),
                            ('resnext29_8x64d', 64, 0.05), ('shake_shake26_2x64d', 64, 0.1),
                            ('shake_shake26_2x96d', 128, 0.2), ('wrn28_10', 64, 0.1), ('reg_wrn/cutout', 64, 0.1)]:
        assert (s[name]['batch_size'], s[name]['base_lr']) == (batch, lr), name
    for name in ('bs/4096_no_wd_on_bn', 'bs/4096_ghost128', 'bs/4096_mixed_precision'):
        assert (s[name]['batch_size'], s[name]['base_lr']) == (4096, 1.6), name
    assert s['bs/4096_no_wd_on_bn']['no_weight_decay_on_bn'] and s['bs/4096_no_wd_on_bn']['weight_decay'] == 5e-4
    assert s['bs/4096_ghost128']['subdivision'] == 32 and s['bs/4096_mixed_precision']['precision'] == 'fp16'
    lars = s['bs/4096_lars_lr0.02']
    assert (lars['optimizer'], lars['base_lr'], lars['nesterov'], lars['weight_decay']) == ('lars', 0.02, False, 1e-4)
    assert [s[f'reg_rp20/label_smoothing_{e}']['label_smoothing_epsilon'] for e in ('0.001', '0.01', '0.1')] == \
        [0.001, 0.01, 0.1]
    assert s['reg_rp20w4/plain']['base_channels'] == 64  # "widening factor 4": stem and stages x4
    assert [s[f'wrn_ricap_b512/{n}']['subdivision'] for n in ('1gpu', '2gpus', '4gpus', '8gpus')] == [1, 2, 4, 8]
    assert [s[n]['epochs'] for n in ('fashion_mnist/plain', 'mnist/plain', 'kmnist/cutout14')] == [200, 100, 200]
    assert s['kmnist/cutout14']['cutout_size'] == 14 and not s['mnist/plain']['use_random_crop']


def test_dry_prints_the_commands_seeds_and_quick_check_outdir(env, tmp_path):
    result = script(env, 'rp56/cutout', '--dry', '--results', tmp_path)
    commands = [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith('#')]
    assert result.returncode == 0 and len(commands) == 5  # median of 5: seeds 0..4
    for seed, argv in enumerate(commands):
        assert argv[argv.index('--preact_stage') + 1] == '[true,false,false]'
        assert 'cosine' not in argv and '--resume' not in argv
        assert argv[-4:] == ['--seed', str(seed), '--outdir', f'{tmp_path}/rp56/cutout/{seed}']
    assert "--preact_stage '[true,false,false]'" in result.stdout  # quoted for a shell
    result = script(env, 'batch_size_lr', '--dry', '--epochs', '1', '--seeds', '7', '--results', tmp_path,
                    '--', '--device', 'cpu')
    lines = [line for line in result.stdout.splitlines() if line.startswith('./main.py')]
    ends = [re.search(r'--device cpu --epochs 1 --seed 7 --outdir (\S+)$', line) for line in lines]
    assert len(lines) == 8 and all(ends)  # every bs/ row but pure FP16
    assert all(re.fullmatch(rf'{tmp_path}/bs/[^/]+_ep1/7', end.group(1)) for end in ends)
    assert '# skip bs/4096_fp16_pure: pure FP16' in result.stdout
    # the old environment variables; a prefix selects rows, an unknown name fails before any run
    result = script(env, 'reg_wrn', extra_env={'DRY': '1', 'SEEDS': '3 4', 'EXTRA': '--dataset_dir d',
                                               'RESULTS_DIR': str(tmp_path)})
    lines = [line for line in result.stdout.splitlines() if line.startswith('./main.py')]
    assert len(lines) == 8 and all('--dataset_dir d --seed' in line for line in lines)
    assert script(env, 'rp56/nope', '--dry').returncode == 2


def test_dry_skips_finished_runs_and_resumes_interrupted_ones(env, tmp_path):
    row = tmp_path / 'rp56' / 'cutout'
    for seed, files in {0: {'checkpoint.pth': ''}, 1: {'log.json': '[]'}, 2: {'summary.json': '{"epochs": 160}'},
                        3: {'summary.json': '{"epochs": 1}', 'checkpoint.pth': ''}}.items():
        (row / str(seed)).mkdir(parents=True)
        for name, text in files.items():
            (row / str(seed) / name).write_text(text)
    result = script(env, 'rp56/cutout', '--dry', '--results', tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    resumed = [line for line in lines if line.startswith('./main.py') and line.endswith('--resume')]
    assert [shlex.split(line)[-2] for line in resumed] == [f'{row}/0', f'{row}/1', f'{row}/3']
    assert f'# skip {row}/2: finished (160 epochs)' in lines
    assert lines[-1].endswith(f'--seed 4 --outdir {row}/4')  # a new run: no --resume


def test_tiny_run_end_to_end_skipped_once_finished_then_resumed(env, tmp_path):
    data = write_cifar10(str(tmp_path / 'data'), n_per_batch=20, n_test=40)
    results = tmp_path / 'results'

    def train(epochs):
        return script(env, 'rp56/cutout', '--seeds', '0', '--epochs', epochs, '--results', results,
                      '--', '--dataset_dir', data, *TINY)

    first = train(1)
    assert first.returncode == 0, first.stderr[-2000:]
    run = results / 'rp56' / 'cutout_ep1' / '0'
    assert json.loads((run / 'summary.json').read_text())['epochs'] == 1
    config = json.loads((run / 'config.json').read_text())['settings']
    assert config['preact_stage'] == [True, False, False] and config['use_cutout'] and config['scheduler'] == 'multistep'
    log_time = (run / 'log.json').stat().st_mtime_ns

    second = train(1)
    assert second.returncode == 0 and f'skip {run}: finished (1 epochs)' in second.stderr
    assert (run / 'log.json').stat().st_mtime_ns == log_time

    # a 2-epoch run interrupted after epoch 1: the same checkpoint, no summary.json
    interrupted = results / 'rp56' / 'cutout_ep2' / '0'
    shutil.copytree(run, interrupted)
    (interrupted / 'summary.json').unlink()
    third = train(2)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f'resume {interrupted}' in third.stderr
    assert '--resume' in json.loads((interrupted / 'config.json').read_text())['command_line']
    assert [r['epoch'] for r in json.loads((interrupted / 'log.json').read_text())] == [1, 2]
    assert json.loads((interrupted / 'summary.json').read_text())['epochs'] == 2


def test_a_failed_run_stops_the_script_with_its_status(env, tmp_path):
    result = script(env, 'reg_rp20/plain', '--seeds', '0,1', '--epochs', '1', '--results', tmp_path,
                    '--', '--batch_size', '0', '--device', 'cpu')
    assert result.returncode == 2  # main.py's usage error
    assert 'failed with exit status 2' in result.stderr
    assert f'start {tmp_path}/reg_rp20/plain_ep1/1' not in result.stderr  # seed 1 never started


def test_quick_check_scales_the_rows_epoch_settings_and_parses(env, tmp_path):
    """--epochs K keeps a row's shape (milestones at the same fractions of the run, warmup and the
    whitening bias's epochs shrunk alike), so main.py accepts every quick-check command."""
    import main
    result = script(env, '--list', '--epochs', '2', 'rp56/mixup_300ep', 'fast_airbench94', 'cpu_large_batch')
    rows = dict(line.split('\t')[0::3] for line in result.stdout.splitlines())
    assert result.returncode == 0 and len(rows) == 4
    settings = {name: main.parse_args(shlex.split(command)[1:]) for name, command in rows.items()}
    assert settings['rp56/mixup_300ep'].milestones == [1.0, 1.5] and settings['rp56/mixup_300ep'].epochs == 2
    airbench = settings['fast_airbench94']
    assert (airbench.warmup_epochs, airbench.whiten_bias_epochs) == (round(2.277 * 2 / 9.9, 4), round(3 * 2 / 9.9, 4))
    assert all(s.warmup_epochs == 0.25 for n, s in settings.items() if n.startswith('cpu_large_batch'))
