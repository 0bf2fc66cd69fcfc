"""The quantize stage: build one arm's frozen base once, save it, point its methods at it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from clip_qlora.core import backends
from clip_qlora.core.base import make_base, resolve_device, resolve_dtype, save_base
from clip_qlora.runtime.io import write_json
from clip_qlora.core.memory import allocated_bytes, frozen_weight_bytes
from clip_qlora.metrics import Common, Static
from clip_qlora.paths import base_dir, method_pointer


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantize_base(base: str, p) -> Static:
    """The quantize stage: models/<base>/, its methods' pointers and metrics/static/<base>.json. p: the params
    the stage declares (model, and the group the backend's settings come from)."""
    device = resolve_device(p.model.device)
    dtype = resolve_dtype(p.model.compute_dtype, device)
    settings = backends.get(base).settings(p)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = allocated_bytes(device) or 0
    model, meta = make_base(p.model.arch, p.model.pretrained, base, settings, dtype, device, p.model.quick_gelu)
    after = allocated_bytes(device)
    save_base(model, meta, base_dir(base))
    digest = _sha256(base_dir(base) / "model.safetensors")
    for method, spec in backends.METHODS.items():
        if spec.base == base:
            # the settings too: one that only shapes training (quant.expand_absmax) leaves the stored tensors as
            # they were, and must still rerun what trains on this base
            write_json(method_pointer(method), {"method": method, "base": base,
                                                "gradient_checkpointing": spec.checkpointing,
                                                "dir": str(base_dir(base)), "settings": settings, "sha256": digest})
    # the base as stored (saved tensors, token-embedding table included): comparable with the original study's
    # static figures; the profile's device_base_bytes is what a training run keeps on the device
    metrics = Static(base=base, stored_base_bytes=frozen_weight_bytes(model),
                     memory_allocated_bytes=None if after is None else after - before,
                     arch=p.model.arch, compute_dtype=meta["compute_dtype"], quant=settings,
                     common=Common.of(device, meta))
    metrics.write()
    return metrics
