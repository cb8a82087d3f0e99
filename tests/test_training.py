"""The training step's mechanics: ghost batch norm, mixed precision, SAM/EMA wiring, TTA,
channels_last and torch.compile against plain eager PyTorch."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import augmentations
import main
import models
import optim

CPU = torch.device('cpu')


def small_model(seed=0):
    torch.manual_seed(seed)
    return models.create_model('resnet_preact', depth=8, base_channels=4, num_classes=10, in_channels=3)


def make_trainer(model, *flags):
    args = main.parse_args(['--outdir', 'unused', '--arch', 'resnet_preact', '--scheduler', 'none',
                            '--weight_decay', '0', *flags])
    optimizer = main.build_optimizer(model, args)
    scheduler = optim.build_scheduler(optimizer, scheduler='none', epochs=1, steps_per_epoch=10)
    regularizer = augmentations.BatchRegularizer.from_args(args, 10)
    return main.Trainer(model, optimizer, scheduler, regularizer, args, CPU)


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
    result = main.evaluate(model, loader, CPU, tta='flip')
    with torch.no_grad():
        logits = (model(images) + model(images.flip(3))) / 2
    assert result['accuracy'] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result['loss'] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_channels_last_matches_contiguous():
    images, _ = batch(4)
    model = small_model().eval()
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(images)
        actual = channels_last(images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(expected, actual, atol=1e-4)


def test_compile_matches_eager():
    images, _ = batch(4)
    model = small_model().eval()
    compiled = main.maybe_compile(copy.deepcopy(model), True)
    try:
        with torch.no_grad():
            actual = compiled(images)
    except Exception as error:  # no C++ toolchain or unsupported platform: compile is optional
        pytest.skip(f'torch.compile unavailable here: {type(error).__name__}')
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(expected, actual, atol=1e-4)
