"""PEFT LoRA on chosen towers, matrices and blocks; CLIP-LoRA scaling; PEFT's own save format."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel

from clip_qlora.core import adapters as ad
from clip_qlora.core.base import load_base
from clip_qlora.core.model import encode_image


def lora(**kw):
    base = dict(r=2, alpha=1, dropout=0.25, towers=["vision", "text"], targets=["q", "k", "v"], layers="all",
                scaling="rslora")
    return SimpleNamespace(**{**base, **kw})


def adapted(peft_model):
    return sorted({n.split(".lora_")[0].removeprefix("base_model.model.")
                   for n, _ in peft_model.named_parameters() if ".lora_" in n})


@pytest.mark.parametrize("kw,expected", [
    ({}, [f"{p}.resblocks.{i}.attn.{m}_proj" for p in ("transformer", "visual.transformer")
          for i in (0, 1) for m in "kqv"]),
    ({"towers": ["vision"], "targets": ["q", "out"]},
     [f"visual.transformer.resblocks.{i}.attn.{m}_proj" for i in (0, 1) for m in ("out", "q")]),
    ({"towers": ["text"], "layers": [1]}, [f"transformer.resblocks.1.attn.{m}_proj" for m in "kqv"]),
])
def test_adapter_placement(saved_bases, kw, expected):
    model, _ = load_base(saved_bases["bf16"], "cpu")
    pm = ad.add_adapters(model, lora(**kw))
    assert adapted(pm) == sorted(expected)
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if p.requires_grad)
    assert all(".lora_" in n for n, p in pm.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("scaling,r,expected", [("rslora", 2, 1 / math.sqrt(2)), ("standard", 2, 0.5),
                                               ("rslora", 8, 1 / math.sqrt(8))])
def test_scaling(saved_bases, scaling, r, expected):
    model, _ = load_base(saved_bases["nf4"], "cpu")
    pm = ad.add_adapters(model, lora(scaling=scaling, r=r))
    layer = ad.inner(pm).visual.transformer.resblocks[0].attn.q_proj
    assert layer.scaling["default"] == pytest.approx(expected)


@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_peft_format_roundtrip(saved_bases, tmp_path, base):
    model, _ = load_base(saved_bases[base], "cpu")
    torch.manual_seed(0)
    pm = ad.add_adapters(model, lora(dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ad.save_adapters(pm, tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["use_rslora"] is True
    # a plain PEFT user loads it onto the same base
    fresh, _ = load_base(saved_bases[base], "cpu")
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path))
    img = torch.randn(2, 3, 64, 64)
    pm.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(encode_image(ad.inner(pm), img), encode_image(ad.inner(loaded), img))


def test_merge_on_bf16_base_keeps_outputs(saved_bases, tmp_path):
    model, _ = load_base(saved_bases["bf16"], "cpu")
    pm = ad.add_adapters(model, lora(dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    pm.eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = encode_image(ad.inner(pm), img)
        merged = pm.merge_and_unload()
        after = encode_image(merged, img)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert (before - after).abs().max() <= 1e-5
