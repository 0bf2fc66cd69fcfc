"""The profile stage: one method's memory and step time for each profile.batches configuration."""
from __future__ import annotations

from pathlib import Path

from ..base import resolve_device
from ..io import read_json, write_json
from ..processes import FreshProcesses
from ..profile import WARM, measure, parse_batch
from . import base_of, common


def profile(p, method: str) -> dict:
    device = resolve_device(p.model.device)
    base = base_of(method)
    meta = read_json(base / "base.json")
    out = {"method": method, "arch": meta["arch"], "n_classes": p.profile.n_classes}
    with FreshProcesses(device, WARM) as call:  # on CUDA, each configuration in a process of its own
        for spec in p.profile.batches:
            micro, accum = parse_batch(spec)
            r = call(measure, p, method, base, micro, accum, p.profile.n_classes, p.profile.warmup, p.profile.steps,
                     device)
            out["device_base_bytes"] = r["device_base_bytes"]
            out["memory_allocated_bytes"] = r["memory_allocated_bytes"]
            out["trainable_params"] = r["trainable_params"]
            out["trainable_bytes"] = r["trainable_bytes"]
            out["step_mode"] = r["step_mode"]
            out[f"b{spec}"] = {k: r[k] for k in ("saved_activation_bytes", "peak_allocated_bytes",
                                                 "peak_reserved_bytes", "step_ms")}
    out.update(common(device, meta))
    write_json(Path("metrics/profile") / f"{method}.json", out)
    return out
