"""The report's protocol section: what ran and each deviation from CLIP-LoRA, computed from the run's record."""
from __future__ import annotations

from clip_qlora import protocol as P
from clip_qlora import config

SPLIT = {"draw": "clip_lora: Python random seeded with the seed, ..."}
META = {"activation": "quick_gelu", "pretrained": "openai", "compute_dtype": "bfloat16"}


def test_the_shipped_recipe_is_clip_loras():
    rec = P.record(config.load_with().data, config.load_with().lora, config.load_with().train, SPLIT, META)
    devs = P.deviations(rec)
    assert devs[-len(P.ALWAYS):] == P.ALWAYS
    assert [d for d in devs if d not in P.ALWAYS] == [
        d for d in devs if d.startswith(("Training images", "Precision", "Adapter arithmetic"))]
    assert P.FUSED_QKV in devs  # train.fused_qkv is on in the shipped params
    precision = next(d for d in devs if d.startswith("Precision"))
    assert "computes in bfloat16" in precision and "bfloat16 autocast" in precision
    assert rec["split_draw_detail"] == SPLIT["draw"]


def test_each_departure_from_the_recipe_is_listed():
    p = config.load_with()
    p.data.split_draw, p.train.batching, p.lora.r, p.train.decode_short_side = "keyed", "full", 8, 0
    p.train.fused_qkv = False  # PEFT's own modules: no arithmetic deviation
    devs = P.deviations(P.record(p.data, p.lora, p.train, SPLIT, {**META, "activation": "gelu"}))
    extra = [d for d in devs if d not in P.ALWAYS and not d.startswith("Precision")]
    assert any(d.startswith("Few-shot draw: 'keyed'") for d in extra)
    assert any(d.startswith("Batching: 'full'") for d in extra)
    assert any(d.startswith("LoRA rank: 8 where CLIP-LoRA uses 2") for d in extra)
    assert any("QuickGELU" in d for d in extra)
    assert not any(d.startswith("Training images") for d in extra)  # full resolution: no such deviation
    assert len(extra) == 4


def test_markdown_groups_identical_records():
    rec = P.record(config.load_with().data, config.load_with().lora, config.load_with().train, SPLIT, META)
    text = "\n".join(P.markdown({"lora/eurosat": rec, "qlora/eurosat": rec}))
    assert text.count("What ran:") == 1 and "Runs " not in text
    other = {**rec, "batching": "full"}
    text = "\n".join(P.markdown({"lora/eurosat": rec, "qlora/eurosat": other}))
    assert text.count("What ran:") == 2 and "Runs qlora/eurosat:" in text


def test_precision_says_what_ran():
    rec = P.record(config.load_with().data, config.load_with().lora, config.load_with().train, SPLIT, {**META, "compute_dtype": "float32"})
    precision = next(d for d in P.deviations(rec) if d.startswith("Precision"))
    assert "computes in float32" in precision and "no autocast" in precision
