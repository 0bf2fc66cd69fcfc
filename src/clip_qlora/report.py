"""The `aggregate` stage: per-stage metrics in, summary + report + figures + DVC plot data out.

Inputs (written by the static, train, eval and profile stages; numbers may be null where unmeasured):
    metrics/static/<base>.json, metrics/train/<method>/<dataset>.json,
    metrics/eval/<method>/<dataset>.json, metrics/profile/<method>.json,
    dvclive/train/<method>/<dataset>/seed<k>/plots/metrics/train/loss.tsv,
    plots/confusion/<method>/<dataset>.json
Outputs:
    metrics/summary.json   scalar-leafed (nested dicts of numbers/strings/bools) for `dvc metrics`
    reports/results.md     accuracy table, Table-1-shaped resources table, computed "what changed"
    <plots_dir>/{accuracy,memory,step_time}.png         matplotlib figures (plots_dir: e.g. plots/figures)
    plots/{accuracy,memory,step_time}.json              records for `dvc plots` (declared under plots: in dvc.yaml)
    plots/loss/<dataset>.json                           training loss per method, one column per method
    plots/confusion_best/<dataset>.json                 confusion records of the best method

Every number in the report is computed from the inputs; the only hand-written numbers are the quoted
reference figures below, and they are always labelled "quoted, not measured here".
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from clip_qlora import figures
from clip_qlora.io import UserError, atomic_dir, read_json, write_json, write_text

GIB = 1024**3

# The 2x2 design: {bf16 base, NF4 base} x {gradient checkpointing off, on}.
METHOD_BASE = {"lora": "bf16", "lora_gc": "bf16", "qlora": "nf4", "qlora_gc": "nf4"}
METHOD_LABEL = {"lora": "LoRA", "lora_gc": "LoRA + GC", "qlora": "QLoRA", "qlora_gc": "QLoRA + GC"}
STUDY_METHODS = list(METHOD_BASE)  # the fixed method list of the study (columns of plots/loss/*.json)
BASELINE = "lora"
COMPARED = ["qlora", "qlora_gc", "lora_gc"]  # each gets a `<method>_vs_lora` block when both are present

# ---- quoted reference figures (protocol.md); never computed, always labelled as quoted -------------
REFERENCE_COLUMNS = ["EuroSAT", "DTD", "Caltech", "Pets", "Flowers", "Food", "Aircraft", "UCF", "mean"]
REFERENCE_ROWS = [
    ("CLIP-LoRA, paper Table 1 (ViT-B/16, 4 shots)",
     ["84.9", "63.8", "95.2", "91.0", "93.7", "82.7", "37.9", "81.1", "78.79"]),
    ("QLoRA + GC, bs 32x1, seed 1 (QLoRA study's own logs)",
     ["87.90", "58.39", "94.36", "91.50", "87.49", "82.29", "32.58", "75.97", "76.31"]),
]
REFERENCE_SHORT = ["CLIP-LoRA paper", "QLoRA+GC study s1"]
# normalised dataset name (lower case, alphanumerics only) -> reference column
_REFERENCE_ALIASES = {
    "eurosat": "EuroSAT", "dtd": "DTD", "describabletextures": "DTD", "caltech101": "Caltech",
    "caltech": "Caltech", "oxfordpets": "Pets", "pets": "Pets", "oxfordiiitpet": "Pets",
    "oxfordflowers": "Flowers", "flowers": "Flowers", "flower102": "Flowers", "flowers102": "Flowers",
    "food101": "Food", "food": "Food", "fgvcaircraft": "Aircraft", "aircraft": "Aircraft",
    "ucf101": "UCF", "ucf": "UCF",
}
STUDY_DEVICE, STUDY_DATASET = "RTX 4090", "Caltech101"
STUDY_STATIC_GB = {"lora": "0.29", "qlora": "0.11"}
STUDY_PEAK_GB = {("lora", "b4x8"): "0.71", ("qlora", "b4x8"): "1.02", ("qlora_gc", "b4x8"): "0.25",
                 ("qlora_gc", "b1x32"): "0.17",
                 ("lora", "b32x1"): "3.53", ("qlora", "b32x1"): "6.96", ("qlora_gc", "b32x1"): "1.07"}
STUDY_TIME = {("lora", "b4x8"): "6:46", ("qlora", "b4x8"): "12:13", ("qlora_gc", "b4x8"): "11:55"}

RANDOM_INIT_BANNER = (
    "> **⚠ RANDOM-INITIALISED WEIGHTS (`pretrained: false`): the accuracy figures below are not a result.**\n"
    "> The CLIP weights were not loaded, so accuracy is near chance and says nothing about LoRA vs QLoRA.\n"
    "> Memory and time measurements do not depend on the weight values and remain valid.\n"
)
TRAIN_ROW = "training"  # the pseudo batch config of the rows measured during the training stage


# ---------------------------------------------------------------------------------------------------
# reading and validating inputs


def _num(d: dict, key: str, path: Path, *, nullable: bool = False, integer: bool = False):
    if not isinstance(d, dict) or key not in d:
        raise UserError(f"{path}: missing key '{key}'")
    v = d[key]
    if v is None and nullable:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise UserError(f"{path}: '{key}' must be {kind}{' or null' if nullable else ''}, got {v!r}")
    if isinstance(v, float) and math.isnan(v):
        return None if nullable else v
    return v


def _bool(d: dict, key: str, path: Path) -> bool:
    if key not in d or not isinstance(d[key], bool):
        raise UserError(f"{path}: '{key}' must be true or false")
    return d[key]


def _obj(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _check_ids(data: dict, path: Path, **expected: str) -> None:
    for key, want in expected.items():
        if key in data and data[key] != want:
            raise UserError(f"{path}: '{key}' is {data[key]!r} but the file is for {want!r}")


@dataclass
class _Inputs:
    methods: list[str]
    datasets: list[str]
    static: dict[str, dict] = field(default_factory=dict)  # base -> static file
    train: dict[tuple[str, str], dict] = field(default_factory=dict)
    eval: dict[tuple[str, str], dict] = field(default_factory=dict)
    profile: dict[str, dict] = field(default_factory=dict)
    batches: list[str] = field(default_factory=list)  # union of profile batch keys, in file order
    pretrained: bool = True
    devices: list[str] = field(default_factory=list)
    n_seeds: list[int] = field(default_factory=list)


def _load(methods: list[str], datasets: list[str], metrics_dir: Path) -> _Inputs:
    if not methods:
        raise UserError("aggregate: no methods given")
    if not datasets:
        raise UserError("aggregate: no datasets given")
    for m in methods:
        if m not in METHOD_BASE:
            raise UserError(f"aggregate: unknown method {m!r} (known: {', '.join(METHOD_BASE)})")
    if len(set(methods)) != len(methods) or len(set(datasets)) != len(datasets):
        raise UserError("aggregate: methods and datasets must not repeat")
    inp = _Inputs(methods=list(methods), datasets=list(datasets))
    flags: list[bool] = []

    def device(data: dict, path: Path) -> None:
        dev = data.get("device")
        if not isinstance(dev, str):
            raise UserError(f"{path}: 'device' must be a string")
        if dev not in inp.devices:
            inp.devices.append(dev)

    for base in dict.fromkeys(METHOD_BASE[m] for m in methods):
        path = metrics_dir / "static" / f"{base}.json"
        data = _obj(path)
        _check_ids(data, path, base=base)
        _num(data, "static_bytes", path, integer=True)
        _num(data, "memory_allocated_bytes", path, nullable=True, integer=True)
        flags.append(_bool(data, "pretrained", path))
        device(data, path)
        inp.static[base] = data

    for m in methods:
        for ds in datasets:
            path = metrics_dir / "train" / m / f"{ds}.json"
            data = _obj(path)
            _check_ids(data, path, method=m, dataset=ds)
            _num(data, "train_seconds_mean", path)
            _num(data, "step_ms_median", path, nullable=True)
            _num(data, "trainable_params", path, nullable=True, integer=True)
            for key in ("peak_allocated_bytes", "peak_reserved_bytes", "saved_activation_bytes"):
                _num(data, key, path, nullable=True, integer=True)
            flags.append(_bool(data, "pretrained", path))
            device(data, path)
            inp.train[m, ds] = data

            path = metrics_dir / "eval" / m / f"{ds}.json"
            data = _obj(path)
            _check_ids(data, path, method=m, dataset=ds)
            _num(data, "accuracy_mean", path)
            _num(data, "accuracy_std", path, nullable=True)
            _num(data, "zero_shot_accuracy", path, nullable=True)
            acc = data.get("accuracy")
            if not isinstance(acc, dict) or not acc:
                raise UserError(f"{path}: 'accuracy' must be a non-empty object of seed -> accuracy")
            inp.n_seeds.append(len(acc))
            flags.append(_bool(data, "pretrained", path))
            inp.eval[m, ds] = data

        path = metrics_dir / "profile" / f"{m}.json"
        data = _obj(path)
        _check_ids(data, path, method=m)
        flags.append(_bool(data, "pretrained", path))
        device(data, path)
        for key, val in data.items():
            if _is_batch_key(key):
                if not isinstance(val, dict):
                    raise UserError(f"{path}: '{key}' must be an object")
                _num(val, "step_ms", path / key, nullable=True)
                for k in ("peak_allocated_bytes", "peak_reserved_bytes", "saved_activation_bytes"):
                    if k in val:
                        _num(val, k, path / key, nullable=True, integer=True)
                if key not in inp.batches:
                    inp.batches.append(key)
        inp.profile[m] = data

    inp.pretrained = all(flags)
    return inp


def _is_batch_key(key: str) -> bool:
    """`b<micro>x<accum>`, e.g. b4x8, b32x1."""
    if not key.startswith("b") or "x" not in key:
        return False
    micro, _, accum = key[1:].partition("x")
    return micro.isdigit() and accum.isdigit()


def _batch_label(key: str) -> str:
    return key[1:] if _is_batch_key(key) else key


# ---------------------------------------------------------------------------------------------------
# the summary


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


def _clean(obj: Any) -> Any:
    """Drop null/NaN leaves (and then empty dicts) so that every leaf is a number, string or bool."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            v = _clean(v)
            if v is None or v == {}:
                continue
            out[str(k)] = v
        return out
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, (list, tuple)):
        raise TypeError("summary must not hold lists")
    return obj


