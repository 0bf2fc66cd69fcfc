"""Exact memory accounting: frozen bytes (quant state included), trainable state, saved activations."""
from __future__ import annotations

import pytest
import torch

from clip_qlora.core.base import make_base
from clip_qlora.core.memory import SavedActivations, frozen_weight_bytes, trainable_bytes, unique_bytes
from clip_qlora.core.model import block_linears
from clip_qlora.core.step import loss_on, optimizer_step, run_on_model, groups_of

from conftest import NF4, TINY

PROMPTS = [f"a photo of a class number {i}." for i in range(4)]


def test_unique_bytes_counts_each_storage_once():
    t = torch.zeros(10, 10)
    assert unique_bytes([t, t[:5], t.view(100), torch.zeros(3, dtype=torch.bfloat16)]) == 400 + 6


def test_frozen_bytes_are_exact_on_tiny():
    bf16, _ = make_base("clip-tiny", "none", "bf16", None, torch.bfloat16, "cpu")
    expected = sum(p.numel() * p.element_size() for p in bf16.parameters())
    expected += sum(b.numel() * b.element_size() for b in bf16.buffers())
    assert frozen_weight_bytes(bf16) == expected

    nf4, _ = make_base("clip-tiny", "none", "nf4", NF4, torch.bfloat16, "cpu")
    packed = absmax = nested = 0
    for _, _, _, lin in block_linears(nf4):
        n = lin.in_features * lin.out_features
        qs = lin.weight.quant_state
        packed += n // 2                               # two 4-bit codes a byte
        absmax += (n // 64) * 1                        # double quant: one uint8 absmax per 64 values
        nested += qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4 + qs.code.numel() * 4 + 4
    dense_rest = expected - sum(lin.in_features * lin.out_features * 2 for *_, lin in block_linears(bf16))
    assert frozen_weight_bytes(nf4) == dense_rest + packed + absmax + nested


@pytest.fixture(scope="module")
def vit_b16_runs():
    """ViT-B-16 random weights, fp32 compute (CPU bf16 is slow); one in-memory base per arm."""
    from clip_qlora import config

    p = config.load_with({**TINY, "model.arch": "ViT-B-16"})
    out = {}
    for arm, base, settings in (("lora", "bf16", None), ("qlora", "nf4", NF4)):
        model, meta = make_base("ViT-B-16", "none", base, settings, torch.float32, "cpu")
        out[arm] = (model, meta, p)
    return out


def saved_bytes(runs, method, batch=8):
    model, meta, p = runs[method.removesuffix("_gc")]
    run = run_on_model(model, meta, method, PROMPTS, "cpu", 10, **groups_of(p))
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % len(PROMPTS)
    acts = SavedActivations(run.model)
    with acts.track():
        loss = loss_on(run, images, labels)
    del loss
    # take the adapters out again: the next method starts from the same base (its BlockDropout replaces this
    # one's block forwards)
    run.model.unload()
    return acts.bytes


def test_vit_b16_nf4_frozen_bytes_ratio():
    bf16, _ = make_base("ViT-B-16", "none", "bf16", None, torch.bfloat16, "cpu")
    b = frozen_weight_bytes(bf16)
    del bf16
    nf4, _ = make_base("ViT-B-16", "none", "nf4", NF4, torch.bfloat16, "cpu")
    ratio = frozen_weight_bytes(nf4) / b
    print(f"ViT-B-16 frozen bytes: bf16 {b / 2**30:.4f} GiB, nf4/bf16 = {ratio:.4f}")
    assert 0.36 < ratio <= 0.40


def test_vit_b16_checkpointing_and_quantization_cut_saved_activations(vit_b16_runs):
    got = {m: saved_bytes(vit_b16_runs, m) for m in ("lora", "lora_gc", "qlora", "qlora_gc")}
    print({m: f"{v / 2**20:.1f} MiB" for m, v in got.items()})
    assert got["lora"] >= 3 * got["lora_gc"]
    assert got["qlora"] >= 3 * got["qlora_gc"]
    assert got["qlora"] <= got["lora"]  # no dequantized weight is kept for backward
    assert got["qlora_gc"] <= got["lora_gc"]


def test_trainable_state_bytes(saved_bases, tiny_params):
    from clip_qlora.core.base import load_base

    model, meta = load_base(saved_bases["bf16"], "cpu")
    run = run_on_model(model, meta, "lora", PROMPTS, "cpu", 10, **groups_of(tiny_params))
    n = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    optimizer_step(run, [(images, labels)])
    tb = trainable_bytes(run.model, run.optimizer)
    assert tb["trainable_params"] == n and tb["params"] == tb["grads"] == 4 * n
    # AdamW: exp_avg and exp_avg_sq in fp32 per parameter, plus a scalar step per tensor
    n_tensors = sum(1 for p in run.model.parameters() if p.requires_grad)
    assert tb["optimizer_state"] == 8 * n + 4 * n_tensors


@pytest.mark.parametrize("method", ["lora", "qlora", "qlora_gc"])
def test_saved_activations_under_accumulation_are_one_micro_batch(saved_bases, tiny_params, method):
    """Each micro-batch's saved tensors are freed by its backward: a 2x4 step needs what a 2x1 step needs
    (text tower once, plus one micro-batch), not four micro-batches' worth, and the same in both arms."""
    from clip_qlora.core.step import build_run

    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % len(PROMPTS)
    got = {}
    for accum in (1, 4):
        run = build_run(saved_bases["bf16" if method == "lora" else "nf4"], method, PROMPTS, "cpu", 10, **groups_of(tiny_params))
        acts = SavedActivations(run.model)
        with acts.track():
            optimizer_step(run, [(images[2 * i:2 * i + 2], labels[2 * i:2 * i + 2]) for i in range(accum)])
        got[accum] = (acts.bytes, acts.count)
    (one, n_one), (four, n_four) = got[1], got[4]
    assert one > 0 and four == one, got
    assert n_four > n_one  # four micro-batches did save their tensors: each was counted, then released
