"""The shared training step: checkpointing gives the same gradients, accumulation averages exactly,
frozen text features are encoded once."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from clip_qlora.data.images import TrainImages
from clip_qlora.core.step import _accumulate, build_run, loss_on, optimizer_step, groups_of
from clip_qlora.data.batches import batch_indices

PROMPTS = [f"a photo of a {c} shape." for c in ("red", "green", "blue", "yellow")]


def _run(saved_bases, params, method, steps=10):
    base = saved_bases["bf16" if method.startswith("lora") else "nf4"]
    torch.manual_seed(0)
    run = build_run(base, method, PROMPTS, "cpu", steps, **groups_of(params))
    with torch.no_grad():  # lora_B starts at zero, which would make lora_A's gradient zero too
        for n, p in run.model.named_parameters():
            if "lora_B" in n:
                # crc32, not hash(): str hashes change with every interpreter (PYTHONHASHSEED)
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
    return run


def _grads(run, images, labels, seed=7):
    run.optimizer.zero_grad(set_to_none=True)
    run.blocks.seed(seed)  # same dropout masks in both runs: each block draws from its own seeded generator
    loss_on(run, images, labels).backward()
    return {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arm", ["lora", "qlora"])
def test_checkpointing_gives_same_nonzero_grads(saved_bases, tiny_params, arm):
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    plain = _grads(_run(saved_bases, tiny_params, arm), images, labels)
    gc_run = _run(saved_bases, tiny_params, f"{arm}_gc")
    assert gc_run.blocks.checkpointing and not gc_run.clip.transformer.grad_checkpointing
    gc = _grads(gc_run, images, labels)
    other_masks = _grads(gc_run, images, labels, seed=8)
    assert plain.keys() == gc.keys()
    towers = {("visual" in n) for n in gc}
    assert towers == {True, False}  # both towers' adapters are trained
    for n, g in gc.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n
        assert (g - plain[n]).abs().max() <= 1e-5, n
    # dropout is really on (p=0.25) and follows the step's seed: other masks give other gradients
    assert any((other_masks[n] - gc[n]).abs().max() > 1e-4 for n in gc)


def test_a_base_reused_for_another_run_trains_as_a_fresh_one(saved_bases, tiny_params):
    """Tests reuse one in-memory base across runs (test_memory): the next run's BlockDropout takes the blocks
    over from the last run's, checkpointed or not, so nothing needs undoing beyond unloading the adapters."""
    from clip_qlora.core.base import load_base
    from clip_qlora.core.step import run_on_model

    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])

    def grads(model, meta):
        run = run_on_model(model, meta, "lora", PROMPTS, "cpu", 10, seed=3, **groups_of(tiny_params))
        with torch.no_grad():
            for n, p in run.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
        return _grads(run, images, labels)

    model, meta = load_base(saved_bases["bf16"], "cpu")
    run_on_model(model, meta, "lora_gc", PROMPTS, "cpu", 10, seed=5, **groups_of(tiny_params)).model.unload()
    reused, fresh = grads(model, meta), grads(*load_base(saved_bases["bf16"], "cpu"))
    assert reused.keys() == fresh.keys() and all(torch.equal(reused[n], fresh[n]) for n in fresh)


