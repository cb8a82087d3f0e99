"""The compiled training step (--compile): the same numbers as the eager step for every optimizer,
regularizer, EMA, lookahead and ghost-batch setting while the schedule changes the learning rate every
step, no recompilation after the first step, checkpoints that move between compiled and eager runs,
and a resumed compiled run equal to an uninterrupted one.

The graphs here go through torch.compile's ``aot_eager`` backend: dynamo's capture, AOTAutograd's
forward and backward graphs and functionalization, as with inductor, without its C++ code generation
(minutes on a CPU); the tests that compile with inductor are in tests/test_engine.py and under ``-m slow``.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import augmentations
import engine
import main
import models
import optim

CPU = torch.device('cpu')
STEPS, STEPS_PER_EPOCH = 4, 6

# (flags, tolerance on the weights after STEPS steps). Muon's Newton-Schulz runs in bf16 and SAM divides
# by the gradient's norm: float rounding grows faster there, from 1e-7 after the first steps to 1e-3
# after the fourth with warmup's high lr (both paths run the same operations; AOTAutograd decomposes
# some, e.g. lerp, into others that round differently), so those compare after MUON_STEPS steps.
MUON_STEPS = 2
SETTINGS = {
    'sgd': ([], 1e-4),
    'sgd_no_nesterov': (['--nesterov', 'false'], 1e-4),
    'adam': (['--optimizer', 'adam', '--base_lr', '0.01'], 2e-4),
    'adamw': (['--optimizer', 'adamw', '--base_lr', '0.01'], 1e-4),
    'lars': (['--optimizer', 'lars'], 1e-4),
    'adabound': (['--optimizer', 'adabound', '--base_lr', '0.01'], 1e-4),
    'muon': (['--optimizer', 'muon'], 1e-3),  # Newton-Schulz in bf16
    'sam': (['--use_sam'], 1e-4),
    'asam': (['--use_sam', '--sam_adaptive'], 1e-4),
    'mixup_ema': (['--use_mixup', '--ema_decay', '0.9'], 1e-4),
    'cutmix_ghost_batches': (['--use_cutmix', '--subdivision', '2'], 1e-4),
    'dual_cutout': (['--use_dual_cutout'], 1e-4),
    'ricap_label_smoothing': (['--use_ricap', '--use_label_smoothing'], 1e-4),
    'cutout_random_erasing': (['--use_cutout', '--use_random_erasing'], 1e-4),
    'lookahead_clip_ema_every': (['--lookahead_every', '2', '--gradient_clip', '1', '--ema_decay', '0.9',
                                  '--ema_every', '2'], 1e-4),
    'bf16': (['--precision', 'bf16'], 1e-4),
    'channels_last': (['--channels_last'], 1e-4),
    'no_weight_decay_on_bn_head_lr': (['--no_weight_decay_on_bn', '--bn_bias_lr_factor', '4',
                                       '--head_lr_factor', '2'], 1e-4),
}


def build(flags, compiled):
    args = main.parse_args(['--outdir', 'unused', '--arch', 'resnet_preact', '--depth', '8', '--base_channels', '4',
                            '--scheduler', 'cosine', '--warmup_epochs', '0.5', *flags])
    torch.manual_seed(0)
    model = models.create_model('resnet_preact', depth=8, base_channels=4)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optim.build_optimizer(model, **optim.optimizer_kwargs(args))
    scheduler = optim.build_scheduler(optimizer, **optim.scheduler_kwargs(args), epochs=1,
                                      steps_per_epoch=STEPS_PER_EPOCH)
    regularizer = augmentations.BatchRegularizer(10, **augmentations.regularizer_kwargs(args))
    options = {**engine.trainer_kwargs(args), 'compile': compiled}
    return engine.Trainer(model, optimizer, scheduler, regularizer, CPU, total_steps=STEPS_PER_EPOCH,
                          compile_backend='aot_eager', **options)


def batches(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator))
            for _ in range(count)]


def train(trainer, steps):
    """(loss, accuracy, lr) after each step; the regularizers' random draws from one seed."""
    torch.manual_seed(5)
    record = []
    for images, labels in steps:
        loss, accuracy = trainer.train_step(images, labels)
        record.append((loss.item(), accuracy.item(), float(trainer.optimizer.param_groups[0]['lr'])))
    return record


def weights(trainer):
    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    if trainer.ema is not None:
        tensors += [*trainer.ema.module.parameters()]
    return [tensor.detach().float().clone() for tensor in tensors]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('setting', sorted(SETTINGS))
