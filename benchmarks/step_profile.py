#!/usr/bin/env python3
"""Where clip-qlora's training step spends its time on one GPU, against the step's FLOP floor.

Run from the root of a clip-qlora checkout on the GPU machine, with src/ and the root on PYTHONPATH and the
wheels of ../shared/gpu/wheels.sh installed (its header says how):

    PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
        timeout 360 python3 benchmarks/step_profile.py --out "$OUT" [--compile lora qlora_gc] [--set KEY=VALUE]

CPU dry run (no GPU; exercises every code path on the shipped tiny architecture):

    PYTHONPATH=src:. python3 benchmarks/step_profile.py --arch clip-tiny --device cpu --batch 4 \
        --n-classes 10 --steps 2 --warmup 1 --profile-steps 2 --out /tmp/sp

Adopted from the team's ../shared/gpu/step_profile.py (2026-12-04) as the project's one step profiler; it
imports build_run, make_step, measure_run and run.py's helpers, so it moves with them. Results:
benchmarks/results/<date>-<gpu>-step-profile.txt (and the summary in <date>-<gpu>-step.md).

The step is the project's own, built the way benchmarks/run.py builds "ours": each base by
`clip_qlora.core.base.make_base` + `save_base`, the run by `clip_qlora.jobs.train.build_run`, measured first by
`clip_qlora.jobs.profile.measure_run` (the project's own step_ms, as run.py reports it), then the CUDA-graph step of
`clip_qlora.jobs.train.make_step`. Nothing here re-implements the step; this file only times and profiles it.

Phases, in this order (all graphs are captured before the first profiler session: on CUDA 13 a CUPTI
session opened before a capture can leave later sessions blind to graph kernels):
  1. bases and runs for every method; measure_run; capture the graph step;
  2. per method: synced and back-to-back replay timing; torch.profiler over --profile-steps back-to-back
     replays -> top kernels, categories, per-stream time, GPU busy/idle, achieved TFLOP/s;
  3. per method: FlopCounterMode over one eager step (FLOPs as executed) and an eager profile with shapes
     (GEMM efficiency per shape, which SDPA backend ran, top ops);
  4. micro-benchmarks: SDPA backends at the step's attention shapes, NF4 dequantize vs bf16 matmul per shape;
  5. optional: each transformer block's forward compiled (torch.compile, inductor, fallback_random=True so the
     dropout masks are eager's), the project's graph step re-captured around it, timed, loss and adapters
     compared with the eager step from the same state.
Results go to $OUT (or --out): step_profile.json, step_profile.txt, trace_<method>.json.gz; both summary files
are rewritten after every phase, so a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import collections
import copy
import gzip
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

_T0 = time.perf_counter()
PEAK_TFLOPS_DEFAULT = 790.0  # bf16 dense, measured on the H200 lent here (device README)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - _T0


# ---- arguments ------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default=".", help="clip-qlora checkout (default: the current folder)")
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora_gc"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-classes", type=int, default=100)
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    ap.add_argument("--warmup", type=int, default=3, help="measure_run warm-up steps (run.py uses 5)")
    ap.add_argument("--steps", type=int, default=20, help="measure_run timed steps, and synced replays timed")
    ap.add_argument("--profile-steps", type=int, default=10, help="back-to-back graph replays under the profiler")
    ap.add_argument("--compile", nargs="*", default=["lora"],
                    help="methods whose blocks are also timed compiled (none: give the flag no value)")
    ap.add_argument("--no-micro", action="store_true", help="skip the SDPA and NF4 micro-benchmarks")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="wall budget of the whole run; optional phases that would not fit are skipped")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS_DEFAULT)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="params.yaml override for the run, as benchmarks/run.py --set")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "step_profile_out")
    ap.add_argument("--no-trace", action="store_true", help="do not write the gzipped kernel traces")
    return ap.parse_args(argv)


# ---- the project's benchmark module (its functions, not a copy of them) ------------------------------

def load_bench(root: Path):
    """Import <root>/benchmarks/run.py as a module; it puts the project's src/ on sys.path itself."""
    path = root / "benchmarks" / "run.py"
    if not path.exists():
        raise SystemExit(f"step_profile: {path} not found; run from the clip-qlora root or pass --project")
    spec = importlib.util.spec_from_file_location("clip_qlora_bench_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- FLOP model ---------------------------------------------------------------------------------------

def _base(m):
    return getattr(m, "base_layer", m)


def _lora_rank(m) -> int:
    r = getattr(m, "r", None)
    if isinstance(r, dict) and r:
        names = getattr(m, "active_adapters", None) or list(r)
        return int(r.get(names[0], next(iter(r.values()))))
    return 0


def model_dims(run) -> dict:
    """The shapes the FLOP model needs, read off the built model (not from a config file)."""
    clip = run.clip
    vis = clip.visual

    def tower(blocks):
        out = []
        for blk in blocks:
            attn = blk.attn
            q = _base(attn.q_proj)
            lin = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "out": attn.out_proj,
                   "fc": blk.mlp.c_fc, "proj": blk.mlp.c_proj}
            out.append({"d": int(q.in_features), "heads": int(attn.num_heads), "causal": bool(attn.causal),
                        "mlp": int(_base(blk.mlp.c_fc).out_features),
                        "lora": {k: _lora_rank(m) for k, m in lin.items() if _lora_rank(m)}})
        return out

    gs = getattr(vis, "grid_size", None)
    n_patch = int(gs[0] * gs[1]) if gs is not None else None
    cls = 1 if getattr(vis, "class_embedding", None) is not None else 0
    conv = vis.conv1.weight.shape  # (width, 3, p, p)
    proj = getattr(vis, "proj", None)
    tp = clip.text_projection
    tp_shape = tuple(tp.weight.shape[::-1]) if hasattr(tp, "weight") else tuple(tp.shape)
    return {"image_tokens": n_patch + cls, "patches": n_patch, "patch_in": int(conv[1] * conv[2] * conv[3]),
            "vision_width": int(conv[0]), "vision_proj": None if proj is None else tuple(proj.shape),
            "text_seqs": int(run.tokens.shape[0]), "text_len": int(run.tokens.shape[1]),
            "text_proj": tp_shape, "embed": int(tp_shape[1]),
            "vision_blocks": tower(clip.visual.transformer.resblocks),
            "text_blocks": tower(clip.transformer.resblocks),
            "checkpointing": bool(run.blocks.checkpointing)}