def _method_block(inp: _Inputs, m: str) -> dict[str, Any]:
    ds = inp.datasets
    ev = [inp.eval[m, d] for d in ds]
    tr = [inp.train[m, d] for d in ds]
    static = inp.static[METHOD_BASE[m]]
    prof = inp.profile[m]
    block: dict[str, Any] = {
        "base": METHOD_BASE[m],
        "gradient_checkpointing": m.endswith("_gc"),
        "trainable_params": _max(t.get("trainable_params") for t in tr),
        "accuracy_mean": _mean(e["accuracy_mean"] for e in ev),
        "accuracy_std": _mean(e.get("accuracy_std") for e in ev),
        "accuracy": {d: inp.eval[m, d]["accuracy_mean"] for d in ds},
        "zero_shot_mean": _mean(e.get("zero_shot_accuracy") for e in ev),
        "static_bytes": static["static_bytes"],
        "static_allocated_bytes": static.get("memory_allocated_bytes"),
        "peak_allocated_bytes": _max(t.get("peak_allocated_bytes") for t in tr),
        "peak_reserved_bytes": _max(t.get("peak_reserved_bytes") for t in tr),
        "saved_activation_bytes": _max(t.get("saved_activation_bytes") for t in tr),
        "train_seconds": _mean(t["train_seconds_mean"] for t in tr),
        "step_ms": _mean(t.get("step_ms_median") for t in tr),
        "profile": {},
    }
    for b in inp.batches:
        p = prof.get(b)
        if isinstance(p, dict):
            block["profile"][b] = {k: p.get(k) for k in
                                   ("step_ms", "peak_allocated_bytes", "peak_reserved_bytes",
                                    "saved_activation_bytes")}
    return block


