"""main.py's model-facing parts (tests/test_models.py tests the models themselves): the model flags
main.py generates from the registry, the archs' training defaults as main.py settings, --list_archs and
its costs, --init, --teacher (distillation), --predict, the augmentation policies' flags, ShakeDrop and
ResNet-9's options through the command line.
"""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import augmentations
import dataloader
import engine
import main
import models
import runs
from conftest import TINY_RUN, build_trainer, run_main, write_image_folder
from models.pyramidnet import ShakeDrop

CIFAR10 = dataloader.DATASETS['CIFAR10']
ARCHS = models.list_models()


@pytest.fixture(scope='module')
def trained_run(cifar10_dir, tmp_path_factory):
    """A finished tiny run (resnet-8, width 4): its folder holds config.json, model_state.pth, checkpoint.pth."""
    outdir = str(tmp_path_factory.mktemp('teacher') / 'run')
    assert run_main([*TINY_RUN, '--dataset_dir', cifar10_dir, '--outdir', outdir]) == 0
    return outdir


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- model flags and training defaults

@pytest.mark.parametrize('arch', ARCHS)
def test_training_defaults_are_main_py_settings(arch):
    import main
    settings = {action.dest for action in main.get_args_parser()._actions}
    unknown = set(models.train_defaults(arch)) - settings
    assert not unknown, f'{arch}: training defaults that are not main.py settings: {sorted(unknown)}'


# The model flags main.py had before they were generated: type, choices and help text stay the same.
HAND_WRITTEN_FLAGS = {
    'depth': ('int', None, 'number of layers'),
    'base_channels': ('int', None, 'channels of the first stage'),
    'block_type': ('str', ('basic', 'bottleneck'), None),
    'n_channels': ('list', None, "vgg: channels per stage, e.g. '[64,128,256,512,512]'"),
    'n_layers': ('list', None, "vgg: conv layers per stage, e.g. '[2,2,3,3,3]'"),
    'use_bn': ('bool', None, 'vgg: batch norm after each conv'),
    'remove_first_relu': ('bool', None, 'resnet_preact'),
    'add_last_bn': ('bool', None, 'resnet_preact'),
    'preact_stage': ('list', None, "resnet_preact, e.g. '[true,false,false]'"),
    'widening_factor': ('int', None, 'wrn, resnet_preact'),
    'drop_rate': ('float', None, 'dropout (wrn, densenet)'),
    'growth_rate': ('int', None, 'densenet k'),
    'compression_rate': ('float', None, 'densenet-BC transition compression'),
    'memory_efficient': ('bool', None, 'densenet: recompute concatenations in backward (less memory)'),
    'pyramid_alpha': ('int', None, 'pyramidnet widening'),
    'cardinality': ('int', None, 'resnext groups'),
    'shake_forward': ('bool', None, 'shake_shake: random alpha'),
    'shake_backward': ('bool', None, 'shake_shake: random beta'),
    'shake_image': ('bool', None, 'shake_shake: per image (true) or per batch'),
    'se_reduction': ('int', None, 'squeeze-and-excitation reduction ratio'),
    'activation': ('str', ('relu', 'celu'), "resnet9: activation (celu: Page's final recipe)"),
    'celu_alpha': ('float', None, 'resnet9 with --activation celu: CELU alpha (0.3)'),
    'ghost_bn_splits': ('int', None, None),
    'head_scale': ('float', None, None),
}


def model_actions():
    import main
    return {action.dest: action for action in main.get_args_parser()._actions
            if action.dest in models.model_flag_names()}


def test_every_builder_argument_is_a_flag():
    actions = model_actions()
    for arch in ARCHS:
        assert set(models.model_params(arch)) <= set(actions), arch
    assert set(models.model_flag_names()) == set(models.model_flags())


@pytest.mark.parametrize('flag', sorted(HAND_WRITTEN_FLAGS))
def test_existing_flags_keep_type_choices_and_help(flag):
    kind, choices, help_text = HAND_WRITTEN_FLAGS[flag]
    spec = models.model_flags()[flag]
    assert spec.kind == kind
    assert spec.choices == choices
    if help_text is not None:
        assert spec.help == help_text
    action = model_actions()[flag]
    assert action.help == spec.help and action.default is None
    assert tuple(action.choices) == choices if choices else action.choices is None


