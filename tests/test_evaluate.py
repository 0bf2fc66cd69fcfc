"""One evaluation for both arms: the trained function, adapters unmerged, logits from fp32 features; the base's
zero-shot scored once, without PEFT."""
from __future__ import annotations

import torch

from clip_qlora import adapters as ad
from clip_qlora import evaluate as E
from clip_qlora import scoring as S
from clip_qlora.base import load_base, make_base, save_base
from clip_qlora.model import TextTokens, cosine_logits, encode_image, unit
from clip_qlora.train import build_run

PROMPTS = [f"a photo of a {c} shape." for c in ("red", "green", "blue", "yellow")]
from conftest import NF4  # noqa: E402  (the study's NF4 settings)


def _trained_adapters(base_dir, params, method, out, seed):
    """Adapters as training leaves them: lora_B moved away from zero (so the update is not a no-op)."""
    run = build_run(base_dir, params, method, PROMPTS, "cpu", 10, seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for n, p in run.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05, generator=gen)
    ad.save_adapters(run.model, out)


def test_bf16_arm_is_evaluated_with_the_function_it_trained(tmp_path, tiny_params):
    model, meta = make_base("clip-tiny", "none", "bf16", None, torch.bfloat16, "cpu")
    save_base(model, meta, tmp_path / "bf16")
    for seed in (1, 2):
        _trained_adapters(tmp_path / "bf16", tiny_params, "lora", tmp_path / f"seed{seed}", seed=seed)
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    # the evaluation path: both seeds' adapters on one base, seed 2 switched on
    base, _ = load_base(tmp_path / "bf16", "cpu")
    peft_model = E.with_adapters(base, {"1": tmp_path / "seed1", "2": tmp_path / "seed2"})
    peft_model.set_adapter("2")
    clip = ad.inner(peft_model)
    tokens = TextTokens.from_prompts(PROMPTS, "clip-tiny").tokens
    text = S.class_features(clip, tokens, "cpu", torch.bfloat16)
    ours = S.logits(clip, text, images, "cpu", torch.bfloat16)
    assert ours.dtype == torch.float32

    # the training path's forward (same adapters, loaded for training), dropout off
    run = build_run(tmp_path / "bf16", tiny_params, "lora", PROMPTS, "cpu", 10, adapter_dir=tmp_path / "seed2")
    run.model.eval()
    with torch.no_grad(), run.autocast():
        img = unit(encode_image(run.clip, images))
        trained = cosine_logits(img, run.class_features(), 100.0)
    assert torch.equal(ours, trained)

    # what the old evaluation did: the update merged into bf16 weights is another function
    merged = E.with_adapters(load_base(tmp_path / "bf16", "cpu")[0], {"2": tmp_path / "seed2"}).merge_and_unload()
    merged_logits = S.logits(merged, S.class_features(merged, tokens, "cpu", torch.bfloat16), images, "cpu",
                             torch.bfloat16)
    assert not torch.equal(merged_logits, ours)


def test_logits_are_fp32_under_bf16_autocast():
    a = unit(torch.randn(3, 8).bfloat16())
    b = unit(torch.randn(5, 8).bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cosine_logits(a, b, 100.0)
    assert out.dtype == torch.float32 and torch.equal(out, 100.0 * a @ b.t())


def test_each_seed_and_the_zero_shot_pass_see_only_their_own_function(tmp_path, tiny_params):
    """One pass, the base loaded once: a seed's result must not depend on the other seeds evaluated beside it;
    the zero-shot pass sees the base without adapters (what a PEFT model with its adapters disabled computes),
    one image forward serving every prompt set."""
    model, meta = make_base("clip-tiny", "none", "nf4", NF4, torch.float32, "cpu")
    save_base(model, meta, tmp_path / "nf4")
    for seed in (1, 2):
        _trained_adapters(tmp_path / "nf4", tiny_params, "qlora", tmp_path / f"seed{seed}", seed)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 64, 64, generator=gen), torch.randint(0, 4, (8,), generator=gen))
               for _ in range(3)]
    zero_shot = {"clip": PROMPTS, "coop": [f"{c} texture." for c in ("red", "green", "blue", "yellow")]}

    def run(dirs):
        return E.evaluate_method(tmp_path / "nf4", dirs, PROMPTS, ["r", "g", "b", "y"], lambda *_: batches, "cpu")

    both = run({"1": tmp_path / "seed1", "2": tmp_path / "seed2"})
    alone = run({"2": tmp_path / "seed2"})
    assert both["accuracy"]["2"] == alone["accuracy"]["2"]
    assert both["per_seed_per_class"]["2"] == alone["per_seed_per_class"]["2"]

    # the switching itself, on logits (a random tiny model's argmax is too coarse to show it)
    x = batches[0][0]
    tokens = TextTokens.from_prompts(PROMPTS, "clip-tiny").tokens

    def seed_logits(clip):
        return S.logits(clip, S.class_features(clip, tokens, "cpu", torch.float32), x, "cpu", torch.float32)

    two = E.with_adapters(load_base(tmp_path / "nf4", "cpu")[0], {"1": tmp_path / "seed1", "2": tmp_path / "seed2"})
    for seed in ("1", "2"):
        single = E.with_adapters(load_base(tmp_path / "nf4", "cpu")[0], {seed: tmp_path / f"seed{seed}"})
        two.set_adapter(seed)
        assert torch.equal(seed_logits(ad.inner(two)), seed_logits(ad.inner(single)))
    with two.disable_adapter():
        assert torch.equal(seed_logits(ad.inner(two)), seed_logits(load_base(tmp_path / "nf4", "cpu")[0]))
    two.set_adapter("1")
    one = seed_logits(ad.inner(two))
    two.set_adapter("2")
    assert not torch.equal(one, seed_logits(ad.inner(two)))

    base, _ = load_base(tmp_path / "nf4", "cpu")
    gold = torch.cat([y for _, y in batches])
    zs = S.zero_shot(*load_base(tmp_path / "nf4", "cpu"), zero_shot, lambda *_: batches, "cpu")
    for name, prompts in zero_shot.items():  # each prompt set scored on its own: the same accuracy
        text = S.class_features(base, TextTokens.from_prompts(prompts, "clip-tiny").tokens, "cpu", torch.float32)
        plain = torch.cat([S.logits(base, text, x, "cpu", torch.float32).argmax(-1) for x, _ in batches])
        assert zs["zero_shot"][name] == S.accuracy(plain, gold), name
    assert set(zs["zero_shot"]) == {"clip", "coop"} and zs["n_test"] == both["n_test"] == 24
    assert zs["passes"] == 1 and both["passes"] == 2
    assert "zero_shot" not in both
