"""Transformer blocks that draw their dropout masks from generators of their own, optionally checkpointed.

Why not open_clip's `set_grad_checkpointing`: torch's checkpoint replays a block's dropout masks during
recomputation by saving and restoring the global RNG state (`get_rng_state`/`set_rng_state`). A CUDA graph
cannot capture that, so checkpointed steps had to run eagerly, about 10x slower than the graphed LoRA step
on the H200. Here every block draws from its own generator, reseeded from the step's seed before every step;
a checkpointed block's recomputation draws from a twin generator seeded identically, so it replays the same
masks without saving or restoring any state. Swapping the default generator's state object
(`graphsafe_set_state`) is what torch provides for graph capture.

Every method runs its blocks this way, checkpointed or not, so lora and lora_gc (qlora and qlora_gc) see the
same masks at the same step and compute the same gradients: checkpointing changes memory and time only.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from clip_qlora.core.seeds import mix


def transformer_blocks(clip: nn.Module) -> list[nn.Module]:
    """The residual blocks of the vision tower, then of the text tower."""
    return [*clip.visual.transformer.resblocks, *clip.transformer.resblocks]


class Draws:
    """One of a block's dropout generators, and how far it has drawn since it was last seeded.

    torch's generator keeps that offset itself; a kernel that draws torch's masks on its own (lora_triton, for
    the fused q/k/v adapters) never touches the generator, so it asks `take` for the offset torch would have
    handed it. `seed` is the generator's seed as a one-element device tensor, so a captured CUDA graph reads
    each step's seed where the step wrote it. The offsets are host integers: under graph capture they become
    constants of the graph, which is right because every replay starts from a freshly seeded generator.
    """

    def __init__(self, generator: torch.Generator, seed: torch.Tensor | None = None):
        self.generator, self.seed, self.offset = generator, seed, 0

    def take(self, increment: int) -> int:
        """The offset of a draw of `increment` Philox values, then advanced (torch rounds to multiples of 4)."""
        offset = self.offset
        self.offset += -(-increment // 4) * 4
        return offset


_drawing: Draws | None = None  # whose generator the default generator stands in for now (drawing_from)


def current() -> Draws | None:
    """The Draws a block running now draws its dropout masks from (None outside the blocks' forward)."""
    return _drawing


@contextlib.contextmanager
def drawing_from(draws: Draws):
    """Make the default generator of the generator's device draw from it (its state advances, the default's
    does not), and make `draws` the current one."""
    global _drawing
    gen = draws.generator
    outer, _drawing = _drawing, draws
    try:
        if gen.device.type == "cuda":
            default = torch.cuda.default_generators[gen.device.index if gen.device.index is not None
                                                    else torch.cuda.current_device()]
            previous = default.graphsafe_get_state()  # state objects are shared, not copied: capture-safe
            default.graphsafe_set_state(gen)
            try:
                yield
            finally:
                default.graphsafe_set_state(previous)
        else:  # CPU generators have no shareable state objects; copy the state in and out (nothing is captured)
            previous = torch.get_rng_state()
            torch.set_rng_state(gen.get_state())
            try:
                yield
            finally:
                gen.set_state(torch.get_rng_state())
                torch.set_rng_state(previous)
    finally:
        _drawing = outer


@dataclass
class _Streams:
    forward: Draws
    recompute: Draws | None


def _block_forward(block: nn.Module, streams: _Streams, *args, **kwargs):
    run = type(block).forward  # the class's own forward; the instance attribute is this function
    if streams.recompute is not None and torch.is_grad_enabled():
        return checkpoint(run, block, *args, use_reentrant=False,  # non-reentrant: adapters inside get grads
                          preserve_rng_state=False,  # the twin generator replays the masks instead
                          context_fn=lambda: (drawing_from(streams.forward), drawing_from(streams.recompute)),
                          **kwargs)
    with drawing_from(streams.forward):
        return run(block, *args, **kwargs)


class BlockDropout:
    """Per-block dropout generators for both towers, and per-block checkpointing if asked for.

    device_seeds: also keep each block's seed in a device tensor (for kernels that draw the masks themselves).
    """

    def __init__(self, clip: nn.Module, checkpointing: bool, device: str, device_seeds: bool = False):
        self.checkpointing = checkpointing
        self.streams = []
        for tower in (clip.visual.transformer, clip.transformer):
            tower.grad_checkpointing = False  # ours replaces open_clip's (see the module docstring)
        blocks = transformer_blocks(clip)
        self.seeds = None
        if device_seeds:  # until the first seed(): the seed a new generator has
            self.seeds = torch.full((len(blocks),), torch.Generator(device=device).initial_seed(), dtype=torch.int64,
                                    device=device)
        for i, block in enumerate(blocks):
            seed = None if self.seeds is None else self.seeds[i:i + 1]  # forward and recompute share it
            s = _Streams(Draws(torch.Generator(device=device), seed),
                         Draws(torch.Generator(device=device), seed) if checkpointing else None)
            # An instance attribute shadows the class's forward for this block only: module names, state-dict
            # keys and PEFT's adapter paths stay what open_clip defines.
            block.forward = functools.partial(_block_forward, block, s)
            self.streams.append(s)

    def seed(self, seed: int) -> None:
        """Seed every block's generators from the step's seed (outside any graph: a replay reads the seeds)."""
        values = [mix(seed, 7919 * (i + 1)) for i in range(len(self.streams))]
        for s, value in zip(self.streams, values):
            for draws in (s.forward, s.recompute):
                if draws is not None:
                    draws.generator.manual_seed(value)
                    draws.offset = 0
        if self.seeds is not None:
            host = torch.tensor(values, dtype=torch.int64)
            # pinned and non-blocking: a pageable copy would make the host wait for the step still running on
            # the GPU (the training loop syncs once per logging window, not per step); the copy is queued on
            # the current stream, before the kernels that read the seeds
            self.seeds.copy_(host.pin_memory() if self.seeds.is_cuda else host, non_blocking=True)

    def generators(self) -> list[torch.Generator]:
        """Every generator the blocks draw from (a CUDA graph must register them before capture)."""
        return [d.generator for s in self.streams for d in (s.forward, s.recompute) if d is not None]
