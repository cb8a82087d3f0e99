"""Data augmentation and regularization on whole batches of tensors.

Every function here takes a batch ``images`` of shape (B, C, H, W) on any device and
draws its randomness per image from torch's global generator, so the same code runs on
the GPU next to the model and a resumed run replays it once the RNG state is restored.
No function loops over images in Python; the augmentation policies (:class:`AugmentPolicy`) call
torchvision once per group of images.

Papers:
  Cutout: "Improved Regularization of Convolutional Neural Networks with Cutout", arXiv 1708.04552
  Random Erasing: "Random Erasing Data Augmentation", arXiv 1708.04896
  Mixup: "mixup: Beyond Empirical Risk Minimization", arXiv 1710.09412
  Dual-Cutout: "Generalization in Machine Learning via Analytical Learning Theory", arXiv 1802.07426
  RICAP: "Data Augmentation using Random Image Cropping and Patching for Deep CNNs", arXiv 1811.09030
  CutMix: "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features",
    arXiv 1905.04899
  Label smoothing: "Rethinking the Inception Architecture for Computer Vision", arXiv 1512.00567
  AutoAugment: "AutoAugment: Learning Augmentation Policies from Data", arXiv 1805.09501
  RandAugment: "RandAugment: Practical automated data augmentation with a reduced search space",
    arXiv 1909.13719
  TrivialAugment: "TrivialAugment: Tuning-free Yet State-of-the-Art Data Augmentation", arXiv 2103.10158
  AugMix: "AugMix: A Simple Data Processing Method to Improve Robustness and Uncertainty", arXiv 1912.02781
  Knowledge distillation: "Distilling the Knowledge in a Neural Network", arXiv 1503.02531
"""
import inspect

import torch
import torch.nn.functional as F

from flags import UsageError


