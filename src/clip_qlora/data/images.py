"""Image decoding, the training augmentation, and the test-set loader.

Training images are decoded once and kept on the training device as one zero-padded uint8 tensor, each image
whole (aspect kept, nothing cropped away) at its own resolution, downscaled only where its shorter side is
above `max_short_side` (train.decode_short_side x the model's input size). Each step then takes CLIP-LoRA's
augmentation from the whole image: torchvision's RandomResizedCrop box (scale 0.08-1, ratio 3/4-4/3, drawn
exactly as `RandomResizedCrop.get_params` draws it, from a generator of the step), a bicubic antialiased
resize to the input size, and a horizontal flip with p = 0.5. So the loop never waits on JPEG decoding.

Why 2x the input size (448 px for 224-px models): the crop box covers sqrt(scale) of each side, so at a
shorter side of 448 every crop of scale >= 0.25 (82% of the draws) is still downsampled to 224 px from at
least as many source pixels as the output has, as it is from the full-resolution file. EuroSAT (64 px),
UCF101 mid-frames (320x240), Caltech101 (~300x200) and most DTD images are kept exactly as decoded; the
larger ones (Pets, Flowers ~500x375, Food101, FGVCAircraft ~1000x700) differ from CLIP-LoRA only in crops of
scale < 0.25. It costs device memory: ~1 MB per 4:3 image (400 MB for 4 shots x 100 classes), reported as
train_images_bytes beside the training peaks.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from clip_qlora.runtime.io import UserError
from clip_qlora.data.decode import open_rgb

SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults, which CLIP-LoRA uses
RATIO = (3 / 4, 4 / 3)
TRIES = 10  # torchvision's number of attempts before falling back to a centre crop
FLIP_P = 0.5


def _resize_crop(size: int) -> list:
    # the same geometry as open_clip's eval preprocess: shorter side to size (bicubic), then center crop
    return [v2.Resize(size, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(size), v2.PILToTensor()]


@dataclass
class TrainImages:
    """The k-shot images of one seed, decoded once: whole images in a zero-padded uint8 canvas."""
    pixels: torch.Tensor  # uint8 (N, 3, H, W); image k fills pixels[k, :, :h_k, :w_k]
    sizes: list[tuple[int, int]]  # (h_k, w_k) on the host: the crop boxes are drawn there, no device sync
    labels: torch.Tensor  # int64 (N,), on the host: a batch's labels are gathered there and sent without a sync

    def to(self, device) -> "TrainImages":
        return TrainImages(self.pixels.to(device), self.sizes, self.labels)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()


def decode_for_training(path: Path, max_short_side: int) -> torch.Tensor:
    """uint8 (3, h, w): the whole image, its shorter side brought down to max_short_side if above it."""
    image = open_rgb(path)
    if max_short_side and min(image.size) > max_short_side:
        image = v2.Resize(max_short_side, interpolation=InterpolationMode.BICUBIC)(image)
    return v2.PILToTensor()(image)


def load_train_images(split: dict, seed: int, root: Path, max_short_side: int) -> TrainImages:
    """The k-shot images of `seed` in split order (see the module docstring for the resolution)."""
    entries = split["train"].get(str(seed))
    if entries is None:
        raise UserError(f"{split['dataset']}: the split has no training draw for seed {seed} "
                        f"(it has seeds {', '.join(split['train'])})")
    paths = sorted({path for path, _ in entries})  # images drawn with replacement are decoded once
    # PIL releases the GIL while decoding and resizing, so threads use every core
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = dict(zip(paths, pool.map(lambda p: decode_for_training(Path(root) / p, max_short_side), paths)))
    sizes = [tuple(decoded[path].shape[1:]) for path, _ in entries]
    pixels = torch.zeros(len(entries), 3, max(h for h, _ in sizes), max(w for _, w in sizes), dtype=torch.uint8)
    for k, (path, _) in enumerate(entries):
        h, w = sizes[k]
        pixels[k, :, :h, :w] = decoded[path]
    labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
    return TrainImages(pixels, sizes, labels)


def crop_params(height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, draw for draw, from `gen`.

    The same calls in the same order as torchvision makes on the global generator, so a generator seeded like
    the global one gives the very same boxes (tests check it against torchvision itself).
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(RATIO))
    for _ in range(TRIES):
        target_area = area * torch.empty(1).uniform_(SCALE[0], SCALE[1], generator=gen).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=gen)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height  # no try fitted: the largest centred box of an allowed aspect
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        h, w = height, int(round(height * max(RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment(images: TrainImages, index: Sequence[int], gen: torch.Generator, size: int, mean: Sequence[float],
            std: Sequence[float]) -> torch.Tensor:
    """CLIP-LoRA's training augmentation of images[index] -> normalised float32 (B, 3, size, size).

    Boxes and flips are drawn on the host from the CPU generator `gen` (per image: the crop's draws, then the
    flip's, as RandomResizedCrop then RandomHorizontalFlip draw them); cropping and resizing run where the
    pixels are, with torchvision's own bicubic antialiased resize, which rounds back to uint8 as PIL does.
    """
    out = []
    for k in index:
        h, w = images.sizes[k]
        top, left, ch, cw = crop_params(h, w, gen)
        crop = TF.resize(images.pixels[k, :, top:top + ch, left:left + cw], [size, size],
                         interpolation=InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(1, generator=gen).item() < FLIP_P:
            crop = crop.flip(-1)
        out.append(crop)
    x = torch.stack(out).float()
    mean_t, std_t = _stats_on(x.device, tuple(mean), tuple(std))
    return (x / 255 - mean_t) / std_t


@functools.lru_cache(maxsize=8)
def _stats_on(device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    # made once: a tensor built from a list on a GPU is a blocking copy, which would stall the step loop
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))


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
    """The whole test split in split order, decoded by PIL in CPU workers: (float32 (B, 3, size, size), int64 (B,)).

    The reference's pixels: PIL decodes (`open_rgb`), PIL resizes the shorter side (bicubic) and crops the centre,
    as CLIP-LoRA's torchvision transforms do on its PIL images; only then are they made float and normalised."""
    transform = v2.Compose([*_resize_crop(size), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(list(mean), list(std))])
    items = [(Path(root) / path, label) for path, label in split["test"]]
    return DataLoader(_TestImages(items, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


JPEG_MAGIC = b"\xff\xd8"


def _decode_many(datas: list[torch.Tensor], paths: list[Path], device, decode_jpeg) -> list[torch.Tensor]:
    """uint8 (3, h, w) images on `device`; JPEGs in one `decode_jpeg` batch (torchvision's: nvJPEG on CUDA,
    libjpeg on CPU), the others by PIL. `decode_jpeg` is a parameter so that tests can give the CPU a decoder
    that behaves as the CUDA one does."""
    from torchvision.io import ImageReadMode

    jpeg = [k for k, d in enumerate(datas) if bytes(d[:2].tolist()) == JPEG_MAGIC]
    out: list[torch.Tensor | None] = [None] * len(datas)
    # A batch without a JPEG (all PNG or WebP) must not reach decode_jpeg: it raises ValueError on an empty list.
    # Errors: nvJPEG raises RuntimeError on one undecodable or exotic (CMYK, lossless) JPEG and fails the whole
    # batch, torchvision ValueError on inputs it refuses; either way try one by one, then PIL.
    if jpeg:
        try:
            for k, img in zip(jpeg, decode_jpeg([datas[k] for k in jpeg], mode=ImageReadMode.RGB, device=device)):
                out[k] = img
        except (RuntimeError, ValueError):
            for k in jpeg:
                try:
                    out[k] = decode_jpeg(datas[k], mode=ImageReadMode.RGB, device=device)
                except (RuntimeError, ValueError):
                    pass
    for k, img in enumerate(out):
        if img is None:  # PNG, WebP and whatever nvJPEG refused: the reference's decoder (and its one-line error)
            out[k] = v2.PILToTensor()(open_rgb(paths[k])).to(device)
    return out


def tensor_batches(split: dict, root: Path, size: int, mean: Sequence[float], std: Sequence[float], batch_size: int,
                   device, readers: int = 8):
    """The test split like `eval_loader`, decoded and resized where the model runs (eval.decode fast).

    Files are read by a few threads one batch ahead; decoding (nvJPEG on a GPU), resizing (shorter side to
    `size`, bicubic, antialiased) and the centre crop then run on `device`, so a GPU is not fed by CPU decoders.
    Not the reference's pixels: on the H200, nvJPEG's decode and the CUDA bicubic resize put the inputs about
    0.2 grey levels (mean; up to 17) from PIL's; on a CPU, libjpeg and the uint8 resize a few thousandths.
    """
    from torchvision.io import decode_jpeg, read_file

    items = [(Path(root) / path, label) for path, label in split["test"]]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    def read(chunk):
        return [read_file(str(path)) for path, _ in chunk]

    # On CUDA the decoding runs on a stream of its own: while the caller's forward of one batch runs on the
    # GPU, the host is already decoding the next (nvJPEG waits for its own stream only).
    side = torch.cuda.Stream(device=device) if str(device).startswith("cuda") else None
    with ThreadPoolExecutor(max_workers=readers) as pool:
        ahead = pool.submit(read, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            datas = ahead.result()
            if i + 1 < len(chunks):
                ahead = pool.submit(read, chunks[i + 1])
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                images = _decode_many(datas, [path for path, _ in chunk], device, decode_jpeg)
                x = torch.stack([TF.center_crop(TF.resize(img, size, interpolation=InterpolationMode.BICUBIC,
                                                          antialias=True), [size, size]) for img in images])
                x = (x.float() / 255 - mean_t) / std_t
            if side is not None:
                main = torch.cuda.current_stream(device)
                main.wait_stream(side)
                x.record_stream(main)  # made on the side stream, used on main: not reused before main is done
            labels = torch.tensor([label for _, label in chunk], dtype=torch.int64)
            yield x, labels


def eval_batches(split: dict, root: Path, size: int, mean, std, batch_size: int, workers: int, device: str,
                 decode: str):
    """The test split's batches for `device`, as eval.decode says: `reference`, CLIP-LoRA's own pixels (PIL in
    `workers` DataLoader processes, on every device); `fast`, decoded and resized on `device` (nvJPEG on a GPU)."""
    if decode == "reference":
        return eval_loader(split, root, size, mean, std, batch_size, workers)
    if decode == "fast":
        return Batches(lambda: tensor_batches(split, root, size, mean, std, batch_size, device),
                       -(-len(split["test"]) // batch_size))
    raise ValueError(f"eval.decode: {decode!r}, expected reference or fast")


class Batches:
    """A re-iterable generator with a length (what `predict`'s progress bar asks of a DataLoader)."""

    def __init__(self, make, n: int):
        self.make, self.n = make, n

    def __iter__(self):
        return self.make()

    def __len__(self) -> int:
        return self.n