def test_accumulation_equals_full_batch(saved_bases, tiny_params):
    """Micro-batches' gradients sum to the full batch's and the returned loss is the full batch's.

    Gradients, not weights after an AdamW step, are compared: the first AdamW update is lr * g / (|g| + eps),
    which turns the float rounding of a near-zero gradient into a full-size difference of the weight."""
    tiny_params.lora.dropout = 0.0  # no masks: both paths see identical functions
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    grads, losses = [], []
    for accum in (1, 4):
        run = _run(saved_bases, tiny_params, "lora")
        micro = 8 // accum
        run.optimizer.zero_grad(set_to_none=True)
        losses.append(_accumulate(run, [(images[i * micro:(i + 1) * micro], labels[i * micro:(i + 1) * micro])
                                        for i in range(accum)]))
        grads.append({n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and {("visual" in n) for n in grads[0]} == {True, False}
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for n, full in grads[0].items():
        # float sums in another order: equal up to rounding at the scale of the tensor's largest entries
        # (a single entry that is a near-cancellation carries that rounding, so no per-entry relative bound)
        assert full.abs().max() > 0, n
        assert (grads[1][n] - full).abs().max() <= 1e-4 * full.abs().max(), n


def test_frozen_text_tower_features_encoded_once(saved_bases, tiny_params):
    tiny_params.lora.towers = ["vision"]
    run = _run(saved_bases, tiny_params, "lora")
    assert not run.text_trainable
    first = run.class_features()
    assert first is run.class_features() and not first.requires_grad
    tiny_params.lora.towers = ["vision", "text"]
    run = _run(saved_bases, tiny_params, "lora")
    assert run.class_features().requires_grad


def test_batches_cover_each_image_once_per_epoch():
    n, batch = 10, 4
    seen = torch.cat([batch_indices(n, batch, seed=3, step=s, batching="full") for s in range(5)])  # two epochs
    assert sorted(seen[:10].tolist()) == sorted(seen[10:].tolist()) == list(range(n))
    assert torch.equal(batch_indices(n, batch, 3, 2, "full"), batch_indices(n, batch, 3, 2, "full"))
    assert not torch.equal(seen[:10], torch.cat([batch_indices(n, batch, 4, s, "full") for s in range(5)])[:10])


def test_epoch_batches_keep_the_short_last_batch_as_clip_lora_does():
    """4-shot EuroSAT: 40 images, batches of 32 and 8, each one iteration; a new shuffle every epoch."""
    n, batch = 40, 32
    sizes = [len(batch_indices(n, batch, 1, s)) for s in range(6)]
    assert sizes == [32, 8, 32, 8, 32, 8]
    for epoch in range(3):
        both = torch.cat([batch_indices(n, batch, 1, 2 * epoch), batch_indices(n, batch, 1, 2 * epoch + 1)])
        assert sorted(both.tolist()) == list(range(n))
    assert not torch.equal(batch_indices(n, batch, 1, 0), batch_indices(n, batch, 1, 2))
    # 2000 iterations see 40,000 images, as protocol.md counts for CLIP-LoRA
    assert sum(len(batch_indices(n, batch, 1, s)) for s in range(2000)) == 40_000
    assert len(batch_indices(48, 32, 5, 1)) == 16 and len(batch_indices(64, 32, 5, 1)) == 32


def test_short_batches_under_accumulation_equal_the_unsplit_batch(saved_bases, tiny_params):
    """An epoch's short last batch split into unequal micro-batches still gives the batch's mean loss."""
    tiny_params.lora.dropout = 0.0  # no masks: both paths see identical functions
    images = torch.randn(10, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 1, 2])
    after, losses = [], []
    for micro in (10, 4):  # 4 + 4 + 2
        run = _run(saved_bases, tiny_params, "lora")
        losses.append(float(optimizer_step(run, [(images[i:i + micro], labels[i:i + micro])
                                                 for i in range(0, 10, micro)])))
        after.append({n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad})
    assert abs(losses[0] - losses[1]) <= 1e-5
    for n in after[0]:
        assert (after[0][n] - after[1][n]).abs().max() <= 1e-6, n


def test_adapter_branch_runs_in_the_compute_dtype_in_both_arms(tmp_path, tiny_params):
    """Under bf16 autocast every adapter's dropout sees bf16 activations, in the bf16 and the 4-bit arm alike
    (PEFT's defaults would hand the bf16 arm fp32 copies and the 4-bit arm bf16). PEFT's modules run where
    train.fused_qkv is off (tests/test_qkv.py checks the fused path's dtypes)."""
    from conftest import NF4

    from clip_qlora.core.base import make_base, save_base

    tiny_params.train.fused_qkv = False
    seen = {}
    for base, settings in (("bf16", None), ("nf4", NF4)):
        model, meta = make_base("clip-tiny", "none", base, settings, torch.bfloat16, "cpu")
        save_base(model, meta, tmp_path / base)
        torch.manual_seed(0)
        run = build_run(tmp_path / base, "lora" if base == "bf16" else "qlora", PROMPTS, "cpu", 10, **groups_of(tiny_params))
        dtypes = []
        hooks = [m.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
                 for n, m in run.model.named_modules() if n.endswith("lora_dropout.default")]
        loss_on(run, torch.randn(2, 3, 64, 64), torch.tensor([0, 1])).backward()
        for h in hooks:
            h.remove()
        assert len(dtypes) == len(hooks) > 0
        seen[base] = set(dtypes)
    assert seen["bf16"] == seen["nf4"] == {torch.bfloat16}


def test_cublas_workspace_goes_to_torchs_variables(saved_bases, tiny_params, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE", raising=False)
    tiny_params.runtime.cublas_workspace_kib = 0
    _run(saved_bases, tiny_params, "lora")  # 0: torch's defaults stay untouched
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and "CUBLASLT_WORKSPACE_SIZE" not in os.environ
    tiny_params.runtime.cublas_workspace_kib = 1024
    _run(saved_bases, tiny_params, "lora")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":1024:1" and os.environ["CUBLASLT_WORKSPACE_SIZE"] == "1024"


def test_skipping_pefts_input_cast_keeps_loss_and_grads(tmp_path, tiny_params):
    """Under bf16 autocast the fp32 copy PEFT makes of each adapter input is cast straight back to bf16 for
    the matmul, so dropping it changes no number (dropout off: CPU draws masks per dtype)."""
    from clip_qlora.core.base import make_base, save_base

    tiny_params.lora.dropout = 0.0
    model, meta = make_base("clip-tiny", "none", "bf16", None, torch.bfloat16, "cpu")
    save_base(model, meta, tmp_path / "bf16")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1])
    out = []
    for cast in (True, False):
        run = _run({"bf16": tmp_path / "bf16"}, tiny_params, "lora")
        for m in run.model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = cast  # True = PEFT's default
        loss = loss_on(run, images, labels)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}))
    (l_cast, g_cast), (l_ours, g_ours) = out
    assert torch.equal(l_cast, l_ours)
    for n in g_cast:
        assert g_cast[n].abs().sum() > 0 and torch.allclose(g_cast[n], g_ours[n], rtol=1e-3, atol=1e-7), n


