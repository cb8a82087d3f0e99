#!/usr/bin/env python
"""Training throughput of the three ways to feed a model, measured side by side in one run.

    (a) device:      our default -- the uint8 dataset held on the training device, batched
                     crop/flip/normalize/cutout as tensor operations
    (b) workers:     our DataLoader path -- per-sample torchvision tensor transforms in worker
                     processes, then batched cutout on the device
    (c) torchvision: the reference tool's way -- PIL images through torchvision transforms and a
                     per-sample numpy Cutout in DataLoader workers

With ``--archs none`` only the pipeline runs (one full epoch each, no model). With model
names, each pipeline feeds a training step (forward, backward, SGD) for ``--steps`` steps,
and a fourth row times the same steps on one fixed batch already on the device (no data
loading): when (a) matches that row, the step is bound by the model, not the data.

    python benchmarks/throughput.py --dataset_dir .data --archs none
    python benchmarks/throughput.py --dataset_dir .data --archs resnet_preact56 wrn28_10 \\
        --device cuda --precision bf16 --channels_last
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augmentations  # noqa: E402
import dataloader  # noqa: E402
import models  # noqa: E402

ARCHS = {
    'resnet_preact56': dict(arch='resnet_preact', depth=56),
    'resnet_preact20': dict(arch='resnet_preact', depth=20),
    'wrn28_10': dict(arch='wrn', depth=28, widening_factor=10),
    'resnet9': dict(arch='resnet9'),
    'resnet20': dict(arch='resnet', depth=20),
    'densenet_bc100': dict(arch='densenet', depth=100, block_type='bottleneck', growth_rate=12),
    'shake_shake26_2x32d': dict(arch='shake_shake', depth=26, base_channels=32),
}


class NumpyCutout:
    """The reference tool's per-sample Cutout on a CHW float tensor, via numpy."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image):
        array = image.numpy().copy()
        height, width = array.shape[1:]
        center_y, center_x = np.random.randint(height), np.random.randint(width)
        top, bottom = max(0, center_y - self.size // 2), min(height, center_y + self.size // 2)
        left, right = max(0, center_x - self.size // 2), min(width, center_x + self.size // 2)
        array[:, top:bottom, left:right] = 0
        return torch.from_numpy(array)


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def torchvision_loader(images, labels, info, batch_size, num_workers, cutout_size):
    from torchvision import transforms
    transform = transforms.Compose([
        transforms.RandomCrop(info.image_size, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(info.mean, info.std), NumpyCutout(cutout_size)])
    return torch.utils.data.DataLoader(PILDataset(images, labels, transform), batch_size=batch_size, shuffle=True,
                                       num_workers=num_workers, drop_last=True, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=num_workers > 0)


def make_pipelines(args, device):
    images, labels = dataloader.load_split(args.dataset_dir, 'CIFAR10', train=True)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    info = dataloader.DATASETS['CIFAR10']
    augment = dict(random_crop_padding=4, horizontal_flip=True)
    device_loader = dataloader.DeviceLoader(images, labels, info, args.batch_size, device, True, **augment)
    worker_set = dataloader.TensorImageDataset(images, labels, dataloader.build_sample_transform(info, True, **augment))
    workers_loader = dataloader.WorkersLoader(worker_set, args.batch_size, device, True, args.num_workers)
    reference = torchvision_loader(images, labels, info, args.batch_size, args.num_workers, args.cutout_size)

    def with_cutout(loader):
        for batch, targets in loader:
            yield augmentations.cutout(batch, size=args.cutout_size), targets

    def to_device(loader):
        for batch, targets in loader:
            yield batch.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    return {'device': lambda: with_cutout(device_loader), 'workers': lambda: with_cutout(workers_loader),
            'torchvision': lambda: to_device(reference)}, len(device_loader) * args.batch_size


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_pipeline(make_batches, device, max_steps=None, step=None):
    """Images per second over one pass (or ``max_steps`` batches), after one warm-up batch."""
    batches = make_batches()
    first_images, first_labels = next(batches)
    if step:
        step(first_images, first_labels)
    synchronize(device)
    count, start = 0, time.perf_counter()
    for index, (batch, targets) in enumerate(batches):
        if max_steps and index >= max_steps:
            break
        if step:
            step(batch, targets)
        count += len(targets)
    synchronize(device)
    return count / (time.perf_counter() - start)


def make_train_step(name, args, device):
    spec = dict(ARCHS[name])
    model = models.create_model(spec.pop('arch'), num_classes=10, in_channels=3, **spec).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    compiled = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.precision)

    def step(images, labels):
        images = images.contiguous(memory_format=memory_format)
        context = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with context:
            loss = F.cross_entropy(compiled(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dataset_dir', required=True, help='holds cifar-10-batches-py/')
    parser.add_argument('--archs', nargs='+', default=['none'], help=f'none or any of {", ".join(ARCHS)}')
    parser.add_argument('--pipelines', nargs='+', default=['device', 'workers', 'torchvision'])
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--num_workers', type=int, default=2)
    parser.add_argument('--cutout_size', type=int, default=16)
    parser.add_argument('--steps', type=int, default=50, help='training steps timed per pipeline')
    parser.add_argument('--limit', type=int, default=0, help='use only the first N training images')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', default='fp32', choices=['fp32', 'fp16', 'bf16'])
    parser.add_argument('--channels_last', action='store_true')
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--json', help='also write the figures to this file')
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    np.random.seed(0)
    pipelines, epoch_images = make_pipelines(args, device)
    print(f'# device {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}), '
          f'torch {torch.__version__}, batch {args.batch_size}, {args.num_workers} workers, '
          f'precision {args.precision}, channels_last {args.channels_last}, compile {args.compile}')
    results = []
    for arch in args.archs:
        if arch == 'none':
            step, max_steps, label = None, None, f'pipeline only, one epoch of {epoch_images} images'
        else:
            model, step = make_train_step(arch, args, device)
            max_steps, label = args.steps, f'{arch} train step, {args.steps} steps'
        rates = {name: time_pipeline(pipelines[name], device, max_steps, step) for name in args.pipelines}
        if step is not None:
            fixed_images, fixed_labels = next(pipelines['device']())

            def fixed_batch():
                while True:
                    yield fixed_images, fixed_labels
            rates['no data loading'] = time_pipeline(fixed_batch, device, max_steps, step)
        reference = rates.get('torchvision')
        print(f'\n{label}')
        print(f'  {"pipeline":<16} {"images/s":>10} {"vs torchvision":>15}')
        for name, rate in rates.items():
            ratio = f'{rate / reference:.2f}x' if reference else '-'
            print(f'  {name:<16} {rate:>10.0f} {ratio:>15}')
        results.append({'arch': arch, 'images_per_sec': rates})
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'torch': torch.__version__, 'results': results}, f, indent=2)


if __name__ == '__main__':
    main()
