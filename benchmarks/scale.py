#!/usr/bin/env python
"""The scale study on a GPU machine, and its results turned into the committed files.

    python benchmarks/scale.py measure --out DIR [--archs ViT-B-32,ViT-B-16] [--budget-s 450]
    python benchmarks/scale.py collect DIR [DIR ...]

`measure` runs exactly what `dvc repro scale@<arch>` runs (`clip_qlora.jobs.scale.measure_arch` with params.yaml),
for the architectures asked (default: scale.archs), and rewrites DIR/scale.json after every configuration,
so a run cut off at its time limit keeps what it measured. It starts no new configuration once --budget-s
seconds have passed (the architecture in progress is then marked incomplete), so a device call can be sized
to end inside its limit; the rest is measured by a second call with the remaining --archs.

`collect` reads one or more such folders (or scale.json files, or a benchmarks/results/*-scale.json that an
earlier `collect` wrote: its calls count as given again), checks that every architecture of
scale.archs is complete and was measured with params.yaml's settings, then writes what the pipeline would:
metrics/scale/<arch>.json (the scale@<arch> records, unchanged) and the scale_report outputs
(reports/scale.md, plots/scale/, plots/scale_figures/), plus benchmarks/results/<date>-<gpu>-scale.{json,md}
(date, GPU, driver, versions, commands, wall times, the issue's targets, the report) and the README's
figures docs/scale-memory.png and docs/scale-step-time.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT / "src") not in sys.path:  # runnable from a bare checkout
    sys.path.insert(0, str(ROOT / "src"))

GIB = 2**30
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


class OutOfBudget(Exception):
    pass


# ---- measure ------------------------------------------------------------------------------------------------

def environment() -> dict:
    """Versions and driver, read without touching CUDA (this process hands the work to fresh ones)."""
    from importlib import metadata

    import torch

    from clip_qlora.runtime.io import versions

    out = {**versions(), "cuda": torch.version.cuda}
    try:
        out["nvidia-ml-py"] = metadata.version("nvidia-ml-py")
        import pynvml

        pynvml.nvmlInit()
        out["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # no NVML here: the versions above still identify the run
        out.setdefault("nvidia-ml-py", None)
        out["driver"] = None
    return out


def measure(args) -> int:
    from clip_qlora import config
    from clip_qlora.core.base import resolve_device
    from clip_qlora.runtime.io import write_json
    from clip_qlora.jobs.scale import measure_arch, print_line

    p = config.load(args.params)
    archs = args.archs.split(",") if args.archs else list(p.scale.archs)
    for a in archs:
        config.require_member("archs", a, p.scale.archs)
    device = resolve_device(args.device or p.model.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "device": device,
           "command": " ".join(["python", "benchmarks/scale.py", *args.argv]), "environment": environment(),
           "scale": dataclasses.asdict(p.scale), "methods": list(p.methods), "archs": {}, "seconds": {},
           "wall_s": None, "complete": False}
    path = out / "scale.json"
    t0 = time.perf_counter()

    def on_result(record, method, spec, seconds):
        entry = run["archs"].setdefault(record["arch"], {"complete": False, "record": None})
        entry["record"] = record
        run["seconds"].setdefault(record["arch"], {})[f"{method}-{spec}"] = round(seconds, 1)
        run["wall_s"] = round(time.perf_counter() - t0, 1)
        write_json(path, run)
        print_line(record, method, spec, seconds)
        last = method == p.methods[-1] and spec == p.scale.batches[-1]  # the architecture is then complete
        if not last and time.perf_counter() - t0 > args.budget_s:
            raise OutOfBudget

    log(f"scale: {', '.join(archs)} on {device}; {len(archs) * len(p.methods) * len(p.scale.batches)} "
        f"configurations, budget {args.budget_s:.0f} s; results in {path}")
    stopped = False
    for arch in archs:
        if run["archs"] and time.perf_counter() - t0 > args.budget_s:  # the first always starts
            log(f"scale: budget of {args.budget_s:.0f} s spent before {arch}: stopped")
            stopped = True
            break
        try:
            record = measure_arch(p, arch, device, on_result=on_result, keep_going=True)
        except OutOfBudget:
            log(f"scale: budget of {args.budget_s:.0f} s spent during {arch}: stopped (marked incomplete)")
            stopped = True
            break
        run["archs"][arch] = {"complete": True, "record": record}
        run["wall_s"] = round(time.perf_counter() - t0, 1)
        write_json(path, run)
        log(f"scale: {arch} done")
    run["complete"] = not stopped and all(run["archs"].get(a, {}).get("complete") for a in archs)
    write_json(path, run)
    errors = [f"{a} {m} {b}" for a, e in run["archs"].items() for m, per in e["record"]["methods"].items()
              for b, c in per.items() if isinstance(c, dict) and "error" in c]
    if errors:
        log(f"scale: configurations that failed: {', '.join(errors)}")
    left = [a for a in archs if not run["archs"].get(a, {}).get("complete")]
    if left:
        log(f"scale: not complete: {', '.join(left)}; measure them with --archs {','.join(left)}")
    return 0 if run["complete"] and not errors else 1


# ---- collect ------------------------------------------------------------------------------------------------

def _runs(sources: list[str]) -> list[dict]:
    from clip_qlora.runtime.io import UserError, read_json

    runs = []
    for s in sources:
        path = Path(s) / "scale.json" if Path(s).is_dir() else Path(s)
        data = read_json(path)
        if isinstance(data, dict) and "calls" in data and "archs" in data:
            runs.extend(_committed_calls(data, path))
            continue
        if not isinstance(data, dict) or "archs" not in data:
            raise UserError(f"{path}: not a scale.json written by `benchmarks/scale.py measure` nor a "
                            f"benchmarks/results/*-scale.json written by `collect`")
        data["_path"] = str(path)
        runs.append(data)
    return runs


def _committed_calls(data: dict, path: Path) -> list[dict]:
    """A results file `collect` wrote, read back as the device calls it was collected from (each with the
    architectures it supplied), so a later call can add architectures without the earlier raw folders."""
    runs = []
    for call in data["calls"]:
        runs.append({"command": call["command"], "date": call["date"], "wall_s": call["wall_s"],
                     "seconds": call["seconds"], "environment": data["environment"], "_path": str(path),
                     "archs": {a: {"complete": True, "record": data["archs"][a]} for a in call["archs"]}})
    return runs


def _check(rec: dict, p, where: str) -> None:
    """The record must be what scale@<arch> would write with these params."""
    from clip_qlora.runtime.io import UserError

    want = {"batches": list(p.scale.batches), "n_classes": p.scale.n_classes, "warmup": p.scale.warmup,
            "steps": p.scale.steps, "lora": dataclasses.asdict(p.lora)}
    for k, v in want.items():
        if rec.get(k) != v:
            raise UserError(f"{where}: measured with {k} = {rec.get(k)!r}, params.yaml says {v!r}; measure again "
                            f"or restore the params")
    if list(rec["methods"]) != list(p.methods):
        raise UserError(f"{where}: measured methods {list(rec['methods'])}, params.yaml lists {p.methods}")
    bad = [f"{m} {b}" for m, per in rec["methods"].items() for b, c in per.items()
           if isinstance(c, dict) and "error" in c]
    if bad:
        raise UserError(f"{where}: configurations that failed ({', '.join(bad)}); measure this architecture again")


def _verdict(name: str, value, limit, detail: str) -> dict:
    status = "n/a" if value is None else ("met" if value <= limit else "MISSED")
    return {"target": name, "status": status, "value": value, "limit": limit, "detail": detail}


def targets(records: dict, p) -> list[dict]:
    """The issue's targets, computed from the records (n/a where the architecture was not measured)."""
    n_want = len(p.scale.archs) * len(p.methods) * len(p.scale.batches)
    n = sum(1 for r in records.values() for per in r["methods"].values() for k, c in per.items()
            if k.startswith("b") and isinstance(c, dict) and isinstance(c.get("fits"), bool))
    devices = sorted({r["device"] for r in records.values()})
    one_h200 = len(devices) == 1 and "H200" in devices[0]
    out = [{"target": f"all {n_want} measurements on one H200", "status":
            "met" if n == n_want and one_h200 else "MISSED", "value": n, "limit": n_want,
            "detail": f"{n} of {n_want} configurations measured (fitting or not) on {', '.join(devices)}"}]
    big = records.get("ViT-bigG-14")
    c = (big or {}).get("methods", {}).get("qlora_gc", {}).get("b4x8")
    v = None if not c or not c.get("fits") or c.get("driver_bytes") is None else c["driver_bytes"] / GIB
    out.append(_verdict("qlora_gc on ViT-bigG-14 at 4x8 within 4 GiB as the driver reports it", v, 4.0,
                        "not measured" if v is None else f"driver {v:.3f} GiB (peak allocated "
                        f"{c['peak_allocated_bytes'] / GIB:.3f} GiB) vs 4 GiB"))
    base = [c.get("baseline_allocated_bytes") for r in records.values() for per in r["methods"].values()
            for k, c in per.items() if k.startswith("b") and isinstance(c, dict) and c.get("fits")]
    dirty = [b for b in base if b not in (0, None)]
    out.append({"target": "every configuration measured from an empty allocator (a fresh process)",
                "status": "n/a" if all(b is None for b in base) else ("MISSED" if dirty else "met"),
                "value": max(dirty, default=0), "limit": 0,
                "detail": f"{len(base) - len(dirty)} of {len(base)} configurations started with 0 bytes allocated"})
    builds = [c["base_build_seconds"] for per in (big or {}).get("methods", {}).values()
              for k, c in per.items() if k.startswith("b") and isinstance(c, dict) and c.get("fits")]
    v = max(builds) if builds else None
    out.append(_verdict("a ViT-bigG-14 base ready in at most 60 s", v, 60.0,
                        "not measured" if v is None else f"slowest of {len(builds)} builds {v:.1f} s "
                        f"(construction, initialisation and quantization on the device)"))
    return out


