"""A controlled memory/time profile of one method on synthetic inputs at the model's real size.

It times the same step as training (`make_step`: a CUDA graph on GPU, eager on CPU); only the inputs are
synthetic (random pixels, numbered class prompts), since memory and speed do not depend on what the images show.
"""
from __future__ import annotations

import statistics
import time

import torch

from clip_qlora.config import parse_batch
from clip_qlora.core.memory import (CudaPeak, DriverMemory, SavedActivations, allocated_bytes, frozen_weight_bytes,
                     trainable_bytes)
from clip_qlora.core.base import resolve_device
from clip_qlora.core.graphs import make_step
from clip_qlora.core.step import build_run, optimizer_step
from clip_qlora.metrics import Common, Profile, ProfileBatch
from clip_qlora.paths import base_of
from clip_qlora.runtime.io import read_json
from clip_qlora.runtime.processes import FreshProcesses

# What a fresh measuring process imports while the previous one measures (torch, open_clip, peft, bitsandbytes).
WARM = ("clip_qlora.jobs.profile",)


def synthetic_prompts(n_classes: int) -> list[str]:
    return [f"a photo of a class number {i}." for i in range(n_classes)]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_step_ms(step, n: int, device: str, seed0: int = 0) -> float:
    """Median wall time of n calls of step(), synchronised; each step re-seeds its dropout, as in training."""
    times = []
    for i in range(n):
        torch.manual_seed(seed0 + i)
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(method: str, base_dir, micro: int, accum: int, n_classes: int, warmup: int, steps: int, device: str,
            groups: dict) -> dict:
    """Base bytes on the device, saved-activation bytes, allocator peaks and median step time of one
    configuration. groups: the lora, train and runtime params groups, by name."""
    prompts = synthetic_prompts(n_classes)
    return measure_run(lambda total: build_run(base_dir, method, prompts, device, total, **groups), micro, accum,
                       n_classes, warmup, steps, device, groups["runtime"].cuda_graph)


def measure_run(make_run, micro: int, accum: int, n_classes: int, warmup: int, steps: int, device: str,
                cuda_graph: bool) -> dict:
    """`measure` of the Run that make_run(total_steps) builds (the scale study builds its base on the device).

    Everything make_run allocates counts as the run's memory; it should leave no cached transient behind.
    """
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = allocated_bytes(device) or 0
    run = make_run(1 + 2 * (warmup + steps))
    static_alloc = allocated_bytes(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(micro * accum, 3, run.size, run.size, generator=g, device=device)
    y = torch.randint(0, n_classes, (micro * accum,), generator=g, device=device)
    batches = [(x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]) for i in range(accum)]
    # The first step eagerly, counting what autograd saves (hooks cannot run inside a captured graph), as
    # `train_seed` does; only then is the step captured.
    acts = SavedActivations(run.model)
    torch.manual_seed(0)
    with acts.track():
        optimizer_step(run, batches)
    # Memory over eager steps after a warm-up: a replayed CUDA graph bypasses the caching allocator, so its
    # peaks would show only what capture left allocated. The eager step does the same arithmetic (bitwise
    # equal on the H200) and its peaks are what the original study measured. Off CUDA nothing is measured.
    peak = CudaPeak(device)
    for i in range(warmup if peak.cuda else 0):
        torch.manual_seed(1 + i)  # as in training: each step re-seeds its dropout
        optimizer_step(run, batches)
    peak.reset()
    for i in range(steps if peak.cuda else 0):
        torch.manual_seed(1 + warmup + i)
        optimizer_step(run, batches)
    memory = peak.read()
    driver = DriverMemory(device)
    driver_eager = driver.read()
    # Time with the step training runs (a CUDA graph where possible).
    step, mode = make_step(run, batches, cuda_graph)
    for i in range(warmup):
        torch.manual_seed(1 + warmup + steps + i)
        step(batches)
    step_ms = median_step_ms(lambda: step(batches), steps, device, seed0=1 + 2 * warmup + steps)
    # Read last, the driver's figure is the process as training runs it: eager steps first, then the captured
    # step's own memory pool on top (what nvidia-smi shows during `train`).
    driver_bytes = driver.read()
    tb = trainable_bytes(run.model, run.optimizer)
    out = {"device_base_bytes": frozen_weight_bytes(run.model, device),
           "memory_allocated_bytes": None if static_alloc is None else static_alloc - before,
           "trainable_params": tb["trainable_params"],
           "trainable_bytes": tb["params"] + tb["grads"] + tb["optimizer_state"],
           "saved_activation_bytes": acts.bytes, **memory, "driver_eager_bytes": driver_eager,
           "driver_bytes": driver_bytes, "baseline_allocated_bytes": None if static_alloc is None else before,
           "step_ms": step_ms, "step_mode": mode}
    return out


def profile_method(method: str, *, lora, train, runtime, profile, device: str) -> Profile:
    """The profile stage: metrics/profile/<method>.json, each profile.batches configuration measured in a
    process of its own on CUDA."""
    device = resolve_device(device)
    base = base_of(method)
    meta = read_json(base / "base.json")
    batches = {}
    groups = {"lora": lora, "train": train, "runtime": runtime}
    with FreshProcesses(device, WARM) as call:  # on CUDA, each configuration in a process of its own
        for spec in profile.batches:
            micro, accum = parse_batch(spec)
            r = call(measure, method, base, micro, accum, profile.n_classes, profile.warmup, profile.steps, device,
                     groups)
            batches[f"b{spec}"] = ProfileBatch(saved_activation_bytes=r["saved_activation_bytes"],
                                               peak_allocated_bytes=r["peak_allocated_bytes"],
                                               peak_reserved_bytes=r["peak_reserved_bytes"], step_ms=r["step_ms"])
    # the base, the adapters and the step mode do not depend on the batch: each configuration's process
    # measures them again, the file keeps the last one's
    out = Profile(method=method, arch=meta["arch"], n_classes=profile.n_classes,
                  device_base_bytes=r["device_base_bytes"], memory_allocated_bytes=r["memory_allocated_bytes"],
                  trainable_params=r["trainable_params"], trainable_bytes=r["trainable_bytes"],
                  step_mode=r["step_mode"], batches=batches, common=Common.of(device, meta))
    out.write()
    return out