def test_compiled_step_equals_the_eager_step(setting):
    flags, tolerance = SETTINGS[setting]
    compiled, eager = build(flags, True), build(flags, False)
    assert compiled.compiled_step and not eager.compiled_step
    steps = batches(MUON_STEPS if setting in ('muon', 'sam', 'asam') else STEPS)
    compiled_record, eager_record = train(compiled, steps), train(eager, steps)
    for (loss, accuracy, lr), (eager_loss, eager_accuracy, eager_lr) in zip(compiled_record, eager_record):
        assert loss == pytest.approx(eager_loss, rel=1e-3, abs=1e-4)
        assert lr == pytest.approx(eager_lr, rel=1e-6)  # LambdaLR's own values, in a float32 tensor
    assert len({lr for _, _, lr in eager_record}) == len(steps)  # a new learning rate at every step
    difference = max((a - b).abs().max().item() for a, b in zip(weights(compiled), weights(eager)))
    assert difference < tolerance


def test_the_schedule_never_recompiles_the_step():
    """After the first step, steps with a new learning rate each (and the EMA's, lookahead's counters)
    reuse the compiled graphs."""
    trainer = build(['--use_mixup', '--ema_decay', '0.9', '--ema_every', '2', '--lookahead_every', '2'], True)
    steps = batches(STEPS + 2)
    train(trainer, steps[:2])  # the EMA blends (and compiles) at the second step
    frames, graphs = counters['stats']['calls_captured'], counters['stats']['unique_graphs']
    train(trainer, steps[2:])
    assert (counters['stats']['calls_captured'], counters['stats']['unique_graphs']) == (frames, graphs)
    breaks = [reason for reason in counters['graph_break'] if 'graph_break()' not in reason]
    assert not breaks, breaks  # only torch.optim's own breaks around step(), none of ours


def test_the_compiled_step_makes_the_host_wait_nowhere():
    """No host read of a tensor (aten::_local_scalar_dense, what .item(), float() and an if on a tensor
    call) while compiled steps train, the learning rates' writes from the schedule's table and the EMA
    included. (The profiler records the compiled regions' operators; a TorchDispatchMode, as
    tests/test_engine_sync.py uses for the eager step, would make them run eagerly.)"""
    from torch.profiler import ProfilerActivity, profile
    trainer = build(['--use_mixup', '--ema_decay', '0.9'], True)
    steps = batches(STEPS)
    train(trainer, steps[:1])  # compiles
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        for images, labels in steps[1:]:
            trainer.train_step(images, labels)
    names = [event.name for event in recorded.events()]
    assert 'Torch-Compiled Region' in ' '.join(names)  # the compiled code ran
    assert not [name for name in names if 'local_scalar_dense' in name or name == 'aten::item']


def test_checkpoints_move_between_compiled_and_eager_trainers():
    """A compiled trainer's state_dict holds float learning rates; loaded into another compiled trainer
    (or an eager one) training goes on as it would have."""
    steps = batches(STEPS)
    uninterrupted = build([], True)
    train(uninterrupted, steps)
    for second_compiled in (True, False):
        torch._dynamo.reset()
        first = build([], True)
        train(first, steps[:2])
        state, model_state, rng = first.state_dict(), first.model.state_dict(), torch.get_rng_state()
        assert all(isinstance(group['lr'], float) for group in state['optimizer']['param_groups'])
        second = build([], second_compiled)
        second.model.load_state_dict(model_state)
        second.load_state_dict(state)
        torch.set_rng_state(rng)
        for images, labels in steps[2:]:
            second.train_step(images, labels)
        assert float(second.optimizer.param_groups[0]['lr']) == pytest.approx(
            float(uninterrupted.optimizer.param_groups[0]['lr']))
        difference = max((a - b).abs().max().item() for a, b in zip(weights(second), weights(uninterrupted)))
        assert difference < 1e-4


def test_resumed_compiled_run_equals_the_uninterrupted_one(cifar10_dir, tmp_path, monkeypatch):
    """Through main.py: a --compile run stopped after epoch 1 and resumed ends with the uninterrupted
    --compile run's log and weights (aot_eager in place of inductor for the test's time)."""
    from conftest import TINY_RUN, run_main, run_main_interrupted_in_epoch
    real_compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda function=None, **options: real_compile(
        function, **{**options, 'backend': 'aot_eager', 'mode': None}))
    base = [*TINY_RUN, '--epochs', '3', '--milestones', '[2]', '--compile', '--use_mixup', '--ema_decay', '0.9',
            '--dataset_dir', cifar10_dir]
    assert run_main([*base, '--outdir', str(tmp_path / 'whole')]) == 0
    run_main_interrupted_in_epoch([*base, '--outdir', str(tmp_path / 'resumed')], epoch=2)
    assert run_main([*base, '--outdir', str(tmp_path / 'resumed'), '--resume']) == 0
    import json
    logs = [json.load(open(tmp_path / name / 'log.json')) for name in ('whole', 'resumed')]
    curves = [[r[key] for r in log for key in ('train_loss', 'test_accuracy')] for log in logs]
    assert len(curves[0]) == 6 and curves[0] == pytest.approx(curves[1], rel=1e-5)
    states = [torch.load(tmp_path / name / 'model_state.pth', weights_only=True) for name in ('whole', 'resumed')]
    for key, value in states[0].items():
        assert torch.allclose(value.float(), states[1][key].float(), atol=1e-5), key
