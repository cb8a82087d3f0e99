"""Tests for augmentations.py: statistics of the random augmentations measured over many samples
(tolerances of 5 standard errors, fixed seeds), exact pixel counts, closed forms of the losses,
and the BatchRegularizer pipeline on CIFAR- and MNIST-shaped batches."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

import augmentations
import dataloader
from flags import UsageError
from augmentations import (BatchRegularizer, cutmix, cutout, dual_cutout, dual_cutout_loss, mixup, one_hot,
                           random_erasing, regularizer_kwargs, ricap, smooth_targets, soft_target_cross_entropy,
                           weighted_accuracy)

CIFAR10 = dataloader.DATASETS['CIFAR10']


def assert_within_sigma(measured, expected, standard_error, sigmas=5.0):
    assert abs(measured - expected) <= sigmas * standard_error, (
        f'measured {measured:.5f}, expected {expected:.5f} +- {sigmas} x {standard_error:.5f}')


def assert_count_uniform(values, num_values):
    """Every value 0..num_values-1 occurs within 5 binomial standard errors of n / num_values."""
    counts = torch.bincount(values.flatten(), minlength=num_values).double()
    assert len(counts) == num_values, f'values outside 0..{num_values - 1}'
    n, p = values.numel(), 1.0 / num_values
    sigma = math.sqrt(n * p * (1 - p))
    assert ((counts - n * p).abs() <= 5 * sigma).all(), f'counts {counts.tolist()} vs {n * p:.1f} +- {5 * sigma:.1f}'


def erased_boxes(mask):
    """(B, H, W) boolean masks -> per-image (any, top, left, height, width) of their bounding boxes."""
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    any_erased = rows.any(dim=1)
    top = rows.float().argmax(dim=1)
    left = cols.float().argmax(dim=1)
    return any_erased, top, left, rows.sum(dim=1), cols.sum(dim=1)


def clipped_length_mean(size, extent, low, high):
    """Mean over integer starts low..high of the length of [start, start+size) inside [0, extent)."""
    lengths = [min(start + size, extent) - max(start, 0) for start in range(low, high + 1)]
    return sum(lengths) / len(lengths)


def beta_moment(alpha, power):
    """E[u^power] for u ~ Beta(alpha, alpha)."""
    return math.exp(math.lgamma(alpha + power) + math.lgamma(2 * alpha)
                    - math.lgamma(alpha) - math.lgamma(2 * alpha + power))


# ----------------------------------------------------------------------------- crop and flip

def test_random_crop_offsets_uniform_over_0_to_2p():
    torch.manual_seed(0)
    batch, size, padding = 4000, 32, 4
    # Every pixel holds its own flat index + 1, so a crop reveals where it came from.
    base = (torch.arange(size * size, dtype=torch.float32) + 1).view(1, 1, size, size)
    cropped = augmentations.random_crop(base.expand(batch, 1, size, size), padding)
    centre_value = cropped[:, 0, size // 2, size // 2].long() - 1
    offset_y = centre_value // size - size // 2 + padding
    offset_x = centre_value % size - size // 2 + padding
    assert_count_uniform(offset_y, 2 * padding + 1)
    assert_count_uniform(offset_x, 2 * padding + 1)
    padded = F.pad(base, (padding,) * 4)[0, 0]
    for index in range(20):
        y, x = offset_y[index].item(), offset_x[index].item()
        assert torch.equal(cropped[index, 0], padded[y:y + size, x:x + size])


def test_random_horizontal_flip_rate_is_one_half():
    torch.manual_seed(1)
    batch = 4000
    image = torch.arange(28 * 28, dtype=torch.float32).view(1, 1, 28, 28)
    flipped = augmentations.random_horizontal_flip(image.expand(batch, 1, 28, 28))
    is_mirror = (flipped == image.flip(3)).flatten(1).all(dim=1)
    is_same = (flipped == image).flatten(1).all(dim=1)
    assert (is_mirror ^ is_same).all()
    assert_within_sigma(is_mirror.double().mean().item(), 0.5, math.sqrt(0.25 / batch))


def _indexed_images(batch, height, width):
    """Every pixel holds its own flat index + 1, so a crop reveals where it came from."""
    base = (torch.arange(height * width, dtype=torch.float32) + 1).view(1, 1, height, width)
    return base, base.expand(batch, 1, height, width)


def _offsets(cropped, height, width, padding):
    """The crop offsets (0..2p) read from the centre pixel, which comes from inside the image."""
    source = cropped[:, 0, height // 2, width // 2].long() - 1
    return source // width - height // 2 + padding, source % width - width // 2 + padding


@pytest.mark.parametrize('height, width, padding', [(32, 32, 2), (20, 28, 4)])
def test_reflect_random_crop_offsets_uniform_and_content_is_numpy_reflect(height, width, padding):
    torch.manual_seed(5)
    batch = 4000
    base, images = _indexed_images(batch, height, width)
    cropped = augmentations.random_crop(images, padding, padding_mode='reflect')
    offset_y, offset_x = _offsets(cropped, height, width, padding)
    assert_count_uniform(offset_y, 2 * padding + 1)
    assert_count_uniform(offset_x, 2 * padding + 1)
    # reflect padding as numpy defines it: the edge pixel is not repeated (0 is not a pixel value)
    padded = torch.from_numpy(np.pad(base[0, 0].numpy(), padding, mode='reflect'))
    for index in range(50):
        y, x = offset_y[index].item(), offset_x[index].item()
        assert torch.equal(cropped[index, 0], padded[y:y + height, x:x + width]), (y, x)
    assert (cropped > 0).all()


def test_reflect_random_crop_folds_the_flip_in():
    """A flipped image is the mirror of its reflect-padded crop; given flips are obeyed exactly,
    and horizontal_flip alone mirrors half the images."""
    torch.manual_seed(6)
    batch, height, width, padding = 4000, 24, 32, 2
    base, images = _indexed_images(batch, height, width)
    padded = torch.from_numpy(np.pad(base[0, 0].numpy(), padding, mode='reflect'))
    flip = torch.rand(batch) < 0.3
    for cropped, given in ((augmentations.random_crop(images, padding, True, 'reflect', flip=flip), flip),
                           (augmentations.random_crop(images, padding, True, 'reflect'), None)):
        is_mirror = torch.zeros(batch, dtype=torch.bool)
        for index in range(batch):
            matches = []
            for mirrored in (False, True):
                view = cropped[index:index + 1].flip(3) if mirrored else cropped[index:index + 1]
                y, x = (o.item() for o in _offsets(view, height, width, padding))
                matches.append(0 <= y <= 2 * padding and 0 <= x <= 2 * padding
                               and torch.equal(view[0, 0], padded[y:y + height, x:x + width]))
            assert matches.count(True) == 1, index
            is_mirror[index] = matches[1]
        if given is not None:
            assert torch.equal(is_mirror, given)
        else:
            assert_within_sigma(is_mirror.double().mean().item(), 0.5, math.sqrt(0.25 / batch))
    with pytest.raises(ValueError, match='padding_mode'):
        augmentations.random_crop(images, padding, padding_mode='circular')


def test_random_crop_without_padding_applies_only_the_given_flips():
    images = torch.randn(6, 3, 8, 8)
    flip = torch.tensor([True, False, True, False, False, True])
    out = augmentations.random_crop(images, 0, True, 'reflect', flip=flip)
    assert torch.equal(out[flip], images[flip].flip(3)) and torch.equal(out[~flip], images[~flip])


def test_alternating_flip_mirrors_each_image_on_every_other_epoch():
    torch.manual_seed(7)
    n = 4000
    phase = torch.rand(n) < 0.5
    flips = torch.stack([augmentations.alternating_flip(phase, epoch) for epoch in range(1, 7)])
    assert flips.dtype == torch.bool and flips.shape == (6, n)
    assert torch.equal(flips[0], phase)  # epoch 1 follows the phase
    assert torch.equal(flips[1:], ~flips[:-1])  # then alternates
    assert (flips.sum(dim=0) == 3).all()  # every image mirrored in exactly half of the epochs
    for epoch_flips in flips:
        assert_within_sigma(epoch_flips.double().mean().item(), 0.5, math.sqrt(0.25 / n))


def test_normalize_standardizes_uint8_and_float_and_caches_its_constants():
    mean, std = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
    normalize = augmentations.Normalize(mean, std)
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalize(images), expected, atol=1e-5)
    assert torch.allclose(normalize(images.float() / 255), expected, atol=1e-5)
    assert torch.allclose(augmentations.normalize(images, mean, std), expected, atol=1e-5)
    constants = normalize._scale_shift(images.device, 255)
    normalize(images)
    assert all(a is b for a, b in zip(constants, normalize._scale_shift(images.device, 255)))


def test_normalize_leaves_a_float_input_unchanged():
    images = torch.rand(2, 3, 4, 4)
    before = images.clone()
    augmentations.Normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))(images)
    assert torch.equal(images, before)


# ----------------------------------------------------------------------------- Cutout

@pytest.mark.parametrize('size, extent', [(16, 32), (7, 28)])
def test_cutout_inside_erases_exactly_size_squared_at_uniform_positions(size, extent):
    torch.manual_seed(2)
    batch = 3000
    images = torch.ones(batch, 2, extent, extent)
    output = cutout(images, size=size, inside=True, fill=0.0)
    mask = output[:, 0] == 0
    assert torch.equal(mask, output[:, 1] == 0), 'all channels share the square'
    assert (mask.flatten(1).sum(dim=1) == size * size).all()
    any_erased, top, left, height, width = erased_boxes(mask)
    assert any_erased.all() and (height == size).all() and (width == size).all()
    assert_count_uniform(top, extent - size + 1)
    assert_count_uniform(left, extent - size + 1)
    # Each image draws its own square: positions vary inside one batch.
    assert len(set(zip(top.tolist(), left.tolist()))) > 0.5 * (extent - size + 1) ** 2


@pytest.mark.parametrize('size', [16, 15])
def test_cutout_clipped_area_matches_border_expectation(size):
    torch.manual_seed(3)
    batch, extent = 4000, 32
    output = cutout(torch.ones(batch, 1, extent, extent), size=size)
    mask = output[:, 0] == 0
    area = mask.flatten(1).sum(dim=1).double()
    any_erased, top, left, height, width = erased_boxes(mask)
    assert (area == height * width).all(), 'the erased region is one rectangle'
    # Centres uniform over the image: the top-left corner ranges over -size//2 .. extent-size+size//2.
    half = size // 2
    expected_side = clipped_length_mean(size, extent, -half, extent - size + half)
    assert_within_sigma(area.mean().item(), expected_side ** 2, area.std().item() / math.sqrt(batch))
    assert_within_sigma(width.double().mean().item(), expected_side,
                        width.double().std().item() / math.sqrt(batch))
    # The unclipped square starts uniformly at -size//2 .. extent-size+size//2 (centre uniform).
    for start, side in [(left, width), (top, height)]:
        unclipped_start = torch.where((start == 0) & (side < size), side - size, start)
        assert_count_uniform(unclipped_start + half, extent - size + 2 * half + 1)
    # Overhanging the left border is as likely as overhanging the right one.
    touches_left = ((left == 0) & (width < size)).double()
    touches_right = ((left + width == extent) & (width < size)).double()
    difference = touches_left - touches_right
    assert_within_sigma(difference.mean().item(), 0.0, difference.std().item() / math.sqrt(batch))


def test_cutout_prob_fill_and_input_untouched():
    torch.manual_seed(4)
    batch, prob = 4000, 0.3
    images = torch.full((batch, 3, 16, 16), 2.0)
    output = cutout(images, size=8, prob=prob, fill=-1.5)
    assert (images == 2.0).all(), 'cutout returns a new tensor'
    assert ((output == 2.0) | (output == -1.5)).all()
    erased = (output == -1.5).flatten(1).any(dim=1).double()
    assert_within_sigma(erased.mean().item(), prob, math.sqrt(prob * (1 - prob) / batch))
    assert (cutout(images, size=8, prob=0.0) == images).all()


# ----------------------------------------------------------------------------- Random Erasing

def test_random_erasing_frequency_area_and_aspect_bounds():
    torch.manual_seed(5)
    batch, extent, prob = 4000, 32, 0.5
    min_area, max_area, min_aspect = 0.02, 0.4, 0.3
    images = torch.full((batch, 1, extent, extent), 7.0)
    output = random_erasing(images, prob=prob, area_ratio_range=(min_area, max_area), min_aspect_ratio=min_aspect)
    mask = output[:, 0] != 7.0
    any_erased, top, left, height, width = erased_boxes(mask)
    assert_within_sigma(any_erased.double().mean().item(), prob, math.sqrt(prob * (1 - prob) / batch))

    height, width = height[any_erased].double(), width[any_erased].double()
    # The default fill is the mean pixel, 0 after normalization, so the mask is the full box.
    assert (output[:, 0][mask] == 0).all()
    assert (mask[any_erased].flatten(1).sum(dim=1) == height * width).all()
    assert ((height < extent) & (width < extent)).all()
    # Sides are sqrt(area * aspect) and sqrt(area / aspect) rounded, each within 1/2 of the real
    # side: hence these exact bounds on area and aspect ratio.
    image_area = extent * extent
    assert ((height - 0.5) * (width - 0.5) <= max_area * image_area).all()
    assert ((height + 0.5) * (width + 0.5) >= min_area * image_area).all()
    assert ((height - 0.5) / (width + 0.5) <= 1 / min_aspect).all()
    assert ((height + 0.5) / (width - 0.5) >= min_aspect).all()
    # h/w uniform in [0.3, 3.33] makes tall boxes the majority (a log-uniform ratio would not).
    assert (height > width).double().mean() > 0.6


def test_random_erasing_aspect_ratio_and_area_are_uniform():
    """The reference draws h/w ~ U(r1, 1/r1) and area/S ~ U(sl, sh) (paper section 3.1; its code and
    hysts with np.random.uniform). Huge images make rounding negligible, and areas <= 5% mean the
    first attempt always fits, so the accepted boxes show the drawn distributions themselves."""
    torch.manual_seed(20)
    n, extent, min_aspect, (min_area, max_area) = 20000, 40000, 0.3, (0.01, 0.05)
    erase, top, left, height, width = augmentations._random_erasing_boxes(
        n, extent, extent, 1.0, (min_area, max_area), min_aspect, 20, torch.device('cpu'))
    assert erase.all()
    assert ((top >= 0) & (top + height <= extent) & (left >= 0) & (left + width <= extent)).all()
    aspect = (height.double() / width.double()).numpy()
    low, high = min_aspect, 1 / min_aspect
    # mean and variance of U(low, high); log-uniform's mean (high - low) / log(high / low) = 1.26
    # lies 90 standard errors below 1.82
    assert_within_sigma(aspect.mean(), (low + high) / 2, (high - low) / math.sqrt(12 * n))
    fourth_moment = (high - low) ** 4 / 80 - ((high - low) ** 2 / 12) ** 2
    assert_within_sigma(aspect.var(), (high - low) ** 2 / 12, math.sqrt(fourth_moment / n))
    # ten equal-width bins each hold a tenth
    assert_count_uniform(torch.from_numpy(((aspect - low) / (high - low) * 10).astype(np.int64)).clamp(0, 9), 10)
    area = (height * width).double().numpy() / extent ** 2
    assert_within_sigma(area.mean(), (min_area + max_area) / 2, (max_area - min_area) / math.sqrt(12 * n))
    assert_count_uniform(torch.from_numpy(((area - min_area) / (max_area - min_area) * 10).astype(np.int64))
                         .clamp(0, 9), 10)


def test_random_erasing_box_by_hand():
    """Area 0.44 of a 10x10 image at aspect 1: side round(sqrt(44)) = round(6.63) = 7 as in the
    paper's code (hysts' int() would give 6), 49 pixels, at one of 4 x 4 positions, uniformly."""
    torch.manual_seed(21)
    images = torch.full((4000, 3, 10, 10), 7.0)
    output = random_erasing(images, prob=1.0, area_ratio_range=(0.44, 0.44), min_aspect_ratio=1.0)
    mask = output != 7.0
    assert (mask == mask[:, :1]).all() and (output[mask] == 0).all()  # every channel, the mean pixel
    any_erased, top, left, height, width = erased_boxes(mask[:, 0])
    assert any_erased.all() and (height == 7).all() and (width == 7).all()
    assert (mask[:, 0].flatten(1).sum(dim=1) == 49).all()
    assert_count_uniform(top, 4)
    assert_count_uniform(left, 4)


def test_random_erasing_fills():
    """mean: 0; random: N(0, 1) per pixel and channel; uniform (hysts): one U(0, 1) per rectangle."""
    torch.manual_seed(22)
    batch = 4000
    images = torch.full((batch, 3, 16, 16), 7.0)
    boxes = dict(prob=1.0, area_ratio_range=(0.1, 0.2), min_aspect_ratio=0.5)

    mean_fill = random_erasing(images, fill='mean', **boxes)
    assert ((mean_fill == 0) | (mean_fill == 7)).all() and (mean_fill == 0).flatten(1).any(1).all()

    noise = random_erasing(images, fill='random', **boxes)
    values = noise[noise != 7.0].double()
    assert_within_sigma(values.mean().item(), 0.0, 1 / math.sqrt(values.numel()))
    assert_within_sigma(values.var().item(), 1.0, math.sqrt(2 / values.numel()))
    erased = noise[:, 0] != 7.0
    assert (noise[:, 0][erased] != noise[:, 1][erased]).all()  # each channel draws its own values

    uniform = random_erasing(images, fill='uniform', **boxes)
    erased = uniform != 7.0
    assert (erased == erased[:, :1]).all()
    # one value per rectangle: the smallest and largest erased value of each image agree
    value = torch.where(erased, uniform, math.inf).flatten(1).amin(dim=1)
    assert torch.equal(value, torch.where(erased, uniform, -math.inf).flatten(1).amax(dim=1))
    value = value.double()
    assert ((value >= 0) & (value < 1)).all()
    assert_within_sigma(value.mean().item(), 0.5, math.sqrt(1 / 12 / batch))
    assert_within_sigma(value.var().item(), 1 / 12, math.sqrt((1 / 80 - 1 / 144) / batch))

    with pytest.raises(ValueError, match='--random_erasing_fill'):
        random_erasing(images, fill='black')


def test_random_erasing_leaves_image_when_no_attempt_fits():
    torch.manual_seed(6)
    images = torch.randn(64, 3, 32, 32)
    # Area = the whole image with aspect 1 gives a 32x32 box, which never fits strictly inside.
    output = random_erasing(images, prob=1.0, area_ratio_range=(1.0, 1.0), min_aspect_ratio=1.0)
    assert torch.equal(output, images)


# ----------------------------------------------------------------------------- Mixup

def one_hot_batch(batch):
    """Labels 0..batch-1 as one-hot targets, so every row of a mixed target names its sources."""
    return one_hot(torch.arange(batch), batch)


def partner_index(mixed_targets):
    """For distinct one-hot labels: the row each mixed row was combined with (itself if none)."""
    without_self = mixed_targets - torch.diag(torch.diagonal(mixed_targets))
    has_partner = without_self.sum(dim=1) > 0
    return torch.where(has_partner, without_self.argmax(dim=1), torch.arange(len(mixed_targets)))


def test_one_hot():
    targets = one_hot(torch.tensor([2, 0, 1]), 4)
    assert targets.dtype == torch.float32
    assert torch.equal(targets, torch.eye(4)[[2, 0, 1]])


@pytest.mark.parametrize('alpha', [1.0, 0.3])
def test_mixup_lambda_follows_beta(alpha):
    torch.manual_seed(7)
    batch, samples = 4, 4000
    images, targets = torch.randn(batch, 1, 4, 4), one_hot_batch(batch)
    lambdas = []
    for _ in range(samples):
        _, mixed = mixup(images, targets, alpha=alpha)
        partner = partner_index(mixed)
        moved = (partner != torch.arange(batch)).nonzero()
        if len(moved):
            lambdas.append(mixed[moved[0, 0], moved[0, 0]].item())
    lambdas = torch.tensor(lambdas, dtype=torch.float64)
    variance = 1 / (4 * (2 * alpha + 1))
    n = len(lambdas)
    assert n > 0.9 * samples
    assert_within_sigma(lambdas.mean().item(), 0.5, math.sqrt(variance / n))
    # (lam - 1/2)^2 <= 1/4, so its variance is at most variance / 4.
    assert_within_sigma(((lambdas - 0.5) ** 2).mean().item(), variance, math.sqrt(variance / 4 / n))


def test_mixup_images_and_targets_are_the_same_convex_combination():
    torch.manual_seed(8)
    batch = 16
    images, targets = torch.randn(batch, 3, 8, 8), one_hot_batch(batch)
    for _ in range(10):
        mixed_images, mixed_targets = mixup(images, targets, alpha=1.0)
        assert torch.allclose(mixed_targets.sum(dim=1), torch.ones(batch))
        partner = partner_index(mixed_targets)
        lam = torch.diagonal(mixed_targets)
        moved = partner != torch.arange(batch)
        assert torch.allclose(lam[moved], lam[moved][0].expand(int(moved.sum()))), 'one lambda per batch'
        lam = lam[moved][0]
        expected = lam * images + (1 - lam) * images[partner]
        assert torch.allclose(mixed_images, expected, atol=1e-6)


# ----------------------------------------------------------------------------- CutMix

def test_cutmix_lambda_is_the_exact_unpasted_fraction():
    torch.manual_seed(9)
    batch, extent = 8, 32
    images = torch.arange(1, batch + 1, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 2, extent, extent)
    targets = one_hot_batch(batch)
    for _ in range(100):
        mixed_images, mixed_targets = cutmix(images, targets, alpha=1.0)
        assert torch.allclose(mixed_targets.sum(dim=1), torch.ones(batch))
        partner = partner_index(mixed_targets)
        pasted = mixed_images[:, 0] != images[:, 0]
        moved = partner != torch.arange(batch)
        for index in moved.nonzero().flatten().tolist():
            assert torch.equal(pasted[index], pasted[moved.nonzero()[0, 0]]), 'one box per batch'
            pasted_count = pasted[index].sum().item()
            assert mixed_targets[index, index].item() == pytest.approx(1 - pasted_count / extent ** 2, abs=1e-6)
            assert (mixed_images[index, :, pasted[index]] == partner[index] + 1).all()
            _, _, _, height, width = erased_boxes(pasted[index][None])
            assert pasted_count == height.item() * width.item()


def authors_rand_bbox(size, lam, centre_x, centre_y):
    """clovaai/CutMix-PyTorch train.py ``rand_bbox`` for a square image of side ``size``, its random
    centre given: (x1, y1, x2, y2)."""
    cut_rat = np.sqrt(1. - lam)
    cut_w, cut_h = int(size * cut_rat), int(size * cut_rat)
    return (np.clip(centre_x - cut_w // 2, 0, size), np.clip(centre_y - cut_h // 2, 0, size),
            np.clip(centre_x + cut_w // 2, 0, size), np.clip(centre_y + cut_h // 2, 0, size))


def test_cutmix_integer_box_is_the_authors_rand_bbox():
    size = 32
    for lam in np.linspace(0, 1, 201):
        cut_ratio = torch.sqrt(1 - torch.tensor(lam, dtype=torch.float64))
        for centre in range(size):
            start, end = augmentations._cut_interval(cut_ratio, torch.tensor(centre), size, 'integer')
            x1, _, x2, _ = authors_rand_bbox(size, lam, centre, centre)
            assert (start.item(), end.item()) == (x1, x2), (lam, centre)


def beta_cdf(alpha, x):
    """P(u <= x) for u ~ Beta(alpha, alpha), alpha 1 or 1/2 (closed forms)."""
    x = min(max(x, 0.0), 1.0)
    return {1.0: x, 0.5: 2 / math.pi * math.asin(math.sqrt(x))}[alpha]


def authors_mean_pasted_fraction(alpha, size):
    """E[pasted area / image area] of the authors' box: the side s = int(size * sqrt(1 - lam)) takes each
    value with a Beta probability, and for an integer centre c the box spans min(c + s//2, size) -
    max(c - s//2, 0) pixels on each axis (the two axes independent given s)."""
    total = 0.0
    for side in range(size + 1):
        probability = beta_cdf(alpha, 1 - (side / size) ** 2) - beta_cdf(alpha, 1 - ((side + 1) / size) ** 2)
        half = side // 2
        mean_length = sum(min(c + half, size) - max(c - half, 0) for c in range(size)) / size
        total += probability * (mean_length / size) ** 2
    return total


def continuous_mean_pasted_fraction(alpha):
    # u = 1 - lam ~ Beta(alpha, alpha); a box of side s = sqrt(u) times the image side with a
    # uniform centre keeps s - s^2/4 of it per axis after clipping, so E = E[(s - s^2/4)^2].
    return beta_moment(alpha, 1) - beta_moment(alpha, 1.5) / 2 + beta_moment(alpha, 2) / 16


def measured_pasted_fractions(samples, alpha, **options):
    batch, extent = 8, 32
    images, targets = torch.zeros(batch, 1, extent, extent), one_hot_batch(batch)
    pasted = []
    for _ in range(samples):
        _, mixed_targets = cutmix(images, targets, alpha=alpha, **options)
        # With distinct one-hot labels, the smallest diagonal entry is the corrected lambda.
        pasted.append(1 - torch.diagonal(mixed_targets).min().item())
    return torch.tensor(pasted, dtype=torch.float64)


@pytest.mark.parametrize('alpha', [1.0, 0.5])
@pytest.mark.parametrize('box', ['integer', 'continuous'])
def test_cutmix_pasted_fraction_distribution(alpha, box):
    torch.manual_seed(10)
    samples = 3000
    pasted = measured_pasted_fractions(samples, alpha, box=box)
    expected = authors_mean_pasted_fraction(alpha, 32) if box == 'integer' else continuous_mean_pasted_fraction(alpha)
    assert_within_sigma(pasted.mean().item(), expected, pasted.std().item() / math.sqrt(samples))


def test_authors_box_pastes_less_than_the_continuous_one():
    """The figures of cutmix's docstring: 29.9% against 32.1% of a 32x32 image for alpha 1."""
    assert authors_mean_pasted_fraction(1.0, 32) == pytest.approx(0.299, abs=5e-4)
    assert continuous_mean_pasted_fraction(1.0) == pytest.approx(0.321, abs=5e-4)


def test_cutmix_prob_mixes_that_fraction_of_batches():
    torch.manual_seed(11)
    samples, prob, extent = 4000, 0.5, 32
    mixed = (measured_pasted_fractions(samples, 1.0, prob=prob) > 0).double()
    # an applied box is empty when its side int(32 * sqrt(1 - lam)) < 2: P(lam > 1 - (2/32)^2) = 1/256
    expected = prob * (1 - (2 / extent) ** 2)
    assert_within_sigma(mixed.mean().item(), expected, math.sqrt(expected * (1 - expected) / samples))


@pytest.mark.parametrize('box', ['integer', 'continuous'])
def test_cutmix_prob_zero_leaves_the_batch_unchanged(box):
    torch.manual_seed(12)
    images, targets = torch.randn(8, 3, 32, 32), one_hot_batch(8)
    for _ in range(20):
        mixed_images, mixed_targets = cutmix(images, targets, prob=0.0, box=box)
        assert torch.equal(mixed_images, images) and torch.equal(mixed_targets, targets)


def test_cutmix_box_and_prob_are_checked_and_reach_the_regularizer():
    with pytest.raises(ValueError, match='--cutmix_box'):
        cutmix(torch.zeros(2, 1, 4, 4), one_hot_batch(2), box='round')
    defaults = BatchRegularizer(10, **regularizer_kwargs(argparse.Namespace(use_cutmix=True)))
    assert (defaults.cutmix_prob, defaults.cutmix_box) == (1.0, 'integer')
    chosen = BatchRegularizer(10, **regularizer_kwargs(argparse.Namespace(use_cutmix=True, cutmix_prob=0.5,
                                                                        cutmix_box='continuous')))
    assert (chosen.cutmix_prob, chosen.cutmix_box) == (0.5, 'continuous')
    assert 'cutmix(alpha=1.0, prob=0.5, box=continuous)' in repr(chosen)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    torch.manual_seed(13)
    by_regularizer = chosen(images, labels)
    torch.manual_seed(13)
    by_hand = cutmix(images, one_hot(labels, 10), 1.0, 0.5, 'continuous')
    assert all(torch.equal(a, b) for a, b in zip(by_regularizer, by_hand))


# ----------------------------------------------------------------------------- RICAP

def position_encoded_batch(batch, height, width):
    """Channels (image index, row, column): every output pixel of ricap names its source."""
    image_index = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1).expand(batch, height, width)
    rows = torch.arange(height, dtype=torch.float32).view(1, height, 1).expand(batch, height, width)
    cols = torch.arange(width, dtype=torch.float32).view(1, 1, width).expand(batch, height, width)
    return torch.stack([image_index, rows, cols], dim=1)


def ricap_boundaries(patched):
    """The columns and rows where the (source image, row shift, column shift) changes."""
    _, _, height, width = patched.shape
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    key = torch.stack([patched[:, 0].long(), patched[:, 1].long() - rows, patched[:, 2].long() - cols], dim=1)
    column_changes = (key[..., 1:] != key[..., :-1]).flatten(0, 2).any(dim=0).nonzero().flatten() + 1
    row_changes = (key[:, :, 1:] != key[:, :, :-1]).transpose(1, 2).flatten(2).any(dim=2).any(dim=0)
    return column_changes.tolist(), (row_changes.nonzero().flatten() + 1).tolist()


@pytest.mark.parametrize('height, width', [(32, 32), (28, 20)])
def test_ricap_quadrants_tile_the_image_and_targets_weight_areas(height, width):
    torch.manual_seed(11)
    batch = 16
    images, targets = position_encoded_batch(batch, height, width), one_hot_batch(batch)
    for _ in range(50):
        patched, mixed_targets = ricap(images, targets, beta=0.3)
        # One shared vertical and one shared horizontal cut, and a constant source shift within
        # each of the four blocks: four crops whose areas add up to the image.
        column_cuts, row_cuts = ricap_boundaries(patched)
        assert len(column_cuts) <= 1 and len(row_cuts) <= 1
        pixels_from = F.one_hot(patched[:, 0].long().flatten(1), batch).sum(dim=1).float()
        assert torch.allclose(mixed_targets, pixels_from / (height * width), atol=1e-6)
        assert torch.allclose(mixed_targets.sum(dim=1), torch.ones(batch))


@pytest.mark.parametrize('beta', [0.3, 1.0])
def test_ricap_boundary_follows_beta(beta):
    torch.manual_seed(12)
    batch, extent, samples = 4, 32, 1500
    images, targets = position_encoded_batch(batch, extent, extent), one_hot_batch(batch)
    squared_deviations = []
    for _ in range(samples):
        patched, _ = ricap(images, targets, beta=beta)
        for cuts in ricap_boundaries(patched):
            # No cut inside the image means the boundary sits at 0 or at the far side.
            boundary = cuts[0] / extent if cuts else 0.0
            squared_deviations.append((boundary - 0.5) ** 2)
    squared_deviations = torch.tensor(squared_deviations, dtype=torch.float64)
    # Var Beta(b, b) = 1 / (4 (2b + 1)); rounding to whole pixels adds 1 / (12 extent^2).
    expected = 1 / (4 * (2 * beta + 1)) + 1 / (12 * extent ** 2)
    assert_within_sigma(squared_deviations.mean().item(), expected,
                        squared_deviations.std().item() / math.sqrt(len(squared_deviations)))


# ----------------------------------------------------------------------------- losses and accuracy

def test_label_smoothed_targets_and_loss():
    num_classes, epsilon = 10, 0.1
    labels = torch.tensor([3, 0, 9, 3])
    smoothed = smooth_targets(one_hot(labels, num_classes), epsilon)
    assert torch.allclose(smoothed[torch.arange(4), labels], torch.full((4,), 1 - epsilon + epsilon / num_classes))
    assert torch.allclose(smoothed.sum(dim=1), torch.ones(4))
    assert torch.allclose(smoothed.sort(dim=1).values[:, :-1], torch.full((4, 9), epsilon / num_classes))

    torch.manual_seed(13)
    logits = torch.randn(4, num_classes)
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot(labels, num_classes), epsilon),
                          F.cross_entropy(logits, labels, label_smoothing=epsilon))
    # Smoothing a mixed target = mixing the smoothed losses (the loss is linear in the target).
    other = torch.tensor([1, 1, 2, 5])
    lam = 0.3
    mixed = lam * one_hot(labels, num_classes) + (1 - lam) * one_hot(other, num_classes)
    expected = (lam * F.cross_entropy(logits, labels, label_smoothing=epsilon)
                + (1 - lam) * F.cross_entropy(logits, other, label_smoothing=epsilon))
    assert torch.allclose(soft_target_cross_entropy(logits, mixed, epsilon), expected)


