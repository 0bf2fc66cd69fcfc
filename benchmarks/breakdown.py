#!/usr/bin/env python
"""Where a training step's time and memory go, on CUDA: the kernels of one eager step, and the allocations
alive at the step's peak, grouped by the line that made them.

    python benchmarks/breakdown.py --method qlora_gc --batch 4 --what memory kernels

Runs our step (`clip_qlora.jobs.train.optimizer_step`, the step the train stage runs, eagerly) on ViT-B-16 with
random weights and synthetic inputs, like `run.py`. A diagnostic: it prints, it asserts nothing.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from clip_qlora.core.base import make_base, save_base  # noqa: E402
from clip_qlora.core.model import stand_in_quick_gelu  # noqa: E402
from clip_qlora.core import backends
from clip_qlora import config  # noqa: E402
from clip_qlora.jobs.profile import synthetic_prompts  # noqa: E402
from clip_qlora.core.step import build_run, optimizer_step, groups_of
from clip_qlora.core.graphs import make_step  # noqa: E402

MIB = 2 ** 20
OURS = ("clip_qlora", "open_clip", "peft", "bitsandbytes", "torch/nn/functional", "torch/utils/checkpoint")


def site(frames: list[dict]) -> str:
    """The innermost frame in a library that matters here, plus the innermost frame overall."""
    lib = next((f for f in frames if any(k in f["filename"] for k in OURS)), None)
    inner = frames[0] if frames else None

    def fmt(f):
        return f"{Path(f['filename']).name}:{f['line']}:{f['name']}" if f else "?"

    return fmt(lib) if lib is inner else f"{fmt(lib)} <- {fmt(inner)}"


def _group(blocks) -> list:
    groups = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for size, frames in blocks:
        g = groups[site(frames)]
        g[0] += size
        g[1] += 1
        g[2][size] += 1
    return sorted(groups.items(), key=lambda kv: -kv[1][0])


def _print_groups(groups, top: int) -> None:
    for name, (size, n, sizes) in groups[:top]:
        common = ", ".join(f"{c}x{s / MIB:.2f}" for s, c in sizes.most_common(3))
        print(f"  {size / MIB:8.1f} MiB  {n:5d} blocks  [{common} MiB]  {name}")


def persistent(step, top: int) -> None:
    """What the first step leaves allocated for good (optimizer state, library workspaces, caches)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live = {}
    for e in snap["device_traces"][torch.cuda.current_device()]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
        elif e["action"] in ("free_requested", "free_completed"):
            live.pop(e["addr"], None)
    print(f"allocated after load: {base / MIB:.1f} MiB; the first step leaves "
          f"{sum(s for s, _ in live.values()) / MIB:.1f} MiB more ({len(live)} blocks); "
          f"memory_allocated now {torch.cuda.memory_allocated() / MIB:.1f} MiB")
    _print_groups(_group(live.values()), top)


def memory_at_peak(step, top: int) -> None:
    """Replay the allocator's trace of one step and print what was alive when allocated bytes peaked."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][torch.cuda.current_device()]
    live, total, peak, at_peak = {}, 0, 0, {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    print(f"allocated before the step: {base / MIB:.1f} MiB; peak of the step: +{peak / MIB:.1f} MiB "
          f"(= {(base + peak) / 2**30:.4f} GiB); {len(at_peak)} blocks alive at the peak")
    _print_groups(_group(at_peak.values()), top)


def kernels(step, graph_step, top: int) -> None:
    """CUDA kernel time of one eager step by kernel name, and the replayed graph's wall time beside it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            d = by_name[e.name[:110]]
            d[0] += e.device_time_total
            d[1] += 1
    total = sum(v[0] for v in by_name.values())
    count = sum(v[1] for v in by_name.values())
    print(f"one eager step: {count} kernels/copies, {total / 1000:.2f} ms of GPU time")
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {us / 1000:7.3f} ms {100 * us / total:5.1f}%  {n:5d}x  {name}")
    if graph_step is not None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for i in range(10):
            torch.manual_seed(100 + i)
            start.record()
            graph_step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        print(f"graph replay: median {times[len(times) // 2]:.2f} ms (GPU events, 10 replays)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="lora", choices=tuple(backends.METHODS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-classes", type=int, default=100)
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--what", nargs="+", default=["memory", "kernels"], choices=("persistent", "memory", "kernels"))
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    p = config.load_with({"model.arch": a.arch})
    base = backends.METHODS[a.method].base
    with tempfile.TemporaryDirectory() as tmp:
        # built on the CPU: what building leaves in this process must not count as the step's memory
        model, meta = make_base(a.arch, "none", base, backends.get(base).settings(p), torch.bfloat16, "cpu",
                                stand_in_quick_gelu(a.arch, p.model))  # the study's activation
        save_base(model, meta, Path(tmp))
        del model
        torch.manual_seed(0)
        run = build_run(tmp, a.method, synthetic_prompts(a.n_classes), "cuda", 100, **groups_of(p))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(a.batch, 3, run.size, run.size, generator=g, device="cuda")
    y = torch.randint(0, a.n_classes, (a.batch,), generator=g, device="cuda")
    batches = [(x, y)]
    print(f"== {a.method} batch {a.batch}, {a.n_classes} classes, {a.arch}, {torch.cuda.get_device_name()}")
    if "persistent" in a.what:
        persistent(lambda: optimizer_step(run, batches), a.top)
    for i in range(3):  # warm-up: optimizer state, cuBLAS handles and workspaces exist before measuring
        torch.manual_seed(i)
        optimizer_step(run, batches)
    if "memory" in a.what:
        torch.cuda.reset_peak_memory_stats()
        memory_at_peak(lambda: optimizer_step(run, batches), a.top)
        print(f"max_memory_allocated over that step: {torch.cuda.max_memory_allocated() / 2**30:.4f} GiB")
    if "kernels" in a.what:
        step, mode = make_step(run, batches, True)
        kernels(lambda: optimizer_step(run, batches), (lambda: step(batches)) if mode == "cuda_graph" else None,
                a.top)


if __name__ == "__main__":
    main()
