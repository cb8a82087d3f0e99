"""Runs survive kills, stop signals, full disks, non-finite losses and mismatched files (issue 13).

Kill points (utils.kill_point, TOOLKIT_TEST_KILL_AT=NAME:N[:SIGNAL]) stop a real run at chosen
places; a resumed run must end with the log and weights of an uninterrupted one.
"""
import errno
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch

import engine
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
    env = {**os.environ, 'OMP_NUM_THREADS': '2'}
    env.pop(utils.KILL_AT_VARIABLE, None)
    if kill_at:
        env[utils.KILL_AT_VARIABLE] = kill_at
    return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


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
    assert run_main([*run, '--outdir', str(tmp_path / 'stopped')]) == 128 + signal.SIGINT
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
    assert run_main([*run, '--outdir', str(tmp_path / 'crashed')]) == 130
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
    assert run_main(run) == 130
    monkeypatch.undo()
    assert run_main([*run, '--resume']) == 0
    shown, raw = _tensorboard_scalars(outdir / 'tensorboard')
    assert ('train/loss', 2) in raw and raw.count(('train/loss', 2)) == 2  # written twice on disk ...
    assert len(shown) == len(set(shown))  # ... shown once
    assert sorted(step for tag, step in shown if tag == 'train/loss') == [1, 2, 3]