def _comparison(a: dict, b: dict, batches: list[str]) -> dict[str, Any]:
    static_ratio = _ratio(a["static_bytes"], b["static_bytes"])
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


def _n_seeds_text(n_seeds: list[int]) -> str:
    lo, hi = min(n_seeds), max(n_seeds)
    if lo == hi:
        return f"{lo} seed" + ("s" if lo != 1 else "")
    return f"{lo}–{hi} seeds"


def build_summary(inp: _Inputs) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------------
# formatting


def _gib(b: int | None) -> str:
    if b is None:
        return "n/a"
    g = b / GIB
    return f"{g:.2f}" if g >= 0.1 or g == 0 else f"{g:.3g}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def _mmss(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    mi, se = divmod(rem, 60)
    return f"{h}:{mi:02d}:{se:02d}" if h else f"{mi}:{se:02d}"


def _acc(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _x(r: float) -> str:
    return f"{r:.2f}x"


def _label(m: str) -> str:
    return METHOD_LABEL.get(m, m)


def _reference_column(dataset: str) -> str | None:
    key = "".join(c for c in dataset.lower() if c.isalnum())
    return _REFERENCE_ALIASES.get(key)


def what_changed(summary: dict[str, Any], batches: list[str]) -> list[str]:
    """One sentence group per `<method>_vs_lora` block, every number taken from `summary`."""
    out = []
    pretrained = summary["pretrained"]
    base = summary.get(BASELINE)
    for m in COMPARED:
        c = summary.get(f"{m}_vs_{BASELINE}")
        if c is None:
            continue
        a = summary[m]
        # static memory
        pct = c["static_saving_pct"]
        if pct is None:
            static = "has no comparable static memory figure"
        elif round(pct) == 0:
            static = f"keeps static memory unchanged ({_gib(a['static_bytes'])} GiB)"
        elif pct > 0:
            static = f"saves {pct:.0f} % of static memory ({_gib(a['static_bytes'])} vs {_gib(base['static_bytes'])} GiB)"
        else:
            static = f"uses {-pct:.0f} % more static memory ({_gib(a['static_bytes'])} vs {_gib(base['static_bytes'])} GiB)"
        # step time and accuracy
        st = c["step_time_ratio"]
        delta = c["accuracy_delta"]
        acc_word = "costs" if round(delta, 1) < 0 else "gains" if round(delta, 1) > 0 else None
        acc_amount = f"{abs(delta):.1f} points of accuracy"
        acc_note = " (not meaningful: random-initialised weights)" if not pretrained else ""
        if st is None:
            tail = (f"{acc_word} {acc_amount}" if acc_word else "leaves accuracy unchanged (±0.0 points)")
            sentence = f"{_label(m)} {static} and {tail}{acc_note}."
        else:
            time_word = "costs" if st >= 1 else "needs only"
            if acc_word == time_word:
                tail = f"{time_word} {_x(st)} step time and {acc_amount}"
            elif acc_word:
                tail = f"{time_word} {_x(st)} step time and {acc_word} {acc_amount}"
            else:
                tail = f"{time_word} {_x(st)} step time and leaves accuracy unchanged (±0.0 points)"
            sentence = f"{_label(m)} {static}, {tail}{acc_note}."
        parts = [sentence]
        # peaks and saved activations, each relative to LoRA, in training and per profiled batch
        for key, what, missing in (("peak_ratio", "Peak allocated memory",
                                    "Peak allocated memory was not measured on this device (no allocator statistics)."),
                                   ("saved_activation_ratio", "Saved activations", None)):
            bits = [f"{_x(c[key])} during training"] if c.get(key) is not None else []
            bits += [f"{_x(r)} at batch {_batch_label(b)}" for b in batches
                     if (r := c["profile"].get(b, {}).get(key)) is not None]
            if bits:
                parts.append(f"{what} relative to LoRA: {', '.join(bits)}.")
            elif missing:
                parts.append(missing)
        if c.get("train_time_ratio") is not None:
            parts.append(f"Total training time: {_x(c['train_time_ratio'])} LoRA's "
                         f"({_mmss(a['train_seconds'])} vs {_mmss(base['train_seconds'])} per run).")
        out.append(" ".join(parts))
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _zero_shot_columns(inp: _Inputs) -> list[tuple[str, str]]:
    """(column title, method supplying the value). One column if all methods agree, else one per base."""
    agree = all(len({inp.eval[m, d].get("zero_shot_accuracy") for m in inp.methods}) == 1
                for d in inp.datasets)
    if agree:
        return [("zero-shot", inp.methods[0])]
    cols = []
    for base in dict.fromkeys(METHOD_BASE[m] for m in inp.methods):
        first = next(m for m in inp.methods if METHOD_BASE[m] == base)
        cols.append((f"zero-shot ({base})", first))
    return cols


def _accuracy_rows(inp: _Inputs, raw: dict) -> tuple[list[str], list[list[str]]]:
    zs_cols = _zero_shot_columns(inp)
    refs = [_reference_column(d) for d in inp.datasets]
    header = ["dataset", *(t for t, _ in zs_cols), *(f"{_label(m)} (`{m}`)" for m in inp.methods),
              *(f"{s} (quoted, not measured here)" for s in REFERENCE_SHORT)]
    rows = []
    for d, ref in zip(inp.datasets, refs):
        row = [d]
        for _, src in zs_cols:
            z = inp.eval[src, d].get("zero_shot_accuracy")
            row.append("n/a" if z is None else f"{z:.2f}")
        for m in inp.methods:
            e = inp.eval[m, d]
            row.append(_acc(e["accuracy_mean"], e.get("accuracy_std")))
        for _, values in REFERENCE_ROWS:
            row.append(values[REFERENCE_COLUMNS.index(ref)] if ref else "—")
        rows.append(row)
    mean_row = ["**mean**"]
    for _, src in zs_cols:
        z = raw[src]["zero_shot_mean"]
        mean_row.append("n/a" if z is None else f"**{z:.2f}**")
    for m in inp.methods:
        mean_row.append(f"**{_acc(raw[m]['accuracy_mean'], raw[m]['accuracy_std'])}**")
    matched = [r for r in refs if r]
    for _, values in REFERENCE_ROWS:
        if len(matched) == len(refs):
            vals = [float(values[REFERENCE_COLUMNS.index(r)]) for r in matched]
            mean_row.append(f"{sum(vals) / len(vals):.2f}¹")
        else:
            mean_row.append("—")
    rows.append(mean_row)
    return header, rows


def _resource_rows(inp: _Inputs, raw: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method", "batch", "static (GiB)", "allocated after load (GiB)", "peak allocated (GiB)",
              "peak reserved (GiB)", "saved activations (GiB)", "step time (ms)", "training time (m:ss)",
              "study static (GB)²", "study peak (GB)²", "study time²"]
    rows = []
    for m in inp.methods:
        s = raw[m]
        static, alloc = _gib(s["static_bytes"]), _gib(s["static_allocated_bytes"])
        for b in inp.batches:
            p = s["profile"].get(b)
            if p is None:
                continue
            rows.append([f"{_label(m)} (`{m}`)", _batch_label(b), static, alloc,
                         _gib(p["peak_allocated_bytes"]), _gib(p["peak_reserved_bytes"]),
                         _gib(p["saved_activation_bytes"]), _ms(p["step_ms"]), "—",
                         STUDY_STATIC_GB.get(m, "—") if b == "b4x8" else "—",
                         STUDY_PEAK_GB.get((m, b), "—"), STUDY_TIME.get((m, b), "—")])
        rows.append([f"{_label(m)} (`{m}`)", f"{TRAIN_ROW}³", static, alloc,
                     _gib(s["peak_allocated_bytes"]), _gib(s["peak_reserved_bytes"]),
                     _gib(s["saved_activation_bytes"]), _ms(s["step_ms"]), _mmss(s["train_seconds"]),
                     "—", "—", "—"])
    return header, rows


def _study_table() -> str:
    header = ["method", "static (GB)", "peak 4x8 (GB)", "peak 32x1 (GB)", "training time 4x8"]
    rows = []
    for m in ("lora", "qlora", "qlora_gc"):
        peak4 = STUDY_PEAK_GB.get((m, "b4x8"), "—")
        if m == "qlora_gc":
            peak4 += f" (headline {STUDY_PEAK_GB[m, 'b1x32']} was the 1x32 run)"
        rows.append([_label(m), STUDY_STATIC_GB.get(m, "—"), peak4, STUDY_PEAK_GB.get((m, "b32x1"), "—"),
                     STUDY_TIME.get((m, "b4x8"), "—")])
    return _md_table(header, rows)


def _relpath(target: Path, start_dir: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(start_dir).resolve())).as_posix()