def test_generated_flags_parse_like_the_hand_written_ones():
    import main
    args = main.parse_args(['--outdir', 'x', '--arch', 'vgg', '--n_channels', '[64,128]', '--n_layers', '[1,2]',
                            '--use_bn', 'false'])
    assert (args.n_channels, args.n_layers, args.use_bn) == ([64, 128], [1, 2], False)
    args = main.parse_args(['--outdir', 'x', '--arch', 'shake_shake', '--shake_image'])
    # the flags not given take shake_shake's builder defaults (config.json shows what the model is built with)
    params = models.model_params('shake_shake')
    assert args.shake_image is True and (args.shake_forward, args.depth) == (params['shake_forward'], params['depth'])
    assert args.growth_rate is None  # a flag of another arch
    args = main.parse_args(['--outdir', 'x', '--arch', 'swin_t', '--n_blocks', '[2,2,2,2]', '--drop_path_rate',
                            '0.1', '--window_size', '4'])
    assert (args.n_blocks, args.drop_path_rate, args.window_size) == ([2, 2, 2, 2], 0.1, 4)
    assert models.model_kwargs(args)['n_blocks'] == [2, 2, 2, 2]
    with pytest.raises(main.UsageError, match='--depth deep: expected an integer >= 1'):
        main.parse_args(['--outdir', 'x', '--depth', 'deep'])
    with pytest.raises(main.UsageError, match='--block_type wide: expected one of basic, bottleneck'):
        main.parse_args(['--outdir', 'x', '--block_type', 'wide'])


# ----------------------------------------------------------------------------- ShakeDrop and ResNet-9 through main.py

def shakedrop_modules(model):
    return [module for module in model.modules() if isinstance(module, ShakeDrop)]


def test_shakedrop_flags_reach_pyramidnet_only(capsys):
    args = main.parse_args(['--arch', 'pyramidnet', '--depth', '20', '--block_type', 'basic',
                            '--use_shakedrop', '--shakedrop_survival', '0.6', '--outdir', 'x'])
    model = engine.build_model(args, CIFAR10, torch.device('cpu'))
    assert shakedrop_modules(model)[-1].survival == pytest.approx(0.6)
    assert run_main(['--list_archs', '--arch', 'resnet', '--use_shakedrop']) == 2
    assert '--use_shakedrop does not apply to --arch resnet' in one_line_error(capsys)


def test_resnet9_final_options_train_one_epoch(cifar10_dir, tmp_path):
    argv = ['--arch', 'resnet9', '--base_channels', '4', '--activation', 'celu', '--ghost_bn_splits', '2',
            '--batch_size', '20', '--padding_mode', 'reflect', '--use_cutout', '--cutout_inside', '--cutout_size', '8',
            '--epochs', '1', '--device', 'cpu', '--no-tensorboard', '--dataset_dir', cifar10_dir,
            '--outdir', str(tmp_path / 'run')]
    assert run_main(argv) == 0
    record = json.load(open(tmp_path / 'run' / 'log.json'))[0]
    assert math.isfinite(record['train_loss']) and 0 <= record['test_accuracy'] <= 1
    settings = json.load(open(tmp_path / 'run' / 'config.json'))['settings']
    assert (settings['activation'], settings['ghost_bn_splits'], settings['padding_mode']) == ('celu', 2, 'reflect')


# ----------------------------------------------------------------------------- knowledge distillation

