"""The run folder as a file format: what a run writes, how it resumes, how its weights are read back.

    config.json       every resolved setting, the flags given, the parameter count, command line, environment
    log.json          one record per epoch, replaced atomically every epoch
    summary.json      final and best test accuracy, labelled apart
    checkpoint.pth    model, trainer state (optimizer, schedule, scaler, EMA, lookahead), RNG states,
                      settings, log, and the position inside an epoch for a mid-epoch checkpoint
    checkpoint.prev.pth  the checkpoint before it, while the run is unfinished
    model_state.pth   the final weights (model_state_ema.pth: the EMA's)
    tensorboard/      scalars
    .lock             while a run is alive: its lock on the folder (the holder's PID)

main.py writes runs through :class:`RunDirectory`; summarize.py, the benchmarks and the tests read them
with the functions here. Every file is written atomically (utils.save_json, utils.save_checkpoint), and
every .pth file is verified against the checksums written with it when it is read (utils.load_checkpoint).
"""
import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time

import torch

import dataloader
import engine
import models
import utils
from flags import RESOLVED_ANEW, RUN_ONLY_FLAGS, Choice, UsageError, check_setting, first_line, json_kind, show

# Settings added after runs were saved without them, with the value that reproduces what those runs computed.
LEGACY_SETTINGS = {'muon_lr_adjust': 'torch', 'cutmix_box': 'continuous', 'cutmix_prob': 1.0}
FINAL_WEIGHTS = 'model_state.pth'
EMA_WEIGHTS = 'model_state_ema.pth'
CHECKPOINT = 'checkpoint.pth'
PREVIOUS_CHECKPOINT = 'checkpoint.prev.pth'
LOCK = '.lock'
# what a run's checkpoint.pth holds at least (Trainer.state_dict adds the schedule, scaler, EMA, ...)
CHECKPOINT_ENTRIES = {'model': dict, 'optimizer': dict, 'epoch': int, 'args': dict, 'log': list}


def _say_starting_over(outdir):
    """--resume of a run with nothing to restore: it starts (again) from the beginning."""
    print(f'--resume: no checkpoint in {outdir} yet; starting from epoch 1', file=sys.stderr)