def _tower_flops(blocks, seqs: int, T: int) -> dict:
    """Forward, backward (activation gradients only: the base is frozen) and the blocks' re-forward (GC).

    Per block: the six frozen Linears (q, k, v, out: d x d; c_fc: d -> mlp; c_proj: mlp -> d), attention
    (QK^T and PV; causal counted as half the tiles; backward = 5 matmuls = 2.5 x forward, FlashAttention's
    count with the recomputation), and the adapters (forward 2M(din r + r dout); backward dB, dU, dA and, where
    the adapter's input needs a gradient, dX). Block 0's input comes from frozen embeddings, so neither its
    q/k/v projections nor their adapters need an input gradient there.
    """
    M = seqs * T
    fwd = bwd = lin_total = recompute = attention = 0.0
    for i, b in enumerate(blocks):
        d, mlp = b["d"], b["mlp"]
        io = {"q": (d, d), "k": (d, d), "v": (d, d), "out": (d, d), "fc": (d, mlp), "proj": (mlp, d)}
        lin = sum(2 * M * din * dout for din, dout in io.values())
        att = 4 * seqs * T * T * d * (0.5 if b["causal"] else 1.0)
        lora_f = sum(2 * M * (io[k][0] * r + r * io[k][1]) for k, r in b["lora"].items())
        frozen_input = {"q", "k", "v"} if i == 0 else set()
        lin_b = sum(2 * M * din * dout for k, (din, dout) in io.items() if k not in frozen_input)
        lora_b = 0.0
        for k, r in b["lora"].items():
            din, dout = io[k]
            lora_b += 2 * M * r * dout * 2 + 2 * M * r * din          # dB, dU, dA
            if k not in frozen_input:
                lora_b += 2 * M * r * din                              # dX through A
        fwd += lin + att + lora_f
        bwd += lin_b + 2.5 * att + lora_b
        lin_total += lin
        attention += 3.5 * att
        # torch's non-reentrant checkpoint stops re-running a block once the last tensor autograd saved is
        # rebuilt (early stop, its default). A frozen c_proj saves nothing (its weight gradient is never
        # formed), so the re-forward ends at the GELU and skips c_proj, unless c_proj carries an adapter.
        recompute += lin + att + lora_f - (2 * M * mlp * d if "proj" not in b["lora"] else 0)
    return {"fwd": fwd, "bwd": bwd, "recompute": recompute, "lin_fwd": lin_total, "attention": attention}


def flop_model(dims: dict, batch: int) -> dict:
    T = dims["image_tokens"]
    vis = _tower_flops(dims["vision_blocks"], batch, T)
    txt = _tower_flops(dims["text_blocks"], dims["text_seqs"], dims["text_len"])
    patch = 2 * batch * dims["patches"] * dims["patch_in"] * dims["vision_width"]
    vproj = 2 * batch * dims["vision_proj"][0] * dims["vision_proj"][1] if dims["vision_proj"] else 0
    tproj = 2 * dims["text_seqs"] * dims["text_proj"][0] * dims["text_proj"][1]
    logits = 2 * batch * dims["text_seqs"] * dims["embed"]
    out = {
        "image_fwd": vis["fwd"] + patch + vproj,
        "image_bwd": vis["bwd"] + vproj,             # no backward into the patch embedding (frozen, input)
        "text_fwd": txt["fwd"] + tproj,
        "text_bwd": txt["bwd"] + tproj,
        "logits_fwd_bwd": 3 * logits,
        "gc_recompute": (vis["recompute"] + txt["recompute"]) if dims["checkpointing"] else 0.0,
    }
    out["total"] = sum(out.values())
    # of which attention (SDPA kernels), forward + backward (+ the GC re-forward); the rest is matmul work
    att = vis["attention"] + txt["attention"]
    out["attention_part"] = att + (att / 3.5 if dims["checkpointing"] else 0.0)
    # what the step would cost if autograd also formed the frozen weights' gradients (a full fine-tune's
    # backward): one more matmul of forward size per block Linear and projection
    out["if_weight_grads_were_computed"] = out["total"] + vis["lin_fwd"] + txt["lin_fwd"] + vproj + tproj
    return out


def floor_ms(flops: float, peak_tflops: float) -> float:
    return flops / (peak_tflops * 1e12) * 1e3


# ---- kernel traces ------------------------------------------------------------------------------------

CATEGORIES = ("gemm", "attention", "dequantize/NF4", "lora adapters (Triton)", "elementwise/norm/softmax", "memcpy",
              "other")


