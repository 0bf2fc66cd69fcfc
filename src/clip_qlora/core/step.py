"""The training step: `Run` holds what a step needs, `optimizer_step` is the step (forward and backward of
every micro-batch, then AdamW), read top to bottom. train, profile and the benchmarks all run this step; on
CUDA it is captured once and replayed (graphs.py), the same arithmetic.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_qlora.core import adapters as ad
from clip_qlora.core import backends, qkv
from clip_qlora.core.base import load_base
from clip_qlora.core.blocks import BlockDropout
from clip_qlora.core.model import (TextTokens, autocast, cosine_logits, embed_prompts, encode_image, encode_text,
                                   layernorms_in_compute_dtype, preprocess_stats, unit)

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything one optimizer step needs. Built once per (method, seed)."""
    model: nn.Module            # PeftModel around the CLIP module
    clip: nn.Module             # the CLIP module itself (adapters injected in place)
    tokens: torch.Tensor        # class prompts, cut to the shortest exact context, on device
    text_input: torch.Tensor    # their token + position embeddings (frozen: computed once, see run_on_model)
    text_trainable: bool        # text tower has adapters -> class features recomputed with grad every step
    optimizer: torch.optim.Optimizer
    lr_at: object               # step -> learning rate (closed form: no scheduler state to carry)
    compute_dtype: torch.dtype
    device: str
    logit_scale: float
    size: int
    mean: tuple
    std: tuple
    meta: dict                  # the saved base's description
    blocks: BlockDropout        # per-block dropout generators (and checkpointing for the _gc methods)
    text_stream: torch.cuda.Stream | None = None  # CUDA, runtime.overlap_text: the text tower's stream
    step: int = 0               # optimizer steps taken
    _text_cache: torch.Tensor | None = None

    def set_lr(self) -> None:
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # device-side lr: a tiny kernel, no host sync, read by the CUDA graph
            else:
                group["lr"] = lr

    def autocast(self):
        return autocast(self.device, self.compute_dtype)  # the same in both arms, and in scoring

    def class_features(self) -> torch.Tensor:
        if self.text_trainable:
            return unit(encode_text(self.clip, self.tokens, self.text_input))
        if self._text_cache is None:  # frozen text tower: the features cannot change, encode them once
            with torch.no_grad():
                self._text_cache = unit(encode_text(self.clip, self.tokens, self.text_input))
        return self._text_cache

    def class_features_aside(self):
        """`class_features` launched on the side stream; returns (features, join), join() before using them.

        The text tower (100 prompts x ~11 tokens) launches as many small kernels as the image tower but has a
        fraction of its work, so on one stream the GPU idles through much of it. On a stream of its own, the
        graph replays its forward and backward beside the image tower's. Same kernels, same inputs, same RNG
        draws (each block has its own generator): the numbers do not change, only the overlap.
        """
        if self.text_stream is None or not self.text_trainable:
            return self.class_features(), lambda: None
        main = torch.cuda.current_stream()
        self.text_stream.wait_stream(main)
        with torch.cuda.stream(self.text_stream):
            text = self.class_features()

        def join():
            main.wait_stream(self.text_stream)
            text.record_stream(main)  # made on the side stream, read on main: keep the allocator from reusing it
        return text, join


def build_run(base_dir: str | Path, method: str, prompts: list[str], device: str, total_steps: int, *, lora,
              train, runtime, adapter_dir: str | Path | None = None, seed: int = 0, saved=None) -> Run:
    """Load the saved base, add (or load) adapters, and set up the optimizer for `total_steps` steps.

    `seed` initialises the new adapters (lora_A; lora_B starts at zero), as the seed does in CLIP-LoRA.
    `saved`: the base's `read_base` result, when a stage trains several seeds from one read of the file.
    """
    model, meta = load_base(base_dir, device, saved)
    return run_on_model(model, meta, method, prompts, device, total_steps, lora=lora, train=train, runtime=runtime,
                        adapter_dir=adapter_dir, seed=seed)


