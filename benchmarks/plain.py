"""The plain recipe: what a user would write with stock open_clip + bitsandbytes + PEFT + torch.

This file is the baseline that `run.py` compares our training step against. It is written on purpose without
our training code (no `clip_qlora.jobs.train`, `clip_qlora.core.base`, backend modules, `clip_qlora.core.adapters`; of
`clip_qlora.core.backends` only the method table): only the recipe of ../shared/measurements.md, step by step:

- open_clip `create_model(arch)` with random init (memory and speed do not depend on weight values);
- attention split into q/k/v/out `nn.Linear` (`clip_qlora.core.model.split_attention`; PEFT and bitsandbytes both
  need plain Linears, and there is no stock way to do this, so reusing ours is not an optimisation);
- weights in the compute dtype (bf16 on a GPU), LayerNorms kept in fp32;
- QLoRA: every block Linear (q, k, v, out, c_fc, c_proj of both towers) replaced by a bitsandbytes
  `Linear4bit`, NF4, double quantization, bf16 compute, quantized when the model is moved to the device;
  open_clip reads the text tower's cast dtype from `mlp.c_fc.weight.dtype` (uint8 once quantized), so each
  block's `mlp.c_fc.int8_original_dtype` is set to the compute dtype, the documented escape hatch;
- PEFT `get_peft_model`, LoRA r=2, alpha=1, dropout 0.25 on q, k, v of both towers, adapters in fp32;
- AdamW (torch's default implementation: foreach on CUDA, not fused), bf16 autocast, eager mode;
- the class prompts re-encoded at every step at the FULL 77-token context through open_clip's own
  `encode_text`;
- gradient checkpointing through open_clip's `set_grad_checkpointing(True)`.

The measurement (`measure_plain`) follows `clip_qlora.jobs.profile.measure` field for field, so the two can sit in
one table: the exact accounting helpers of `clip_qlora.core.memory` are measuring tools, not training code.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_qlora.core.backends import METHODS  # the method table (base, checkpointing); no backend code

# The bases this recipe writes out itself: bf16 as is, nf4 through stock bitsandbytes (below).
QUANTIZED = {"bf16": False, "nf4": True}
BLOCK_LINEARS = (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "out_proj"),
                 ("mlp", "c_fc"), ("mlp", "c_proj"))
LORA_R, LORA_ALPHA, LORA_DROPOUT = 2, 1, 0.25
LORA_TARGETS = ["q_proj", "k_proj", "v_proj"]  # suffix match: the attention of both towers
NF4_BLOCKSIZE = 64  # bitsandbytes' default
LR, WEIGHT_DECAY, LOGIT_SCALE = 2e-4, 1e-2, 100.0
INIT_SEED = 0


def class_prompts(n_classes: int) -> list[str]:
    return [f"a photo of a class number {i}." for i in range(n_classes)]


@dataclass
class PlainState:
    model: nn.Module            # the PeftModel
    clip: nn.Module             # the open_clip CLIP inside it (adapters injected in place)
    optimizer: torch.optim.Optimizer
    tokens: torch.Tensor        # (n_classes, 77) on device
    device: str
    compute_dtype: torch.dtype
    image_size: int

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.compute_dtype)


def _quantize_block_linears(clip: nn.Module, compute_dtype: torch.dtype) -> None:
    """Swap every block Linear of both towers for an (as yet unquantized) bitsandbytes Linear4bit NF4."""
    import bitsandbytes as bnb

    for tower in (clip.visual.transformer, clip.transformer):
        for block in tower.resblocks:
            for parent_name, attr in BLOCK_LINEARS:
                parent = getattr(block, parent_name)
                lin = getattr(parent, attr)
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                # bitsandbytes quantizes a Params4bit the first time it is moved to a device
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                             compress_statistics=True, quant_type="nf4", module=q)
                if lin.bias is not None:
                    q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, attr, q)
            # open_clip's text cast-dtype trap: it would read uint8 from the quantized c_fc weight
            block.mlp.c_fc.int8_original_dtype = compute_dtype


def build_plain(method: str, arch: str, device: str, n_classes: int, compute_dtype: torch.dtype) -> PlainState:
    import open_clip
    from peft import LoraConfig, get_peft_model

    from clip_qlora.core.model import register_configs, split_attention

    quantized, grad_ckpt = QUANTIZED[METHODS[method].base], METHODS[method].checkpointing
    register_configs()  # makes the shipped clip-tiny known to open_clip (ViT-B-16 is built in)
    torch.manual_seed(INIT_SEED)
    clip = open_clip.create_model(arch, pretrained=None)
    split_attention(clip)
    clip.to(compute_dtype)
    for m in clip.modules():
        if isinstance(m, nn.LayerNorm):
            m.float()
    if quantized:
        _quantize_block_linears(clip, compute_dtype)
    for p in clip.parameters():
        p.requires_grad_(False)
    clip.to(device)  # Linear4bit weights are quantized here, on the device
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=LORA_TARGETS,
                        use_rslora=True, bias="none")
    model = get_peft_model(clip, config)
    for name, p in model.named_parameters():  # fp32 adapters whatever the base's dtype
        if "lora_" in name:
            p.data = p.data.float()
    if grad_ckpt:
        clip.set_grad_checkpointing(True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=WEIGHT_DECAY)
    tokens = open_clip.get_tokenizer(arch)(class_prompts(n_classes)).to(device)  # full context (77)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return PlainState(model, clip, optimizer, tokens, device, compute_dtype, int(size))


def plain_loss(state: PlainState, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CLIP-LoRA's objective: cross-entropy of fixed-scale cosine logits; text re-encoded every step."""
    with state.autocast():
        img = F.normalize(state.clip.encode_image(images), dim=-1)
        txt = F.normalize(state.clip.encode_text(state.tokens), dim=-1)
        logits = LOGIT_SCALE * img @ txt.t()
    return F.cross_entropy(logits.float(), labels)


