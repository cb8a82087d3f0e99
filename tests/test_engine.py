"""The training step's mechanics: ghost batch norm, mixed precision, SAM/EMA wiring, TTA,
channels_last and torch.compile against plain eager PyTorch."""
import copy

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
import optim
from conftest import build_trainer

CPU = torch.device('cpu')


def small_model(seed=0):
    torch.manual_seed(seed)
    return models.create_model('resnet_preact', depth=8, base_channels=4, num_classes=10, in_channels=3)


def make_trainer(model, *flags):
    args = main.parse_args(['--outdir', 'unused', '--arch', 'resnet_preact', '--scheduler', 'none',
                            '--weight_decay', '0', *flags])
    return build_trainer(model, args, scheduler='none', epochs=1, steps_per_epoch=10)


def batch(n=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_subdivision_1_is_a_plain_sgd_step():
    images, labels = batch()
    model, reference = small_model(), small_model()
    make_trainer(model, '--subdivision', '1').train_step(images, labels)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    F.cross_entropy(reference(images), labels).backward()
    optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_subdivision_4_gives_bn_per_sub_batch_statistics_and_accumulated_gradients():
    images, labels = batch(16)
    model = small_model()
    seen_batch_sizes = []
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.register_forward_pre_hook(lambda module, inputs: seen_batch_sizes.append(inputs[0].shape[0]))
    reference = copy.deepcopy(model)
    trainer = make_trainer(model, '--subdivision', '4', '--momentum', '0')
    trainer.optimizer.step = lambda *a, **k: None  # keep weights to compare gradients
    with pytest.warns(UserWarning, match='optimizer.step'):
        trainer.train_step(images, labels)
    assert seen_batch_sizes == [4, 4, 4, 4]
    reference.train()
    for chunk_images, chunk_labels in zip(images.chunk(4), labels.chunk(4)):
        (F.cross_entropy(reference(chunk_images), chunk_labels) / 4).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    # each sub-batch normalized with its own statistics: differs from one full-batch pass
    whole = copy.deepcopy(reference)
    whole.zero_grad()
    F.cross_entropy(whole(images), labels).backward()
    assert not all(torch.allclose(p.grad, q.grad, atol=1e-6) for p, q in zip(model.parameters(), whole.parameters()))


def record_bn_batch_sizes(model):
    """The batch size of every forward pass, as the model's first BatchNorm sees it."""
    seen = []
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[0]))
    return seen


def step_without_update(trainer, images, labels):
    """One train_step whose optimizer leaves the weights alone, so gradients can be compared."""
    trainer.optimizer.step = lambda *a, **k: None
    with pytest.warns(UserWarning, match='optimizer.step'):
        return trainer.train_step(images, labels)


def assert_same_gradients_and_buffers(model, reference):
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        assert torch.allclose(b.float(), c.float(), atol=1e-6), name


