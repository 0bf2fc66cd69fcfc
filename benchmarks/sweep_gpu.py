"""Bookkeeping for benchmarks/sweep_gpu.sh: what nvidia-smi saw during a sweep, and the N-GPU vs 1-GPU table.

  python benchmarks/sweep_gpu.py finish SUMMARY.json APPS.txt OVERRIDES.yaml  # add GPU occupancy, machine facts
  python benchmarks/sweep_gpu.py report MULTI.json SINGLE.json OUT.md

APPS.txt is the sampler's output: a line `T <epoch seconds>` per sample, then one
`<pid>, <gpu uuid>, <used MiB>` line per compute process (nvidia-smi --query-compute-apps).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def occupancy(text: str) -> dict:
    """Per GPU: how many samples saw a process on it and the most processes seen on it at once; and any
    process seen on two GPUs (a stray CUDA context: it would take memory on a GPU it did not claim)."""
    samples: list[dict[str, set[str]]] = []
    for line in text.splitlines():
        if line.startswith("T "):
            samples.append(defaultdict(set))
        elif samples and line.count(",") >= 2 and line.split(",")[0].strip().isdigit():
            pid, uuid = (c.strip() for c in line.split(",")[:2])
            samples[-1][uuid].add(pid)
    gpus = sorted({u for s in samples for u in s})
    where = defaultdict(set)
    for s in samples:
        for uuid, pids in s.items():
            for pid in pids:
                where[pid].add(uuid)
    return {"samples": len(samples),
            "gpus": {u: {"busy_samples": sum(bool(s.get(u)) for s in samples),
                         "max_processes": max((len(s.get(u, ())) for s in samples), default=0)} for u in gpus},
            "pids_on_several_gpus": sorted(p for p, us in where.items() if len(us) > 1)}


def machine() -> dict:
    import datetime

    import dvc
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from clip_qlora.runtime.io import versions

    n = torch.cuda.device_count()
    return {"date": datetime.date.today().isoformat(), "gpus_visible": n,
            "gpu": torch.cuda.get_device_name(0) if n else "cpu", "versions": {**versions(), "dvc": dvc.__version__}}


def finish(summary_path: Path, apps_path: Path, overrides_path: Path) -> dict:
    s = json.loads(summary_path.read_text())
    s.update(machine())
    s["overrides"] = overrides_path.read_text()
    s["nvidia_smi"] = occupancy(apps_path.read_text() if apps_path.exists() else "")
    summary_path.write_text(json.dumps(s, indent=2) + "\n")
    return s


def report(multi: dict, single: dict) -> str:
    def row(name, r):
        occ = r.get("nvidia_smi", {})
        shared = max((g["max_processes"] for g in occ.get("gpus", {}).values()), default=None)
        return (f"| {name} | {r.get('gpus_visible')} | {r['jobs']} | {r['variants']} | "
                f"{sum(v == 'Success' for v in r['states'].values())} | {r['queue_wall_s']:.0f} | "
                f"{shared if shared is not None else 'n/a'} | {len(occ.get('pids_on_several_gpus', [])) or 'none'} |")

    lines = [f"# Sweep on DVC's experiment queue: {multi.get('gpus_visible')} GPUs vs 1",
             "", f"{multi.get('date')}, {multi.get('gpu')}; versions {json.dumps(multi.get('versions'))}.",
             f"Grid {' x '.join(multi['grid'])}, params.yaml with this laid over it:", "", "```yaml",
             (multi.get("overrides") or "").strip(), "```", "",
             "| run | GPUs | --jobs | variants | succeeded | wall (s) | most processes on one GPU | "
             "processes on two GPUs |", "|---|---|---|---|---|---|---|---|",
             row("all GPUs", multi), row("one GPU", single), ""]
    if multi.get("finished") and single.get("finished"):
        lines.append(f"Speed-up: {single['queue_wall_s'] / multi['queue_wall_s']:.2f}x "
                     f"on {multi.get('gpus_visible')} GPUs.")
    else:
        lines.append("A run did not finish (its wall time is up to when it stopped): no speed-up given.")
    lines += ["", "Wall time: from `dvc queue start` to the last variant's commit. Each run had a fresh project "
              "(own DVC cache and run-cache); its baseline (prepare, quantize) was built before the clock."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["finish"] and len(argv) == 4:
        finish(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    elif argv[:1] == ["report"] and len(argv) == 4:
        text = report(json.loads(Path(argv[1]).read_text()), json.loads(Path(argv[2]).read_text()))
        Path(argv[3]).write_text(text)
        print(text)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
