#!/usr/bin/env python
"""Our training step against the plain recipe, side by side, in one process.

    python benchmarks/run.py --arch ViT-B-16 --device cuda --batches 4 32 --steps 30 --warmup 5 \
        --n-classes 100 --out benchmarks/results

For each method (lora, lora_gc, qlora, qlora_gc) and micro-batch (no accumulation) it measures the plain recipe
(`plain.py`) and ours (`clip_qlora.jobs.profile.measure` on a base built by `clip_qlora.core.base.make_base`), then writes
`<out>/<date>-<gpu-slug>.json` and a markdown summary beside it (tables, ratios ours/plain, target verdicts).
Both files are rewritten after every row, so an interrupted run still leaves what it measured.
See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import re
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Runnable from a bare checkout: our package from src/, the plain recipe from this folder.
for _p in (str(HERE), str(ROOT / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from clip_qlora.core.backends import METHODS  # noqa: E402  (the method table only: imports no torch)

METHOD_ORDER = tuple(METHODS)
GIB = 2 ** 30
# Modules the run needs beyond torch; pip names for the message when one is missing.
REQUIRED = {"torchvision": "torchvision", "ftfy": "ftfy", "regex": "regex", "open_clip": "open_clip_torch",
            "bitsandbytes": "bitsandbytes", "peft": "peft", "rich": "rich", "safetensors": "safetensors",
            "yaml": "pyyaml"}

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def preflight() -> None:
    missing = []
    for mod, pip_name in REQUIRED.items():
        try:
            importlib.import_module(mod)
        except Exception as e:  # ImportError, or a broken native library (bitsandbytes)
            missing.append(f"{mod} (pip: {pip_name}; {type(e).__name__}: {e})")
    if missing:
        print("benchmarks/run.py: missing or broken modules:\n  " + "\n  ".join(missing), file=sys.stderr, flush=True)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="ViT-B-16", help="open_clip architecture (ViT-B-16) or the shipped clip-tiny")
    ap.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                    help="compute dtype; auto = bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 32], help="micro-batch sizes (accumulation 1)")
    ap.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), choices=METHOD_ORDER)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    ap.add_argument("--n-classes", type=int, default=100)
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for <date>-<gpu>.json and .md")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch's default); 1 keeps a CPU smoke test fast on a busy machine")
    ap.add_argument("--recipes", nargs="+", default=["ours", "plain"], choices=("ours", "plain"),
                    help="measure only one side (a sweep of ours); ratios and targets need both")
    ap.add_argument("--cublas-workspace-kib", type=int, default=None,
                    help="ours: runtime.cublas_workspace_kib (default: params' 1024; 0 = torch's); plain keeps torch's")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="ours: override a params.yaml key (repeatable), e.g. --set runtime.overlap_text=false")
    ap.add_argument("--tag", default="", help="suffix for the file stem (e.g. a second run on the same day)")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 1 or a.n_classes < 2 or min(a.batches) < 1:
        ap.error("--steps, --warmup and --batches must be >= 1, --n-classes >= 2")
    return a


# ---- one configuration ----------------------------------------------------------------------------------

def free(device: str) -> None:
    """Drop everything the previous configuration left so its peaks cannot leak into the next row."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gib(b):
    return None if b is None else b / GIB


def to_row(m: dict, baseline: int | None) -> dict:
    """One recipe's measurement in the result file's units (GiB, ms) plus the exact integers behind them."""
    return {
        "static_gib": _gib(m["device_base_bytes"]),              # exact frozen-weight bytes on the device
        "allocated_gib": _gib(m["memory_allocated_bytes"]),      # memory_allocated after load (CUDA only)
        "peak_gib": _gib(m["peak_allocated_bytes"]),             # max_memory_allocated over the timed steps
        "reserved_gib": _gib(m["peak_reserved_bytes"]),          # max_memory_reserved over the timed steps
        "step_ms": m["step_ms"],                                 # median, synchronised
        "step_mode": m.get("step_mode", "eager"),                # cuda_graph or eager
        "saved_activation_gib": _gib(m["saved_activation_bytes"]),
        "baseline_gib": _gib(baseline),  # allocated before the build: process-wide (cuBLAS workspace, leaks)
        "static_bytes": int(m["device_base_bytes"]),  # (the profile's device_base_bytes)
        "saved_activation_bytes": int(m["saved_activation_bytes"]),
        "trainable_params": int(m["trainable_params"]),
        "trainable_bytes": int(m["trainable_bytes"]),
    }


