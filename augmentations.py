"""Data augmentation and regularization on whole batches of tensors.

Every function here takes a batch ``images`` of shape (B, C, H, W) on any device and
draws its randomness per image from torch's global generator, so the same code runs on
the GPU next to the model and a resumed run replays it once the RNG state is restored.
"""
import torch
import torch.nn.functional as F


def random_crop(images, padding):
    """Zero-pad by ``padding`` and crop back to the original size at a random offset per image.

    The standard CIFAR augmentation (He et al., arXiv 1512.03385, section 4.2).
    """
    if padding <= 0:
        return images
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    offset_y = torch.randint(0, 2 * padding + 1, (batch,), device=device)
    offset_x = torch.randint(0, 2 * padding + 1, (batch,), device=device)
    rows = (offset_y[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (offset_x[:, None] + torch.arange(width, device=device))[:, None, None, :]
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    channel_index = torch.arange(channels, device=device)[None, :, None, None]
    return padded[batch_index, channel_index, rows, cols]


def random_horizontal_flip(images, prob=0.5):
    """Mirror each image left-right with probability ``prob``."""
    flip = torch.rand(images.shape[0], device=images.device) < prob
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def normalize(images, mean, std):
    """uint8 or [0, 1] float images -> float32 standardized per channel."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std