def test_precomputed_prompt_embeddings_give_the_same_class_features(saved_bases, tiny_params):
    import torch.nn.functional as F

    from clip_qlora.core.memory import frozen_weight_bytes
    from clip_qlora.core.model import encode_text

    tiny_params.lora.dropout = 0.0
    run = _run(saved_bases, tiny_params, "lora")
    assert run.text_input.shape[:2] == run.tokens.shape and not run.text_input.requires_grad
    with run.autocast():
        ours = run.class_features()
        through_the_table = F.normalize(encode_text(run.clip, run.tokens), dim=-1)
    assert torch.equal(ours, through_the_table)
    # static bytes per device: everything is on the CPU here, nothing on a GPU
    assert frozen_weight_bytes(run.model, "cpu") == frozen_weight_bytes(run.model) > 0
    assert frozen_weight_bytes(run.model, "cuda") == 0


def test_expanded_absmax_trains_identically(saved_bases, tiny_params, tmp_path):
    """quant.expand_absmax reaches training through the saved base's settings (so the method pointers change
    with it) and changes no gradient."""
    import json
    import shutil

    import bitsandbytes as bnb

    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    shutil.copytree(saved_bases["nf4"], tmp_path / "nf4")
    meta = json.loads((tmp_path / "nf4" / "base.json").read_text())
    assert meta["settings"]["expand_absmax"] is True
    meta["settings"]["expand_absmax"] = False
    (tmp_path / "nf4" / "base.json").write_text(json.dumps(meta))
    grads = {}
    for expand in (False, True):
        run = _run({"nf4": saved_bases["nf4"] if expand else tmp_path / "nf4"}, tiny_params, "qlora_gc")
        linears = [m for m in run.clip.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert linears and all(m.weight.quant_state.nested != expand for m in linears)
        grads[expand] = _grads(run, images, labels)
    for n, g in grads[True].items():
        assert g.abs().sum() > 0 and torch.equal(g, grads[False][n]), n


def test_the_seed_sets_the_adapter_initialisation(saved_bases, tiny_params):
    def lora_a(seed):
        run = build_run(saved_bases["bf16"], "lora", PROMPTS, "cpu", 10, seed=seed, **groups_of(tiny_params))
        named = dict(run.model.named_parameters())
        assert all(not v.any() for k, v in named.items() if "lora_B" in k)  # B starts at zero: no change at step 0
        return torch.cat([v.flatten() for k, v in sorted(named.items()) if "lora_A" in k])

    one = lora_a(1)
    assert torch.equal(one, lora_a(1))
    assert not torch.equal(one, lora_a(2))


def test_resume_fingerprint_ignores_runtime_knobs_only(tiny_params):
    """A checkpoint written with other runtime knobs is resumed (they change no number); any other change
    to what training computes (a train.* value, the base's settings) discards it."""
    import copy

    from clip_qlora.jobs.checkpoint import run_fingerprint

    meta = {"arch": "clip-tiny", "base": "nf4", "settings": {"expand_absmax": True}}
    images = TrainImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [(4, 4), (4, 4)], torch.tensor([0, 1]))

    def fingerprint(params, meta=meta):
        return run_fingerprint("qlora", 1, params.data.shots, params.lora, params.train, meta, images)

    reference = fingerprint(tiny_params)
    for key, value in (("cuda_graph", False), ("cublas_workspace_kib", 0), ("overlap_text", False),
                       ("layernorm_in_compute_dtype", False), ("fused_activation", False), ("checkpoint_every", 7),
                       ("eval_workers", 3)):
        p = copy.deepcopy(tiny_params)
        setattr(p.runtime, key, value)
        assert fingerprint(p) == reference, key
    for key, value in (("lr", tiny_params.train.lr * 2), ("fused_qkv", not tiny_params.train.fused_qkv)):
        p = copy.deepcopy(tiny_params)
        setattr(p.train, key, value)  # a recipe change: fused_qkv moves the adapters by float rounding
        assert fingerprint(p) != reference, key
    assert fingerprint(tiny_params, {**meta, "settings": {"expand_absmax": False}}) != reference
