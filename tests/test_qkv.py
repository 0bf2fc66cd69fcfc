"""train.fused_qkv: one function for a block's q, k, v and their adapters must compute what PEFT's modules do
(same dropout masks, same gradients up to float rounding), keep PEFT's parameters and format, and cost no
second copy of the base; runtime.layernorm_in_compute_dtype switches only LayerNorms it can switch exactly.
The eager PEFT path stays the reference here; benchmarks/step_check.py compares the two on a GPU."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from clip_qlora.core import qkv
from clip_qlora.core.model import SplitAttention, layernorms_in_compute_dtype
from clip_qlora.core.step import build_run, loss_on, optimizer_step, groups_of

PROMPTS = [f"a photo of a {c} shape." for c in ("red", "green", "blue", "yellow")]


def _run(saved_bases, params, method, fused, seed=3):
    params = copy.deepcopy(params)
    params.train.fused_qkv = fused
    base = saved_bases["bf16" if method.startswith("lora") else "nf4"]
    run = build_run(base, method, PROMPTS, "cpu", 10, seed=seed, **groups_of(params))
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without a gradient
        g = torch.Generator().manual_seed(11)
        for n, p in sorted(run.model.named_parameters()):
            if "lora_B" in n:
                p.normal_(std=0.1, generator=g)
    return run


def _batch(run, n=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, run.size, run.size, generator=g), torch.randint(0, len(PROMPTS), (n,), generator=g)


def _grads(run, x, y, seed=7):
    run.optimizer.zero_grad(set_to_none=True)
    run.blocks.seed(seed)
    loss = loss_on(run, x, y)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "lora_gc", "qlora", "qlora_gc"])
def test_fused_step_gives_pefts_loss_and_gradients(saved_bases, tiny_params, method):
    """Same loss and every adapter gradient within fp32 rounding: the masks are the same ones (a different
    draw would move the gradients by far more than 1e-4), and the rank padding adds exact zeros only."""
    ref, fused = _run(saved_bases, tiny_params, method, False), _run(saved_bases, tiny_params, method, True)
    assert getattr(fused.clip.visual.transformer.resblocks[0].attn, "fused_qkv", None) is not None
    assert getattr(ref.clip.visual.transformer.resblocks[0].attn, "fused_qkv", None) is None
    x, y = _batch(ref)
    loss_r, g_r = _grads(ref, x, y)
    loss_f, g_f = _grads(fused, x, y)
    assert abs(loss_f - loss_r) <= 1e-5 * abs(loss_r)
    assert g_r.keys() == g_f.keys() and len(g_r) == 24  # q, k, v x A, B x 2 blocks x 2 towers
    for n in g_r:
        scale = g_r[n].abs().max()
        assert scale > 0, n
        assert (g_f[n] - g_r[n]).abs().max() <= 1e-4 * scale, n
    # another dropout seed must give other gradients (the comparison above can see a wrong mask)
    _, g_other = _grads(fused, x, y, seed=8)
    assert max(float((g_other[n] - g_r[n]).abs().max() / g_r[n].abs().max()) for n in g_r) > 1e-2


def test_fused_training_keeps_pefts_rank_and_format(saved_bases, tiny_params, tmp_path):
    """The trained parameters stay PEFT's rank-r tensors (padding lives only inside the function), a few
    optimizer steps train the same adapters, and what is saved loads as a rank-r PEFT adapter."""
    from clip_qlora.core import adapters as ad

    runs = [_run(saved_bases, tiny_params, "lora", f) for f in (False, True)]
    x, y = _batch(runs[0])
    for run in runs:
        for step in range(3):
            torch.manual_seed(100 + step)
            optimizer_step(run, [(x, y)])
    (a, b) = ({n: p.detach() for n, p in r.model.named_parameters() if p.requires_grad} for r in runs)
    r = tiny_params.lora.r
    for n, p in b.items():
        assert p.shape[0 if "lora_A" in n else 1] == r, n
        assert (p - a[n]).abs().max() <= 1e-4 * a[n].abs().max(), n
    ad.save_adapters(runs[1].model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(b) and all(t.shape[0 if "lora_A" in k else 1] == r for k, t in saved.items())


def test_bf16_base_weights_become_views_of_one_stacked_tensor(saved_bases, tiny_params):
    """No second copy of the frozen base: q, k, v weights and biases of a fused block share one storage."""
    run = _run(saved_bases, tiny_params, "lora", True)
    attn = run.clip.visual.transformer.resblocks[0].attn
    stacked = attn.fused_qkv.weight()
    for j, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        w = proj.get_base_layer().weight
        assert w.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
        assert torch.equal(w, stacked[j * w.shape[0]:(j + 1) * w.shape[0]])
        assert not w.requires_grad


@pytest.mark.parametrize("expand_absmax", [True, False])
def test_nf4_weights_are_dequantized_once_to_the_values_of_the_three(saved_bases, tiny_params, tmp_path,
                                                                     expand_absmax):
    """With plain fp32 absmax (quant.expand_absmax) q, k and v's 4-bit weights become views of one 4-bit tensor
    whose single dequantization is bit for bit what dequantizing each gives; with the 8-bit absmax of double
    quantization left in place they stay three (dequantized one by one, as before)."""
    from bitsandbytes.functional import dequantize_4bit

    from clip_qlora.core.base import load_base

    params = copy.deepcopy(tiny_params)
    params.train.fused_qkv = False
    model, meta = load_base(saved_bases["nf4"], "cpu")
    meta = copy.deepcopy(meta)
    meta["settings"]["expand_absmax"] = expand_absmax
    from clip_qlora.core.step import run_on_model

    run = run_on_model(model, meta, "qlora", PROMPTS, "cpu", 10, **groups_of(params))
    attn = run.clip.visual.transformer.resblocks[0].attn
    projs = [attn.q_proj, attn.k_proj, attn.v_proj]
    each = torch.cat([dequantize_4bit(p.get_base_layer().weight.data, p.get_base_layer().weight.quant_state)
                      for p in projs])
    fused = qkv.FusedQKV(attn)
    assert (fused._packed is not None) == expand_absmax
    assert torch.equal(fused.weight(), each)
    if expand_absmax:
        data = fused._packed[0]
        for p in projs:  # no second copy: the Params4bit hold views of the stacked bytes, and read the same
            w = p.get_base_layer().weight
            assert w.data.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()
        assert torch.equal(torch.cat([dequantize_4bit(p.get_base_layer().weight.data,
                                                      p.get_base_layer().weight.quant_state) for p in projs]), each)


def test_only_attention_with_adapters_on_q_k_and_v_is_fused(saved_bases, tiny_params):
    """lora.targets without k, or adapters on one tower only: those blocks keep PEFT's modules."""
    p = copy.deepcopy(tiny_params)
    p.lora.targets = ["q", "v"]
    run = _run(saved_bases, p, "lora", True)
    assert not any(getattr(m, "fused_qkv", None) for m in run.clip.modules() if isinstance(m, SplitAttention))
    p = copy.deepcopy(tiny_params)
    p.lora.towers = ["vision"]
    run = _run(saved_bases, p, "lora", True)
    fused = [bool(getattr(m, "fused_qkv", None)) for m in run.clip.modules() if isinstance(m, SplitAttention)]
    assert sum(fused) == len(run.clip.visual.transformer.resblocks) and not all(fused)