def plain_step(state: PlainState, images: torch.Tensor, labels: torch.Tensor, micro: int | None = None) -> float:
    """One optimizer step on (images, labels), accumulated over micro-batches of `micro` if given."""
    micro = micro or len(images)
    chunks = list(zip(images.split(micro), labels.split(micro)))
    total = 0.0
    for x, y in chunks:
        loss = plain_loss(state, x, y) / len(chunks)
        loss.backward()
        total += loss.detach()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return total


def measure_plain(method: str, arch: str, micro: int, accum: int, n_classes: int, warmup: int, steps: int,
                  device: str, compute_dtype: torch.dtype) -> dict:
    """Same fields as `clip_qlora.jobs.profile.measure`, for the plain recipe."""
    from clip_qlora.core.memory import CudaPeak, SavedActivations, allocated_bytes, frozen_weight_bytes, trainable_bytes
    from clip_qlora.jobs.profile import median_step_ms

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = allocated_bytes(device) or 0
    state = build_plain(method, arch, device, n_classes, compute_dtype)
    static_alloc = allocated_bytes(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(micro * accum, 3, state.image_size, state.image_size, generator=g, device=device)
    y = torch.randint(0, n_classes, (micro * accum,), generator=g, device=device)
    for _ in range(warmup):
        plain_step(state, x, y, micro)
    acts = SavedActivations(state.model)
    with acts.track():  # one micro-batch's forward: what backward will hold at its peak
        loss = plain_loss(state, x[:micro], y[:micro])
    del loss
    state.optimizer.zero_grad(set_to_none=True)
    peak = CudaPeak(device)
    peak.reset()
    step_ms = median_step_ms(lambda: plain_step(state, x, y, micro), steps, device)
    tb = trainable_bytes(state.model, state.optimizer)
    out = {"device_base_bytes": frozen_weight_bytes(state.model, device),
           "memory_allocated_bytes": None if static_alloc is None else static_alloc - before,
           "trainable_params": tb["trainable_params"],
           "trainable_bytes": tb["params"] + tb["grads"] + tb["optimizer_state"],
           "saved_activation_bytes": acts.bytes, **peak.read(), "step_ms": step_ms}
    return out
