"""A random-weight base built where it will train, fast enough for ViT-bigG-14 (about 2.5 billion parameters).

`model.build_base` runs open_clip's constructors on the CPU in fp32 (every Linear's kaiming init and every
`normal_` of the text tower on the host: minutes for bigG), casts, and `make_base` then copies the model to
the GPU. Here the very same steps run with the target device and the compute dtype as torch's defaults: each
tensor is created once, on the GPU, in its final dtype, and initialised there by open_clip's own
initialisers (no re-implementation of them), then split, cast and quantized on the device by the backend.

Why not a meta-device skeleton materialised with `to_empty`: open_clip initialises inside its constructors
(`scale * torch.randn(...)` embeddings, the text tower's `init_parameters`, the causal-mask buffer,
`logit_scale`), and `to_empty` leaves all of those as uninitialised memory; they would have to be rebuilt by
hand. The meta device is used where it is free: counting an architecture's parameters without building it.

On CPU with compute dtype fp32 this builds exactly `build_base`'s model (same constructors, same CPU RNG, same
seed: tested bit for bit). On a GPU the values differ from that (another RNG, initialised in the compute
dtype) but have the same distributions; memory and time do not depend on them.
"""
from __future__ import annotations

import contextlib
import time

import open_clip
import torch
import torch.nn as nn

from clip_qlora.core import archs, backends
from clip_qlora.core.base import base_meta
from clip_qlora.core.model import (INIT_SEED, activation_kwargs, prepare_precision, register_configs, resolve_quick_gelu,
                    split_attention)


@contextlib.contextmanager
def _defaults(device: str, dtype: torch.dtype):
    """Factory functions (and so every nn.Module constructor) allocate on `device` in `dtype` inside."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def _check_arch(arch: str) -> None:
    archs.check(arch, "scale.archs")
    register_configs()


def build_on_device(arch: str, compute_dtype: torch.dtype, device: str) -> nn.Module:
    """`build_base(arch, 'none', compute_dtype)`'s model, constructed and initialised on `device`."""
    _check_arch(arch)
    torch.manual_seed(INIT_SEED)  # seeds the CPU and every CUDA generator
    with _defaults(device, compute_dtype):
        # precision 'fp32' makes open_clip leave dtypes alone (it only moves to `device`, a no-op here)
        # random weights: the architecture's own activation, as create_clip builds it for pretrained 'none'
        model = open_clip.create_model(arch, pretrained=None, precision="fp32", device=device,
                                       **activation_kwargs(resolve_quick_gelu(arch, "none", "auto")))
        split_attention(model)  # its new Linears are created on the device too
    prepare_precision(model, compute_dtype)  # LayerNorms to fp32, as in build_base
    model.requires_grad_(False)
    model.eval()
    return model


def make_random_base(arch: str, base: str, settings: dict | None, compute_dtype: torch.dtype,
                     device: str) -> tuple[nn.Module, dict]:
    """`base.make_base(arch, 'none', ...)` built on the device: (model, meta) for `train.run_on_model`."""
    t0 = time.perf_counter()
    model = build_on_device(arch, compute_dtype, device)
    model = backends.get(base).convert(model, settings, compute_dtype, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model, base_meta(model, arch, "none", False, base, settings, compute_dtype,
                            init=f"random, on {device}", build_seconds=time.perf_counter() - t0)


def parameter_count(arch: str) -> int:
    """Parameters of the architecture (both towers, embeddings included), counted on the meta device."""
    _check_arch(arch)
    with torch.device("meta"):
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    return sum(p.numel() for p in model.parameters())