def test_dual_cutout_views_are_independent_cutouts():
    torch.manual_seed(14)
    images = torch.ones(256, 1, 32, 32)
    views = dual_cutout(images, size=16, inside=True)
    assert views.shape == (512, 1, 32, 32)
    masks = views[:, 0] == 0
    assert (masks.flatten(1).sum(dim=1) == 256).all()
    same_square = (masks[:256] == masks[256:]).flatten(1).all(dim=1)
    assert same_square.double().mean() < 0.05


def test_dual_cutout_loss_reduces_to_cross_entropy_for_equal_views():
    torch.manual_seed(15)
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    targets = one_hot(labels, 10)
    equal_views = torch.cat([logits, logits])
    assert torch.allclose(dual_cutout_loss(equal_views, targets, alpha=0.1), F.cross_entropy(logits, labels))
    assert torch.allclose(dual_cutout_loss(equal_views, targets, alpha=0.1, label_smoothing=0.2),
                          F.cross_entropy(logits, labels, label_smoothing=0.2))
    second = torch.randn(6, 10)
    both = torch.cat([logits, second])
    cross_entropy = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(second, labels))
    # default, the paper authors' code and hysts: MSE of the logits, averaged over batch and classes
    expected = cross_entropy + 0.1 * ((logits - second) ** 2).sum() / (6 * 10)
    assert torch.allclose(dual_cutout_loss(both, targets, alpha=0.1), expected)
    assert torch.allclose(BatchRegularizer(10, use_dual_cutout=True).loss(both, targets), expected)
    # the alternative: squared L2 distance of the two softmax outputs, averaged over the batch
    probability_gap = sum(((logits[i].softmax(0) - second[i].softmax(0)) ** 2).sum() for i in range(6)) / 6
    assert torch.allclose(dual_cutout_loss(both, targets, alpha=0.1, distance='softmax'),
                          cross_entropy + 0.1 * probability_gap)
    with pytest.raises(ValueError):
        dual_cutout_loss(logits, targets)
    with pytest.raises(ValueError, match='--dual_cutout_distance'):
        dual_cutout_loss(both, targets, distance='cosine')