def test_trainer_mixes_distillation_and_hard_target_loss(trained_run, cifar10_dir):
    teacher_path = os.path.join(trained_run, 'model_state.pth')
    args = main.parse_args(['--arch', 'resnet_preact', '--depth', '8', '--base_channels', '4', '--outdir', 'x',
                            '--dataset_dir', cifar10_dir, '--teacher', teacher_path, '--kd_alpha', '0.7',
                            '--kd_temperature', '3', '--scheduler', 'none'])
    torch.manual_seed(0)
    student = engine.build_model(args, CIFAR10, torch.device('cpu'))
    teacher = runs.load_teacher(args.teacher, args.dataset, args.channels_last, CIFAR10, torch.device('cpu'))
    trainer = build_trainer(student, args, teacher=teacher, scheduler='none', epochs=1, steps_per_epoch=10)
    teacher = trainer.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    reference = models.create_model('resnet', depth=8, base_channels=4)
    reference.load_state_dict(torch.load(teacher_path, weights_only=True))
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6)
    targets = augmentations.one_hot(labels, 10)
    logits, loss = trainer.forward_loss(images, targets)
    teacher_logits = reference.eval()(images)
    expected = (0.7 * augmentations.distillation_loss(logits, teacher_logits, 3.0)
                + 0.3 * F.cross_entropy(logits, labels))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_runs_under_the_students_bf16_autocast(trained_run, monkeypatch):
    args = main.parse_args(['--arch', 'resnet', '--depth', '8', '--base_channels', '4', '--outdir', 'x',
                            '--teacher', os.path.join(trained_run, 'model_state.pth'), '--precision', 'bf16'])
    student = engine.build_model(args, CIFAR10, torch.device('cpu'))
    teacher = runs.load_teacher(args.teacher, args.dataset, args.channels_last, CIFAR10, torch.device('cpu'))
    trainer = build_trainer(student, args, teacher=teacher, scheduler='none', epochs=1, steps_per_epoch=10)
    seen = []
    monkeypatch.setattr(augmentations, 'distillation_loss',
                        lambda s, t, temperature: seen.append((s.dtype, t.dtype)) or (s - t).square().mean())
    logits, loss = trainer.forward_loss(torch.randn(4, 3, 32, 32), augmentations.one_hot(torch.arange(4), 10))
    assert torch.isfinite(loss) and seen == [(torch.float32, torch.float32)]
    # the teacher's own output under that autocast is bf16 before the loss takes it in float32
    with trainer.autocast():
        assert trainer.teacher(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16


def test_run_with_a_teacher_of_another_arch(trained_run, cifar10_dir, tmp_path):
    student = ['--arch', 'vgg', '--n_channels', '[4,8,8,16,16]', '--epochs', '1', '--batch_size', '20',
               '--device', 'cpu', '--no-tensorboard', '--scheduler', 'none', '--dataset_dir', cifar10_dir]
    for name, teacher in (('plain', []), ('kd', ['--teacher', os.path.join(trained_run, 'checkpoint.pth')])):
        assert run_main([*student, *teacher, '--outdir', str(tmp_path / name)]) == 0
    logs = {name: json.load(open(tmp_path / name / 'log.json')) for name in ('plain', 'kd')}
    config = json.load(open(tmp_path / 'kd' / 'config.json'))['settings']
    assert config['teacher'].endswith('checkpoint.pth') and config['kd_temperature'] == 4.0
    assert math.isfinite(logs['kd'][0]['train_loss'])
    # same seed, same data order: only the teacher's term changes the loss
    assert logs['kd'][0]['train_loss'] != logs['plain'][0]['train_loss']


def test_teacher_bad_input(trained_run, cifar10_dir, tmp_path, capsys):
    run = [*TINY_RUN, '--dataset_dir', cifar10_dir]
    assert run_main([*run, '--outdir', str(tmp_path / 'a'), '--teacher', str(tmp_path / 'missing.pth')]) == 2
    assert 'missing.pth: no such file' in one_line_error(capsys)
    lone = tmp_path / 'lone'
    lone.mkdir()
    state = torch.load(os.path.join(trained_run, 'model_state.pth'), weights_only=True)
    torch.save(state, lone / 'model_state.pth')
    assert run_main([*run, '--outdir', str(tmp_path / 'b'), '--teacher', str(lone / 'model_state.pth')]) == 2
    assert 'no config.json' in one_line_error(capsys)
    assert run_main([*run, '--outdir', str(tmp_path / 'c'), '--teacher', str(lone / 'model_state.pth'),
                     '--kd_alpha', '1.5']) == 2
    assert '--kd_alpha' in one_line_error(capsys)


# ----------------------------------------------------------------------------- --init

def test_init_flag_reaches_the_built_model(capsys):
    torch.manual_seed(0)
    args = main.parse_args(['--arch', 'resnet', '--depth', '20', '--init', 'xavier', '--outdir', 'x'])
    model = engine.build_model(args, CIFAR10, torch.device('cpu'))
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    bound = math.sqrt(6 / (fc.in_features + fc.out_features))
    assert fc.weight.abs().max().item() <= bound and fc.weight.abs().max().item() > 0.8 * bound
    assert run_main(['--init', 'he', '--dry_run']) == 2
    assert '--init' in one_line_error(capsys)


# ----------------------------------------------------------------------------- augmentation policies through main.py

@pytest.mark.parametrize('pipeline, policy', [('device', ['--use_randaugment']),
                                              ('device', ['--use_augmix', '--policy_group_size', '4']),
                                              ('workers', ['--use_trivialaugment']),
                                              ('workers', ['--use_autoaugment', '--autoaugment_policy', 'svhn'])])
def test_policies_train_in_both_pipelines(pipeline, policy, cifar10_dir, tmp_path):
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', str(outdir),
                     '--data_pipeline', pipeline, '--num_workers', '0', *policy]) == 0
    assert len(json.load(open(outdir / 'log.json'))) == 1


