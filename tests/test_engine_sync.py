"""No host-device synchronization in a training step.

A step that reads a device value on the host (``.item()``, ``float()``, ``bool()``, a Python ``if``
on a tensor), copies between host and device, or runs an op whose output size depends on the data
(``nonzero``, boolean-mask indexing, ``unique``, ...) makes the CPU wait for the GPU, so the host
can no longer queue kernels ahead of it. :class:`SyncRecorder` records such calls as they reach
aten. On the CPU it counts every tensor as a device tensor, so these checks run without a GPU; the
``gpu`` test runs the step under ``torch.cuda.set_sync_debug_mode('error')`` as well.

    python -m pytest -q tests/test_engine_sync.py
    python -m pytest -q -m gpu tests/test_engine_sync.py
"""
import os
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import augmentations
import engine
import main
import models
import optim
from conftest import build_trainer

aten = torch.ops.aten
BATCH = 8

# Value reads and ops whose output size depends on the data: on a GPU each copies a value (or a
# count) back to the host before the host can go on.
_HOST_READS = {
    aten._local_scalar_dense: 'reads a tensor value on the host (.item(), float(), int(), bool(), an if)',
    aten.item: 'reads a tensor value on the host (.item())',
    aten.equal: 'torch.equal returns a Python bool',
    aten.nonzero: 'nonzero: output size depends on the data',
    aten.masked_select: 'masked_select: output size depends on the data',
    aten._unique: 'unique: output size depends on the data',
    aten._unique2: 'unique: output size depends on the data',
    aten.unique_dim: 'unique: output size depends on the data',
    aten.unique_consecutive: 'unique_consecutive: output size depends on the data',
    aten.unique_dim_consecutive: 'unique_consecutive: output size depends on the data',
    aten.bincount: 'bincount: output size depends on the largest value',
}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_HOST_METHODS = {torch.Tensor.tolist: 'Tensor.tolist copies to the host',
                 torch.Tensor.numpy: 'Tensor.numpy needs a host tensor',
                 torch.Tensor.__array__: 'np.asarray(tensor) needs a host tensor',
                 torch.Tensor.cpu: 'Tensor.cpu copies to the host'}
# frames of the recording machinery and of pytest, left out of the printed stacks
_SKIPPED_FILES = ('_python_dispatch.py', 'overrides.py', 'torch' + os.sep + '_compile.py', 'eval_frame.py',
                  os.sep + '_pytest' + os.sep, os.sep + 'pluggy' + os.sep, 'pytest' + os.sep + '__main__.py', 'runpy')
_SKIPPED_FUNCTIONS = ('__torch_dispatch__', '__torch_function__', '_stack_summary')


def _crosses_host(source, destination):
    return (source.type == 'cpu') != (destination.type == 'cpu')