def test_weighted_accuracy_plain_mixed_and_dual_views():
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    labels = torch.tensor([0, 1, 0, 2])
    assert weighted_accuracy(logits, one_hot(labels, 3)).item() == pytest.approx(0.5)
    # Mixed targets: 0.7 * label_a + 0.3 * label_b, scored by the weight of the predicted class.
    other = torch.tensor([1, 0, 2, 0])
    mixed = 0.7 * one_hot(labels, 3) + 0.3 * one_hot(other, 3)
    assert weighted_accuracy(logits, mixed).item() == pytest.approx((0.7 + 0.7 + 0.3 + 0.3) / 4)
    # Dual-Cutout logits (2B, K) are scored on the mean of the two views (the paper authors' code and
    # hysts): each view alone gets 2 of 4 right, their mean [2.5, 2, 0], [0, 2.5, 10], [10, 0, 2.5],
    # [2.5, 0, 10] gets 3.
    second_view = torch.tensor([[0, 4.0, 0], [0, 0, 20.0], [20.0, 0, 0], [0, 0, 20.0]])
    assert weighted_accuracy(second_view, one_hot(labels, 3)).item() == pytest.approx(0.5)
    both = torch.cat([logits, second_view])
    assert weighted_accuracy(both, one_hot(labels, 3)).item() == pytest.approx(0.75)