def test_user_policy_replaces_the_transformers_default():
    assert main.parse_args(['--arch', 'vit', '--outdir', 'x']).use_randaugment
    args = main.parse_args(['--arch', 'vit', '--use_trivialaugment', '--outdir', 'x'])
    assert args.use_trivialaugment and not args.use_randaugment
    assert augmentations.build_policy(**augmentations.policy_kwargs(args)).name == 'trivialaugment'


@pytest.mark.parametrize('extra, message', [
    (['--use_autoaugment', '--use_augmix'], 'cannot be combined'),
    (['--use_randaugment', '--randaugment_magnitude', '31'], '--randaugment_magnitude'),
    (['--use_augmix', '--augmix_severity', '0'], '--augmix_severity'),
    (['--use_trivialaugment', '--policy_group_size', '0'], '--policy_group_size'),
    (['--autoaugment_policy', 'mnist'], '--autoaugment_policy'),
])
def test_policy_bad_flags_are_one_line(extra, message, capsys):
    assert run_main(['--dry_run', *extra]) == 2
    assert message in one_line_error(capsys)


# ----------------------------------------------------------------------------- --list_archs

def test_list_archs_prints_parameters_and_multiply_adds(capsys):
    assert run_main(['--list_archs', '--arch', 'resnet', '--depth', '110']) == 0
    out = capsys.readouterr().out
    assert re.search(r'^resnet: 1\.73 M parameters, 253\.\d M multiply-adds$', out, re.M), out
    assert '--depth 110' in out
    assert run_main(['--list_archs']) == 0
    out = capsys.readouterr().out
    listed = re.findall(r'^(\w+): [\d.]+ M parameters, [\d.]+ M multiply-adds$', out, re.M)
    assert listed == models.list_models()
    assert run_main(['--list_archs', '--arch', 'nope']) == 2
    assert 'nope' in one_line_error(capsys)


# ----------------------------------------------------------------------------- --predict

def write_png(path, pixels):
    from PIL import Image
    Image.fromarray(pixels).save(path)
    return str(path)


def test_predict_prints_topk_classes_with_the_models_probabilities(trained_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    images = [write_png(tmp_path / 'a.png', pixels),
              write_png(tmp_path / 'b.jpg', rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)),
              write_png(tmp_path / 'gray.png', rng.integers(0, 256, (32, 32), dtype=np.uint8))]
    weights = os.path.join(trained_run, 'model_state.pth')
    assert run_main(['--predict', *images, '--weights', weights, '--topk', '3', '--device', 'cpu']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and [line.split(': ')[0] for line in lines] == images
    ranked = re.findall(r'(\S+) (0\.\d{3}|1\.000)', lines[0].split(': ', 1)[1])
    assert len(ranked) == 3
    probabilities = [float(p) for _, p in ranked]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.001
    # the same numbers by hand: the model on the normalized image; the class names of the
    # dataset's batches.meta (the test fixture names its classes '0'..'9')
    model = models.create_model('resnet', depth=8, base_channels=4)
    model.load_state_dict(torch.load(weights, weights_only=True))
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(CIFAR10.mean)[:, None, None]) / torch.tensor(CIFAR10.std)[:, None, None]
    expected = model.eval()(x[None]).softmax(1)[0].topk(3)
    assert [name for name, _ in ranked] == [str(i) for i in expected.indices.tolist()]
    assert probabilities == pytest.approx(expected.values.tolist(), abs=1e-3)


