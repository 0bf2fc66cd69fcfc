"""benchmarks/run.py end to end on CPU with clip-tiny: result schema, and plain vs ours being the same model.

The timings are not checked (CPU, two steps); what is checked is that the plain recipe and ours train the
same adapters (same trainable parameter count) on the same frozen base (same exact frozen-weight bytes, the
4-bit quantization state included), so the benchmark compares recipes, not models.
"""
from __future__ import annotations

import json
import math

import pytest

from clip_qlora.core import backends

from cli_helpers import load_benchmark

METHODS = tuple(backends.METHODS)
FINITE = ("static_gib", "step_ms", "saved_activation_gib")
ALLOCATOR = ("allocated_gib", "peak_gib", "reserved_gib")


def _load_run():
    return load_benchmark("run")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = _load_run()
    res = run.main(["--arch", "clip-tiny", "--device", "cpu", "--dtype", "bf16", "--batches", "2",
                    "--steps", "2", "--warmup", "1", "--n-classes", "10", "--threads", "1", "--out", str(out),
                    # the base as bitsandbytes stores it, absmax double-quantized, so the frozen bytes of both
                    # recipes must agree exactly (test_quant checks the bytes expand_absmax adds)
                    "--set", "quant.expand_absmax=false"])
    files = sorted(out.glob("*.json"))
    assert len(files) == 1 and files[0].name.endswith("-cpu.json"), files
    assert files[0].with_suffix(".md").exists()
    return res, json.loads(files[0].read_text()), files[0].with_suffix(".md").read_text()


def test_schema(result):
    res, data, _ = result
    assert not res["failed"]
    assert {"date", "gpu", "versions", "rows"} <= set(data)
    assert data["gpu"] == "cpu" and data["complete"] is True
    assert data["config"]["set"] == ["quant.expand_absmax=false"]
    assert set(data["versions"]) >= {"torch", "open_clip", "peft", "bitsandbytes", "cuda"}
    assert all(data["versions"][k] for k in ("torch", "open_clip", "peft", "bitsandbytes"))
    assert set(data["rows"]) == {f"{m}-b2" for m in METHODS}
    for key, row in data["rows"].items():
        assert set(row) == {"ours", "plain"}, key
        for recipe, m in row.items():
            assert "error" not in m, (key, recipe, m.get("error"))
            for f in FINITE:
                assert isinstance(m[f], float) and math.isfinite(m[f]) and m[f] > 0, (key, recipe, f, m[f])
            for f in ALLOCATOR:
                assert m[f] is None, (key, recipe, f)  # no allocator figures off CUDA
            assert m["static_bytes"] == round(m["static_gib"] * 2**30)


def test_same_model_in_both_recipes(result):
    _, data, _ = result
    rows = data["rows"]
    for key, row in rows.items():
        assert row["ours"]["trainable_params"] == row["plain"]["trainable_params"] > 0, key
        assert row["ours"]["trainable_bytes"] == row["plain"]["trainable_bytes"], key
        assert row["ours"]["static_bytes"] == row["plain"]["static_bytes"], key
    # one base per storage type: checkpointing changes nothing stored, 4-bit storage shrinks it
    assert rows["lora-b2"]["plain"]["static_bytes"] == rows["lora_gc-b2"]["plain"]["static_bytes"]
    assert rows["qlora-b2"]["plain"]["static_bytes"] == rows["qlora_gc-b2"]["plain"]["static_bytes"]
    assert rows["qlora-b2"]["plain"]["static_bytes"] < rows["lora-b2"]["plain"]["static_bytes"]
    # ours encodes the prompts up to the last end-of-text token, the plain recipe at 77: fewer saved bytes
    for m in METHODS:
        assert rows[f"{m}-b2"]["ours"]["saved_activation_bytes"] < rows[f"{m}-b2"]["plain"]["saved_activation_bytes"]


def test_markdown_and_targets(result):
    _, data, md = result
    assert "## Targets" in md and "## Ratios ours / plain" in md
    assert len(data["targets"]) == 7
    for t in data["targets"]:
        assert t["status"] in ("met", "MISSED", "n/a")
        assert f"**{t['status']}** — {t['target']}" in md
    # allocator-based targets cannot be decided on CPU; the static one can (exact bytes)
    by_name = {t["target"]: t for t in data["targets"]}
    assert by_name["ours qlora peak <= ours lora peak at every batch"]["status"] == "n/a"
    static = by_name["ours qlora static <= 0.110 GiB"]
    assert static["status"] == "met" and static["value"] == data["rows"]["qlora-b2"]["ours"]["static_gib"]


