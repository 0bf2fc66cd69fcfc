"""Exact memory accounting, independent of the allocator, on any device.

(a) frozen weights, quantization state included; (b) trainable parameters, their gradients and optimizer
state; (c) activations saved for backward in one step. Each storage is counted once. On CUDA the allocator's
own figures (allocated after load, max allocated/reserved over steps) are reported beside these.
"""
from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn


def _storage_id(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr())


def unique_bytes(tensors, device: str | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (views and aliases counted once), on `device` if given."""
    seen, total = set(), 0
    only = None if device is None else torch.device(device).type
    for t in tensors:
        if t is None or t.device.type == "meta" or (only is not None and t.device.type != only):
            continue
        key = _storage_id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _quant_state_tensors(module: nn.Module):
    # bitsandbytes keeps absmax, the code book and (double quantization) a nested state outside the module's
    # parameters and buffers: they are real frozen-weight memory and must be counted.
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    while qs is not None:
        yield from (t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor))
        qs = getattr(qs, "state2", None)


def frozen_tensors(model: nn.Module) -> list[torch.Tensor]:
    out = [p for p in model.parameters() if not p.requires_grad]
    out += list(model.buffers())
    for m in model.modules():
        out += list(_quant_state_tensors(m))
    return out


def frozen_weight_bytes(model: nn.Module, device: str | None = None) -> int:
    """Frozen bytes of the model, or of what of it is on `device` (a GPU run keeps the token table on the host)."""
    return unique_bytes(frozen_tensors(model), device)


def trainable_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = unique_bytes(params)
    # A gradient has the size and dtype of its parameter; counting from shapes keeps this exact before backward.
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    opt_bytes = 0
    if optimizer is not None:
        opt_bytes = unique_bytes(t for st in optimizer.state.values() for t in st.values()
                                 if isinstance(t, torch.Tensor))
    return {"params": param_bytes, "grads": grad_bytes, "optimizer_state": opt_bytes,
            "trainable_params": sum(p.numel() for p in params)}


@dataclass
class SavedActivations:
    """The most bytes that tensors saved for backward hold at once while the context is active.

    Without accumulation that is everything one step's forward saves. With accumulation each micro-batch's
    saved tensors are freed by its backward before the next forward, so it is the text tower's plus one
    micro-batch's, the memory a step really needs. (Counting every storage ever saved, deduplicated by
    address, mixed the two: freed addresses reused by the next micro-batch were counted or not depending on
    the allocator, and the arms differed by allocation order alone.)

    Frozen weights that F.linear keeps for the input gradient also pass through the hooks: they are weights,
    already counted in (a), so every parameter, buffer and quant-state storage is excluded here.
    """
    model: nn.Module
    bytes: int = 0              # the peak
    count: int = 0              # storages saved
    _live: dict = field(default_factory=dict)  # storage -> bytes, while a tensor saved on it is alive
    _now: int = 0
    _weights: set = field(default_factory=set)

    def _pack(self, t: torch.Tensor):
        if t.device.type != "meta":
            key = _storage_id(t)
            if key not in self._weights and key not in self._live:
                n = t.untyped_storage().nbytes()
                self._live[key] = n
                self._now += n
                self.bytes = max(self.bytes, self._now)
                self.count += 1
                weakref.finalize(t, self._release, key)  # when backward (or the caller) lets go of it
        return t

    def _release(self, key) -> None:
        self._now -= self._live.pop(key, 0)

    @contextlib.contextmanager
    def track(self):
        self._weights = {_storage_id(t) for t in list(self.model.parameters()) + frozen_tensors(self.model)}
        self._live, self._now, self.bytes, self.count = {}, 0, 0, 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


class CudaPeak:
    """Allocator peaks over a window of steps (None off CUDA)."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict:
        if not self.cuda:
            return {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
        torch.cuda.synchronize()
        return {"peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}


def allocated_bytes(device: str) -> int | None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return int(torch.cuda.memory_allocated())
    return None


class DriverMemory:
    """The GPU memory this process holds as the driver reports it (NVML), None where NVML cannot say.

    This is what nvidia-smi lists for the process: the CUDA context and loaded kernels, everything the caching
    allocator has reserved, and anything a library allocates outside it; what a GPU of a given size must
    hold. The allocator only grows between `empty_cache` calls, so a reading taken at the end of a window of
    steps is that window's maximum. Off CUDA, without nvidia-ml-py, or where the driver does not list this
    process (a container's PID namespace), `read` returns None.
    """

    def __init__(self, device: str):
        self.device, self.handle, self._nvml = str(device), None, None
        if not self.device.startswith("cuda"):
            return
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = self._handle(pynvml)
        except Exception:  # no NVML library or driver: the allocator's figures still stand
            self.handle = None

    def _handle(self, pynvml):
        # NVML numbers every GPU of the machine; torch only the visible ones: match them by UUID
        props = torch.cuda.get_device_properties(torch.device(self.device))
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            except Exception:
                pass
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            return None  # the index would name another GPU
        return pynvml.nvmlDeviceGetHandleByIndex(torch.device(self.device).index or 0)

    def read(self) -> int | None:
        if self.handle is None:
            return None
        torch.cuda.synchronize()
        try:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == os.getpid():
                    return None if proc.usedGpuMemory is None else int(proc.usedGpuMemory)
        except Exception:
            return None
        return None