def category(name: str, cat: str = "kernel") -> str:
    """Kernel (or, without device records, op) name -> one of CATEGORIES."""
    n = name.lower()
    if cat in ("gpu_memcpy", "gpu_memset") or n.startswith("memcpy") or n.startswith("memset"):
        return "memcpy"
    if any(k in n for k in ("flash", "fmha", "sdpa", "scaled_dot_product", "attention", "attn_", "_attn")):
        return "attention"
    if any(k in n for k in ("dequant", "kquantize", "4bit", "nf4")):
        return "dequantize/NF4"
    if "multi_tensor" in n or "adam" in n:  # the fused AdamW over the adapters
        return "other"
    if "lora_qkv" in n:  # core/lora_triton.py (train.adapter_kernel triton): masks, dropout and rank-r products
        return "lora adapters (Triton)"
    if n.startswith(("triton_poi", "triton_per", "triton_red")):  # inductor's fused pointwise/reductions
        return "elementwise/norm/softmax"
    if n.startswith("triton_tem") or any(k in n for k in (
            "gemm", "nvjet", "xmma", "cutlass", "gemv", "splitk", "cublas", "s16816", "s1688", "wgmma",
            "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "mmbackward")):
        return "gemm"
    if any(k in n for k in ("elementwise", "layer_norm", "layernorm", "gammabeta", "softmax", "reduce", "dropout",
                            "gelu", "norm", "triton_", "cat", "copy", "fill", "index", "bernoulli", "philox",
                            "where", "mul", "add", "sum", "vectorized", "unrolled", "cast", "transpose")):
        return "elementwise/norm/softmax"
    return "other"  # the fused AdamW (multi_tensor_apply), loss pieces, ...


def short(name: str, n: int = 110) -> str:
    s = name.replace("void ", "").replace("(anonymous namespace)::", "")
    return s if len(s) <= n else s[: n - 3] + "..."


def trace_kernels(path: Path) -> list[tuple]:
    """(start_us, dur_us, name, cat, stream) of every device kernel/memcpy/memset in a Kineto trace."""
    with open(path) as f:
        data = json.load(f)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    out = []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = str(e.get("cat", "")).lower()
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            args = e.get("args") or {}
            out.append((float(e["ts"]), float(e.get("dur", 0.0)), str(e.get("name", "")), cat,
                        args.get("stream", args.get("stream id"))))
    return out


def union_us(intervals) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def kernel_stats(kernels: list[tuple], n_steps: int, top: int = 25) -> dict:
    if not kernels:
        return {}
    total = sum(k[1] for k in kernels)
    span = max(k[0] + k[1] for k in kernels) - min(k[0] for k in kernels)
    busy = union_us((k[0], k[0] + k[1]) for k in kernels)
    by_name = collections.defaultdict(lambda: [0.0, 0, ""])
    by_cat = collections.defaultdict(lambda: [0.0, 0])
    by_stream = collections.defaultdict(lambda: [0.0, 0])
    for ts, dur, name, cat, stream in kernels:
        c = category(name, cat)
        r = by_name[name]
        r[0] += dur
        r[1] += 1
        r[2] = c
        by_cat[c][0] += dur
        by_cat[c][1] += 1
        by_stream[str(stream)][0] += dur
        by_stream[str(stream)][1] += 1
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    bins = ((0, 2), (2, 5), (5, 20), (20, 100), (100, float("inf")))
    hist = {f"{lo:g}-{hi:g}us": [0, 0.0] for lo, hi in bins}
    for k in kernels:
        for lo, hi in bins:
            if lo <= k[1] < hi:
                h = hist[f"{lo:g}-{hi:g}us"]
                h[0] += 1
                h[1] += k[1]
                break
    return {
        "steps": n_steps,
        "duration_histogram": {b: {"kernels_per_step": v[0] / n_steps, "ms_per_step": v[1] / n_steps / 1e3}
                               for b, v in hist.items()},
        "kernels_per_step": len(kernels) / n_steps,
        "kernel_ms_per_step": total / n_steps / 1e3,
        "busy_ms_per_step": busy / n_steps / 1e3,
        "span_ms_per_step": span / n_steps / 1e3,
        "idle_fraction": 1.0 - busy / span if span > 0 else None,
        "overlap_ms_per_step": (total - busy) / n_steps / 1e3,
        "categories": {c: {"ms_per_step": by_cat[c][0] / n_steps / 1e3, "share": by_cat[c][0] / total,
                           "kernels_per_step": by_cat[c][1] / n_steps} for c in CATEGORIES if c in by_cat},
        "streams": {s: {"ms_per_step": v[0] / n_steps / 1e3, "kernels_per_step": v[1] / n_steps}
                    for s, v in sorted(by_stream.items(), key=lambda kv: -kv[1][0])},
        "top": [{"name": short(n, 160), "category": v[2], "ms_per_step": v[0] / n_steps / 1e3,
                 "share": v[0] / total, "calls_per_step": v[1] / n_steps, "us_per_call": v[0] / v[1]}
                for n, v in rows[:top]],
        "top_other": [{"name": short(n, 160), "ms_per_step": v[0] / n_steps / 1e3}
                      for n, v in rows if v[2] == "other"][:8],
    }


# ---- timing helpers -----------------------------------------------------------------------------------

class Timer:
    """Elapsed ms of a block of queued work: CUDA events on a GPU, wall time elsewhere."""

    def __init__(self, device: str):
        import torch
        self.torch, self.cuda = torch, device.startswith("cuda")

    def __call__(self, fn, n: int) -> float:
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(n):
                fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- phases -------------------------------------------------------------------------------------------

def build_all(args, ctx) -> dict:
    """Bases as run.py builds them, then per method measure_run (the project's step_ms) and the graph step."""
    import torch
    from clip_qlora.core import backends
    from clip_qlora.core.base import make_base, save_base
    from clip_qlora.core.model import stand_in_quick_gelu
    from clip_qlora.jobs.profile import measure_run, synthetic_prompts
    from clip_qlora.core.step import build_run, groups_of
    from clip_qlora.core.graphs import make_step

    bench, params, device, dtype = ctx["bench"], ctx["params"], ctx["device"], ctx["dtype"]
    tmp = ctx["tmp"]
    prompts = synthetic_prompts(args.n_classes)
    out = {}
    base_dirs = {}
    for base in sorted({backends.METHODS[m].base for m in args.methods}):
        t0 = time.perf_counter()
        model, meta = make_base(args.arch, "none", base, backends.get(base).settings(params), dtype, device,
                                stand_in_quick_gelu(args.arch, params.model))  # the study's activation
        save_base(model, meta, Path(tmp) / base)
        del model
        bench.free(device)
        base_dirs[base] = Path(tmp) / base
        log(f"{base} base built and saved ({time.perf_counter() - t0:.1f} s)")
    for method in args.methods:
        t0 = time.perf_counter()
        holder = {}

        def make_run(total, method=method):
            holder["run"] = build_run(base_dirs[backends.METHODS[method].base], method, prompts, device,
                                      total, **groups_of(params))
            return holder["run"]

        try:
            m = measure_run(make_run, args.batch, 1, args.n_classes, args.warmup, args.steps, device, params.runtime.cuda_graph)
        except Exception as e:  # an OOM or a broken method: record it, keep the other methods
            ctx["errors"].append(f"measure_run {method}: {type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}")
            log(f"{method}: measure_run FAILED ({type(e).__name__}: {e})")
            holder.clear()
            bench.free(device)
            continue
        run = holder["run"]
        log(f"{method}: measure_run step {m['step_ms']:.2f} ms ({m['step_mode']}), "
            f"trainable {m['trainable_params']} ({time.perf_counter() - t0:.1f} s)")
        # the same synthetic inputs measure_run made (seeded generator 0)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(args.batch, 3, run.size, run.size, generator=g, device=device)
        y = torch.randint(0, args.n_classes, (args.batch,), generator=g, device=device)
        batches = [(x, y)]
        step, mode = make_step(run, batches, params.runtime.cuda_graph)
        for i in range(3):
            torch.manual_seed(10_000 + i)
            step(batches)
        sync(device)
        out[method] = {"run": run, "step": step, "mode": mode, "batches": batches,
                       "measure_run": {k: v for k, v in m.items() if isinstance(v, (int, float, str, type(None)))}}
        log(f"{method}: {mode} step captured and warmed up")
    return out


def profile_graph(method: str, st: dict, args, ctx) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from clip_qlora.jobs.profile import median_step_ms

    device = ctx["device"]
    step, batches = st["step"], st["batches"]
    res = {"step_mode": st["mode"]}
    seed = [20_000]

    def one():
        torch.manual_seed(seed[0])
        seed[0] += 1
        step(batches)

    res["synced_median_ms"] = median_step_ms(lambda: step(batches), args.steps, device, seed0=30_000)
    timer = Timer(device)
    res["back_to_back_ms"] = timer(one, max(args.steps, 10))
    log(f"{method}: step {res['synced_median_ms']:.2f} ms synced median, {res['back_to_back_ms']:.2f} ms "
        f"back-to-back")
    acts = [ProfilerActivity.CUDA] if device.startswith("cuda") else [ProfilerActivity.CPU]

    def profiled(fn, n, tag):
        sync(device)
        with profile(activities=acts) as prof:
            for _ in range(n):
                fn()
            sync(device)
        with tempfile.TemporaryDirectory() as td:
            path = Path(td) / "trace.json"
            prof.export_chrome_trace(str(path))
            kernels = trace_kernels(path)
            if kernels and not args.no_trace:
                dst = Path(args.out) / f"trace_{method}{tag}.json.gz"
                with open(path, "rb") as f, gzip.open(dst, "wb", compresslevel=6) as g:
                    g.write(f.read())
                if dst.stat().st_size > 15 * 2**20:  # over what the device tool brings back: drop it
                    dst.unlink()
        return prof, kernels

    prof, kernels = profiled(one, args.profile_steps, "")
    n_prof = args.profile_steps
    source = f"{st['mode']} replays back to back, CUPTI kernel records"
    if not kernels and device.startswith("cuda") and st["mode"] != "eager":
        # no records from the graph's kernels: profile eager steps instead (same kernels, but launched one by
        # one, so the busy/idle figures describe the eager step, not the graph)
        from clip_qlora.core.step import optimizer_step
        log(f"{method}: no kernel records from graph replays; profiling eager steps instead")
        seed_e = [25_000]

        def eager_one():
            torch.manual_seed(seed_e[0])
            seed_e[0] += 1
            optimizer_step(st["run"], batches)

        eager_one()
        n_prof = min(3, args.profile_steps)
        prof, kernels = profiled(eager_one, n_prof, "_eager")
        source = "EAGER steps (graph replays gave no kernel records): idle figures are the eager step's"
    if kernels:
        res["profile"] = kernel_stats(kernels, n_prof)
        res["profile"]["source"] = source
    else:  # CPU, or a CUPTI that saw no graph kernels: per-op self time of the same steps instead
        rows = []
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", 0) or 0
            if not device.startswith("cuda"):
                t = e.self_cpu_time_total
            if t > 0:
                rows.append((e.key, t, e.count))
        total = sum(r[1] for r in rows) or 1.0
        rows.sort(key=lambda r: -r[1])
        cats = collections.defaultdict(float)
        for k, t, _ in rows:
            cats[category(k)] += t
        res["profile"] = {
            "source": "no device kernel records; per-op self time" + (" (CPU)" if device == "cpu" else ""),
            "steps": args.profile_steps,
            "kernel_ms_per_step": total / args.profile_steps / 1e3,
            "categories": {c: {"ms_per_step": cats[c] / args.profile_steps / 1e3, "share": cats[c] / total}
                           for c in CATEGORIES if c in cats},
            "top": [{"name": short(k, 160), "category": category(k), "ms_per_step": t / args.profile_steps / 1e3,
                     "share": t / total, "calls_per_step": c / args.profile_steps} for k, t, c in rows[:25]],
        }
    p = res["profile"]
    log(f"{method}: profiled {args.profile_steps} steps: {p.get('kernels_per_step', 0):.0f} kernels/step, "
        f"kernel time {p['kernel_ms_per_step']:.2f} ms/step"
        + (f", busy {p['busy_ms_per_step']:.2f} ms, idle {100 * p['idle_fraction']:.1f}% of "
           f"{p['span_ms_per_step']:.2f} ms" if p.get("idle_fraction") is not None else ""))
    return res


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm"}


def eager_analysis(method: str, st: dict, args, ctx) -> dict:
    """FlopCounterMode over one eager step; then one eager step under the profiler with shapes and FLOPs."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode
    from clip_qlora.core.step import optimizer_step

    device, run, batches = ctx["device"], st["run"], st["batches"]
    res = {}
    mapping = {}
    try:  # bitsandbytes' fused op hides its matmul from the dispatch mode: count it as the matmul it is
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

        def gemm_4bit_flop(a_shape, b_shape, shape_b, *rest, out_shape=None, **kw):
            return 2 * math.prod(a_shape[:-1]) * a_shape[-1] * int(shape_b[0])

        mapping[torch.ops.bitsandbytes.gemm_4bit] = gemm_4bit_flop
    except Exception:
        pass
    try:
        fc = FlopCounterMode(display=False, custom_mapping=mapping)
        torch.manual_seed(40_000)
        with fc:
            optimizer_step(run, batches)
        sync(device)
        counts = fc.get_flop_counts().get("Global", {})
        res["flopcounter_total"] = float(fc.get_total_flops())
        res["flopcounter_by_op"] = {str(k): float(v) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
        log(f"{method}: FlopCounterMode: {res['flopcounter_total'] / 1e12:.3f} TFLOP in one eager step")
    except Exception as e:  # a mode the step's ops refuse: keep going without it
        res["flopcounter_error"] = f"{type(e).__name__}: {e}"[:300]
        log(f"{method}: FlopCounterMode failed ({res['flopcounter_error']})")
    torch.manual_seed(40_001)
    optimizer_step(run, batches)  # warm: nothing below is a first call
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts, record_shapes=True, with_flops=True) as prof:
        torch.manual_seed(40_002)
        optimizer_step(run, batches)
        sync(device)

    def dev(e):
        if device.startswith("cuda"):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
        return e.self_cpu_time_total

    gemm, attn_ops = [], {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in GEMM_OPS:
            us = dev(e)
            fl = float(getattr(e, "flops", 0) or 0)
            gemm.append({"op": e.key, "shapes": str(e.input_shapes)[:140], "calls": e.count, "ms": us / 1e3,
                         "gflop": fl / 1e9, "tflops": (fl / (us * 1e-6) / 1e12) if us > 0 and fl > 0 else None})
        if "scaled_dot_product" in e.key or "attention" in e.key:
            attn_ops[e.key] = attn_ops.get(e.key, 0) + e.count
    gemm.sort(key=lambda r: -r["ms"])
    tot_ms = sum(r["ms"] for r in gemm)
    tot_gf = sum(r["gflop"] for r in gemm)
    res["gemm_total_ms"] = tot_ms
    res["gemm_total_gflop"] = tot_gf
    res["gemm_tflops"] = tot_gf / tot_ms if tot_ms > 0 else None  # GFLOP / ms = TFLOP/s
    res["gemm_top"] = gemm[:15]
    res["attention_ops"] = attn_ops
    ops = sorted(((e.key, dev(e), e.count) for e in prof.key_averages() if dev(e) > 0), key=lambda r: -r[1])
    all_ms = sum(r[1] for r in ops) / 1e3
    res["eager_device_ms"] = all_ms
    res["top_ops"] = [{"op": k, "ms": t / 1e3, "share": (t / 1e3) / all_ms if all_ms else None, "calls": c}
                      for k, t, c in ops[:20]]
    log(f"{method}: eager step: {all_ms:.2f} ms of {'GPU' if device.startswith('cuda') else 'CPU'} op time, GEMMs "
        f"{tot_ms:.2f} ms at {res['gemm_tflops'] or 0:.0f} TFLOP/s; SDPA ops {sorted(attn_ops)}")
    return res


def sdpa_micro(dims: dict, batch: int, ctx) -> dict:
    import torch
    import torch.nn.functional as F
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {"error": "torch.nn.attention.sdpa_kernel not available"}
    device, dtype = ctx["device"], ctx["dtype"]
    timer = Timer(device)
    names = {}
    for b in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        if hasattr(SDPBackend, b):
            names[b] = getattr(SDPBackend, b)
    vb, tb = dims["vision_blocks"][0], dims["text_blocks"][0]
    shapes = {"image": (batch, vb["heads"], dims["image_tokens"], vb["d"] // vb["heads"], False),
              "text": (dims["text_seqs"], tb["heads"], dims["text_len"], tb["d"] // tb["heads"], True)}
    out = {}
    for label, (B, H, T, dh, causal) in shapes.items():
        # the step's layout: (B, T, H*dh) projections viewed as heads, i.e. strided q, k, v
        leaves = [torch.randn(B, T, H * dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        grad = torch.randn(B, H, T, dh, device=device, dtype=dtype)

        def qkv():
            return [t.view(B, T, H, dh).transpose(1, 2) for t in leaves]

        fwd_flops = 4 * B * H * T * T * dh * (0.5 if causal else 1.0)
        row = {"shape": [B, H, T, dh], "causal": causal, "fwd_gflop": fwd_flops / 1e9}
        try:
            q, k, v = qkv()
            choice = int(torch._fused_sdp_choice(q, k, v, None, 0.0, causal))
            row["default_backend"] = next((n for n, b in names.items() if int(b.value) == choice), str(choice))
        except Exception as e:
            row["default_backend"] = f"? ({type(e).__name__})"
        for name, backend in [("default", None)] + list(names.items()):
            def fwd():
                q, k, v = qkv()
                with torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def fwdbwd():
                q, k, v = qkv()
                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                o.backward(grad)

            try:
                cm = sdpa_kernel([backend]) if backend is not None else _null()
                with cm:
                    fwd(); fwdbwd()
                    sync(device)
                    f_ms = timer(fwd, 20)
                    fb_ms = timer(fwdbwd, 20)
                row[name] = {"fwd_us": f_ms * 1e3, "fwd_bwd_us": fb_ms * 1e3,
                             "fwd_tflops": fwd_flops / (f_ms * 1e-3) / 1e12,
                             "fwd_bwd_tflops": 3.5 * fwd_flops / (fb_ms * 1e-3) / 1e12}
            except Exception as e:
                row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            for t in leaves:
                t.grad = None
        out[label] = row
        ok = {n: r["fwd_bwd_us"] for n, r in row.items() if isinstance(r, dict) and "fwd_bwd_us" in r}
        log(f"SDPA {label} {row['shape']}{' causal' if causal else ''}: default={row['default_backend']}; fwd+bwd us "
            + ", ".join(f"{n} {v:.0f}" for n, v in ok.items()))
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def nf4_micro(st: dict, dims: dict, batch: int, ctx) -> dict:
    """Per NF4 weight shape: one dequantize (bitsandbytes) against the bf16 matmul it feeds, at the step's M."""
    import torch
    import torch.nn.functional as F
    import bitsandbytes as bnb
    from clip_qlora.core.model import block_linears

    device, dtype = ctx["device"], ctx["dtype"]
    timer = Timer(device)
    seen, rows = {}, []
    for name, _, _, mod in block_linears(st["run"].clip):
        q = _base(mod)
        qs = getattr(q.weight, "quant_state", None)
        if qs is None:
            continue
        tower = "image" if name.startswith("visual.") else "text"
        key = (tower, tuple(qs.shape))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            continue
        M = batch * dims["image_tokens"] if tower == "image" else dims["text_seqs"] * dims["text_len"]
        w = q.weight
        deq = lambda: bnb.functional.dequantize_4bit(w.data, qs)
        W = deq()
        x = torch.randn(M, qs.shape[1], device=device, dtype=dtype)
        deq(); F.linear(x, W)
        d_us = timer(deq, 50) * 1e3
        mm_us = timer(lambda: F.linear(x, W), 50) * 1e3
        rows.append({"tower": tower, "weight": list(qs.shape), "M": M, "dequant_us": d_us, "bf16_linear_us": mm_us,
                     "dequant_over_linear": d_us / mm_us if mm_us else None})
    for r in rows:
        r["count"] = seen[(r["tower"], tuple(r["weight"]))]
    # forward, backward and, checkpointed, the re-forward (which skips c_proj: early stop; so an upper bound)
    passes = 3 if dims["checkpointing"] else 2
    total_ms = sum(r["dequant_us"] * r["count"] for r in rows) * passes / 1e3
    log(f"NF4: {len(rows)} weight shapes; dequantize total ~{total_ms:.2f} ms/step at {passes} passes (isolated "
        f"kernels, back to back)")
    return {"shapes": rows, "passes_per_step": passes, "dequant_ms_per_step_est": total_ms}


def compile_variant(method: str, st: dict, args, ctx) -> dict:
    """Each transformer block's forward compiled; the project's graph step re-captured around it."""
    import torch
    import open_clip.transformer as oct
    from clip_qlora.jobs.profile import median_step_ms
    from clip_qlora.core.graphs import _load_optimizer_in_place, make_step
    from clip_qlora.core.step import optimizer_step

    device, run, batches, params = ctx["device"], st["run"], st["batches"], ctx["params"]
    import torch._dynamo
    import torch._inductor.config as ic
    ic.fallback_random = True  # dropout as aten's native_dropout: the masks eager draws, from the same generator
    dc = torch._dynamo.config
    # one graph per distinct block (image/text x first/other): keep dynamo from giving up on recompiles, and
    # let identical blocks share one compiled graph (modules' parameters as inputs, not constants)
    limit_key = "recompile_limit" if "recompile_limit" in dir(dc) else "cache_size_limit"
    setattr(dc, limit_key, 32)
    if "inline_inbuilt_nn_modules" in dir(dc):
        dc.inline_inbuilt_nn_modules = True
    cls = oct.ResidualAttentionBlock
    orig = cls.__dict__["forward"]
    compiled = ctx.setdefault("_compiled_block_forward", torch.compile(orig, dynamic=False))
    params_list = [p for g in run.optimizer.param_groups for p in g["params"]]
    snap = ([p.detach().clone() for p in params_list], copy.deepcopy(run.optimizer.state_dict()), run.step)

    def restore():
        with torch.no_grad():
            for p, v in zip(params_list, snap[0]):
                p.copy_(v)
        _load_optimizer_in_place(run.optimizer, snap[1])
        run.step = snap[2]

    res = {"what": "open_clip ResidualAttentionBlock.forward under torch.compile(dynamic=False), inductor, "
                   "fallback_random=True; outside it the project's step unchanged (BlockDropout, checkpoint, "
                   "autocast, CUDA graph)"}
    try:
        cls.forward = orig
        torch.manual_seed(50_000)
        loss_e = float(optimizer_step(run, batches))
        after_e = [p.detach().clone() for p in params_list]
        restore()
        cls.forward = compiled
        from torch._dynamo.utils import counters
        counters.clear()
        t0 = time.perf_counter()
        torch.manual_seed(50_000)
        loss_c = float(optimizer_step(run, batches))
        sync(device)
        res["compile_s"] = time.perf_counter() - t0
        after_c = [p.detach().clone() for p in params_list]
        res["loss_eager"], res["loss_compiled"] = loss_e, loss_c
        res["loss_abs_diff"] = abs(loss_c - loss_e)
        num = max(float((a - b).abs().max()) for a, b in zip(after_c, after_e))
        den = max(float(b.abs().max()) for b in after_e) or 1.0
        res["adapter_max_abs_diff"] = num
        res["adapter_max_rel_diff"] = num / den
        res["bitwise_equal"] = bool(loss_c == loss_e and num == 0.0)
        res["graphs"] = int(counters["stats"].get("unique_graphs", 0))
        res["graph_breaks"] = int(sum(counters["graph_break"].values()))
        log(f"{method} compiled: first step {res['compile_s']:.1f} s (compilation), loss {loss_c:.6f} vs eager "
            f"{loss_e:.6f}, adapters max abs diff {num:.3g}; {res['graphs']} graphs, {res['graph_breaks']} breaks")
        for i in range(2):
            torch.manual_seed(50_001 + i)
            optimizer_step(run, batches)
        sync(device)
        step, mode = make_step(run, batches, params.runtime.cuda_graph)
        for i in range(3):
            torch.manual_seed(50_010 + i)
            step(batches)
        res["step_mode"] = mode
        res["synced_median_ms"] = median_step_ms(lambda: step(batches), args.steps, device, seed0=50_100)
        seed = [50_200]

        def one():
            torch.manual_seed(seed[0])
            seed[0] += 1
            step(batches)

        res["back_to_back_ms"] = Timer(device)(one, max(args.steps, 10))
        log(f"{method} compiled: {mode} step {res['synced_median_ms']:.2f} ms synced median, "
            f"{res['back_to_back_ms']:.2f} ms back-to-back")
        del step
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"[:600]
        res["traceback_tail"] = traceback.format_exc()[-1500:]
        log(f"{method} compiled: FAILED ({res['error'][:200]})")
    finally:
        cls.forward = orig
    return res


# ---- environment and summary ---------------------------------------------------------------------------

def environment(ctx) -> dict:
    import torch
    bench, device = ctx["bench"], ctx["device"]
    env = {"versions": bench.versions(), "gpu": bench.gpu_name(device), "python": platform.python_version(),
           "host": platform.node()}
    try:
        env["cudnn"] = torch.backends.cudnn.version()
    except Exception:
        env["cudnn"] = None
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        env["sm"] = f"{p.major}.{p.minor}"
        env["sms"] = p.multi_processor_count
        for k in ("cudnn_sdp_enabled", "flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled"):
            fn = getattr(torch.backends.cuda, k, None)
            env[k] = fn() if fn else None
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,"
                                "temperature.gpu", "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=10)
            env["nvidia_smi"] = q.stdout.strip()
        except Exception:
            env["nvidia_smi"] = None
    return env


def fmt_tf(x):
    """FLOPs as TFLOP, or GFLOP/MFLOP for the tiny dry-run model."""
    if x is None:
        return "—"
    if x >= 1e10:
        return f"{x / 1e12:.3f} T"
    return f"{x / 1e9:.3f} G" if x >= 1e7 else f"{x / 1e6:.3f} M"


def summary_text(res: dict) -> str:
    c, env = res["config"], res.get("environment", {})
    peak = c["peak_tflops"]
    act = {True: "QuickGELU", False: "GELU"}.get(c.get("quick_gelu"), "?")
    L = [f"clip-qlora step profile: {c['arch']} ({act}), batch {c['batch']}, {c['n_classes']} classes, "
         f"methods {c['methods']} on {env.get('gpu')} ({c['device']})",
         f"versions {env.get('versions')}, cuDNN {env.get('cudnn')}, SDPA flags cudnn/flash/efficient "
         f"{env.get('cudnn_sdp_enabled')}/{env.get('flash_sdp_enabled')}/{env.get('mem_efficient_sdp_enabled')}; "
         f"nvidia-smi sm clock, max, power, limit, temp: {env.get('nvidia_smi')}",
         f"run wall {res.get('wall_s', 0):.0f} s; peak used for floors and shares: {peak:.0f} TFLOP/s", ""]
    L.append("FLOP model (FLOPs: T = 1e12, G = 1e9; analytic; frozen base: activation gradients only; attention backward = 2.5 x forward; "
             "text attention causal = half):")
    for m, f in res.get("flops", {}).items():
        a = f["analytic"]
        L.append(f"  {m:9s} image fwd {fmt_tf(a['image_fwd'])} bwd {fmt_tf(a['image_bwd'])} | text fwd "
                 f"{fmt_tf(a['text_fwd'])} bwd {fmt_tf(a['text_bwd'])} | GC re-forward {fmt_tf(a['gc_recompute'])}"
                 f" | total {fmt_tf(a['total'])}FLOP -> floor {f['floor_ms']:.3f} ms "
                 f"(b4: {fmt_tf(f['analytic_b4']['total'])}FLOP, {f['floor_ms_b4']:.3f} ms); "
                 f"with weight grads it would be {fmt_tf(a['if_weight_grads_were_computed'])}")
    for m, r in res.get("methods", {}).items():
        L += ["", f"== {m}"]
        mr = r.get("measure_run", {})
        if mr:
            L.append(f"  project measure_run: step {mr.get('step_ms', 0):.2f} ms ({mr.get('step_mode')}), peak "
                     f"{(mr.get('peak_allocated_bytes') or 0) / 2**30:.3f} GiB (two runs share this process: "
                     f"memory is not comparable with run.py)")
        g = r.get("graph", {})
        if g:
            L.append(f"  {g.get('step_mode')} step: {g['synced_median_ms']:.2f} ms synced median, {g['back_to_back_ms']:.2f} ms "
                     f"back-to-back")
            p = g.get("profile", {})
            if p:
                L.append(f"  profile ({p.get('source')}, {p.get('steps')} steps): "
                         f"{p.get('kernels_per_step', 0):.0f} kernels/step, kernel time {p['kernel_ms_per_step']:.2f}"
                         f" ms/step" + (f", GPU busy {p['busy_ms_per_step']:.2f} ms of {p['span_ms_per_step']:.2f} "
                                        f"ms/step -> idle {100 * p['idle_fraction']:.1f}%, stream overlap "
                                        f"{p['overlap_ms_per_step']:.2f} ms/step"
                                        if p.get("idle_fraction") is not None else ""))
                u = g.get("utilization")
                if u:
                    L.append(f"  vs the unprofiled back-to-back wall {g['back_to_back_ms']:.2f} ms: kernel-time sum / wall "
                             f"= {u['kernel_sum_over_wall']:.2f}, GPU busy / wall = {u['busy_over_wall']:.2f} -> idle "
                             f"{100 * u['idle_fraction_vs_wall']:.1f}%")
                L.append("  by category (ms/step, share of kernel time, kernels/step):")
                for cat, v in p.get("categories", {}).items():
                    L.append(f"    {cat:26s} {v['ms_per_step']:7.3f} ms  {100 * v['share']:5.1f}%  "
                             f"{v.get('kernels_per_step', 0):7.1f}")
                if p.get("duration_histogram"):
                    L.append("  kernel durations (kernels/step, ms/step): " + ", ".join(
                        f"{b} {v['kernels_per_step']:.0f} / {v['ms_per_step']:.2f}"
                        for b, v in p["duration_histogram"].items()))
                if p.get("streams"):
                    L.append("  by stream: " + ", ".join(f"{s}: {v['ms_per_step']:.2f} ms ({v['kernels_per_step']:.0f})"
                                                         for s, v in p["streams"].items()))
                L.append("  top kernels (ms/step, share, calls/step, us/call, category):")
                for t in p.get("top", []):
                    L.append(f"    {t['ms_per_step']:7.3f} {100 * t['share']:5.1f}% {t.get('calls_per_step', 0):6.1f} "
                             f"{t.get('us_per_call', 0):7.1f}  {t['category'][:12]:12s} {t['name'][:120]}")
                if p.get("top_other"):
                    L.append("  largest 'other': " + "; ".join(f"{o['name'][:60]} {o['ms_per_step']:.3f}"
                                                                for o in p["top_other"][:5]))
        a = r.get("achieved", {})
        if a:
            L.append(f"  achieved: {a['analytic_tflop']:.3f} TFLOP (analytic) / {a['step_ms']:.2f} ms (back-to-back) = "
                     f"{a['tflops']:.0f} TFLOP/s = {100 * a['tflops'] / peak:.1f}% of {peak:.0f}"
                     + (f"; over GPU-busy time {a['tflops_busy']:.0f} TFLOP/s" if a.get("tflops_busy") else "")
                     + (f"; FlopCounterMode counted {a['flopcounter_tflop']:.3f} TFLOP" if a.get("flopcounter_tflop")
                        else "") + f"; floor/step = {100 * a['floor_over_step']:.1f}%")
            if a.get("gemm_kernel_tflops") or a.get("attention_kernel_tflops"):
                L.append(f"  kernel efficiency: matmul FLOPs / gemm kernel time = {a.get('gemm_kernel_tflops') or 0:.0f} "
                         f"TFLOP/s; attention FLOPs / SDPA kernel time = {a.get('attention_kernel_tflops') or 0:.0f} "
                         f"TFLOP/s")
        e = r.get("eager", {})
        if e:
            if e.get("flopcounter_by_op"):
                L.append("  FlopCounterMode by op (TFLOP): " + ", ".join(
                    f"{k.split('.')[-1]} {v / 1e12:.3f}" for k, v in list(e["flopcounter_by_op"].items())[:8]))
            L.append(f"  eager step: {e.get('eager_device_ms', 0):.2f} ms op time; GEMMs {e.get('gemm_total_ms', 0):.2f}"
                     f" ms for {e.get('gemm_total_gflop', 0):.0f} GFLOP = {e.get('gemm_tflops') or 0:.0f} TFLOP/s; "
                     f"SDPA ops {e.get('attention_ops')}")
            L.append("  top GEMM shapes (eager; ms, calls, GFLOP, TFLOP/s):")
            for t in e.get("gemm_top", [])[:10]:
                L.append(f"    {t['ms']:7.3f} {t['calls']:4d} {t['gflop']:8.1f} {t['tflops'] or 0:6.0f}  {t['op']} "
                         f"{t['shapes'][:90]}")
            L.append("  top ops by self device time (eager; ms, share, calls): " + "; ".join(
                f"{t['op']} {t['ms']:.2f} {100 * (t['share'] or 0):.0f}% x{t['calls']}" for t in e.get("top_ops", [])[:12]))
        cv = r.get("compiled")
        if cv:
            if "error" in cv:
                L.append(f"  torch.compile variant: FAILED {cv['error'][:300]}")
            else:
                L.append(f"  torch.compile variant ({cv.get('step_mode')}): {cv.get('synced_median_ms', 0):.2f} ms "
                         f"synced, {cv.get('back_to_back_ms', 0):.2f} ms back-to-back (eager-block graph: "
                         f"{g.get('synced_median_ms', 0):.2f} / {g.get('back_to_back_ms', 0):.2f}); loss "
                         f"{cv.get('loss_compiled')} vs eager {cv.get('loss_eager')} (|diff| "
                         f"{cv.get('loss_abs_diff', 0):.3g}); adapters max abs diff "
                         f"{cv.get('adapter_max_abs_diff', 0):.3g} (rel {cv.get('adapter_max_rel_diff', 0):.3g}); "
                         f"bitwise {cv.get('bitwise_equal')}; first step {cv.get('compile_s', 0):.0f} s; "
                         f"{cv.get('graphs')} graphs, {cv.get('graph_breaks')} breaks")
    mi = res.get("micro", {})
    if mi:
        L += ["", "== micro-benchmarks"]
        for label, row in mi.get("sdpa", {}).items():
            if not isinstance(row, dict) or "shape" not in row:
                continue
            parts = []
            for n, v in row.items():
                if isinstance(v, dict):
                    parts.append(f"{n} " + (f"{v['fwd_us']:.0f}/{v['fwd_bwd_us']:.0f} us "
                                            f"({v['fwd_bwd_tflops']:.0f} TF/s)" if "fwd_us" in v else "n/a"))
            L.append(f"  SDPA {label} {row['shape']}{' causal' if row['causal'] else ''}: default backend "
                     f"{row.get('default_backend')}; fwd/fwd+bwd: " + "; ".join(parts))
        nf = mi.get("nf4")
        if nf and "shapes" in nf:
            L.append(f"  NF4 dequantize (bitsandbytes) vs the bf16 linear it feeds; {nf['passes_per_step']} "
                     f"dequantizations per weight and step -> ~{nf['dequant_ms_per_step_est']:.2f} ms/step:")
            for s in nf["shapes"]:
                L.append(f"    {s['tower']:5s} W{s['weight']} x{s['count']:2d}: dequant {s['dequant_us']:.1f} us, "
                         f"linear at M={s['M']} {s['bf16_linear_us']:.1f} us ({100 * (s['dequant_over_linear'] or 0):.0f}%)")
    if res.get("errors"):
        L += ["", "== errors"] + [f"  {e[:400]}" for e in res["errors"]]
    return "\n".join(L) + "\n"


def write(res: dict, out: Path) -> None:
    res["wall_s"] = elapsed()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "step_profile.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(out / "step_profile.json")
    (out / "step_profile.txt").write_text(summary_text(res))


# ---- main ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.project).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    args.compile = [m for m in (args.compile or []) if m != "none"]
    bench = load_bench(root)
    bench.preflight()
    import torch
    import yaml
    from clip_qlora import config
    from clip_qlora.core.base import resolve_device, resolve_dtype
    from clip_qlora.core.model import register_configs, stand_in_quick_gelu

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    register_configs()
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    overrides = {}
    for item in args.set:
        k, _, v = item.partition("=")
        overrides[k] = yaml.safe_load(v)
    params = config.load_with(overrides)
    res = {"config": {"arch": args.arch, "methods": args.methods, "batch": args.batch, "n_classes": args.n_classes,
                      "device": device, "dtype": str(dtype), "warmup": args.warmup, "steps": args.steps,
                      "profile_steps": args.profile_steps, "compile": args.compile, "set": args.set,
                      "peak_tflops": args.peak_tflops, "cuda_graph": params.runtime.cuda_graph,
                      "cublas_workspace_kib": params.runtime.cublas_workspace_kib,
                      "overlap_text": params.runtime.overlap_text, "command": " ".join(sys.argv),
                      "quick_gelu": stand_in_quick_gelu(args.arch, params.model)},
           "flops": {}, "methods": {}, "micro": {}, "errors": []}
    log(f"{args.arch} b{args.batch} {args.n_classes} classes on {device}; methods {args.methods}; out {out}")
    with tempfile.TemporaryDirectory(prefix="step-profile-") as tmp:
        ctx = {"bench": bench, "params": params, "device": device, "dtype": dtype, "tmp": tmp,
               "errors": res["errors"]}
        res["environment"] = environment(ctx)
        log(f"environment: {res['environment']}")
        states = build_all(args, ctx)
        for m, st in states.items():
            res["methods"][m] = {"measure_run": st["measure_run"]}
            dims = model_dims(st["run"])
            st["dims"] = dims
            fm, fm4 = flop_model(dims, args.batch), flop_model(dims, 4)
            res["flops"][m] = {"dims": {k: v for k, v in dims.items() if not k.endswith("_blocks")},
                               "block0": {"vision": dims["vision_blocks"][0], "text": dims["text_blocks"][0]},
                               "analytic": fm, "floor_ms": floor_ms(fm["total"], args.peak_tflops),
                               "analytic_b4": fm4, "floor_ms_b4": floor_ms(fm4["total"], args.peak_tflops)}
            log(f"{m}: analytic {fm['total'] / 1e12:.3f} TFLOP/step -> floor {res['flops'][m]['floor_ms']:.2f} ms "
                f"at {args.peak_tflops:.0f} TFLOP/s (b4 {fm4['total'] / 1e12:.3f} TFLOP, "
                f"{res['flops'][m]['floor_ms_b4']:.2f} ms)")
        write(res, out)
        # phase 2: graph replays under the profiler (every graph was captured above)
        for m, st in states.items():
            try:
                res["methods"][m]["graph"] = profile_graph(m, st, args, ctx)
            except Exception as e:
                res["errors"].append(f"profile {m}: {type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}")
                log(f"profile {m} FAILED: {e}")
            write(res, out)
        # phase 3: FLOPs as executed and the eager op table
        for m, st in states.items():
            try:
                res["methods"][m]["eager"] = eager_analysis(m, st, args, ctx)
            except Exception as e:
                res["errors"].append(f"eager {m}: {type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}")
                log(f"eager analysis {m} FAILED: {e}")
            g = res["methods"][m].get("graph", {})
            fa = res["flops"][m]["analytic"]["total"]
            step_ms = g.get("back_to_back_ms") or res["methods"][m]["measure_run"].get("step_ms")
            busy = g.get("profile", {}).get("busy_ms_per_step")
            fc = res["methods"][m].get("eager", {}).get("flopcounter_total")
            prof_g = g.get("profile", {})
            if g.get("back_to_back_ms") and prof_g.get("busy_ms_per_step"):
                wall = g["back_to_back_ms"]  # unprofiled, CUDA events around back-to-back replays
                g["utilization"] = {"kernel_sum_over_wall": prof_g["kernel_ms_per_step"] / wall,
                                    "busy_over_wall": prof_g["busy_ms_per_step"] / wall,
                                    "idle_fraction_vs_wall": 1.0 - min(1.0, prof_g["busy_ms_per_step"] / wall)}
            if step_ms:
                cats = g.get("profile", {}).get("categories", {})
                att_f = res["flops"][m]["analytic"]["attention_part"]
                gemm_ms = cats.get("gemm", {}).get("ms_per_step")
                att_ms = cats.get("attention", {}).get("ms_per_step")
                res["methods"][m]["achieved"] = {
                    "analytic_tflop": fa / 1e12, "step_ms": step_ms, "tflops": fa / (step_ms * 1e-3) / 1e12,
                    "tflops_busy": fa / (busy * 1e-3) / 1e12 if busy else None,
                    "flopcounter_tflop": fc / 1e12 if fc else None,
                    "floor_over_step": res["flops"][m]["floor_ms"] / step_ms,
                    # matmul FLOPs over the gemm kernels' time, attention FLOPs over the SDPA kernels' time
                    "gemm_kernel_tflops": (fa - att_f) / (gemm_ms * 1e-3) / 1e12 if gemm_ms else None,
                    "attention_kernel_tflops": att_f / (att_ms * 1e-3) / 1e12 if att_ms else None}
                a = res["methods"][m]["achieved"]
                log(f"{m}: achieved {a['tflops']:.0f} TFLOP/s ({100 * a['tflops'] / args.peak_tflops:.1f}% of "
                    f"{args.peak_tflops:.0f}); floor {res['flops'][m]['floor_ms']:.2f} ms vs step {step_ms:.2f} ms")
            write(res, out)
        # phase 4: micro-benchmarks
        if states and not args.no_micro and elapsed() < args.budget_s - 30:
            first = next(iter(states.values()))
            try:
                res["micro"]["sdpa"] = sdpa_micro(first["dims"], args.batch, ctx)
            except Exception as e:
                res["errors"].append(f"sdpa micro: {type(e).__name__}: {e}")
            q = next((st for m, st in states.items() if m.startswith("qlora")), None)
            if q is not None:
                try:
                    res["micro"]["nf4"] = nf4_micro(q, q["dims"], args.batch, ctx)
                except Exception as e:
                    res["errors"].append(f"nf4 micro: {type(e).__name__}: {e}\n{traceback.format_exc()[-600:]}")
            write(res, out)
        # phase 5: torch.compile variant (compilation is the slow part: needs ~90 s of budget per method)
        for m in args.compile:
            if m not in states:
                continue
            left = args.budget_s - elapsed()
            if left < 100:
                res["errors"].append(f"compile {m}: skipped, {left:.0f} s of the budget left")
                log(f"compile {m}: skipped ({left:.0f} s of the budget left)")
                continue
            res["methods"][m]["compiled"] = compile_variant(m, states[m], args, ctx)
            write(res, out)
    write(res, out)
    print(summary_text(res), flush=True)
    log(f"wrote {out / 'step_profile.json'} and {out / 'step_profile.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
