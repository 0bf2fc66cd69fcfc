"""The scale study: what each method needs, in memory and time, across open_clip model sizes.

`scale@<arch>` measures every method of `methods` at every `scale.batches` configuration on one architecture
with the profile's own code (`profile.measure_run`: the training step of `train`, its allocator peaks, the
driver's figure, the CUDA-graph step time), on a base with random weights built on the device
(`random_base`; memory and time do not depend on the values, so model.pretrained is not read), adapters on the
towers lora.towers names, scale.n_classes synthetic prompts. On CUDA each configuration runs in a fresh
process (`processes.FreshProcesses`), so no configuration's memory or loaded kernels show in another's figures.
A configuration that runs out of GPU memory is recorded as not fitting and the stage goes on.

metrics/scale/<arch>.json is `clip_qlora.metrics.Scale` ("params": parameter count, both towers, embeddings
included; "gpu_gib": the device's memory; "lora": the adapter settings), each method's configuration
    "b<micro>x<accum>": {"fits": true, <profile.measure_run's fields>, "base_build_seconds",
                         "driver_context_bytes": the process before its first allocation}
                      | {"fits": false, "gpu_gib": N}
Bytes are integers; allocator and driver fields are null off CUDA (the driver's also where NVML does not
list the process).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import time

import torch

from clip_qlora.core import backends
from clip_qlora.core.backends import METHODS
from clip_qlora.core.base import resolve_device, resolve_dtype
from clip_qlora.metrics import Scale
from clip_qlora.runtime.io import UserError, device_name, versions
from clip_qlora.core.memory import DriverMemory
from clip_qlora.runtime.processes import FreshProcesses
from clip_qlora.config import parse_batch
from clip_qlora.jobs.profile import measure_run, synthetic_prompts
from clip_qlora.core.random_base import make_random_base, parameter_count
from clip_qlora.core.step import run_on_model, set_cublas_workspace

log = logging.getLogger(__name__)

# What a fresh measuring process imports while the previous one measures (torch, open_clip, peft, bitsandbytes).
WARM = ("clip_qlora.jobs.scale",)


def gpu_gib(device: str) -> float | None:
    if not str(device).startswith("cuda"):
        return None
    return round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 2)


def _free(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure_config(params, arch: str, method: str, spec: str, device: str) -> tuple[dict, dict]:
    """One (architecture, method, batch configuration) in this process: (its record, the device it ran on)."""
    set_cublas_workspace(params.runtime.cublas_workspace_kib)  # before the first matmul of the process
    base = METHODS[method].base
    dtype = resolve_dtype(params.model.compute_dtype, device)
    settings = backends.get(base).settings(params)
    micro, accum = parse_batch(spec)
    s = params.scale
    prompts = synthetic_prompts(s.n_classes)
    built = {}

    def make_run(total_steps):
        model, meta = make_random_base(arch, base, settings, dtype, device)
        built["base_build_seconds"] = meta["build_seconds"]
        _free(device)  # what the build let go of (the bf16 weights NF4 replaced) must not stay reserved
        return run_on_model(model, meta, method, prompts, device, total_steps, lora=params.lora, train=params.train,
                            runtime=params.runtime)

    env = {"device": device_name(device), "gpu_gib": gpu_gib(device)}
    context = None
    if device.startswith("cuda"):  # the process before any allocation: CUDA context and loaded modules
        torch.cuda.synchronize(device)  # makes the device current: its primary context exists from here
        context = DriverMemory(device).read()
    oom = None
    try:
        r = measure_run(make_run, micro, accum, s.n_classes, s.warmup, s.steps, device, params.runtime.cuda_graph)
    except torch.OutOfMemoryError as e:
        oom = str(e).splitlines()[0] if str(e) else "out of memory"
    # outside the except block: its traceback (and every tensor its frames hold) is gone now
    if oom is not None:
        _free(device)
        log.warning("scale %s %s %s: out of memory (%s)", arch, method, spec, oom)
        return {"fits": False, "gpu_gib": env["gpu_gib"]}, env
    return {"fits": True, **r, **built, "driver_context_bytes": context}, env


def measure_arch(params, arch: str, device: str, on_result=None, keep_going: bool = False) -> dict:
    """Every method x batch configuration of one architecture; on_result(record, method, spec, seconds)
    after each. keep_going: a configuration that fails other than by running out of memory is recorded as
    {"error": ...} instead of stopping the run (the GPU script; the stage stops)."""
    s = params.scale
    record = {"arch": arch, "params": parameter_count(arch), "n_classes": s.n_classes, "batches": list(s.batches),
              "warmup": s.warmup, "steps": s.steps,
              "compute_dtype": str(resolve_dtype(params.model.compute_dtype, device)).removeprefix("torch."),
              "device": None, "gpu_gib": None, "pretrained": False, "lora": dataclasses.asdict(params.lora),
              "versions": versions(), "methods": {}}
    with FreshProcesses(device, WARM) as call:
        for method in params.methods:
            base, gc_ = METHODS[method].base, METHODS[method].checkpointing
            entry = record["methods"].setdefault(method, {"base": base, "gradient_checkpointing": gc_})
            for spec in s.batches:
                t0 = time.perf_counter()
                try:
                    r, env = call(measure_config, params, arch, method, spec, device)
                    record.update(env)
                except Exception as e:
                    if not keep_going or isinstance(e, UserError):
                        raise
                    r = {"error": f"{type(e).__name__}: {e}"}
                entry[f"b{spec}"] = r
                if on_result is not None:
                    on_result(record, method, spec, time.perf_counter() - t0)
    if record["device"] is None:  # nothing ran to completion: name the device from here
        record["device"] = device_name(device)
    return record


def _line(record: dict, method: str, spec: str, seconds: float) -> str:
    r = record["methods"][method][f"b{spec}"]
    if "error" in r:
        return f"scale {record['arch']} {method} {spec}: ERROR {r['error']}"
    if not r["fits"]:
        on = "" if r["gpu_gib"] is None else f" on {r['gpu_gib']} GiB"
        return f"scale {record['arch']} {method} {spec}: out of memory{on} ({seconds:.0f} s)"
    gib = (lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB")
    return (f"scale {record['arch']} {method} {spec}: driver {gib(r['driver_bytes'])}, peak allocated "
            f"{gib(r['peak_allocated_bytes'])}, step {r['step_ms']:.1f} ms ({r['step_mode']}), "
            f"base built in {r['base_build_seconds']:.1f} s, {seconds:.0f} s in all")


def print_line(record: dict, method: str, spec: str, seconds: float) -> None:
    print(_line(record, method, spec, seconds), file=sys.stderr, flush=True)


def scale_arch(p, arch: str) -> Scale:
    """The `scale@<arch>` stage: measure, then write metrics/scale/<arch>.json (once, complete). p: the params
    the stage declares (methods, model.compute_dtype, model.device, quant, lora, train, scale.*, runtime.*)."""
    device = resolve_device(p.model.device)
    record = Scale.from_dict(measure_arch(p, arch, device, on_result=print_line), f"scale@{arch}'s record")
    record.write()
    return record
