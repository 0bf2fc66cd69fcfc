"""The summary: per-method means over datasets and each method against LoRA, computed from the inputs.

`build_summary` gives the form the report reads (nulls kept); `clean` turns it into metrics/summary.json,
scalar-leafed (nested dicts of numbers/strings/bools) for `dvc metrics`.
"""
from __future__ import annotations

import math
from typing import Any

from clip_qlora.core.backends import METHODS
from clip_qlora.report.inputs import Inputs

BASELINE = "lora"
# Each gets a `<method>_vs_lora` block when both are present: the other bases first (what quantization buys),
# then checkpointing on the baseline's own base.
COMPARED = sorted((m for m in METHODS if m != BASELINE),
                  key=lambda m: METHODS[m].base == METHODS[BASELINE].base)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _max(values) -> int | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def clean(obj: Any) -> Any:
    """Drop null/NaN leaves (and then empty dicts) so that every leaf is a number, string or bool."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            v = clean(v)
            if v is None or v == {}:
                continue
            out[str(k)] = v
        return out
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, (list, tuple)):
        raise TypeError("summary must not hold lists")
    return obj


def _method_block(inp: Inputs, m: str) -> dict[str, Any]:
    ds = inp.datasets
    ev = [inp.eval[m, d] for d in ds]
    tr = [inp.train[m, d] for d in ds]
    static = inp.static[METHODS[m].base]
    prof = inp.profile[m]
    block: dict[str, Any] = {
        "base": METHODS[m].base,
        "gradient_checkpointing": METHODS[m].checkpointing,
        "trainable_params": _max(t.trainable_params for t in tr),
        "accuracy_mean": _mean(e.accuracy_mean for e in ev),
        "accuracy_std": _mean(e.accuracy_std for e in ev),
        "accuracy": {d: inp.eval[m, d].accuracy_mean for d in ds},
        "zero_shot_mean": _mean(inp.zeroshot[METHODS[m].base, d].zero_shot_accuracy for d in ds),
        # the base as stored (quantize stage: comparable with the original study's static figures) and as a
        # training run holds it on the device (profile: without the host-side token-embedding table)
        "stored_base_bytes": static.stored_base_bytes,
        "device_base_bytes": prof.device_base_bytes,
        "static_allocated_bytes": static.memory_allocated_bytes,
        "peak_allocated_bytes": _max(t.peak_allocated_bytes for t in tr),
        "peak_reserved_bytes": _max(t.peak_reserved_bytes for t in tr),
        "saved_activation_bytes": _max(t.saved_activation_bytes for t in tr),
        "train_seconds": _mean(t.train_seconds_mean for t in tr),
        "step_ms": _mean(t.step_ms_median for t in tr),
        "profile": {},
    }
    for b in inp.batches:
        p = prof.batches.get(b)
        if p is not None:
            block["profile"][b] = {"step_ms": p.step_ms, "peak_allocated_bytes": p.peak_allocated_bytes,
                                   "peak_reserved_bytes": p.peak_reserved_bytes,
                                   "saved_activation_bytes": p.saved_activation_bytes}
    return block


def _comparison(a: dict, b: dict, batches: list[str]) -> dict[str, Any]:
    static_ratio = _ratio(a["stored_base_bytes"], b["stored_base_bytes"])  # static memory: the stored base
    out: dict[str, Any] = {
        "accuracy_delta": a["accuracy_mean"] - b["accuracy_mean"],
        "static_ratio": static_ratio,
        "static_saving_pct": None if static_ratio is None else 100.0 * (1.0 - static_ratio),
        "peak_ratio": _ratio(a["peak_allocated_bytes"], b["peak_allocated_bytes"]),
        "peak_reserved_ratio": _ratio(a["peak_reserved_bytes"], b["peak_reserved_bytes"]),
        "saved_activation_ratio": _ratio(a["saved_activation_bytes"], b["saved_activation_bytes"]),
        "step_time_ratio": _ratio(a["step_ms"], b["step_ms"]),
        "train_time_ratio": _ratio(a["train_seconds"], b["train_seconds"]),
        "profile": {},
    }
    for bk in batches:
        pa, pb = a["profile"].get(bk), b["profile"].get(bk)
        if pa is None or pb is None:
            continue
        out["profile"][bk] = {
            "peak_ratio": _ratio(pa["peak_allocated_bytes"], pb["peak_allocated_bytes"]),
            "peak_reserved_ratio": _ratio(pa["peak_reserved_bytes"], pb["peak_reserved_bytes"]),
            "saved_activation_ratio": _ratio(pa["saved_activation_bytes"], pb["saved_activation_bytes"]),
            "step_time_ratio": _ratio(pa["step_ms"], pb["step_ms"]),
        }
    return out


def n_seeds_text(n_seeds: list[int]) -> str:
    lo, hi = min(n_seeds), max(n_seeds)
    if lo == hi:
        return f"{lo} seed" + ("s" if lo != 1 else "")
    return f"{lo}–{hi} seeds"


def build_summary(inp: Inputs) -> dict[str, Any]:
    """The summary dict before null leaves are dropped (the report reads this form)."""
    raw: dict[str, Any] = {
        "pretrained": inp.pretrained,
        "device": " | ".join(inp.devices),
        "n_seeds": min(inp.n_seeds),
        "n_datasets": len(inp.datasets),
        "datasets": ",".join(inp.datasets),
        "methods": ",".join(inp.methods),
    }
    for m in inp.methods:
        raw[m] = _method_block(inp, m)
    best = max(inp.methods, key=lambda m: (raw[m]["accuracy_mean"], -inp.methods.index(m)))
    raw["best_method"] = best
    if BASELINE in inp.methods:
        for m in COMPARED:
            if m in inp.methods:
                raw[f"{m}_vs_{BASELINE}"] = _comparison(raw[m], raw[BASELINE], inp.batches)
    return raw


def zero_shot_columns(inp: Inputs) -> list[tuple[str, str]]:
    """(column title, base supplying the value): the bases of the methods shown, one column if they agree."""
    bases = list(dict.fromkeys(METHODS[m].base for m in inp.methods))
    agree = all(len({inp.zeroshot[b, d].zero_shot_accuracy for b in bases}) == 1 for d in inp.datasets)
    if agree:
        return [("zero-shot", bases[0])]
    return [(f"zero-shot ({base})", base) for base in bases]