def _sync_reason(func, args, kwargs, host_is_device):
    """Why the aten call ``func(*args, **kwargs)`` makes the host wait for the device, or None."""
    def on_device(tensor):
        return host_is_device or tensor.device.type != 'cpu'

    packet = func.overloadpacket
    if packet in _HOST_READS:
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        return _HOST_READS[packet] if any(map(on_device, tensors)) else None
    if packet in _INDEX_OPS:
        masks = [i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
        return 'boolean-mask indexing runs nonzero on the mask' if any(map(on_device, masks)) else None
    if packet is aten.repeat_interleave and kwargs.get('output_size') is None:
        repeats = args[1] if func is aten.repeat_interleave.self_Tensor else args[0]
        if isinstance(repeats, torch.Tensor) and on_device(repeats):
            return 'repeat_interleave without output_size sums the repeats on the host'
    if packet is aten.histc and on_device(args[0]):
        low = args[2] if len(args) > 2 else kwargs.get('min', 0)
        high = args[3] if len(args) > 3 else kwargs.get('max', 0)
        if low == high:
            return 'histc with min == max reads the data range on the host'
    if packet is aten.lift_fresh and on_device(args[0]):
        return 'torch.tensor(host data) in the step: a blocking host-to-device copy'
    if packet is aten._to_copy and kwargs.get('device') is not None and not kwargs.get('non_blocking', False):
        if _crosses_host(args[0].device, torch.device(kwargs['device'])):
            return 'blocking copy between host and device'
    if packet is aten.copy_ and _crosses_host(args[0].device, args[1].device):
        if not (args[2] if len(args) > 2 else kwargs.get('non_blocking', False)):
            return 'blocking copy between host and device'
    return None


def _stack_summary():
    frames = [frame for frame in traceback.extract_stack() if frame.name not in _SKIPPED_FUNCTIONS
              and not any(part in frame.filename for part in _SKIPPED_FILES)]
    return ''.join(traceback.format_list(frames[-10:]))


class SyncRecorder(TorchDispatchMode):
    """Records every call that makes the host wait for the device, with the Python stack it came from.

    ``host_is_device=True`` (the default, for CPU runs) counts CPU tensors as device tensors, so a
    CPU run finds the calls that would synchronize on a GPU; on a GPU pass False, so that values the
    host keeps on purpose (optimizers' step counters outside the fused kernels) do not count.
    Besides aten calls, the Tensor methods that leave aten on a CPU tensor (``tolist``, ``numpy``,
    ``cpu``) are recorded through a companion :class:`TorchFunctionMode`.
    """

    def __init__(self, host_is_device=True):
        super().__init__()
        self.host_is_device = host_is_device
        self.calls = []
        self._methods = _MethodRecorder(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _sync_reason(func, args, kwargs, self.host_is_device)
        if reason is not None:
            self.calls.append((f'{func}: {reason}', _stack_summary()))
        return func(*args, **kwargs)

    def __enter__(self):
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc_info):
        try:
            return super().__exit__(*exc_info)
        finally:
            self._methods.__exit__(*exc_info)

    def report(self):
        """The recorded calls, each with the stack that made it, for an assertion message."""
        lines = [f'{len(self.calls)} host-device synchronization(s):']
        for reason, stack in self.calls:
            lines.append(f'--- {reason}\n{stack}')
        return '\n'.join(lines)


class _MethodRecorder(TorchFunctionMode):
    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_METHODS and (self.recorder.host_is_device or args[0].device.type != 'cpu'):
            self.recorder.calls.append((_HOST_METHODS[func], _stack_summary()))
        return func(*args, **(kwargs or {}))


def test_recorder_sees_host_reads_and_data_dependent_ops():
    x = torch.randn(6)
    with SyncRecorder() as recorder:
        float(x.sum())
        bool(x[0] > 0)
        x[x > 0]
        torch.where(x > 0)
        x.unique()
        torch.repeat_interleave(torch.arange(3), torch.full((3,), 2))
        x.tolist()
        torch.tensor([1, 2])
    assert len(recorder.calls) == 8, recorder.report()
    assert 'float(x.sum())' in recorder.calls[0][1]  # the stack names the line that synchronized
    with SyncRecorder() as recorder:
        torch.repeat_interleave(torch.arange(3), torch.full((3,), 2), output_size=6)
        torch.where(x > 0, x, 0)
        x.nonzero_static(size=6)
        torch.full((), 2.0) * x
    assert recorder.calls == [], recorder.report()


def test_recorder_ignores_host_tensors_when_told_to():
    with SyncRecorder(host_is_device=False) as recorder:
        float(torch.ones(()))
        torch.tensor([1.0]).tolist()
    assert recorder.calls == []


# ----------------------------------------------------------------------------- augmentations

REGULARIZERS = {
    'none': {},
    'cutout': dict(use_cutout=True),
    'cutout_inside_half': dict(use_cutout=True, cutout_inside=True, cutout_prob=0.5),
    'random_erasing': dict(use_random_erasing=True),
    'mixup': dict(use_mixup=True),
    'ricap': dict(use_ricap=True),
    'cutmix': dict(use_cutmix=True),
    'cutmix_continuous_half': dict(use_cutmix=True, cutmix_box='continuous', cutmix_prob=0.5),
    'dual_cutout': dict(use_dual_cutout=True),
    'dual_cutout_logits': dict(use_dual_cutout=True, dual_cutout_distance='logits'),
    'label_smoothing': dict(use_label_smoothing=True),
    'cutout_erasing_mixup_smoothing': dict(use_cutout=True, use_random_erasing=True, use_mixup=True,
                                           use_label_smoothing=True),
}


@pytest.mark.parametrize('options', REGULARIZERS.values(), ids=REGULARIZERS.keys())
def test_batch_regularizer_loss_and_accuracy_are_sync_free(options):
    regularizer = augmentations.BatchRegularizer(10, **options)
    torch.manual_seed(0)
    images, labels = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    with SyncRecorder() as recorder:
        for _ in range(3):
            mixed, targets = regularizer(images, labels)
            logits = torch.randn(mixed.shape[0], 10, requires_grad=True)
            loss = regularizer.loss(logits, targets)
            loss.backward()
            regularizer.accuracy(logits.detach(), targets)
    assert recorder.calls == [], recorder.report()


@pytest.mark.parametrize('padding_mode', ['zeros', 'reflect'])
def test_device_loader_augmentations_are_sync_free(padding_mode):
    images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8)
    phase = torch.rand(BATCH) < 0.5
    normalize = augmentations.Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    normalize(images)  # the constants are built once per device, outside the per-batch path
    with SyncRecorder() as recorder:
        for epoch in (1, 2):
            flip = augmentations.alternating_flip(phase, epoch)
            cropped = augmentations.random_crop(images, 4, True, padding_mode=padding_mode, flip=flip)
            augmentations.random_crop(images, 4, True, padding_mode=padding_mode)
            augmentations.random_horizontal_flip(normalize(cropped))
    assert recorder.calls == [], recorder.report()