@pytest.mark.parametrize('subdivision', [1, 2])
def test_dual_cutout_step_is_the_reference_one_forward_pass_per_view(subdivision):
    """Default Dual-Cutout = the paper authors' code (Analytical-Learning-Theory, cifar10/resnext/main.py)
    and hysts' train.py: per (sub-)batch model(view 1) then model(view 2), loss
    0.5 (CE_1 + CE_2) + 0.1 MSE(logits_1, logits_2), train accuracy on (logits_1 + logits_2) / 2;
    with --subdivision both views of the same images share a sub-batch."""
    images, labels = batch(16)
    model = small_model()
    reference = copy.deepcopy(model)
    seen = record_bn_batch_sizes(model)
    trainer = make_trainer(model, '--use_dual_cutout', '--subdivision', str(subdivision))
    torch.manual_seed(3)
    loss, accuracy = step_without_update(trainer, images, labels)
    assert seen == [16 // subdivision] * (2 * subdivision)

    torch.manual_seed(3)
    views = augmentations.dual_cutout(images, size=16)  # the flags' defaults
    reference.train()
    expected_loss, correct = 0.0, 0
    for first, second, chunk_labels in zip(views[:16].chunk(subdivision), views[16:].chunk(subdivision),
                                           labels.chunk(subdivision)):
        out1, out2 = reference(first), reference(second)
        chunk_loss = (0.5 * (F.cross_entropy(out1, chunk_labels) + F.cross_entropy(out2, chunk_labels))
                      + 0.1 * F.mse_loss(out1, out2))
        (chunk_loss / subdivision).backward()
        expected_loss += chunk_loss.item() / subdivision
        correct += (((out1 + out2) / 2).argmax(1) == chunk_labels).sum().item()
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy.item() == pytest.approx(correct / 16)
    assert_same_gradients_and_buffers(model, reference)  # BN running statistics: the same passes, in order


def test_dual_cutout_joint_forward_runs_both_views_in_one_pass():
    images, labels = batch(16)
    model = small_model()
    reference = copy.deepcopy(model)
    seen = record_bn_batch_sizes(model)
    trainer = make_trainer(model, '--use_dual_cutout', '--dual_cutout_joint_forward',
                           '--dual_cutout_distance', 'softmax')
    torch.manual_seed(3)
    loss, _ = step_without_update(trainer, images, labels)
    assert seen == [32]
    torch.manual_seed(3)
    views = augmentations.dual_cutout(images, size=16)
    reference.train()
    out1, out2 = reference(views).split(16)
    expected = (0.5 * (F.cross_entropy(out1, labels) + F.cross_entropy(out2, labels))
                + 0.1 * (out1.softmax(1) - out2.softmax(1)).pow(2).sum(1).mean())
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_same_gradients_and_buffers(model, reference)


def record_forward_inputs_and_targets(trainer):
    images, targets = [], []
    trainer.model.register_forward_pre_hook(lambda module, inputs: images.append(inputs[0].detach().clone()))
    loss = trainer.regularizer.loss
    def recording_loss(logits, soft_targets):
        targets.append(soft_targets)
        return loss(logits, soft_targets)
    trainer.regularizer.loss = recording_loss
    return images, targets


@pytest.mark.parametrize('method, parameter', [('mixup', 1.0), ('ricap', 0.3), ('cutmix', 1.0)])
def test_subdivision_mixes_the_whole_batch_then_splits_it(method, parameter):
    """As the original tool's train.py (mixup/ricap before the ghost-batch chunking): the sub-batches
    of a step are the chunks of the whole batch mixed once."""
    images, labels = batch(16)
    trainer = make_trainer(small_model(), f'--use_{method}', '--subdivision', '4')
    seen_images, seen_targets = record_forward_inputs_and_targets(trainer)
    torch.manual_seed(4)
    trainer.train_step(images, labels)
    torch.manual_seed(4)
    mixed, targets = getattr(augmentations, method)(images, augmentations.one_hot(labels, 10), parameter)
    assert len(seen_images) == len(seen_targets) == 4
    for seen, expected in zip(seen_images, mixed.chunk(4)):
        assert torch.equal(seen, expected)
    for seen, expected in zip(seen_targets, targets.chunk(4)):
        assert torch.equal(seen, expected)


def test_subdivision_mixup_draws_one_lambda_and_one_permutation_for_the_batch():
    images, labels = batch(16)
    trainer = make_trainer(small_model(), '--use_mixup', '--subdivision', '4')
    seen_images, seen_targets = record_forward_inputs_and_targets(trainer)
    torch.manual_seed(5)
    trainer.train_step(images, labels)
    mixed, targets = torch.cat(seen_images), torch.cat(seen_targets)
    # target_i = lam * onehot(y_i) + (1 - lam) * onehot(y_partner): where the labels differ the
    # weight of y_i is lam, one number for all four sub-batches
    own = targets[torch.arange(16), labels]
    lam = own[own < 1]
    assert len(lam) >= 8 and torch.allclose(lam, lam[0].expand_as(lam))
    lam = lam[0]
    # image_i = lam * x_i + (1 - lam) * x_partner: the partners form one permutation of the whole
    # batch, some of them in another sub-batch (per sub-batch mixing keeps them inside)
    residual = (mixed - lam * images).flatten(1)
    distance = (residual[:, None] - (1 - lam) * images.flatten(1)[None]).norm(dim=2)
    partner = distance.argmin(dim=1)
    assert (distance.amin(dim=1) < 1e-4).all()
    assert sorted(partner.tolist()) == list(range(16))
    assert (partner // 4 != torch.arange(16) // 4).any()


@pytest.mark.parametrize('precision,dtype', [('bf16', torch.bfloat16), ('fp16', torch.float16)])
def test_mixed_precision_step_on_cpu(precision, dtype):
    images, labels = batch()
    model = small_model()
    trainer = make_trainer(model, '--precision', precision)
    try:
        with trainer.autocast():
            out = model(images)
    except RuntimeError as error:
        pytest.skip(f'CPU autocast {precision} unsupported by this torch: {error}')
    assert out.dtype == dtype
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = trainer.train_step(images, labels)
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert trainer.scaler.is_enabled() == (precision == 'fp16')


def test_sam_and_ema_are_wired_into_the_step():
    images, labels = batch()
    model = small_model()
    trainer = make_trainer(model, '--use_sam', '--sam_rho', '0.05', '--ema_decay', '0.5')
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train_step(images, labels)
    ema_state = trainer.ema.module.state_dict()
    for name, param in model.named_parameters():
        assert torch.allclose(ema_state[name], 0.5 * start[name] + 0.5 * param.detach(), atol=1e-6)
    assert isinstance(trainer.optimizer, optim.SAM)


def test_flip_tta_averages_logits_of_image_and_mirror():
    images, labels = batch(8)
    model = small_model().eval()
    loader = [(images, labels)]
    result = engine.evaluate(model, loader, CPU, tta='flip')
    with torch.no_grad():
        logits = (model(images) + model(images.flip(3))) / 2
    assert result['accuracy'] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result['loss'] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def reflect_shift(images, dy, dx):
    """The image seen through a window moved by (dy, dx) pixels over its reflect-padded copy (numpy)."""
    height, width = images.shape[2:]
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode='reflect')
    return torch.from_numpy(padded[:, :, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width].copy())


def test_flip_translate_tta_averages_flip_pairs_of_the_image_and_its_two_shifts():
    images, labels = batch(8)
    model = small_model().eval()
    with torch.no_grad():
        def flip_pair(x):
            return (model(x) + model(x.flip(3))) / 2
        shifted = [reflect_shift(images, -1, -1), reflect_shift(images, 1, 1)]
        assert torch.equal(shifted[0][:, :, 1:, 1:], images[:, :, :-1, :-1])  # content moved down-right
        assert torch.equal(shifted[0][:, :, 0, 1:], images[:, :, 1, :-1])  # row -1 reflects row 1
        expected = 0.5 * flip_pair(images) + 0.5 * (flip_pair(shifted[0]) + flip_pair(shifted[1])) / 2
        assert torch.allclose(engine.tta_logits(model, images, 'flip_translate'), expected, atol=1e-5)
    result = engine.evaluate(model, [(images, labels)], CPU, tta='flip_translate')
    assert result['accuracy'] == pytest.approx((expected.argmax(1) == labels).float().mean().item())
    assert result['loss'] == pytest.approx(F.cross_entropy(expected, labels).item(), rel=1e-5)
    assert result['loss'] != pytest.approx(engine.evaluate(model, [(images, labels)], CPU, tta='flip')['loss'],
                                           rel=1e-5)


def test_padded_evaluation_batches_score_only_the_real_images():
    """pad_batches (the compiled evaluation's fixed shape) pads a short batch and drops the padding."""
    model = small_model().eval()
    _, test_loader = device_loaders(n_test=10, test_batch_size=8)
    plain = engine.evaluate(model, test_loader, CPU, tta='flip_translate')
    seen = []
    padded = engine.evaluate(model, test_loader, CPU, tta='flip_translate',
                           forward=lambda x: seen.append(len(x)) or model(x), pad_batches=True)
    assert set(seen) == {8}
    assert padded['loss'] == pytest.approx(plain['loss'], rel=1e-5) and padded['accuracy'] == plain['accuracy']


def test_channels_last_matches_contiguous():
    images, _ = batch(4)
    model = small_model().eval()
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(images)
        actual = channels_last(images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(expected, actual, atol=1e-4)


def tiny_bn_model(seed=0):
    """One conv, BatchNorm and a linear head: the least a compiled step with BN buffers needs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def device_loaders(n_train=32, n_test=10, batch_size=16, test_batch_size=8):
    """A shuffled, cropped and flipped training loader (it draws random numbers) and a test loader
    whose last batch is short."""
    generator = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n_train + n_test,), generator=generator)
    info = dataloader.DATASETS['CIFAR10']
    train = dataloader.DeviceLoader(images[:n_train], labels[:n_train], info, batch_size, CPU, True,
                                    random_crop_padding=4, horizontal_flip=True)
    test = dataloader.DeviceLoader(images[n_train:], labels[n_train:], info, test_batch_size, CPU, False)
    return train, test


def compile_works():
    try:
        return torch.compile(lambda x: x * 2 + 1)(torch.ones(2)).tolist() == [3.0, 3.0]
    except Exception:  # no C++ toolchain or unsupported platform: compile is optional
        return False


def stand_in_compiled_trainer(model, capsys):
    """A --compile Trainer whose compiled functions are plain wrappers: compile_ahead's bookkeeping
    without the minutes of a real compile (and without needing a compiler)."""
    trainer = make_trainer(model, '--compile')
    capsys.readouterr()
    trainer.forward_loss = lambda images, targets: trainer._forward_loss(images, targets)
    trainer.eval_forward = lambda images: model(images)
    return trainer


def test_compile_ahead_leaves_weights_buffers_and_rng_as_they_were(capsys):
    model = tiny_bn_model()
    trainer = stand_in_compiled_trainer(model, capsys)
    train_loader, test_loader = device_loaders(test_batch_size=16)  # first test batch short: padded
    torch.manual_seed(123)
    np.random.seed(4)
    state = copy.deepcopy(model.state_dict())
    rng, numpy_rng = torch.get_rng_state(), np.random.get_state()[1].copy()
    seconds = trainer.compile_ahead(train_loader, test_loader)
    assert seconds > 0 and not any(trainer._compile_pending.values())
    assert '--compile' not in capsys.readouterr().err  # neither step fell back to eager
    assert model.state_dict().keys() == state.keys()
    for key, value in state.items():  # weights, BN running statistics and batch counters
        assert torch.equal(value, model.state_dict()[key]), key
    assert torch.equal(rng, torch.get_rng_state()) and (numpy_rng == np.random.get_state()[1]).all()
    assert all(p.grad is None for p in model.parameters())
    # the step did run on a training batch: without the restore BN statistics would have moved
    model.train()
    model(next(iter(train_loader))[0])
    assert not torch.equal(state['1.running_mean'], model.state_dict()['1.running_mean'])


def test_compile_ahead_augments_one_batch_not_an_epoch(capsys):
    model = tiny_bn_model()
    trainer = stand_in_compiled_trainer(model, capsys)
    train_loader, test_loader = device_loaders(n_train=64, batch_size=16)
    augmented, augment = [], train_loader.augment
    train_loader.augment = lambda images, *rest: augmented.append(len(images)) or augment(images, *rest)
    trainer.compile_ahead(train_loader, test_loader)
    assert augmented == [16]
    images, labels = train_loader.example_batch()
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32 and labels.shape == (16,)
    batches = list(train_loader)
    assert augmented[2:] == [64] and len(batches) == 4  # an epoch augments all its images at once
    assert all(b.shape == images.shape and b.dtype == images.dtype for b, _ in batches)


def test_compile_ahead_with_a_full_first_test_batch_keeps_the_compiled_functions(capsys):
    model = tiny_bn_model()
    trainer = stand_in_compiled_trainer(model, capsys)
    compiled_forward_loss, compiled_eval_forward = trainer.forward_loss, trainer.eval_forward
    trainer.compile_ahead(*device_loaders(n_test=16, test_batch_size=8))
    assert '--compile' not in capsys.readouterr().err
    assert trainer.forward_loss is compiled_forward_loss and trainer.eval_forward is compiled_eval_forward


@pytest.mark.slow
@pytest.mark.parametrize('flags', [[], ['--use_dual_cutout', '--subdivision', '2']], ids=['plain', 'dual_cutout-ghost'])
def test_compile_matches_eager(flags, capsys):
    """A --compile Trainer's training step and padded evaluation give the eager Trainer's numbers
    (Dual-Cutout: the per-view forward passes of each ghost batch compile into the step)."""
    if not compile_works():
        pytest.skip('torch.compile unavailable here')
    model, eager_model = tiny_bn_model(), tiny_bn_model()
    trainer, eager = make_trainer(model, '--compile', *flags), make_trainer(eager_model, *flags)
    images, labels = batch(16, seed=3)
    torch.manual_seed(0)
    compiled_loss, compiled_accuracy = trainer.train_step(images, labels)
    torch.manual_seed(0)
    eager_loss, eager_accuracy = eager.train_step(images, labels)
    assert '--compile' not in capsys.readouterr().err, 'the compiled step fell back to eager'
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-4, abs=1e-5)
    assert compiled_accuracy.item() == pytest.approx(eager_accuracy.item())
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    for (name, b), c in zip(model.named_buffers(), eager_model.buffers()):
        assert torch.allclose(b.float(), c.float(), atol=1e-5), name
    # evaluation: the compiled forward sees the short last batch padded to the loader's batch size
    _, test_loader = device_loaders(test_batch_size=8)
    compiled_result = trainer.evaluate(test_loader)
    eager_result = eager.evaluate(test_loader)
    assert '--compile' not in capsys.readouterr().err, 'the compiled evaluation fell back to eager'
    assert compiled_result['loss'] == pytest.approx(eager_result['loss'], rel=1e-4)
    assert compiled_result['accuracy'] == eager_result['accuracy']


@pytest.mark.filterwarnings('ignore:Detected call of `lr_scheduler.step\\(\\)` before')
def test_airbench_recipe_parameter_groups():
    """Muon takes the six conv filter banks, SGD the rest; the head has its lr factor, the whitening
    bias its own shorter schedule, and nothing frozen is handed to an optimizer."""
    model = models.create_model('airbench', n_channels=[8, 16, 16])
    args = main.parse_args(['--outdir', 'unused', '--arch', 'airbench', '--optimizer', 'muon', '--base_lr', '2',
                            '--head_lr_factor', '4', '--weight_decay', '5e-4', '--whiten_bias_epochs', '1',
                            '--epochs', '3'])
    optimizer = optim.build_optimizer(model, **optim.optimizer_kwargs(args))
    names = {id(p): name for name, p in model.named_parameters()}
    *sgd_groups, muon_group = optimizer.param_groups
    groups = [{names[id(p)] for p in group['params']} for group in sgd_groups]
    # Muon's parameters are (out, in*3*3) views sharing the filters' storage
    storage = {p.data_ptr(): name for name, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in muon_group['params']) and muon_group['lr'] == 0.24
    filters = {storage[p.data_ptr()] for p in muon_group['params']}
    assert filters == {f'group{g}.conv{c}.weight' for g in (1, 2, 3) for c in (1, 2)}
    assert sorted([n for g in groups for n in g] + sorted(filters)) == \
        sorted(n for n, p in model.named_parameters() if p.requires_grad)
    by_name = {frozenset(members): group for members, group in zip(groups, sgd_groups)}
    head = by_name[frozenset({'fc.weight'})]
    assert head['lr'] == pytest.approx(8.0) and head['weight_decay'] == pytest.approx(5e-4 / 4)
    whiten = by_name[frozenset({'whiten.bias'})]
    assert whiten['schedule_epochs'] == 1 and whiten['lr'] == pytest.approx(2.0)
    scheduler = optim.build_scheduler(optimizer, scheduler='linear', epochs=3, steps_per_epoch=10)
    lrs = []
    for _ in range(30):
        lrs.append((whiten['lr'], head['lr']))
        scheduler.step()  # the lr curve only: no optimizer step
    assert lrs[5][0] == pytest.approx(1.0) and lrs[10][0] == 0.0 and lrs[29][0] == 0.0
    assert lrs[15][1] == pytest.approx(4.0)  # the other groups decay over all 3 epochs


def test_compiled_training_and_padded_evaluation_do_not_recompile(capsys):
    """After compile_ahead, epochs of training and evaluation (with a short last test batch and flip
    TTA) reuse the compiled graphs: dynamo's frame counters do not move."""
    if not compile_works():
        pytest.skip('torch.compile unavailable here')
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = tiny_bn_model()
    trainer = make_trainer(model, '--compile', '--tta', 'flip')
    train_loader, test_loader = device_loaders(n_test=20, test_batch_size=8)  # test batches 8, 8, 4
    trainer.compile_ahead(train_loader, test_loader)
    assert '--compile' not in capsys.readouterr().err
    compiled_frames = dict(counters['stats'])
    for epoch in (1, 2):
        trainer.train_one_epoch(train_loader, epoch, lambda loader, *_: _Bar(loader))
        trainer.evaluate(test_loader)
    assert dict(counters['stats']) == compiled_frames
    assert counters['stats']['unique_graphs'] >= 2  # training (forward and loss) and evaluation


class _Bar(list):
    """A stand-in progress bar."""
    disable = True


def test_a_compile_failure_at_the_first_step_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    def failing_compile(function, **kwargs):
        def compiled(*args):
            raise RuntimeError('inductor: no working C++ compiler\nsecond line')
        return compiled
    monkeypatch.setattr(torch, 'compile', failing_compile)
    model, eager_model = tiny_bn_model(), tiny_bn_model()
    trainer, eager = make_trainer(model, '--compile'), make_trainer(eager_model)
    images, labels = batch(8)
    loss, _ = trainer.train_step(images, labels)
    expected, _ = eager.train_step(images, labels)
    assert torch.allclose(loss, expected)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['--compile: torch.compile failed at the first train step (RuntimeError: inductor: no working '
                   'C++ compiler); running eager']
    assert trainer.forward_loss == trainer._forward_loss and trainer.eval_forward is model


def test_after_a_compile_failure_the_schedule_goes_on_as_eager(monkeypatch, capsys):
    """The compiled step writes the learning rates from a table on the device; the eager step it falls back to
    must step the schedule itself again (it stayed at its first lr)."""
    import augmentations
    import engine
    import optim

    def failing_compile(function, **kwargs):
        def compiled(*args):
            raise RuntimeError('inductor: no working C++ compiler')
        return compiled

    def learning_rates(compile):
        model = tiny_bn_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = optim.build_scheduler(optimizer, scheduler='linear', epochs=1, steps_per_epoch=10)
        trainer = engine.Trainer(model, optimizer, scheduler, augmentations.BatchRegularizer(10), torch.device('cpu'),
                                 total_steps=10, compile=compile)
        rates = []
        for step in range(4):
            trainer.train_step(*batch(8, seed=step))
            rates.append(float(optimizer.param_groups[0]['lr']))
        return rates
    monkeypatch.setattr(torch, 'compile', failing_compile)
    eager = learning_rates(compile=False)
    assert eager == pytest.approx([0.09, 0.08, 0.07, 0.06])
    assert learning_rates(compile=True) == pytest.approx(eager)
    assert 'running eager' in capsys.readouterr().err


def test_an_error_of_the_model_itself_is_not_taken_for_a_compile_failure(monkeypatch):
    monkeypatch.setattr(torch, 'compile', lambda function, **kwargs: function)
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 10))  # wrong input size: eager fails too
    trainer = make_trainer(model, '--compile')
    with pytest.raises(RuntimeError, match='shapes cannot be multiplied'):
        trainer.train_step(*batch(4))