# ----------------------------------------------------------------------------- AutoAugment

@pytest.mark.parametrize('shape', [(200, 3, 32, 32), (200, 1, 28, 28)])
def test_autoaugment_keeps_dtype_shape_and_changes_images(shape):
    torch.manual_seed(16)
    image = torch.randint(0, 256, shape[1:], dtype=torch.uint8)
    images = image.expand(shape).contiguous()
    output = augmentations.autoaugment(images)
    assert output.dtype == torch.uint8 and output.shape == images.shape
    # Sub-policies fire with probabilities 0.1..1 and some ops can be no-ops on a given image,
    # so not every image changes; a third is a loose floor that a policy doing nothing fails.
    changed = (output != images).flatten(1).any(dim=1)
    assert changed.double().mean() > 1 / 3
    # Identical inputs, per-image sub-policies: many different outputs in one batch.
    assert len({bytes(image.numpy()) for image in output}) > 20
    with pytest.raises(TypeError):
        augmentations.autoaugment(images.float())


# ----------------------------------------------------------------------------- BatchRegularizer

@pytest.mark.parametrize('flags, named', [
    (dict(use_mixup=True, use_ricap=True), ['--use_mixup', '--use_ricap']),
    (dict(use_mixup=True, use_cutmix=True), ['--use_mixup', '--use_cutmix']),
    (dict(use_ricap=True, use_cutmix=True), ['--use_ricap', '--use_cutmix']),
    (dict(use_cutmix=True, use_dual_cutout=True), ['--use_cutmix', '--use_dual_cutout']),
    (dict(use_mixup=True, use_dual_cutout=True), ['--use_mixup', '--use_dual_cutout']),
    (dict(use_dual_cutout=True, use_cutout=True), ['--use_dual_cutout', '--use_cutout']),
])
def test_batch_regularizer_rejects_bad_combinations(flags, named):
    with pytest.raises(ValueError) as error:
        BatchRegularizer(10, **flags)
    for flag in named:
        assert flag in str(error.value)


