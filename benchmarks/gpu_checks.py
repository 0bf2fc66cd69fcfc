"""GPU checks that CPU CI cannot make (run on a CUDA machine; results go to --out as JSON).

1. The CUDA-graph step gives the same losses and adapter weights as the straightforward eager step (same
   seeds), for every method (checkpointed ones included). Straightforward: one stream (no side stream for
   the text tower) and bitsandbytes' double-quantized absmax dequantised at every use (no expand_absmax).
2. Checkpointing changes nothing but memory and time: lora_gc trains exactly like lora (qlora_gc like qlora),
   dropout on, since every block draws its masks from its own seeded generators (clip_qlora/blocks.py).
3. Wall time of the whole 4-shot protocol for one 100-class dataset (2000 steps of 32) through the real
   training loop (`train_seed`: sampling, device augmentation, graph replay, logging windows).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from clip_qlora.base import make_base, save_base  # noqa: E402
from clip_qlora import backends, config  # noqa: E402
from clip_qlora.io import versions  # noqa: E402
from clip_qlora.profile import isolated, synthetic_prompts  # noqa: E402
from clip_qlora.data.images import TrainImages  # noqa: E402
from clip_qlora.train import build_run, make_step, optimizer_step, train_seed  # noqa: E402



def run_steps(base_dir, method, use_graph, steps, micro, accum, straight=False, short=0):
    """`steps` steps of micro x accum images; with `short`, every other batch has `short` images (an epoch's
    short last batch, as train.batching: epochs makes them), which the graph path captures separately.
    straight: one stream, and (the base's settings) absmax dequantised at every use; see main()."""
    p = config.load_with({"runtime.overlap_text": not straight})
    torch.manual_seed(0)
    run = build_run(base_dir, p, method, synthetic_prompts(100), "cuda", steps)
    g = torch.Generator(device="cuda").manual_seed(0)
    losses, step_fn, mode = [], None, "eager"
    for s in range(steps):
        n = short if short and s % 2 else micro * accum
        x = torch.randn(n, 3, 224, 224, generator=g, device="cuda")
        y = torch.randint(0, 100, (n,), generator=g, device="cuda")
        batches = [(x[i:i + micro], y[i:i + micro]) for i in range(0, n, micro)]
        torch.manual_seed(1000 + s)
        if s == 0 or not use_graph:
            loss = optimizer_step(run, batches)
        else:
            if step_fn is None:
                step_fn, mode = make_step(run, batches, True)
            loss = step_fn(batches)
        losses.append(float(loss))
    params = {n: p.detach().float().cpu() for n, p in run.model.named_parameters() if p.requires_grad}
    return losses, params, mode


def graph_equivalence(base_dir, straight_dir, method, micro, accum, steps=6, short=0):
    le, pe, _ = run_steps(straight_dir, method, False, steps, micro, accum, straight=True, short=short)
    lg, pg, mode = run_steps(base_dir, method, True, steps, micro, accum, short=short)
    diff = max((pe[n] - pg[n]).abs().max().item() for n in pe)
    scale = max(pe[n].abs().max().item() for n in pe)
    return {"mode": mode, "loss_eager": le, "loss_graph": lg,
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(le, lg)),
            "max_abs_param_diff": diff, "max_abs_param": scale}


def checkpoint_equivalence(base_dir, method, micro, accum, steps=4):
    """Eager steps of method and method_gc from the same init and seeds."""
    lp, pp, _ = run_steps(base_dir, method, False, steps, micro, accum)
    lc, pc, _ = run_steps(base_dir, f"{method}_gc", False, steps, micro, accum)
    return {"loss": lp, "loss_gc": lc, "max_abs_loss_diff": max(abs(a - b) for a, b in zip(lp, lc)),
            "max_abs_param_diff": max((pp[n] - pc[n]).abs().max().item() for n in pp),
            "max_abs_param": max(pp[n].abs().max().item() for n in pp)}


def protocol_time(base_dir, method, n_classes=100, shots=4):
    p = config.load_with()
    g = torch.Generator().manual_seed(0)
    # 4:3 images at the stored resolution of a 500x375 photo (decode_short_side 2.0: kept whole)
    pixels = torch.randint(0, 256, (n_classes * shots, 3, 375, 500), dtype=torch.uint8, generator=g)
    images = TrainImages(pixels, [(375, 500)] * len(pixels), torch.arange(n_classes).repeat_interleave(shots))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = train_seed(p, method, base_dir, synthetic_prompts(n_classes), images, 1, "cuda",
                       Path(tmp) / "adapters", Path(tmp) / "ckpt.pt", description=f"protocol {method}")
        r["wall_seconds_including_load"] = time.perf_counter() - t0
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--methods", nargs="+", default=list(backends.METHODS))
    ap.add_argument("--shapes", nargs="+", default=["32x1", "4x8"],
                    help="micro x accumulation for the graph check; '32x1+8': every other batch has 8 images")
    ap.add_argument("--checks", nargs="+", default=["graph", "checkpoint", "protocol"],
                    choices=("graph", "checkpoint", "protocol"))
    ap.add_argument("--protocol-methods", nargs="+", default=["lora", "qlora", "qlora_gc"])
    args = ap.parse_args()
    out = {"gpu": torch.cuda.get_device_name(), "versions": versions(), "graph": {}, "checkpoint": {},
           "protocol": {}}
    with tempfile.TemporaryDirectory() as tmp:
        study = config.load_with()
        for base in backends.BACKENDS:
            s = backends.get(base).settings(study)
            m, meta = make_base("ViT-B-16", "none", base, s, torch.bfloat16, "cuda")
            save_base(m, meta, Path(tmp) / base)
            if s and s.get("expand_absmax"):  # the straightforward twin: the same tensors, absmax kept 8-bit
                save_base(m, {**meta, "settings": {**s, "expand_absmax": False}}, Path(tmp) / f"{base}-straight")
            del m

        def base_of(method, straight=False):
            base = backends.METHODS[method].base
            return Path(tmp) / (f"{base}-straight" if straight and (Path(tmp) / f"{base}-straight").exists() else base)

        if "graph" in args.checks:
            for method in args.methods:
                for spec in args.shapes:
                    shape, _, short = spec.partition("+")
                    micro, accum = (int(v) for v in shape.split("x"))
                    key = f"{method}-{spec}"
                    out["graph"][key] = isolated(graph_equivalence, base_of(method), base_of(method, True), method,
                                                 micro, accum, 6, int(short or 0), device="cuda")
                    print("graph", key, json.dumps(out["graph"][key])[:400], flush=True)
        if "checkpoint" in args.checks:
            for arm in (b.method for b in backends.BACKENDS.values()):
                out["checkpoint"][arm] = isolated(checkpoint_equivalence, base_of(arm), arm, 32, 1, device="cuda")
                print("checkpoint", arm, json.dumps(out["checkpoint"][arm])[:400], flush=True)
        if "protocol" in args.checks:
            for method in args.protocol_methods:
                out["protocol"][method] = isolated(protocol_time, base_of(method), method, device="cuda")
                print("protocol", method, json.dumps(out["protocol"][method]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_checks.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
