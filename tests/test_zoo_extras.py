"""Issue 14, items 4-6: ShakeDrop, knowledge distillation, --init, the augmentation policies,
--list_archs with parameters and multiply-adds, and --predict."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

import augmentations
import dataloader
import main
import models
from conftest import TINY_RUN, run_main, write_image_folder
from models.common import reinitialize
from models.pyramidnet import ShakeDrop, linear_survival_probabilities

CIFAR10 = dataloader.DATASETS['CIFAR10']


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


# ----------------------------------------------------------------------------- ShakeDrop

def shakedrop_modules(model):
    return [module for module in model.modules() if isinstance(module, ShakeDrop)]


@pytest.mark.parametrize('final, block_type, depth', [(0.5, 'basic', 20), (0.8, 'bottleneck', 20)])
def test_shakedrop_survival_decays_linearly_to_the_last_block(final, block_type, depth):
    flags = {} if final == 0.5 else dict(shakedrop_survival=final)
    model = models.create_model('pyramidnet', depth=depth, block_type=block_type, pyramid_alpha=12,
                                use_shakedrop=True, **flags)
    survival = [module.survival for module in shakedrop_modules(model)]
    n_blocks = len(survival)
    assert n_blocks == 3 * ((depth - 2) // (6 if block_type == 'basic' else 9))
    # p_l = 1 - l / L (1 - p_L), l = 1..L (arXiv 1802.02375, section 4.1)
    assert survival == pytest.approx([1 - (l / n_blocks) * (1 - final) for l in range(1, n_blocks + 1)])
    assert survival[-1] == pytest.approx(final)
    assert linear_survival_probabilities(0.5, 2) == pytest.approx([0.75, 0.5])


def test_shakedrop_adds_no_parameters_and_is_off_by_default():
    plain = models.create_model('pyramidnet', depth=20, block_type='basic', pyramid_alpha=12)
    shaken = models.create_model('pyramidnet', depth=20, block_type='basic', pyramid_alpha=12, use_shakedrop=True)
    assert not shakedrop_modules(plain)
    assert plain.state_dict().keys() == shaken.state_dict().keys()
    assert shaken(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_shakedrop_at_eval_is_its_expectation_in_training():
    torch.manual_seed(0)
    shakedrop = ShakeDrop(0.7)
    x = torch.randn(4, 3, 5, 5)
    assert torch.allclose(shakedrop.eval()(x), 0.7 * x)
    shakedrop.train()
    draws = torch.stack([shakedrop(x) for _ in range(4000)])
    # E[b + alpha - b alpha] = p + (1 - p) E[alpha] = p for alpha uniform in [-1, 1]
    ratio = (draws / x).mean()
    assert ratio.item() == pytest.approx(0.7, abs=0.03)
    # per forward pass one gate: the draws that kept the branch are x exactly, the others are not
    kept = (draws == x).flatten(1).all(1)
    assert 0.6 < kept.float().mean().item() < 0.8
    assert not torch.isclose(draws[~kept], x.expand_as(draws)[~kept]).all()
    # other alpha range: expectation p + (1 - p)(low + high) / 2
    assert torch.allclose(ShakeDrop(0.5, alpha_range=(0, 1)).eval()(x), 0.75 * x)


def test_shakedrop_dropped_branch_scales_forward_by_alpha_and_backward_by_independent_beta():
    torch.manual_seed(0)
    x = torch.rand(2000).add_(0.5).requires_grad_()
    y = ShakeDrop(0.0)(x)  # never survives: forward alpha x, backward beta grad
    y.sum().backward()
    alpha, beta = (y / x).detach(), x.grad
    assert alpha.min() < -0.9 and alpha.max() > 0.9 and (alpha >= -1).all() and (alpha <= 1).all()
    assert beta.min() < 0.05 and beta.max() > 0.95 and (beta >= 0).all() and (beta <= 1).all()
    assert abs(np.corrcoef(alpha.numpy(), beta.numpy())[0, 1]) < 0.1
    x.grad = None
    ShakeDrop(1.0)(x).sum().backward()  # always survives: identity both ways
    assert torch.equal(x.grad, torch.ones_like(x))


def test_shakedrop_pyramidnet_trains_randomly_and_evaluates_deterministically():
    torch.manual_seed(0)
    model = models.create_model('pyramidnet', depth=11, block_type='bottleneck', pyramid_alpha=12,
                                use_shakedrop=True, shakedrop_survival=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    out = model(x)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    outputs = [model(x) for _ in range(3)]
    assert not all(torch.allclose(outputs[0], o) for o in outputs[1:])
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize('flags, message', [
    (dict(shakedrop_survival=0.5), 'needs --use_shakedrop'),
    (dict(use_shakedrop=True, shakedrop_survival=1.5), '--shakedrop_survival'),
])
def test_shakedrop_bad_flags(flags, message):
    with pytest.raises(models.ModelConfigError, match=message):
        models.create_model('pyramidnet', depth=20, block_type='basic', **flags)


def test_shakedrop_flags_reach_pyramidnet_only(capsys):
    args = main.parse_args(['--arch', 'pyramidnet', '--depth', '20', '--block_type', 'basic',
                            '--use_shakedrop', '--shakedrop_survival', '0.6', '--outdir', 'x'])
    model = main.build_model(args, CIFAR10, torch.device('cpu'))
    assert shakedrop_modules(model)[-1].survival == pytest.approx(0.6)
    assert run_main(['--list_archs', '--arch', 'resnet', '--use_shakedrop']) == 2
    assert '--use_shakedrop does not apply to --arch resnet' in one_line_error(capsys)


# ----------------------------------------------------------------------------- knowledge distillation

def test_distillation_loss_matches_the_closed_form():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 1.5, -0.5], [2.0, -1.0, 0.5]])
    temperature = 4.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = sum(math.exp(v / temperature) for v in s_row)
        zt = sum(math.exp(v / temperature) for v in t_row)
        for s, t in zip(s_row, t_row):
            p_t, p_s = math.exp(t / temperature) / zt, math.exp(s / temperature) / zs
            expected += p_t * math.log(p_t / p_s)
    expected = temperature ** 2 * expected / len(student)
    student.requires_grad_()
    loss = augmentations.distillation_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # its gradient: T (softmax(s / T) - softmax(t / T)) / B (Hinton et al., eq. 2 times T^2)
    loss.backward()
    closed_form = temperature * (F.softmax(student / temperature, 1) - F.softmax(teacher / temperature, 1)) / 2
    assert torch.allclose(student.grad, closed_form.detach(), atol=1e-6)
    assert augmentations.distillation_loss(teacher, teacher, temperature).item() == pytest.approx(0, abs=1e-6)


def test_trainer_mixes_distillation_and_hard_target_loss(trained_run, cifar10_dir):
    teacher_path = os.path.join(trained_run, 'model_state.pth')
    args = main.parse_args(['--arch', 'resnet_preact', '--depth', '8', '--base_channels', '4', '--outdir', 'x',
                            '--dataset_dir', cifar10_dir, '--teacher', teacher_path, '--kd_alpha', '0.7',
                            '--kd_temperature', '3', '--scheduler', 'none'])
    torch.manual_seed(0)
    student = main.build_model(args, CIFAR10, torch.device('cpu'))
    optimizer = main.build_optimizer(student, args)
    regularizer = augmentations.BatchRegularizer.from_args(args, 10)
    scheduler = main.optim.build_scheduler(optimizer, scheduler='none', epochs=1, steps_per_epoch=10)
    trainer = main.Trainer(student, optimizer, scheduler, regularizer, args, torch.device('cpu'))
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
    student = main.build_model(args, CIFAR10, torch.device('cpu'))
    optimizer = main.build_optimizer(student, args)
    scheduler = main.optim.build_scheduler(optimizer, scheduler='none', epochs=1, steps_per_epoch=10)
    trainer = main.Trainer(student, optimizer, scheduler, augmentations.BatchRegularizer.from_args(args, 10),
                           args, torch.device('cpu'))
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

def conv_and_linear(model):
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 2000]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return convs, linears


def test_init_kaiming_and_xavier_statistics():
    torch.manual_seed(0)
    model = models.create_model('wrn', depth=10, widening_factor=2)
    reinitialize(model, 'kaiming')
    convs, linears = conv_and_linear(model)
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    reinitialize(model, 'xavier')
    for layer in convs + linears:
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max().item() <= bound
        assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert layer.bias is None or not layer.bias.any()


def test_init_default_is_pytorchs_reset_parameters():
    torch.manual_seed(0)
    model = models.create_model('resnet', depth=20)  # resnet's own init is Kaiming normal, fan_out
    convs, _ = conv_and_linear(model)
    reinitialize(model, 'default')
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_ with a = sqrt(5)
        assert conv.weight.abs().max().item() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_init_flag_reaches_the_built_model(capsys):
    torch.manual_seed(0)
    args = main.parse_args(['--arch', 'resnet', '--depth', '20', '--init', 'xavier', '--outdir', 'x'])
    model = main.build_model(args, CIFAR10, torch.device('cpu'))
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    bound = math.sqrt(6 / (fc.in_features + fc.out_features))
    assert fc.weight.abs().max().item() <= bound and fc.weight.abs().max().item() > 0.8 * bound
    assert run_main(['--init', 'he', '--dry_run']) == 2
    assert '--init' in one_line_error(capsys)


# ----------------------------------------------------------------------------- augmentation policies

POLICIES = [('autoaugment', {}), ('autoaugment', dict(autoaugment_policy='svhn')), ('randaugment', {}),
            ('trivialaugment', {}), ('augmix', {})]


def uint8_batch(n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize('name, options', POLICIES)
def test_policy_changes_a_batch_and_keeps_its_type(name, options):
    torch.manual_seed(0)
    images = uint8_batch()
    out = augmentations.AugmentPolicy(name, group_size=4, **options)(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    changed = (out != images).flatten(1).any(1)
    assert changed.sum() >= 8  # at least two of the eight groups drew an operation that changes pixels
    assert augmentations.AugmentPolicy(name, **options)(images[:0]).shape == (0, 3, 32, 32)
    with pytest.raises(TypeError, match='uint8'):
        augmentations.AugmentPolicy(name, **options)(images.float())


@pytest.mark.parametrize('name', ['autoaugment', 'randaugment', 'trivialaugment'])
def test_policy_group_shares_one_draw(name):
    torch.manual_seed(1)
    images = uint8_batch(1).expand(16, -1, -1, -1).contiguous()  # sixteen copies of one image
    out = augmentations.AugmentPolicy(name, group_size=4)(images)
    groups = out.unflatten(0, (4, 4))
    assert all((group == group[0]).all() for group in groups)  # same draw within a group
    per_image = augmentations.AugmentPolicy(name, group_size=1)(images)
    assert len({bytes(image.numpy()) for image in per_image}) > 2  # a draw per image


def test_augmix_mixes_each_image_with_its_own_weights_within_a_group():
    torch.manual_seed(0)
    images = uint8_batch(1).expand(8, -1, -1, -1).contiguous()
    out = augmentations.AugmentPolicy('augmix', group_size=8)(images)
    assert len({bytes(image.numpy()) for image in out}) > 1


def test_policy_options_select_torchvisions_transforms():
    auto = augmentations.AugmentPolicy('autoaugment', autoaugment_policy='imagenet').sample_transform()
    assert isinstance(auto, transforms.AutoAugment) and auto.policy == transforms.AutoAugmentPolicy.IMAGENET
    rand = augmentations.AugmentPolicy('randaugment', randaugment_ops=3, randaugment_magnitude=5).sample_transform()
    assert (rand.num_ops, rand.magnitude) == (3, 5)
    assert isinstance(augmentations.AugmentPolicy('trivialaugment').sample_transform(), transforms.TrivialAugmentWide)
    assert augmentations.AugmentPolicy('augmix', augmix_severity=7).sample_transform().severity == 7
    sample = dataloader.build_sample_transform(CIFAR10, True, random_crop_padding=4,
                                               policy=augmentations.AugmentPolicy('trivialaugment'))
    assert isinstance(sample.transforms[0], transforms.TrivialAugmentWide)


@pytest.mark.parametrize('pipeline, policy', [('device', ['--use_randaugment']),
                                              ('device', ['--use_augmix', '--policy_group_size', '4']),
                                              ('workers', ['--use_trivialaugment']),
                                              ('workers', ['--use_autoaugment', '--autoaugment_policy', 'svhn'])])
def test_policies_train_in_both_pipelines(pipeline, policy, cifar10_dir, tmp_path):
    outdir = tmp_path / 'run'
    assert run_main([*TINY_RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', str(outdir),
                     '--data_pipeline', pipeline, '--num_workers', '0', *policy]) == 0
    assert len(json.load(open(outdir / 'log.json'))) == 1


def test_device_loader_applies_the_policy(monkeypatch):
    calls = []
    policy = augmentations.AugmentPolicy('trivialaugment', group_size=5)
    monkeypatch.setattr(augmentations.AugmentPolicy, '__call__', lambda self, images: calls.append(len(images))
                        or images)
    images, labels = uint8_batch(20).numpy(), np.arange(20) % 10
    loader = dataloader.DeviceLoader(torch.from_numpy(images), torch.from_numpy(labels), CIFAR10, 10,
                                     torch.device('cpu'), True, policy=policy)
    assert sum(len(batch[0]) for batch in loader) == 20 and calls == [10, 10]


def test_user_policy_replaces_the_transformers_default():
    assert main.parse_args(['--arch', 'vit', '--outdir', 'x']).use_randaugment
    args = main.parse_args(['--arch', 'vit', '--use_trivialaugment', '--outdir', 'x'])
    assert args.use_trivialaugment and not args.use_randaugment
    assert augmentations.AugmentPolicy.from_args(args).name == 'trivialaugment'


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

@pytest.mark.parametrize('depth, params_m, macs_m', [(20, 0.27, 41), (56, 0.85, 125), (110, 1.7, 253)])
def test_resnet_cost_matches_the_papers(depth, params_m, macs_m):
    # He et al., arXiv 1512.03385, table 6 (parameters); 41 M / 125 M / 253 M multiply-adds are the
    # figures quoted for these networks (e.g. Huang et al., arXiv 1608.06993's comparisons)
    params, macs = main.model_cost('resnet', CIFAR10, depth=depth)
    assert params / 1e6 == pytest.approx(params_m, rel=0.03)
    assert macs / 1e6 == pytest.approx(macs_m, rel=0.03)


def test_cost_follows_the_input_size_and_the_model_flags():
    _, macs_32 = main.model_cost('resnet', CIFAR10, depth=20)
    _, macs_28 = main.model_cost('resnet', dataloader.DATASETS['MNIST'], depth=20)
    assert macs_28 / macs_32 == pytest.approx((28 / 32) ** 2, rel=0.02)
    params_narrow, macs_narrow = main.model_cost('resnet', CIFAR10, depth=20, base_channels=8)
    assert macs_narrow / macs_32 == pytest.approx(0.25, rel=0.02) and params_narrow < 0.3 * 0.27e6
    _, vit_macs = main.model_cost('vit', CIFAR10, embed_dim=64, depth=2, num_heads=2)
    assert vit_macs > 0  # attention and linear layers are counted


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
    _, macs_24 = main.model_cost('resnet', dataloader.DatasetInfo('', 3, 24, 3, (), (), True), depth=20)
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
