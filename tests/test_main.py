"""End-to-end runs of main.py on tiny generated datasets: outputs, resume, bad input."""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataloader
import engine
import main
import utils
from conftest import ROOT, TINY_RUN, run_main, run_main_interrupted_in_epoch, write_image_folder

EPOCH_KEYS = {'epoch', 'lr', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy',
              'best_test_accuracy', 'best_test_epoch', 'epoch_time', 'train_images_per_sec',
              'test_images_per_sec', 'train_accuracy_kind'}


def test_two_epoch_run_writes_the_run_directory(cifar10_dir, tmp_path):
    outdir = str(tmp_path / 'run')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *TINY_RUN, '--tensorboard',
                             '--dataset_dir', cifar10_dir, '--outdir', outdir],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {'config.json', 'log.json', 'checkpoint.pth', 'model_state.pth', 'summary.json',
            'tensorboard'} <= set(os.listdir(outdir))
    log = json.load(open(os.path.join(outdir, 'log.json')))
    assert [record['epoch'] for record in log] == [1, 2]
    for record in log:
        assert EPOCH_KEYS <= set(record)
        assert 0 <= record['test_accuracy'] <= 1 and record['epoch_time'] > 0
    config = json.load(open(os.path.join(outdir, 'config.json')))
    assert config['settings']['arch'] == 'resnet' and config['settings']['depth'] == 8
    model = main.models.create_model('resnet', depth=8, base_channels=4)
    assert config['n_params'] == utils.count_parameters(model)
    assert config['environment']['torch'] == torch.__version__ and 'main.py' in config['command_line']
    threads = config['settings']['num_threads']  # the number the run used, which its first lines say
    assert isinstance(threads, int) and threads >= 1 and f'cpu ({threads} thread' in result.stdout
    summary = json.load(open(os.path.join(outdir, 'summary.json')))
    assert summary['final_test_accuracy'] == log[-1]['test_accuracy']
    assert summary['best_test_accuracy'] == max(r['test_accuracy'] for r in log)
    state = torch.load(os.path.join(outdir, 'model_state.pth'), weights_only=True)
    model.load_state_dict(state)
    assert any(name.startswith('events') for name in os.listdir(os.path.join(outdir, 'tensorboard')))
    assert 'epoch 2/2' in result.stdout


def test_arch_defaults_then_config_then_flags(tmp_path):
    args = main.parse_args(['--arch', 'wrn', '--outdir', 'x'])
    assert (args.epochs, args.weight_decay, args.milestones, args.lr_decay) == (200, 5e-4, [60, 120, 160], 0.2)
    config = tmp_path / 'c.json'
    config.write_text(json.dumps({'arch': 'wrn', 'epochs': 7, 'depth': 16, 'base_lr': 0.05}))
    args = main.parse_args(['--config', str(config), '--epochs', '3', '--outdir', 'x'])
    assert (args.arch, args.epochs, args.depth, args.base_lr, args.weight_decay) == ('wrn', 3, 16, 0.05, 5e-4)
    args = main.parse_args(['--arch', 'resnet_preact', '--outdir', 'x', '--remove_first_relu', 'false',
                            '--use_cutout', '--preact_stage', '[true,false,false]'])
    assert args.remove_first_relu is False and args.use_cutout is True and args.preact_stage == [True, False, False]
    assert main.parse_args(['--outdir', 'x', '--use_ricap']).use_random_crop is False
    assert main.parse_args(['--outdir', 'x', '--use_ricap', '--use_random_crop']).use_random_crop is True
    assert main.parse_args(['--outdir', 'x', '--precision', 'O1']).precision == 'fp16'


def test_dry_run_prints_and_writes_nothing(cifar10_dir, tmp_path, capsys):
    outdir = tmp_path / 'dry'
    assert run_main([*TINY_RUN, '--dataset_dir', cifar10_dir, '--outdir', str(outdir), '--dry_run']) == 0
    printed = capsys.readouterr().out
    n_params = utils.count_parameters(main.models.create_model('resnet', depth=8, base_channels=4))
    assert f'{n_params:,} parameters' in printed and '"epochs": 2' in printed
    assert not outdir.exists()


def _log_without_times(outdir):
    log = json.load(open(os.path.join(outdir, 'log.json')))
    return [{k: v for k, v in record.items() if 'time' not in k and 'per_sec' not in k} for record in log]


