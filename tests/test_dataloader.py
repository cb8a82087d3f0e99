"""Dataset readers on tiny files in the real formats, and the two loader pipelines."""
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch

import dataloader
from conftest import realdata_path, write_cifar10, write_cifar100, write_image_folder, write_mnist_family
from utils import UsageError

CPU = torch.device('cpu')


def test_cifar10_reader_matches_written_pickles(cifar10_dir):
    images, labels = dataloader.load_split(cifar10_dir, 'CIFAR10', train=True)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8
    with open(os.path.join(cifar10_dir, 'cifar-10-batches-py', 'data_batch_2'), 'rb') as f:
        batch = pickle.load(f, encoding='latin1')
    # rows are R, G, B planes of 32x32 in row-major order
    assert torch.equal(images[40], torch.from_numpy(batch['data'][0].reshape(3, 32, 32)))
    assert labels[40:80].tolist() == batch['labels']
    test_images, test_labels = dataloader.load_split(cifar10_dir, 'CIFAR10', train=False)
    assert test_images.shape == (40, 3, 32, 32) and test_labels.dtype == torch.int64


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_cifar_reader_reads_the_pickles_of_every_protocol(tmp_path, protocol):
    root = write_cifar10(str(tmp_path))
    rng = np.random.default_rng(protocol)
    data, labels = rng.integers(0, 256, (7, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, 7)]
    with open(os.path.join(root, 'cifar-10-batches-py', 'test_batch'), 'wb') as f:
        pickle.dump({'data': data, 'labels': labels}, f, protocol=protocol)
    images, read_labels = dataloader.load_split(root, 'CIFAR10', train=False)
    assert torch.equal(images, torch.from_numpy(data.reshape(7, 3, 32, 32))) and read_labels.tolist() == labels


def test_cifar_reader_reads_the_numpy_1_names(tmp_path):
    """numpy 1 pickles name numpy.core.multiarray (so do the original files); numpy 2 numpy._core."""
    root = write_cifar10(str(tmp_path))
    path = os.path.join(root, 'cifar-10-batches-py', 'test_batch')
    with open(path, 'rb') as f:
        content = f.read()
    assert b'numpy._core.multiarray\n_reconstruct' in content
    with open(path, 'wb') as f:
        f.write(content.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    images, _ = dataloader.load_split(root, 'CIFAR10', train=False)
    assert images.shape == (40, 3, 32, 32)


def test_cifar_reader_reads_the_python2_files_of_the_original_release(tmp_path):
    """The original files' layout (Python 2 byte strings, numpy.core names), as the unpack script of
    the real-data folder (CIFAR_TOOLKIT_REALDATA) writes it."""
    script = realdata_path('unpack_cifar10.py', what='unpack_cifar10.py')
    spec = importlib.util.spec_from_file_location('unpack_cifar10', script)
    unpack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unpack)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 50)
    test = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 10)
    classes = [f'class {i}' for i in range(10)]
    unpack.write_pickles(str(tmp_path), train, test, classes)
    for (images, labels), split in ((train, True), (test, False)):
        read_images, read_labels = dataloader.load_split(str(tmp_path), 'CIFAR10', train=split)
        assert torch.equal(read_images, torch.from_numpy(images.transpose(0, 3, 1, 2)))
        assert read_labels.tolist() == labels.tolist()
    assert dataloader.cifar_class_names(str(tmp_path), 'CIFAR10') == tuple(classes)


def test_cifar_class_names_from_the_meta_file(cifar10_dir, tmp_path):
    assert dataloader.cifar_class_names(cifar10_dir, 'CIFAR10') == tuple(str(i) for i in range(10))
    assert dataloader.cifar_class_names(str(tmp_path), 'CIFAR10') is None  # no meta file: the caller's choice


def test_cifar100_reader_uses_fine_labels(tmp_path):
    root = write_cifar100(str(tmp_path))
    images, labels = dataloader.load_split(root, 'CIFAR100', train=True)
    assert images.shape == (200, 3, 32, 32)
    assert labels.max() > 20  # fine labels go to 99, coarse only to 19


