"""The training engine: the model as it is trained, one optimization step, an epoch, evaluation with
test-time augmentation, progress, the learning-rate range test.

It takes plain objects, not the command line: main.py, the benchmarks and the tests build it alike,

    model = engine.build_model(settings, data.info, device)
    trainer = engine.Trainer(model, optimizer, scheduler, regularizer, device, **engine.trainer_kwargs(args))
    record = trainer.train_one_epoch(data.train_loader, epoch)
    record.update(trainer.evaluate_all(data.test_loader, split))

A step regularizes the whole batch, splits it into ghost sub-batches, accumulates their gradients
and steps the optimizer; nothing in it reads a device value on the host, so the host queues steps
ahead of the GPU. The run folder (checkpoints, logs) is runs.py's.
"""
import contextlib
import copy
import functools
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import augmentations
import models
import optim
import utils
from flags import UsageError, first_line

# Non-finite losses are flagged on the device every step and read on the host at most every this many
# steps (and at each checkpoint and epoch end): the run stops within this many steps of a divergence.
NONFINITE_CHECK_EVERY = 100
# Under torchrun the ranks agree on a stop signal every this many steps (one tiny all-reduce).
STOP_CHECK_EVERY = 10
_NEVER = 2**62


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a checkpoint: main.py prints the message, exits 128 + signal."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------- the model

def build_model(settings, info, device):
    """``settings.arch`` with its model flags for the dataset ``info``, on ``device``: re-initialized with
    ``settings.init`` if given, BN scales frozen with ``bn_weight_freeze``, in channels_last memory with
    ``channels_last``."""
    model = models.create_model(settings.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                                image_size=info.image_size, **models.model_kwargs(settings))
    if getattr(settings, 'init', None) is not None:
        models.common.reinitialize(model, settings.init)
    model = model.to(device)
    if getattr(settings, 'bn_weight_freeze', False):
        optim.freeze_norm_weights(model)
    if getattr(settings, 'channels_last', False):
        model = model.to(memory_format=torch.channels_last)
    return model


def initialize_from_data(model, loader, max_images=5000):
    """Data-dependent initialization (airbench's patch whitening) from the first training images."""
    layers = [module for module in model.modules() if hasattr(module, 'initialize_from_images')]
    if not layers:
        return
    if hasattr(loader, 'images'):
        images = loader.normalize(loader.images[:max_images])
    else:
        batches, count = [], 0
        for batch, _ in loader:
            batches.append(batch)
            count += len(batch)
            if count >= max_images:
                break
        images = torch.cat(batches)[:max_images]
    for layer in layers:
        layer.initialize_from_images(images)


