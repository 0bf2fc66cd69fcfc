"""One evaluation for both arms: the trained function, adapters unmerged, logits from fp32 features; the base's
zero-shot scored once, without PEFT. The evaluation input: the reference's pixels by default, JPEG-free batches."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clip_qlora.core import adapters as ad
from clip_qlora.jobs import evaluate as E
from clip_qlora.core import scoring as S
from clip_qlora.core.base import load_base, make_base, save_base
from clip_qlora.core.model import TextTokens, cosine_logits, encode_image, unit
from clip_qlora.core.step import build_run, groups_of

PROMPTS = [f"a photo of a {c} shape." for c in ("red", "green", "blue", "yellow")]
from conftest import NF4  # noqa: E402  (the study's NF4 settings)


def _trained_adapters(base_dir, params, method, out, seed):
    """Adapters as training leaves them: lora_B moved away from zero (so the update is not a no-op)."""
    run = build_run(base_dir, method, PROMPTS, "cpu", 10, seed=seed, **groups_of(params))
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
    scale = tiny_params.train.logit_scale  # the stage passes train.logit_scale, as training's loss takes it
    ours = S.logits(clip, text, images, "cpu", torch.bfloat16, scale)
    assert ours.dtype == torch.float32

    # the training path's forward (same adapters, loaded for training), dropout off
    run = build_run(tmp_path / "bf16", "lora", PROMPTS, "cpu", 10, adapter_dir=tmp_path / "seed2", **groups_of(tiny_params))
    run.model.eval()
    with torch.no_grad(), run.autocast():
        img = unit(encode_image(run.clip, images))
        trained = cosine_logits(img, run.class_features(), run.logit_scale)
    assert torch.equal(ours, trained)

    # what the old evaluation did: the update merged into bf16 weights is another function
    merged = E.with_adapters(load_base(tmp_path / "bf16", "cpu")[0], {"2": tmp_path / "seed2"}).merge_and_unload()
    merged_logits = S.logits(merged, S.class_features(merged, tokens, "cpu", torch.bfloat16), images, "cpu",
                             torch.bfloat16, scale)
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
    scale = tiny_params.train.logit_scale

    def run(dirs):
        return E.evaluate_seeds(tmp_path / "nf4", dirs, PROMPTS, ["r", "g", "b", "y"], lambda *_: batches, "cpu",
                                scale)

    both = run({"1": tmp_path / "seed1", "2": tmp_path / "seed2"})
    alone = run({"2": tmp_path / "seed2"})
    assert both["accuracy"]["2"] == alone["accuracy"]["2"]
    assert both["per_seed_per_class"]["2"] == alone["per_seed_per_class"]["2"]

    # the switching itself, on logits (a random tiny model's argmax is too coarse to show it)
    x = batches[0][0]
    tokens = TextTokens.from_prompts(PROMPTS, "clip-tiny").tokens

    def seed_logits(clip):
        return S.logits(clip, S.class_features(clip, tokens, "cpu", torch.float32), x, "cpu", torch.float32,
                        scale)

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
    zs = S.zero_shot(*load_base(tmp_path / "nf4", "cpu"), zero_shot, lambda *_: batches, "cpu", scale)
    for name, prompts in zero_shot.items():  # each prompt set scored on its own: the same accuracy
        text = S.class_features(base, TextTokens.from_prompts(prompts, "clip-tiny").tokens, "cpu", torch.float32)
        plain = torch.cat([S.logits(base, text, x, "cpu", torch.float32, scale).argmax(-1) for x, _ in batches])
        assert zs["zero_shot"][name] == S.accuracy(plain, gold), name
    assert set(zs["zero_shot"]) == {"clip", "coop"} and zs["n_test"] == both["n_test"] == 24
    assert zs["passes"] == 1 and both["passes"] == 2
    assert "zero_shot" not in both


# ---- the evaluation input: the reference's pixels by default, and batches without a JPEG ------------------------

def _gpu_checks():
    from cli_helpers import load_benchmark

    return load_benchmark("gpu_checks")


def _cuda_like_decode_jpeg(calls: list):
    """torchvision's decode_jpeg as it behaves with device="cuda", on the CPU: a list must not be empty
    (ValueError, as torchvision raises on every device), and nvJPEG fails a whole batch (RuntimeError) on any
    file it cannot decode, here anything that is not a baseline JPEG."""
    from torchvision.io import decode_jpeg

    def decode(data, mode, device):
        calls.append(data)
        batch = data if isinstance(data, list) else [data]
        if not batch:
            raise ValueError("Input list must contain at least one element")
        if any(bytes(d[:2].tolist()) != b"\xff\xd8" for d in batch):
            raise RuntimeError("nvjpegDecodeBatchedPhaseOne failed")
        out = [decode_jpeg(d, mode=mode, device="cpu").to(device) for d in batch]
        return out if isinstance(data, list) else out[0]
    return decode


def _pil_rgb(path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("per_batch", [1, None])
def test_a_batch_without_a_jpeg_is_decoded_by_pil_not_nvjpeg(tmp_path, per_batch):
    """Issue 23 item 8: PNG (RGB, RGBA, palette, grey, 16-bit) and WebP files, one per batch or all in one, through
    the fast path's device decode with a decoder that behaves as CUDA's: none reaches it, each is PIL's pixels;
    a JPEG beside them still goes to the device decoder."""
    from torchvision.io import read_file

    from clip_qlora.data.images import _decode_many

    names = _gpu_checks().other_format_images(tmp_path)
    assert {n.rsplit(".", 1)[1] for n in names} == {"png", "webp"} and len(names) == 7
    calls = []
    groups = [names[i:i + (per_batch or len(names))] for i in range(0, len(names), per_batch or len(names))]
    for group in groups:
        paths = [tmp_path / n for n in group]
        decoded = _decode_many([read_file(str(p)) for p in paths], paths, "cpu", _cuda_like_decode_jpeg(calls))
        for image, path in zip(decoded, paths):
            assert image.dtype == torch.uint8 and torch.equal(image, _pil_rgb(path)), path.name
    assert calls == []

    _gpu_checks().synthetic_scene(90, 70, 1).save(tmp_path / "a.jpg", quality=90)
    paths = [tmp_path / "a.jpg", tmp_path / names[0]]
    decoded = _decode_many([read_file(str(p)) for p in paths], paths, "cpu", _cuda_like_decode_jpeg(calls))
    assert len(calls) == 1 and len(calls[0]) == 1  # one batch, the JPEG alone
    assert decoded[0].shape == (3, 70, 90) and torch.equal(decoded[1], _pil_rgb(paths[1]))


def test_the_fast_path_evaluates_a_folder_without_jpegs(tmp_path):
    """The whole fast path (torchvision's own decode_jpeg, which refuses an empty list on the CPU too) over a
    split of PNG and WebP files only, batches of 1 and of 4."""
    from clip_qlora.data.images import eval_batches

    names = _gpu_checks().other_format_images(tmp_path)
    split = {"test": [[n, k % 3] for k, n in enumerate(names)]}
    for batch in (1, 4):
        batches = list(eval_batches(split, tmp_path, 32, (0, 0, 0), (1, 1, 1), batch, 0, "cpu", "fast"))
        assert torch.cat([y for _, y in batches]).tolist() == [k % 3 for k in range(len(names))]
        assert torch.cat([x for x, _ in batches]).shape == (len(names), 3, 32, 32)


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_the_default_evaluation_input_is_the_references_pixels(tmp_path, device):
    """Issue 23 item 9: with params.yaml's eval.decode, on every device (the GPU's included: the PIL path never
    touches it), the inputs are CLIP-LoRA's, PIL decode, PIL bicubic resize and centre crop, computed here by
    PIL alone: exactly, on photo-like 4:2:0 JPEGs of dataset sizes (up- and downscaled) and on other formats."""
    from clip_qlora import config
    from clip_qlora.data.images import eval_batches

    checks = _gpu_checks()
    decode = config.load_with().eval.decode
    names = []
    for k, (w, h) in enumerate(checks.SIZES):
        checks.synthetic_scene(w, h, k).save(tmp_path / f"{k}.jpg", quality=90, subsampling=2)
        names.append(f"{k}.jpg")
    names += checks.other_format_images(tmp_path)
    split = {"test": [[n, 0] for n in names]}
    batches = eval_batches(split, tmp_path, 64, (0, 0, 0), (1, 1, 1), 5, 0, device, decode)
    ours = torch.cat([x for x, _ in batches]) * 255
    ref = torch.stack([torch.from_numpy(checks.reference_input(tmp_path / n, 64).copy()).permute(2, 0, 1)
                       for n in names])
    assert (ours - ref.float()).abs().max() < 1e-3  # float rounding of x / 255 * 255 only


def test_the_gpu_check_of_the_evaluation_input_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_checks.py's eval_input check, as the lead runs it once on a GPU, here with device cpu: the
    reference path within 0.01 grey levels (0 here) and every JPEG-free batch decoded."""
    checks = _gpu_checks()
    out = checks.eval_input(tmp_path, "cpu", size=48, batch_size=4, workers=0, max_photos=4)
    assert out["pass"]
    assert out["jpeg_reference"]["mean"] == 0 and out["jpeg_reference"]["n"] >= 4
    assert out["other_fast_batch1"]["n"] == 7 and out["other_decode_only"]["equal_to_pil"]
    # grey, CMYK and EXIF-tagged JPEGs (and the tagged one's picture untagged): torchvision's CPU decode gives
    # PIL's very pixels, unturned, and the tag changes none
    variants = out["jpeg_variants_decode_only"]["files"]
    assert set(variants) == {"grey.jpg", "cmyk.jpg", "exif_turned.jpg", "plain.jpg"}
    assert all(v["mean"] == 0 and v["shape"] == [120, 160, 3] for v in variants.values()), variants
    assert variants["exif_turned.jpg"]["equal_to_untagged"]