@pytest.mark.parametrize('name', ['MNIST', 'FashionMNIST', 'KMNIST'])
@pytest.mark.parametrize('compress', [True, False])
def test_mnist_family_reader(tmp_path, name, compress):
    root = write_mnist_family(str(tmp_path), name=name, compress=compress)
    images, labels = dataloader.load_split(root, name, train=True)
    assert images.shape == (200, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (200,) and set(labels.tolist()) == set(range(10))
    test_images, _ = dataloader.load_split(root, name, train=False)
    assert test_images.shape == (100, 1, 28, 28)


def test_real_mnist_test_set_if_present():
    """The official MNIST test set in the real-data folder (CIFAR_TOOLKIT_REALDATA): its mnist/ or
    MNIST/raw/ (as torchvision downloads it)."""
    folder = realdata_path('mnist', os.path.join('MNIST', 'raw'), what='mnist/ or MNIST/raw/')
    images, labels = dataloader.load_split(folder, 'MNIST', train=False)
    assert images.shape == (10000, 1, 28, 28)
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the official test set's first labels
    assert abs(images.float().mean().item() / 255 - 0.1325) < 0.002


def test_missing_files_name_where_we_looked(tmp_path):
    with pytest.raises(UsageError, match=r'--dataset_dir: CIFAR10 files not found: looked for .*cifar-10-batches-py.*--download'):
        dataloader.load_split(str(tmp_path), 'CIFAR10', train=True)
    with pytest.raises(UsageError, match=r'MNIST.raw'):
        dataloader.load_split(str(tmp_path), 'MNIST', train=True)


def test_truncated_idx_and_corrupt_pickle_are_clear_errors(tmp_path):
    root = write_mnist_family(str(tmp_path), compress=False)
    path = os.path.join(root, 'MNIST', 'raw', 'train-images-idx3-ubyte')
    with open(path, 'r+b') as f:
        f.truncate(1000)
    with pytest.raises(UsageError, match='not a valid idx file.*truncated'):
        dataloader.load_split(root, 'MNIST', train=True)
    cifar_root = write_cifar10(str(tmp_path / 'c'))
    with open(os.path.join(cifar_root, 'cifar-10-batches-py', 'data_batch_3'), 'wb') as f:
        f.write(b'not a pickle')
    with pytest.raises(UsageError, match='data_batch_3 is not a valid CIFAR10 batch file'):
        dataloader.load_split(cifar_root, 'CIFAR10', train=True)


@pytest.mark.parametrize('name,channels,size,classes,flip', [
    ('CIFAR10', 3, 32, 10, True), ('CIFAR100', 3, 32, 100, True), ('MNIST', 1, 28, 10, False),
    ('FashionMNIST', 1, 28, 10, True), ('KMNIST', 1, 28, 10, False)])
def test_dataset_info(name, channels, size, classes, flip):
    info = dataloader.DATASETS[name]
    assert (info.in_channels, info.image_size, info.num_classes, info.horizontal_flip) == (channels, size, classes, flip)
    assert len(info.mean) == len(info.std) == channels


def test_device_loader_epoch(cifar10_dir):
    data = dataloader.build_data('CIFAR10', cifar10_dir, 32, CPU)
    train, test = data.train_loader, data.test_loader
    assert len(train) == 200 // 32 and len(test) == 1
    seen = torch.cat([labels for _, labels in train])
    assert len(seen) == 6 * 32
    images, labels = next(iter(test))
    raw, raw_labels = dataloader.load_split(cifar10_dir, 'CIFAR10', train=False)
    expected = (raw.float() / 255 - torch.tensor(dataloader.DATASETS['CIFAR10'].mean).view(1, 3, 1, 1)) \
        / torch.tensor(dataloader.DATASETS['CIFAR10'].std).view(1, 3, 1, 1)
    assert torch.allclose(images, expected, atol=1e-5)
    assert torch.equal(labels, raw_labels)


def test_validation_split_is_fixed_and_disjoint(cifar10_dir):
    images, labels = dataloader.load_split(cifar10_dir, 'CIFAR10', train=True)
    tagged = images.clone()
    tagged.view(len(tagged), -1)[:, 0] = torch.arange(len(tagged), dtype=torch.uint8)
    (train_x, _), (val_x, _) = dataloader.split_validation(tagged, labels, 0.1)
    (train_again, _), _ = dataloader.split_validation(tagged, labels, 0.1)
    assert len(val_x) == 20 and len(train_x) == 180
    assert torch.equal(train_x, train_again)
    train_ids = set(train_x.view(180, -1)[:, 0].tolist())
    val_ids = set(val_x.view(20, -1)[:, 0].tolist())
    assert not train_ids & val_ids and len(train_ids | val_ids) == 200


def _marker_positions(augmented):
    flat = augmented.float().flatten(1).argmax(1)
    return flat // 32, flat % 32


def test_device_and_workers_pipelines_agree_on_crop_and_flip_statistics():
    """Both pipelines place a marker pixel uniformly over the 9x9 crop offsets, mirrored half the time."""
    torch.manual_seed(0)
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[0, :, 10, 5] = 255
    n = 8000
    info = dataloader.DATASETS['CIFAR10']
    device_loader = dataloader.DeviceLoader(image.expand(n, -1, -1, -1), torch.zeros(n, dtype=torch.long), info,
                                            n, CPU, True, random_crop_padding=4, horizontal_flip=True)
    device_rows, device_cols = _marker_positions(device_loader.augment(device_loader.images)[:, 0])
    transform = dataloader.build_sample_transform(info, True, random_crop_padding=4, horizontal_flip=True)
    workers = torch.stack([transform(image[0]) for _ in range(n)])
    worker_rows, worker_cols = _marker_positions(workers[:, 0])
    for rows, cols in ((device_rows, device_cols), (worker_rows, worker_cols)):
        assert set(rows.tolist()) == set(range(6, 15))  # offsets -4..4 around row 10
        row_counts = torch.bincount(rows - 6, minlength=9).float() / n
        assert (row_counts - 1 / 9).abs().max() < 5 * (1 / 9 * 8 / 9 / n) ** 0.5
        flipped = (cols > 15).float().mean()  # column 5 mirrors to 26
        assert abs(flipped - 0.5) < 5 * (0.25 / n) ** 0.5
        for columns, lowest in ((cols[cols <= 15], 1), (cols[cols > 15], 22)):
            col_counts = torch.bincount(columns - lowest, minlength=9).float() / len(columns)
            assert len(col_counts) == 9 and (col_counts - 1 / 9).abs().max() < 5 * (1 / 9 * 8 / 9 / len(columns)) ** 0.5
        # row and column offsets independent: the joint cell of (row 6, col 1) holds about 1/81 of unflipped
        corner = ((rows == 6) & (cols == 1)).float().sum() / (cols <= 15).float().sum()
        assert abs(corner - 1 / 81) < 5 * (1 / 81 / (n / 2)) ** 0.5
    assert abs(device_rows.float().mean() - worker_rows.float().mean()) < 0.1


def test_workers_pipeline_yields_same_eval_batches(cifar10_dir):
    device_data = dataloader.build_data('CIFAR10', cifar10_dir, 32, CPU, data_pipeline='device')
    worker_data = dataloader.build_data('CIFAR10', cifar10_dir, 32, CPU, data_pipeline='workers', num_workers=0)
    device_images, device_labels = next(iter(device_data.test_loader))
    worker_images, worker_labels = next(iter(worker_data.test_loader))
    assert torch.allclose(device_images, worker_images, atol=1e-6)
    assert torch.equal(device_labels, worker_labels)
    assert len(list(worker_data.train_loader)) == 200 // 32


def test_image_folder_dataset(tmp_path):
    root = write_image_folder(str(tmp_path))
    data = dataloader.build_data('ImageFolder', root, 4, CPU, num_workers=0)
    assert data.info.num_classes == 3 and data.info.in_channels == 3 and data.info.image_size == 32
    images, labels = next(iter(data.train_loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    # normalization statistics come from the training images
    all_test = torch.cat([x for x, _ in data.test_loader])
    assert abs(all_test.mean().item()) < 0.5
    with pytest.raises(UsageError, match='ImageFolder needs .*train'):
        dataloader.build_data('ImageFolder', str(tmp_path / 'nothing'), 4, CPU)


def test_image_folder_one_level_too_high_names_the_folder_to_pass(tmp_path):
    """ROOT/cifar10-folder/{train,test}/<class>/ (as an unpack script writes it) given as ROOT: the
    error names the folder that holds train/ and test/."""
    nested = write_image_folder(str(tmp_path / 'cifar10-folder'))
    with pytest.raises(UsageError) as error:
        dataloader.build_data('ImageFolder', str(tmp_path), 4, CPU)
    assert str(error.value).endswith(f'({nested} has train/ and test/: pass it as --dataset_dir)')
    (tmp_path / 'other' / 'train').mkdir(parents=True)
    (tmp_path / 'other' / 'test').mkdir()
    with pytest.raises(UsageError) as error:  # two candidates: no guess
        dataloader.build_data('ImageFolder', str(tmp_path), 4, CPU)
    assert str(error.value).endswith('with one folder per class')


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no route to host')
    monkeypatch.setattr(datasets, 'CIFAR10', offline)
    with pytest.raises(UsageError, match=r'CIFAR10 is not in \S+ and could not be downloaded from '
                                         r'https://\S+cifar-10-python.tar.gz .*no route to host.*cifar-10-batches-py'):
        dataloader.load_split(str(tmp_path), 'CIFAR10', train=True, download=True)


def _alternating_loader(n, seed, padding=2):
    """A loader of n identical images, bright on the left half, labelled 0..n-1 to follow each image."""
    torch.manual_seed(seed)
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[..., :16] = 255
    return dataloader.DeviceLoader(image.expand(n, -1, -1, -1), torch.arange(n), dataloader.DATASETS['CIFAR10'],
                                   500, CPU, True, random_crop_padding=padding, horizontal_flip=True,
                                   padding_mode='reflect', flip_mode='alternating')


def _flips_by_image(loader):
    """One pass over ``loader``: which images came out mirrored (indexed by label)."""
    flipped = torch.zeros(loader.num_samples, dtype=torch.bool)
    seen = torch.zeros(loader.num_samples, dtype=torch.long)
    for images, labels in loader:
        # with a translation of at most 2 px, column 0 stays in the bright half unless mirrored
        flipped[labels] = images[:, 0, :, 0].mean(1) < images[:, 0, :, 31].mean(1)
        seen[labels] += 1
    assert (seen == 1).all()
    return flipped


def test_alternating_flip_mirrors_each_image_every_other_epoch_and_resumes_by_set_epoch():
    n = 2000
    loader = _alternating_loader(n, seed=3)
    flips = []
    for epoch in range(1, 5):
        if epoch > 2:
            loader.set_epoch(epoch)  # main.py's call; epochs 1-2 rely on the loader counting itself
        flips.append(_flips_by_image(loader))
    flips = torch.stack(flips)
    tolerance = 5 * (0.25 / n) ** 0.5
    assert abs(flips[0].float().mean().item() - 0.5) < tolerance  # random phase across images
    assert abs(loader.flip_phase.float().mean().item() - 0.5) < tolerance
    assert torch.equal(flips[1:], ~flips[:-1])  # flipped in epoch e iff not in epoch e + 1
    for epoch in (2, 3):
        resumed = _alternating_loader(n, seed=3)  # a resumed run: same seed, then set_epoch
        resumed.set_epoch(epoch)
        assert torch.equal(_flips_by_image(resumed), flips[epoch - 1]), epoch
    other_seed = _flips_by_image(_alternating_loader(n, seed=4))
    assert 0.4 < (other_seed != flips[0]).float().mean() < 0.6  # the phase comes from the seed


def test_random_flip_mode_draws_fresh_coins_each_epoch():
    loader = _alternating_loader(2000, seed=3)
    loader.flip_phase = None  # flip_mode='random'
    first, second = _flips_by_image(loader), _flips_by_image(loader)
    agreement = (first == second).float().mean().item()
    assert abs(agreement - 0.5) < 5 * (0.25 / 2000) ** 0.5
    with pytest.raises(ValueError, match='flip_mode'):
        dataloader.DeviceLoader(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2),
                                dataloader.DATASETS['CIFAR10'], 2, CPU, True, flip_mode='sometimes')


def test_workers_pipeline_refuses_reflect_padding_and_alternating_flip(cifar10_dir):
    for options in (dict(padding_mode='reflect'), dict(flip_mode='alternating')):
        with pytest.raises(UsageError, match='need --data_pipeline device'):
            dataloader.build_data('CIFAR10', cifar10_dir, 32, CPU, data_pipeline='workers', num_workers=0, **options)
    data = dataloader.build_data('CIFAR10', cifar10_dir, 32, CPU, padding_mode='reflect', flip_mode='alternating')
    assert data.train_loader.padding_mode == 'reflect' and data.train_loader.flip_phase is not None
    assert data.test_loader.flip_phase is None
