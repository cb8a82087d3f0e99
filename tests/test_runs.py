"""Runs survive kills, stop signals, full disks, non-finite losses and mismatched files; two runs never
share a folder, --resume writes only into a run's folder, and damaged or wrong files are refused in
one line.

Kill points (utils.kill_point, TOOLKIT_TEST_KILL_AT=NAME:N[:SIGNAL]) stop a real run at chosen
places; a resumed run must end with the log and weights of an uninterrupted one. SIGSTOP at a kill
point keeps a run alive (and its lock held) for as long as a test needs.
"""
import errno
import json
import os
import shlex
import shutil
import signal
import time

import pytest
import torch

import engine
import hostile
import launch
import main
import utils
from conftest import ROOT, run_main

# 200 training images in batches of 20: 10 steps per epoch; mid-epoch checkpoints every 4 steps.
RUN = ['--arch', 'resnet_preact', '--depth', '8', '--base_channels', '4', '--epochs', '3', '--batch_size', '20',
       '--device', 'cpu', '--milestones', '[1]', '--use_cutout', '--no-tensorboard']


def _log_without_times(outdir):
    with open(os.path.join(outdir, 'log.json')) as f:
        log = json.load(f)
    return [{k: v for k, v in record.items() if 'time' not in k and 'per_sec' not in k} for record in log]


def _same_weights(outdir_a, outdir_b):
    a = torch.load(os.path.join(outdir_a, 'model_state.pth'), weights_only=True)
    b = torch.load(os.path.join(outdir_b, 'model_state.pth'), weights_only=True)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _messages(err):
    """stderr without the progress bars' lines."""
    return [line for line in err.strip().splitlines() if line.strip() and 'it/s]' not in line and '?it/s' not in line]


def _temporaries(outdir):
    return [name for name in os.listdir(outdir) if name.startswith('.tmp-')]


def _subprocess(args, kill_at=None, tmp_path=None):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    env.pop(utils.KILL_AT_VARIABLE, None)
    if kill_at:
        env[utils.KILL_AT_VARIABLE] = kill_at
    return launch.run(os.path.join(ROOT, 'main.py'), args, env=env, cwd=tmp_path, timeout=300)


@pytest.fixture(scope='module')
def reference(cifar10_dir, tmp_path_factory):
    """An uninterrupted subprocess run (mid-epoch checkpoints on: they must not change what it computes)."""
    outdir = str(tmp_path_factory.mktemp('reliability') / 'whole')
    result = _subprocess([*RUN, '--dataset_dir', cifar10_dir, '--save_every_steps', '4', '--outdir', outdir])
    assert result.returncode == 0, result.stderr
    return outdir


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(reference, cifar10_dir, tmp_path):
    """SIGKILL mid-step, inside a checkpoint write, between log.json and the checkpoint, and mid-evaluation,
    one after another in the same run directory; each resume continues from the last complete checkpoint."""
    outdir = str(tmp_path / 'killed')
    run = [*RUN, '--dataset_dir', cifar10_dir, '--save_every_steps', '4', '--outdir', outdir]
    # epoch 2 step 5 (last checkpoint: epoch 2 step 2)
    killed = _subprocess(run, kill_at='step:15')
    assert killed.returncode == -signal.SIGKILL
    checkpoint = torch.load(os.path.join(outdir, 'checkpoint.pth'), weights_only=True)
    assert (checkpoint['epoch'], checkpoint['position']['epoch'], checkpoint['position']['step']) == (1, 2, 2)
    assert os.path.isfile(os.path.join(outdir, '.lock'))  # the dead run's lock file: it blocks nothing
    assert [r['epoch'] for r in json.load(open(os.path.join(outdir, 'log.json')))] == [1]
    # the second checkpoint write of the resumed run (the end of epoch 2) dies before its rename
    killed = _subprocess([*run, '--resume'], kill_at='checkpoint_write:2')
    assert killed.returncode == -signal.SIGKILL
    assert _temporaries(outdir)  # the unfinished write; checkpoint.pth is the previous one
    checkpoint = torch.load(os.path.join(outdir, 'checkpoint.pth'), weights_only=True)
    assert (checkpoint['epoch'], checkpoint['position']['step']) == (1, 6)
    assert [r['epoch'] for r in json.load(open(os.path.join(outdir, 'log.json')))] == [1, 2]  # ahead of it
    # log.json of epoch 2 written again, the checkpoint not
    killed = _subprocess([*run, '--resume'], kill_at='after_log:1')
    assert killed.returncode == -signal.SIGKILL
    assert not _temporaries(outdir)
    assert [r['epoch'] for r in json.load(open(os.path.join(outdir, 'log.json')))] == [1, 2]
    assert torch.load(os.path.join(outdir, 'checkpoint.pth'), weights_only=True)['position']['step'] == 6  # still mid-epoch 2
    # mid-evaluation of epoch 2
    killed = _subprocess([*run, '--resume'], kill_at='evaluate:1')
    assert killed.returncode == -signal.SIGKILL
    resumed = _subprocess([*run, '--resume'])
    assert resumed.returncode == 0, resumed.stderr
    assert _log_without_times(outdir) == _log_without_times(reference)
    assert _same_weights(outdir, reference)
    assert not _temporaries(outdir)
    assert sorted(os.listdir(outdir)) == ['checkpoint.pth', 'config.json', 'log.json', 'model_state.pth',
                                          'summary.json']  # no lock, no previous checkpoint once finished


