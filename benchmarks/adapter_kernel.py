"""One block's fused q/k/v projection with its adapters on a GPU, train.adapter_kernel torch (`qkv._QKV`:
dropout and padded cuBLAS GEMMs) against triton (`qkv._QKVTriton`, core/lora_triton.py), forward alone and
forward + backward, each captured in a CUDA graph and replayed (as in the training step, so launch overhead
is not counted); the Triton kernels alone at each tile configuration given. Shapes: ViT-B/16's image tokens
at batch 32 and 4, and the text tower's 100 prompts x 11 tokens. Medians from triton.testing.do_bench, in
microseconds; JSON to --out.

    python benchmarks/adapter_kernel.py --out DIR [--fwd 16,16,2 32,32,4 ...] [--bwd 64,64,4 ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

SHAPES = {"image-b32": (32 * 197, 768), "image-b4": (4 * 197, 768), "text": (100 * 11, 512)}


def _tiles(spec: str) -> tuple[int, int, int]:
    bm, g, w = (int(v) for v in spec.split(","))
    return bm, g, w


def _attention(d: int, kernel: str, device: str):
    from peft import LoraConfig, get_peft_model

    from clip_qlora.core import qkv
    from clip_qlora.core.model import SplitAttention

    holder = nn.Module()
    holder.attn = SplitAttention(nn.MultiheadAttention(d, d // 64, batch_first=True), causal=False)
    model = get_peft_model(holder, LoraConfig(r=2, lora_alpha=1, lora_dropout=0.25, use_rslora=True,
                                              target_modules=r"attn\.(q|k|v)_proj")).to(device)
    for name, prm in model.named_parameters():
        prm.data = prm.data.float() if "lora_" in name else prm.data.to(torch.bfloat16)
        if "lora_B" in name:
            prm.data.normal_(std=0.05)
    return qkv.FusedQKV(model.base_model.model.attn, kernel=kernel)


def graphed(fn, generators=()):
    """fn captured in a CUDA graph (after warm-up); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    for gen in generators:
        g.register_generator_state(gen)
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main(argv=None):
    import triton
    from triton.testing import do_bench

    from clip_qlora.core import blocks
    from clip_qlora.core import lora_triton as lt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--fwd", nargs="+", default=[",".join(map(str, lt.FWD_TILES))])
    ap.add_argument("--bwd", nargs="+", default=[",".join(map(str, lt.BWD_TILES))])
    args = ap.parse_args(argv)
    dev, p, s = "cuda", 0.25, 0.7071
    results = {"gpu": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__,
                                                                  "triton": triton.__version__}, "shapes": {}}
    for name, (n, d) in SHAPES.items():
        row = {}
        x = torch.randn(n, d, device=dev).to(torch.bfloat16)
        for kernel in ("torch", "triton"):
            fused = _attention(d, kernel, dev)
            gen = torch.Generator(device=dev).manual_seed(1)
            draws = blocks.Draws(gen, torch.tensor([1], device=dev))
            xg = x.clone().requires_grad_(True)
            gy = torch.randn(n, 3 * d, device=dev).to(torch.bfloat16)

            def fwd():
                draws.offset = 0
                with blocks.drawing_from(draws):
                    return fused(xg)

            def fwd_bwd():
                fwd().backward(gy)

            row[f"{kernel} forward"] = do_bench(graphed(fwd, [gen]))
            row[f"{kernel} forward+backward"] = do_bench(graphed(fwd_bwd, [gen]))
        a = [torch.randn(2, d, device=dev) * 0.05 for _ in range(3)]
        seed = torch.tensor([123], device=dev)
        threads, inc = lt.layout(x.numel(), x.device)
        for spec in args.fwd:
            row[f"triton forward kernel {spec}"] = do_bench(
                graphed(lambda: lt.forward(x, a, seed, [0, inc, 2 * inc], p, threads, s, tiles=_tiles(spec))))
        xa, bits = lt.forward(x, a, seed, [0, inc, 2 * inc], p, threads, s)
        g = torch.randn(n, d + 3 * lt.HW, device=dev).to(torch.bfloat16)
        for spec in args.bwd:
            row[f"triton backward kernel {spec}"] = do_bench(
                graphed(lambda: lt.backward(xa, bits, g, a, p, s, tiles=_tiles(spec))))
        row["dropout of x (torch, one)"] = do_bench(graphed(lambda: torch.native_dropout(x, p, True)))
        results["shapes"][name] = {k: round(v * 1000, 2) for k, v in row.items()}
        print(name, json.dumps(results["shapes"][name]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "adapter_kernel.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