def measure_one(label: str, call, fn, args: tuple, device: str) -> dict:
    """call(fn, *args): a clip_qlora.runtime.processes.FreshProcesses, a fresh process on CUDA: peaks cannot leak across
    rows."""
    from clip_qlora.core.memory import allocated_bytes

    free(device)
    baseline = allocated_bytes(device)
    t0 = time.perf_counter()
    try:
        row = to_row(call(fn, *args), baseline)
    except Exception as e:  # an OOM or a broken recipe: record it, keep measuring the rest
        traceback.print_exc()
        sys.stderr.flush()
        row = {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        free(device)
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    if "error" in row:
        log(f"  {label}: FAILED ({row['error']})")
    else:
        log(f"  {label}: static {row['static_gib']:.4f} GiB, peak {_fmt(row['peak_gib'], 3)} GiB, "
            f"reserved {_fmt(row['reserved_gib'], 3)} GiB, saved act {row['saved_activation_gib']:.4f} GiB, "
            f"step {row['step_ms']:.1f} ms, trainable {row['trainable_params']} ({row['wall_s']:.0f} s)")
    return row


# ---- environment ------------------------------------------------------------------------------------------

def versions() -> dict:
    import torch

    out = {"torch": torch.__version__}
    for key, mod in (("open_clip", "open_clip"), ("peft", "peft"), ("bitsandbytes", "bitsandbytes")):
        try:
            out[key] = importlib.import_module(mod).__version__
        except Exception:
            out[key] = None
    out["cuda"] = torch.version.cuda
    return out


def gpu_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ---- verdicts and reports --------------------------------------------------------------------------------

def _fmt(v, nd=3):
    return "—" if v is None else f"{v:.{nd}f}"


def _ours(rows, method, batch, field):
    r = rows.get(f"{method}-b{batch}", {}).get("ours", {})
    return r.get(field)


def _plain(rows, method, batch, field):
    r = rows.get(f"{method}-b{batch}", {}).get("plain", {})
    return r.get(field)


def _verdict(name: str, value, limit, detail: str) -> dict:
    """value <= limit -> met; None on either side -> n/a (with the reason in detail)."""
    if value is None or limit is None:
        return {"target": name, "status": "n/a", "value": value, "limit": limit, "detail": detail}
    ok = value <= limit
    return {"target": name, "status": "met" if ok else "MISSED", "value": value, "limit": limit, "detail": detail}


def check_targets(rows: dict, batches: list[int], device: str) -> list[dict]:
    """The study's targets (H200, batch 32, 100 classes), computed from the measured rows."""
    out = []
    big = 32 if 32 in batches else max(batches)
    at = f"batch {big}" + ("" if big == 32 else " (batch 32 not measured)")
    why_mem = "no allocator figures off CUDA" if not device.startswith("cuda") else "not measured"

    plain_lora = _plain(rows, "lora", big, "step_ms")
    ours_lora = _ours(rows, "lora", big, "step_ms")
    ours_q = _ours(rows, "qlora", big, "step_ms")
    ours_qgc = _ours(rows, "qlora_gc", big, "step_ms")

    def ms(v):
        return _fmt(v, 1) + " ms"

    lim = None if plain_lora is None else 0.25 * plain_lora
    out.append(_verdict("ours lora step <= 0.25 x plain lora step", ours_lora, lim,
                        f"{at}: ours {ms(ours_lora)} vs 0.25 x plain {ms(plain_lora)} = {ms(lim)}"
                        + ("" if None in (ours_lora, plain_lora) else f" (ratio {ours_lora / plain_lora:.3f})")))
    lim = None if ours_lora is None else 1.15 * ours_lora
    out.append(_verdict("ours qlora step <= 1.15 x ours lora step", ours_q, lim,
                        f"{at}: qlora {ms(ours_q)} vs 1.15 x lora {ms(ours_lora)} = {ms(lim)}"
                        + ("" if None in (ours_q, ours_lora) else f" (ratio {ours_q / ours_lora:.3f})")))
    lim = None if ours_lora is None else 1.5 * ours_lora
    out.append(_verdict("ours qlora_gc step <= 1.5 x ours lora step", ours_qgc, lim,
                        f"{at}: qlora_gc {ms(ours_qgc)} vs 1.5 x lora {ms(ours_lora)} = {ms(lim)}"
                        + ("" if None in (ours_qgc, ours_lora) else f" (ratio {ours_qgc / ours_lora:.3f})")))
    for b, limit in ((big, 0.30), (4, 0.15)):
        v = _ours(rows, "qlora_gc", b, "peak_gib")
        why = "batch 4 not measured" if b not in batches else why_mem
        where = at if b == big else "batch 4"
        out.append(_verdict(f"ours qlora_gc peak <= {limit:.2f} GiB at batch {32 if b == big else 4}", v, limit,
                            f"{where}: peak {_fmt(v, 4)} GiB vs {limit:.2f} GiB" + ("" if v is not None else
                                                                                   f" ({why})")))
    # ours qlora peak <= ours lora peak at every batch: the worst (largest) ratio decides
    pairs = [(b, _ours(rows, "qlora", b, "peak_gib"), _ours(rows, "lora", b, "peak_gib")) for b in batches]
    parts = [f"b{b}: {_fmt(q, 4)} vs {_fmt(lo, 4)} GiB" for b, q, lo in pairs]
    known = [(q / lo, b) for b, q, lo in pairs if q is not None and lo is not None and lo > 0]
    if len(known) < len(pairs):
        out.append(_verdict("ours qlora peak <= ours lora peak at every batch", None, 1.0,
                            "; ".join(parts) + f" ({why_mem})"))
    else:
        worst = max(known)
        out.append(_verdict("ours qlora peak <= ours lora peak at every batch", worst[0], 1.0,
                            "; ".join(parts) + f" (worst ratio {worst[0]:.3f} at batch {worst[1]})"))
    # static: exact frozen-weight bytes (allocator-independent); the allocator's after-load figure shown beside
    st = [(_ours(rows, "qlora", b, "static_gib"), _ours(rows, "qlora", b, "allocated_gib"), b) for b in batches]
    st = [s for s in st if s[0] is not None]
    v = max(s[0] for s in st) if st else None
    alloc = st[0][1] if st else None
    out.append(_verdict("ours qlora static <= 0.110 GiB", v, 0.110,
                        f"exact frozen-weight bytes on the device {_fmt(v, 4)} GiB vs 0.110 GiB "
                        f"(memory_allocated after load, adapters and prompts included: {_fmt(alloc, 4)} GiB)"))
    return out


RECIPES = ("ours", "plain")
SHOW = (("static_gib", "static GiB", 4), ("allocated_gib", "alloc GiB", 4), ("peak_gib", "peak GiB", 3),
        ("reserved_gib", "reserved GiB", 3), ("saved_activation_gib", "saved act GiB", 4), ("step_ms", "step ms", 1))
RATIOS = (("static_gib", "static"), ("peak_gib", "peak"), ("reserved_gib", "reserved"),
          ("saved_activation_gib", "saved act"), ("step_ms", "step"))


def ratio(rows: dict, key: str, field: str):
    o, p = rows[key].get("ours", {}).get(field), rows[key].get("plain", {}).get(field)
    if o is None or p is None or p == 0:
        return None
    return o / p


def markdown(res: dict) -> str:
    c, rows = res["config"], res["rows"]
    v = res["versions"]
    act = {"quick_gelu": "QuickGELU", "gelu": "GELU"}.get(c.get("activation"), "")
    lines = [f"# Ours vs the plain recipe: {c['arch']} on {res['gpu']} ({res['date']})", "",
             *([f"Ours builds the activation the study trains: {act} (`model.quick_gelu` for `model.pretrained`; "
                f"plain.py keeps open_clip's default for random weights)."] if act else []), "",
             f"{len(rows)} configurations{'' if res['complete'] else ' so far (run not finished)'}; "
             f"{c['n_classes']} classes, micro-batch = batch (no accumulation), compute dtype {c['compute_dtype']}, "
             f"{c['warmup']} warm-up + {c['steps']} timed steps each; step = median of the timed steps, "
             f"synchronised, in the step mode shown; peak/reserved = allocator maxima over {c['steps']} eager "
             f"steps after the warm-up (ours: the same arithmetic as its CUDA-graph step, bitwise, since a "
             f"replayed graph bypasses the allocator's statistics).", "",
             f"Versions: torch {v['torch']} (CUDA {v['cuda']}), open_clip {v['open_clip']}, peft {v['peft']}, "
             f"bitsandbytes {v['bitsandbytes']}. Command: `{c['command']}`", "",
             f"Ours ran with cuBLAS/cuBLASLt workspaces of "
             + (f"{c['cublas_workspace_kib']} KiB" if c.get("cublas_workspace_kib") else "torch's default size")
             + " (`runtime.cublas_workspace_kib`)"
             + (f" and `{'`, `'.join(c['set'])}`" if c.get("set") else "") + "; the plain recipe with torch's defaults.",
             "", "## Measurements", "",
             "| row | recipe | " + " | ".join(h for _, h, _ in SHOW) + " | step mode | trainable |",
             "|---|---|" + "---|" * len(SHOW) + "---|---|"]
    for key, r in rows.items():
        for rec in RECIPES:
            m = r.get(rec, {})
            if "error" in m:
                lines.append(f"| {key} | {rec} | failed: {m['error'][:120]} |" + " |" * (len(SHOW) + 1))
                continue
            lines.append(f"| {key} | {rec} | " + " | ".join(_fmt(m.get(f), nd) for f, _, nd in SHOW)
                         + f" | {m.get('step_mode', '—')} | {m.get('trainable_params', '—')} |")
    lines += ["", "## Ratios ours / plain", "", "| row | " + " | ".join(h for _, h in RATIOS) + " |",
              "|---|" + "---|" * len(RATIOS)]
    for key in rows:
        lines.append(f"| {key} | " + " | ".join(_fmt(ratio(rows, key, f), 3) for f, _ in RATIOS) + " |")
    lines += ["", "## Targets", ""]
    if not (c["arch"] == "ViT-B-16" and c["n_classes"] == 100 and "h200" in res["gpu"].lower()):
        lines += [f"The targets are defined for ViT-B-16 on an H200 with 100 classes; this run is {c['arch']} on "
                  f"{res['gpu']} with {c['n_classes']} classes, so these verdicts are indicative only.", ""]
    for t in res["targets"]:
        lines.append(f"- **{t['status']}** — {t['target']}: {t['detail']}")
    lines += ["", "static = exact bytes of the frozen weights on the device (parameters, buffers and bitsandbytes "
              "quantization state, each storage once; ours keeps the token-embedding table on the host); alloc = `memory_allocated` right after the model, adapters, optimizer and "
              "prompts are on the device. Absolute times move by ~1.5x between machines of the same kind: compare "
              "ratios from one run.", ""]
    return "\n".join(lines)


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ours vs plain — {res['config']['arch']} on {res['gpu']}")
    t.add_column("row")
    for f, h, _ in SHOW:
        if f in ("static_gib", "peak_gib", "step_ms"):
            t.add_column(f"{h} ours", justify="right")
            t.add_column(f"{h} plain", justify="right")
            t.add_column("ratio", justify="right")
    for key, r in res["rows"].items():
        cells = [key]
        for f, _, nd in SHOW:
            if f in ("static_gib", "peak_gib", "step_ms"):
                cells += [_fmt(r.get("ours", {}).get(f), nd), _fmt(r.get("plain", {}).get(f), nd),
                          _fmt(ratio(res["rows"], key, f), 3)]
        t.add_row(*cells)
    con = Console(width=160)
    con.print(t)
    for x in res["targets"]:
        con.print(f"{x['status']:>6}  {x['target']}: {x['detail']}", highlight=False)
    sys.stdout.flush()


def write_outputs(res: dict, out_dir: Path, stem: str) -> Path:
    from clip_qlora.runtime.io import write_json, write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{stem}.json", res)
    write_text(out_dir / f"{stem}.md", markdown(res))
    return out_dir / f"{stem}.json"


# ---- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    preflight()
    import torch

    from plain import measure_plain

    from clip_qlora.core import backends
    from clip_qlora.core.base import make_base, resolve_device, resolve_dtype, save_base
    from clip_qlora import config
    from clip_qlora.runtime.io import UserError
    from clip_qlora.core.model import register_configs, stand_in_quick_gelu
    from clip_qlora.core.step import groups_of
    from clip_qlora.runtime.processes import FreshProcesses
    from clip_qlora.jobs.profile import measure

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    register_configs()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    methods = [m for m in METHOD_ORDER if m in args.methods]
    batches = sorted(set(args.batches))
    gpu = gpu_name(device)
    date = datetime.date.today().isoformat()
    stem = f"{date}-{slug(gpu)}" + (f"-{slug(args.tag)}" if args.tag else "")
    out_dir = Path(args.out)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    res = {"date": date, "gpu": gpu, "versions": versions(),
           "config": {"arch": args.arch, "device": device, "compute_dtype": str(dtype).removeprefix("torch."),
                      "batches": batches, "methods": methods, "steps": args.steps, "warmup": args.warmup,
                      "n_classes": args.n_classes, "grad_accum": 1,
                      "cublas_workspace_kib": args.cublas_workspace_kib, "recipes": args.recipes, "set": args.set, "torch_threads": torch.get_num_threads(),
                      "command": command},
           "complete": False, "rows": {}, "targets": []}
    log(f"{args.arch} on {gpu} ({device}, {res['config']['compute_dtype']}); methods {methods}, batches {batches}, "
        f"{args.warmup}+{args.steps} steps, {args.n_classes} classes -> {out_dir / stem}.json")
    log(f"versions: {res['versions']}")

    import yaml

    # ours runs with the study's params.yaml (the one home of every value) plus the overrides asked for
    overrides = {}
    if args.cublas_workspace_kib is not None:
        overrides["runtime.cublas_workspace_kib"] = args.cublas_workspace_kib
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    try:
        params = config.load_with(overrides)
    except UserError as e:
        raise SystemExit(f"--set/--cublas-workspace-kib: {e}") from None
    res["config"]["cublas_workspace_kib"] = params.runtime.cublas_workspace_kib  # what ours ran with
    quick_gelu = stand_in_quick_gelu(args.arch, params.model)  # the activation the study trains (ours only)
    res["config"]["activation"] = "quick_gelu" if quick_gelu else "gelu"
    failed = False
    # ahead=0: no spare process imports while a row is measured (the rows' step times are the benchmark's)
    with tempfile.TemporaryDirectory(prefix="clip-qlora-bench-") as tmp, FreshProcesses(device, ahead=0) as call:
        base_dirs = {}
        for base in sorted({METHODS[m].base for m in methods} if "ours" in args.recipes else ()):
            t0 = time.perf_counter()
            try:
                model, meta = make_base(args.arch, "none", base, backends.get(base).settings(params), dtype, device,
                                        quick_gelu)
                save_base(model, meta, Path(tmp) / base)
                del model
                base_dirs[base] = Path(tmp) / base
                log(f"our {base} base built and saved ({time.perf_counter() - t0:.1f} s)")
            except Exception as e:  # ours cannot be measured on this base; the plain recipe still can
                traceback.print_exc()
                base_dirs[base] = RuntimeError(f"building our {base} base failed: {type(e).__name__}: {e}")
                log(str(base_dirs[base]))
            free(device)


        n, i = len(methods) * len(batches), 0
        for method in methods:
            for b in batches:
                i += 1
                key = f"{method}-b{b}"
                log(f"[{i}/{n}] {key}")
                plain_row = {"error": "not measured (--recipes)"}
                if "plain" in args.recipes:
                    plain_row = measure_one("plain", call, measure_plain, (
                        method, args.arch, b, 1, args.n_classes, args.warmup, args.steps, device, dtype), device)
                base_dir = base_dirs.get(METHODS[method].base)
                if "ours" not in args.recipes:
                    ours_row = {"error": "not measured (--recipes)"}
                elif isinstance(base_dir, Exception):
                    ours_row = {"error": str(base_dir)}
                else:
                    ours_row = measure_one("ours ", call, measure, (method, base_dir, b, 1, args.n_classes,
                                                                     args.warmup, args.steps, device,
                                                                     groups_of(params)), device)
                failed |= any("error" in r and "--recipes" not in r["error"] for r in (plain_row, ours_row))
                res["rows"][key] = {"ours": ours_row, "plain": plain_row}
                r = {f: ratio(res["rows"], key, f) for f in ("peak_gib", "step_ms")}
                log(f"  ratio ours/plain: peak {_fmt(r['peak_gib'])}, step {_fmt(r['step_ms'])}")
                res["targets"] = check_targets(res["rows"], batches, device)
                write_outputs(res, out_dir, stem)
    res["complete"] = True
    res["targets"] = check_targets(res["rows"], batches, device)
    path = write_outputs(res, out_dir, stem)
    print_table(res)
    log(f"wrote {path} and {path.with_suffix('.md')}")
    if failed:
        log("some configurations failed (see 'error' in the rows)")
    res["failed"] = failed
    res["path"] = str(path)
    return res


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result.get("failed") else 0)
