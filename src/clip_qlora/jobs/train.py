"""The train stage's job: every seed's adapters for one (method, dataset), with DVCLive logs and the run's
metrics. `train_seed` is the loop around the step (core/step.py): batches, CUDA graphs, checkpoints, logging.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
from dvclive import Live

from clip_qlora import protocol
from clip_qlora.core import adapters as ad, archs
from clip_qlora.core.base import read_base, resolve_device
from clip_qlora.core.graphs import make_step
from clip_qlora.core.memory import CudaPeak, SavedActivations
from clip_qlora.core.step import build_run, optimizer_step
from clip_qlora.core.seeds import mix
from clip_qlora.data.batches import make_micro_batches
from clip_qlora.data.images import load_train_images
from clip_qlora.data.splits import class_prompts, load_split
from clip_qlora.jobs.checkpoint import Record, load_checkpoint, run_fingerprint, save_checkpoint
from clip_qlora.metrics import Common, Train, TrainSeed
from clip_qlora.paths import adapter_dir, base_of, checkpoint_path, split_path
from clip_qlora.runtime.io import UserError, atomic_dir
from clip_qlora.runtime.progress import Bar


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_seed(method: str, base_dir, prompts, images, seed: int, device: str, adapter_out: Path, ckpt_path: Path,
               *, shots: int, lora, train, runtime, live=None, description: str = "train", saved=None) -> dict:
    """Train one seed's adapters and save them (PEFT format). Resumes from `ckpt_path` if present.

    A resumed run reports what an uninterrupted one does (its DVCLive log from step 0, the median step time of
    every window); `train_seconds` is the sum of its parts.
    """
    t = train
    steps = t.iterations_per_shot * shots
    run = build_run(base_dir, method, prompts, device, steps, lora=lora, train=train, runtime=runtime, seed=seed,
                    saved=saved)
    fingerprint = run_fingerprint(method, seed, shots, lora, train, run.meta, images)
    record = Record(live)
    start = load_checkpoint(run, ckpt_path, fingerprint, record) if ckpt_path.exists() else 0
    images = images.to(device)
    peak = CudaPeak(device)
    acts = SavedActivations(run.model)
    window, loss = 50, None
    bar = Bar(steps, description, done=start)
    peak.reset()
    _sync(device)
    t0 = tw = time.perf_counter()
    step_fn, mode = None, "eager"
    for step in bar(range(start, steps)):
        torch.manual_seed(mix(seed, step))  # dropout masks of this step (also inside a CUDA graph)
        batches = make_micro_batches(run, images, seed, step, t.micro_batch, t.grad_accum, t.batching)
        if step == start:  # the first step eagerly, counting saved activations (hooks cannot be captured)
            with acts.track():
                loss = optimizer_step(run, batches)
        else:
            if step_fn is None:
                step_fn, mode = make_step(run, batches, runtime.cuda_graph)
            loss = step_fn(batches)
        ckpt_due = (step + 1) % runtime.checkpoint_every == 0 and step + 1 < steps
        if (step + 1) % window == 0 or step + 1 == steps or ckpt_due:
            value = float(loss)  # syncs the device, so only once per window (and before a checkpoint)
            if not math.isfinite(value):
                if ckpt_path.exists():
                    ckpt_path.unlink()  # resuming from it would only repeat the failure
                raise UserError(f"train: loss became {value} by step {step + 1} ({method}, seed {seed}); "
                                f"lower train.lr or use compute_dtype fp32 to find the cause")
        if (step + 1) % window == 0 or step + 1 == steps:
            now = time.perf_counter()
            # a window that a resume cut holds fewer steps: the steps run since the window began or the start
            n = step + 1 - max(start, step + 1 - ((step + 1) % window or window))
            record.window_ms.append((now - tw) * 1000 / n)
            tw = now
            bar.note(f"loss {value:.3f} at step {step + 1}")
            row = {"train/loss": value, "train/lr": run.lr_at(step)}
            mem = peak.read()
            if mem["peak_allocated_bytes"] is not None:
                row["train/peak_allocated_gib"] = mem["peak_allocated_bytes"] / 2**30
            record.log(step + 1, row)
        if ckpt_due:
            save_checkpoint(run, ckpt_path, step + 1, fingerprint, record.state(time.perf_counter() - t0))
    _sync(device)
    seconds = record.seconds_before + time.perf_counter() - t0
    with atomic_dir(adapter_out) as tmp:
        ad.save_adapters(run.model, tmp)
    if ckpt_path.exists():
        ckpt_path.unlink()
    window_ms = record.window_ms
    return {"train_seconds": seconds, "steps": steps, "resumed_from": start,
            "final_loss": float(loss) if loss is not None else None,
            "saved_activation_bytes": acts.bytes, "step_mode": mode, "step_ms_median": statistics.median(window_ms) if window_ms else None,
            "trainable_params": sum(p.numel() for p in ad.trainable_parameters(run.model)),
            "train_images_bytes": images.nbytes,
            "is_pretrained": run.meta["is_pretrained"], **peak.read()}


def train_dataset(method: str, dataset: str, *, data, lora, train, runtime, device: str) -> Train:
    """The train stage: every seed of data.seeds, then metrics/train/<method>/<dataset>.json. data: the
    data group (root, shots, seeds); device: model.device."""
    device = resolve_device(device)
    root = Path(data.root)
    split = load_split(split_path(dataset), root)
    missing = [s for s in data.seeds if str(s) not in split["train"]]
    if missing or split.get("shots") != data.shots:
        raise UserError(f"{split_path(dataset)}: made for shots={split.get('shots')} and seeds "
                        f"{sorted(split['train'])}, params ask shots={data.shots} seeds {data.seeds}; "
                        f"rerun prepare (dvc repro prepare@{dataset})")
    base = base_of(method)
    saved = read_base(base)  # read once for every seed
    meta = saved[0]
    size = archs.configs()[meta["arch"]]["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    max_short_side = round(train.decode_short_side * size)  # 0 keeps every image at full resolution
    prompts = class_prompts(split)
    per_seed = {}
    for seed in data.seeds:
        images = load_train_images(split, seed, root, max_short_side)
        live_dir = Path("dvclive/train") / method / dataset / f"seed{seed}"
        with Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=False) as live:
            r = train_seed(method, base, prompts, images, seed, device, adapter_dir(method, dataset, seed),
                           checkpoint_path(method, dataset, seed), shots=data.shots, lora=lora, train=train,
                           runtime=runtime, live=live, description=f"train {method} {dataset} seed {seed}",
                           saved=saved)
        per_seed[str(seed)] = r
    first = next(iter(per_seed.values()))
    peaks = [r["peak_allocated_bytes"] for r in per_seed.values() if r["peak_allocated_bytes"] is not None]
    reserved = [r["peak_reserved_bytes"] for r in per_seed.values() if r["peak_reserved_bytes"] is not None]
    metrics = Train(method=method, dataset=dataset, seeds=list(data.seeds), steps=first["steps"],
                    trainable_params=first["trainable_params"],
                    train_seconds_mean=statistics.mean(r["train_seconds"] for r in per_seed.values()),
                    peak_allocated_bytes=max(peaks) if peaks else None,
                    peak_reserved_bytes=max(reserved) if reserved else None,
                    saved_activation_bytes=first["saved_activation_bytes"],
                    # the decoded training images live on the device too, inside the peaks above
                    train_images_bytes=max(r["train_images_bytes"] for r in per_seed.values()),
                    protocol=protocol.record(data, lora, train, split, meta),
                    step_ms_median=statistics.median(r["step_ms_median"] for r in per_seed.values()),
                    per_seed={s: TrainSeed(train_seconds=r["train_seconds"], final_loss=r["final_loss"],
                                           peak_allocated_bytes=r["peak_allocated_bytes"],
                                           resumed_from=r["resumed_from"]) for s, r in per_seed.items()},
                    common=Common.of(device, meta))
    metrics.write()
    return metrics