def run_on_model(model: nn.Module, meta: dict, method: str, prompts: list[str], device: str, total_steps: int, *,
                 lora, train, runtime, adapter_dir: str | Path | None = None, seed: int = 0) -> Run:
    """`build_run` on a base already in memory (tests and benchmarks that skip the save/load).

    lora, train, runtime: those params groups (config.Lora, Train, Runtime)."""
    set_cublas_workspace(runtime.cublas_workspace_kib)
    gc = backends.METHODS[method].checkpointing
    backends.get(meta["base"]).for_training(model, meta["settings"])
    # Seeded here, after the base is built: building a base re-seeds with the fixed init seed (model.INIT_SEED),
    # which would otherwise give every seed the same lora_A.
    torch.manual_seed(seed)
    peft_model = (ad.load_adapters(model, adapter_dir, trainable=True) if adapter_dir
                  else ad.add_adapters(model, lora))
    ad.let_autocast_cast_inputs(peft_model)  # loss_on always runs under autocast (or in fp32)
    clip = ad.inner(peft_model)
    compute_dtype = getattr(torch, meta["compute_dtype"])
    if runtime.layernorm_in_compute_dtype and compute_dtype != torch.float32:
        layernorms_in_compute_dtype(clip, compute_dtype)
    if runtime.fused_activation and device.startswith("cuda"):
        fuse_quick_gelu(clip)
    # the Triton adapter kernels draw dropout masks themselves: they read each block's seed on the device
    triton_kernel = train.fused_qkv and train.adapter_kernel == "triton"
    blocks = BlockDropout(clip, gc, device, device_seeds=triton_kernel)
    if train.fused_qkv:
        qkv.fuse(clip, kernel=train.adapter_kernel)
    peft_model.train()
    t = train
    trainable = ad.trainable_parameters(peft_model)
    cuda = device.startswith("cuda")
    # On CUDA: one fused kernel for all parameters, and a device-side lr and step count so the whole step
    # can be captured in a CUDA graph (GraphedStep).
    optimizer = torch.optim.AdamW(trainable, lr=torch.tensor(t.lr, device=device) if cuda else t.lr,
                                  weight_decay=t.weight_decay, betas=(0.9, 0.999), fused=cuda, capturable=cuda)
    lr_at = functools.partial(cosine_lr if t.schedule == "cosine" else constant_lr, t.lr, t.min_lr, total_steps)
    size, mean, std = preprocess_stats(clip)
    tokens = TextTokens.from_prompts(prompts, meta["arch"]).tokens.to(device)
    with torch.no_grad():
        text_input = embed_prompts(clip, tokens)
    # Training reads only the class prompts' rows of the frozen token embedding, now in text_input: the table
    # itself (49408 x 512 in bf16, 48 MiB on ViT-B/16, half the NF4 base) waits on the host.
    clip.token_embedding.to("cpu")
    return Run(peft_model, clip, tokens, text_input, ad.text_has_adapters(lora), optimizer, lr_at,
               compute_dtype, device, t.logit_scale, size, mean, std, meta, blocks,
               text_stream=torch.cuda.Stream(device=device) if cuda and runtime.overlap_text else None)


def fuse_quick_gelu(clip: nn.Module) -> int:
    """runtime.fused_activation: QuickGELU in Triton kernels (core/quick_gelu.py), bitwise open_clip's; a torch
    build without Triton keeps open_clip's module, with a warning. Returns how many blocks were switched."""
    try:
        from clip_qlora.core import quick_gelu
    except ImportError as e:
        log.warning("runtime.fused_activation: Triton cannot be imported (%s); keeping open_clip's QuickGELU", e)
        return 0
    return quick_gelu.fuse(clip)


def set_cublas_workspace(kib: int) -> None:
    """Size torch's cuBLAS and cuBLASLt workspaces (0 keeps torch's default) through torch's own variables.

    torch reads them once, at the first matmul of the process: the stages and the profile's measuring
    processes call this before any. The workspace is memory that every method holds alike (one per handle,
    i.e. per thread that runs matmuls); a smaller one saves that memory but lets cuBLAS pick slower kernels.
    """
    if kib:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = f":{kib}:1"
        os.environ["CUBLASLT_WORKSPACE_SIZE"] = str(kib)


def cosine_lr(lr: float, min_lr: float, total: int, step: int) -> float:
    """Cosine decay from lr to min_lr over `total` steps, no warm-up (CLIP-LoRA's schedule)."""
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * min(step, total) / total)) / 2


def constant_lr(lr: float, min_lr: float, total: int, step: int) -> float:
    return lr


def loss_on(run: Run, images: torch.Tensor, labels: torch.Tensor, text: torch.Tensor | None = None,
            join=lambda: None) -> torch.Tensor:
    """Cross-entropy of the fixed-scale cosine logits (CLIP-LoRA's objective), the logits from fp32 features
    as in evaluation (`cosine_logits`)."""
    with run.autocast():
        if text is None:
            text, join = run.class_features_aside()
        img = unit(encode_image(run.clip, images))
        join()
    return F.cross_entropy(cosine_logits(img, text, run.logit_scale), labels)


def _accumulate(run: Run, micro_batches) -> torch.Tensor:
    """Forward and backward of every micro-batch; gradients sum to the full batch's. Returns the loss.

    Each micro-batch's mean loss is weighted by its share of the batch, so the sum is the batch's mean loss
    also when the last micro-batch of an epoch's short batch is smaller than the others.
    With accumulation the class features are encoded once per step, not once per micro-batch: each
    micro-batch backpropagates into a detached copy, and the summed gradient then flows through the text
    tower in one backward. Same gradients as the full batch, a single text pass instead of `accum`.
    """
    n = len(micro_batches)
    if n == 1:
        loss = loss_on(run, *micro_batches[0])
        loss.backward()
        return loss.detach()
    total_images = sum(len(labels) for _, labels in micro_batches)
    with run.autocast():
        text, join = run.class_features_aside()
    leaf = text.detach().requires_grad_(text.requires_grad)
    total = torch.zeros((), device=run.device)
    for i, (images, labels) in enumerate(micro_batches):
        # the first micro-batch's image tower runs beside the text tower and joins it before the logits
        loss = loss_on(run, images, labels, leaf, join if i == 0 else (lambda: None)) * (len(labels) / total_images)
        loss.backward()
        total += loss.detach()
    if text.requires_grad:
        text.backward(leaf.grad)
    return total


def optimizer_step(run: Run, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One eager optimizer step over the micro-batches of one batch (the last may be smaller).

    Dropout masks follow from the seed last given to `torch.manual_seed` (the loops seed every step).
    """
    run.blocks.seed(torch.initial_seed())
    run.set_lr()
    total = _accumulate(run, micro_batches)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return total


def groups_of(params) -> dict:
    """The params groups a step reads, by name: `build_run(..., **groups_of(p))` in tests and benchmarks."""
    return {"lora": params.lora, "train": params.train, "runtime": params.runtime}