def rank_batch_size(batch_size, subdivision=1, ghost_bn_splits=None, dist=utils.SINGLE_PROCESS):
    """This rank's part of the global ``batch_size``, which must split evenly into ranks x ``subdivision``
    sub-batches, each of which ``ghost_bn_splits`` (resnet9's ghost batch norm) must divide."""
    parts = dist.world_size * subdivision
    if batch_size % parts:
        if not dist.enabled:
            raise UsageError(f'--subdivision {subdivision} must divide --batch_size {batch_size}')
        by = f'{dist.world_size} ranks' + (f' x --subdivision {subdivision}' if subdivision > 1 else '')
        raise UsageError(f'--batch_size {batch_size} is the global batch: it must split evenly into {by} '
                         f'(use a multiple of {parts})')
    per_rank = batch_size // dist.world_size
    if ghost_bn_splits and (per_rank // subdivision) % ghost_bn_splits:
        if not dist.enabled:
            raise UsageError(f'--ghost_bn_splits {ghost_bn_splits} must divide the batch of '
                             f'{batch_size // subdivision} images each forward pass sees '
                             f'(--batch_size {batch_size}, --subdivision {subdivision})')
        raise UsageError(f'--ghost_bn_splits {ghost_bn_splits} must divide the {per_rank // subdivision} '
                         f'images each forward pass of a rank sees (--batch_size {batch_size} over '
                         f'{dist.world_size} ranks, --subdivision {subdivision})')
    return per_rank


# ----------------------------------------------------------------------------- training

def trainer_kwargs(args):
    """The Trainer's options from the command line's settings."""
    return dict(precision=args.precision, subdivision=args.subdivision, channels_last=args.channels_last,
                gradient_clip=args.gradient_clip, ema_decay=args.ema_decay, ema_every=args.ema_every,
                lookahead_every=args.lookahead_every, lookahead_decay=args.lookahead_decay,
                sam_freeze_bn_stats=args.sam_freeze_bn_stats, skip_nonfinite=args.skip_nonfinite,
                compile=args.compile, compile_mode=args.compile_mode, tta=args.tta,
                kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha, save_every_steps=args.save_every_steps)


class Trainer:
    """One optimization step, an epoch and an evaluation pass, with AMP, ghost batches, SAM, EMA,
    lookahead, knowledge distillation and torch.compile.

    A step regularizes the whole batch, splits it into ``subdivision`` sub-batches (ghost batch
    norm, accumulated gradients) with ``regularizer.split`` and runs the model through
    ``regularizer.forward`` (one pass, or one per Dual-Cutout view). ``teacher``, a model in eval
    mode, adds the distillation loss (arXiv 1503.02531).

    Nothing in a step reads a device value on the host: losses and accuracies are summed on the
    device and read once per epoch, so the host queues steps ahead of the GPU.

    Distributed (``dist`` enabled): the step runs ``network``, the model in DistributedDataParallel,
    whose backward averages the gradients of the ranks (once per step: the sub-batches before the
    last accumulate under ``no_sync``); ``model`` is the same module unwrapped, which the EMA,
    lookahead, evaluation and checkpoints use. The epoch's metrics are summed over the ranks and
    every rank takes rank 0's buffers at the end of each epoch (see :meth:`end_epoch`).
    """

    def __init__(self, model, optimizer, scheduler, regularizer, device, *, total_steps=None, network=None,
                 dist=utils.SINGLE_PROCESS, teacher=None, precision='fp32', subdivision=1, channels_last=False,
                 gradient_clip=0.0, ema_decay=0.0, ema_every=1, lookahead_every=0, lookahead_decay=0.95,
                 sam_freeze_bn_stats=True, skip_nonfinite=0, compile=False, compile_mode=None, compile_backend='inductor',
                 tta='none', kd_temperature=4.0, kd_alpha=0.9, save_every_steps=0):
        self.use_sam = isinstance(optimizer, optim.SAM)
        if self.use_sam and precision == 'fp16':
            raise UsageError('--use_sam with --precision fp16 is not supported (use bf16 or fp32)')
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.network = model if network is None else network
        self.regularizer, self.device, self.dist, self.teacher = regularizer, device, dist, teacher
        self.total_steps = total_steps
        self.subdivision, self.channels_last, self.gradient_clip = subdivision, channels_last, gradient_clip
        self.sam_freeze_bn_stats, self.skip_nonfinite, self.tta = sam_freeze_bn_stats, skip_nonfinite, tta
        self.kd_temperature, self.kd_alpha, self.save_every_steps = kd_temperature, kd_alpha, save_every_steps
        self.amp_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
        self.ema = optim.create_ema(model, ema_decay, every=ema_every) if ema_decay > 0 else None
        self.lookahead = None
        if lookahead_every > 0:
            self.lookahead = optim.Lookahead(model, total_steps, lookahead_every, lookahead_decay)
        self.stop = None  # a utils.StopSignals while training
        self.last_nonfinite = None  # the last step's non-finite flag (a device bool)
        self.nonfinite_before = 0  # non-finite steps of the epochs before this one
        self._eager_functions()
        if compile:
            try:
                self._compile(functools.partial(torch.compile, mode=compile_mode, backend=compile_backend))
            except Exception as error:  # no compiler toolchain, unsupported platform or python
                _compile_fallback_message(error, 'unavailable', dist)
                self._eager_functions()

    def _eager_functions(self):
        """The parts of a step that --compile compiles, as plain Python."""
        self.forward_loss, self.eval_forward = self._forward_loss, self.model
        self.step_forward, self.perturb, self.apply_update = self._step_forward, self._perturb, self._apply_update
        self.accumulate = _accumulate
        self.ema_blend = self.ema.blend if self.ema is not None else None
        self.compiled_step = False  # the whole step in compiled regions (see _compiled_step)
        self._lr_table = None  # the schedule's learning rates, written on the device by the compiled step
        self._compile_pending = {'train': False, 'eval': False}

    def _compile(self, compiled):
        """--compile: the whole step in a few compiled regions (:meth:`_compiled_step`), the schedule's
        learning rates in device tensors written from a table inside them, so that nothing recompiles and
        ``--compile_mode reduce-overhead`` replays each region as a CUDA graph. Under DistributedDataParallel
        (its gradient hooks) and fp16 (GradScaler's host logic) only the forward pass and loss compile,
        with their backward (AOTAutograd)."""
        self.eval_forward = compiled(self.model)
        self._compile_pending = {'train': True, 'eval': True}
        if self.dist.enabled or self.scaler.is_enabled():
            self.forward_loss = compiled(self._forward_loss)
            return
        optim.prepare_for_compile(self.optimizer)
        self._create_optimizer_state()
        self.step_forward, self.perturb, self.apply_update, self.accumulate = (
            compiled(function) for function in (self._step_forward, self._perturb, self._apply_update, _accumulate))
        if self.ema is not None:
            self.ema.track(self.model)
            self.ema_blend = compiled(self.ema.blend)
        self._lr_tensors = [group['lr'] for group in self.optimizer.param_groups]
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR) and self.total_steps is not None:
            # LambdaLR's own values, base_lr x lambda(step), for every step of the run; row k: after k steps
            rows = [[base_lr * schedule(step) for base_lr, schedule in zip(self.scheduler.base_lrs,
                                                                          self.scheduler.lr_lambdas)]
                    for step in range(self.total_steps + 1)]
            self._lr_table = torch.tensor(rows, dtype=torch.float64, device=self.device)
            self._lr_step = torch.full((), self.scheduler.last_epoch, dtype=torch.int64, device=self.device)
        self.compiled_step = True

    @torch.no_grad()
    def _create_optimizer_state(self):
        """The optimizer's state as a first step creates it: one eager step on zero gradients, then the
        weights put back and the created state zeroed (what a first step finds: zero momentum, Adam's
        step count 0)."""
        snapshot = self._snapshot()
        params = [param for group in self.optimizer.param_groups for param in group['params']]
        for param in params:
            param.grad = torch.zeros_like(param)
        inner = self.optimizer.base_optimizer if self.use_sam else self.optimizer
        type(inner).step(inner)
        self._restore_if(torch.ones((), dtype=torch.bool, device=self.device), snapshot)
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self):
        """What a resumed run needs besides the model's weights (which the run folder keeps apart):
        the optimizer, the schedule, the AMP scaler, the EMA and lookahead copies."""
        state = {'optimizer': optim.plain_lrs(self.optimizer.state_dict()), 'scheduler': self.scheduler.state_dict(),
                 'scaler': self.scaler.state_dict()}
        if self.ema is not None:
            state['ema'] = self.ema.state_dict()
        if self.lookahead is not None:
            state['lookahead'] = self.lookahead.state_dict()
        return state

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None:
            self.ema.load_state_dict(state['ema'])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state['lookahead'])
        if self.compiled_step:  # the loaded groups hold float learning rates: back into the device tensors
            for group, lr in zip(self.optimizer.param_groups, self._lr_tensors):
                lr.fill_(group['lr'])
                group['lr'] = lr
            optim.prepare_for_compile(self.optimizer)
            if self._lr_table is not None:
                self._lr_step.fill_(self.scheduler.last_epoch)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _prepare(self, images):
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _forward_loss(self, images, targets):
        with self.autocast():
            logits = self.regularizer.forward(self.network, images)
            if self.teacher is not None:
                # the same (mixed, cut, two-view) images, under the same autocast, no graph kept; in
                # eval mode its logits do not depend on the batch, so one pass serves every view
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
        logits = logits.float()
        loss = self.regularizer.loss(logits, targets)
        if self.teacher is not None:
            distillation = augmentations.distillation_loss(logits, teacher_logits.float(), self.kd_temperature)
            loss = self.kd_alpha * distillation + (1 - self.kd_alpha) * loss
        return logits, loss

    def _first_call(self, kind, compiled_call, eager_call):
        """Run a compiled function for the first time; if compiling fails, say why once and go on eager.

        A failure is the compiler's only if the same call succeeds eagerly: an error that eager
        code raises too is a bug of the caller and propagates.
        """
        try:
            return compiled_call()
        except Exception as error:  # dynamo, inductor or a missing compiler toolchain
            result = eager_call()
            _compile_fallback_message(error, f'failed at the first {kind} step', self.dist)
            self._eager_functions()
            return result
        finally:
            self._compile_pending[kind] = False

    def compile_ahead(self, train_loader, test_loader):
        """Compile the training step and the evaluation forward before training, so that no
        epoch's time includes compilation; returns the seconds it took.

        One batch of each loader goes through them (a whole step, with the compiled step); the model's
        weights and buffers, the optimizer's state, the EMA, the learning rates, the gradients and the
        random generators are restored afterwards, so training starts as without it. (A rank that holds
        no test batch has nothing to evaluate and compiles nothing for it.)
        """
        rng_state, saved = utils.get_rng_state(), self._snapshot()
        self._synchronize()
        start = time.perf_counter()
        self.network.train()
        images, labels = train_loader.example_batch()
        if self.compiled_step:
            ema_state = copy.deepcopy(self.ema.state_dict()) if self.ema is not None else None
            lrs = [lr.clone() for lr in self._lr_tensors]
            lr_step = self._lr_step.clone() if self._lr_table is not None else None
            self.optimizer.zero_grad(set_to_none=True)
            loss, accuracy, bad = self._compiled_step(images, labels)
            _EpochState(self.device, 0.0).update(loss, accuracy, len(labels), bad, self.accumulate)
            if self.ema is not None:
                self.ema_blend(self.model)
                self.ema.load_state_dict(ema_state)
            torch._foreach_copy_(self._lr_tensors, lrs)
            if lr_step is not None:
                self._lr_step.copy_(lr_step)
        else:
            self._forward_backward(self._sub_batches(images, labels)[:1])
        self.optimizer.zero_grad(set_to_none=True)
        test_batch = next(iter(test_loader), None)
        if test_batch is not None:
            self.evaluate(_FixedBatch(*test_batch, test_loader.batch_size), gather=False)
        self._synchronize()
        elapsed = time.perf_counter() - start
        self._restore_if(torch.ones((), dtype=torch.bool, device=self.device), saved)  # weights, buffers, state
        utils.set_rng_state(rng_state)
        return elapsed

    def _forward_backward(self, chunks):
        """Accumulate gradients over ghost sub-batches; returns (loss, accuracy) of the batch."""
        batch_size = sum(len(targets) for _, targets in chunks)
        total_loss, total_correct = 0.0, 0.0
        for index, (images, targets) in enumerate(chunks):
            images = self._prepare(images)
            # DDP averages the gradients once per step, in the backward pass of the last sub-batch
            accumulate = self.network.no_sync() if index < len(chunks) - 1 and self.network is not self.model \
                else contextlib.nullcontext()
            with accumulate:
                if self._compile_pending['train']:
                    logits, loss = self._first_call('train', lambda: self.forward_loss(images, targets),
                                                    lambda: self._forward_loss(images, targets))
                else:
                    logits, loss = self.forward_loss(images, targets)
                self.scaler.scale(loss * (len(targets) / batch_size)).backward()
            total_loss += loss.detach() * len(targets)
            total_correct += self.regularizer.accuracy(logits.detach(), targets) * len(targets)
        return total_loss / batch_size, total_correct / batch_size

    def _sub_batches(self, images, labels):
        """Regularize the whole batch (one mixing lambda and permutation, as the original tool's
        train.py), then split it into the sub-batches of the step."""
        return self.regularizer.split(*self.regularizer(images, labels), self.subdivision)

    def train_step(self, images, labels):
        """One step; returns (loss, accuracy), device scalars, and sets :attr:`last_nonfinite`, a device
        bool, True where the loss was NaN or infinite (with ``skip_nonfinite`` the step then leaves
        weights, buffers and optimizer state as they were)."""
        snapshot = self._snapshot() if self.skip_nonfinite > 0 else None
        self.optimizer.zero_grad(set_to_none=True)
        if self.compiled_step:
            loss, accuracy, nonfinite = self._compiled_step(images, labels)
        else:
            loss, accuracy, nonfinite = self._eager_step(images, labels, skipping=snapshot is not None)
        if snapshot is not None:
            self._restore_if(nonfinite, snapshot)
        if self._lr_table is not None:
            self.scheduler.last_epoch += 1  # the compiled update wrote the next lr on the device
        else:
            self.scheduler.step()
        if self.lookahead is not None:
            self.lookahead.step(self.scheduler.last_epoch)
        if self.ema is not None and self.ema.due():
            self.ema_blend(self.model)
        self.last_nonfinite = nonfinite
        return loss, accuracy

    def _eager_step(self, images, labels, skipping):
        """The step op by op (and, with --compile under DDP or fp16, its forward pass and loss compiled)."""
        chunks = self._sub_batches(images, labels)
        loss, accuracy = self._forward_backward(chunks)
        nonfinite = ~torch.isfinite(loss)
        if self.dist.enabled and skipping:  # every rank skips the step that any rank found bad
            nonfinite = self.dist.all_reduce_max_(nonfinite.to(torch.int32)).bool()
        utils.kill_point('step')
        if self.use_sam:
            self.optimizer.first_step(zero_grad=True)
            with optim.frozen_bn_statistics(self.model, enabled=self.sam_freeze_bn_stats):
                self._forward_backward(chunks)
            self._clip()
            self.optimizer.second_step(zero_grad=False)
        else:
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss, accuracy, nonfinite

    def _compiled_step(self, images, labels):
        """The step as compiled regions: (1) :meth:`_step_forward`: regularize, split into the ghost
        sub-batches and forward each, their losses summed by their shares; (2) its backward, which
        AOTAutograd compiled with it; (3) :meth:`_apply_update`: clip, step the optimizer, write the
        next learning rate. SAM adds its perturbation and a second forward and backward between (2)
        and (3). The sub-batches backpropagate together: the gradient of the eager step's accumulation,
        BatchNorm statistics per sub-batch, the activation memory of the whole batch."""
        if self._compile_pending['train']:
            outputs = self._first_call('train', lambda: self.step_forward(images, labels),
                                       lambda: self._step_forward(images, labels))
        else:
            outputs = self.step_forward(images, labels)
        if not self.compiled_step:  # compiling failed at the first call: this step goes on eagerly
            return self._eager_step(images, labels, skipping=False)
        objective, loss, accuracy, nonfinite, images, targets = outputs
        objective.backward()
        utils.kill_point('step')
        if self.use_sam:
            self.perturb()
            self.optimizer.zero_grad(set_to_none=True)
            with optim.frozen_bn_statistics(self.model, enabled=self.sam_freeze_bn_stats):
                self.step_forward(images, targets, True)[0].backward()
        self.apply_update()
        self.optimizer._opt_called = True  # what the LR scheduler's wrapper of step() would have noted
        return loss, accuracy, nonfinite

    def _step_forward(self, images, labels, regularized=False):
        """Regularized images (unless ``regularized``: SAM's second pass takes the first's) split into the
        sub-batches and forwarded: (objective, loss, accuracy, non-finite flag, images, targets), the
        objective the sub-batches' losses weighted by their share of the batch."""
        if not regularized:
            images, labels = self.regularizer(images, labels)
        objective, accuracy = 0.0, 0.0
        for chunk_images, chunk_targets in self.regularizer.split(images, labels, self.subdivision):
            logits, chunk_loss = self._forward_loss(self._prepare(chunk_images), chunk_targets)
            share = len(chunk_targets) / len(labels)
            objective = objective + chunk_loss * share
            accuracy = accuracy + self.regularizer.accuracy(logits.detach(), chunk_targets) * share
        loss = objective.detach()
        return objective, loss, accuracy, ~torch.isfinite(loss), images, labels

    def _perturb(self):
        self.optimizer.first_step(zero_grad=False)

    def _apply_update(self):
        """Clip, step the optimizer and (with a table of the schedule) write the next step's learning rates."""
        self._clip()
        if self.use_sam:
            self.optimizer.second_step(zero_grad=False)
        else:
            # the class's step: an LR scheduler wraps the instance's, which torch.compile does not trace
            type(self.optimizer).step(self.optimizer)
        if self._lr_table is not None:
            self._lr_step += 1
            # index_select, not [step]: indexing by a 0-dim tensor reads it on the host
            row = self._lr_table.index_select(0, self._lr_step.clamp(max=len(self._lr_table) - 1).view(1))
            torch._foreach_copy_(self._lr_tensors, row[0].unbind())

    def _state_tensors(self):
        """The tensors a step changes: parameters, buffers and the optimizer's state (of SAM's base
        optimizer, Muon's two optimizers and its filter matrices too)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        pending, seen = [self.optimizer], set()
        while pending:
            optimizer = pending.pop()
            if id(optimizer) in seen:
                continue
            seen.add(id(optimizer))
            for state in optimizer.state.values():
                tensors += [value for value in state.values() if torch.is_tensor(value)]
            for value in vars(optimizer).values():
                if isinstance(value, torch.optim.Optimizer):
                    pending.append(value)
                elif isinstance(value, list) and value and all(torch.is_tensor(item) for item in value):
                    tensors += value
        unique = {}
        for tensor in tensors:
            unique.setdefault(id(tensor), tensor)
        return list(unique.values())

    @torch.no_grad()
    def _snapshot(self):
        tensors = self._state_tensors()
        return dict(zip(map(id, tensors), torch._foreach_clone([tensor.detach() for tensor in tensors])))

    @torch.no_grad()
    def _restore_if(self, nonfinite, snapshot):
        """Undo the step on the device where ``nonfinite`` (no host sync, as GradScaler skips a step):
        every tensor goes back to its snapshot; state the step created starts from zero."""
        for tensor in self._state_tensors():
            saved = snapshot.get(id(tensor))
            if saved is None:
                saved = torch.zeros_like(tensor)
            torch.where(nonfinite.to(tensor.device), saved, tensor, out=tensor)  # as optim's fp16 handoff

    def _clip(self):
        if self.gradient_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.gradient_clip)

    def _synchronize(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def train_one_epoch(self, loader, epoch, progress=None, position=None, checkpoint=None):
        """Train epoch ``epoch``; from the step that ``position`` (a mid-epoch checkpoint's) reached, if
        given. Returns the epoch's record: lr at its first step, train loss and accuracy, time, images
        per second, non-finite steps.

        ``checkpoint(position)``, if given, writes a mid-epoch checkpoint: every ``save_every_steps``
        steps, and when a stop signal came (then :class:`Interrupted` is raised after it). A position
        holds what the rest of the epoch needs to run as the uninterrupted one: the step, the epoch's
        order of images, the lr of its first step, and each rank's partial meters and non-finite counters.
        """
        self.network.train()
        epoch_state = _EpochState(self.device, float(self.optimizer.param_groups[0]['lr']))
        if position is not None:  # the loader was started at that step (its start_at)
            epoch_state.restore(position, self.dist.rank, self.device)
        timer = utils.DeviceTimer(self.device)
        progress = progress or make_progress(enabled=False)
        for images, labels in progress(loader, f'epoch {epoch} train', epoch_state.counters):
            # the scheduler counts the steps taken: a fractional last epoch stops at the budget
            if self.total_steps is not None and self.scheduler.last_epoch >= self.total_steps:
                break
            loss, accuracy = self.train_step(images, labels)
            epoch_state.update(loss, accuracy, len(labels), self.last_nonfinite, self.accumulate)
            if epoch_state.step % NONFINITE_CHECK_EVERY == 0:
                self._check_nonfinite(epoch, epoch_state)
            signum = self.stop_requested(epoch_state.step)
            every = self.save_every_steps
            if signum or (every and self.scheduler.last_epoch % every == 0 and epoch_state.step < len(loader)):
                if checkpoint is not None:
                    self._check_nonfinite(epoch, epoch_state)  # never save NaN weights
                    checkpoint(epoch_state.position(epoch, loader, timer, self.dist))
                if signum:
                    raise Interrupted(signum, f'stopped by {utils.signal_name(signum)} in epoch {epoch} after step '
                                              f'{epoch_state.step}; checkpoint.pth resumes at that step')
        elapsed = epoch_state.train_time_before + timer.elapsed()
        nonfinite_steps = self._check_nonfinite(epoch, epoch_state)
        bad_count = int(self.dist.all_reduce_sum_(epoch_state.bad_images.clone()))
        loss, accuracy, count = self.end_epoch(epoch_state.loss, epoch_state.accuracy, bad_count)
        if not math.isfinite(loss):
            raise FloatingPointError(f'training loss became {loss} in epoch {epoch}')
        self.nonfinite_before += nonfinite_steps
        return {'epoch': epoch, 'lr': epoch_state.lr, 'train_loss': loss, 'train_accuracy': accuracy,
                'train_time': elapsed, 'train_images_per_sec': count / elapsed, 'nonfinite_steps': nonfinite_steps,
                'train_accuracy_kind': 'lambda-weighted' if self.regularizer.mixes_labels else 'plain'}

    def stop_requested(self, step=None):
        """The signal number a stop signal asked for (0: none). Single process: a Python attribute the
        handler set. Distributed: the ranks agree every STOP_CHECK_EVERY steps (and at ``step`` None)."""
        if self.stop is None:
            return 0
        if not self.dist.enabled:
            return self.stop.signum or 0
        if step is not None and step % STOP_CHECK_EVERY:
            return 0
        flag = torch.tensor([self.stop.signum or 0], dtype=torch.int64, device=self.device)
        return int(self.dist.all_reduce_max_(flag))

    def _check_nonfinite(self, epoch, epoch_state):
        """Read the device's non-finite counters (a host sync: every NONFINITE_CHECK_EVERY steps, at
        checkpoints and at the epoch's end); raise FloatingPointError once more than ``skip_nonfinite``
        steps of the run had a non-finite loss. Returns this epoch's count."""
        count = int(epoch_state.nonfinite)
        if self.dist.enabled and self.skip_nonfinite == 0:  # without skipping each rank flags its own loss
            count = int(self.dist.all_reduce_max_(epoch_state.nonfinite.clone()))
        if self.nonfinite_before + count > self.skip_nonfinite:
            first = int(epoch_state.first_nonfinite)
            if self.dist.enabled:
                first = -int(self.dist.all_reduce_max_(-epoch_state.first_nonfinite.clone()))
            limit = (f'{self.nonfinite_before + count} non-finite steps in this run, more than --skip_nonfinite '
                     f'{self.skip_nonfinite}' if self.skip_nonfinite else '--skip_nonfinite N skips such steps')
            raise FloatingPointError(f'non-finite training loss at epoch {epoch}, step {first} ({limit})')
        return count

    def end_epoch(self, loss_meter, accuracy_meter, skipped_images=0):
        """The epoch's mean loss, accuracy and image count over all ranks; then every rank takes rank
        0's buffers (BatchNorm statistics, which each rank gathered from its own images; the EMA's
        and the lookahead copies' too), so that what is evaluated and saved is defined, and a run
        resumed from the checkpoint continues exactly as the uninterrupted one."""
        if not self.dist.enabled:
            count = max(loss_meter.count - skipped_images, 1)
            return float(loss_meter.total) / count, float(accuracy_meter.total) / count, loss_meter.count
        totals = torch.stack([torch.as_tensor(meter.total, dtype=torch.float64, device=self.device)
                              for meter in (loss_meter, accuracy_meter)]
                             + [torch.tensor(float(loss_meter.count), dtype=torch.float64, device=self.device)])
        loss_total, accuracy_total, count = self.dist.all_reduce_sum_(totals).tolist()
        buffers = list(self.model.buffers())
        if self.ema is not None:
            buffers += list(self.ema.module.buffers())
        if self.lookahead is not None:
            buffers += self.lookahead.slow
        self.dist.broadcast_tensors_(buffers)
        good = max(count - skipped_images, 1)
        return loss_total / good, accuracy_total / good, int(count)

    def evaluate(self, loader, model=None, progress=None, description='test', gather=True):
        """:func:`evaluate` of ``model`` (default: the trained model, compiled with ``compile``), over
        the test images of all ranks (``gather=False``: this rank's only)."""
        model = self.model if model is None else model
        forward = self.eval_forward if model is self.model else model

        def run(forward_fn, pad):
            return evaluate(model, loader, self.device, self.tta, self.autocast, self.channels_last,
                            progress, description, forward=forward_fn, pad_batches=pad,
                            dist=self.dist if gather else utils.SINGLE_PROCESS)
        if forward is not model and self._compile_pending['eval']:
            return self._first_call('eval', lambda: run(forward, True), lambda: run(model, False))
        return run(forward, forward is not model)

    def evaluate_all(self, loader, split='test', progress=None):
        """``{split}_loss``, ``{split}_accuracy``, time and images per second of the model, and the loss
        and accuracy of its EMA (``ema_{split}_...``) where there is one."""
        result = self.evaluate(loader, progress=progress, description=split)
        metrics = {f'{split}_{key}': value for key, value in result.items()}
        if self.ema is not None:
            ema_result = self.evaluate(loader, model=self.ema.module)
            metrics.update({f'ema_{split}_loss': ema_result['loss'], f'ema_{split}_accuracy': ema_result['accuracy']})
        return metrics


class _EpochState:
    """The meters of one epoch on the device (loss, accuracy, non-finite steps, the step of the first one,
    the images of skipped steps), the steps taken and the lr of its first step; a mid-epoch checkpoint
    saves and restores them (:meth:`position`, :meth:`restore`)."""

    COUNTERS = ('nonfinite', 'first_nonfinite', 'bad_images')

    def __init__(self, device, lr):
        self.lr, self.step, self.train_time_before = lr, 0, 0.0
        self.loss, self.accuracy = utils.AverageMeter(), utils.AverageMeter()
        self.loss.total = torch.zeros((), device=device)
        self.accuracy.total = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.first_nonfinite = torch.full((), _NEVER, dtype=torch.int64, device=device)
        self.bad_images = torch.zeros((), dtype=torch.int64, device=device)
        self.step_number = torch.zeros((), dtype=torch.int64, device=device)  # self.step, on the device

    def counters(self):
        """The running loss and accuracy, as progress shows them (a read of the device)."""
        return {'loss': f'{self.loss.average:.4f}', 'acc': f'{self.accuracy.average:.4f}'}

    def update(self, loss, accuracy, batch_size, bad, accumulate):
        """Count a step; ``accumulate``: :func:`_accumulate`, or its compiled form."""
        self.step += 1
        (self.loss.total, self.accuracy.total, self.nonfinite, self.first_nonfinite, self.bad_images,
         self.step_number) = accumulate(
            self.loss.total, self.accuracy.total, self.nonfinite, self.first_nonfinite, self.bad_images,
            self.step_number, loss, accuracy, bad, batch_size)
        self.loss.count += batch_size
        self.accuracy.count += batch_size

    def position(self, epoch, loader, timer, dist):
        """The position inside the epoch: its order of images, every rank's meters and the random state its
        augmentation was drawn from, gathered (on the host before they travel to rank 0: another machine's
        GPU cannot be named in the checkpoint)."""
        mine = {'loss_total': self.loss.total, 'accuracy_total': self.accuracy.total, 'count': self.loss.count,
                **{key: getattr(self, key) for key in self.COUNTERS}}
        mine = {key: value.cpu() if torch.is_tensor(value) else value for key, value in mine.items()}
        return {'epoch': epoch, 'step': self.step, 'order': loader.order.cpu(), 'lr': self.lr,
                'train_time': self.train_time_before + timer.elapsed(),
                'meters': dist.all_gather_object(mine), 'world_size': dist.world_size,
                'augment_rng': dict(enumerate(dist.all_gather_object(getattr(loader, 'augment_rng', None))))}

    def restore(self, position, rank, device):
        meters = position['meters'][rank]
        self.lr, self.step, self.train_time_before = position['lr'], position['step'], position['train_time']
        self.loss.total, self.accuracy.total = (_to_device(meters['loss_total'], device),
                                                _to_device(meters['accuracy_total'], device))
        self.loss.count = self.accuracy.count = meters['count']
        for key in self.COUNTERS:
            setattr(self, key, _to_device(meters[key], device))
        self.step_number = torch.full((), self.step, dtype=torch.int64, device=device)


def _accumulate(loss_total, accuracy_total, nonfinite, first_nonfinite, bad_images, step_number, loss, accuracy,
                bad, batch_size):
    """One step added to the epoch's device meters: the loss and accuracy sums over the good steps' images,
    the non-finite steps, the number of the first one, the images of the steps skipped; ``step_number`` the
    steps before this one. A compiled step compiles it (tensors in, tensors out: nothing recompiles)."""
    step_number = step_number + 1
    return (loss_total + torch.where(bad, 0.0, loss) * batch_size,
            accuracy_total + torch.where(bad, 0.0, accuracy) * batch_size,
            nonfinite + bad, torch.minimum(first_nonfinite, torch.where(bad, step_number, _NEVER)),
            bad_images + bad * batch_size, step_number)


def _to_device(value, device):
    return value.to(device) if torch.is_tensor(value) else value


class _FixedBatch(list):
    """One evaluation batch with the batch size of the loader it came from."""

    def __init__(self, images, labels, batch_size):
        super().__init__([(images, labels)])
        self.batch_size = batch_size


def _compile_fallback_message(error, what, dist=utils.SINGLE_PROCESS):
    dist.print(f'--compile: torch.compile {what} ({type(error).__name__}: {first_line(error, 200)}); running eager',
               file=sys.stderr)


# ----------------------------------------------------------------------------- evaluation

def tta_logits(forward, images, tta):
    """Logits averaged over test-time views: none, flip (image and mirror), or flip_translate
    (airbench, arXiv 2404.00498: the flip pair, averaged with the flip pairs of the image shifted
    one pixel up-left and one pixel down-right, reflect-padded)."""
    logits = forward(images).float()
    if tta == 'none':
        return logits
    logits = (logits + forward(images.flip(3)).float()) / 2
    if tta == 'flip':
        return logits
    height, width = images.shape[2:]
    padded = F.pad(images, (1, 1, 1, 1), mode='reflect')
    translated = [padded[:, :, :height, :width], padded[:, :, 2:, 2:]]
    shifted_logits = sum((forward(view).float() + forward(view.flip(3)).float()) / 2 for view in translated) / 2
    return (logits + shifted_logits) / 2


def check_tta(tta, info):
    """``--tta flip_translate`` mirrors the test images: only where training flips them (``info`` None: an
    image folder, whose images are flipped)."""
    if tta == 'flip_translate' and info is not None and not info.horizontal_flip:
        raise UsageError(f'--tta flip_translate: {info.name} images are not flipped in training '
                         f'(digits and characters are not mirror-symmetric); use --tta none')


def merge_sharded_batches(per_rank):
    """Per-batch results of the ranks (lists, as the evaluation loaders deal the batches out) in the
    order of the single-process batches."""
    world_size = len(per_rank)
    total = sum(len(results) for results in per_rank)
    return [per_rank[batch % world_size][batch // world_size] for batch in range(total)]


@torch.no_grad()
def evaluate(model, loader, device, tta='none', autocast=contextlib.nullcontext, channels_last=False,
             progress=None, description='test', forward=None, pad_batches=False, dist=utils.SINGLE_PROCESS):
    """Mean cross-entropy and accuracy of ``model`` (run through ``forward``, e.g. its compiled form),
    with the test-time augmentation ``tta`` (see :func:`tta_logits`).

    ``pad_batches`` pads a short last batch to the loader's batch size, so a compiled forward
    sees one shape only; the padding rows are dropped before scoring.

    Distributed: each rank scores the batches its loader deals it (every test image once, none
    padded or repeated); the per-batch sums of all ranks are put back in single-process batch
    order and added up in float32 as one process adds them, so the result equals a one-process
    evaluation of the same weights with the same test batch size.
    """
    model.eval()
    forward = model if forward is None else forward
    batch_losses, batch_correct, count = [], [], 0
    timer = utils.DeviceTimer(device)
    batches = progress(loader, description) if progress else loader
    for images, labels in batches:
        batch_size = len(labels)
        if pad_batches and batch_size < loader.batch_size:
            images = F.pad(images, (0, 0, 0, 0, 0, 0, 0, loader.batch_size - batch_size))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = tta_logits(forward, images, tta)[:batch_size]
        batch_losses.append(F.cross_entropy(logits, labels, reduction='sum'))
        batch_correct.append((logits.argmax(1) == labels).sum())
        count += batch_size
        utils.kill_point('evaluate')
    # one read of the device per evaluation
    losses = torch.stack(batch_losses).cpu().numpy() if batch_losses else np.zeros(0, np.float32)
    correct = torch.stack(batch_correct).cpu().numpy() if batch_correct else np.zeros(0, np.int64)
    per_rank = dist.all_gather_object((losses, correct, count))
    losses = merge_sharded_batches([list(rank_losses) for rank_losses, _, _ in per_rank])
    correct = merge_sharded_batches([list(rank_correct) for _, rank_correct, _ in per_rank])
    count = sum(rank_count for _, _, rank_count in per_rank)
    total_loss = np.float32(0.0)
    for batch_loss in losses:  # in batch order, in float32: the sum one process computes
        total_loss = np.float32(total_loss + batch_loss)
    elapsed = timer.elapsed()
    return {'loss': float(total_loss) / count, 'accuracy': int(sum(correct)) / count,
            'time': elapsed, 'images_per_sec': count / elapsed}


# ----------------------------------------------------------------------------- progress

class _Lines:
    """Progress off a terminal (a log file, a pipe): one plain line per ``interval`` seconds with the counters
    of that moment, ``epoch 3 train: 120/391 steps, 41.2 steps/s, loss 1.2345, acc 0.5812``, and nothing else
    (no redraws, no blank lines, nothing for a pass that ends within the interval). ``counters()``, read
    only for a line (it waits for the GPU), gives the running figures."""

    def __init__(self, iterable, description, counters=None, enabled=True, interval=30.0, clock=time.perf_counter):
        self.iterable, self.description, self.counters = iterable, description, counters
        self.enabled, self.interval, self.clock = enabled, interval, clock

    def __len__(self):
        return len(self.iterable)

    def __iter__(self):
        start = last = self.clock()
        for count, item in enumerate(self.iterable, 1):
            yield item
            now = self.clock()
            if self.enabled and now - last >= self.interval:
                figures = ''.join(f', {key} {value}' for key, value in (self.counters() if self.counters else {}).items())
                print(f'{self.description}: {count}/{len(self.iterable)} steps, {count / (now - start):.1f} steps/s'
                      f'{figures}', file=sys.stderr, flush=True)
                last = now


class _Bar(_Lines):
    """A tqdm bar on a terminal, its counters refreshed at most every 10 s (reading them waits for the GPU)."""

    def __iter__(self):
        from tqdm import tqdm
        bar = tqdm(self.iterable, desc=self.description, total=len(self.iterable), leave=False,
                   disable=not self.enabled, dynamic_ncols=True, mininterval=0.5)
        last = self.clock()
        for item in bar:
            yield item
            if self.enabled and self.counters and self.clock() - last > 10:
                bar.set_postfix(**self.counters())
                last = self.clock()


def top_classes(model, pixels, topk):
    """The ``topk`` most probable classes of one image ``pixels`` (C, H, W) under ``model``, in eval mode:
    [(probability, class index), ...], most probable first."""
    with torch.no_grad():
        probabilities = model(pixels[None].to(next(model.parameters()).device)).float().softmax(dim=1)[0]
    values, indices = probabilities.topk(topk)
    return list(zip(values.tolist(), indices.tolist()))


def make_progress(enabled=True, interval=30.0):
    """``progress(iterable, description, counters=None)``: tqdm bars on a terminal, elsewhere one plain line
    every ``interval`` seconds (:class:`_Lines`)."""
    if sys.stderr.isatty():
        return functools.partial(_Bar, enabled=enabled)
    return functools.partial(_Lines, enabled=enabled, interval=interval)


# ----------------------------------------------------------------------------- learning-rate range test

def find_lr(model, optimizer, loader, regularizer, outdir):
    """The learning-rate range test (optim.lr_range_test) over the regularized training batches; writes
    lr_finder.json and lr_finder.png to ``outdir`` and prints the suggested lr."""
    def batches():
        for images, labels in loader:
            yield regularizer(images, labels)
    result = optim.lr_range_test(model, optimizer, batches(), regularizer.loss, num_steps=min(100, len(loader)),
                                 forward=lambda images: regularizer.forward(model, images))
    written = optim.save_lr_range_test(result, outdir)
    print(f'lr range test: {len(result["lrs"])} steps, suggested lr {result["suggested_lr"]:.3g}; '
          f'wrote {" and ".join(written)}')
