"""The QLoRA arm's base: every frozen block Linear of both towers in bitsandbytes 4-bit (NF4 or FP4).

Only storage changes: the matmul runs in the same compute dtype as the bf16 arm.
"""
from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn as nn
from bitsandbytes.nn import Linear4bit, Params4bit

from clip_qlora.core.model import block_linears


def settings(params) -> dict:
    q = params.quant
    return {"type": q.type, "double_quant": q.double_quant, "blocksize": q.blocksize,
            "expand_absmax": q.expand_absmax}


def _linear4bit(lin: nn.Linear, s: dict, compute_dtype, device) -> Linear4bit:
    q = Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                   compress_statistics=s["double_quant"], quant_type=s["type"], device=device)
    # On a CPU with AVX512-BF16, bitsandbytes repacks the weight in place at the first forward without grad
    # (evaluation) and from then on multiplies in bf16 whatever compute_dtype says: evaluation would no
    # longer run the function training ran (and a reload would differ from the model that was saved).
    q.support_avx512bf16_for_cpu = False
    return q


def _mark_cast_dtype(model: nn.Module, compute_dtype) -> None:
    # open_clip reads the tower's cast dtype from mlp.c_fc.weight.dtype, which is uint8 once quantized;
    # it honours `int8_original_dtype` on c_fc instead, so record the real compute dtype there.
    for tower in (model.visual.transformer, model.transformer):
        for block in tower.resblocks:
            block.mlp.c_fc.int8_original_dtype = compute_dtype


def convert(model: nn.Module, s: dict, compute_dtype, device) -> nn.Module:
    """Quantize every block Linear on `device` (CPU works with bitsandbytes >= 0.48)."""
    model.to(device)
    for _, parent, attr, lin in list(block_linears(model)):
        q = _linear4bit(lin, s, compute_dtype, device)
        q.weight = Params4bit(lin.weight.data, requires_grad=False, blocksize=s["blocksize"],
                              compress_statistics=s["double_quant"], quant_type=s["type"], module=q)
        q.weight._quantize(device)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        setattr(parent, attr, q)
    _mark_cast_dtype(model, compute_dtype)
    return model


def prepare_for_load(model: nn.Module, s: dict, compute_dtype) -> nn.Module:
    """Swap block Linears for empty Linear4bit shells that `load_quantized` fills."""
    for _, parent, attr, lin in list(block_linears(model)):
        q = _linear4bit(lin, s, compute_dtype, "meta")
        if lin.bias is not None:
            q.bias = nn.Parameter(torch.empty_like(lin.bias), requires_grad=False)
        setattr(parent, attr, q)
    _mark_cast_dtype(model, compute_dtype)
    return model


def load_quantized(model: nn.Module, state: dict, device) -> set[str]:
    """Rebuild each Params4bit from its saved packed data and quant-state tensors.

    Plain load_state_dict refuses a 4-bit state dict; bitsandbytes' own path is Params4bit.from_prequantized.
    Returns the state keys consumed here (the rest go through load_state_dict).
    """
    used = set()
    for name, parent, attr, q in block_linears(model):
        prefix = f"{name}.weight."
        stats = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        used |= {prefix + k for k in stats} | {f"{name}.weight"}
        q.weight = Params4bit.from_prequantized(state[f"{name}.weight"], stats, requires_grad=False,
                                                device=device, module=q)
        if q.bias is not None:
            q.bias = nn.Parameter(state[f"{name}.bias"].to(device), requires_grad=False)
            used.add(f"{name}.bias")
    return used


def for_training(model: nn.Module, s: dict) -> nn.Module:
    """Optionally (`expand_absmax`) trade a little memory for fewer kernels per step (the saved base is not touched).

    With double quantization every dequantisation of a weight first dequantises its 8-bit absmax constants
    (two more kernels), and a training step dequantises each weight two or three times (forward, backward,
    and the checkpoint's recomputation). The constants never change, so `expand_absmax` dequantises them once,
    here, and keeps them in fp32: the values bitsandbytes would compute each time, bit for bit, at the cost of
    the memory double quantization saved (3 bytes per 64 weights: 5.5 MiB on ViT-B/16). The setting is part of
    the saved base's settings, so the method pointers (and with them only the NF4 side) change with it.
    """
    if not s["expand_absmax"]:
        return model
    for _, _, _, q in block_linears(model):
        qs = q.weight.quant_state
        if qs is not None and qs.nested:
            absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2)
            absmax += qs.offset  # exactly as bitsandbytes' dequantize_4bit does per call
            q.weight.quant_state = bnb.functional.QuantState(
                absmax=absmax.float(), shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                quant_type=qs.quant_type, dtype=qs.dtype)
    return model
