"""The frozen base of one arm: build it once (quantize stage), save it, and reload it without re-quantizing."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from clip_qlora.config import DTYPES
from clip_qlora.core import backends
from clip_qlora.runtime import gpu_claim
from clip_qlora.runtime.io import UserError, atomic_dir, read_json, remake
from clip_qlora.core.model import build_base, uses_quick_gelu


def resolve_device(device: str) -> str:
    """cpu, or the GPU this process now holds alone (gpu_claim: one GPU per queued experiment's stage)."""
    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device: {device!r} asked for but no CUDA device is visible")
    if device == "auto" or device.startswith("cuda"):
        return gpu_claim.claim_cuda(device)
    return device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'auto' is bf16 on a GPU (the study's setting) and fp32 on CPU (where bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, DTYPES[name])


def make_base(arch: str, pretrained: str, base: str, settings: dict | None, compute_dtype: torch.dtype,
              device: str, quick_gelu="auto") -> tuple[nn.Module, dict]:
    """Build the base of one arm on `device`. Returns (model, meta) where meta describes it for reloading."""
    model, is_pretrained = build_base(arch, pretrained, compute_dtype, quick_gelu)
    model = backends.get(base).convert(model, settings, compute_dtype, device)
    return model, base_meta(model, arch, pretrained, is_pretrained, base, settings, compute_dtype)


def base_meta(model: nn.Module, arch: str, pretrained: str, is_pretrained: bool, base: str, settings: dict | None,
              compute_dtype: torch.dtype, **extra) -> dict:
    """The description of a built base (saved as its base.json; `extra` keys before the activation): what
    `load_base` rebuilds it from and what every metrics file records of it."""
    # the activation that ran is part of the base: a reload must rebuild the same function
    return {"arch": arch, "pretrained": str(pretrained), "is_pretrained": is_pretrained, "base": base,
            "compute_dtype": str(compute_dtype).removeprefix("torch."), "settings": settings, **extra,
            "activation": "quick_gelu" if uses_quick_gelu(model) else "gelu"}


def _plain(t: torch.Tensor) -> torch.Tensor:
    # safetensors wants plain, contiguous, unshared CPU tensors (Params4bit is a Parameter subclass)
    return torch.Tensor(t.detach()).cpu().contiguous().clone()


def save_base(model: nn.Module, meta: dict, out_dir: str | Path) -> None:
    with atomic_dir(out_dir) as tmp:
        save_file({k: _plain(v) for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "base.json").write_text(json.dumps(meta, indent=2) + "\n")


def _remake(base_dir: Path) -> str:
    return remake(f"quantize@{base_dir.name}")  # the stage (dvc.yaml) that saves models/<base>


def read_base(base_dir: str | Path) -> tuple[dict, dict]:
    """(meta, saved tensors) of a saved base, read from disk once (a stage reuses them for every seed).

    A missing, truncated or damaged file is one line naming it and the command that rebuilds it."""
    base_dir = Path(base_dir)
    meta_path = base_dir / "base.json"
    if not meta_path.exists():
        raise UserError(f"{meta_path}: missing; run the quantize stage first (`dvc repro quantize@{base_dir.name}`)")
    meta = read_json(meta_path, _remake(base_dir))
    if not isinstance(meta, dict) or meta.get("activation") not in ("quick_gelu", "gelu"):
        raise UserError(f"{meta_path}: no 'activation' recorded (made by an older version or damaged); "
                        f"rebuild it with `{_remake(base_dir)}`")
    weights = base_dir / "model.safetensors"
    if not weights.exists():
        raise UserError(f"{weights}: missing; rebuild the base with `{_remake(base_dir)}`")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors' own error type (a truncated file: "incomplete metadata") or an OSError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{weights}: unreadable ({reason}; truncated or damaged?); rebuild the base with "
                        f"`{_remake(base_dir)}`") from None
    return meta, state


def _rebuild_unsaved_buffers(model: nn.Module, device) -> None:
    # the one buffer open_clip does not save (persistent=False): the text tower's additive causal mask, built as
    # open_clip's text transformer builds it (-inf above the diagonal, over the whole context)
    if getattr(model, "attn_mask", None) is not None:
        n, dtype = model.attn_mask.shape[0], model.attn_mask.dtype  # the skeleton's: the compute dtype
        model.attn_mask = torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu_(1)


def load_base(base_dir: str | Path, device: str, saved: tuple[dict, dict] | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a saved base on `device`: skeleton, backend shells, then the saved tensors.

    The skeleton is built on the meta device (no random initialisation to throw away, which takes seconds on
    the CPU for ViT-B/16 and minutes for the largest models) and materialised empty on `device`; every tensor
    is then filled from the saved ones, and a buffer the state dict does not hold is rebuilt or refused.
    `saved`: `read_base(base_dir)` done beforehand, so several runs of a stage read the file once.
    """
    base_dir = Path(base_dir)
    meta, state = saved if saved is not None else read_base(base_dir)
    dtype = getattr(torch, meta["compute_dtype"])
    with torch.device("meta"):
        model, _ = build_base(meta["arch"], "none", dtype, quick_gelu=meta["activation"] == "quick_gelu",
                              device="meta")
        backend = backends.get(meta["base"])
        backend.prepare_for_load(model, meta["settings"], dtype)
    model.to_empty(device=device)
    used = backend.load_quantized(model, state, device)
    rest = {k: v for k, v in state.items() if k not in used}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k not in used]
    if missing or unexpected:
        raise UserError(f"{base_dir}: saved base does not match {meta['arch']} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); rerun the quantize stage")
    _rebuild_unsaved_buffers(model, device)
    unfilled = [n for n, _ in model.named_buffers() if n not in state and n != "attn_mask"]
    if unfilled:  # to_empty left it uninitialised: a new open_clip buffer this function does not know
        raise UserError(f"{base_dir}: buffers {unfilled[:3]} of {meta['arch']} are not saved in the base")
    model.requires_grad_(False)
    model.eval()
    return model, meta