def _reflect(index, size):
    """Map indices in [-size + 1, 2 * size - 2] into [0, size) by mirroring at the borders
    (numpy's and F.pad's 'reflect': the edge pixel is not repeated)."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


def random_crop(images, padding, horizontal_flip=False, padding_mode='zeros', flip=None):
    """Pad by ``padding`` and crop back to the original size at a random offset per image;
    with ``horizontal_flip``, also mirror each image with probability 1/2 (or where the boolean
    (B,) tensor ``flip`` says, e.g. :func:`alternating_flip`'s).

    The standard CIFAR augmentation (He et al., arXiv 1512.03385, section 4.2) with zero padding;
    ``padding_mode='reflect'`` is airbench's random translation (arXiv 2404.00498). Two gathers
    with broadcast row/column indices do the crop, the flip is folded into the column index and
    reflection into both, so the whole augmentation reads each pixel twice and allocates no
    per-pixel index tensor.
    """
    if padding_mode not in ('zeros', 'reflect'):
        raise ValueError(f'padding_mode {padding_mode!r}: choose zeros or reflect')
    batch, channels, height, width = images.shape
    device = images.device
    if flip is None and horizontal_flip:
        flip = torch.rand(batch, device=device) < 0.5
    if padding <= 0:
        return images if flip is None else torch.where(flip[:, None, None, None], images.flip(3), images)
    offset_y = torch.randint(0, 2 * padding + 1, (batch, 1), device=device)
    offset_x = torch.randint(0, 2 * padding + 1, (batch, 1), device=device)
    columns = torch.arange(width, device=device).expand(batch, width)
    if flip is not None:
        columns = torch.where(flip[:, None], width - 1 - columns, columns)
    rows = offset_y + torch.arange(height, device=device)
    columns = offset_x + columns
    if padding_mode == 'reflect':
        source, rows, columns = images, _reflect(rows - padding, height), _reflect(columns - padding, width)
    else:
        source = F.pad(images, (padding, padding, padding, padding))
    cropped_rows = source.gather(2, rows[:, None, :, None].expand(batch, channels, height, source.shape[3]))
    return cropped_rows.gather(3, columns[:, None, None, :].expand(batch, channels, height, width))


def alternating_flip(phase, epoch):
    """Which images to mirror in ``epoch`` (1-based) under alternating flip (Jordan, arXiv
    2404.00498, section 3.6): each image is mirrored on every other epoch, starting from a random
    ``phase`` (a boolean (N,) tensor drawn once per run), instead of by a fresh coin each epoch."""
    return phase ^ bool((epoch - 1) % 2)


def random_horizontal_flip(images, prob=0.5):
    """Mirror each image left-right with probability ``prob``."""
    flip = torch.rand(images.shape[0], device=images.device) < prob
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class Normalize:
    """uint8 or [0, 1] float images -> float32 standardized per channel.

    The per-channel scale and shift live on the images' device, built once per device: copying
    them from the host every batch would make each step wait for the copy.
    """

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)
        self._constants = {}

    def _scale_shift(self, device, pixel_range):
        key = (device, pixel_range)
        if key not in self._constants:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            self._constants[key] = ((1 / (pixel_range * std)).to(device), (-mean / std).to(device))
        return self._constants[key]

    def __call__(self, images):
        scale, shift = self._scale_shift(images.device, 255 if images.dtype == torch.uint8 else 1)
        # one multiply and one add, in place on a fresh float32 copy (never on the caller's tensor)
        return images.to(torch.float32, copy=True).mul_(scale).add_(shift)


def normalize(images, mean, std):
    """uint8 or [0, 1] float images -> float32 standardized per channel (see :class:`Normalize`)."""
    return Normalize(mean, std)(images)


def _sample_beta(concentration, device, shape=()):
    """Samples of Beta(concentration, concentration) from torch's generator on ``device``.

    ``concentration`` is a number, checked here on the host. The distribution is built without
    argument validation, which would read ``concentration > 0`` back from the device on every
    batch; ``torch.full`` fills the parameter on the device where ``torch.tensor`` would copy it
    from the host. The draws are those of the validated distribution, so no step waits for the GPU.
    """
    concentration = float(concentration)
    if not concentration > 0:
        raise ValueError(f'Beta concentration must be positive, got {concentration}')
    concentration = torch.full((), concentration, device=device)
    return torch.distributions.Beta(concentration, concentration, validate_args=False).sample(shape)


def _box_rows_cols(top, left, box_height, box_width, height, width):
    """Boolean (..., height) rows and (..., width) columns inside [top, top+box_height) x [left, left+box_width).

    ``top`` and ``left`` are integer tensors of a common shape (one box each); boxes may reach
    outside the image, in which case only the part inside is marked.
    """
    rows = torch.arange(height, device=top.device)
    cols = torch.arange(width, device=top.device)
    row_inside = (rows >= top[..., None]) & (rows < (top + box_height)[..., None])
    col_inside = (cols >= left[..., None]) & (cols < (left + box_width)[..., None])
    return row_inside, col_inside


def _box_mask(top, left, box_height, box_width, height, width):
    """Boolean (..., height, width) mask of the boxes of :func:`_box_rows_cols`."""
    row_inside, col_inside = _box_rows_cols(top, left, box_height, box_width, height, width)
    return row_inside[..., :, None] & col_inside[..., None, :]


def cutout(images, size=16, prob=1.0, inside=False, fill=0.0):
    """Cutout (DeVries & Taylor, arXiv 1708.04552): fill one size x size square per image.

    Each image, with probability ``prob``, gets its own square whose centre is uniform over the
    image (the square is clipped at the borders), or, with ``inside=True``, placed so that the
    whole square lies inside the image. ``fill=0`` on normalized images is the dataset mean.
    Integer centres follow hysts: an even ``size`` has one more centre position, so the clipped
    square is equally likely to hang over the left and the right border.
    """
    batch, _, height, width = images.shape
    device = images.device
    if inside:
        top = torch.randint(0, max(height - size, 0) + 1, (batch,), device=device)
        left = torch.randint(0, max(width - size, 0) + 1, (batch,), device=device)
    else:
        half = size // 2
        top = torch.randint(-half, height - size + half + 1, (batch,), device=device)
        left = torch.randint(-half, width - size + half + 1, (batch,), device=device)
    apply = (torch.rand(batch, device=device) < prob).to(images.dtype)
    in_rows, in_cols = _box_rows_cols(top, left, size, size, height, width)
    # the outer product of float row/column indicators and a multiply cost about half of a
    # boolean mask with masked_fill on CPU
    erased = ((in_rows.to(images.dtype) * apply[:, None])[:, :, None] * in_cols.to(images.dtype)[:, None, :])[:, None]
    if fill == 0:
        return images * (1 - erased)
    return images * (1 - erased) + fill * erased


RANDOM_ERASING_FILLS = ('mean', 'random', 'uniform')


def _random_erasing_boxes(batch, height, width, prob, area_ratio_range, min_aspect_ratio, max_attempt, device):
    """The rectangles of :func:`random_erasing`: (erase, top, left, box_height, box_width), each (B,).

    All ``max_attempt`` draws of every image are made at once and the first that fits is kept.
    """
    min_area, max_area = area_ratio_range
    area = (min_area + (max_area - min_area) * torch.rand(batch, max_attempt, device=device)) * (height * width)
    max_aspect = 1.0 / min_aspect_ratio
    aspect = min_aspect_ratio + (max_aspect - min_aspect_ratio) * torch.rand(batch, max_attempt, device=device)
    # rounded as the paper's code does (hysts truncates with int())
    box_height = torch.sqrt(area * aspect).round().long()
    box_width = torch.sqrt(area / aspect).round().long()
    fits = (box_height >= 1) & (box_width >= 1) & (box_height < height) & (box_width < width)
    attempt = torch.arange(max_attempt, device=device)
    first_fit = torch.where(fits, attempt, max_attempt).amin(dim=1)
    erase = (torch.rand(batch, device=device) < prob) & (first_fit < max_attempt)
    chosen = first_fit.clamp(max=max_attempt - 1)[:, None]
    box_height = box_height.gather(1, chosen).squeeze(1)
    box_width = box_width.gather(1, chosen).squeeze(1)
    top = (torch.rand(batch, device=device) * (height - box_height + 1)).long()
    left = (torch.rand(batch, device=device) * (width - box_width + 1)).long()
    return erase, top, left, box_height, box_width


def random_erasing(images, prob=0.5, area_ratio_range=(0.02, 0.4), min_aspect_ratio=0.3,
                   max_attempt=20, fill='mean'):
    """Random Erasing (Zhong et al., arXiv 1708.04896): fill one random rectangle per image.

    With probability ``prob`` per image, up to ``max_attempt`` rectangles are drawn: area uniform
    in ``area_ratio_range`` times the image area, aspect ratio h/w uniform in [r1, 1/r1] with
    r1 = ``min_aspect_ratio``, sides sqrt(area * aspect) and sqrt(area / aspect) (the paper's
    section 3.1), rounded to pixels as its code (zhunzhong07/Random-Erasing, transforms.py) does;
    hysts draws the same distributions but truncates the sides. The first rectangle with
    1 <= side < image side is placed uniformly inside the image (every position, as in the
    paper's code) and filled; an image where no attempt fits is left unchanged. ``images`` are
    normalized, and ``fill`` is one of

    - ``'mean'``: the dataset's per-channel mean pixel, 0 after normalization. The paper's code
      (the authors' CIFAR runs) fills the per-channel mean (0.4914, 0.4822, 0.4465); it writes
      those numbers into the already normalized tensor, which we take for the mean pixel they
      stand for.
    - ``'random'``: an independent standard-normal value per pixel and channel, i.e. random pixels
      in normalized space: the paper's Algorithm 1 ("a random value" per pixel) as torchvision's
      ``RandomErasing(value='random')`` and timm read it on normalized images.
    - ``'uniform'``: the original tool's (hysts, augmentations/random_erasing.py): one value
      drawn uniformly from [0, 1) per rectangle, shared by its pixels and channels, written into
      the normalized image. The original tool's Random Erasing results were trained with it.
    """
    if fill not in RANDOM_ERASING_FILLS:
        raise UsageError(f'--random_erasing_fill {fill!r}: choose {", ".join(RANDOM_ERASING_FILLS)}')
    batch, _, height, width = images.shape
    device = images.device
    erase, top, left, box_height, box_width = _random_erasing_boxes(
        batch, height, width, prob, area_ratio_range, min_aspect_ratio, max_attempt, device)
    mask = (_box_mask(top, left, box_height, box_width, height, width) & erase[:, None, None])[:, None]
    if fill == 'mean':
        return images.masked_fill(mask, 0.0)
    if fill == 'uniform':
        return torch.where(mask, torch.rand(batch, 1, 1, 1, device=device, dtype=images.dtype), images)
    return torch.where(mask, torch.randn_like(images), images)


def one_hot(labels, num_classes):
    """int64 labels (B,) -> float32 one-hot targets (B, num_classes).

    A scatter rather than ``F.one_hot``, which on the CPU (and devices other than CUDA) checks the
    labels' range by reading their min and max on the host; an out-of-range label still fails, in
    the scatter's own bounds check.
    """
    targets = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0)


def mixup(images, targets, alpha=1.0):
    """Mixup (Zhang et al., arXiv 1710.09412) with one lambda ~ Beta(alpha, alpha) per batch.

    Returns ``lam * x + (1 - lam) * x[perm]`` and the same mixture of the soft targets (B, K)
    for a random permutation ``perm`` of the batch.
    """
    device = images.device
    permutation = torch.randperm(images.shape[0], device=device)
    lam = _sample_beta(alpha, device)
    lam_images = lam.to(images.dtype)
    mixed_images = lam_images * images + (1 - lam_images) * images[permutation]
    lam_targets = lam.to(targets.dtype)
    mixed_targets = lam_targets * targets + (1 - lam_targets) * targets[permutation]
    return mixed_images, mixed_targets


CUTMIX_BOXES = ('integer', 'continuous')


def _cut_interval(cut_ratio, centre, size, box):
    """Where CutMix's box lies along one axis of ``size`` pixels: (start, end), integer tensors.

    ``integer`` (the authors' ``rand_bbox``, clovaai/CutMix-PyTorch train.py): an integer ``centre``,
    the side ``int(size * cut_ratio)`` halved with ``//`` on each side of it, clipped to the image.
    ``continuous``: a real ``centre``, the side ``size * cut_ratio``, the clipped ends rounded.
    """
    if box == 'integer':
        half = (size * cut_ratio).long() // 2
        return (centre - half).clamp(0, size), (centre + half).clamp(0, size)
    half = cut_ratio * size / 2
    return torch.round((centre - half).clamp(0, size)).long(), torch.round((centre + half).clamp(0, size)).long()


def cutmix(images, targets, alpha=1.0, prob=1.0, box='integer'):
    """CutMix (Yun et al., arXiv 1905.04899): paste one box from a shuffled batch.

    The box has area ratio about 1 - lambda with lambda ~ Beta(alpha, alpha), a centre uniform over
    the image, and is clipped at the borders (one box per batch, as in the paper). ``box``:
    ``integer``, the authors' code (an integer centre, each half-side rounded down), or
    ``continuous``, a real centre and side, the ends rounded (the box this tool drew before it
    followed the authors). With alpha 1 on 32x32 images the authors' box covers 29.9% of the image
    on average, the continuous one 32.1% (tests/test_augmentations.py computes both).
    The targets use the corrected lambda, the fraction of pixels actually left unpasted, as the
    authors' code does. ``prob``: the probability that a batch is mixed at all (the authors' CIFAR
    command: 0.5; the paper's Algorithm 1: 1); an unmixed batch comes back unchanged. All of it is
    drawn on the images' device, with no value read back to the host.
    """
    if box not in CUTMIX_BOXES:
        raise UsageError(f'--cutmix_box {box!r}: choose {" or ".join(CUTMIX_BOXES)}')
    _, _, height, width = images.shape
    device = images.device
    permutation = torch.randperm(images.shape[0], device=device)
    cut_ratio = torch.sqrt(1 - _sample_beta(alpha, device))
    if box == 'integer':
        centre_y = torch.randint(0, height, (), device=device)
        centre_x = torch.randint(0, width, (), device=device)
    else:
        centre_y = torch.rand((), device=device) * height
        centre_x = torch.rand((), device=device) * width
    top, bottom = _cut_interval(cut_ratio, centre_y, height, box)
    left, right = _cut_interval(cut_ratio, centre_x, width, box)
    if prob < 1:  # a host-side number: prob 1 draws no coin, and so keeps the random stream of before
        bottom = torch.where(torch.rand((), device=device) < prob, bottom, top)  # unmixed: an empty box
    mask = _box_mask(top, left, bottom - top, right - left, height, width)
    mixed_images = torch.where(mask, images[permutation], images)
    unpasted = 1 - ((bottom - top) * (right - left)).to(targets.dtype) / (height * width)
    mixed_targets = unpasted * targets + (1 - unpasted) * targets[permutation]
    return mixed_images, mixed_targets


def ricap(images, targets, beta=0.3):
    """RICAP (Takahashi et al., arXiv 1811.09030): patch crops of four images into quadrants.

    The boundary (w, h) = round((W, H) * Beta(beta, beta)) is shared by the batch; quadrant k
    (top-left, top-right, bottom-left, bottom-right) of image i is a crop of image perm_k[i]
    of the quadrant's size, at a random position drawn per image and quadrant (the paper and
    hysts draw one position per batch). Targets are the area-weighted sum of the four labels.
    """
    batch, channels, height, width = images.shape
    device = images.device
    boundary = _sample_beta(beta, device, (2,))
    boundary_x = torch.round(boundary[0] * width).long()
    boundary_y = torch.round(boundary[1] * height).long()
    # quadrant k = 2 * is_bottom + is_right, built on the device (a host list would be copied per batch)
    quadrants = torch.arange(4, device=device)
    is_right, is_bottom = quadrants % 2, quadrants // 2
    patch_width = torch.where(is_right.bool(), width - boundary_x, boundary_x)
    patch_height = torch.where(is_bottom.bool(), height - boundary_y, boundary_y)
    origin_x, origin_y = is_right * boundary_x, is_bottom * boundary_y

    # Four independent permutations in one call: argsort of uniform noise.
    permutations = torch.rand(4, batch, device=device).argsort(dim=1)
    crop_left = (torch.rand(4, batch, device=device) * (width - patch_width + 1)[:, None]).long()
    crop_top = (torch.rand(4, batch, device=device) * (height - patch_height + 1)[:, None]).long()

    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    quadrant = (rows >= boundary_y).long() * 2 + (cols >= boundary_x).long()
    # (4, B) tables looked up per pixel -> (H, W, B), then moved to (B, H, W).
    source_image = permutations[quadrant].permute(2, 0, 1)
    source_row = rows - origin_y[quadrant] + crop_top[quadrant].permute(2, 0, 1)
    source_col = cols - origin_x[quadrant] + crop_left[quadrant].permute(2, 0, 1)
    # One flat gather over (image, row, col) shared by the channels: much faster than indexing
    # with four broadcast index tensors.
    source_pixel = ((source_image * height + source_row) * width + source_col).flatten()
    by_channel = images.transpose(0, 1).reshape(channels, batch * height * width)
    patched = by_channel.index_select(1, source_pixel).view(channels, batch, height, width)
    patched = patched.transpose(0, 1).contiguous()

    area_fraction = (patch_width * patch_height).to(targets.dtype) / (height * width)
    mixed_targets = torch.einsum('k,kbn->bn', area_fraction, targets[permutations])
    return patched, mixed_targets


def dual_cutout(images, size=16, prob=1.0, inside=False):
    """Dual-Cutout (Kawaguchi et al., arXiv 1802.07426): two independent Cutout views.

    Returns (2B, C, H, W): the first B images are one view, the last B the other. The paper's
    code and hysts send each view through the network in a forward pass of its own
    (:meth:`BatchRegularizer.forward`).
    """
    return torch.cat([cutout(images, size, prob, inside), cutout(images, size, prob, inside)])


def smooth_targets(targets, epsilon):
    """Label smoothing (Szegedy et al., arXiv 1512.00567): (1 - eps) * t + eps / K."""
    return (1 - epsilon) * targets + epsilon / targets.shape[1]


def soft_target_cross_entropy(logits, targets, label_smoothing=0.0):
    """Batch mean of -(t' * log_softmax(logits)).sum(1), t' the label-smoothed soft targets.

    Smoothing the (possibly mixed) targets here lets label smoothing compose with every mixing
    method; for one-hot targets this equals ``F.cross_entropy(..., label_smoothing=eps)``.
    """
    if label_smoothing > 0:
        targets = smooth_targets(targets, label_smoothing)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _split_views(logits, targets):
    batch = targets.shape[0]
    if logits.shape[0] != 2 * batch:
        raise ValueError(f'dual-cutout logits must hold two views, 2 x {batch} rows; got {logits.shape[0]}')
    return logits[:batch], logits[batch:]


def dual_cutout_loss(logits, targets, alpha=0.1, label_smoothing=0.0, distance='logits'):
    """Dual-Cutout loss: mean cross-entropy of the two views + alpha * consistency.

    ``logits`` is (2B, K), the two views stacked as :func:`dual_cutout` returns them, ``targets``
    (B, K). With ``distance='logits'`` (the default) the consistency term is ``F.mse_loss`` of the
    two views' logits, averaged over batch and classes: the paper authors' code
    (Learning-and-Intelligent-Systems/Analytical-Learning-Theory, cifar10/resnext/main.py,
    ``train``) and the original tool's (hysts, augmentations/cutout.py, ``DualCutoutCriterion``),
    with which the published Dual-Cutout numbers (alpha 0.1) were trained. ``distance='softmax'``
    is the squared L2 distance between the two views' softmax outputs, summed over classes and
    averaged over the batch (this toolkit's earlier default).
    """
    first_view, second_view = _split_views(logits, targets)
    cross_entropy = 0.5 * (soft_target_cross_entropy(first_view, targets, label_smoothing)
                           + soft_target_cross_entropy(second_view, targets, label_smoothing))
    if distance == 'logits':
        consistency = F.mse_loss(first_view, second_view)
    elif distance == 'softmax':
        consistency = (first_view.softmax(1) - second_view.softmax(1)).pow(2).sum(1).mean()
    else:
        raise UsageError(f'--dual_cutout_distance {distance!r}: choose softmax or logits')
    return cross_entropy + alpha * consistency


def weighted_accuracy(logits, targets):
    """Batch mean of targets[i, argmax logits_i], a 0-dim tensor.

    Plain accuracy for one-hot targets, the lambda-weighted accuracy for mixed targets. Logits
    with twice the rows of the targets (Dual-Cutout) are scored on the average of the two views'
    logits, as the paper authors' code and hysts (train.py) score them.
    """
    if logits.shape[0] != targets.shape[0]:
        first_view, second_view = _split_views(logits, targets)
        logits = (first_view + second_view) / 2
    predicted = logits.argmax(dim=1, keepdim=True)
    return targets.gather(1, predicted).squeeze(1).mean()


# ----------------------------------------------------------------------------- augmentation policies

# The policy switches, mutually exclusive, and the policy each selects.
POLICY_SWITCHES = {'use_autoaugment': 'autoaugment', 'use_randaugment': 'randaugment',
                   'use_trivialaugment': 'trivialaugment', 'use_augmix': 'augmix'}
AUTOAUGMENT_POLICIES = ('cifar10', 'svhn', 'imagenet')


def _exclusive_policies_error(flags):
    return UsageError(f'{" and ".join("--" + flag for flag in flags)} cannot be combined: AutoAugment, '
                      'RandAugment, TrivialAugment and AugMix are mutually exclusive')


def resolve_policy_switches(args, given):
    """Leave at most one policy switch on in ``args``; ``given`` names the settings the user gave.

    A policy the user gives (command line or --config) replaces one the architecture's training
    defaults switch on (the transformers' RandAugment); two that the user gives are an error.
    """
    chosen = [flag for flag in POLICY_SWITCHES if getattr(args, flag, False)]
    if len(chosen) > 1:
        by_user = [flag for flag in chosen if flag in given]
        if len(by_user) != 1:
            raise _exclusive_policies_error(chosen)
        for flag in chosen:
            setattr(args, flag, flag in by_user)


class AugmentPolicy:
    """One of torchvision's learned or random augmentation policies, on uint8 images.

    AutoAugment (Cubuk et al., arXiv 1805.09501; its CIFAR-10, SVHN or ImageNet policy), RandAugment
    (arXiv 1909.13719: ``randaugment_ops`` operations of magnitude ``randaugment_magnitude`` of 30),
    TrivialAugment (arXiv 2103.10158: torchvision's TrivialAugmentWide, one operation of random
    magnitude) and AugMix (arXiv 1912.02781, severity ``augmix_severity`` of 10).

    :meth:`sample_transform` is the per-image transform of the workers pipeline. Calling the policy
    on a batch (B, C, H, W) applies torchvision's v2 transform, which draws ONE operation (or
    sub-policy, or chain of operations) per call for all the images it gets, to consecutive groups
    of ``group_size`` images: each group gets a draw of its own, so a batch of B images takes B /
    ``group_size`` calls instead of B (``group_size`` 1: a draw per image, as the workers pipeline).
    The device loader shuffles every epoch, so the images sharing a draw change from epoch to
    epoch, and each image's operations have the policy's distribution; only images of one group
    are correlated. AugMix's mixing weights are drawn per image by torchvision within a group.
    The draws come from torch's global generator on the host; on a GPU some operations read device
    values (Equalize's histogram step), a synchronization per group and operation.
    """

    def __init__(self, name, autoaugment_policy='cifar10', randaugment_ops=2, randaugment_magnitude=9,
                 augmix_severity=3, group_size=8):
        if name not in POLICY_SWITCHES.values():
            raise UsageError(f'augmentation policy {name!r}: choose {", ".join(POLICY_SWITCHES.values())}')
        self.name, self.autoaugment_policy = name, autoaugment_policy
        self.randaugment_ops, self.randaugment_magnitude = randaugment_ops, randaugment_magnitude
        self.augmix_severity, self.group_size = augmix_severity, group_size
        self._batch_transform = None

    def _transform(self, module):
        """The policy as a transform of ``module``: torchvision.transforms (per image) or its v2."""
        if self.name == 'autoaugment':
            return module.AutoAugment(getattr(module.AutoAugmentPolicy, self.autoaugment_policy.upper()))
        if self.name == 'randaugment':
            return module.RandAugment(self.randaugment_ops, self.randaugment_magnitude)
        if self.name == 'trivialaugment':
            return module.TrivialAugmentWide()
        return module.AugMix(self.augmix_severity)

    def sample_transform(self):
        """The per-image transform (torchvision.transforms) of the workers pipeline."""
        from torchvision import transforms  # imported where used: importing torchvision takes more than a second
        return self._transform(transforms)

    def __call__(self, images_uint8):
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f'{self.name} expects uint8 images, got {images_uint8.dtype}')
        if len(images_uint8) == 0:
            return images_uint8.clone()
        if self._batch_transform is None:
            from torchvision.transforms import v2
            self._batch_transform = self._transform(v2)
        return torch.cat([self._batch_transform(group) for group in images_uint8.split(self.group_size)])

    def __repr__(self):
        options = {'autoaugment': f'policy={self.autoaugment_policy}',
                   'randaugment': f'ops={self.randaugment_ops}, magnitude={self.randaugment_magnitude}',
                   'trivialaugment': '', 'augmix': f'severity={self.augmix_severity}'}[self.name]
        return f'{self.name}({options}{", " if options else ""}group_size={self.group_size})'


def policy_kwargs(args):
    """:func:`build_policy`'s arguments from the command line's settings: the policy its switch chose (at
    most one, see :func:`resolve_policy_switches`) and the policies' options."""
    chosen = [flag for flag in POLICY_SWITCHES if getattr(args, flag, False)]
    if len(chosen) > 1:
        raise _exclusive_policies_error(chosen)
    return dict(name=POLICY_SWITCHES[chosen[0]] if chosen else None, autoaugment_policy=args.autoaugment_policy,
                randaugment_ops=args.randaugment_ops, randaugment_magnitude=args.randaugment_magnitude,
                augmix_severity=args.augmix_severity, group_size=args.policy_group_size)


def build_policy(name=None, **options):
    """The :class:`AugmentPolicy` ``name`` with ``options``, or None when no policy is chosen."""
    return None if name is None else AugmentPolicy(name, **options)


def as_policy(policy):
    """An :class:`AugmentPolicy` from what the loaders accept: None/False (none), True (AutoAugment's
    CIFAR-10 policy, the meaning of ``use_autoaugment=True`` before the other policies), or a policy."""
    if policy is None or policy is False:
        return None
    if policy is True:
        return AugmentPolicy('autoaugment')
    return policy


def autoaugment(images_uint8, policy='cifar10'):
    """AutoAugment (Cubuk et al., arXiv 1805.09501) on a uint8 batch, a sub-policy drawn per image."""
    return AugmentPolicy('autoaugment', autoaugment_policy=policy, group_size=1)(images_uint8)


# ----------------------------------------------------------------------------- knowledge distillation

def distillation_loss(student_logits, teacher_logits, temperature):
    """Knowledge distillation (Hinton et al., arXiv 1503.02531): T^2 KL(softmax(t / T) || softmax(s / T)).

    The KL divergence of the student's softened distribution from the teacher's, summed over
    classes and averaged over the batch; the factor T^2 keeps its gradients on the scale of the
    hard-target loss's as T changes (section 2).
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction='batchmean', log_target=True) * temperature ** 2


def regularizer_kwargs(args):
    """:class:`BatchRegularizer`'s arguments (but the class count) from the command line's settings; a
    setting that ``args`` lacks or holds as None takes the regularizer's default."""
    names = [name for name in inspect.signature(BatchRegularizer).parameters if name != 'num_classes']
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


class BatchRegularizer:
    """The training-time regularizers chosen by the command-line flags, applied to whole batches.

    ``__call__`` maps normalized images and int64 labels to (images, soft targets): Cutout and
    Random Erasing on each image first, then the Dual-Cutout views or one batch-mixing method,
    applied to the whole batch (one lambda and one permutation per batch, as the original tool's
    train.py mixes before it splits a batch for ghost batch norm). ``split`` cuts the result into
    sub-batches, ``forward`` runs the model over it, and ``loss`` and ``accuracy`` take the logits
    and the soft targets: a training step needs no branch per method.
    """

    def __init__(self, num_classes, use_cutout=False, cutout_size=16, cutout_prob=1.0,
                 cutout_inside=False, use_random_erasing=False, random_erasing_prob=0.5,
                 random_erasing_area_ratio_range=(0.02, 0.4), random_erasing_min_aspect_ratio=0.3,
                 random_erasing_max_attempt=20, random_erasing_fill='mean', use_mixup=False, mixup_alpha=1.0,
                 use_ricap=False, ricap_beta=0.3, use_cutmix=False, cutmix_alpha=1.0, cutmix_prob=1.0,
                 cutmix_box='integer', use_dual_cutout=False,
                 dual_cutout_alpha=0.1, dual_cutout_distance='logits', dual_cutout_joint_forward=False,
                 use_label_smoothing=False, label_smoothing_epsilon=0.1):
        self.num_classes = num_classes
        self.use_cutout, self.cutout_size = use_cutout, cutout_size
        self.cutout_prob, self.cutout_inside = cutout_prob, cutout_inside
        self.use_random_erasing, self.random_erasing_prob = use_random_erasing, random_erasing_prob
        self.random_erasing_area_ratio_range = tuple(random_erasing_area_ratio_range)
        self.random_erasing_min_aspect_ratio = random_erasing_min_aspect_ratio
        self.random_erasing_max_attempt = random_erasing_max_attempt
        self.random_erasing_fill = random_erasing_fill
        self.use_mixup, self.mixup_alpha = use_mixup, mixup_alpha
        self.use_ricap, self.ricap_beta = use_ricap, ricap_beta
        self.use_cutmix, self.cutmix_alpha = use_cutmix, cutmix_alpha
        self.cutmix_prob, self.cutmix_box = cutmix_prob, cutmix_box
        self.use_dual_cutout, self.dual_cutout_alpha = use_dual_cutout, dual_cutout_alpha
        self.dual_cutout_distance = dual_cutout_distance
        self.dual_cutout_joint_forward = dual_cutout_joint_forward
        self.use_label_smoothing, self.label_smoothing_epsilon = use_label_smoothing, label_smoothing_epsilon
        self._validate()

    def _validate(self):
        """The relations of the regularizers' settings (each setting's range is its flag's domain)."""
        mixing = [flag for flag, used in [('--use_mixup', self.use_mixup), ('--use_ricap', self.use_ricap),
                                          ('--use_cutmix', self.use_cutmix),
                                          ('--use_dual_cutout', self.use_dual_cutout)] if used]
        if len(mixing) > 1:
            raise UsageError(f'{" and ".join(mixing)} cannot be combined: '
                             'mixup, ricap, cutmix and dual_cutout are mutually exclusive')
        if self.use_dual_cutout and self.use_cutout:
            raise UsageError('--use_dual_cutout already applies Cutout to both views; drop --use_cutout '
                             '(--cutout_size, --cutout_prob and --cutout_inside still apply)')

    @property
    def mixes_labels(self):
        """True when targets are mixtures, so the train accuracy is lambda-weighted."""
        return self.use_mixup or self.use_ricap or self.use_cutmix

    @property
    def label_smoothing(self):
        """The smoothing epsilon the loss applies (0 when label smoothing is off)."""
        return self.label_smoothing_epsilon if self.use_label_smoothing else 0.0

    @property
    def views(self):
        """How many views of each image ``__call__`` stacks: 2 with Dual-Cutout, else 1."""
        return 2 if self.use_dual_cutout else 1

    def split(self, images, targets, parts):
        """Cut the output of ``__call__`` into ``parts`` sub-batches (ghost batches, ``--subdivision``).

        Sub-batch i holds the i-th chunk of the targets and, with Dual-Cutout, both views of
        those images, stacked as ``__call__`` stacks them (hysts' train.py chunks each view alike).
        """
        image_chunks = images.unflatten(0, (self.views, -1)).chunk(parts, dim=1)
        return [(chunk.flatten(0, 1), target_chunk)
                for chunk, target_chunk in zip(image_chunks, targets.chunk(parts))]

    def forward(self, model, images):
        """The model's logits for images from ``__call__`` (or ``split``), rows in the same order.

        Dual-Cutout's two views go through the model in a forward pass each, so BatchNorm
        normalizes every view with its own statistics, as in the paper authors' code and hysts;
        ``dual_cutout_joint_forward`` forwards the 2B stacked images in one pass instead.
        """
        if self.views == 1 or self.dual_cutout_joint_forward:
            return model(images)
        return torch.cat([model(view) for view in images.chunk(self.views)])

    def __call__(self, images, labels):
        """Normalized float images (B, C, H, W) and int64 labels (B,) -> (images, soft targets (B, K)).

        With Dual-Cutout the images come back as (2B, C, H, W), the two views stacked.
        """
        if self.use_cutout:
            images = cutout(images, self.cutout_size, self.cutout_prob, self.cutout_inside)
        if self.use_random_erasing:
            images = random_erasing(images, self.random_erasing_prob, self.random_erasing_area_ratio_range,
                                    self.random_erasing_min_aspect_ratio, self.random_erasing_max_attempt,
                                    self.random_erasing_fill)
        targets = one_hot(labels, self.num_classes)
        if self.use_dual_cutout:
            images = dual_cutout(images, self.cutout_size, self.cutout_prob, self.cutout_inside)
        elif self.use_mixup:
            images, targets = mixup(images, targets, self.mixup_alpha)
        elif self.use_ricap:
            images, targets = ricap(images, targets, self.ricap_beta)
        elif self.use_cutmix:
            images, targets = cutmix(images, targets, self.cutmix_alpha, self.cutmix_prob, self.cutmix_box)
        return images, targets

    def loss(self, logits, targets):
        """Training loss: soft-target cross-entropy (label-smoothed if enabled) or the Dual-Cutout loss."""
        if self.use_dual_cutout:
            return dual_cutout_loss(logits, targets, self.dual_cutout_alpha, self.label_smoothing,
                                    self.dual_cutout_distance)
        return soft_target_cross_entropy(logits, targets, self.label_smoothing)

    def accuracy(self, logits, targets):
        """Training accuracy, lambda-weighted for mixed targets, on the views' mean logits for
        Dual-Cutout (see :func:`weighted_accuracy`)."""
        return weighted_accuracy(logits, targets)

    def __repr__(self):
        parts = []
        if self.use_cutout:
            parts.append(f'cutout(size={self.cutout_size}, prob={self.cutout_prob}, inside={self.cutout_inside})')
        if self.use_random_erasing:
            parts.append(f'random_erasing(prob={self.random_erasing_prob}, '
                         f'area_ratio_range={self.random_erasing_area_ratio_range}, '
                         f'min_aspect_ratio={self.random_erasing_min_aspect_ratio}, '
                         f'fill={self.random_erasing_fill})')
        if self.use_dual_cutout:
            parts.append(f'dual_cutout(size={self.cutout_size}, prob={self.cutout_prob}, '
                         f'inside={self.cutout_inside}, alpha={self.dual_cutout_alpha}, '
                         f'distance={self.dual_cutout_distance}, '
                         f'{"joint" if self.dual_cutout_joint_forward else "separate"} forward passes)')
        if self.use_mixup:
            parts.append(f'mixup(alpha={self.mixup_alpha})')
        if self.use_ricap:
            parts.append(f'ricap(beta={self.ricap_beta})')
        if self.use_cutmix:
            parts.append(f'cutmix(alpha={self.cutmix_alpha}, prob={self.cutmix_prob}, box={self.cutmix_box})')
        if self.use_label_smoothing:
            parts.append(f'label_smoothing(epsilon={self.label_smoothing_epsilon})')
        return f'BatchRegularizer({", ".join(parts) or "none"})'