def test_sigterm_stops_after_the_step_and_resumes_there(cifar10_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM (a real signal, sent by the kill hook in epoch 2 step 3, no --save_every_steps): the step
    finishes, a checkpoint at that step is written, one line says how to resume, exit 128 + 15; the
    resumed run equals an uninterrupted one."""
    run = [*RUN, '--dataset_dir', cifar10_dir]
    assert run_main([*run, '--outdir', str(tmp_path / 'whole')]) == 0
    outdir = str(tmp_path / 'stopped')
    monkeypatch.setenv(utils.KILL_AT_VARIABLE, 'step:13:TERM')
    monkeypatch.setattr(utils, 'kill_point', utils._KillPoints())
    capsys.readouterr()
    assert run_main([*run, '--outdir', outdir]) == 128 + signal.SIGTERM
    err = _messages(capsys.readouterr().err)
    assert len(err) == 1 and 'SIGTERM in epoch 2 after step 3' in err[0]
    checkpoint = torch.load(os.path.join(outdir, 'checkpoint.pth'), weights_only=True)
    assert (checkpoint['epoch'], checkpoint['position']['step']) == (1, 3)
    assert shlex.split(err[0].split('resume with: ', 1)[1]) == ['./main.py', *run, '--outdir', outdir, '--resume']
    monkeypatch.delenv(utils.KILL_AT_VARIABLE)
    assert run_main([*run, '--outdir', outdir, '--resume']) == 0
    assert _log_without_times(outdir) == _log_without_times(tmp_path / 'whole')
    assert _same_weights(outdir, tmp_path / 'whole')
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_keeps_the_last_checkpoint(cifar10_dir, tmp_path):
    outdir = str(tmp_path / 'twice')
    run = [*RUN, '--dataset_dir', cifar10_dir, '--outdir', outdir, '--test_batch_size', '20']
    # both SIGINTs arrive while epoch 2 is evaluated (its two test batches)
    stopped = _subprocess(run, kill_at='evaluate:3:INT,evaluate:4:INT')
    assert stopped.returncode == 128 + signal.SIGINT
    assert 'SIGINT again: stopping at once' in stopped.stderr and 'Traceback' not in stopped.stderr
    assert torch.load(os.path.join(outdir, 'checkpoint.pth'), weights_only=True)['epoch'] == 1
    assert _subprocess([*run, '--resume']).returncode == 0
    assert [r['epoch'] for r in json.load(open(os.path.join(outdir, 'log.json')))] == [1, 2, 3]


def test_signal_during_evaluation_checkpoints_the_finished_epoch(cifar10_dir, tmp_path, monkeypatch, capsys):
    """In process: SIGINT during epoch 1's evaluation; the epoch is completed and saved even with
    --save_every 3, and the resumed run equals an uninterrupted one."""
    run = [*RUN, '--dataset_dir', cifar10_dir, '--save_every', '3']
    assert run_main([*run, '--outdir', str(tmp_path / 'whole')]) == 0
    monkeypatch.setenv(utils.KILL_AT_VARIABLE, 'evaluate:1:INT')
    monkeypatch.setattr(utils, 'kill_point', utils._KillPoints())
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C reaches the caller of main.cli
        run_main([*run, '--outdir', str(tmp_path / 'stopped')])
    assert 'stopped by SIGINT after epoch 1; checkpoint.pth resumes at epoch 2' in capsys.readouterr().err
    assert torch.load(tmp_path / 'stopped' / 'checkpoint.pth', weights_only=True)['epoch'] == 1
    monkeypatch.delenv(utils.KILL_AT_VARIABLE)
    assert run_main([*run, '--outdir', str(tmp_path / 'stopped'), '--resume']) == 0
    assert _log_without_times(tmp_path / 'stopped') == _log_without_times(tmp_path / 'whole')
    assert _same_weights(tmp_path / 'stopped', tmp_path / 'whole')


def test_workers_pipeline_resumes_mid_epoch_with_the_same_order(cifar10_dir, tmp_path, monkeypatch):
    """--data_pipeline workers (in the main process: --num_workers 0) from a mid-epoch checkpoint."""
    run = [*RUN, '--epochs', '2', '--dataset_dir', cifar10_dir, '--data_pipeline', 'workers', '--num_workers', '0',
           '--save_every_steps', '4']
    assert run_main([*run, '--outdir', str(tmp_path / 'whole')]) == 0
    real_step = engine.Trainer.train_step

    def crash_at_step_7(self, images, labels):
        if self.scheduler.last_epoch == 16:
            raise KeyboardInterrupt
        return real_step(self, images, labels)
    monkeypatch.setattr(engine.Trainer, 'train_step', crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C reaches the caller of main.cli
        run_main([*run, '--outdir', str(tmp_path / 'crashed')])
    assert torch.load(tmp_path / 'crashed' / 'checkpoint.pth', weights_only=True)['position']['step'] == 6
    monkeypatch.setattr(engine.Trainer, 'train_step', real_step)
    assert run_main([*run, '--outdir', str(tmp_path / 'crashed'), '--resume']) == 0
    assert _log_without_times(tmp_path / 'crashed') == _log_without_times(tmp_path / 'whole')
    assert _same_weights(tmp_path / 'crashed', tmp_path / 'whole')


@pytest.mark.parametrize('name, error', [('config.json', errno.ENOSPC), ('log.json', errno.ENOSPC),
                                         ('checkpoint.pth', errno.ENOSPC), ('checkpoint.pth', errno.EIO),
                                         ('model_state.pth', errno.ENOSPC), ('summary.json', errno.EIO)])
def test_storage_fault_keeps_the_previous_file_and_says_which(name, error, cifar10_dir, tmp_path, monkeypatch,
                                                              capsys):
    outdir = tmp_path / 'run'
    run = [*RUN, '--epochs', '2', '--dataset_dir', cifar10_dir, '--outdir', str(outdir)]
    real_fsync = os.fsync
    writes = {'count': 0}

    def failing_fsync(fd):
        target = os.readlink(f'/proc/self/fd/{fd}') if os.path.exists(f'/proc/self/fd/{fd}') else ''
        if os.path.basename(target).startswith('.tmp-') and target.endswith(name):
            writes['count'] += 1
            if writes['count'] == 2 or name in ('config.json', 'model_state.pth', 'summary.json'):
                path = outdir / name
                writes['previous'] = path.read_bytes() if path.exists() else None
                raise OSError(error, os.strerror(error))
        return real_fsync(fd)
    if name == 'config.json':  # a resumed run rewrites it: the first run's must survive
        assert run_main([*run, '--epochs', '1']) == 0
        run.append('--resume')
    monkeypatch.setattr(os, 'fsync', failing_fsync)
    assert run_main(run) == 1
    err = _messages(capsys.readouterr().err)
    assert len(err) == 1 and 'Traceback' not in err[0]
    assert f'{name}: {os.strerror(error)}' in err[0] and 'is intact' in err[0]
    assert not _temporaries(outdir)
    if name in ('config.json', 'log.json', 'checkpoint.pth'):
        assert writes['previous'] and (outdir / name).read_bytes() == writes['previous']  # the previous version
    else:
        assert not (outdir / name).exists()
    monkeypatch.setattr(os, 'fsync', real_fsync)
    assert run_main([*run, '--resume'] if '--resume' not in run else run) == 0
    assert [r['epoch'] for r in json.load(open(outdir / 'log.json'))] == [1, 2]


def test_storage_error_of_torch_save_names_the_disk_error(tmp_path):
    """torch.save's zip writer turns a failed write into a RuntimeError; the OSError under it is reported."""
    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass
    path = str(tmp_path / 'checkpoint.pth')
    utils.save_checkpoint({'a': torch.ones(3)}, path)
    real = utils._RecordingFile.__init__

    def full_disk(self, file):
        real(self, FullDisk(file))
    utils._RecordingFile.__init__ = full_disk
    try:
        with pytest.raises(utils.StorageError, match=r'checkpoint.pth: No space left on device \(ENOSPC\)'):
            utils.save_checkpoint({'a': torch.zeros(1000)}, path)
    finally:
        utils._RecordingFile.__init__ = real
    assert torch.equal(torch.load(path, weights_only=True)['a'], torch.ones(3))
    assert os.listdir(tmp_path) == ['checkpoint.pth']


@pytest.fixture
def nonfinite_at(monkeypatch):
    """``nonfinite_at(*steps)``: the training loss is NaN at these global steps (1-based) of the runs that follow."""
    forward_loss = engine.Trainer._forward_loss

    def poison(*steps):
        def poisoned(self, images, targets):
            logits, loss = forward_loss(self, images, targets)
            return logits, loss * float('nan') if self.scheduler.last_epoch + 1 in steps else loss
        monkeypatch.setattr(engine.Trainer, '_forward_loss', poisoned)
    return poison


def test_nonfinite_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(
        cifar10_dir, tmp_path, nonfinite_at, capsys):
    outdir = tmp_path / 'run'
    nonfinite_at(13)  # epoch 2, step 3
    assert run_main([*RUN, '--dataset_dir', cifar10_dir, '--outdir', str(outdir)]) == 1
    err = _messages(capsys.readouterr().err)
    assert len(err) == 1 and 'non-finite training loss at epoch 2, step 3' in err[0]
    checkpoint = torch.load(outdir / 'checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 1 and 'position' not in checkpoint
    assert all(torch.isfinite(value).all() for value in checkpoint['model'].values() if value.is_floating_point())
    assert [r['epoch'] for r in json.load(open(outdir / 'log.json'))] == [1]
    # a mid-epoch checkpoint is never written once the weights are NaN
    nonfinite_at(3)
    assert run_main([*RUN, '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'early'),
                     '--save_every_steps', '4']) == 1
    assert 'at epoch 1, step 3' in capsys.readouterr().err
    assert not (tmp_path / 'early' / 'checkpoint.pth').exists()


@pytest.mark.parametrize('extra', [[], ['--use_sam', '--optimizer', 'adamw']])
def test_skip_nonfinite_skips_the_update_and_counts_it(extra, cifar10_dir, tmp_path, nonfinite_at, capsys):
    outdir = tmp_path / 'run'
    nonfinite_at(1, 13)  # the very first step (no optimizer state yet)
    assert run_main([*RUN, *extra, '--dataset_dir', cifar10_dir, '--outdir', str(outdir), '--skip_nonfinite', '2']) == 0
    log = json.load(open(outdir / 'log.json'))
    assert [r['nonfinite_steps'] for r in log] == [1, 1, 0]
    assert all(isinstance(r['train_loss'], float) and r['train_loss'] < 10 for r in log)
    state = torch.load(outdir / 'model_state.pth', weights_only=True)
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    # one more than allowed stops the run at the step that went over
    capsys.readouterr()
    assert run_main([*RUN, *extra, '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'over'),
                     '--skip_nonfinite', '1']) == 1
    assert 'at epoch 2, step 3 (2 non-finite steps in this run, more than --skip_nonfinite 1)' in capsys.readouterr().err


def test_a_skipped_step_leaves_weights_and_optimizer_state_unchanged(cifar10_dir, tmp_path, nonfinite_at):
    args = main.parse_args([*RUN, '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path), '--skip_nonfinite', '1'])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(10))
    model(torch.zeros(2, 3, 32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    class Plain:
        mixes_labels = False

        def __call__(self, images, labels):
            return images, torch.nn.functional.one_hot(labels, 10).float()

        def split(self, images, targets, n):
            return [(images, targets)]

        def forward(self, network, images):
            return network(images)

        def loss(self, logits, targets):
            return torch.nn.functional.cross_entropy(logits, targets)

        def accuracy(self, logits, targets):
            return (logits.argmax(1) == targets.argmax(1)).float().mean()
    nonfinite_at(2)  # the second step's loss
    trainer = engine.Trainer(model, optimizer, scheduler, Plain(), torch.device('cpu'), **engine.trainer_kwargs(args))
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    trainer.train_step(images, labels)  # creates the momentum buffers
    before = {key: value.clone() for key, value in model.state_dict().items()}
    momentum = [optimizer.state[p]['momentum_buffer'].clone() for p in model.parameters()]
    trainer.train_step(images, labels)
    assert bool(trainer.last_nonfinite)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m, optimizer.state[p]['momentum_buffer']) for m, p in zip(momentum, model.parameters()))
    trainer.train_step(images, labels)
    assert not bool(trainer.last_nonfinite) and not torch.equal(before['0.weight'], model.state_dict()['0.weight'])


@pytest.fixture(scope='module')
def finished_run(cifar10_dir, tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp('finished') / 'run')
    assert run_main([*RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', outdir]) == 0
    return outdir


def test_evaluate_refuses_weights_of_another_model_naming_both(finished_run, cifar10_dir, capsys):
    capsys.readouterr()
    code = run_main(['--evaluate', os.path.join(finished_run, 'model_state.pth'), '--arch', 'resnet', '--depth', '8',
                     '--device', 'cpu', '--dataset_dir', cifar10_dir])
    err = _messages(capsys.readouterr().err)
    assert code == 2 and len(err) == 1
    assert 'model_state.pth is resnet_preact depth 8 for 10 classes, 3 input channels' in err[0]
    assert 'this run is resnet depth 8 for 10 classes, 3 input channels (CIFAR10)' in err[0]


def test_resume_refuses_a_checkpoint_of_another_class_count(finished_run, cifar10_dir, tmp_path, capsys):
    outdir = tmp_path / 'other'
    os.makedirs(outdir)
    checkpoint = torch.load(os.path.join(finished_run, 'checkpoint.pth'), weights_only=True)
    other = main.models.create_model('resnet_preact', num_classes=100, in_channels=1, depth=8, base_channels=4)
    checkpoint['model'] = other.state_dict()
    torch.save(checkpoint, outdir / 'checkpoint.pth')
    capsys.readouterr()
    assert run_main([*RUN, '--epochs', '2', '--dataset_dir', cifar10_dir, '--outdir', str(outdir), '--resume']) == 2
    err = _messages(capsys.readouterr().err)
    assert len(err) == 1 and '--resume: checkpoint.pth is resnet_preact depth 8 for 100 classes, 1 input ' \
                             'channels; this run is resnet_preact depth 8 for 10 classes, 3 input channels' in err[0]


def test_resume_names_each_changed_setting_with_both_values(finished_run, cifar10_dir, capsys):
    capsys.readouterr()
    assert run_main([*RUN, '--epochs', '2', '--dataset_dir', cifar10_dir, '--outdir', finished_run, '--resume',
                     '--depth', '14', '--use_cutout', 'false']) == 2
    err = capsys.readouterr().err
    assert '--depth 14 (saved run: 8), --use_cutout false (saved run: true)' in err


@pytest.mark.parametrize('flag', ['--save_every_steps', '--skip_nonfinite'])
def test_new_flags_refuse_negative_counts(flag, cifar10_dir, tmp_path, capsys):
    assert run_main([*RUN, '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'run'), flag, '-1']) == 2
    assert f'{flag} -1: expected an integer >= 0' in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()


def test_resume_cleans_temporaries_and_rewrites_the_log_from_the_checkpoint(finished_run, cifar10_dir, tmp_path):
    import shutil
    outdir = tmp_path / 'run'
    shutil.copytree(finished_run, outdir)
    (outdir / '.tmp-abc123checkpoint.pth').write_bytes(b'partial')
    log = json.load(open(outdir / 'log.json'))
    json.dump(log + [{**log[0], 'epoch': 2}], open(outdir / 'log.json', 'w'))  # ahead of the checkpoint
    assert run_main([*RUN, '--epochs', '2', '--dataset_dir', cifar10_dir, '--outdir', str(outdir), '--resume']) == 0
    assert not _temporaries(outdir)
    assert [r['epoch'] for r in json.load(open(outdir / 'log.json'))] == [1, 2]


def _tensorboard_scalars(logdir):
    """(tag, step) of every scalar TensorBoard shows: the event files in order, each SessionLog START at
    step s (a writer's purge_step) hiding the earlier events at steps >= s, as TensorBoard's reader does."""
    import struct
    from tensorboardX.proto import event_pb2
    shown, raw = [], []
    for name in sorted(os.listdir(logdir)):
        data = open(os.path.join(logdir, name), 'rb').read()
        offset = 0
        while offset < len(data):
            length = struct.unpack('<Q', data[offset:offset + 8])[0]
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField('session_log') and event.session_log.status == event_pb2.SessionLog.START:
                shown = [(tag, step) for tag, step in shown if step < event.step]
            for value in event.summary.value:
                shown.append((value.tag, event.step))
                raw.append((value.tag, event.step))
    return shown, raw


def test_resumed_tensorboard_has_no_duplicated_steps(cifar10_dir, tmp_path, monkeypatch):
    pytest.importorskip('tensorboardX')
    outdir = tmp_path / 'run'
    run = [*RUN, '--tensorboard', '--dataset_dir', cifar10_dir, '--outdir', str(outdir)]
    calls = []

    def die_after_the_second_log(name):  # epoch 2's scalars written, its checkpoint not
        calls.append(name)
        if name == 'after_log' and calls.count(name) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(utils, 'kill_point', die_after_the_second_log)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C reaches the caller of main.cli
        run_main(run)
    monkeypatch.undo()
    assert run_main([*run, '--resume']) == 0
    shown, raw = _tensorboard_scalars(outdir / 'tensorboard')
    assert ('train/loss', 2) in raw and raw.count(('train/loss', 2)) == 2  # written twice on disk ...
    assert len(shown) == len(set(shown))  # ... shown once
    assert sorted(step for tag, step in shown if tag == 'train/loss') == [1, 2, 3]


# ----------------------------------------------------------------------------- two runs, one folder

def _start(args, log_prefix, kill_at=None):
    """main.py in a process of its own, not waited for; its output goes to files (a stopped process must
    not fill a pipe nobody reads)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    env.pop(utils.KILL_AT_VARIABLE, None)
    if kill_at:
        env[utils.KILL_AT_VARIABLE] = kill_at
    process = launch.Process(os.path.join(ROOT, 'main.py'), args, env=env, cwd=os.path.dirname(log_prefix),
                             stdout_path=f'{log_prefix}.out', stderr_path=f'{log_prefix}.err')
    process.err_path = f'{log_prefix}.err'
    return process


def _stopped(process):
    """True while ``process`` is stopped (SIGSTOP): state T in /proc/PID/stat."""
    try:
        with open(f'/proc/{process.pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] in 'tT'
    except OSError:
        return False


def _wait_until(condition, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.05)


def _err_lines(process):
    with open(process.err_path) as f:
        return _messages(f.read())


def _one_error(capsys):
    """The one line of an in-process main.cli's refusal, without the program name before 'error: '."""
    err = _messages(capsys.readouterr().err)
    assert len(err) == 1 and ': error: ' in err[0], err
    return err[0].split(': error: ', 1)[1]


def _snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {os.path.relpath(os.path.join(d, name), folder): open(os.path.join(d, name), 'rb').read()
            for d, _, names in os.walk(folder) for name in names}


def test_two_runs_started_into_one_outdir_the_second_is_refused_naming_the_first(cifar10_dir, tmp_path):
    """Both start at once into a folder that does not exist yet. Whichever locks it first stops itself
    (SIGSTOP) at its first step, keeping the lock, so that the other meets it whatever the timing: the
    other is refused in one line naming the winner's PID (exit 2), and the winner, continued, finishes
    with its files intact and its lock file gone."""
    outdir = tmp_path / 'run'
    run = [*RUN, '--epochs', '2', '--dataset_dir', cifar10_dir, '--outdir', str(outdir)]
    both = [_start(run, str(tmp_path / name), kill_at='step:1:STOP') for name in ('a', 'b')]
    try:
        _wait_until(lambda: any(p.poll() is not None for p in both) and all(
            p.poll() is not None or _stopped(p) for p in both))
        [refused] = [p for p in both if p.poll() is not None]
        [winner] = [p for p in both if p is not refused]
        os.kill(winner.pid, signal.SIGCONT)
        assert winner.wait(timeout=240) == 0, _err_lines(winner)
    finally:
        for process in both:
            if process.poll() is None:
                process.kill()
    assert refused.returncode == 2
    assert _err_lines(refused) == [f'main.py: error: --outdir {outdir}: in use by another run (PID {winner.pid}); '
                                   f'wait for it to end or choose another directory']
    assert sorted(os.listdir(outdir)) == ['checkpoint.pth', 'config.json', 'log.json', 'model_state.pth',
                                          'summary.json']
    assert [r['epoch'] for r in json.load(open(outdir / 'log.json'))] == [1, 2]
    assert json.load(open(outdir / 'summary.json'))['epochs'] == 2
    assert str(winner.pid) not in ' '.join(_err_lines(winner))


def test_resume_while_the_run_lives_is_refused_and_after_a_kill_9_it_resumes(cifar10_dir, tmp_path, capsys):
    """A run stopped (alive, holding its lock) in epoch 2: --resume and a second new run into its folder
    are refused naming its PID and change nothing. Killed with SIGKILL, its lock goes with it: the
    lock file it leaves blocks nothing, --resume finishes the run and removes it."""
    outdir = tmp_path / 'run'
    run = [*RUN, '--dataset_dir', cifar10_dir, '--outdir', str(outdir)]
    alive = _start(run, str(tmp_path / 'first'), kill_at='step:12:STOP')  # epoch 2: after epoch 1's checkpoint
    try:
        _wait_until(lambda: _stopped(alive) or alive.poll() is not None)
        assert alive.poll() is None, _err_lines(alive)
        before = _snapshot(outdir)
        assert before['.lock'].split()[0] == str(alive.pid).encode()
        capsys.readouterr()
        for extra in (['--resume'], []):
            assert run_main([*run, *extra]) == 2
            assert _one_error(capsys) == (f'--outdir {outdir}: in use by another run (PID {alive.pid}); wait for it '
                                          f'to end or choose another directory'), extra
            assert _snapshot(outdir) == before
        alive.kill()
        assert alive.wait(timeout=60) == -signal.SIGKILL
    finally:
        if alive.poll() is None:
            alive.kill()
    assert os.path.isfile(outdir / '.lock')
    assert run_main([*run, '--resume']) == 0
    assert [r['epoch'] for r in json.load(open(outdir / 'log.json'))] == [1, 2, 3]
    assert not os.path.exists(outdir / '.lock')


def test_file_lock_names_its_holder_and_reuses_a_dead_ones_file(tmp_path):
    path = str(tmp_path / '.lock')
    (tmp_path / '.lock').write_text('999999999 another-host\n')  # left by a process that died
    first = utils.FileLock(path)
    assert first.acquire() and not first.created
    assert open(path).read().split()[0] == str(os.getpid())
    with pytest.raises(utils.LockHeld) as held:  # flock: a second open file, even in this process, is refused
        utils.FileLock(path).acquire()
    assert held.value.holder == f'PID {os.getpid()}'
    first.release(remove=True)
    assert not os.path.exists(path)
    second = utils.FileLock(path)
    assert second.acquire() and second.created
    second.release()
    assert os.path.exists(path)
    third = utils.FileLock(path)
    assert third.acquire()
    third.release()


def test_a_file_system_without_locks_runs_unlocked_and_says_so(cifar10_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(utils, 'fcntl', None)
    run = [*RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'run')]
    warning = f'--outdir {tmp_path / "run"}: this file system takes no locks; a second run started in this directory ' \
              f'would not be stopped'
    for argv in (run, [*run, '--resume', '--epochs', '2']):
        assert run_main(argv) == 0
        assert _messages(capsys.readouterr().err).count(warning) == 1
    assert [r['epoch'] for r in json.load(open(tmp_path / 'run' / 'log.json'))] == [1, 2]
    assert '.lock' not in os.listdir(tmp_path / 'run')


# ----------------------------------------------------------------------------- --resume only into a run's folder

def _finished_without_checkpoint(folder, finished_run):
    shutil.copytree(finished_run, folder, dirs_exist_ok=True)
    os.remove(folder / 'checkpoint.pth')


@pytest.mark.parametrize('kind, make, message', [
    ('user files', lambda folder, run: [(folder / 'notes.txt').write_text('mine'), (folder / 'data').mkdir()],
     'is not a run folder (no config.json; it holds data, notes.txt); give the --outdir of a run, nothing here '
     'was changed'),
    ('finished, checkpoint gone', _finished_without_checkpoint,
     'is a finished run whose checkpoint.pth is gone (it holds config.json, log.json, model_state.pth, '
     'summary.json); nothing to continue from: start a new --outdir'),
    ('config.json a list', lambda folder, run: (folder / 'config.json').write_text('[1, 2]'),
     'config.json: a JSON list, not the config.json of a run (an object with "settings"); '),
    ('config.json without settings', lambda folder, run: (folder / 'config.json').write_text('{"lr": 0.1}'),
     'config.json: an object without "settings", not the config.json of a run'),
    ('config.json not JSON', lambda folder, run: (folder / 'config.json').write_text('{"settings": '),
     'config.json: not valid JSON (Expecting value: line 1 column 14 (char 13))'),
    ('config.json naming an unknown arch',
     lambda folder, run: (folder / 'config.json').write_text('{"settings": {"arch": "resnet_50"}}'),
     'config.json: "arch": "resnet_50" (a JSON string): expected one of '),
    ('previous checkpoint only', lambda folder, run: [
        shutil.copytree(run, folder, dirs_exist_ok=True), os.remove(folder / 'summary.json'),
        os.rename(folder / 'checkpoint.pth', folder / 'checkpoint.prev.pth')],
     'has no checkpoint.pth but a checkpoint.prev.pth; rename it to checkpoint.pth to resume from it'),
])
def test_resume_refuses_a_folder_that_is_not_a_resumable_run_and_leaves_it(kind, make, message, finished_run,
                                                                           cifar10_dir, tmp_path, capsys):
    folder = tmp_path / 'folder'
    folder.mkdir()
    make(folder, finished_run)
    before = _snapshot(folder)
    capsys.readouterr()
    assert run_main([*RUN, '--dataset_dir', cifar10_dir, '--outdir', str(folder), '--resume']) == 2
    error = _one_error(capsys)
    assert error.startswith('--resume: ') and message in error, error
    assert _snapshot(folder) == before and '.lock' not in os.listdir(folder)


def test_resume_starts_a_run_that_never_started(cifar10_dir, tmp_path, capsys):
    """No folder yet, or an empty one (benchmarks/gpu/session.sh passes --resume every time): a new run."""
    for folder in (tmp_path / 'none', tmp_path / 'empty'):
        if folder.name == 'empty':
            folder.mkdir()
        assert run_main([*RUN, '--epochs', '1', '--dataset_dir', cifar10_dir, '--outdir', str(folder), '--resume']) == 0
        assert 'no checkpoint in' in capsys.readouterr().err
        assert [r['epoch'] for r in json.load(open(folder / 'log.json'))] == [1]


def test_resume_with_only_the_folder_keeps_the_saved_run_control_settings(cifar10_dir, tmp_path, capsys):
    """`./main.py --outdir X --resume`: the saved --epochs (not the arch's 160), --dataset_dir (not the
    default download folder) and --no-tensorboard, as the interrupted run had them."""
    from conftest import run_main_interrupted_in_epoch
    outdir = tmp_path / 'run'
    run_main_interrupted_in_epoch([*RUN, '--epochs', '2', '--eval_every', '2', '--dataset_dir', cifar10_dir,
                                   '--outdir', str(outdir)], epoch=2)
    capsys.readouterr()
    assert run_main(['--outdir', str(outdir), '--resume', '--no-download']) == 0
    out = capsys.readouterr().out
    assert f'in {cifar10_dir}' in out and 'resuming at epoch 2' in out
    log = json.load(open(outdir / 'log.json'))
    assert [r['epoch'] for r in log] == [1, 2] and 'test_accuracy' not in log[0]  # --eval_every 2 kept
    assert not (outdir / 'tensorboard').exists()
    config = json.load(open(outdir / 'config.json'))['settings']
    assert config['epochs'] == 2 and config['dataset_dir'] == cifar10_dir and config['tensorboard'] is False


def test_resume_looks_for_a_moved_dataset_in_the_default_folder_of_its_own_dataset(mnist_dir, tmp_path, monkeypatch,
                                                                                     capsys):
    """The saved --dataset_dir is gone and none is given: the default folder of the run's dataset (MNIST),
    not that of the command line's default --dataset (CIFAR10); --evaluate follows the same rule."""
    import shutil
    from conftest import run_main_interrupted_in_epoch
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    data, outdir = str(tmp_path / 'mnist'), tmp_path / 'run'
    shutil.copytree(mnist_dir, data)
    run_main_interrupted_in_epoch([*RUN, '--epochs', '2', '--dataset', 'MNIST', '--tta', 'none', '--dataset_dir', data,
                                   '--outdir', str(outdir)], epoch=2)
    shutil.rmtree(data)
    capsys.readouterr()
    expected = os.path.join(str(tmp_path / 'home'), '.torchvision', 'datasets', 'MNIST')
    for command in (['--outdir', str(outdir), '--resume', '--no-download'],
                    ['--evaluate', str(outdir / 'checkpoint.pth'), '--no-download']):
        assert run_main(command) == 2
        err = capsys.readouterr().err
        assert expected in err and 'CIFAR10' not in err, err


# ----------------------------------------------------------------------------- damaged and wrong files

WRONG_WEIGHTS = {'tensor': (torch.ones(3), 'holds a Tensor'), 'list': ([torch.ones(3)], 'holds a list'),
                 'dict of numbers': ({'epoch': 3}, "holds a dict whose 'epoch' is an int")}


def _weights_command(flag, weights, cifar10_dir, tmp_path):
    if flag == '--evaluate':
        return ['--evaluate', weights, '--dataset_dir', cifar10_dir, '--device', 'cpu']
    if flag == '--weights':
        return ['--predict', hostile.write_png(str(tmp_path / 'cat.png')), '--weights', weights, '--device', 'cpu']
    return [*RUN, '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'student'), '--teacher', weights]


@pytest.mark.parametrize('flag', ['--evaluate', '--weights', '--teacher'])
@pytest.mark.parametrize('kind', sorted(WRONG_WEIGHTS))
def test_weights_that_hold_the_wrong_object_are_one_line(kind, flag, finished_run, cifar10_dir, tmp_path, capsys):
    content, message = WRONG_WEIGHTS[kind]
    folder = tmp_path / 'weights'
    folder.mkdir()
    shutil.copy(os.path.join(finished_run, 'config.json'), folder)
    torch.save(content, folder / 'model_state.pth')
    capsys.readouterr()
    assert run_main(_weights_command(flag, str(folder / 'model_state.pth'), cifar10_dir, tmp_path)) == 2
    assert _one_error(capsys) == (f'{flag}: {folder / "model_state.pth"} {message}, not weights (a state_dict: a dict '
                                  f'of tensors by parameter name)')
    assert not (tmp_path / 'student').exists()


@pytest.mark.parametrize('kind, content, message', [
    ('tensor', torch.ones(3), 'holds a Tensor, not a checkpoint (a dict of model, optimizer, epoch, args, log, ...)'),
    ('list', [1, 2], 'holds a list, not a checkpoint'),
    ('weights only', 'weights', 'holds weights only (a state_dict, as model_state.pth), not a checkpoint'),
    ('incomplete', {'model': {}, 'epoch': 1}, "holds a dict without 'optimizer', 'args', 'log', not a checkpoint"),
    ('epoch a string', 'epoch', "holds a dict whose 'epoch' is a str, not an int: not a checkpoint"),
])
def test_resume_refuses_a_checkpoint_of_the_wrong_object(kind, content, message, finished_run, cifar10_dir, tmp_path,
                                                         capsys):
    outdir = tmp_path / 'run'
    shutil.copytree(finished_run, outdir)
    checkpoint = torch.load(outdir / 'checkpoint.pth', weights_only=True)
    if content == 'weights':
        content = checkpoint['model']
    elif content == 'epoch':
        content = {**checkpoint, 'epoch': '1'}
    torch.save(content, outdir / 'checkpoint.pth')
    before = _snapshot(outdir)
    capsys.readouterr()
    assert run_main([*RUN, '--epochs', '2', '--dataset_dir', cifar10_dir, '--outdir', str(outdir), '--resume']) == 2
    error = _one_error(capsys)
    assert error.startswith(f'--resume: {outdir / "checkpoint.pth"} {message}'), error
    assert _snapshot(outdir) == before


@pytest.mark.parametrize('flag', ['--evaluate', '--weights', '--teacher'])
@pytest.mark.parametrize('config, message', [
    ('[1, 2]', 'a JSON list, not the config.json of a run (an object with "settings")'),
    ('null', 'a JSON null, not the config.json of a run'),
    ('{"settings": [1]}', '"settings" is a JSON list, not an object'),
    ('{"settings": {"arch": "resnet_50"}}', '"arch": "resnet_50" (a JSON string): expected one of '),
    ('{"settings": {"arch": "resnet", "depth": "eight"}}', '"depth": "eight" (a JSON string): expected '),
    ('{"settings": {"arch": "resnet", "dataset": 10}}', '"dataset": 10 (a JSON number): expected one of '),
])
def test_a_damaged_config_json_beside_weights_is_one_line(config, message, flag, finished_run, cifar10_dir, tmp_path,
                                                          capsys):
    folder = tmp_path / 'weights'
    folder.mkdir()
    shutil.copy(os.path.join(finished_run, 'model_state.pth'), folder)
    (folder / 'config.json').write_text(config)
    capsys.readouterr()
    assert run_main(_weights_command(flag, str(folder / 'model_state.pth'), cifar10_dir, tmp_path)) == 2
    error = _one_error(capsys)
    assert error.startswith(f'{folder / "config.json"} (beside model_state.pth): {message}'), error
    assert error.endswith('; fix or remove it (without it --evaluate and --predict take --arch and the model '
                          'flags from the command line)')


def test_a_flipped_bit_is_refused_naming_the_intact_earlier_file(cifar10_dir, tmp_path, monkeypatch, capsys):
    """A bit flipped inside a tensor of checkpoint.pth (torch.load reads it as a wrong weight): --resume
    and --evaluate are refused in one line naming the record and checkpoint.prev.pth, intact, with its
    step; nothing is written. Renamed over it, the previous checkpoint resumes. A flipped bit in the
    finished run's model_state.pth names the last checkpoint, which holds the same weights."""
    outdir = tmp_path / 'run'
    run = [*RUN, '--dataset_dir', cifar10_dir, '--outdir', str(outdir), '--save_every_steps', '4']
    monkeypatch.setenv(utils.KILL_AT_VARIABLE, 'step:17:TERM')  # epoch 2, step 7; checkpoints at steps 12, 16, 17
    monkeypatch.setattr(utils, 'kill_point', utils._KillPoints())
    assert run_main(run) == 128 + signal.SIGTERM
    monkeypatch.delenv(utils.KILL_AT_VARIABLE)
    assert sorted(os.listdir(outdir)) == ['checkpoint.prev.pth', 'checkpoint.pth', 'config.json', 'log.json']
    record = hostile.flip_bit_in_tensor(str(outdir / 'checkpoint.pth'))
    before = _snapshot(outdir)
    damaged = (f'checkpoint {outdir / "checkpoint.pth"} is damaged: the bytes of its record {record} do not match '
               f'the CRC-32 written with them (changed on the disk or in a copy); checkpoint.prev.pth beside it is '
               f'intact (epoch 2, step 6): rename it to checkpoint.pth to resume from there')
    capsys.readouterr()
    assert run_main([*run, '--resume']) == 2
    assert _one_error(capsys) == f'--resume: {damaged}'
    evaluate = ['--dataset_dir', cifar10_dir, '--device', 'cpu', '--evaluate']
    assert run_main([*evaluate, str(outdir / 'checkpoint.pth')]) == 2
    assert _one_error(capsys) == f'--evaluate: {damaged}'
    assert _snapshot(outdir) == before
    os.replace(outdir / 'checkpoint.prev.pth', outdir / 'checkpoint.pth')
    assert run_main([*run, '--resume']) == 0
    assert [r['epoch'] for r in json.load(open(outdir / 'log.json'))] == [1, 2, 3]
    assert 'checkpoint.prev.pth' not in os.listdir(outdir)  # a finished run keeps its last checkpoint only
    record = hostile.flip_bit_in_tensor(str(outdir / 'model_state.pth'))
    capsys.readouterr()
    assert run_main([*evaluate, str(outdir / 'model_state.pth')]) == 2
    assert _one_error(capsys) == (
        f'--evaluate: checkpoint {outdir / "model_state.pth"} is damaged: the bytes of its record '
        f'{record} do not match the CRC-32 written with them (changed on the disk or in a copy); checkpoint.pth '
        f'beside it is intact (after epoch 3): it holds the weights of that epoch (the final ones)')


def test_every_flipped_bit_is_refused_or_harmless(tmp_path):
    """One bit flipped at each byte of a small checkpoint: utils.load_checkpoint refuses the file, or what
    it returns equals what was saved (a flip in bytes that carry no data: zip timestamps, padding)."""
    state = {'model': {'weight': torch.arange(24, dtype=torch.float32).view(2, 12), 'count': torch.tensor(7)},
             'epoch': 3, 'log': [{'epoch': 3, 'lr': 0.1}], 'args': {'arch': 'resnet'}}
    path = str(tmp_path / 'checkpoint.pth')
    utils.save_checkpoint(state, path)
    original = open(path, 'rb').read()
    silently_different = []
    for offset in range(len(original)):
        with open(path, 'wb') as f:
            f.write(original[:offset] + bytes([original[offset] ^ 0x08]) + original[offset + 1:])
        try:
            loaded = utils.load_checkpoint(path)
        except utils.UsageError:
            continue
        same = (loaded['epoch'], loaded['log'], loaded['args']) == (3, state['log'], state['args']) and all(
            torch.equal(loaded['model'][k], v) for k, v in state['model'].items())
        if not same:
            silently_different.append(offset)
    assert not silently_different, f'{len(silently_different)} of {len(original)} flips loaded a different state'


def test_checkpoints_without_checksums_still_load(finished_run, cifar10_dir, tmp_path):
    """torch.save's legacy (non-zip) format and zip files written with compute_crc32 off carry no
    checksum: they load unverified, and a run resumes from them."""
    from torch.utils import serialization
    checkpoint = torch.load(os.path.join(finished_run, 'checkpoint.pth'), weights_only=True)
    legacy, no_crc = str(tmp_path / 'legacy.pth'), str(tmp_path / 'no_crc.pth')
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False)
    serialization.config.save.compute_crc32 = False
    try:
        torch.save(checkpoint, no_crc)
    finally:
        serialization.config.save.compute_crc32 = True
    for path in (legacy, no_crc):
        loaded = utils.load_checkpoint(path)['model']
        assert all(torch.equal(loaded[key], value) for key, value in checkpoint['model'].items())
    outdir = tmp_path / 'run'
    shutil.copytree(finished_run, outdir)
    shutil.copy(legacy, outdir / 'checkpoint.pth')
    assert run_main([*RUN, '--epochs', '2', '--dataset_dir', cifar10_dir, '--outdir', str(outdir), '--resume']) == 0
    assert [r['epoch'] for r in json.load(open(outdir / 'log.json'))] == [1, 2]
    assert utils.load_checkpoint(str(outdir / 'checkpoint.pth'))['epoch'] == 2  # written with its checksums again


def test_a_longer_resume_of_a_length_dependent_schedule_is_refused(cifar10_dir, tmp_path, capsys):
    """--resume --epochs 3 of a 2-epoch cosine run would train at lr 0 (the curve ended): refused in one
    line, nothing written; a multistep run goes on, saying so."""
    cosine = [*RUN, '--epochs', '2', '--scheduler', 'cosine', '--dataset_dir', cifar10_dir,
              '--outdir', str(tmp_path / 'cosine')]
    assert run_main(cosine) == 0
    before = {name: os.path.getmtime(tmp_path / 'cosine' / name) for name in os.listdir(tmp_path / 'cosine')}
    capsys.readouterr()
    assert run_main([*cosine, '--resume', '--epochs', '3']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'was started for 2 epochs and its cosine schedule spans them' in err
    assert 'Resume it with --epochs 2, or train 3 epochs in a new --outdir' in err
    assert {name: os.path.getmtime(tmp_path / 'cosine' / name) for name in os.listdir(tmp_path / 'cosine')} == before
    multistep = [*RUN, '--epochs', '2', '--milestones', '[1]', '--dataset_dir', cifar10_dir,
                 '--outdir', str(tmp_path / 'multistep')]
    assert run_main(multistep) == 0
    capsys.readouterr()
    assert run_main([*multistep, '--resume', '--epochs', '3']) == 0
    out = capsys.readouterr().out
    assert 'the run goes on to 3 epochs instead of 2; its multistep schedule does not depend on the length' in out
    assert [r['epoch'] for r in json.load(open(tmp_path / 'multistep' / 'log.json'))] == [1, 2, 3]


def test_a_run_says_what_it_does_and_what_it_wrote(cifar10_dir, tmp_path, capsys):
    outdir = tmp_path / 'run'
    argv = [*RUN, '--epochs', '2', '--dataset_dir', cifar10_dir, '--outdir', str(outdir)]
    assert run_main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('resnet_preact depth 8: ') and ' parameters; cpu (1 thread), fp32' in out[0]
    assert out[1].startswith(f'CIFAR10 in {cifar10_dir}: 200 training and 40 test images; 2 epochs of ')
    assert out[2] == f'run folder: {outdir}'
    assert out[-1] == f'wrote {outdir}: checkpoint.pth, config.json, log.json, model_state.pth, summary.json'
    assert run_main([*argv, '--resume', '--epochs', '3']) == 0
    out = capsys.readouterr().out.splitlines()
    assert 'resuming at epoch 3' in out
