"""benchmarks/study.py's projection and log parsing on made-up numbers (the benchmark itself runs on a GPU)."""
from __future__ import annotations

import json

import pytest

from cli_helpers import load_benchmark


def test_projection_counts_seed_passes_in_evaluate_and_one_zero_shot_stage_per_base():
    b = load_benchmark("study")
    x = "dtd"
    n = b.REAL[x][3]
    r = {"dataset": x, "seeds": [1], "methods": ["lora", "qlora"],
         "stage_wall_seconds": {"quantize@bf16": 10.0, "quantize@nf4": 12.0, f"prepare@{x}": 4.0,
                                f"train@lora-{x}": 50.0, f"train@qlora-{x}": 60.0,
                                f"evaluate@lora-{x}": 20.0, f"evaluate@qlora-{x}": 22.0,
                                "zeroshot@bf16": 9.0, "zeroshot@nf4": 10.0},
         "train": {"lora": {"train_seconds_mean": 40.0}, "qlora": {"train_seconds_mean": 45.0}},
         "eval": {"lora": {"n_test": n, "passes": 1, "eval_seconds": 5.0},
                  "qlora": {"n_test": n, "passes": 1, "eval_seconds": 6.0}},
         "zeroshot": {"bf16": {"n_test": n, "passes": 1, "eval_seconds": 4.0},
                      "nf4": {"n_test": n, "passes": 1, "eval_seconds": 5.0}}}
    p = b.project(r, seeds=3)
    t = p["terms_seconds"]
    k = len(b.REAL)
    tests = sum(v[3] for v in b.REAL.values())
    assert t["quantize"] == 22.0
    assert t["train@lora"] == pytest.approx(k * (10.0 + 3 * 40.0))
    assert t["evaluate@lora"] == pytest.approx(k * 15.0 + tests * 3 / (n / 5.0))
    assert t["zeroshot@nf4"] == pytest.approx(5.0 + tests / (n / 5.0))  # one stage: its start-up once
    assert p["total_minutes"] == pytest.approx(sum(t.values()) / 60)
    assert p["label"].startswith("PROJECTION")


def test_collect_reads_the_zero_shot_stage_lines(tmp_path):
    b = load_benchmark("study")
    dest = tmp_path / "project"
    (dest / "metrics/zeroshot").mkdir(parents=True)
    (dest / "metrics/zeroshot/nf4.json").write_text(json.dumps(
        {"datasets": {"dtd": {"zero_shot": {"clip": 2.0, "coop": 3.0}}, "food101": {"zero_shot": {"clip": 1.0}}}}))
    log = tmp_path / "log"
    log.write_text("Running stage 'zeroshot@nf4':\nzeroshot nf4 food101: 30300 test images, 1 passes, 9.00 s\n"
                   "zeroshot nf4 dtd: 1692 test images, 1 passes, 0.50 s (3384 images/s)\n")
    result = {"dataset": "dtd", "methods": ["qlora"]}
    b.collect(result, dest, log)
    assert result["zeroshot"] == {"nf4": {"n_test": 1692, "passes": 1, "eval_seconds": 0.5,
                                          "zero_shot": {"clip": 2.0, "coop": 3.0}}}