@pytest.mark.parametrize('argv, named', [
    (['--use_mixup', '--mixup_alpha', '0'], '--mixup_alpha 0'),
    (['--use_cutout', '--cutout_prob', '1.5'], '--cutout_prob 1.5'),
    (['--use_random_erasing', '--random_erasing_area_ratio_range', '[0.5,0.1]'], '--random_erasing_area_ratio_range'),
    (['--use_random_erasing', '--random_erasing_fill', 'black'], '--random_erasing_fill black'),
    (['--use_dual_cutout', '--dual_cutout_distance', 'cosine'], '--dual_cutout_distance cosine'),
    (['--use_label_smoothing', '--label_smoothing_epsilon', '1.0'], '--label_smoothing_epsilon 1.0'),
    (['--use_cutmix', '--cutmix_prob', '1.5'], '--cutmix_prob 1.5'),
    (['--use_cutmix', '--cutmix_box', 'round'], '--cutmix_box round'),
])
def test_regularizer_settings_outside_their_domains_are_refused(argv, named):
    """Each setting's range is its flag's domain, checked where the value enters (main.py's parser)."""
    import main
    with pytest.raises(UsageError) as error:
        main.parse_args(['--outdir', 'unused', *argv])
    assert str(error.value).startswith(named) and 'expected' in str(error.value)


