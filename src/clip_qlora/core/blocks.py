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


@contextlib.contextmanager
def drawing_from(gen: torch.Generator):
    """Make the default generator of gen's device draw from gen (gen's state advances, the default's does not)."""
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


@dataclass
class _Streams:
    forward: torch.Generator
    recompute: torch.Generator | None


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
    """Per-block dropout generators for both towers, and per-block checkpointing if asked for."""

    def __init__(self, clip: nn.Module, checkpointing: bool, device: str):
        self.checkpointing = checkpointing
        self.streams = []
        for tower in (clip.visual.transformer, clip.transformer):
            tower.grad_checkpointing = False  # ours replaces open_clip's (see the module docstring)
        for block in transformer_blocks(clip):
            s = _Streams(torch.Generator(device=device),
                         torch.Generator(device=device) if checkpointing else None)
            # An instance attribute shadows the class's forward for this block only: module names, state-dict
            # keys and PEFT's adapter paths stay what open_clip defines.
            block.forward = functools.partial(_block_forward, block, s)
            self.streams.append(s)

    def seed(self, seed: int) -> None:
        """Seed every block's generators from the step's seed (host-side only; a graph replay reads it)."""
        for i, s in enumerate(self.streams):
            value = mix(seed, 7919 * (i + 1))
            s.forward.manual_seed(value)
            if s.recompute is not None:
                s.recompute.manual_seed(value)

    def generators(self) -> list[torch.Generator]:
        """Every generator the blocks draw from (a CUDA graph must register them before capture)."""
        return [g for s in self.streams for g in (s.forward, s.recompute) if g is not None]