def test_evaluation_uses_pefts_modules(saved_bases, tiny_params):
    """In eval mode (no dropout) the fused path is not taken: evaluation stays PEFT's own computation."""
    run = _run(saved_bases, tiny_params, "lora", True)
    calls = []
    original = qkv._QKV.apply
    qkv._QKV.apply = lambda *a: calls.append(1) or original(*a)
    try:
        run.model.eval()
        with torch.no_grad():
            loss_on(run, *_batch(run))
        assert not calls
        run.model.train()
        loss_on(run, *_batch(run))
        assert calls
    finally:
        qkv._QKV.apply = original


def test_fused_function_sees_the_compute_dtype_in_both_arms(tmp_path, tiny_params):
    """Under bf16 autocast the fused function's input, dropout and products are bf16 in the bf16 and the
    4-bit arm alike (as PEFT's modules are, tests/test_train_core.py)."""
    from conftest import NF4

    from clip_qlora.core.base import make_base, save_base

    seen = {}
    original = qkv._QKV.forward
    for base, settings in (("bf16", None), ("nf4", NF4)):
        model, meta = make_base("clip-tiny", "none", base, settings, torch.bfloat16, "cpu")
        save_base(model, meta, tmp_path / base)
        run = build_run(tmp_path / base, "lora" if base == "bf16" else "qlora", PROMPTS, "cpu", 10, **groups_of(tiny_params))
        dtypes = []

        def spy(ctx, x, proj, *lora):
            dtypes.append((x.dtype, proj.weight().dtype))
            return original(ctx, x, proj, *lora)

        qkv._QKV.forward = staticmethod(spy)
        try:
            loss_on(run, torch.randn(2, 3, 64, 64), torch.tensor([0, 1])).backward()
        finally:
            qkv._QKV.forward = staticmethod(original)
        assert len(dtypes) == 4  # 2 blocks x 2 towers
        seen[base] = set(dtypes)
    assert seen["bf16"] == seen["nf4"] == {(torch.bfloat16, torch.bfloat16)}