PIPELINES = [
    dict(),
    dict(use_cutout=True, cutout_inside=True),
    dict(use_random_erasing=True, random_erasing_prob=1.0),
    dict(use_mixup=True, use_cutout=True),
    dict(use_ricap=True, use_label_smoothing=True),
    dict(use_cutmix=True, use_random_erasing=True),
    dict(use_dual_cutout=True, use_random_erasing=True, use_label_smoothing=True),
]


@pytest.mark.parametrize('shape', [(8, 3, 32, 32), (8, 1, 28, 28)])
@pytest.mark.parametrize('flags', PIPELINES)
def test_batch_regularizer_pipeline_trains_a_tiny_model(flags, shape):
    num_classes = 10
    torch.manual_seed(17)
    images, labels = torch.randn(shape), torch.randint(0, num_classes, (shape[0],))
    regularizer = BatchRegularizer(num_classes, **flags)
    model = nn.Sequential(nn.Conv2d(shape[1], 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    augmented, targets = regularizer(images, labels)
    views = 2 if flags.get('use_dual_cutout') else 1
    assert augmented.shape == (views * shape[0],) + shape[1:]
    assert targets.shape == (shape[0], num_classes)
    assert torch.allclose(targets.sum(dim=1), torch.ones(shape[0]))
    assert regularizer.mixes_labels == any(flags.get(name) for name in ('use_mixup', 'use_ricap', 'use_cutmix'))
    logits = regularizer.forward(model, augmented)
    assert logits.shape == (views * shape[0], num_classes)
    loss = regularizer.loss(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters())
    assert 0 <= regularizer.accuracy(logits, targets).item() <= 1

    # The same seed replays the same batch: what resuming from a saved RNG state relies on.
    torch.manual_seed(18)
    first = regularizer(images, labels)
    torch.manual_seed(18)
    second = regularizer(images, labels)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_batch_regularizer_splits_sub_batches_with_both_views_and_forwards_each_view_on_its_own():
    torch.manual_seed(23)
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    regularizer = BatchRegularizer(10, use_dual_cutout=True, cutout_size=4)
    views, targets = regularizer(images, labels)
    assert regularizer.views == 2 and views.shape == (16, 3, 8, 8)
    parts = regularizer.split(views, targets, 2)
    assert len(parts) == 2
    for index, (part_images, part_targets) in enumerate(parts):
        rows = slice(4 * index, 4 * index + 4)  # images 4i..4i+3 of the first view, then of the second
        assert torch.equal(part_images, torch.cat([views[:8][rows], views[8:][rows]]))
        assert torch.equal(part_targets, targets[rows])
    plain = BatchRegularizer(10)
    assert plain.views == 1
    for (part_images, part_targets), image_chunk, target_chunk in zip(
            plain.split(images, targets, 4), images.chunk(4), targets.chunk(4)):
        assert torch.equal(part_images, image_chunk) and torch.equal(part_targets, target_chunk)

    passes = []
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    model.register_forward_pre_hook(lambda module, inputs: passes.append(inputs[0].shape[0]))
    logits = regularizer.forward(model, views)
    assert passes == [8, 8]  # one pass per view: BatchNorm statistics per view
    assert torch.allclose(logits, torch.cat([model(views[:8]), model(views[8:])]))
    passes.clear()
    joint = BatchRegularizer(10, use_dual_cutout=True, dual_cutout_joint_forward=True)
    assert torch.allclose(joint.forward(model, views), model(views)) and passes == [16, 16]
    passes.clear()
    plain.forward(model, images)
    assert passes == [8]


def test_batch_regularizer_without_options_is_plain_cross_entropy():
    torch.manual_seed(19)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    augmented, targets = BatchRegularizer(10)(images, labels)
    assert torch.equal(augmented, images) and torch.equal(targets, one_hot(labels, 10))
    logits = torch.randn(8, 10)
    smoothing = BatchRegularizer(10, use_label_smoothing=True, label_smoothing_epsilon=0.2)
    assert torch.allclose(smoothing.loss(logits, targets), F.cross_entropy(logits, labels, label_smoothing=0.2))
    assert torch.allclose(BatchRegularizer(10).loss(logits, targets), F.cross_entropy(logits, labels))


def test_regularizer_kwargs_read_flags_and_defaults():
    args = argparse.Namespace(use_cutmix=True, cutmix_alpha=0.5, use_random_erasing=True,
                              random_erasing_area_ratio_range=[0.1, 0.2], arch='resnet')
    regularizer = BatchRegularizer(100, **regularizer_kwargs(args))
    assert regularizer.num_classes == 100
    assert regularizer.use_cutmix and regularizer.cutmix_alpha == 0.5 and regularizer.mixes_labels
    assert regularizer.random_erasing_area_ratio_range == (0.1, 0.2)
    assert regularizer.random_erasing_prob == 0.5 and not regularizer.use_mixup and regularizer.cutout_size == 16
    # the references' defaults: the paper code's Random Erasing fill, the paper code's Dual-Cutout
    assert regularizer.random_erasing_fill == 'mean'
    assert regularizer.dual_cutout_distance == 'logits' and not regularizer.dual_cutout_joint_forward
    chosen = BatchRegularizer(10, **regularizer_kwargs(argparse.Namespace(
        use_random_erasing=True, random_erasing_fill='uniform', use_dual_cutout=True,
        dual_cutout_distance='softmax', dual_cutout_joint_forward=True)))
    assert chosen.random_erasing_fill == 'uniform' and chosen.dual_cutout_distance == 'softmax'
    assert chosen.dual_cutout_joint_forward
    with pytest.raises(ValueError, match='--use_mixup'):
        BatchRegularizer(10, **regularizer_kwargs(argparse.Namespace(use_mixup=True, use_ricap=True)))


# ----------------------------------------------------------------------------- knowledge distillation

def test_distillation_loss_matches_the_closed_form():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 1.5, -0.5], [2.0, -1.0, 0.5]])
    temperature = 4.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = sum(math.exp(v / temperature) for v in s_row)
        zt = sum(math.exp(v / temperature) for v in t_row)
        for s, t in zip(s_row, t_row):
            p_t, p_s = math.exp(t / temperature) / zt, math.exp(s / temperature) / zs
            expected += p_t * math.log(p_t / p_s)
    expected = temperature ** 2 * expected / len(student)
    student.requires_grad_()
    loss = augmentations.distillation_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # its gradient: T (softmax(s / T) - softmax(t / T)) / B (Hinton et al., eq. 2 times T^2)
    loss.backward()
    closed_form = temperature * (F.softmax(student / temperature, 1) - F.softmax(teacher / temperature, 1)) / 2
    assert torch.allclose(student.grad, closed_form.detach(), atol=1e-6)
    assert augmentations.distillation_loss(teacher, teacher, temperature).item() == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------- augmentation policies