@pytest.mark.parametrize('method', [augmentations.mixup, augmentations.cutmix, augmentations.ricap])
def test_beta_draws_reject_nonpositive_concentration_on_the_host(method):
    images, targets = torch.randn(4, 3, 8, 8), augmentations.one_hot(torch.arange(4), 4)
    with pytest.raises(ValueError, match='concentration'):
        method(images, targets, 0.0)


# ----------------------------------------------------------------------------- the training step

@pytest.fixture
def cuda_kernels(monkeypatch):
    """Build sgd/adam/adamw with the fused kernels that optim chooses for CUDA parameters.

    On the CPU optim falls back to the foreach kernels; those keep Adam's step counter on the host
    (read with ``.item()``, harmless on a GPU as well) and leave GradScaler to read found_inf on the
    host, while the fused kernels a GPU run uses take the scale and found_inf on the device.
    """
    if hasattr(optim, '_kernel_options'):
        monkeypatch.setattr(optim, '_kernel_options', lambda groups: {'fused': True})


def make_trainer(*flags, device=torch.device('cpu')):
    args = main.parse_args(['--outdir', 'unused', '--arch', 'resnet', '--depth', '8', '--base_channels', '4',
                            '--batch_size', str(BATCH), '--device', device.type, *flags])
    torch.manual_seed(0)
    model = models.create_model('resnet', depth=8, base_channels=4, num_classes=10, in_channels=3).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return build_trainer(model, args, device, scheduler='cosine', epochs=2, steps_per_epoch=4, warmup_epochs=1)


def batches(count, device=torch.device('cpu')):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 32, 32, generator=generator).to(device),
             torch.randint(0, 10, (BATCH,), generator=generator).to(device)) for _ in range(count)]


def skip_without_muon(flags):
    if '--optimizer' in flags and flags[flags.index('--optimizer') + 1] == 'muon' and not hasattr(torch.optim, 'Muon'):
        pytest.skip('--optimizer muon needs torch.optim.Muon (torch 2.9 or later)')


def known_sync(trainer):
    """Why ``trainer``'s step still synchronizes, from code outside Trainer, or None."""
    if isinstance(trainer.ema, torch.optim.swa_utils.AveragedModel):
        return ('optim.create_ema returns torch.optim.swa_utils.AveragedModel, whose update_parameters '
                'reads n_averaged on the host twice per step (bool(self.n_averaged == 0), '
                'if self.n_averaged > 0)')
    if trainer.scaler.is_enabled() and not getattr(trainer.optimizer, '_step_supports_amp_scaling', False):
        return (f'GradScaler.step reads found_inf on the host (.item() in GradScaler._maybe_opt_step) unless '
                f'the optimizer takes grad_scale/found_inf on the device (_step_supports_amp_scaling); '
                f'{type(trainer.optimizer).__name__} in optim.py does not')
    return None


