"""Distributed training: torchrun, DDP on CPU with gloo, two ranks started by the tests.

The ranks are started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in
the environment of ``python main.py``), by torchrun itself where its behaviour is the point (a failing
rank). Tiny data and model: each launch takes seconds, mostly Python importing torch.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import dataloader
import engine
import main
import utils
from conftest import ROOT, run_main
from launch import Process

MAIN = os.path.join(ROOT, 'main.py')
# no augmentation randomness, so that two ranks and one process can see the very same images
RUN = ['--arch', 'resnet', '--depth', '8', '--base_channels', '4', '--epochs', '2', '--batch_size', '20',
       '--device', 'cpu', '--milestones', '[1]', '--seed', '3', '--test_batch_size', '16',
       '--use_random_crop', 'false', '--use_horizontal_flip', 'false']
# 200 training images, global batch 20: 10 steps per epoch; 40 test images in batches of 16, 16, 8
STEPS_PER_EPOCH = 10


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def rank_environment(rank, world_size, port):
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
               OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    return env


def launch(argv_per_rank, timeout=120, extra_env=None, program=MAIN):
    """Start one ``python main.py`` per rank as torchrun would (forked: tests/launch.py); returns
    [(exit status, stdout, stderr)]."""
    port, world_size = free_port(), len(argv_per_rank)
    processes = [Process(program, argv, env={**rank_environment(rank, world_size, port), **(extra_env or {})})
                 for rank, argv in enumerate(argv_per_rank)]
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def launch_same(argv, ranks=2, **options):
    return launch([argv] * ranks, **options)


def assert_succeeded(results):
    for rank, (status, _, err) in enumerate(results):
        assert status == 0, f'rank {rank} exited with {status}:\n{err[-3000:]}'


def log_without_times(outdir):
    return [{k: v for k, v in record.items() if 'time' not in k and 'per_sec' not in k}
            for record in json.load(open(os.path.join(outdir, 'log.json')))]


def load_weights(path):
    return torch.load(path, weights_only=True)


@pytest.fixture
def one_process_torchrun_env(monkeypatch):
    """This pytest process as the only rank of a torchrun launch (world size 1)."""
    for name, value in rank_environment(0, 1, free_port()).items():
        if name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
            monkeypatch.setenv(name, value)
    yield
    utils.close_distributed()  # main.cli leaves the group itself, unless a test failed inside it


@pytest.fixture(scope='module')
def two_rank_run(cifar10_dir, tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp('two_ranks') / 'run')
    results = launch_same([*RUN, '--tensorboard', '--dataset_dir', cifar10_dir, '--outdir', outdir])
    assert_succeeded(results)
    return outdir, results


# ----------------------------------------------------------------------------- data sharding

def numbered_images(n, size=28):
    """n images whose left half is white and right half black; the label is the image's number."""
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    images[..., :size // 2] = 255
    return images, torch.arange(n)


def epoch_batches(loaders, epoch):
    """[[labels of rank r's step k for each rank r] for each step k] of one epoch."""
    for loader in loaders:
        loader.set_epoch(epoch)
    return [list(step) for step in zip(*[[labels for _, labels in loader] for loader in loaders])]


@pytest.mark.parametrize('world_size', [2, 4])
def test_sharded_epochs_see_every_image_once_in_the_global_batches_of_one_process(world_size):
    images, labels = numbered_images(200)
    info = dataloader.DATASETS['MNIST']

    def loaders(ranks):
        return [dataloader.DeviceLoader(images, labels, info, 40 // ranks, torch.device('cpu'), True,
                                        shard=(rank, ranks), seed=11) for rank in range(ranks)]
    for epoch in (1, 2):
        sharded, single = epoch_batches(loaders(world_size), epoch), epoch_batches(loaders(1), epoch)
        assert len(sharded) == len(single) == 5
        seen = torch.cat([labels for step in sharded for labels in step])
        assert sorted(seen.tolist()) == list(range(200))  # every image once per epoch
        # global batch k of the ranks, in rank order, is batch k of one process (the order depends on
        # the seed and the epoch, not on the number of ranks)
        for ranks_step, single_step in zip(sharded, single):
            assert torch.equal(torch.cat(ranks_step), single_step[0])
    first, second = epoch_batches(loaders(world_size), 1), epoch_batches(loaders(world_size), 2)
    assert not torch.equal(torch.cat(first[0]), torch.cat(second[0]))


def test_sharded_evaluation_deals_out_whole_batches_and_merges_them_in_order():
    images, labels = numbered_images(40)
    info = dataloader.DATASETS['MNIST']
    per_rank = [[labels for _, labels in dataloader.DeviceLoader(images, labels, info, 16, torch.device('cpu'),
                                                                 False, shard=(rank, 2), seed=0)]
                for rank in range(2)]
    assert [[len(batch) for batch in batches] for batches in per_rank] == [[16, 8], [16]]
    assert torch.equal(torch.cat(engine.merge_sharded_batches(per_rank)), labels)


def test_alternating_flip_phases_belong_to_the_images_whichever_rank_draws_them():
    images, labels = numbered_images(40)
    info = dataloader.DATASETS['FashionMNIST']  # flipped in training
    torch.manual_seed(0)
    loaders = []
    for rank in range(2):
        torch.manual_seed(5)  # main.py seeds every rank alike before it builds the data
        loaders.append(dataloader.DeviceLoader(images, labels, info, 4, torch.device('cpu'), True,
                                               horizontal_flip=True, flip_mode='alternating', shard=(rank, 2), seed=1))
    flipped = {}
    for epoch in (1, 2, 3):
        for loader in loaders:
            loader.set_epoch(epoch)
            for batch, batch_labels in loader:
                for image, label in zip(batch, batch_labels.tolist()):
                    flipped.setdefault(label, []).append(bool(image[0, 0, 0] < 0))  # left column black
    assert len(flipped) == 40
    for label, flips in flipped.items():
        assert flips in ([True, False, True], [False, True, False]), (label, flips)


def test_workers_loader_shards_with_distributed_sampler():
    images, labels = numbered_images(100)
    dataset = dataloader.TensorImageDataset(images, labels, lambda image: image)
    loaders = [dataloader.WorkersLoader(dataset, 10, torch.device('cpu'), True, 0, shard=(rank, 2), seed=4)
               for rank in range(2)]
    orders = []
    for epoch in (1, 2):
        steps = epoch_batches(loaders, epoch)
        assert len(steps) == 5
        seen = torch.cat([labels for step in steps for labels in step])
        assert sorted(seen.tolist()) == list(range(100))
        orders.append(seen)
    assert not torch.equal(*orders)  # set_epoch reshuffles
    test_loaders = [dataloader.WorkersLoader(dataset, 16, torch.device('cpu'), False, 0, shard=(rank, 2))
                    for rank in range(2)]
    per_rank = [[labels for _, labels in loader] for loader in test_loaders]
    assert torch.equal(torch.cat(engine.merge_sharded_batches(per_rank)), labels)


# ----------------------------------------------------------------------------- a two-rank run

def test_two_ranks_train_as_one_process_with_their_batches_as_ghost_batches(two_rank_run, cifar10_dir, tmp_path,
                                                                            one_process_torchrun_env):
    """Two ranks with batches of 10 average their gradients: one process with the global batch of 20
    split into --subdivision 2 sub-batches of 10 (BatchNorm statistics per 10 images, as each rank's
    without --sync_bn) takes the same steps. The one process is a torchrun launch of one rank, so
    that it shuffles with the generator of (seed, epoch) the ranks share."""
    outdir, _ = two_rank_run
    reference = str(tmp_path / 'one_process')
    assert run_main([*RUN, '--subdivision', '2', '--no-tensorboard', '--dataset_dir', cifar10_dir,
                     '--outdir', reference]) == 0
    two_ranks, one_process = load_weights(os.path.join(outdir, 'model_state.pth')), \
        load_weights(os.path.join(reference, 'model_state.pth'))
    model = main.models.create_model('resnet', depth=8, base_channels=4)
    parameters = [name for name, _ in model.named_parameters()]
    assert parameters and set(parameters) <= set(two_ranks)
    for name in parameters:
        torch.testing.assert_close(two_ranks[name], one_process[name], rtol=1e-3, atol=2e-4, msg=name)  # roundoff, grown over 20 steps
    assert not torch.equal(two_ranks['conv.weight'], model.state_dict()['conv.weight'])  # it trained
    for ranks_record, process_record in zip(*(json.load(open(os.path.join(d, 'log.json'))) for d in (outdir, reference))):
        assert ranks_record['train_loss'] == pytest.approx(process_record['train_loss'], rel=1e-4)


def test_logged_test_accuracy_equals_one_process_evaluating_the_saved_weights(two_rank_run, cifar10_dir):
    outdir, _ = two_rank_run
    logged = json.load(open(os.path.join(outdir, 'log.json')))[-1]
    for weights in ('model_state.pth', 'checkpoint.pth'):
        args = main.parse_args(['--evaluate', os.path.join(outdir, weights), '--dataset_dir', cifar10_dir,
                                '--device', 'cpu', '--test_batch_size', '16'])
        result = main.evaluate_weights(args, torch.device('cpu'))
        # the ranks scored batches 0 and 2 (rank 0) and 1 (rank 1) with rank 0's BatchNorm statistics
        assert (result['accuracy'], result['loss']) == (logged['test_accuracy'], logged['test_loss'])


def test_only_rank_0_writes_and_prints(two_rank_run):
    outdir, results = two_rank_run
    assert sorted(os.listdir(outdir)) == ['checkpoint.pth', 'config.json', 'log.json', 'model_state.pth',
                                          'summary.json', 'tensorboard']
    assert len(os.listdir(os.path.join(outdir, 'tensorboard'))) == 1
    (_, out0, _), (_, out1, err1) = results
    assert out0.count('epoch 1/2:') == 1 and out0.count('epoch 2/2:') == 1
    assert out1 == '' and err1.strip() == ''
    config = json.load(open(os.path.join(outdir, 'config.json')))
    assert config['distributed'] == {'world_size': 2, 'backend': 'gloo', 'launcher': 'torchrun',
                                     'global_batch_size': 20, 'per_rank_batch_size': 10, 'sync_bn': False,
                                     'bn_batch_size': 10}
    assert config['settings']['batch_size'] == 20
    checkpoint = torch.load(os.path.join(outdir, 'checkpoint.pth'), weights_only=True)
    assert not any(key.startswith('module.') for key in checkpoint['model'])
    assert checkpoint['world_size'] == 2 and len(checkpoint['rng_ranks']) == 2
    log = json.load(open(os.path.join(outdir, 'log.json')))
    assert [r['epoch'] for r in log] == [1, 2] and log[-1]['train_images_per_sec'] > 0


def test_a_two_rank_checkpoint_resumes_in_one_process(two_rank_run, cifar10_dir, tmp_path):
    outdir = str(tmp_path / 'run')
    shutil.copytree(two_rank_run[0], outdir)
    assert run_main([*RUN, '--no-tensorboard', '--dataset_dir', cifar10_dir, '--outdir', outdir,
                     '--resume', '--epochs', '3']) == 0
    log = json.load(open(os.path.join(outdir, 'log.json')))
    assert [r['epoch'] for r in log] == [1, 2, 3]
    assert log_without_times(outdir)[:2] == log_without_times(two_rank_run[0])


def test_a_one_process_checkpoint_resumes_on_two_ranks(cifar10_dir, tmp_path):
    outdir = str(tmp_path / 'run')
    run = [*RUN, '--use_random_crop', 'true', '--no-tensorboard', '--dataset_dir', cifar10_dir, '--outdir', outdir]
    assert run_main([*run, '--epochs', '1']) == 0
    first_epoch = log_without_times(outdir)
    assert_succeeded(launch_same([*run, '--resume']))
    log = log_without_times(outdir)
    assert [r['epoch'] for r in log] == [1, 2] and log[:1] == first_epoch
    assert 'distributed' in json.load(open(os.path.join(outdir, 'config.json')))


# ----------------------------------------------------------------------------- failures

WRAPPER = '''
import os, signal, sys, time
import engine
import main

kind, rank, step = os.environ['INJECT_FAILURE'].split(':')
if os.environ['RANK'] == rank:
    train_step, steps = engine.Trainer.train_step, []

    def failing_step(self, images, labels):
        steps.append(1)
        if len(steps) == int(step):
            if kind == 'raise':
                raise RuntimeError('injected failure ' + 'on rank ' + rank)
            if kind == 'kill':
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)  # hang
        return train_step(self, images, labels)
    engine.Trainer.train_step = failing_step
main.cli(sys.argv[1:])
'''


@pytest.fixture
def wrapper(tmp_path):
    path = tmp_path / 'failing_main.py'
    path.write_text(WRAPPER)
    return str(path)


def test_a_rank_that_raises_ends_the_torchrun_job_and_the_run_resumes_as_if_uninterrupted(
        two_rank_run, wrapper, cifar10_dir, tmp_path):
    """Rank 1 raises in epoch 2: torchrun stops rank 0 and the job fails within seconds, the error
    printed once; resumed on two ranks, the run ends bit for bit where the uninterrupted one did."""
    outdir = str(tmp_path / 'run')
    run = [*RUN, '--tensorboard', '--dataset_dir', cifar10_dir, '--outdir', outdir]
    start = time.monotonic()
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port())]
    result = subprocess.run([*torchrun, wrapper, *run],
                            env={**os.environ, 'PYTHONPATH': ROOT, 'INJECT_FAILURE': f'raise:1:{STEPS_PER_EPOCH + 3}'},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and time.monotonic() - start < 60
    # rank 1's traceback, and torchrun's report; rank 0 adds at most one line of its own
    assert result.stderr.count('RuntimeError: injected failure on rank 1') == 1, result.stderr[-3000:]
    assert result.stderr.count('Traceback (most recent call last)') == 2, result.stderr[-3000:]
    assert [r['epoch'] for r in json.load(open(os.path.join(outdir, 'log.json')))] == [1]

    assert_succeeded(launch_same([*run, '--resume']))
    uninterrupted = two_rank_run[0]
    assert log_without_times(outdir) == log_without_times(uninterrupted)
    resumed, whole = (load_weights(os.path.join(d, 'model_state.pth')) for d in (outdir, uninterrupted))
    assert all(torch.equal(resumed[key], whole[key]) for key in whole)


@pytest.mark.parametrize('kind', ['kill', 'hang'])
def test_a_rank_that_dies_or_hangs_ends_the_others_without_a_launcher(kind, wrapper, cifar10_dir, tmp_path):
    """Without torchrun to stop them: the peer of a killed rank sees its connection close at once, the
    peer of a hung rank gives up after --dist_timeout; either says so in one line and exits with 1."""
    argv = [*RUN, '--no-tensorboard', '--dist_timeout', '5', '--dataset_dir', cifar10_dir,
            '--outdir', str(tmp_path / 'run')]
    port = free_port()
    env = {'INJECT_FAILURE': f'{kind}:1:3'}
    ranks = [Process(wrapper, argv, env={**rank_environment(rank, 2, port), **env}) for rank in range(2)]
    start = time.monotonic()
    try:
        _, err0 = ranks[0].communicate(timeout=90)
        elapsed = time.monotonic() - start
    finally:
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
    assert ranks[0].returncode == 1 and elapsed < 60
    assert 'Traceback' not in err0, err0[-3000:]
    assert [line for line in err0.splitlines() if 'stopped' in line or 'rror' in line] == [
        f'failing_main.py: rank 0 stopped: another rank failed or stopped answering ({reason}'
        for reason in [err0.split('answering (', 1)[-1].splitlines()[0]]], err0[-3000:]
    assert ranks[1].returncode == -signal.SIGKILL


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('per_rank, message', [
    ([[], []], '--batch_size 21 is the global batch: it must split evenly into 2 ranks'),
    ([['--outdir', 'OUT/a'], ['--outdir', 'OUT/b']], "--outdir differs between ranks (rank 0: 'OUT/a', rank 1: 'OUT/b')"),
], ids=['batch_not_divisible', 'outdir_per_rank'])
def test_bad_input_stops_every_rank_with_exit_2_and_one_line(per_rank, message, cifar10_dir, tmp_path):
    base = [*RUN, '--batch_size', '21', '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'run')]
    results = launch([[*base, *[arg.replace('OUT', str(tmp_path)) for arg in extra]] for extra in per_rank])
    assert [status for status, _, _ in results] == [2, 2]
    errors = [line for _, _, err in results for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith('main.py: error: '), errors
    assert message.replace('OUT', str(tmp_path)) in errors[0]
    assert results[0][2].strip() == errors[0]  # from rank 0
    assert not os.path.exists(tmp_path / 'run') or not os.listdir(tmp_path / 'run')


def test_a_folder_another_run_holds_stops_every_rank(cifar10_dir, tmp_path):
    """Rank 0 alone takes the folder's lock; when another run holds it, every rank exits with 2 and rank 0
    says whose it is; nothing in the folder changes."""
    outdir = tmp_path / 'run'
    outdir.mkdir()
    (outdir / 'config.json').write_text('{"settings": {"arch": "resnet"}}\n')
    lock = utils.FileLock(str(outdir / '.lock'))  # held by this process, as by a run alive
    assert lock.acquire()
    try:
        before = {name: (outdir / name).read_bytes() for name in os.listdir(outdir) if (outdir / name).is_file()}
        results = launch_same([*RUN, '--dataset_dir', cifar10_dir, '--outdir', str(outdir), '--resume'])
        assert [status for status, _, _ in results] == [2, 2]
        errors = [line for _, _, err in results for line in err.splitlines() if line.strip()]
        assert errors == [f'main.py: error: --outdir {outdir}: in use by another run (PID {os.getpid()}); wait for it '
                          f'to end or choose another directory'] and results[0][2].strip() == errors[0]
        assert {name: (outdir / name).read_bytes() for name in os.listdir(outdir)
                if (outdir / name).is_file()} == before
    finally:
        lock.release()


@pytest.mark.parametrize('extra, message', [
    (['--dist_backend', 'nccl'], '--dist_backend nccl needs GPUs'),
    (['--sync_bn'], "--sync_bn: torch's SyncBatchNorm runs on GPUs only"),
    (['--device', 'cuda:1'], None),
    (['--lr_finder'], '--lr_finder runs in one process'),
])
def test_launch_flags_are_checked_under_torchrun(extra, message, cifar10_dir, tmp_path, capsys,
                                                  one_process_torchrun_env):
    if message is None:
        message = ('--device cuda:1: under torchrun each rank uses cuda:LOCAL_RANK' if torch.cuda.is_available()
                   else 'CUDA is not available')
    assert run_main([*RUN, *extra, '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'run')]) == 2
    assert message in capsys.readouterr().err


def test_sync_bn_and_dist_backend_need_a_distributed_launch(cifar10_dir, tmp_path, capsys):
    for extra, message in ((['--sync_bn'], '--sync_bn needs a distributed launch'),
                           (['--dist_backend', 'gloo'], '--dist_backend gloo: needs a distributed launch')):
        assert run_main([*RUN, *extra, '--dataset_dir', cifar10_dir, '--outdir', str(tmp_path / 'run')]) == 2
        assert message in capsys.readouterr().err


def test_help_says_batch_size_is_global():
    help_text = main.get_args_parser().format_help()
    assert 'global batch' in help_text and '--sync_bn' in help_text and '--local_rank' not in help_text


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_run_resumes_as_uninterrupted(
        two_rank_run, cifar10_dir, tmp_path):
    """Rank 1 alone gets SIGTERM in epoch 2, step 3; the ranks agree on stopping at their next check
    (every main.STOP_CHECK_EVERY steps), write one mid-epoch checkpoint with both ranks' partial meters
    and random states, and both exit with 143; two ranks resume it into the uninterrupted run's log."""
    outdir = str(tmp_path / 'run')
    run = [*RUN, '--tensorboard', '--dataset_dir', cifar10_dir, '--outdir', outdir]
    results = launch_same(run, extra_env={utils.KILL_AT_VARIABLE: 'step:13:TERM:1'})
    assert [status for status, _, _ in results] == [128 + 15, 128 + 15], results[1][2][-2000:]
    assert 'SIGTERM in epoch 2 after step 10' in results[0][2] and 'torchrun --nproc_per_node 2' in results[0][2]
    checkpoint = torch.load(os.path.join(outdir, 'checkpoint.pth'), weights_only=True)
    assert (checkpoint['epoch'], checkpoint['position']['step'], len(checkpoint['position']['meters'])) == (1, 10, 2)
    assert_succeeded(launch_same([*run, '--resume']))
    assert log_without_times(outdir) == log_without_times(two_rank_run[0])
    whole, resumed = load_weights(os.path.join(two_rank_run[0], 'model_state.pth')), \
        load_weights(os.path.join(outdir, 'model_state.pth'))
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
