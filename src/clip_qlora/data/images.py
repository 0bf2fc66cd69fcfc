"""Image decoding, the training augmentation, and the test-set loader.

Training images are decoded once, resized (shorter side to the model's input size, bicubic) and center-cropped,
and kept as one uint8 tensor; each step then augments a batch on the training device with one grid_sample, so
the loop never waits on JPEG decoding. Simplification against CLIP-LoRA, which crops from the full-resolution
image: here the random resized crop is taken from that center crop, so it never sees the borders the center
crop removed and a small crop is upsampled from fewer source pixels.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from ..io import UserError
from .decode import open_rgb

SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults, which CLIP-LoRA uses
RATIO = (3 / 4, 4 / 3)
TRIES = 10  # torchvision's number of attempts before falling back to the whole image


def _resize_crop(size: int) -> list:
    # the same geometry as open_clip's eval preprocess: shorter side to size (bicubic), then center crop
    return [v2.Resize(size, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(size), v2.PILToTensor()]


def load_train_images(split: dict, seed: int, root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-shot images of `seed` as uint8 (N, 3, size, size) and int64 labels (N,), in split order.

    Each image is resized (shorter side to `size`, bicubic) and center-cropped once, here; `augment` then crops
    from that square rather than from the full image (the simplification described at the top of this module).
    """
    entries = split["train"].get(str(seed))
    if entries is None:
        raise UserError(f"{split['dataset']}: the split has no training draw for seed {seed} "
                        f"(it has seeds {', '.join(split['train'])})")
    prepare = v2.Compose(_resize_crop(size))
    paths = sorted({path for path, _ in entries})  # images drawn with replacement are decoded once
    # PIL releases the GIL while decoding and resizing, so threads use every core
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = dict(zip(paths, pool.map(lambda p: prepare(open_rgb(Path(root) / p)), paths)))
    images = torch.stack([decoded[path] for path, _ in entries])
    labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
    return images, labels


def augment(images: torch.Tensor, generator: torch.Generator, size: int, mean: Sequence[float],
            std: Sequence[float]) -> torch.Tensor:
    """Random resized crop + horizontal flip of a uint8 (B, 3, S, S) batch -> normalised float32 (B, 3, size, size).

    Runs on the device of `images` with randomness from `generator` (same device), all images at once: crops
    become affine sampling grids. Crop boxes follow torchvision's RandomResizedCrop (area and log-aspect drawn
    uniformly, first of 10 tries that fits, else the whole image) but are not rounded to whole pixels. The
    input was decoded at the model size, so a crop is never larger than the output and bilinear sampling
    needs no antialiasing.
    """
    b, _, h, w = images.shape
    device = images.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

    area = h * w * uniform(*SCALE, b, TRIES)
    ratio = torch.exp(uniform(math.log(RATIO[0]), math.log(RATIO[1]), b, TRIES))
    crop_w, crop_h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    fits = (crop_w <= w) & (crop_h <= h)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first try that fits (0 if none does)
    found = fits.any(dim=1)
    crop_w = torch.where(found, crop_w.gather(1, first).squeeze(1), float(w))
    crop_h = torch.where(found, crop_h.gather(1, first).squeeze(1), float(h))
    left = uniform(0, 1, b) * (w - crop_w)
    top = uniform(0, 1, b) * (h - crop_h)
    mirror = torch.where(uniform(0, 1, b) < 0.5, -1.0, 1.0)

    # grid_sample coordinates run from -1 (left/top edge) to 1 (right/bottom edge) of the input
    zero = torch.zeros_like(crop_w)
    theta = torch.stack([
        torch.stack([mirror * crop_w / w, zero, (2 * left + crop_w) / w - 1], dim=1),
        torch.stack([zero, crop_h / h, (2 * top + crop_h) / h - 1], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (out / 255 - mean_t) / std_t


class _TestImages(Dataset):
    def __init__(self, items: list[tuple[Path, int]], transform: v2.Compose):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.transform(open_rgb(path)), label


def eval_loader(split: dict, root: Path, size: int, mean: Sequence[float], std: Sequence[float], batch_size: int,
                workers: int) -> DataLoader:
    """The whole test split in split order: (float32 (B, 3, size, size) normalised, int64 (B,))."""
    transform = v2.Compose([*_resize_crop(size), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(list(mean), list(std))])
    items = [(Path(root) / path, label) for path, label in split["test"]]
    return DataLoader(_TestImages(items, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())