class RunDirectory:
    """The files of one run: refuses to overwrite another run, locks the folder, writes atomically.

    A run holds an exclusive lock on its folder (utils.FileLock on ``.lock``) from the moment the folder
    is judged (an existing one) or created (a new one) until :meth:`close`, which main() calls on every
    way out; the kernel drops it when the process dies. A second run into the folder, or a ``--resume``
    while the run is alive, is refused naming the holder's PID. In a distributed run rank 0 alone
    checks, locks and writes (its verdicts reach every rank); on the other ranks the ``save_*`` methods
    write nothing, so a run has one set of files. Nothing is created before :meth:`create`, which
    main.py calls once all the input is checked; bad input leaves the folder as it was (the lock file
    of a folder that had none is removed again).
    """

    def __init__(self, outdir, resume, dist=utils.SINGLE_PROCESS):
        self.outdir = outdir
        self.checkpoint_path = os.path.join(outdir, CHECKPOINT)
        self.writes = dist.is_main
        self.dist = dist
        self.writer = None
        self.resume = resume
        self.lock = utils.FileLock(os.path.join(outdir, LOCK))
        self.existed = self.created = False  # the folder existed when checked; this run started in it
        self.has_checkpoint = dist.run_on_main(lambda: self._check(resume))

    def _check(self, resume):
        """The verdict on the directory, under its lock where it exists: bad input must leave the disk as it was."""
        outdir = self.outdir
        if os.path.exists(outdir) and not os.path.isdir(outdir):
            raise UsageError(f'--outdir {outdir}: exists and is not a directory')
        existing = os.path.abspath(outdir)  # the directory itself, or the nearest ancestor that exists
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UsageError(f'--outdir {outdir}: not writable ({existing} is not a directory)')
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f'--outdir {outdir}: not writable ({existing} is read-only)')
        if not os.path.isdir(outdir):
            if resume:  # a run resumed before it ever started (scripts pass --resume every time)
                _say_starting_over(outdir)
            return False
        self.existed = True
        names = self._names()
        if os.path.lexists(self.lock.path) or not names or 'config.json' in names or CHECKPOINT in names:
            self._lock()  # a run's folder or an empty one; a folder of other files is judged untouched
        try:
            return self._verdict(resume, names if not self.lock.held else self._names())
        except UsageError:
            self.close()
            raise

    def _names(self):
        """What the folder holds, its lock file aside."""
        try:
            return sorted(name for name in os.listdir(self.outdir) if name != LOCK)
        except OSError as error:
            raise UsageError(f'--outdir {self.outdir}: cannot read it ({error.strerror or error})') from None

    def _lock(self):
        try:
            if not self.lock.acquire():
                print(f'--outdir {self.outdir}: this file system takes no locks; a second run started in this '
                      f'directory would not be stopped', file=sys.stderr)
        except utils.LockHeld as held:
            raise UsageError(f'--outdir {self.outdir}: in use by another run ({held.holder}); wait for it to '
                             f'end or choose another directory') from None
        except OSError as error:
            raise UsageError(f'--outdir {self.outdir}: not writable ({error.strerror or error})') from None

    def _verdict(self, resume, names):
        """Whether the run resumes from a checkpoint; a UsageError for a folder it must not write into."""
        outdir = self.outdir
        if not resume:
            if names:
                raise UsageError(f'--outdir {outdir}: not empty; pass --resume to continue that run '
                                 f'or choose another directory')
            return False
        config_path = self.path('config.json')
        if os.path.lexists(config_path):
            read_settings(config_path, f'--resume: {config_path}', f'{outdir} is left as it is')
        if os.path.isfile(self.checkpoint_path):
            return True
        shown = [name for name in names if not name.startswith(utils.TEMPORARY_PREFIX)]
        if not shown:
            _say_starting_over(outdir)
            return False
        holds = f'it holds {_some(shown)}'
        if 'config.json' not in shown:
            raise UsageError(f'--resume: {outdir} is not a run folder (no config.json; {holds}); give the '
                             f'--outdir of a run, nothing here was changed')
        if PREVIOUS_CHECKPOINT in shown:
            raise UsageError(f'--resume: {outdir} has no {CHECKPOINT} but a {PREVIOUS_CHECKPOINT}; rename it to '
                             f'{CHECKPOINT} to resume from it')
        if 'summary.json' in shown:
            raise UsageError(f'--resume: {outdir} is a finished run whose {CHECKPOINT} is gone ({holds}); '
                             f'nothing to continue from: start a new --outdir')
        # the run stopped before its first checkpoint (inside epoch 1, or before the first --save_every
        # epoch): nothing to restore, so it starts again and rewrites its log
        _say_starting_over(outdir)
        return False

    def create(self):
        """Make the directory (and lock it, if new), once every check of the input has passed."""
        self.dist.run_on_main(self._create)

    def _create(self):
        outdir = self.outdir
        try:
            os.makedirs(outdir, exist_ok=True)
        except OSError as error:
            raise UsageError(f'--outdir {outdir}: not writable ({error.strerror or error})') from None
        if not self.existed:  # a new folder: locked now, and nobody else's files may have come meanwhile
            self._lock()
            names = self._names()
            if names:
                self.close()
                raise UsageError(f'--outdir {outdir}: another run wrote into it while this one started '
                                 f'({_some(names)}); choose another directory')
        if self.resume:
            utils.remove_temporaries(outdir)  # of a write that a kill interrupted
        try:
            probe = os.path.join(outdir, '.write-test')
            with open(probe, 'w'):
                pass
            os.remove(probe)
        except OSError as error:
            self.close()
            raise UsageError(f'--outdir {outdir}: not writable ({error.strerror or error})') from None
        self.created = True

    def close(self):
        """Release the folder (idempotent): TensorBoard's file closed, the lock dropped and its file removed
        (unless it was there before and this run never started)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.lock.release(remove=self.created or self.lock.created)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def read_checkpoint(self):
        """checkpoint.pth, checked to be a checkpoint (--resume)."""
        state = load_checkpoint(self.checkpoint_path, '--resume')
        check_checkpoint(state, f'--resume: {self.checkpoint_path}')
        return state

    def path(self, name):
        return os.path.join(self.outdir, name)

    def save_json(self, obj, name):
        if self.writes:
            utils.save_json(obj, self.path(name))

    def save_checkpoint(self, state):
        """checkpoint.pth, atomically (torch.save to a temporary file, then rename); the one it replaces
        stays as checkpoint.prev.pth (a hard link made first: at most two checkpoints on the disk, even
        during the write)."""
        if self.writes:
            utils.keep_previous(self.checkpoint_path, self.path(PREVIOUS_CHECKPOINT))
            utils.save_checkpoint(state, self.checkpoint_path)

    def save_weights(self, state_dict, name):
        """model_state.pth, atomically as the checkpoint."""
        if self.writes:
            utils.save_weights(state_dict, self.path(name))

    def write_config(self, args, n_params, device, data):
        config = {
            'settings': {k: v for k, v in vars(args).items() if k != 'explicit'},
            'explicit_flags': args.explicit,
            'n_params': n_params,
            # what summarize.py's data column shows (the training images after any --val_ratio hold-out)
            'data': {'dataset': args.dataset, 'train_images': data.train_loader.num_samples,
                     'test_images': data.test_loader.num_samples, 'test_split': data.test_split_name},
            'model_flags': {k: getattr(args, k) for k in models.model_params(args.arch)
                            if getattr(args, k) is not None},
            'command_line': shlex.join(sys.argv),
            'environment': utils.environment_info(device),
        }
        if self.dist.enabled:
            per_rank = args.batch_size // self.dist.world_size
            config['distributed'] = {
                'world_size': self.dist.world_size, 'backend': self.dist.backend, 'launcher': 'torchrun',
                'global_batch_size': args.batch_size, 'per_rank_batch_size': per_rank, 'sync_bn': args.sync_bn,
                # the images each BatchNorm layer normalizes over in a training forward pass
                'bn_batch_size': (args.batch_size if args.sync_bn else per_rank) // args.subdivision,
            }
        self.save_json(config, 'config.json')

    def open_tensorboard(self, purge_step=None):
        """TensorBoard scalars: tensorboardX (the original tool's dependency), else PyTorch's own writer.

        torch.utils.tensorboard needs the tensorboard package; with neither installed the run goes
        on without scalars and says so once (log.json holds the same figures). ``purge_step``: a
        resumed run's TensorBoard discards the scalars at and after that epoch that the interrupted
        run wrote.
        """
        if not self.writes:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print('--tensorboard: neither tensorboardX nor tensorboard is installed; writing no scalars '
                      '(log.json has them)', file=sys.stderr)
                return
        # a file name of its own: the writer names its file by the second, and a run resumed within the
        # same second would otherwise truncate the interrupted run's file
        self.writer = SummaryWriter(self.path('tensorboard'), purge_step=purge_step,
                                    filename_suffix=f'.{time.time_ns()}')

    def log_epoch(self, log, checkpoint=None):
        """The end-of-epoch writes: log.json, TensorBoard scalars and the checkpoint (when one is due)."""
        self.save_json(log, 'log.json')
        if self.writer is not None:  # before the checkpoint: a resumed run purges the scalars of epochs it repeats
            record = log[-1]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != 'epoch':
                    self.writer.add_scalar(key.replace('_', '/', 1), value, record['epoch'])
            self.writer.flush()
        utils.kill_point('after_log')
        if checkpoint is not None:
            self.save_checkpoint(checkpoint)

    def finish(self, model, ema_model, log, split):
        """The files of a finished run: model_state.pth (and the EMA's), summary.json."""
        self.save_weights(model.state_dict(), FINAL_WEIGHTS)
        if ema_model is not None:
            self.save_weights(ema_model.state_dict(), EMA_WEIGHTS)
        self.save_json(summarize([record for record in log if record['epoch'] > 0], split), 'summary.json')
        if self.writes:
            with contextlib.suppress(OSError):  # a finished run keeps its last checkpoint only
                os.remove(self.path(PREVIOUS_CHECKPOINT))
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def written(self):
        """'wrote DIR: config.json, log.json, ...': the files the run folder holds, for the run's last line."""
        names = sorted(name + ('/' if os.path.isdir(self.path(name)) else '') for name in os.listdir(self.outdir)
                       if not name.startswith('.'))
        return f'wrote {self.outdir}: {", ".join(names)}'

    def is_finished(self, with_ema):
        names = [FINAL_WEIGHTS, 'summary.json'] + ([EMA_WEIGHTS] if with_ema else [])
        return all(os.path.isfile(self.path(name)) for name in names)


def summarize(log, split):
    """summary.json: the final epoch's accuracy (the one to report) and the best one, labelled apart.

    The accuracies keep full precision (programs read them); the error rate is for people, rounded to
    10 decimals so that 1 - 0.285 reads 0.715, not 0.7150000000000001 (exact for any test set of up
    to 10**10 images).
    """
    final = log[-1]
    best = max((record for record in log if f'{split}_accuracy' in record),
               key=lambda record: record[f'{split}_accuracy'])
    summary = {
        f'final_{split}_accuracy': final[f'{split}_accuracy'],
        f'final_{split}_error': round(1 - final[f'{split}_accuracy'], 10),
        f'best_{split}_accuracy': best[f'{split}_accuracy'],
        f'best_{split}_epoch': best['epoch'],
        'epochs': final['epoch'],
    }
    if split == 'test':
        summary['note'] = ('report final_test_accuracy; best_test_accuracy selects on the test set and is '
                           'optimistic (use --val_ratio for model selection)')
    return summary


def epoch_line(record, epochs, split):
    """The line a run prints for a log record."""
    line = (f'epoch {record["epoch"]}/{epochs}: lr {record["lr"]:.4g} train loss {record["train_loss"]:.4f} '
            f'acc {record["train_accuracy"]:.4f}')
    if f'{split}_accuracy' in record:
        line += f' | {split} loss {record[f"{split}_loss"]:.4f} acc {record[f"{split}_accuracy"]:.4f}'
    return line + f' | {record["epoch_time"]:.1f}s'


def best_so_far(log, metrics, epoch, split):
    """``best_{split}_accuracy`` and ``best_{split}_epoch`` over the logged epochs and this one's ``metrics``."""
    best = max([record for record in log if f'{split}_accuracy' in record and record['epoch'] > 0]
               + [{'epoch': epoch, **metrics}], key=lambda record: record[f'{split}_accuracy'])
    return {f'best_{split}_accuracy': best[f'{split}_accuracy'], f'best_{split}_epoch': best['epoch']}


# ----------------------------------------------------------------------------- checkpoints and resuming

def checkpoint_state(trainer, epoch, args, log, position=None):
    """The full state after ``epoch`` complete epochs, and ``position`` inside the next one if given
    (a mid-epoch checkpoint: the step reached, the epoch's order, the partial meters)."""
    state = {'epoch': epoch, 'model': trainer.model.state_dict(), **trainer.state_dict(), 'rng': utils.get_rng_state(),
             'args': dict(vars(args)), 'log': log}
    if trainer.dist.enabled:
        # every rank's random stream (its augmentation), so that a resumed run draws what this one would
        state['rng_ranks'] = trainer.dist.all_gather_object(state['rng'])
        state['world_size'] = trainer.dist.world_size
    if position is not None:
        state['position'] = position
    return state


def load_checkpoint(path, flag):
    """utils.load_checkpoint, its one-line error naming the flag that pointed at the file, and for a damaged
    file of a run folder the earlier file beside it that is intact, if any."""
    try:
        return utils.load_checkpoint(path)
    except utils.DamagedFile as error:
        raise UsageError(f'{flag}: {error}; {intact_earlier_file(path)}') from None
    except UsageError as error:
        raise UsageError(f'{flag}: {error}') from None


# the files of a run folder that hold an earlier state of a damaged one (the final weights are in the last
# checkpoint too)
EARLIER_FILES = {CHECKPOINT: (PREVIOUS_CHECKPOINT,), FINAL_WEIGHTS: (CHECKPOINT, PREVIOUS_CHECKPOINT),
                 EMA_WEIGHTS: (CHECKPOINT, PREVIOUS_CHECKPOINT)}


def intact_earlier_file(path):
    """'checkpoint.prev.pth beside it is intact (after epoch 2): ...', or that none is: what the error about
    the damaged ``path`` says next."""
    directory, name = os.path.split(os.path.abspath(path))
    for earlier in EARLIER_FILES.get(name, ()):
        try:
            state = utils.load_checkpoint(os.path.join(directory, earlier))
        except UsageError:
            continue
        if not isinstance(state, dict) or not isinstance(state.get('epoch'), int):
            continue
        position = state.get('position')
        when = (f'epoch {position["epoch"]}, step {position["step"]}' if isinstance(position, dict)
                and {'epoch', 'step'} <= set(position) else f'after epoch {state["epoch"]}')
        use = {CHECKPOINT: f'rename it to {CHECKPOINT} to resume from there',
               FINAL_WEIGHTS: 'it holds the weights of that epoch' + (' (the final ones)' if earlier == CHECKPOINT
                                                                      else ''),
               EMA_WEIGHTS: 'it holds the EMA of that epoch'}[name]
        return f'{earlier} beside it is intact ({when}): {use}'
    return 'no earlier file beside it is intact' if name in EARLIER_FILES else 'no earlier copy of it is known'


def _kind(value):
    """'a Tensor', 'a list', 'None', 'an int': what a file holds, in words."""
    if value is None:
        return 'None'
    name = type(value).__name__
    return f'{"an" if name[0].lower() in "aeiou" else "a"} {name}'


def _some(names, limit=6):
    """'a, b, c' or 'a, b, ... and 4 more'."""
    shown = ', '.join(names[:limit])
    return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


def check_state_dict(state, what):
    """``state`` must be weights: a dict of tensors (by parameter name); ``what`` names the file."""
    expected = 'not weights (a state_dict: a dict of tensors by parameter name)'
    if not isinstance(state, dict):
        raise UsageError(f'{what} holds {_kind(state)}, {expected}')
    for key, value in state.items():
        if not isinstance(key, str):
            raise UsageError(f'{what} holds a dict with the key {show(key)} ({_kind(key)}), {expected}')
        if not torch.is_tensor(value) and not key.endswith('_extra_state'):
            raise UsageError(f'{what} holds a dict whose {key!r} is {_kind(value)}, {expected}')


def check_checkpoint(state, what):
    """``state`` must be a checkpoint of a run: a dict with at least CHECKPOINT_ENTRIES, of their types."""
    expected = f'not a checkpoint (a dict of {", ".join(CHECKPOINT_ENTRIES)}, ...)'
    if not isinstance(state, dict):
        raise UsageError(f'{what} holds {_kind(state)}, {expected}')
    if state and all(torch.is_tensor(value) for value in state.values()):
        raise UsageError(f'{what} holds weights only (a state_dict, as model_state.pth), {expected}')
    missing = [name for name in CHECKPOINT_ENTRIES if name not in state]
    if missing:
        raise UsageError(f'{what} holds a dict without {", ".join(map(repr, missing))}, {expected}')
    for name, kind in CHECKPOINT_ENTRIES.items():
        if not isinstance(state[name], kind) or isinstance(state[name], bool):
            raise UsageError(f'{what} holds a dict whose {name!r} is {_kind(state[name])}, not {_kind(kind())}: '
                             f'{expected}')
    check_state_dict(state['model'], f"{what}'s 'model'")


def restore_args(args, checkpoint):
    """A resumed run keeps its saved settings; only run-control flags (and --epochs) may change, and those
    not given keep their saved values too (the machine's own, :data:`RESOLVED_ANEW`, are resolved anew)."""
    saved = {**LEGACY_SETTINGS, **checkpoint['args']}  # a dict: RunDirectory.read_checkpoint checked it
    changed = sorted(name for name in args.explicit
                     if name not in RUN_ONLY_FLAGS and name in saved and saved[name] != getattr(args, name))
    if changed:
        differences = ', '.join(f'--{name} {show(getattr(args, name))} (saved run: {show(saved[name])})'
                                for name in changed)
        raise UsageError(f'--resume: settings differ from the saved run: {differences}; a resumed run keeps its '
                         f'settings (start a new --outdir instead)')
    kept = {name: value for name, value in saved.items()
            if name not in RUN_ONLY_FLAGS or (name not in RESOLVED_ANEW and name not in args.explicit)}
    restored = argparse.Namespace(**{**vars(args), **kept})
    restored.dataset_dir = saved_dataset_dir(args, saved, restored.dataset)
    restored.resume = True
    return restored


def resume(checkpoint, model, trainer, args):
    """Load a checkpoint of this run into the model and trainer; returns (log, first epoch to run,
    position inside that epoch or None).

    Each rank continues the random stream of the saved run's rank of the same number (a single
    process's is rank 0's); a rank the saved run did not have starts a stream of its own.
    """
    dist = trainer.dist
    load_weights(model, checkpoint['model'], '--resume: checkpoint.pth', checkpoint['args'], args, None)
    position = checkpoint.get('position')
    if position is not None and position.get('world_size', 1) != dist.world_size:
        raise UsageError(f'--resume: checkpoint.pth stopped inside epoch {position["epoch"]} with '
                         f'{position.get("world_size", 1)} process(es); resume it with as many (this run has '
                         f'{dist.world_size})')
    try:
        trainer.load_state_dict(checkpoint)
        rng_states = checkpoint.get('rng_ranks') or [checkpoint['rng']]
        if dist.rank < len(rng_states):
            utils.set_rng_state(rng_states[dist.rank])
        else:
            utils.set_seed(utils.derived_seed(args.seed, dist.rank, checkpoint['epoch']))
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise UsageError(f'--resume: checkpoint does not match this run ({type(error).__name__}: '
                         f'{first_line(error)})') from None
    log = list(checkpoint['log'])
    trainer.nonfinite_before = sum(record.get('nonfinite_steps', 0) for record in log)
    return log, checkpoint['epoch'] + 1, position


# Schedules whose curve is drawn over the run's whole length: another --epochs changes them from the first step.
LENGTH_DEPENDENT_SCHEDULES = ('cosine', 'linear', 'polynomial')


def check_new_length(checkpoint, args, total_steps, steps_per_epoch):
    """--resume with another --epochs: refused where the schedule (or lookahead's ramp) spans the run's
    length, since the longer run would have had another learning rate from its first step (a finished
    cosine run would go on at lr 0); where it does not (multistep, none, sgdr), the line that says so."""
    saved = checkpoint['args']
    saved_epochs = saved.get('epochs', args.epochs)
    saved_steps = saved.get('total_steps') or math.ceil(saved_epochs * steps_per_epoch - 1e-9)
    if saved_steps == total_steps:
        return
    spans = []
    if args.scheduler in LENGTH_DEPENDENT_SCHEDULES:
        spans.append(f'its {args.scheduler} schedule')
    if args.lookahead_every:
        spans.append('its lookahead ramp')
    if spans:
        raise UsageError(f'--epochs {show(args.epochs)}: the run in {args.outdir} was started for '
                         f'{_count(saved_epochs, "epoch")} and {" and ".join(spans)} spans them: a '
                         f'{show(args.epochs)}-epoch run has another learning rate from its first step. Resume it '
                         f'with --epochs {show(saved_epochs)}, or train {show(args.epochs)} epochs in a new --outdir')
    return (f'--resume: the run goes on to {show(args.epochs)} epochs instead of {show(saved_epochs)}; its '
            f'{args.scheduler} schedule does not depend on the length and continues as it was')


def resume_command(argv=None, dist=utils.SINGLE_PROCESS):
    """The command line of this run with --resume (under torchrun, with its launcher)."""
    words = list(sys.argv) if argv is None else ['./main.py', *argv]
    if '--resume' not in words:
        words.append('--resume')
    command = shlex.join(words)
    if dist.enabled:
        command = f'torchrun --nproc_per_node {dist.world_size} {command}'
    return command


# ----------------------------------------------------------------------------- weights of a run

def read_settings(config_path, source, outcome, required=True):
    """The ``settings`` of a run's config.json, the ones other commands take from it (the arch, the dataset,
    the model flags) checked against their flags' domains. A file that is no run's config.json is one
    UsageError starting with ``source`` and ending with ``outcome`` (what happens next); with
    ``required`` False a JSON object without "settings" (another tool's config.json) gives {}."""
    try:
        config = utils.load_json(config_path, source=source)
    except UsageError as error:
        raise UsageError(f'{error}; {outcome}') from None
    if not isinstance(config, dict) or (required and 'settings' not in config):
        found = f'a JSON {json_kind(config)}' if not isinstance(config, dict) else 'an object without "settings"'
        raise UsageError(f'{source}: {found}, not the config.json of a run (an object with "settings"); {outcome}')
    settings = config.get('settings', {})
    if not isinstance(settings, dict):
        raise UsageError(f'{source}: "settings" is a JSON {json_kind(settings)}, not an object; {outcome}')
    domains = {'arch': Choice(models.list_models()), 'dataset': Choice(dataloader.DATASET_CHOICES),
               **{name: flag.domain for name, flag in models.model_flags().items()}}
    for name, domain in domains.items():
        if settings.get(name) is not None:
            try:
                check_setting(name, domain, settings[name], source)
            except UsageError as error:
                raise UsageError(f'{error}; {outcome}') from None
    return settings


def saved_settings(weights_path):
    """The settings in the config.json beside ``weights_path`` ({} if there is none, or if it is another
    tool's: a JSON object without "settings"); one that is damaged or names an unknown arch is refused."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), 'config.json')
    if not os.path.lexists(config_path):
        return {}
    return read_settings(config_path, f'{config_path} (beside {os.path.basename(weights_path)})',
                         'fix or remove it (without it --evaluate and --predict take --arch and the model flags '
                         'from the command line)', required=False)


def saved_dataset_dir(args, saved, dataset):
    """--dataset_dir of a command on a saved run (--resume, --evaluate, --predict): the one the command line
    gives (``args``), else the folder the run read while it is there, else the default folder of
    ``dataset``, the run's."""
    if 'dataset_dir' in args.explicit:
        return args.dataset_dir
    saved_dir = saved.get('dataset_dir')
    if isinstance(saved_dir, str) and os.path.isdir(saved_dir):
        return saved_dir
    return dataloader.default_dataset_dir(dataset)


def adopt_saved_settings(args, settings):
    """--evaluate and --predict: the arch, dataset and model flags of the run that saved the weights (its
    config.json's ``settings``) where the command line does not give them, the arch's builder defaults for
    the model flags neither gives, and that run's --dataset_dir where it still exists."""
    for name in ['arch', 'dataset', *models.model_flags()]:
        if name not in args.explicit and name in settings:
            setattr(args, name, settings[name])
    models.resolve_model_flags(args)
    args.dataset_dir = saved_dataset_dir(args, settings, args.dataset)


def read_weights(path, flag):
    """The state_dict in a model_state.pth or in a checkpoint.pth's ``model``, without DDP's ``module.``;
    a file that is no checkpoint, is damaged or holds no weights is refused in one line naming ``flag``."""
    state = load_checkpoint(path, flag)
    if isinstance(state, dict) and isinstance(state.get('model'), dict) and 'optimizer' in state:
        state = state['model']
    check_state_dict(state, f'{flag}: {path}')
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, 'module.')
    return state


def model_name(settings):
    """'resnet_preact depth 20', 'wrn depth 28 widening_factor 10': the arch and the flags that size it."""
    arch = settings.get('arch')
    known = models.model_params(arch) if arch in models.list_models() else {}
    sizes = [flag for flag in ('depth', 'widening_factor') if flag in known and settings.get(flag) not in (None, 1)]
    return ' '.join([str(arch)] + [f'{flag} {show(settings[flag])}' for flag in sizes])


def dry_run_text(args, n_params, data, batch_size, device, dist):
    """--dry_run's answer: the resolved settings as JSON, then the model's size and the data's."""
    settings = json.dumps({k: v for k, v in vars(args).items() if k != 'explicit'}, indent=2, default=str)
    return (f'{settings}\n{args.arch}: {n_params:,} parameters; {data.info.name}: {data.train_loader.num_samples} train / '
            f'{data.test_loader.num_samples} {data.test_split_name} images, {len(data.train_loader)} steps per epoch '
            f'on {device}' + (f' ({dist.world_size} ranks of {batch_size} images)' if dist.enabled else ''))


def start_lines(args, device, n_params, data, steps_per_epoch, epochs, first_epoch, position, dist):
    """What a run is about to do, in three lines (and where a resumed run goes on)."""
    threads = f' ({_count(args.num_threads, "thread")})' if device.type == 'cpu' else ''
    ranks = f', {dist.world_size} ranks' if dist.enabled else ''
    global_batch = data.train_loader.batch_size * dist.world_size
    left_out = data.train_loader.num_samples - steps_per_epoch * global_batch
    lines = [f'{model_name(vars(args))}: {n_params:,} parameters; {device}{threads}{ranks}, {args.precision}',
             f'{data.info.name} in {args.dataset_dir}: {data.train_loader.num_samples:,} training and '
             f'{data.test_loader.num_samples:,} {data.test_split_name} images; {_count(epochs, "epoch")} of '
             f'{_count(steps_per_epoch, "step")} of {global_batch} images'
             + (f' ({left_out} images of each epoch left out: every batch is full)' if left_out > 0 else ''),
             f'run folder: {args.outdir}']
    if first_epoch > 1 or position is not None:
        step = f', step {position["step"]}' if position is not None else ''
        lines.append(f'resuming at epoch {position["epoch"] if position is not None else first_epoch}{step}')
    return '\n'.join(lines)


def _count(number, noun):
    return f'{number:,} {noun}{"" if number == 1 else "s"}'


def describe_weights(state_dict, settings=None):
    """'resnet_preact depth 20 for 10 classes, 3 input channels': what a state_dict holds, from its
    settings (a checkpoint's or config.json's) where known, and from the shapes of its first
    convolution (input channels) and last linear layer (classes)."""
    name = model_name(settings) if settings else 'weights'
    tensors = [value for value in state_dict.values() if torch.is_tensor(value)] if isinstance(state_dict, dict) else []
    convolutions = [value for value in tensors if value.dim() == 4]
    linears = [value for value in tensors if value.dim() == 2]
    shape = [f'for {linears[-1].shape[0]} classes'] if linears else []
    shape += [f'{convolutions[0].shape[1]} input channels'] if convolutions else []
    return f'{name} {", ".join(shape)}' if shape else name


def load_weights(model, state_dict, what, saved_settings, settings, info):
    """``model.load_state_dict(state_dict)``, or a UsageError naming what the file holds and what this run
    builds (another architecture, class count or channel count) instead of a shape traceback."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as error:
        settings = vars(settings) if isinstance(settings, argparse.Namespace) else settings
        this_run = describe_weights(model.state_dict(), settings)
        raise UsageError(f'{what} is {describe_weights(state_dict, saved_settings)}; this run is {this_run} '
                         f'({info.name if info else settings.get("dataset")}); they do not fit '
                         f'({type(error).__name__}: {(str(error).strip().splitlines() or [""])[0][:160]})') from None


def load_run_model(weights, flag, settings, info, device, saved, state=None):
    """The model a run's ``weights`` file (model_state.pth or checkpoint.pth, of any run, distributed or
    not) holds: built with ``settings`` (arch, model flags, channels_last) for the dataset ``info`` on
    ``device`` and loaded, in eval mode. ``saved``: the settings of the config.json beside it
    (:func:`saved_settings`); ``state``: its state_dict if already read (under torchrun rank 0 reads it and
    sends it to the others)."""
    state = read_weights(weights, flag) if state is None else state
    model = engine.build_model(settings, info, device)
    load_weights(model, state, f'{flag}: {weights}', saved, settings, info)
    return model.eval()


def load_teacher(weights, dataset, channels_last, info, device):
    """--teacher: the saved model, rebuilt from the arch and model flags in the config.json beside its
    ``weights``, frozen, in eval mode. It must have been trained on the same ``dataset``: its logits are
    compared with the student's class by class; the Trainer runs it under the student's autocast. None
    for no ``weights``."""
    if weights is None:
        return None
    state = read_weights(weights, '--teacher')
    saved = saved_settings(weights)
    arch = saved.get('arch')
    if arch is None:
        raise UsageError(f'--teacher {weights}: no config.json with the teacher\'s arch beside it')
    if saved.get('dataset', dataset) != dataset:
        raise UsageError(f'--teacher {weights}: trained on {saved["dataset"]}, not --dataset {dataset}')
    settings = argparse.Namespace(arch=arch, channels_last=channels_last,
                                  **{name: saved.get(name) for name in models.model_params(arch)})
    teacher = load_run_model(weights, '--teacher', settings, info, device, state=state, saved=saved)
    return teacher.requires_grad_(False)
