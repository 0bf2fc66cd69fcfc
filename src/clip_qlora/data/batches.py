"""Which images each training step sees, and how they are augmented: everything from (seed, step) alone."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clip_qlora.core.seeds import mix

if TYPE_CHECKING:
    from clip_qlora.core.step import Run


def batch_indices(n: int, batch: int, seed: int, step: int, batching: str = "epochs") -> torch.Tensor:
    """Indices of `step`'s batch, every image once per epoch, each epoch a permutation of its own.

    epochs (CLIP-LoRA's DataLoader, shuffle=True, drop_last=False): ceil(n / batch) batches per epoch, the last
    one short (n mod batch images), each counted as one iteration. full: consecutive slices of the permutations
    run across epoch ends, so every batch has `batch` images.
    """
    def perm(epoch: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(mix(seed, -1 - epoch)))

    if batching == "epochs":
        per_epoch = -(-n // batch)
        epoch, b = divmod(step, per_epoch)
        return perm(epoch)[b * batch:(b + 1) * batch]
    pos = torch.arange(step * batch, (step + 1) * batch)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = perm(e)[offsets[sel]]
    return out


def make_micro_batches(run: Run, images, seed: int, step: int, micro: int, accum: int, batching: str = "epochs"):
    """The step's batch, augmented, as micro-batches of `micro` images (a short batch gives fewer, or a
    smaller last one). All of its randomness comes from (seed, step), drawn on the host."""
    from clip_qlora.data.images import augment

    idx = batch_indices(len(images), micro * accum, seed, step, batching)
    gen = torch.Generator().manual_seed(mix(seed, step))
    x = augment(images, idx.tolist(), gen, run.size, run.mean, run.std)
    y = images.labels[idx]
    if x.is_cuda:  # pinned and asynchronous: a plain copy would make the host wait for the queued steps
        y = y.pin_memory().to(x.device, non_blocking=True)
    return [(x[i:i + micro], y[i:i + micro]) for i in range(0, len(idx), micro)]
