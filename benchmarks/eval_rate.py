#!/usr/bin/env python
"""Test images per second of one evaluation pass on the GPU: the zeroshot stage's code on Food101-sized data.

    python benchmarks/eval_rate.py --out $OUT [--n 30300] [--passes 2] [--decode reference|fast]

30,300 test JPEGs of 512x384 (Food101's test split; 256 distinct files hard-linked, decoding cost is what
matters), a random ViT-B-16 bf16 base, `scoring.zero_shot` over `data.images.eval_batches` (eval.decode reference:
PIL in `runtime.eval_workers` DataLoader processes; fast: read ahead by threads, nvJPEG decoding and resizing on
the GPU), one image forward for both prompt sets, exactly as the zeroshot stage runs it. Each pass is timed by `scoring.predict`; the first includes nvJPEG's and cuDNN's
start-up. Writes <out>/eval_rate.json after every pass.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=30300)
    ap.add_argument("--classes", type=int, default=101)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script only")
    ap.add_argument("--batch-size", type=int, default=None, help="default: params.yaml eval.batch_size")
    ap.add_argument("--decode", choices=("reference", "fast"), default=None, help="default: params.yaml eval.decode")
    ap.add_argument("--workers", type=int, default=None, help="default: params.yaml runtime.eval_workers")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import numpy as np
    import torch
    from PIL import Image

    from clip_qlora import config
    from clip_qlora.core.base import make_base
    from clip_qlora.data.images import eval_batches
    from clip_qlora.core.scoring import zero_shot

    p = config.load(REPO / "params.yaml")
    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    pool = []
    for k in range(256):
        path = root / f"pool_{k}.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).resize((512, 384), Image.BICUBIC).save(
            path, quality=90)
        pool.append(path)
    test = []
    for i in range(a.n):
        os.link(pool[i % len(pool)], root / f"img_{i:06d}.jpg")
        test.append([f"img_{i:06d}.jpg", i % a.classes])
    split = {"test": test}
    model, meta = make_base("ViT-B-16", "none", "bf16", None, torch.bfloat16 if a.device != "cpu" else torch.float32, a.device)
    prompts = {"clip": [f"a photo of a class {c}." for c in range(a.classes)],
               "coop": [f"a photo of class {c}, a type of food." for c in range(a.classes)]}
    batch = a.batch_size or p.eval.batch_size
    decode = a.decode or p.eval.decode
    workers = p.runtime.eval_workers if a.workers is None else a.workers
    result = {"n_test": a.n, "batch_size": batch, "decode": decode, "workers": workers,
              "gpu": torch.cuda.get_device_name() if a.device != "cpu" else "cpu",
              "versions": {"torch": torch.__version__}, "passes": []}
    for _ in range(a.passes):
        r = zero_shot(model, meta, prompts,
                      lambda size, mean, std: eval_batches(split, root, size, mean, std, batch, workers, a.device,
                                                           decode), a.device, p.train.logit_scale)
        result["passes"].append({"seconds": r["eval_seconds"], "test_images_per_second": a.n / r["eval_seconds"]})
        print(f"pass: {r['eval_seconds']:.2f} s, {a.n / r['eval_seconds']:.0f} test images/s", flush=True)
        (a.out / "eval_rate.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