def test_predict_names_an_image_folders_classes_and_list_archs_its_size(tmp_path, capsys):
    root = write_image_folder(str(tmp_path / 'folder'), size=24)
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--epochs', '1', '--dataset', 'ImageFolder', '--dataset_dir', root,
                     '--outdir', str(outdir), '--num_workers', '0']) == 0
    capsys.readouterr()
    image = write_png(tmp_path / 'x.png', np.full((50, 30, 3), 128, dtype=np.uint8))
    assert run_main(['--predict', image, '--weights', str(outdir / 'model_state.pth'), '--device', 'cpu']) == 0
    line = capsys.readouterr().out.strip()
    assert sorted(re.findall(r'(cat|dog|frog) [01]\.\d{3}', line)) == ['cat', 'dog', 'frog'], line
    assert run_main(['--list_archs', '--arch', 'resnet', '--depth', '20', '--dataset', 'ImageFolder',
                     '--dataset_dir', root]) == 0
    out = capsys.readouterr().out
    assert 'ImageFolder: 3x24x24 images, 3 classes' in out
    _, macs_24 = models.model_cost('resnet', dataloader.DatasetInfo('', 3, 24, 3, (), (), True), depth=20)
    assert f'{macs_24 / 1e6:.1f} M multiply-adds' in out


def test_predict_bad_input_is_one_line(trained_run, tmp_path, capsys):
    image = write_png(tmp_path / 'a.png', np.zeros((32, 32, 3), dtype=np.uint8))
    weights = os.path.join(trained_run, 'model_state.pth')
    cases = [(['--predict', image], 'needs --weights'),
             (['--predict', image, '--weights', str(tmp_path / 'none.pth')], 'no such file'),
             (['--predict', str(tmp_path / 'absent.png'), '--weights', weights], 'cannot read the image'),
             (['--predict', image, '--weights', weights, '--topk', '0'], '--topk'),
             (['--predict', image, '--weights', weights, '--arch', 'resnet_preact'], 'they do not fit')]
    for argv, message in cases:
        assert run_main([*argv, '--device', 'cpu']) == 2, argv
        assert message in one_line_error(capsys)


@pytest.mark.parametrize('argv, message', [
    (['--randaugment_ops', '3'], '--randaugment_ops 3: applies only with --use_randaugment'),
    (['--use_trivialaugment', '--augmix_severity', '5'], '--augmix_severity 5: applies only with --use_augmix'),
    (['--autoaugment_policy', 'svhn'], '--autoaugment_policy svhn: applies only with --use_autoaugment'),
    (['--policy_group_size', '4'], '--policy_group_size 4: applies only with --use_autoaugment or'),
    (['--kd_alpha', '0.5'], '--kd_alpha 0.5: applies only with --teacher'),
])
def test_an_option_without_its_switch_is_refused(argv, message, tmp_path, capsys):
    assert run_main(['--device', 'cpu', '--outdir', str(tmp_path / 'run'), *argv]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / 'run').exists()


def test_policy_options_follow_the_transformers_default_randaugment():
    import main
    args = main.parse_args(['--arch', 'vit', '--randaugment_magnitude', '5', '--outdir', 'x'])
    assert args.use_randaugment and args.randaugment_magnitude == 5
    args = main.parse_args(['--use_autoaugment', '--autoaugment_policy', 'svhn', '--policy_group_size', '1',
                            '--outdir', 'x'])
    assert (args.autoaugment_policy, args.policy_group_size) == ('svhn', 1)
