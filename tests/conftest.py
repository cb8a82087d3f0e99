"""Tiny datasets written in the real on-disk formats, and helpers to run main.py."""
import gzip
import os
import pickle
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# one thread per test process (and for the main.py processes tests start): a test's ops are too small to
# gain from more, and pytest -n 2 already keeps both cores busy
os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)


def class_patterned_images(n, channels, size, num_classes, seed):
    """Images whose mean brightness encodes the label, so a model can learn them in an epoch."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    base = (labels * (200 // max(num_classes - 1, 1)))[:, None, None, None]
    noise = rng.integers(0, 56, size=(n, channels, size, size))
    return (base + noise).astype(np.uint8), labels.astype(np.int64)


def write_cifar10(root, n_per_batch=40, n_test=40, seed=0):
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    for index, name in enumerate([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']):
        n = n_test if name == 'test_batch' else n_per_batch
        images, labels = class_patterned_images(n, 3, 32, 10, seed + index)
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'batch_label': name, 'labels': labels.tolist(),
                         'data': images.reshape(n, 3072),
                         'filenames': [f'{i}.png' for i in range(n)]}, f, protocol=2)
    with open(os.path.join(folder, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': [str(i) for i in range(10)], 'num_cases_per_batch': n_per_batch,
                     'num_vis': 3072}, f, protocol=2)
    return root


def write_cifar100(root, n_train=200, n_test=100, seed=0):
    folder = os.path.join(root, 'cifar-100-python')
    os.makedirs(folder, exist_ok=True)
    for name, n in (('train', n_train), ('test', n_test)):
        images, labels = class_patterned_images(n, 3, 32, 100, seed)
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'filenames': [f'{i}.png' for i in range(n)], 'batch_label': name,
                         'fine_labels': labels.tolist(), 'coarse_labels': (labels // 5).tolist(),
                         'data': images.reshape(n, 3072)}, f, protocol=2)
    return root


def write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path + ('.gz' if compress else ''), 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_family(root, name='MNIST', n_train=200, n_test=100, compress=True, seed=0):
    folder = os.path.join(root, name, 'raw')
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        images, labels = class_patterned_images(n, 1, 28, 10, seed)
        write_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte'), images[:, 0], compress)
        write_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte'), labels, compress)
    return root


def write_image_folder(root, n_per_class=6, classes=('cat', 'dog', 'frog'), size=32):
    from PIL import Image
    for split in ('train', 'test'):
        for index, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            images, _ = class_patterned_images(n_per_class, 3, size, 1, seed=index)
            for i, image in enumerate(images):
                pixels = np.clip(image.transpose(1, 2, 0).astype(int) + 60 * index, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))
    return root


# Real data for the opt-in checks (pytest -m realdata, and a few reader tests that skip without it): a
# folder named by this variable, else ../shared/data beside the checkout where a machine has one.
REALDATA_VARIABLE = 'CIFAR_TOOLKIT_REALDATA'
REALDATA_DEFAULT = os.path.normpath(os.path.join(ROOT, '..', 'shared', 'data'))


def realdata_path(*names, what):
    """The first of ``names`` (paths inside the real-data folder) that exists; otherwise the test is
    skipped with one line naming CIFAR_TOOLKIT_REALDATA and ``what`` it needs there."""
    folder = os.environ.get(REALDATA_VARIABLE)
    where = f'{REALDATA_VARIABLE}={folder}'
    if not folder:
        if not os.path.isdir(REALDATA_DEFAULT):
            pytest.skip(f'no real data: set {REALDATA_VARIABLE} to a folder holding {what}')
        folder, where = REALDATA_DEFAULT, f'{REALDATA_DEFAULT} ({REALDATA_VARIABLE} unset)'
    for name in names:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    pytest.skip(f'{where} holds no {what}')


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test reaches the network: a missing dataset is an error unless a test mocks the download."""
    monkeypatch.setenv('CIFAR_TOOLKIT_OFFLINE', '1')


@pytest.fixture(scope='session')
def cifar10_dir(tmp_path_factory):
    return write_cifar10(str(tmp_path_factory.mktemp('cifar10')))


@pytest.fixture(scope='session')
def mnist_dir(tmp_path_factory):
    return write_mnist_family(str(tmp_path_factory.mktemp('mnist')))


# A small model and a short schedule: enough for every code path, seconds on a CPU.
TINY_RUN = ['--arch', 'resnet', '--depth', '8', '--base_channels', '4', '--epochs', '2',
            '--batch_size', '20', '--device', 'cpu', '--no-tensorboard', '--milestones', '[1]']


def build_trainer(model, args, device=torch.device('cpu'), num_classes=10, teacher=None, **schedule):
    """The optimizer, schedule (``schedule``: optim.build_scheduler's arguments), regularizer and Trainer
    main.py builds around ``model`` for the settings ``args`` (main.parse_args)."""
    import augmentations
    import engine
    import optim
    optimizer = optim.build_optimizer(model, **optim.optimizer_kwargs(args))
    scheduler = optim.build_scheduler(optimizer, **schedule)
    regularizer = augmentations.BatchRegularizer(num_classes, **augmentations.regularizer_kwargs(args))
    return engine.Trainer(model, optimizer, scheduler, regularizer, device, teacher=teacher,
                          **engine.trainer_kwargs(args))


def run_main(argv):
    """Run main.py in-process; returns the exit code (0 on success)."""
    import main
    try:
        main.cli(argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


def run_main_interrupted_in_epoch(argv, epoch):
    """run_main(argv) with a Ctrl-C as training epoch ``epoch`` starts (a crash between checkpoints):
    the run saves what it saves on SIGINT, and main.cli's caller gets the KeyboardInterrupt."""
    import engine
    real_train = engine.Trainer.train_one_epoch

    def interrupted(self, loader, epoch_now, *rest, **keywords):
        if epoch_now == epoch:
            raise KeyboardInterrupt
        return real_train(self, loader, epoch_now, *rest, **keywords)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.Trainer, 'train_one_epoch', interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_main(argv)
