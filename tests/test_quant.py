"""4-bit base: quantization settings, closeness to the bf16 features, save/reload without re-quantizing."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F

from clip_qlora.core.base import load_base, make_base, save_base
from clip_qlora.core.memory import frozen_weight_bytes
from clip_qlora.core.model import TextTokens, block_linears, encode_image, encode_text

from conftest import NF4

PROMPTS = ["a photo of a red circle.", "a photo of a blue square.", "a photo of a green star."]


def _features(model):
    tok = TextTokens.from_prompts(PROMPTS, "clip-tiny").tokens
    img = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return F.normalize(encode_image(model, img), dim=-1), F.normalize(encode_text(model, tok), dim=-1)


@pytest.mark.parametrize("qtype,double,blocksize", [("nf4", True, 64), ("nf4", False, 128), ("fp4", True, 256)])
def test_every_block_linear_quantized_with_settings(qtype, double, blocksize):
    settings = {"type": qtype, "double_quant": double, "blocksize": blocksize}
    model, meta = make_base("clip-tiny", "none", "nf4", settings, torch.float32, "cpu")
    layers = list(block_linears(model))
    assert len(layers) == 2 * 2 * 6  # two towers x two blocks x (q, k, v, out, c_fc, c_proj)
    for _, _, _, lin in layers:
        assert isinstance(lin, bnb.nn.Linear4bit)
        qs = lin.weight.quant_state
        assert (qs.quant_type, qs.blocksize, qs.nested) == (qtype, blocksize, double)
        assert lin.weight.dtype == torch.uint8 and lin.weight.numel() * 2 == lin.in_features * lin.out_features
    # everything outside the blocks stays in the compute dtype
    assert model.token_embedding.weight.dtype == torch.float32 and model.visual.conv1.weight.dtype == torch.float32
    assert meta["settings"] == settings


def test_quantized_features_stay_close_to_full_precision():
    full, _ = make_base("clip-tiny", "none", "bf16", None, torch.float32, "cpu")
    q, _ = make_base("clip-tiny", "none", "nf4", {"type": "nf4", "double_quant": True, "blocksize": 64},
                     torch.float32, "cpu")
    (fi, ft), (qi, qt) = _features(full), _features(q)
    cos_img, cos_txt = (fi * qi).sum(-1), (ft * qt).sum(-1)
    print(f"NF4 vs full precision cosine: image min {cos_img.min():.4f}, text min {cos_txt.min():.4f}")
    assert cos_img.min() > 0.95 and cos_txt.min() > 0.95
    assert cos_img.min() < 1 - 1e-6  # it really is quantized


@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_saved_base_reloads_identically(saved_bases, base):
    a, meta = load_base(saved_bases[base], "cpu")
    b, _ = load_base(saved_bases[base], "cpu")
    fa, fb = _features(a), _features(b)
    assert torch.equal(fa[0], fb[0]) and torch.equal(fa[1], fb[1])
    assert frozen_weight_bytes(a) == frozen_weight_bytes(b)
    if base == "nf4":
        assert all(isinstance(lin, bnb.nn.Linear4bit) for *_, lin in block_linears(a))
        assert a.transformer.get_cast_dtype() == torch.float32  # not uint8


def test_reload_matches_the_model_that_was_saved(tmp_path):
    model, meta = make_base("clip-tiny", "none", "nf4", NF4, torch.float32, "cpu")
    save_base(model, meta, tmp_path / "nf4")
    again, _ = load_base(tmp_path / "nf4", "cpu")
    for (x, y) in zip(_features(model), _features(again)):
        assert torch.equal(x, y)


def test_expanded_absmax_gives_the_same_forward_and_backward_for_exact_bytes(saved_bases):
    from clip_qlora.core.backends import nf4

    nested, _ = load_base(saved_bases["nf4"], "cpu")
    expanded, _ = load_base(saved_bases["nf4"], "cpu")
    extra = 0
    for *_, lin in block_linears(expanded):
        qs = lin.weight.quant_state
        blocks = qs.absmax.numel()
        # fp32 instead of uint8 constants, and the nested state (absmax, code book, offset) no longer needed
        extra += blocks * 4 - blocks - (qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4 + 4)
    before = frozen_weight_bytes(expanded)
    nf4.for_training(expanded, {**NF4, "expand_absmax": True})
    assert all(not lin.weight.quant_state.nested for *_, lin in block_linears(expanded))
    assert frozen_weight_bytes(expanded) - before == extra  # (negative on clip-tiny: 1 KiB code books)

    img = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (nested, expanded):
        x = img.clone().requires_grad_(True)
        out = encode_image(model, x)
        out.square().sum().backward()  # backward dequantizes again: the input gradient goes through it
        grads.append((out.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0
    for a, b in zip(_features(nested), _features(expanded)):
        assert torch.equal(a, b)
    nf4.for_training(nested, {**NF4, "expand_absmax": False})  # false leaves the double-quantized state alone
    assert all(lin.weight.quant_state.nested for *_, lin in block_linears(nested))


def test_loading_a_saved_base_says_nothing_about_random_weights(saved_bases, caplog):
    import logging

    caplog.set_level(logging.INFO)
    for base in ("bf16", "nf4"):
        load_base(saved_bases[base], "cpu")
    assert "random" not in caplog.text.lower()


def test_a_reloaded_base_has_every_buffer_of_the_saved_one(tmp_path):
    """The causal mask is not saved (open_clip's persistent=False): the reload must rebuild it exactly."""
    model, meta = make_base("clip-tiny", "none", "bf16", None, torch.bfloat16, "cpu")
    save_base(model, meta, tmp_path / "bf16")
    again, _ = load_base(tmp_path / "bf16", "cpu")
    mine, theirs = dict(model.named_buffers()), dict(again.named_buffers())
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), name


def test_evaluation_runs_the_function_training_ran(saved_bases):
    """A 4-bit Linear gives the same output without grad in eval mode (how evaluation calls it) as with grad
    in train mode: bitsandbytes would otherwise repack the weight on a CPU with AVX512-BF16 and multiply in
    bf16 (the machine CI runs on has it)."""
    model, _ = load_base(saved_bases["nf4"], "cpu")
    lin = next(lin for *_, lin in block_linears(model))
    x = torch.randn(5, lin.in_features, generator=torch.Generator().manual_seed(0))
    lin.train()
    trained = lin(x.clone().requires_grad_(True)).detach()
    lin.eval()
    with torch.no_grad():
        assert torch.equal(lin(x), trained)
        assert torch.equal(lin(x), trained)  # and again: nothing was repacked by the first call