def test_resume_after_a_crash_equals_an_uninterrupted_run(cifar10_dir, tmp_path, monkeypatch):
    run = [*TINY_RUN, '--epochs', '3', '--dataset_dir', cifar10_dir, '--use_cutout', '--scheduler', 'cosine',
           '--warmup_epochs', '1']
    assert run_main([*run, '--outdir', str(tmp_path / 'whole')]) == 0

    real_save = utils.save_checkpoint

    def crash_after_epoch_2(state, path):
        real_save(state, path)
        if state['epoch'] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(utils, 'save_checkpoint', crash_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C reaches the caller of main.cli
        run_main([*run, '--outdir', str(tmp_path / 'crashed')])
    monkeypatch.setattr(utils, 'save_checkpoint', real_save)
    assert len(json.load(open(tmp_path / 'crashed' / 'log.json'))) == 2
    assert run_main([*run, '--outdir', str(tmp_path / 'crashed'), '--resume']) == 0
    assert _log_without_times(tmp_path / 'crashed') == _log_without_times(tmp_path / 'whole')
    whole = torch.load(tmp_path / 'whole' / 'model_state.pth', weights_only=True)
    resumed = torch.load(tmp_path / 'crashed' / 'model_state.pth', weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_refuses_to_overwrite_and_resume_refuses_changed_settings(cifar10_dir, tmp_path, capsys):
    outdir = str(tmp_path / 'run')
    run = [*TINY_RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', outdir]
    assert run_main(run) == 0
    before = open(os.path.join(outdir, 'log.json')).read()
    assert run_main(run) == 2
    assert 'not empty; pass --resume' in capsys.readouterr().err
    assert run_main([*run, '--resume', '--base_lr', '0.5']) == 2
    assert '--base_lr 0.5 (saved run: 0.1)' in capsys.readouterr().err
    assert open(os.path.join(outdir, 'log.json')).read() == before
    assert run_main([*run, '--resume', '--epochs', '2']) == 0  # extending a finished run
    assert len(json.load(open(os.path.join(outdir, 'log.json')))) == 2


def test_evaluate_saved_weights(cifar10_dir, tmp_path, capsys):
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', str(outdir)]) == 0
    logged = json.load(open(outdir / 'log.json'))[-1]['test_accuracy']
    capsys.readouterr()
    assert run_main(['--evaluate', str(outdir / 'model_state.pth'), '--dataset_dir', cifar10_dir,
                     '--device', 'cpu']) == 0
    assert f'test accuracy {logged:.4f}' in capsys.readouterr().out
    assert run_main(['--evaluate', str(outdir / 'model_state.pth'), '--dataset_dir', cifar10_dir,
                     '--device', 'cpu', '--tta', 'flip']) == 0


def test_val_ratio_evaluates_on_held_out_training_images(cifar10_dir, tmp_path):
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', str(outdir),
                     '--val_ratio', '0.2']) == 0
    record = json.load(open(outdir / 'log.json'))[0]
    assert 'val_accuracy' in record and 'best_val_accuracy' in record and 'test_accuracy' not in record


@pytest.mark.parametrize('dataset', ['MNIST', 'ImageFolder'])
def test_other_datasets_train(dataset, mnist_dir, tmp_path):
    root = mnist_dir if dataset == 'MNIST' else write_image_folder(str(tmp_path / 'folder'))
    assert run_main([*TINY_RUN, '--epochs', '1', '--dataset', dataset, '--dataset_dir', root,
                     '--outdir', str(tmp_path / 'run'), '--num_workers', '0']) == 0


BAD_INPUT = [
    (['--arch', 'resnet1000'], '--arch resnet1000: expected one of .*resnet'),
    (['--arch', 'resnet', '--depth', '21'], '--depth 21: resnet'),
    (['--milestones', '[80,'], r'--milestones \[80,: expected a JSON list of numbers > 0'),
    (['--epochs', '0'], '--epochs 0: expected a number > 0'),
    (['--batch_size', '-5'], '--batch_size -5: expected an integer >= 1'),
    (['--base_lr', '0'], '--base_lr 0.0: expected a number > 0'),
    (['--dataset', 'SVHN'], '--dataset SVHN: expected one of CIFAR10, CIFAR100'),
    (['--remove_first_relu', 'maybe'], r'--remove_first_relu maybe: expected true or false'),
    (['--subdivision', '3'], '--subdivision 3 must divide --batch_size 20'),
    (['--use_mixup', '--use_ricap'], 'mixup.*ricap|ricap.*mixup'),
    (['--growth_rate', '12'], '--growth_rate does not apply to --arch resnet'),
    (['--tta', 'flip_translate', '--dataset', 'MNIST'], '--tta flip_translate: MNIST images are not flipped'),
    (['--compile_mode', 'max-autotune'], '--compile_mode max-autotune: applies only with --compile'),
    (['--eval_every', '0'], '--eval_every 0: expected an integer >= 1'),
    (['--save_every', '0'], '--save_every 0: expected an integer >= 1'),
    (['--whiten_bias_epochs', '2'], '--whiten_bias_epochs: this --arch has no patch-whitening layer'),
    (['--epochs', '2.5', '--milestones', '[1,3]'], r'--milestones \[1, 3\]: beyond the end of the run \(25 steps of 10'),
    (['--total_steps', '4', '--milestones', '[2]'], r'--milestones \[2\]: beyond the end of the run \(4 steps'),
    (['--total_steps', '0'], r'--total_steps 0: expected an integer >= 1 \(or unset\)'),
    (['--arch', 'resnet9', '--ghost_bn_splits', '3'], '--ghost_bn_splits 3 must divide the batch of 20 images'),
    (['--epochs', 'nan'], '--epochs NaN: expected a number > 0'),
    (['--ema_every', '0'], '--ema_every 0: expected an integer >= 1'),
    (['--lookahead_every', '-1'], '--lookahead_every -1: expected an integer >= 0'),
    (['--lr_end_factor', '2'], r'--lr_end_factor 2.0: expected a number in \[0, 1\]'),
    (['--optimizer', 'muon', '--use_sam'], '--use_sam does not combine with --optimizer muon'),
    (['--alternating_flip', '--data_pipeline', 'workers'], '--alternating_flip need --data_pipeline device'),
    (['--padding_mode', 'reflect', '--data_pipeline', 'workers'],
     '--padding_mode reflect .*need --data_pipeline device'),
    (['--padding_mode', 'circular'], '--padding_mode circular: expected one of zeros, reflect'),
    (['--tta', 'flip_shift'], '--tta flip_shift: expected one of none, flip, flip_translate'),
]


@pytest.mark.parametrize('extra,message', BAD_INPUT, ids=[' '.join(e) for e, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(extra, message, cifar10_dir, tmp_path, capsys):
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--dataset_dir', cifar10_dir, '--outdir', str(outdir), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err
    import re
    assert re.search(message, err), err
    assert not outdir.exists() or not os.listdir(outdir)


def test_whitening_bias_longer_than_the_run_is_refused(cifar10_dir, tmp_path, capsys):
    outdir = tmp_path / 'run'
    assert run_main(['--arch', 'airbench', '--n_channels', '[8,16,16]', '--epochs', '2', '--batch_size', '20',
                     '--device', 'cpu', '--no-tensorboard', '--whiten_bias_epochs', '3', '--dataset_dir', cifar10_dir,
                     '--outdir', str(outdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '--whiten_bias_epochs must be in (0, --epochs], got 3' in err
    assert not outdir.exists()


def test_bad_files_are_one_line_errors(cifar10_dir, tmp_path, capsys):
    run = [*TINY_RUN, '--dataset_dir', cifar10_dir]
    assert run_main([*run, '--dataset_dir', str(tmp_path / 'empty'), '--outdir', str(tmp_path / 'a')]) == 2
    assert 'files not found: looked for' in capsys.readouterr().err
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert run_main([*run, '--outdir', str(blocker / 'sub')]) == 2
    assert 'not writable' in capsys.readouterr().err
    bad_config = tmp_path / 'bad.json'
    bad_config.write_text('{"epochs": 3,')
    assert run_main([*run, '--outdir', str(tmp_path / 'b'), '--config', str(bad_config)]) == 2
    assert 'not valid JSON' in capsys.readouterr().err

    outdir = tmp_path / 'run'
    assert run_main([*run, '--epochs', '1', '--outdir', str(outdir)]) == 0
    checkpoint = outdir / 'checkpoint.pth'
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    truncated = checkpoint.read_bytes()
    capsys.readouterr()
    assert run_main([*run, '--epochs', '2', '--outdir', str(outdir), '--resume']) == 2
    err = capsys.readouterr().err
    assert 'checkpoint.pth is corrupt' in err and len(err.strip().splitlines()) == 1
    assert checkpoint.read_bytes() == truncated


def test_main_py_is_an_executable_with_a_clean_error():
    result = subprocess.run([os.path.join(ROOT, 'main.py'), '--epochs', '0', '--outdir', 'never'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == 'main.py: error: --epochs 0: expected a number > 0'
    assert not os.path.exists('never')


DATASET_FOR_FAMILY = ['CIFAR10', 'MNIST', 'CIFAR100', 'FashionMNIST', 'KMNIST']


def model_flags_of(config):
    """A registered test configuration as command-line flags: JSON lists, true/false booleans."""
    def text(value):
        if isinstance(value, bool):
            return 'true' if value else 'false'
        if isinstance(value, (list, tuple)):
            return json.dumps(list(value))
        return str(value)
    return [item for name, value in config.items() for item in (f'--{name}', text(value))]


@pytest.mark.parametrize('index,arch', list(enumerate(main.models.list_models())))
def test_every_family_trains_one_epoch(index, arch, tmp_path):
    """One epoch of main.py for every registered arch, at its registered test configuration, with
    its training defaults (optimizer, schedule, augmentation), on a tiny copy of a dataset."""
    from conftest import write_cifar10, write_cifar100, write_mnist_family
    dataset = DATASET_FOR_FAMILY[index % len(DATASET_FOR_FAMILY)]
    root = str(tmp_path / 'data')
    if dataset == 'CIFAR10':
        write_cifar10(root)
    elif dataset == 'CIFAR100':
        write_cifar100(root)
    else:
        write_mnist_family(root, name=dataset)
    argv = ['--arch', arch, *model_flags_of(main.models.get_test_config(arch)), '--epochs', '1',
            '--batch_size', '20', '--device', 'cpu', '--no-tensorboard', '--dataset', dataset,
            '--dataset_dir', root, '--outdir', str(tmp_path / 'run')]
    assert run_main(argv) == 0
    record = json.load(open(tmp_path / 'run' / 'log.json'))[0]
    assert math.isfinite(record['train_loss']) and 0 <= record['test_accuracy'] <= 1


@pytest.mark.parametrize('flags', [
    ['--optimizer', 'lars', '--base_lr', '0.02', '--use_sam', '--ema_decay', '0.9', '--no_weight_decay_on_bn'],
    ['--optimizer', 'adabound', '--scheduler', 'sgdr', '--T0', '1', '--T_mul', '2'],
    ['--precision', 'bf16', '--subdivision', '2', '--gradient_clip', '1', '--scheduler', 'polynomial'],
    ['--use_cutout', '--use_mixup', '--use_label_smoothing', '--tta', 'flip', '--channels_last'],
    ['--use_random_erasing', '--use_ricap'],
    ['--use_cutmix', '--use_autoaugment', '--data_pipeline', 'workers', '--num_workers', '0'],
    ['--use_dual_cutout', '--dual_cutout_distance', 'logits', '--warmup_epochs', '1',
     '--warmup_method', 'exponential'],
], ids=['lars-sam-ema', 'adabound-sgdr', 'bf16-ghost-clip', 'cutout-mixup-ls', 'erasing-ricap',
        'cutmix-autoaugment-workers', 'dual-cutout'])
def test_optimization_and_regularization_flags_train(flags, cifar10_dir, tmp_path):
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--dataset_dir', cifar10_dir, '--outdir', str(outdir), *flags]) == 0
    log = json.load(open(outdir / 'log.json'))
    assert len(log) == 2 and all(math.isfinite(r['train_loss']) for r in log)
    if '--ema_decay' in flags:
        assert 'ema_test_accuracy' in log[-1] and (outdir / 'model_state_ema.pth').exists()
    if '--use_mixup' in flags:
        assert log[-1]['train_accuracy_kind'] == 'lambda-weighted'


def test_lr_finder_writes_curve(cifar10_dir, tmp_path):
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--dataset_dir', cifar10_dir, '--outdir', str(outdir), '--lr_finder']) == 0
    curve = json.load(open(outdir / 'lr_finder.json'))
    assert len(curve['lrs']) == len(curve['losses']) > 1 and curve['lrs'] == sorted(curve['lrs'])
    from PIL import Image
    assert Image.open(outdir / 'lr_finder.png').size[0] > 100


def test_divergence_stops_with_one_clear_line(cifar10_dir, tmp_path, capsys):
    outdir = tmp_path / 'run'
    code = run_main([*TINY_RUN, '--epochs', '3', '--dataset_dir', cifar10_dir, '--outdir', str(outdir),
                     '--base_lr', '1e30', '--scheduler', 'none'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and 'diverged: non-finite training loss at epoch 1, step ' in err[-1]
    assert 'Traceback' not in '\n'.join(err)


def test_resume_of_a_run_that_died_in_its_first_epoch_starts_over(cifar10_dir, tmp_path, monkeypatch, capsys):
    outdir = tmp_path / 'run'
    run = [*TINY_RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', str(outdir)]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine.Trainer, 'train_one_epoch', crash)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C reaches the caller of main.cli
        run_main(run)
    assert (outdir / 'config.json').exists() and not (outdir / 'checkpoint.pth').exists()
    monkeypatch.undo()
    assert run_main(run) == 2  # a plain rerun still refuses the non-empty directory
    assert run_main([*run, '--resume']) == 0
    assert 'no checkpoint' in capsys.readouterr().err
    assert [r['epoch'] for r in json.load(open(outdir / 'log.json'))] == [1]


def test_airbench_trains_on_one_channel_28x28_images(mnist_dir, tmp_path):
    outdir = tmp_path / 'run'
    assert run_main(['--arch', 'airbench', '--n_channels', '[8,16,16]', '--epochs', '1', '--batch_size', '20',
                     '--device', 'cpu', '--no-tensorboard', '--dataset', 'MNIST', '--dataset_dir', mnist_dir,
                     '--alternating_flip', '--padding_mode', 'reflect', '--random_crop_padding', '2',
                     '--outdir', str(outdir)]) == 0
    record = json.load(open(outdir / 'log.json'))[0]
    assert math.isfinite(record['train_loss']) and 0 <= record['test_accuracy'] <= 1
    state = torch.load(outdir / 'model_state.pth', weights_only=True)
    assert state['whiten.weight'].shape == (8, 1, 2, 2) and state['whiten.weight'].abs().sum() > 0


def test_airbench_dry_run_counts_the_paper_network(cifar10_dir, capsys):
    assert run_main(['--arch', 'airbench', '--device', 'cpu', '--dataset_dir', cifar10_dir, '--dry_run']) == 0
    printed = capsys.readouterr().out
    assert 'airbench: 1,972,792 parameters' in printed and '"batch_size": 2000' in printed


class CheckpointRecorder:
    """utils.save_checkpoint that also keeps what each save held, optionally stopping the run after one."""

    def __init__(self, crash_after_epoch=None):
        self.real_save, self.crash_after_epoch, self.saved = utils.save_checkpoint, crash_after_epoch, {}

    def __call__(self, state, path):
        self.real_save(state, path)
        self.saved[state['epoch']] = {key: value.clone() for key, value in state['model'].items()}
        if state['epoch'] == self.crash_after_epoch:
            raise KeyboardInterrupt


def test_eval_every_evaluates_every_nth_and_the_last_epoch(cifar10_dir, tmp_path):
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--epochs', '3', '--eval_every', '2', '--dataset_dir', cifar10_dir,
                     '--outdir', str(outdir)]) == 0
    log = json.load(open(outdir / 'log.json'))
    assert [r['epoch'] for r in log] == [1, 2, 3]
    assert not any('test' in key for key in log[0]) and math.isfinite(log[0]['train_loss'])
    assert log[0]['epoch_time'] == log[0]['train_time']
    for record in log[1:]:
        assert EPOCH_KEYS <= set(record)
    assert log[1]['best_test_epoch'] == 2
    best = max(log[1:], key=lambda r: r['test_accuracy'])
    assert log[2]['best_test_epoch'] == best['epoch'] and log[2]['best_test_accuracy'] == best['test_accuracy']
    summary = json.load(open(outdir / 'summary.json'))
    assert summary['final_test_accuracy'] == log[2]['test_accuracy'] and summary['epochs'] == 3
    assert (summary['best_test_accuracy'], summary['best_test_epoch']) == (best['test_accuracy'], best['epoch'])


@pytest.mark.parametrize('epochs, saved', [(3, [2, 3]), (4, [2, 4]), (1, [1])])
def test_save_every_writes_every_nth_and_the_last_epoch(epochs, saved, cifar10_dir, tmp_path, monkeypatch):
    recorder = CheckpointRecorder()
    monkeypatch.setattr(utils, 'save_checkpoint', recorder)
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--epochs', str(epochs), '--save_every', '2', '--dataset_dir', cifar10_dir,
                     '--outdir', str(outdir)]) == 0
    assert sorted(recorder.saved) == saved
    checkpoint = torch.load(outdir / 'checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == epochs and len(checkpoint['log']) == epochs
    final = torch.load(outdir / 'model_state.pth', weights_only=True)
    assert all(torch.equal(final[k], checkpoint['model'][k]) for k in final)


def test_resume_between_checkpoints_repeats_the_unsaved_epochs(cifar10_dir, tmp_path):
    """--save_every 2, killed in epoch 4: log.json has 3 epochs, the checkpoint 2; resuming redoes
    epoch 3 and ends where an uninterrupted run does."""
    run = [*TINY_RUN, '--epochs', '4', '--save_every', '2', '--dataset_dir', cifar10_dir]
    assert run_main([*run, '--outdir', str(tmp_path / 'whole')]) == 0
    run_main_interrupted_in_epoch([*run, '--outdir', str(tmp_path / 'crashed')], epoch=4)
    assert len(json.load(open(tmp_path / 'crashed' / 'log.json'))) == 3
    assert torch.load(tmp_path / 'crashed' / 'checkpoint.pth', weights_only=True)['epoch'] == 2
    assert run_main([*run, '--outdir', str(tmp_path / 'crashed'), '--resume']) == 0
    assert _log_without_times(tmp_path / 'crashed') == _log_without_times(tmp_path / 'whole')
    whole = torch.load(tmp_path / 'whole' / 'model_state.pth', weights_only=True)
    resumed = torch.load(tmp_path / 'crashed' / 'model_state.pth', weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


# airbench94_muon's recipe (run_experiments.sh fast_airbench94_muon) at toy size: Muon for the filters,
# SGD with a larger head lr for the rest, whitening bias trained for the first epoch only, alternating
# flip, 2-pixel reflect translation, flip-and-translate TTA, evaluation every second epoch.
AIRBENCH_RECIPE = ['--arch', 'airbench', '--n_channels', '[8,16,16]', '--epochs', '3', '--batch_size', '20',
                   '--device', 'cpu', '--no-tensorboard', '--optimizer', 'muon', '--base_lr', '2',
                   '--weight_decay', '5e-4', '--head_lr_factor', '4', '--momentum', '0.85', '--muon_lr', '0.24',
                   '--scheduler', 'linear', '--whiten_bias_epochs', '1', '--use_label_smoothing',
                   '--label_smoothing_epsilon', '0.2', '--alternating_flip', '--random_crop_padding', '2',
                   '--padding_mode', 'reflect', '--tta', 'flip_translate', '--eval_every', '2']


@pytest.fixture(scope='module')
def airbench_recipe_run(cifar10_dir, tmp_path_factory):
    """An uninterrupted 3-epoch run of the recipe, with the weights of each epoch's checkpoint."""
    outdir = tmp_path_factory.mktemp('airbench') / 'whole'
    recorder = CheckpointRecorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, 'save_checkpoint', recorder)
        code = run_main([*AIRBENCH_RECIPE, '--dataset_dir', cifar10_dir, '--outdir', str(outdir)])
    return code, outdir, recorder.saved


def test_airbench_recipe_trains(airbench_recipe_run, cifar10_dir):
    code, outdir, saved = airbench_recipe_run
    assert code == 0
    log = json.load(open(outdir / 'log.json'))
    assert [r['epoch'] for r in log] == [1, 2, 3] and sorted(saved) == [1, 2, 3]
    losses = [r['train_loss'] for r in log]
    assert all(math.isfinite(loss) for loss in losses) and losses[2] < losses[0] - 0.1
    assert 'test_accuracy' not in log[0] and 0 <= log[1]['test_accuracy'] <= 1 and 0 <= log[2]['test_accuracy'] <= 1
    summary = json.load(open(outdir / 'summary.json'))
    assert summary['final_test_accuracy'] == log[2]['test_accuracy']
    # the whitening filters come from the normalized training images and never train
    images, _ = main.dataloader.load_split(cifar10_dir, 'CIFAR10', train=True)
    info = main.dataloader.DATASETS['CIFAR10']
    whitening = main.models.airbench.PatchWhitening(3)
    whitening.initialize_from_images(main.augmentations.Normalize(info.mean, info.std)(images))
    for state in saved.values():
        assert torch.allclose(state['whiten.weight'], whitening.weight, rtol=1e-4, atol=1e-4)
        for name, value in state.items():
            if name.endswith('.weight') and '.norm' in name:
                assert torch.equal(value, torch.ones_like(value)), name  # BN scales stay frozen at 1
    # --whiten_bias_epochs 1: the bias moves in epoch 1 and stays put after it
    assert saved[1]['whiten.bias'].abs().sum() > 0
    assert torch.equal(saved[1]['whiten.bias'], saved[2]['whiten.bias'])
    assert torch.equal(saved[2]['whiten.bias'], saved[3]['whiten.bias'])
    assert not torch.equal(saved[2]['group1.norm1.bias'], saved[3]['group1.norm1.bias'])
    assert not torch.equal(saved[2]['group1.conv1.weight'], saved[3]['group1.conv1.weight'])
    # the logged test figures are flip-and-translate TTA of the final weights, computed here by hand
    model = main.models.create_model('airbench', n_channels=[8, 16, 16]).eval()
    model.load_state_dict(torch.load(outdir / 'model_state.pth', weights_only=True))
    test_images, test_labels = main.dataloader.load_split(cifar10_dir, 'CIFAR10', train=False)
    test_images = main.augmentations.Normalize(info.mean, info.std)(test_images)
    padded = torch.from_numpy(np.pad(test_images.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode='reflect'))
    with torch.no_grad():
        def flip_pair(x):
            return (model(x) + model(x.flip(3))) / 2
        logits = 0.5 * flip_pair(test_images) + 0.25 * (flip_pair(padded[:, :, :32, :32])
                                                         + flip_pair(padded[:, :, 2:, 2:]))
    assert log[2]['test_loss'] == pytest.approx(F.cross_entropy(logits, test_labels).item(), rel=1e-4)
    assert log[2]['test_accuracy'] == pytest.approx((logits.argmax(1) == test_labels).float().mean().item())


@pytest.mark.parametrize('crash_after_epoch', [1, 2])
def test_airbench_recipe_resumed_after_a_crash_equals_the_uninterrupted_run(crash_after_epoch, airbench_recipe_run,
                                                                              cifar10_dir, tmp_path, monkeypatch):
    """Alternating flip (the epoch's phase), Muon's momentum and the per-group schedules all resume.

    Killed after epoch 2, the resumed epoch 3 flips as epoch 1 did; killed after epoch 1, a loader
    that ignored the epoch would flip epoch 2 as epoch 1, the opposite of the uninterrupted run."""
    code, whole, _ = airbench_recipe_run
    assert code == 0
    run = [*AIRBENCH_RECIPE, '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'crashed')]
    monkeypatch.setattr(utils, 'save_checkpoint', CheckpointRecorder(crash_after_epoch=crash_after_epoch))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C reaches the caller of main.cli
        run_main(run)
    monkeypatch.undo()
    assert len(json.load(open(tmp_path / 'crashed' / 'log.json'))) == crash_after_epoch
    assert run_main([*run, '--resume']) == 0
    assert _log_without_times(tmp_path / 'crashed') == _log_without_times(whole)
    expected = torch.load(whole / 'model_state.pth', weights_only=True)
    resumed = torch.load(tmp_path / 'crashed' / 'model_state.pth', weights_only=True)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_resume_of_a_run_that_died_before_its_first_save_every_checkpoint(cifar10_dir, tmp_path):
    run = [*TINY_RUN, '--epochs', '3', '--save_every', '2', '--dataset_dir', cifar10_dir]
    assert run_main([*run, '--outdir', str(tmp_path / 'whole')]) == 0
    run_main_interrupted_in_epoch([*run, '--outdir', str(tmp_path / 'crashed')], epoch=2)
    assert (tmp_path / 'crashed' / 'log.json').exists() and not (tmp_path / 'crashed' / 'checkpoint.pth').exists()
    assert run_main([*run, '--outdir', str(tmp_path / 'crashed'), '--resume']) == 0
    assert _log_without_times(tmp_path / 'crashed') == _log_without_times(tmp_path / 'whole')


def _steps_taken(outdir):
    checkpoint = torch.load(os.path.join(outdir, 'checkpoint.pth'), weights_only=True)
    return checkpoint['scheduler']['last_epoch']


def test_fractional_epochs_stop_inside_the_last_epoch(cifar10_dir, tmp_path):
    """10 steps per epoch (200 images, batch 20): 2.5 epochs are 25 steps in 3 logged epochs."""
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--epochs', '2.5', '--scheduler', 'linear', '--dataset_dir', cifar10_dir,
                     '--outdir', str(outdir)]) == 0
    log = json.load(open(outdir / 'log.json'))
    assert [r['epoch'] for r in log] == [1, 2, 3]
    assert _steps_taken(outdir) == 25
    assert log[-1]['lr'] == pytest.approx(0.1 * (1 - 20 / 25))  # the lr at the last epoch's first step
    assert 'test_accuracy' in log[-1] and json.load(open(outdir / 'summary.json'))['epochs'] == 3


def test_total_steps_overrides_epochs(cifar10_dir, tmp_path):
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--total_steps', '13', '--scheduler', 'cosine', '--dataset_dir', cifar10_dir,
                     '--outdir', str(outdir)]) == 0
    assert [r['epoch'] for r in json.load(open(outdir / 'log.json'))] == [1, 2]
    assert _steps_taken(outdir) == 13


def test_lookahead_and_ema_every_resume_like_an_uninterrupted_run(cifar10_dir, tmp_path):
    run = [*TINY_RUN, '--epochs', '2.5', '--scheduler', 'linear', '--lookahead_every', '3',
           '--ema_decay', '0.9', '--ema_every', '2', '--dataset_dir', cifar10_dir]
    assert run_main([*run, '--outdir', str(tmp_path / 'whole')]) == 0
    run_main_interrupted_in_epoch([*run, '--outdir', str(tmp_path / 'crashed')], epoch=3)
    assert run_main([*run, '--outdir', str(tmp_path / 'crashed'), '--resume']) == 0
    assert _log_without_times(tmp_path / 'crashed') == _log_without_times(tmp_path / 'whole')
    for name in ('model_state.pth', 'model_state_ema.pth'):
        expected = torch.load(tmp_path / 'whole' / name, weights_only=True)
        resumed = torch.load(tmp_path / 'crashed' / name, weights_only=True)
        assert all(torch.equal(expected[k], resumed[k]) for k in expected), name


def test_fast_airbench94_recipe_runs_with_lookahead(cifar10_dir, tmp_path):
    """The fast_airbench94 line of run_experiments.sh, shrunk to the tiny data: fractional epochs,
    lookahead, warmup then linear decay to 0.07x, BN-bias lr x64, the legacy head."""
    import re
    text = open(os.path.join(ROOT, 'run_experiments.sh')).read()
    recipe = re.search(r'^FAST_AIRBENCH94=\((.*?)\)', text, re.S | re.M).group(1).split()
    outdir = tmp_path / 'run'
    assert run_main([*recipe, '--device', 'cpu', '--precision', 'fp32', '--channels_last', 'false', '--compile',
                     'false', '--n_channels', '[8,16,16]', '--batch_size', '20', '--test_batch_size', '40',
                     '--epochs', '2.5', '--warmup_epochs', '0.5', '--whiten_bias_epochs', '1',
                     '--dataset_dir', cifar10_dir, '--outdir', str(outdir)]) == 0
    log = json.load(open(outdir / 'log.json'))
    assert [r['epoch'] for r in log] == [1, 2, 3] and _steps_taken(outdir) == 25
    assert math.isfinite(log[-1]['train_loss']) and 'test_accuracy' in log[-1]
    config = json.load(open(outdir / 'config.json'))['settings']
    assert config['lookahead_every'] == 5 and config['head_scale'] == pytest.approx(1 / 9)


def test_a_run_restores_the_signal_handlers_it_installed(cifar10_dir, tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert run_main([*TINY_RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'run')]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_ctrl_c_stops_a_test_suite_that_runs_main_in_process(cifar10_dir, tmp_path):
    """SIGINT during an in-process run (as a terminal's Ctrl-C reaches pytest): the run checkpoints, then
    KeyboardInterrupt reaches pytest, which stops: the next test does not run."""
    marker = tmp_path / 'second_test_ran'
    test_file = tmp_path / 'test_interrupted.py'
    test_file.write_text(
        'import os, sys\n'
        f'sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]\n'
        'from conftest import TINY_RUN, run_main\n\n\n'
        'def test_training_run():\n'
        "    os.environ['TOOLKIT_TEST_KILL_AT'] = 'step:3:INT'\n"
        f"    run_main([*TINY_RUN, '--epochs', '3', '--dataset_dir', {cifar10_dir!r}, '--outdir', "
        f"{str(tmp_path / 'run')!r}])\n\n\n"
        'def test_after():\n'
        f'    open({str(marker)!r}, "w").close()\n')
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '--rootdir',
                             str(tmp_path), str(test_file)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:]  # pytest's exit status for an interrupted session
    assert 'KeyboardInterrupt' in result.stdout and not marker.exists()
    assert 'stopped by SIGINT in epoch 1 after step 3' in result.stderr + result.stdout
    assert (tmp_path / 'run' / 'checkpoint.pth').exists()


def test_dry_run_downloads_nothing(tmp_path, capsys, monkeypatch):
    """--dry_run writes nothing, a dataset included: a missing one is the one-line error, not a download."""
    monkeypatch.delenv('CIFAR_TOOLKIT_OFFLINE')
    monkeypatch.setattr(dataloader, '_download', lambda *args: pytest.fail('--dry_run downloaded'))
    assert run_main(['--dry_run', '--dataset_dir', str(tmp_path / 'nothing')]) == 2
    assert '--dry_run' in capsys.readouterr().err and not (tmp_path / 'nothing').exists()
    assert run_main(['--dry_run', '--download', '--dataset_dir', str(tmp_path / 'nothing')]) == 2
    assert '--download with --dry_run' in capsys.readouterr().err


def test_evaluate_reads_the_dataset_folder_the_run_saved(cifar10_dir, tmp_path, capsys, monkeypatch):
    """--evaluate without --dataset_dir takes the saved run's, not the default folder (and downloads nothing)."""
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', str(outdir)]) == 0
    capsys.readouterr()
    monkeypatch.setenv('HOME', str(tmp_path / 'empty_home'))
    assert run_main(['--evaluate', str(outdir / 'model_state.pth'), '--device', 'cpu']) == 0
    assert 'test accuracy' in capsys.readouterr().out
    assert not (tmp_path / 'empty_home' / '.torchvision').exists()


def _run_script(argv, cache, *python_flags):
    return subprocess.run([sys.executable, *python_flags, os.path.join(ROOT, 'main.py'), *argv],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'XDG_CACHE_HOME': str(cache)})


def test_help_a_typo_a_bad_value_and_the_arch_list_answer_without_importing_torch(tmp_path):
    """Reading the command line (and the whole --list_archs) needs no torch once the cache holds the parser
    (the first run writes it)."""
    cache = tmp_path / 'cache'
    first = _run_script(['--help'], cache)
    assert first.returncode == 0 and '--use_cutout' in first.stdout
    listed = _run_script(['--list_archs', '--dataset', 'MNIST'], cache)
    assert listed.returncode == 0 and listed.stdout.startswith('MNIST: 1x28x28 images')
    assert listed.stdout.count(' parameters, ') == len(main.models.list_models())
    for argv, status, answer in [(['--help'], 0, first.stdout),
                                 (['--list_archs', '--dataset', 'MNIST'], 0, listed.stdout),
                                 (['--use_cutot'], 2, 'main.py: error: unrecognized arguments: --use_cutot '
                                                      '(did you mean --use_cutout?)\n'),
                                 (['--epochs', '0'], 2, 'main.py: error: --epochs 0: expected a number > 0\n'),
                                 (['--arch', 'resnet56'], 2, 'main.py: error: --arch resnet56: expected one of the '
                                                             'archs that --list_archs prints; did you mean resnet '
                                                             '--depth 56?\n')]:
        result = _run_script(argv, cache, '-X', 'importtime')
        imported = {line.rsplit('|', 1)[-1].strip() for line in result.stderr.splitlines() if 'import time:' in line}
        assert result.returncode == status, result.stderr
        assert (result.stdout if status == 0 else result.stderr.splitlines(keepends=True)[-1]) == answer
        assert 'torch' not in imported and 'numpy' not in imported, argv


def _help_defaults(help_text):
    """{flag: the default its help entry shows} of a --help text."""
    entries, flag = {}, None
    for line in help_text.splitlines():
        if line.startswith('  -'):
            flag = line.split()[0]
            entries[flag] = ''
        if flag:
            entries[flag] += ' ' + line.strip()
    return {flag: text.rsplit('(default: ', 1)[-1].rstrip(')') for flag, text in entries.items() if '(default: ' in text}


def test_help_shows_the_defaults_of_the_arch_given(capsys):
    for argv, shown in [(['--help'], {'--arch': 'resnet_preact', '--depth': '110', '--epochs': '160'}),
                        (['--arch', 'wrn', '--help'], {'--arch': 'wrn', '--depth': '28', '--widening_factor': '10',
                                                       '--epochs': '200', '--lr_decay': '0.2'}),
                        (['--arch=densenet', '-h'], {'--depth': '100', '--growth_rate': '12'})]:
        with pytest.raises(SystemExit) as exit_status:
            main.parse_args(argv)
        defaults = _help_defaults(capsys.readouterr().out)
        assert exit_status.value.code == 0
        assert {flag: defaults.get(flag) for flag in shown} == shown, argv


def test_other_tools_flag_names_and_spellings(tmp_path):
    args = main.parse_args(['--lr', '0.3', '--batch-size', '64', '--model', 'wrn', '--no_download',
                            '--output_dir', str(tmp_path / 'out')])
    assert (args.base_lr, args.batch_size, args.arch, args.download, args.outdir) == \
        (0.3, 64, 'wrn', False, str(tmp_path / 'out'))
    assert 'base_lr' in args.explicit and 'arch' in args.explicit