def test_layernorms_switch_only_where_their_weights_are_exact_in_the_compute_dtype():
    """A LayerNorm whose fp32 weights are bf16 values reads bf16 input directly (same result as the fp32
    round trip up to the kernel's own rounding); one whose weights would round keeps the round trip."""
    torch.manual_seed(0)
    exact, inexact = nn.LayerNorm(64), nn.LayerNorm(64)
    with torch.no_grad():
        exact.weight.copy_(torch.randn(64).bfloat16().float())
        exact.bias.copy_(torch.randn(64).bfloat16().float())
        inexact.weight.copy_(torch.randn(64) + 1e-3)  # not representable in bf16
    model = nn.Sequential(exact, inexact)
    assert layernorms_in_compute_dtype(model, torch.bfloat16) == 1
    assert "forward" in exact.__dict__ and "forward" not in inexact.__dict__
    x = torch.randn(8, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = exact(x)
    reference = nn.functional.layer_norm(x.float(), (64,), exact.weight, exact.bias, exact.eps)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() <= 2 ** -7 * reference.abs().max()  # one bf16 rounding
    assert exact(x.float()).dtype == torch.float32  # fp32 input: the module's own forward, unchanged


def test_adapter_kernel_triton_only_where_the_kernels_alone_draw(saved_bases, tiny_params):
    """train.adapter_kernel triton is kept when q, k, v are the only adapters drawing masks; an adapted out
    projection would draw after them from torch's generator, which the kernels do not advance: torch path."""
    p = copy.deepcopy(tiny_params)
    p.train.adapter_kernel = "triton"
    run = _run(saved_bases, p, "lora", True)
    kernels = {m.fused_qkv.kernel for m in run.clip.modules() if getattr(m, "fused_qkv", None)}
    assert kernels == {"triton"} and run.blocks.seeds is not None
    p.lora.targets = ["q", "k", "v", "out"]
    run = _run(saved_bases, p, "lora", True)
    assert {m.fused_qkv.kernel for m in run.clip.modules() if getattr(m, "fused_qkv", None)} == {"torch"}


def test_adapter_kernel_changes_nothing_on_a_cpu(saved_bases, tiny_params):
    """Without a GPU (and outside Triton's interpreter) the triton setting runs the torch path: same loss and
    gradients bit for bit, and the generators' offsets are the only draws."""
    runs = []
    for kernel in ("torch", "triton"):
        p = copy.deepcopy(tiny_params)
        p.train.adapter_kernel = kernel
        runs.append(_run(saved_bases, p, "lora", True))
    x, y = _batch(runs[0])
    (l0, g0), (l1, g1) = _grads(runs[0], x, y), _grads(runs[1], x, y)
    assert l0 == l1 and all(torch.equal(g0[n], g1[n]) for n in g0)
    assert all(s.forward.offset == 0 for s in runs[1].blocks.streams)  # nothing drew through blocks.Draws


def test_block_seeds_on_the_device_follow_the_generators(saved_bases, tiny_params):
    """blocks.Draws: seed() writes every block's seed where a captured kernel reads it and restarts the offsets;
    take() hands out torch's offsets (increments rounded up to 4)."""
    from clip_qlora.core.seeds import mix

    run = _run(saved_bases, tiny_params, "lora", True)
    blocks = run.blocks
    draws = blocks.streams[0].forward
    assert draws.take(20) == 0 and draws.take(6) == 20 and draws.take(4) == 28 and draws.offset == 32
    blocks.seed(1234)
    assert draws.offset == 0
    assert blocks.seeds.tolist() == [mix(1234, 7919 * (i + 1)) for i in range(len(blocks.streams))]
    assert [s.forward.generator.initial_seed() for s in blocks.streams] == blocks.seeds.tolist()
    assert all(int(s.forward.seed) == v for s, v in zip(blocks.streams, blocks.seeds.tolist()))


def test_adapter_kernel_without_triton_falls_back_once(saved_bases, tiny_params, monkeypatch, caplog):
    """A torch build without Triton: the triton setting runs the torch path and says so once, not per call."""
    import sys

    from clip_qlora.core import blocks

    p = copy.deepcopy(tiny_params)
    p.train.adapter_kernel = "triton"
    run = _run(saved_bases, p, "lora", True)
    fused = run.clip.visual.transformer.resblocks[0].attn.fused_qkv
    import clip_qlora.core

    monkeypatch.setitem(sys.modules, "clip_qlora.core.lora_triton", None)  # import raises ImportError
    monkeypatch.delattr(clip_qlora.core, "lora_triton", raising=False)   # (if an earlier test imported it)
    x = torch.randn(2, 5, fused._mods[0].in_features)
    with caplog.at_level("WARNING"), blocks.drawing_from(run.blocks.streams[0].forward):
        fused(x)
        fused(x)
    assert fused.kernel == "torch"
    assert sum("Triton cannot be imported" in r.message for r in caplog.records) == 1