def render_report(inp: _Inputs, raw: dict, report_path: Path, pngs: dict[str, Path]) -> str:
    pre = raw["pretrained"]
    seeds = _n_seeds_text(inp.n_seeds)
    device = raw["device"]
    demo = "" if pre else " — random-init demo, NOT a result"
    lines = ["# LoRA vs QLoRA on CLIP: results", ""]
    if not pre:
        lines += [RANDOM_INIT_BANNER, ""]
    archs = sorted({str(p.get("arch")) for p in inp.profile.values() if p.get("arch")}
                   | {str(s.get("arch")) for s in inp.static.values() if s.get("arch")})
    lines += [f"Measured on **{device}**; architecture {', '.join(archs) or 'n/a'}; "
              f"datasets {', '.join(inp.datasets)}; {seeds} per dataset; "
              f"pretrained weights: **{'yes' if pre else 'no (random init)'}**.", ""]

    header, rows = _accuracy_rows(inp, raw)
    lines += [f"## Accuracy{demo}", "",
              f"Top-1 accuracy (%) on the full test split, mean ± std over {seeds}"
              f"{' (random-init weights: not a result)' if not pre else ''}. The last two columns are "
              "**quoted, not measured here** (protocol.md reference rows).", "",
              _md_table(header, rows), ""]
    lines += ["¹ Mean of the quoted per-dataset values over the datasets above, computed here from the quoted "
              "numbers." if all(_reference_column(d) for d in inp.datasets) else
              "The quoted columns have no mean row because not every dataset has a reference value.", ""]
    lines += ["### Reference rows (quoted, not measured here)", "",
              "ViT-B/16, 4 shots, top-1 %, as listed in protocol.md (the paper row is marked there "
              "'verify before quoting'; it was not re-verified by this stage).", "",
              _md_table(["source (quoted, not measured here)", *REFERENCE_COLUMNS],
                        [[name, *vals] for name, vals in REFERENCE_ROWS]), ""]

    header, rows = _resource_rows(inp, raw)
    lines += ["## Resources", "",
              f"Measured on **{device}**. Static = model memory after load (`static_bytes`; "
              "'allocated after load' is `torch.cuda.memory_allocated`). Peaks are "
              "`torch.cuda.max_memory_allocated` / `max_memory_reserved` after a reset just before the loop; "
              "n/a = not measured on this device. Batch rows come from the profile stage; the "
              f"'{TRAIN_ROW}' row from the training stage (peaks: max over datasets; step time: median, "
              "training time: per run, both averaged over datasets). GiB = 2³⁰ bytes.", "",
              _md_table(header, rows), "",
              f"² Quoted, not measured here: the original study's Table 1 ({STUDY_DEVICE}, {STUDY_DATASET}; "
              "its GB unit base is not stated). Its training times are for the 4x8 run.", "",
              "³ Measured during the training stage itself (same device).", "",
              f"### The original study's Table 1 (quoted, not measured here; {STUDY_DEVICE}, {STUDY_DATASET})", "",
              _study_table(), ""]

    lines += ["## What changed", ""]
    sentences = what_changed(raw, inp.batches)
    if sentences:
        lines += [f"- {s}" for s in sentences]
    else:
        lines += ["- No comparison: the baseline `lora` is not among the methods."]
    best = raw["best_method"]
    lines += [f"- Best mean accuracy: {_label(best)} (`{best}`), "
              f"{raw[best]['accuracy_mean']:.2f} %{' (random-init: not meaningful)' if not pre else ''}.", ""]

    lines += ["## Figures", ""]
    captions = {"accuracy": f"Accuracy per dataset and method{demo}",
                "memory": "Static vs peak memory per method (GiB)",
                "step_time": "Step time per method and batch configuration (ms)"}
    for key, png in pngs.items():
        lines += [f"![{captions[key]}]({_relpath(png, report_path.parent)})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------
# DVC plot data


def _read_loss(path: Path) -> list[tuple[float, float]]:
    if not path.exists():
        raise UserError(f"{path}: file not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        if not reader.fieldnames or "step" not in reader.fieldnames or "loss" not in reader.fieldnames:
            raise UserError(f"{path}: expected tab-separated columns 'step' and 'loss'")
        out = []
        for i, row in enumerate(reader, start=2):
            try:
                out.append((float(row["step"]), float(row["loss"])))
            except (TypeError, ValueError):
                raise UserError(f"{path}: line {i}: step and loss must be numbers") from None
    return out


def _loss_tables(inp: _Inputs, dvclive_dir: Path) -> dict[str, list[dict]]:
    """dataset -> rows {step, <method>: loss or null} with a column for every study method.

    DVC only plots a list whose records all have the same keys, hence nulls (Vega-Lite skips them) and
    the always-present columns. A log holding several runs (steps restarting) is averaged per step.
    """
    cols = list(dict.fromkeys([*STUDY_METHODS, *inp.methods]))
    tables = {}
    for d in inp.datasets:
        per_method: dict[str, dict[float, float]] = {}
        for m in inp.methods:
            acc: dict[float, list[float]] = {}
            # one DVCLive folder per seed (train writes dvclive/train/<method>/<dataset>/seed<k>/)
            logs = sorted((dvclive_dir / m / d).glob("seed*/plots/metrics/train/loss.tsv"))
            if not logs:  # named like the file a single seed would have, so the message points somewhere
                _read_loss(dvclive_dir / m / d / "seed1" / "plots" / "metrics" / "train" / "loss.tsv")
            for log in logs:
                for step, loss in _read_loss(log):
                    acc.setdefault(step, []).append(loss)
            per_method[m] = {s: sum(v) / len(v) for s, v in acc.items()}
        steps = sorted(set().union(*(set(v) for v in per_method.values())))
        rows = []
        for s in steps:
            row: dict[str, Any] = {"step": int(s) if float(s).is_integer() else s}
            for m in cols:
                v = per_method.get(m, {}).get(s)
                row[m] = None if v is None or math.isnan(v) else v
            rows.append(row)
        tables[d] = rows
    return tables


def _confusion_records(path: Path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list) or not all(
            isinstance(r, dict) and "actual" in r and "predicted" in r for r in data):
        raise UserError(f"{path}: expected a list of {{\"actual\": ..., \"predicted\": ...}} records")
    return [{"actual": r["actual"], "predicted": r["predicted"]} for r in data]


def _plot_records(inp: _Inputs, raw: dict) -> dict[str, list[dict]]:
    accuracy = [{"method": m, "dataset": d, "accuracy": inp.eval[m, d]["accuracy_mean"],
                 "std": inp.eval[m, d].get("accuracy_std") or 0.0, "label": f"{d} / {m}"}
                for d in inp.datasets for m in inp.methods]
    memory = []
    step_time = []
    for m in inp.methods:
        s = raw[m]
        measures = [("static", s["static_bytes"]), (f"peak allocated ({TRAIN_ROW})", s["peak_allocated_bytes"])]
        measures += [(f"peak allocated ({_batch_label(b)})", s["profile"][b]["peak_allocated_bytes"])
                     for b in inp.batches if b in s["profile"]]
        for measure, v in measures:
            if v is not None:
                memory.append({"method": m, "measure": measure, "bytes": v, "gib": v / GIB,
                               "label": f"{m} / {measure}"})
        times = [(_batch_label(b), s["profile"][b]["step_ms"]) for b in inp.batches if b in s["profile"]]
        times.append((TRAIN_ROW, s["step_ms"]))
        for batch, v in times:
            if v is not None:
                step_time.append({"method": m, "batch": batch, "step_ms": v, "label": f"{m} / {batch}"})
    return {"accuracy": accuracy, "memory": memory, "step_time": step_time}


# ---------------------------------------------------------------------------------------------------
# rich tables


def _rich_tables(inp: _Inputs, raw: dict) -> list[Table]:
    pre = raw["pretrained"]
    acc = Table(title=f"Accuracy (top-1 %, mean ± std over {_n_seeds_text(inp.n_seeds)})"
                      + ("" if pre else " — RANDOM-INIT, NOT A RESULT"))
    header, rows = _accuracy_rows(inp, raw)
    for i, h in enumerate(header):
        acc.add_column(h.replace("`", ""), justify="left" if i == 0 else "right")
    for r in rows:
        acc.add_row(*(c.replace("**", "") for c in r))
    res = Table(title=f"Resources on {raw['device']} (GiB, ms, m:ss; study columns quoted, not measured here)")
    header, rows = _resource_rows(inp, raw)
    for i, h in enumerate(header):
        res.add_column(h.replace("`", ""), justify="left" if i < 2 else "right")
    for r in rows:
        res.add_row(*(c.replace("`", "") for c in r))
    return [acc, res]


# ---------------------------------------------------------------------------------------------------
# the stage


def aggregate(methods: list[str], datasets: list[str], metrics_dir: Path, out_summary: Path,
              report_path: Path, plots_dir: Path, console: Console | None = None, *,
              plot_data_dir: Path | None = None, dvclive_dir: Path | None = None,
              confusion_dir: Path | None = None) -> dict:
    """Read every stage's metrics; write summary, report, figures and DVC plot data; return the summary.

    PNGs go to `plots_dir`. The data files that dvc.yaml's `plots:` declares go to `plot_data_dir`, default
    `<root>/plots` where `<root>` = `metrics_dir/..` (the repository root when metrics_dir is `metrics`),
    so they stay where the plot declarations expect them whatever `plots_dir` is. Loss logs are read from
    `dvclive_dir` (default `<root>/dvclive/train`), confusion records from `confusion_dir` (default
    `<root>/plots/confusion`).
    """
    metrics_dir, plots_dir = Path(metrics_dir), Path(plots_dir)
    out_summary, report_path = Path(out_summary), Path(report_path)
    root = metrics_dir.parent
    plot_data_dir = Path(plot_data_dir) if plot_data_dir is not None else root / "plots"
    dvclive_dir = Path(dvclive_dir) if dvclive_dir is not None else root / "dvclive" / "train"
    confusion_dir = Path(confusion_dir) if confusion_dir is not None else root / "plots" / "confusion"

    # read everything first, so that a missing input leaves every output untouched
    inp = _load(methods, datasets, metrics_dir)
    raw = build_summary(inp)
    best = raw["best_method"]
    confusion = {d: _confusion_records(confusion_dir / best / f"{d}.json") for d in inp.datasets}
    loss = _loss_tables(inp, dvclive_dir)
    summary = _clean(raw)

    # figures
    pre, device = raw["pretrained"], raw["device"]
    pngs = {"accuracy": plots_dir / "accuracy.png", "memory": plots_dir / "memory.png",
            "step_time": plots_dir / "step_time.png"}
    zs_col = _zero_shot_columns(inp)[0][1]
    figures.accuracy_figure(
        pngs["accuracy"], methods=inp.methods, datasets=inp.datasets,
        mean={m: {d: inp.eval[m, d]["accuracy_mean"] for d in inp.datasets} for m in inp.methods},
        std={m: {d: inp.eval[m, d].get("accuracy_std") or 0.0 for d in inp.datasets} for m in inp.methods},
        zero_shot={d: inp.eval[zs_col, d].get("zero_shot_accuracy") for d in inp.datasets},
        n_seeds_text=_n_seeds_text(inp.n_seeds), pretrained=pre)
    measures = ["static", f"peak allocated ({TRAIN_ROW})",
                *(f"peak allocated ({_batch_label(b)})" for b in inp.batches)]
    mem = {m: {"static": raw[m]["static_bytes"], measures[1]: raw[m]["peak_allocated_bytes"],
               **{f"peak allocated ({_batch_label(b)})": raw[m]["profile"].get(b, {}).get("peak_allocated_bytes")
                  for b in inp.batches}} for m in inp.methods}
    figures.memory_figure(pngs["memory"], methods=inp.methods, measures=measures, values=mem,
                          device=device, pretrained=pre)
    batches = [*(_batch_label(b) for b in inp.batches), TRAIN_ROW]
    times = {m: {**{_batch_label(b): raw[m]["profile"].get(b, {}).get("step_ms") for b in inp.batches},
                 TRAIN_ROW: raw[m]["step_ms"]} for m in inp.methods}
    figures.step_time_figure(pngs["step_time"], methods=inp.methods, batches=batches, values=times,
                             device=device, pretrained=pre)

    # DVC plot data
    for name, records in _plot_records(inp, raw).items():
        write_json(plot_data_dir / f"{name}.json", records)
    with atomic_dir(plot_data_dir / "loss") as tmp:
        for d, rows in loss.items():
            write_json(tmp / f"{d}.json", rows)
    with atomic_dir(plot_data_dir / "confusion_best") as tmp:
        for d, records in confusion.items():
            write_json(tmp / f"{d}.json", records)

    write_text(report_path, render_report(inp, raw, report_path, pngs))
    write_json(out_summary, summary)

    console = console or Console()
    for table in _rich_tables(inp, raw):
        console.print(table)
    return summary