def test_targets_from_numbers():
    """The verdicts follow the numbers (a made-up GPU run), not a hand-written list."""
    run = _load_run()

    def rec(step, peak, static=0.1):
        return {"static_gib": static, "allocated_gib": static, "peak_gib": peak, "step_ms": step}

    rows = {"lora-b4": {"ours": rec(10, 0.5, 0.28), "plain": rec(50, 2.0, 0.28)},
            "qlora-b4": {"ours": rec(11, 0.4), "plain": rec(90, 1.9)},
            "qlora_gc-b4": {"ours": rec(14, 0.14), "plain": rec(180, 0.4)},
            "lora-b32": {"ours": rec(12, 0.9, 0.28), "plain": rec(50, 3.6, 0.28)},
            "qlora-b32": {"ours": rec(14, 1.0), "plain": rec(100, 3.4)},
            "qlora_gc-b32": {"ours": rec(17, 0.31), "plain": rec(200, 0.5)}}
    got = {t["target"]: t["status"] for t in run.check_targets(rows, [4, 32], "cuda")}
    assert got == {
        "ours lora step <= 0.25 x plain lora step": "met",           # 12 <= 12.5
        "ours qlora step <= 1.15 x ours lora step": "MISSED",        # 14 > 13.8
        "ours qlora_gc step <= 1.5 x ours lora step": "met",         # 17 <= 18
        "ours qlora_gc peak <= 0.30 GiB at batch 32": "MISSED",      # 0.31
        "ours qlora_gc peak <= 0.15 GiB at batch 4": "met",          # 0.14
        "ours qlora peak <= ours lora peak at every batch": "MISSED",  # 1.0 > 0.9 at batch 32
        "ours qlora static <= 0.110 GiB": "met",
    }


def test_step_check_tells_equal_steps_from_different_ones(tmp_path):
    """benchmarks/step_check.py on CPU: identical params train bitwise-equal adapters; the fused q/k/v step
    trains the PEFT step's adapters within fp32 rounding; a changed recipe (lr) shows up."""
    check = load_benchmark("step_check")
    common = ["--arch", "clip-tiny", "--device", "cpu", "--methods", "lora", "qlora_gc", "--steps", "3",
              "--batch", "2", "--n-classes", "4", "--out", str(tmp_path)]
    same = check.main(["--reference", "train.fused_qkv=false", "--candidate", "train.fused_qkv=false", *common])
    fused = check.main(["--reference", "train.fused_qkv=false", "--candidate", "train.fused_qkv=true", *common])
    lr = check.main(["--reference", "train.lr=2e-4", "--candidate", "train.lr=4e-4", *common])
    for m in ("lora", "qlora_gc"):
        assert same["methods"][m]["bitwise_equal"] and same["methods"][m]["adapter_max_rel_frobenius"] == 0
        f = fused["methods"][m]
        assert f["adapter_max_rel_frobenius"] < 1e-4 and f["within_1e-3"]
        assert lr["methods"][m]["adapter_max_rel_frobenius"] > 1e-2 and not lr["methods"][m]["within_1e-3"]
    assert json.loads((tmp_path / "step_check.json").read_text())["candidate"] == ["train.lr=4e-4"]


@pytest.mark.parametrize("kernel,expected", [
    ("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
    ("kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", "dequantize/NF4"),
    ("_lora_qkv_forward", "lora adapters (Triton)"),   # core/lora_triton.py's kernels, by their names
    ("_lora_qkv_backward", "lora adapters (Triton)"),
    ("at::native::vectorized_layer_norm_kernel<c10::BFloat16, float, false>", "elementwise/norm/softmax"),
    ("at::native::multi_tensor_apply_kernel<at::native::FusedOptimizerTensorListMetadata>", "other"),
])
def test_step_profile_sorts_the_steps_kernels(kernel, expected):
    """The profile's category table: each kind of kernel the H200 profiles listed lands in its own row."""
    assert load_benchmark("step_profile").category(kernel) == expected