def _renamed(record: dict) -> dict:
    """Records measured before the base's bytes on the device were named apart from the stored base's
    (`static_bytes` -> `device_base_bytes`, the same quantity): read under the current name."""
    for method in record.get("methods", {}).values():
        for cfg in method.values():
            if isinstance(cfg, dict) and "static_bytes" in cfg:
                cfg["device_base_bytes"] = cfg.pop("static_bytes")
    return record


def collect(args) -> int:
    from clip_qlora import config
    from clip_qlora.metrics import Scale
    from clip_qlora.report import scale as scale_report
    from clip_qlora.runtime.io import UserError, write_json, write_text

    p = config.load(args.params)
    runs = _runs(args.sources)
    records, used = {}, {}
    for run in runs:  # a later complete record of an architecture replaces an earlier one
        for arch, entry in run["archs"].items():
            if entry.get("complete"):
                records[arch], used[arch] = _renamed(entry["record"]), run
    missing = [a for a in p.scale.archs if a not in records]
    if missing:
        raise UserError(f"no complete record of {', '.join(missing)} in {', '.join(r['_path'] for r in runs)}; "
                        f"measure them with --archs {','.join(missing)}")
    for a in p.scale.archs:
        _check(records[a], p, f"{used[a]['_path']}: {a}")
    for a in p.scale.archs:
        write_json(Scale.path(a), records[a])  # as measured: the report checks them on reading
    text = scale_report.report(p)  # reads the files just written, as `dvc repro scale_report` would
    gpus = sorted({records[a]["device"] for a in p.scale.archs})
    date = min(used[a]["date"] for a in p.scale.archs)
    stem = f"{date}-{slug(gpus[0])}-scale" + (f"-{args.tag}" if args.tag else "")
    env = used[p.scale.archs[0]]["environment"]
    t = targets({a: records[a] for a in p.scale.archs}, p)
    calls = [{"command": r["command"], "date": r["date"], "wall_s": r["wall_s"],
              "archs": [a for a in p.scale.archs if used[a] is r], "seconds": r["seconds"]}
             for r in runs if any(used[a] is r for a in p.scale.archs)]
    results = Path(args.results)
    write_json(results / f"{stem}.json", {"date": date, "gpu": gpus, "environment": env, "calls": calls,
                                          "targets": t, "archs": {a: records[a] for a in p.scale.archs}})
    v = env
    head = [f"# The scale study on {', '.join(gpus)} ({date})", "",
            f"Versions: torch {v.get('torch')} (CUDA {v.get('cuda')}), open_clip {v.get('open_clip')}, peft "
            f"{v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}, nvidia-ml-py {v.get('nvidia-ml-py')}; "
            f"driver {v.get('driver')}. Params: params.yaml's `scale` group and methods "
            f"({', '.join(p.methods)}).", "",
            "Device calls (each `benchmarks/scale_gpu.sh` through the device tool):", "",
            *(f"- `{c['command']}`: {', '.join(c['archs'])} in {c['wall_s']} s of measuring" for c in calls), "",
            "## Targets (issue 15)", "",
            *(f"- **{x['status']}**: {x['target']}: {x['detail']}" for x in t), "",
            "The rest is reports/scale.md as `scale_report` writes it from these records "
            "(metrics/scale/<arch>.json).", "", "---", ""]
    write_text(results / f"{stem}.md", "\n".join(head) + text + "\n")
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile("plots/scale_figures/memory.png", docs / "scale-memory.png")
    shutil.copyfile("plots/scale_figures/step_time.png", docs / "scale-step-time.png")
    for x in t:
        log(f"target {x['status']}: {x['target']}: {x['detail']}")
    log(f"wrote metrics/scale/*.json, reports/scale.md, plots/scale*, {results / stem}.json/.md, "
        f"{docs}/scale-memory.png, {docs}/scale-step-time.png")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="measure (GPU machine); DIR/scale.json after every configuration")
    m.add_argument("--out", required=True)
    m.add_argument("--archs", default="", help="comma-separated, from scale.archs (default: all of them)")
    m.add_argument("--budget-s", type=float, default=450.0,
                   help="start no configuration after this many seconds of measuring")
    m.add_argument("--device", default="", help="default: model.device of params")
    m.add_argument("--params", default=str(ROOT / "params.yaml"))
    c = sub.add_parser("collect", help="results -> metrics/scale, the report, benchmarks/results, docs figures")
    c.add_argument("sources", nargs="+", help="folders holding scale.json, or scale.json files")
    c.add_argument("--params", default="params.yaml")
    c.add_argument("--results", default=str(HERE / "results"))
    c.add_argument("--docs", default="docs")
    c.add_argument("--tag", default="", help="suffix of the result files' stem (a second run on one day)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    args.argv = argv
    from clip_qlora.runtime.io import UserError

    try:
        return measure(args) if args.cmd == "measure" else collect(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