def test_device_timer_on_cpu_measures_the_host_clock():
    import time
    import utils
    timer = utils.DeviceTimer('cpu')
    time.sleep(0.05)
    first = timer.elapsed()
    time.sleep(0.02)
    assert 0.05 <= first < timer.elapsed()


def test_progress_off_a_terminal_is_one_line_per_interval_with_the_counters_of_that_moment(capsys):
    """Off a terminal (capsys: stderr is no tty) one plain line each `interval` seconds, its counters read
    only for that line; nothing else, and nothing for a pass shorter than the interval or a rank that
    does not speak."""
    seconds = iter(range(0, 1000, 10))  # each step takes 10 s
    reads = []

    def counters():
        reads.append(1)
        return {'loss': f'{len(reads):.4f}'}
    progress = engine.make_progress(enabled=True, interval=30.0)
    assert list(progress(range(10), 'epoch 1 train', counters, clock=lambda: next(seconds))) == list(range(10))
    assert capsys.readouterr().err.splitlines() == [
        'epoch 1 train: 3/10 steps, 0.1 steps/s, loss 1.0000',
        'epoch 1 train: 6/10 steps, 0.1 steps/s, loss 2.0000',
        'epoch 1 train: 9/10 steps, 0.1 steps/s, loss 3.0000']
    assert len(reads) == 3
    quick = iter(range(100))
    list(progress(range(20), 'test', counters, clock=lambda: next(quick)))  # 20 s in all
    list(engine.make_progress(enabled=False, interval=30.0)(range(10), 'test', counters, clock=lambda: next(seconds)))
    assert capsys.readouterr().err == '' and len(reads) == 3
