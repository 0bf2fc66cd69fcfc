"""Loading, attention surgery, precision policy and exact text context (issue: model core 1-3, 7)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from clip_qlora.core import model as M
from clip_qlora.core.base import make_base
from clip_qlora.core.random_base import parameter_count
from clip_qlora.runtime.io import UserError

PROMPTS = ["a photo of a red circle.", "a photo of a blue square.", "x", "a photo of a very, very long name."]


def _pair(arch):
    ref, _ = M.create_clip(arch, "none")
    ref.eval()
    split = M.split_attention(copy.deepcopy(ref)).eval()
    return ref, split


@pytest.mark.parametrize("arch", ["clip-tiny", "ViT-B-16"])
def test_split_attention_keeps_features(arch):
    ref, split = _pair(arch)
    size = M.preprocess_stats(ref)[0]
    img = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tok = open_clip.get_tokenizer(arch)(PROMPTS)
    with torch.no_grad():
        assert (ref.encode_image(img) - M.encode_image(split, img)).abs().max() <= 1e-5
        assert (ref.encode_text(tok) - M.encode_text(split, tok)).abs().max() <= 1e-5
    for tower in (split.visual.transformer, split.transformer):
        for block in tower.resblocks:
            assert isinstance(block.attn, M.SplitAttention)
            assert all(isinstance(getattr(block.attn, n), nn.Linear)
                       for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert split.transformer.resblocks[0].attn.causal and not split.visual.transformer.resblocks[0].attn.causal


def test_truncated_text_context_is_exact():
    _, split = _pair("clip-tiny")
    full = open_clip.get_tokenizer("clip-tiny")(PROMPTS)
    short = M.TextTokens.from_prompts(PROMPTS, "clip-tiny").tokens
    assert short.shape[1] < 20 < full.shape[1] == 77
    assert short.shape[1] == int(full.argmax(-1).max()) + 1  # ends at the longest prompt's EOT
    with torch.no_grad():
        assert (M.encode_text(split, full) - M.encode_text(split, short)).abs().max() <= 1e-5


def test_both_arms_share_every_non_quantized_dtype():
    """The two arms differ only in how frozen block Linear weights are stored."""
    arms = {}
    for base, settings in (("bf16", None), ("nf4", {"type": "nf4", "double_quant": True, "blocksize": 64})):
        model, _ = make_base("clip-tiny", "none", base, settings, torch.bfloat16, "cpu")
        quantized = {f"{n}.weight" for n, *_ in M.block_linears(model)}
        arms[base] = {k: v.dtype for k, v in model.state_dict().items()
                      if k in dict(model.named_parameters()) or k in dict(model.named_buffers())
                      if k not in quantized}
        ln = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        assert ln and all(m.weight.dtype == torch.float32 for m in ln)
        # open_clip's text cast dtype must stay the compute dtype, not the 4-bit storage's uint8
        assert model.transformer.get_cast_dtype() == torch.bfloat16
    assert arms["bf16"] == arms["nf4"]
    assert arms["bf16"]["token_embedding.weight"] == torch.bfloat16


def test_random_init_is_flagged_and_seeded():
    a, pre_a = M.create_clip("clip-tiny", "none")
    b, _ = M.create_clip("clip-tiny", "none")
    assert pre_a is False
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_local_checkpoint_loads_exactly(tmp_path, fmt):
    torch.manual_seed(123)
    src = open_clip.create_model("clip-tiny")
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"ckpt.{fmt}"
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save({"state_dict": sd}, path)
    model, pretrained = M.create_clip("clip-tiny", str(path), quick_gelu=False)
    assert pretrained is True
    assert torch.equal(model.token_embedding.weight, src.token_embedding.weight)


def test_uncached_tag_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # huggingface_hub read both at import, before this test: without these it would try the network, retrying
    # (about 45 s here, where there is none), instead of the offline path a user with HF_HUB_OFFLINE=1 takes
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as e:
        M.create_clip("RN50", "openai")
    msg = str(e.value)
    assert "\n" not in msg and "RN50/openai" in msg
    assert "local" in msg and "network" in msg  # the two ways to provide the weights


@pytest.mark.parametrize("arch,pretrained,needle", [
    ("ViT-Nope", "none", "model.arch"),
    ("clip-tiny", "no-such-tag", "model.pretrained"),
    ("clip-tiny", "/nonexistent/weights.safetensors", "not found"),
])
def test_bad_model_settings(arch, pretrained, needle):
    with pytest.raises(UserError, match=needle):
        M.create_clip(arch, pretrained)


# ---- the activation the weights were trained with (QuickGELU for OpenAI's) -----------------------------------

@pytest.mark.parametrize("arch,pretrained,setting,expected", [
    ("ViT-B-16", "openai", "auto", True),              # the tag's pretrained config says quick_gelu
    ("ViT-B-16", "laion2b_s34b_b88k", "auto", False),  # trained with exact GELU
    ("ViT-B-16", "none", "auto", False),               # random weights: the architecture's own config
    ("ViT-B-16-quickgelu", "none", "auto", True),
    ("ViT-B-16", "openai", False, False),              # an explicit setting wins
    ("ViT-B-16", "none", True, True),
])
def test_quick_gelu_resolution(arch, pretrained, setting, expected):
    assert M.resolve_quick_gelu(arch, pretrained, setting) is expected


@pytest.mark.parametrize("arch,model,expected", [
    ("ViT-B-16", dict(arch="ViT-B-16", pretrained="openai", quick_gelu="auto"), True),   # the study's: QuickGELU
    ("ViT-B-16", dict(arch="ViT-B-16", pretrained="openai", quick_gelu=False), False),  # --set model.quick_gelu
    ("ViT-B-16", dict(arch="clip-tiny", pretrained="none", quick_gelu="auto"), False),  # not the configured arch
    ("ViT-L-14", dict(arch="ViT-B-16", pretrained="openai", quick_gelu="auto"), False),  # its own config: GELU
])
def test_benchmarks_build_the_studys_activation(arch, model, expected):
    """Random weights standing in for the configured model run the function the study trains: speed and
    memory depend on it (QuickGELU: three kernels and one more kept tensor per block)."""
    assert M.stand_in_quick_gelu(arch, SimpleNamespace(**model)) is expected


def _message(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    return str(e.value)


@pytest.mark.parametrize("key,value,build", [
    ("model.arch", "vit_b/16", lambda: M.create_clip("vit_b/16", "none")),
    ("scale.archs", ["vit_b/16"], lambda: parameter_count("vit_b/16")),
    ("model.quick_gelu", "yes", lambda: M.resolve_quick_gelu("clip-tiny", "none", "yes")),
])
def test_a_bad_architecture_or_activation_is_one_line_wherever_it_is_caught(key, value, build):
    """Checking params and building a model run the one check (archs.check, archs.check_quick_gelu)."""
    from clip_qlora import config

    line = _message(lambda: config.load_with({key: value}))
    assert line.startswith(f"params: {key} = ")
    assert _message(build) == line and "\n" not in line


def test_local_checkpoint_needs_an_explicit_activation(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(UserError, match="model.quick_gelu") as e:
        M.create_clip("clip-tiny", str(path))
    assert "\n" not in str(e.value) and "true" in str(e.value)


@pytest.mark.parametrize("setting", [True, False])
def test_activation_is_built_in_every_block_and_survives_a_reload(tmp_path, setting):
    from clip_qlora.core.base import load_base, save_base

    model, meta = make_base("clip-tiny", "none", "nf4", {"type": "nf4", "double_quant": True, "blocksize": 64,
                                                         "expand_absmax": True},
                            torch.float32, "cpu", quick_gelu=setting)
    assert M.uses_quick_gelu(model) is setting
    assert meta["activation"] == ("quick_gelu" if setting else "gelu")
    save_base(model, meta, tmp_path / "nf4")
    again, meta2 = load_base(tmp_path / "nf4", "cpu")
    assert M.uses_quick_gelu(again) is setting and meta2["activation"] == meta["activation"]
    tok = M.TextTokens.from_prompts(PROMPTS, "clip-tiny").tokens
    with torch.no_grad():
        assert torch.equal(M.encode_text(model, tok), M.encode_text(again, tok))


def test_the_two_activations_compute_different_functions():
    """Why it matters: the same weights give other features under the other activation."""
    gelu, _ = M.create_clip("clip-tiny", "none", quick_gelu=False)
    quick, _ = M.create_clip("clip-tiny", "none", quick_gelu=True)
    quick.load_state_dict(gelu.state_dict())
    img = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(gelu.encode_image(img), quick.encode_image(img), atol=1e-4)


def test_architectures_read_without_open_clip_are_open_clips():
    """config checks model.arch from the config files (no torch); the names and configs are open_clip's own."""
    from clip_qlora.core import archs

    M.register_configs()
    assert list(archs.configs()) and set(archs.configs()) == set(open_clip.list_models())
    for arch in ("ViT-B-16", "clip-tiny"):
        assert archs.configs()[arch] == open_clip.get_model_config(arch)
        assert archs.tower_depth(arch, "text") == open_clip.get_model_config(arch)["text_cfg"]["layers"]


def test_every_compute_dtype_params_accept_is_a_torch_dtype_of_its_width():
    """config.DTYPES is the one table: its names are what model.compute_dtype accepts, its values torch's."""
    from clip_qlora import config
    from clip_qlora.core.base import resolve_dtype

    for name in config.DTYPES:
        dtype = resolve_dtype(name, "cpu")
        assert dtype.is_floating_point and dtype.itemsize * 8 == int(name[2:]), name
    assert resolve_dtype("auto", "cpu") == torch.float32