def test_the_fast_path_is_a_listed_deviation_and_the_default_is_not():
    from clip_qlora import config
    from clip_qlora import protocol as P
    from clip_qlora.runtime.io import UserError

    record = P.record(config.load_with().data, config.load_with().lora, config.load_with().train, {"draw": "clip_lora"},
                      {"activation": "quick_gelu", "pretrained": "openai", "compute_dtype": "bfloat16"})
    fast = P.with_evaluation(record, {"eval_decode": "fast"})
    assert P.FAST_DECODE in P.deviations(fast)
    assert P.FAST_DECODE not in P.deviations(P.with_evaluation(record, {"eval_decode": "reference"}))
    assert P.with_evaluation(record, None) == record  # metrics from before the key: nothing claimed

    # the report's section takes it from each evaluate stage's metrics (the train stage does not read eval.*)
    from clip_qlora.report.inputs import Inputs
    from clip_qlora.report.markdown import protocol_section

    inp = Inputs(["lora", "qlora"], ["dtd"],
                 train={(m, "dtd"): SimpleNamespace(protocol=record) for m in ("lora", "qlora")},
                 eval={("lora", "dtd"): SimpleNamespace(eval_decode="reference"),
                       ("qlora", "dtd"): SimpleNamespace(eval_decode="fast")})
    text = "\n".join(protocol_section(inp, {}, {}))
    assert text.count(P.FAST_DECODE) == 1 and "Runs qlora/dtd:" in text
    with pytest.raises(UserError, match=r"eval\.decode.*reference, fast"):
        config.load_with({"eval.decode": "nvjpeg"})
