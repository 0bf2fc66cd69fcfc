"""`model.pretrained: openai` through the same code as `make run`, offline.

open_clip finds the `openai` weights of ViT-B-16 in the Hugging Face cache under the hub repo
timm/vit_base_patch16_clip_224.openai (file open_clip_model.safetensors). A temporary cache holding random
weights under that name, with HF_HUB_OFFLINE=1, lets the real quantize stage load them as if they were
OpenAI's, so the test sees the activation the main study would run with.
"""
from __future__ import annotations

import json
import os

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import ENV, demo_params, run_stage, write_params

REPO_ID = "timm/vit_base_patch16_clip_224.openai"
COMMIT = "0" * 40


def fake_hub_cache(cache, state: dict) -> None:
    """The layout huggingface_hub resolves offline: refs/main -> snapshots/<commit>/<file>."""
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    save_file(state, str(snap / "open_clip_model.safetensors"))


@pytest.mark.slow
def test_openai_tag_builds_quick_gelu_in_every_block(tmp_path):
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"].startswith(REPO_ID)
    torch.manual_seed(7)
    src = open_clip.create_model("ViT-B-16", pretrained=None)
    # the plain config builds nn.GELU: what open_clip would run the openai weights with, warning only
    assert type(src.visual.transformer.resblocks[0].mlp.gelu) is torch.nn.GELU
    state = {k: v.half().contiguous() for k, v in src.state_dict().items()}
    fake_hub_cache(tmp_path / "hub", state)

    params = demo_params({"model.arch": "ViT-B-16", "model.pretrained": "openai", "model.compute_dtype": "bf16",
                          "model.device": "cpu"})
    proj = tmp_path / "proj"
    write_params(proj, params)
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    r = run_stage(proj, "quantize", "--base", "bf16", env=env)
    assert r.returncode == 0, r.stderr
    assert "QuickGELU mismatch" not in r.stderr

    meta = json.loads((proj / "models/bf16/base.json").read_text())
    assert meta["activation"] == "quick_gelu" and meta["is_pretrained"] is True
    static = json.loads((proj / "metrics/static/bf16.json").read_text())
    assert static["activation"] == "quick_gelu" and static["pretrained"] is True
    saved = load_file(str(proj / "models/bf16/model.safetensors"))
    # the weights came from the cache (split attention: q is the first third of the packed projection)
    w = state["visual.transformer.resblocks.3.attn.in_proj_weight"]
    assert torch.equal(saved["visual.transformer.resblocks.3.attn.q_proj.weight"], w[: w.shape[1]].bfloat16())

    from clip_qlora.core.base import load_base

    model, _ = load_base(proj / "models/bf16", "cpu")
    for tower in (model.visual, model):
        for block in tower.transformer.resblocks:
            assert type(block.mlp.gelu).__name__ == "QuickGELU"
    assert len(model.visual.transformer.resblocks) == len(model.transformer.resblocks) == 12
