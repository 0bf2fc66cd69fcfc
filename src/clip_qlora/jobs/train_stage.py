"""The train stage: every seed's adapters for one (method, dataset), with DVCLive logs and the run's metrics."""
from __future__ import annotations

import statistics
from pathlib import Path

from dvclive import Live

from clip_qlora.core import archs
from clip_qlora import protocol
from clip_qlora.core.base import read_base, resolve_device
from clip_qlora.data.images import load_train_images
from clip_qlora.data.splits import class_prompts, load_split
from clip_qlora.runtime.io import UserError, write_json
from clip_qlora.jobs.train import train_seed
from clip_qlora.paths import adapter_dir, base_of, checkpoint_path, common, split_path


def train(p, method: str, dataset: str) -> dict:
    device = resolve_device(p.model.device)
    root = Path(p.data.root)
    split = load_split(split_path(dataset), root)
    missing = [s for s in p.data.seeds if str(s) not in split["train"]]
    if missing or split.get("shots") != p.data.shots:
        raise UserError(f"{split_path(dataset)}: made for shots={split.get('shots')} and seeds "
                        f"{sorted(split['train'])}, params ask shots={p.data.shots} seeds {p.data.seeds}; "
                        f"rerun prepare (dvc repro prepare@{dataset})")
    base = base_of(method)
    saved = read_base(base)  # read once for every seed
    meta = saved[0]
    size = archs.configs()[meta["arch"]]["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    max_short_side = round(p.train.decode_short_side * size)  # 0 keeps every image at full resolution
    prompts = class_prompts(split)
    per_seed = {}
    for seed in p.data.seeds:
        images = load_train_images(split, seed, root, max_short_side)
        live_dir = Path("dvclive/train") / method / dataset / f"seed{seed}"
        with Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=False) as live:
            r = train_seed(p, method, base, prompts, images, seed, device,
                           adapter_dir(method, dataset, seed), checkpoint_path(method, dataset, seed), live,
                           description=f"train {method} {dataset} seed {seed}", saved=saved)
        per_seed[str(seed)] = r
    first = next(iter(per_seed.values()))
    peaks = [r["peak_allocated_bytes"] for r in per_seed.values() if r["peak_allocated_bytes"] is not None]
    reserved = [r["peak_reserved_bytes"] for r in per_seed.values() if r["peak_reserved_bytes"] is not None]
    metrics = {"method": method, "dataset": dataset, "seeds": list(p.data.seeds), "steps": first["steps"],
               "trainable_params": first["trainable_params"],
               "train_seconds_mean": statistics.mean(r["train_seconds"] for r in per_seed.values()),
               "peak_allocated_bytes": max(peaks) if peaks else None,
               "peak_reserved_bytes": max(reserved) if reserved else None,
               "saved_activation_bytes": first["saved_activation_bytes"],
               # the decoded training images live on the device too, inside the peaks above
               "train_images_bytes": max(r["train_images_bytes"] for r in per_seed.values()),
               "protocol": protocol.record(p, split, meta),
               "step_ms_median": statistics.median(r["step_ms_median"] for r in per_seed.values()),
               "per_seed": {s: {"train_seconds": r["train_seconds"], "final_loss": r["final_loss"],
                                "peak_allocated_bytes": r["peak_allocated_bytes"],
                                "resumed_from": r["resumed_from"]} for s, r in per_seed.items()},
               **common(device, meta)}
    write_json(Path("metrics/train") / method / f"{dataset}.json", metrics)
    return metrics