POLICIES = [('autoaugment', {}), ('autoaugment', dict(autoaugment_policy='svhn')), ('randaugment', {}),
            ('trivialaugment', {}), ('augmix', {})]


def uint8_batch(n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize('name, options', POLICIES)
def test_policy_changes_a_batch_and_keeps_its_type(name, options):
    torch.manual_seed(0)
    images = uint8_batch()
    out = augmentations.AugmentPolicy(name, group_size=4, **options)(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    changed = (out != images).flatten(1).any(1)
    assert changed.sum() >= 8  # at least two of the eight groups drew an operation that changes pixels
    assert augmentations.AugmentPolicy(name, **options)(images[:0]).shape == (0, 3, 32, 32)
    with pytest.raises(TypeError, match='uint8'):
        augmentations.AugmentPolicy(name, **options)(images.float())


@pytest.mark.parametrize('name', ['autoaugment', 'randaugment', 'trivialaugment'])
def test_policy_group_shares_one_draw(name):
    torch.manual_seed(1)
    images = uint8_batch(1).expand(16, -1, -1, -1).contiguous()  # sixteen copies of one image
    out = augmentations.AugmentPolicy(name, group_size=4)(images)
    groups = out.unflatten(0, (4, 4))
    assert all((group == group[0]).all() for group in groups)  # same draw within a group
    per_image = augmentations.AugmentPolicy(name, group_size=1)(images)
    assert len({bytes(image.numpy()) for image in per_image}) > 2  # a draw per image


def test_augmix_mixes_each_image_with_its_own_weights_within_a_group():
    torch.manual_seed(0)
    images = uint8_batch(1).expand(8, -1, -1, -1).contiguous()
    out = augmentations.AugmentPolicy('augmix', group_size=8)(images)
    assert len({bytes(image.numpy()) for image in out}) > 1


def test_policy_options_select_torchvisions_transforms():
    auto = augmentations.AugmentPolicy('autoaugment', autoaugment_policy='imagenet').sample_transform()
    assert isinstance(auto, transforms.AutoAugment) and auto.policy == transforms.AutoAugmentPolicy.IMAGENET
    rand = augmentations.AugmentPolicy('randaugment', randaugment_ops=3, randaugment_magnitude=5).sample_transform()
    assert (rand.num_ops, rand.magnitude) == (3, 5)
    assert isinstance(augmentations.AugmentPolicy('trivialaugment').sample_transform(), transforms.TrivialAugmentWide)
    assert augmentations.AugmentPolicy('augmix', augmix_severity=7).sample_transform().severity == 7
    sample = dataloader.build_sample_transform(CIFAR10, True, random_crop_padding=4,
                                               policy=augmentations.AugmentPolicy('trivialaugment'))
    assert isinstance(sample.transforms[0], transforms.TrivialAugmentWide)


def test_device_loader_applies_the_policy(monkeypatch):
    calls = []
    policy = augmentations.AugmentPolicy('trivialaugment', group_size=5)
    monkeypatch.setattr(augmentations.AugmentPolicy, '__call__', lambda self, images: calls.append(len(images))
                        or images)
    images, labels = uint8_batch(20).numpy(), np.arange(20) % 10
    loader = dataloader.DeviceLoader(torch.from_numpy(images), torch.from_numpy(labels), CIFAR10, 10,
                                     torch.device('cpu'), True, policy=policy)
    # the whole epoch's images at its start, in chunks of AUGMENT_CHUNK (here one)
    assert sum(len(batch[0]) for batch in loader) == 20 and calls == [20]
    monkeypatch.setattr(dataloader, 'AUGMENT_CHUNK', 8)
    calls.clear()
    assert sum(len(batch[0]) for batch in loader) == 20 and calls == [8, 8, 4]