REGULARIZER_FLAGS = {
    'cutout': ['--use_cutout'], 'random_erasing': ['--use_random_erasing'], 'mixup': ['--use_mixup'],
    'ricap': ['--use_ricap'], 'cutmix': ['--use_cutmix'], 'dual_cutout': ['--use_dual_cutout'],
    'label_smoothing': ['--use_label_smoothing'],
}
OPTIMIZERS = ('sgd', 'adam', 'adamw', 'lars', 'adabound', 'muon')
TRAIN_CASES = {
    'default': [],
    **REGULARIZER_FLAGS,
    # fp16 needs a GradScaler, which main.py does not combine with muon or SAM
    **{f'{name}-{precision}': ['--optimizer', name, '--precision', precision]
       for name in OPTIMIZERS for precision in ('fp32', 'bf16', 'fp16') if (name, precision) != ('muon', 'fp16')},
    **{f'sam-{name}': ['--use_sam', '--optimizer', name] for name in OPTIMIZERS if name != 'muon'},
    'asam-sgd-bf16': ['--use_sam', '--sam_adaptive', '--precision', 'bf16'],
    'ema': ['--ema_decay', '0.9'],
    'ema-sam': ['--ema_decay', '0.9', '--use_sam'],
    'subdivision': ['--subdivision', '2'],
    'gradient_clip': ['--gradient_clip', '1'],
    'channels_last': ['--channels_last'],
    'muon-channels_last': ['--optimizer', 'muon', '--channels_last'],
    'fp16-clip-subdivision': ['--precision', 'fp16', '--gradient_clip', '1', '--subdivision', '2'],
    'adamw-bf16-everything': ['--optimizer', 'adamw', '--precision', 'bf16', '--channels_last', '--subdivision', '2',
                              '--gradient_clip', '1', '--use_cutmix', '--use_label_smoothing',
                              '--no_weight_decay_on_bn'],
}


@pytest.mark.parametrize('flags', TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_train_step_is_sync_free(flags, cuda_kernels, request):
    skip_without_muon(flags)
    trainer = make_trainer(*flags)
    reason = known_sync(trainer)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    first, *recorded = batches(4)
    trainer.model.train()
    # the first step creates optimizer state and the GradScaler's scale: one-time work, not per step
    trainer.train_step(*first)
    with SyncRecorder() as recorder:
        for images, labels in recorded:
            loss, accuracy = trainer.train_step(images, labels)
    assert recorder.calls == [], recorder.report()
    assert torch.isfinite(loss) and 0 <= accuracy <= 1


def test_train_one_epoch_reads_the_device_once_per_epoch_not_per_step(cuda_kernels):
    counts = []
    for steps in (2, 5):
        trainer = make_trainer()
        trainer.train_step(*batches(1)[0])
        with SyncRecorder() as recorder:
            record = trainer.train_one_epoch(batches(steps), 1, engine.make_progress(enabled=False))
        counts.append(len(recorder.calls))
    assert counts[0] == counts[1], recorder.report()
    assert record['train_images_per_sec'] > 0


GPU_CASES = {
    'default': [],
    'fp16-clip-subdivision': ['--precision', 'fp16', '--gradient_clip', '1', '--subdivision', '2'],
    'bf16-channels_last-mixup-adamw': ['--precision', 'bf16', '--channels_last', '--use_mixup', '--optimizer', 'adamw'],
    'ricap-label_smoothing-sam': ['--use_ricap', '--use_label_smoothing', '--use_sam'],
    'cutmix-lars': ['--use_cutmix', '--optimizer', 'lars'],
    'dual_cutout-erasing-adabound': ['--use_dual_cutout', '--use_random_erasing', '--optimizer', 'adabound'],
    'lars-fp16': ['--optimizer', 'lars', '--precision', 'fp16'],
    'adabound-fp16-clip': ['--optimizer', 'adabound', '--precision', 'fp16', '--gradient_clip', '1'],
    'muon-bf16-channels_last': ['--optimizer', 'muon', '--precision', 'bf16', '--channels_last'],
    'ema-subdivision': ['--ema_decay', '0.9', '--subdivision', '2'],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('flags', GPU_CASES.values(), ids=GPU_CASES.keys())
def test_train_step_is_sync_free_on_cuda(flags, request):
    skip_without_muon(flags)
    device = torch.device('cuda')
    trainer = make_trainer(*flags, device=device)
    reason = known_sync(trainer)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    steps = batches(5, device)
    trainer.model.train()
    for images, labels in steps[:2]:
        trainer.train_step(images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        with SyncRecorder(host_is_device=False) as recorder:
            for images, labels in steps[2:]:
                loss, _ = trainer.train_step(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert recorder.calls == [], recorder.report()
    assert torch.isfinite(loss)
