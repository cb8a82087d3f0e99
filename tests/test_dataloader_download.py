"""A first run on a fresh machine: a missing built-in dataset is fetched through torchvision, staged
beside --dataset_dir and renamed into place. The network is mocked: torchvision's own dataset classes
run, but their download_and_extract_archive writes a tiny generated dataset (or fails), and the MD5
check of the extracted CIFAR files, which tiny files cannot pass, checks only that they exist."""
import os
import urllib.error

import pytest

import dataloader
from conftest import TINY_RUN, class_patterned_images, run_main, write_cifar10, write_idx
from utils import UsageError


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed (conftest turns them off for every test), each recorded in the returned list."""
    monkeypatch.delenv(dataloader.OFFLINE_ENV, raising=False)
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.mnist as mnist
    fetched = []

    def fake_cifar(url, download_root, filename=None, md5=None, **kwargs):
        fetched.append(url)
        write_cifar10(download_root, n_per_batch=20, n_test=20)

    def fake_idx(url, download_root, filename=None, md5=None, **kwargs):
        fetched.append(url)
        os.makedirs(download_root, exist_ok=True)
        images, labels = class_patterned_images(40, 1, 28, 10, seed=0)
        array = images[:, 0] if 'images' in filename else labels
        write_idx(os.path.join(download_root, filename[:-len('.gz')]), array, compress=False)

    monkeypatch.setattr(cifar, 'download_and_extract_archive', fake_cifar)
    monkeypatch.setattr(cifar, 'check_integrity', lambda path, md5=None: os.path.isfile(path))
    monkeypatch.setattr(mnist, 'download_and_extract_archive', fake_idx)
    return fetched


def leftovers(parent):
    return [name for name in os.listdir(parent) if '.download-' in name]


def test_a_missing_dataset_is_downloaded_and_renamed_into_place(online, tmp_path):
    root = tmp_path / 'datasets' / 'CIFAR10'  # neither it nor its parent exists yet
    images, labels = dataloader.load_split(str(root), 'CIFAR10', train=True, download=True)
    assert images.shape == (100, 3, 32, 32) and len(labels) == 100
    assert online == ['https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz']
    assert sorted(os.listdir(root)) == ['cifar-10-batches-py'] and not leftovers(root.parent)
    dataloader.load_split(str(root), 'CIFAR10', train=False, download=True)
    assert len(online) == 1  # present now: not fetched again


@pytest.mark.parametrize('name', ['MNIST', 'FashionMNIST', 'KMNIST'])
def test_the_mnist_family_is_downloaded(online, tmp_path, name):
    root = tmp_path / name
    images, labels = dataloader.load_split(str(root), name, train=False, download=True)
    assert images.shape == (40, 1, 28, 28) and len(labels) == 40
    assert sorted(os.listdir(root)) == [name] and os.path.isdir(root / name / 'raw')
    assert not leftovers(tmp_path) and not dataloader.missing(str(root), name)


@pytest.mark.parametrize('failure', [urllib.error.URLError('no route to host'), KeyboardInterrupt()])
def test_a_failed_or_interrupted_download_leaves_nothing(online, tmp_path, monkeypatch, failure):
    import torchvision.datasets.cifar as cifar

    def half_then_fail(url, download_root, **kwargs):
        folder = os.path.join(download_root, 'cifar-10-batches-py')
        os.makedirs(folder)
        open(os.path.join(folder, 'data_batch_1'), 'wb').write(b'half')
        raise failure
    monkeypatch.setattr(cifar, 'download_and_extract_archive', half_then_fail)
    root = tmp_path / 'CIFAR10'
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            dataloader.load_split(str(root), 'CIFAR10', train=True, download=True)
    else:
        with pytest.raises(UsageError) as error:
            dataloader.load_split(str(root), 'CIFAR10', train=True, download=True)
        message = str(error.value)
        assert message.startswith(f'CIFAR10 is not in {root} and could not be downloaded from '
                                  f'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz')  # no --download: not given
        assert 'no route to host' in message and f'{root}/cifar-10-batches-py/' in message
        assert '\n' not in message
    assert not os.path.exists(root / 'cifar-10-batches-py') and not leftovers(tmp_path)


def test_a_failed_download_into_new_folders_removes_them(online, tmp_path, monkeypatch):
    """The default --dataset_dir (~/.torchvision/datasets/NAME) on a fresh machine: a failed download
    leaves none of the folders it created."""
    import torchvision.datasets.cifar as cifar

    def fail(url, download_root, **kwargs):
        raise urllib.error.URLError('no route to host')
    monkeypatch.setattr(cifar, 'download_and_extract_archive', fail)
    home = tmp_path / 'home'
    home.mkdir()
    with pytest.raises(UsageError):
        dataloader.load_split(str(home / '.torchvision' / 'datasets' / 'CIFAR10'), 'CIFAR10', train=True,
                              download=True)
    assert os.listdir(home) == []


def test_an_incomplete_dataset_folder_is_not_overwritten(online, tmp_path):
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    (folder / 'batches.meta').write_bytes(b'mine')
    with pytest.raises(UsageError, match='exists but does not hold a complete CIFAR10; remove it'):
        dataloader.load_split(str(tmp_path), 'CIFAR10', train=True, download=True)
    assert os.listdir(folder) == ['batches.meta'] and not online


def test_the_readme_run_works_on_a_fresh_machine(online, tmp_path, capsys):
    """The default: no --download needed; --no-download and the environment variable turn it off."""
    root = tmp_path / 'datasets' / 'CIFAR10'
    run = [*TINY_RUN, '--epochs', '1', '--dataset_dir', str(root)]
    assert run_main([*run, '--no-download', '--outdir', str(tmp_path / 'a')]) == 2
    err = capsys.readouterr().err
    assert 'files not found' in err and 'downloading is off' in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / 'a') and not os.path.exists(root) and not online

    os.environ[dataloader.OFFLINE_ENV] = '1'
    try:
        assert run_main([*run, '--outdir', str(tmp_path / 'b')]) == 2
        assert dataloader.OFFLINE_ENV in capsys.readouterr().err and not online
    finally:
        del os.environ[dataloader.OFFLINE_ENV]

    assert run_main([*run, '--outdir', str(tmp_path / 'c')]) == 0
    assert len(online) == 1 and os.path.isfile(tmp_path / 'c' / 'model_state.pth')
    assert not leftovers(root.parent)
    assert run_main([*run, '--outdir', str(tmp_path / 'd')]) == 0 and len(online) == 1


def test_an_explicit_download_overrides_the_environment(online, tmp_path, monkeypatch):
    import main
    monkeypatch.setenv(dataloader.OFFLINE_ENV, 'yes')
    assert main.parse_args(['--outdir', 'x']).download is False
    assert main.parse_args(['--outdir', 'x', '--download']).download is True
    monkeypatch.setenv(dataloader.OFFLINE_ENV, '0')
    assert main.parse_args(['--outdir', 'x']).download is True
    assert main.parse_args(['--outdir', 'x', '--no-download']).download is False
    assert main.parse_args(['--dry_run']).download is False  # a dry run writes nothing


def test_fetch_dataset_fetches_only_what_is_missing(online, tmp_path):
    dataloader.fetch_dataset('CIFAR10', str(tmp_path))
    dataloader.fetch_dataset('CIFAR10', str(tmp_path))
    assert len(online) == 1
    dataloader.fetch_dataset('ImageFolder', str(tmp_path / 'folder'))  # nothing to fetch
    assert len(online) == 1
