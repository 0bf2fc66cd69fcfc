"""Tests of the aggregate stage (clip_qlora.report.aggregate) on fake per-stage metrics files."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from clip_qlora import config, protocol
from clip_qlora.report import aggregate as report
from clip_qlora.core.backends import METHODS as METHOD_TABLE
from clip_qlora.metrics import (Common, Eval, Profile, ProfileBatch, Static, Train, TrainSeed, Zeroshot,
                                ZeroshotDataset)
from clip_qlora.runtime.io import UserError

METHODS = list(METHOD_TABLE)
DATASETS = ["eurosat", "dtd"]
SEEDS = [1, 2]
STATIC = {"bf16": 300_000_000, "nf4": 118_000_000}  # stored base
DEVICE = {"bf16": 250_000_000, "nf4": 68_000_000}  # base on the device: without the token-embedding table
# accuracy per (method, dataset, seed); qlora a little worse than lora
ACC = {
    ("lora", "eurosat"): [80.0, 81.0], ("lora", "dtd"): [60.0, 62.0],
    ("lora_gc", "eurosat"): [80.5, 80.5], ("lora_gc", "dtd"): [61.0, 61.5],
    ("qlora", "eurosat"): [79.5, 80.5], ("qlora", "dtd"): [59.9, 61.5],
    ("qlora_gc", "eurosat"): [79.0, 80.0], ("qlora_gc", "dtd"): [60.5, 61.0],
}
ZERO_SHOT = {"eurosat": 48.0, "dtd": 44.0}
STEP_MS = {"lora": 100.0, "lora_gc": 130.0, "qlora": 125.0, "qlora_gc": 160.0}
TRAIN_S = {"lora": 400.0, "lora_gc": 520.0, "qlora": 700.0, "qlora_gc": 710.0}
SAVED = {"lora": 2_000_000_000, "lora_gc": 500_000_000, "qlora": 2_100_000_000, "qlora_gc": 520_000_000}
PEAK = {"lora": 760_000_000, "lora_gc": 400_000_000, "qlora": 1_090_000_000, "qlora_gc": 270_000_000}
BATCHES = {"b4x8": 1.0, "b32x1": 5.0}  # multiplier of the peaks / saved activations per config
CLASSES = {"eurosat": ["Forest", "River", "Highway"], "dtd": ["banded", "woven"]}
# a dataset of the user's own (params' own_datasets): not built in, not among the paper's 8
OWN = "textile"
ACC.update({(m, OWN): [70.0 + i, 72.0] for i, m in enumerate(METHODS)})
ZERO_SHOT[OWN] = 30.0
CLASSES[OWN] = ["nominal", "local", "global"]


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def _base(m):
    return METHOD_TABLE[m].base


def make_inputs(root: Path, methods=METHODS, datasets=DATASETS, *, pretrained=True, gpu=False,
                unpretrained_file: str | None = None):
    """Write fake metrics/, dvclive/ and plots/confusion/ under `root` (CPU: allocator fields null), the
    metrics files through their contracts, as the stages write them."""
    device = "NVIDIA H200" if gpu else "cpu (x86_64, 2 threads)"

    def common(path: Path) -> Common:
        return Common(pretrained=pretrained and str(path) != unpretrained_file, activation="quick_gelu",
                      device=device, versions={"python": "3.11", "torch": "2.6"})

    def w(rel, obj):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj))

    for base in {_base(m) for m in methods}:
        Static(base=base, stored_base_bytes=STATIC[base],
               memory_allocated_bytes=STATIC[base] + 1_000_000 if gpu else None, arch="ViT-B-16",
               compute_dtype="bfloat16",
               quant={"type": "nf4", "double_quant": True, "blocksize": 64} if base == "nf4" else None,
               common=common(Static.path(base))).write(root)
        Zeroshot(base=base, datasets={d: ZeroshotDataset(zero_shot_accuracy=ZERO_SHOT[d], n_test=30,
                                                         zero_shot={"clip": ZERO_SHOT[d], "coop": ZERO_SHOT[d] + COOP_GAIN})
                                      for d in datasets},
                 eval_decode="reference", common=common(Zeroshot.path(base))).write(root)
    for m in methods:
        for d in datasets:
            Train(method=m, dataset=d, seeds=SEEDS, steps=8, trainable_params=184_320,
                  train_seconds_mean=TRAIN_S[m] + (10.0 if d == "dtd" else 0.0),
                  peak_allocated_bytes=(PEAK[m] + (1000 if d == "dtd" else 0)) if gpu else None,
                  peak_reserved_bytes=PEAK[m] * 2 if gpu else None,
                  saved_activation_bytes=SAVED[m], train_images_bytes=3_000_000, protocol=PROTOCOL,
                  step_ms_median=STEP_MS[m],
                  per_seed={str(s): TrainSeed(train_seconds=TRAIN_S[m], final_loss=0.5,
                                              peak_allocated_bytes=PEAK[m] if gpu else None, resumed_from=0)
                            for s in SEEDS},
                  common=common(Train.path(m, d))).write(root)
            accs = ACC[m, d]
            Eval(method=m, dataset=d, seeds=SEEDS, accuracy_mean=_mean(accs), accuracy_std=_std(accs),
                 accuracy={str(s): a for s, a in zip(SEEDS, accs)}, per_class={c: 50.0 for c in CLASSES[d]},
                 n_test=30, passes=len(SEEDS), eval_decode="reference", common=common(Eval.path(m, d))).write(root)
            loss = root / f"dvclive/train/{m}/{d}/seed1/plots/metrics/train"
            loss.mkdir(parents=True, exist_ok=True)
            step_every = 1 if m != "qlora_gc" else 2  # different logging steps must still plot
            (loss / "loss.tsv").write_text("timestamp\tstep\tloss\n" + "".join(
                f"{1700000000000 + s}\t{s}\t{2.0 / (s + 1):.5f}\n" for s in range(0, 8, step_every)))
            (loss / "lr.tsv").write_text("timestamp\tstep\tlr\n" + "".join(
                f"{1700000000000 + s}\t{s}\t0.0002\n" for s in range(8)))
            cls = CLASSES[d]
            w(f"plots/confusion/{m}/{d}.json",
              [{"actual": cls[i % len(cls)], "predicted": cls[(i + (i % 3 == 0)) % len(cls)]} for i in range(30)])
        Profile(method=m, arch="ViT-B-16", n_classes=100, device_base_bytes=DEVICE[_base(m)],
                memory_allocated_bytes=DEVICE[_base(m)] + 1_000_000 if gpu else None, trainable_params=184_320,
                trainable_bytes=184_320 * 16, step_mode="cuda_graph" if gpu else "eager",
                batches={b: ProfileBatch(saved_activation_bytes=int(SAVED[m] * f),
                                         peak_allocated_bytes=int(PEAK[m] * f) if gpu else None,
                                         peak_reserved_bytes=int(PEAK[m] * f * 1.5) if gpu else None,
                                         step_ms=STEP_MS[m] * f) for b, f in BATCHES.items()},
                common=common(Profile.path(m))).write(root)


COOP_GAIN = 5.0
PROTOCOL = protocol.record(config.load_with().data, config.load_with().lora, config.load_with().train, {"draw": "clip_lora: ..."},
                           {"activation": "quick_gelu", "pretrained": "openai", "compute_dtype": "bfloat16"})


def run(root: Path, methods=METHODS, datasets=DATASETS, figures="plots/figures"):
    buf = io.StringIO()
    console = Console(file=buf, width=250, color_system=None)
    summary = report.aggregate(methods, datasets, root, root / "reports" / "results.md", root / figures,
                               console=console)
    return summary, buf.getvalue()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu")
    make_inputs(root)
    summary, out = run(root)
    return root, summary, out


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    make_inputs(root, gpu=True)
    summary, out = run(root, figures="plots")  # PNGs beside the plot data, as in the brief's layout
    return root, summary, out


def _walk(obj, path=""):
    assert isinstance(obj, dict), path
    for k, v in obj.items():
        assert isinstance(k, str)
        if isinstance(v, dict):
            yield from _walk(v, f"{path}.{k}")
        else:
            yield f"{path}.{k}".lstrip("."), v


def test_summary_values_exact(cpu_run):
    root, s, _ = cpu_run
    assert json.loads((root / "metrics" / "summary.json").read_text()) == s
    acc = {m: _mean([_mean(ACC[m, d]) for d in DATASETS]) for m in METHODS}
    for m in METHODS:
        b = s[m]
        assert b["accuracy_mean"] == acc[m]
        assert b["accuracy_std"] == _mean([_std(ACC[m, d]) for d in DATASETS])
        assert b["accuracy"] == {d: _mean(ACC[m, d]) for d in DATASETS}
        assert b["zero_shot_mean"] == _mean([ZERO_SHOT[d] for d in DATASETS])
        assert b["stored_base_bytes"] == STATIC[_base(m)]
        assert b["device_base_bytes"] == DEVICE[_base(m)]
        assert b["train_seconds"] == _mean([TRAIN_S[m], TRAIN_S[m] + 10.0])
        assert b["step_ms"] == STEP_MS[m]
        assert b["saved_activation_bytes"] == SAVED[m]
        assert b["profile"]["b4x8"]["step_ms"] == STEP_MS[m]
        assert b["profile"]["b32x1"]["step_ms"] == STEP_MS[m] * 5.0
        assert b["profile"]["b32x1"]["saved_activation_bytes"] == int(SAVED[m] * 5.0)
        # CPU: allocator fields were null, so they are absent rather than null
        assert "peak_allocated_bytes" not in b and "peak_allocated_bytes" not in b["profile"]["b4x8"]
    for m in ("qlora", "qlora_gc", "lora_gc"):
        c = s[f"{m}_vs_lora"]
        ratio = STATIC[_base(m)] / STATIC["bf16"]
        assert c["accuracy_delta"] == acc[m] - acc["lora"]
        assert c["static_ratio"] == ratio
        assert c["static_saving_pct"] == 100.0 * (1.0 - ratio)
        assert c["step_time_ratio"] == STEP_MS[m] / STEP_MS["lora"]
        assert c["train_time_ratio"] == (TRAIN_S[m] + 5.0) / (TRAIN_S["lora"] + 5.0)
        assert c["profile"]["b32x1"]["step_time_ratio"] == (STEP_MS[m] * 5.0) / (STEP_MS["lora"] * 5.0)
        assert "peak_ratio" not in c
    assert s["qlora_vs_lora"]["static_ratio"] == 118_000_000 / 300_000_000
    assert s["pretrained"] is True
    assert s["device"] == "cpu (x86_64, 2 threads)"
    assert s["n_seeds"] == 2
    assert s["best_method"] == "lora_gc"


def test_summary_gpu_peaks(gpu_run):
    _, s, _ = gpu_run
    assert s["lora"]["peak_allocated_bytes"] == PEAK["lora"] + 1000  # max over datasets
    assert s["lora"]["static_allocated_bytes"] == STATIC["bf16"] + 1_000_000
    c = s["qlora_vs_lora"]
    assert c["peak_ratio"] == (PEAK["qlora"] + 1000) / (PEAK["lora"] + 1000)
    assert c["profile"]["b4x8"]["peak_ratio"] == int(PEAK["qlora"] * 1.0) / int(PEAK["lora"] * 1.0)
    assert c["profile"]["b32x1"]["peak_ratio"] == int(PEAK["qlora"] * 5.0) / int(PEAK["lora"] * 5.0)
    assert s["qlora"]["profile"]["b32x1"]["peak_reserved_bytes"] == int(PEAK["qlora"] * 5.0 * 1.5)


def test_summary_scalar_leafed(cpu_run, gpu_run):
    for _, s, _ in (cpu_run, gpu_run):
        leaves = dict(_walk(s))
        assert leaves, "empty summary"
        for key, v in leaves.items():
            assert isinstance(v, (int, float, str, bool)) and v is not None, key
        assert "qlora_vs_lora.static_ratio" in leaves and "qlora.accuracy_mean" in leaves
        assert "lora.profile.b4x8.step_ms" in leaves


def test_report_tables_and_quotes(cpu_run, gpu_run):
    root, s, out = cpu_run
    md = (root / "reports" / "results.md").read_text()
    assert "## Accuracy" in md and "## Resources" in md and "## What changed" in md
    # accuracy table: one row per dataset plus the mean row, cells "mean ± std"
    e = ACC["qlora", "eurosat"]
    assert f"{_mean(e):.2f} ± {_std(e):.2f}" in md
    assert f"**{s['qlora']['accuracy_mean']:.2f} ± {s['qlora']['accuracy_std']:.2f}**" in md
    assert "mean ± std over 2 seeds" in md and "zero-shot" in md
    # the two reference rows, labelled as quoted
    assert "quoted, not measured here" in md
    ref_lines = [ln for ln in md.splitlines() if ln.startswith("| CLIP-LoRA, paper Table 1")
                 or ln.startswith("| QLoRA + GC, bs 32x1, seed 1")]
    assert len(ref_lines) == 2
    assert "| 84.9 | 63.8 | 95.2 | 91.0 | 93.7 | 82.7 | 37.9 | 81.1 | 78.79 |" in ref_lines[0]
    assert "| 87.90 | 58.39 | 94.36 | 91.50 | 87.49 | 82.29 | 32.58 | 75.97 | 76.31 |" in ref_lines[1]
    # per-dataset quoted values beside the measured ones (EuroSAT, DTD)
    eurosat_row = next(ln for ln in md.splitlines() if ln.startswith("| eurosat |"))
    assert eurosat_row.rstrip().endswith("| 84.9 | 87.90 |")
    # resources table: device named, batch rows, quoted study figures beside
    assert "Measured on **cpu (x86_64, 2 threads)**" in md
    res_rows = [ln for ln in md.splitlines() if ln.startswith("| QLoRA (`qlora`) |")]
    assert [r.split("|")[2].strip() for r in res_rows] == ["4x8", "32x1", "training³"]
    assert "| 0.11 | 1.02 | 12:13 |" in res_rows[0] and "| 6.96 |" in res_rows[1]
    assert "RTX 4090" in md and "Caltech101" in md and "0.29" in md and "6:46" in md and "11:55" in md
    assert f"{STATIC['nf4'] / 2**30:.2f}" in res_rows[0]
    # the two base sizes side by side: as stored (quantize) and on the device (profile)
    assert res_rows[0].split("|")[3:5] == [f" {STATIC['nf4'] / 2**30:.2f} ", f" {DEVICE['nf4'] / 2**30:.3g} "]
    assert "`stored_base_bytes`" in md and "`device_base_bytes`" in md
    assert "n/a" in res_rows[0]  # CPU: no allocator peaks
    # figures embedded with relative links
    for name in ("accuracy", "memory", "step_time"):
        assert f"(../plots/figures/{name}.png)" in md
    gpu_md = (gpu_run[0] / "reports" / "results.md").read_text()
    assert "(../plots/memory.png)" in gpu_md
    # rich tables printed
    assert "Accuracy (top-1 %" in out and "Resources on cpu" in out and "RANDOM-INIT" not in out


def test_what_changed_sentence_matches_numbers(cpu_run, gpu_run):
    for root, s, _ in (cpu_run, gpu_run):
        md = (root / "reports" / "results.md").read_text()
        c = s["qlora_vs_lora"]
        expected = (f"QLoRA saves {c['static_saving_pct']:.0f} % of static memory "
                    f"({STATIC['nf4'] / 2**30:.2f} vs {STATIC['bf16'] / 2**30:.2f} GiB), "
                    f"costs {c['step_time_ratio']:.2f}x step time and {abs(c['accuracy_delta']):.1f} points "
                    "of accuracy.")
        assert expected == "QLoRA saves 61 % of static memory (0.11 vs 0.28 GiB), costs 1.25x step time and 0.4 points of accuracy."
        assert expected in md
        c = s["lora_gc_vs_lora"]
        assert (f"LoRA + GC keeps static memory unchanged (0.28 GiB), costs {c['step_time_ratio']:.2f}x "
                f"step time and gains {c['accuracy_delta']:.1f} points of accuracy.") in md
        assert f"Total training time: {s['qlora_vs_lora']['train_time_ratio']:.2f}x LoRA's" in md
    cpu_md = (cpu_run[0] / "reports" / "results.md").read_text()
    assert "Peak allocated memory was not measured on this device" in cpu_md
    gpu_md = (gpu_run[0] / "reports" / "results.md").read_text()
    # time ratios from a CPU run are flagged as such, a GPU run's are not
    cpu_note = "The time ratios above come from a CPU run, where they mean little"
    assert cpu_note in cpu_md and cpu_note not in gpu_md
    c = gpu_run[1]["qlora_gc_vs_lora"]
    assert (f"Peak allocated memory relative to LoRA: {c['peak_ratio']:.2f}x during training, "
            f"{c['profile']['b4x8']['peak_ratio']:.2f}x at batch 4x8, "
            f"{c['profile']['b32x1']['peak_ratio']:.2f}x at batch 32x1.") in gpu_md


def test_random_init_banner(cpu_run, tmp_path):
    md = (cpu_run[0] / "reports" / "results.md").read_text()
    assert "RANDOM-INITIALISED" not in md and "random-init" not in md.lower()
    make_inputs(tmp_path, unpretrained_file="metrics/profile/qlora.json")
    s, out = run(tmp_path)
    assert s["pretrained"] is False
    md = (tmp_path / "reports" / "results.md").read_text()
    first = md.splitlines()[2]
    assert first.startswith("> **⚠ RANDOM-INITIALISED WEIGHTS (`model.pretrained`: none, random weights)")
    assert "pretrained: false" not in md and "pretrained weights: **none (random weights)**" in md
    assert "accuracy figures below are not a result" in md and "remain valid" in md
    assert "## Accuracy — random-init demo, NOT a result" in md
    assert "not meaningful: random-initialised weights" in md
    assert "RANDOM-INIT, NOT A RESULT" in out


def test_pngs_valid(cpu_run, gpu_run):
    for (root, _, _), figs in ((cpu_run, "plots/figures"), (gpu_run, "plots")):
        for name in ("accuracy", "memory", "step_time"):
            data = (root / figs / f"{name}.png").read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
            assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
        assert not list((root / "plots").rglob(".*tmp")), "temporary files left behind"


def test_plot_data_files(cpu_run):
    root, s, _ = cpu_run
    acc = json.loads((root / "plots" / "accuracy.json").read_text())
    assert len(acc) == len(METHODS) * len(DATASETS)
    assert {"method": "qlora", "dataset": "dtd", "accuracy": _mean(ACC["qlora", "dtd"])}.items() <= next(
        r for r in acc if r["method"] == "qlora" and r["dataset"] == "dtd").items()
    mem = json.loads((root / "plots" / "memory.json").read_text())
    assert {r["measure"] for r in mem} == {"static"}  # CPU: peaks unmeasured
    st = json.loads((root / "plots" / "step_time.json").read_text())
    assert {(r["method"], r["batch"]) for r in st} >= {("qlora", "4x8"), ("qlora", "32x1"), ("qlora", "training")}
    loss = json.loads((root / "plots" / "loss" / "eurosat.json").read_text())
    assert [r["step"] for r in loss] == list(range(8))
    assert all(set(r) == {"step", *METHODS} for r in loss)
    assert loss[1]["qlora_gc"] is None and loss[2]["qlora_gc"] == pytest.approx(2.0 / 3, abs=1e-5)
    best = s["best_method"]
    for d in DATASETS:
        got = json.loads((root / "plots" / "confusion_best" / f"{d}.json").read_text())
        assert got == json.loads((root / "plots" / "confusion" / best / f"{d}.json").read_text())


def test_fewer_methods_and_stale_outputs(tmp_path):
    make_inputs(tmp_path, methods=["lora", "qlora"], datasets=["eurosat"])
    (tmp_path / "plots" / "confusion_best").mkdir(parents=True)
    (tmp_path / "plots" / "confusion_best" / "stale.json").write_text("[]")
    s, _ = run(tmp_path, methods=["lora", "qlora"], datasets=["eurosat"])
    assert set(k for k in s if k.endswith("_vs_lora")) == {"qlora_vs_lora"}
    assert [p.name for p in (tmp_path / "plots" / "confusion_best").iterdir()] == ["eurosat.json"]
    loss = json.loads((tmp_path / "plots" / "loss" / "eurosat.json").read_text())
    assert all(set(r) == {"step", "lora", "qlora"} for r in loss)  # a column per method of the run


@pytest.mark.parametrize("rel", ["metrics/static/nf4.json", "metrics/train/qlora/dtd.json",
                                 "metrics/eval/lora_gc/eurosat.json", "metrics/profile/qlora_gc.json",
                                 "metrics/zeroshot/nf4.json",
                                 "dvclive/train/lora/dtd/seed1/plots/metrics/train/loss.tsv",
                                 "plots/confusion/lora_gc/dtd.json"])
def test_missing_input_names_file(tmp_path, rel):
    make_inputs(tmp_path)
    (tmp_path / rel).unlink()
    with pytest.raises(UserError, match=str(tmp_path / rel).replace(".", r"\.")):
        run(tmp_path)
    assert not (tmp_path / "metrics" / "summary.json").exists()
    assert not (tmp_path / "reports" / "results.md").exists()


def test_zero_shot_read_once_per_base_one_column_per_base_when_they_differ(tmp_path):
    """The zeroshot stage's file of each base is the zero-shot of every method on that base; when the 4-bit base
    scores differently from the bf16 one, each gets its column (both prompt sets), and the summary's per-method
    zero-shot mean follows its base."""
    make_inputs(tmp_path)
    p = tmp_path / "metrics" / "zeroshot" / "nf4.json"
    z = json.loads(p.read_text())
    for d in DATASETS:
        z["datasets"][d] = {**z["datasets"][d], "zero_shot_accuracy": ZERO_SHOT[d] - 1.0,
                            "zero_shot": {"clip": ZERO_SHOT[d] - 1.0, "coop": ZERO_SHOT[d] - 2.0}}
    p.write_text(json.dumps(z))
    s, _ = run(tmp_path)
    text = (tmp_path / "reports/results.md").read_text()
    header = [c.strip() for c in next(l for l in text.splitlines() if l.startswith("| dataset")).strip("|").split("|")]
    assert header[1:5] == ["zero-shot (bf16), 'a photo of a {}.'", "zero-shot (bf16), CoOp templates, as the "
                           "paper's zero-shot row", "zero-shot (nf4), 'a photo of a {}.'",
                           "zero-shot (nf4), CoOp templates, as the paper's zero-shot row"]
    first = [c.strip() for c in next(l for l in text.splitlines()
                                     if l.startswith(f"| {DATASETS[0]} ")).strip("|").split("|")]
    z0 = ZERO_SHOT[DATASETS[0]]
    assert first[1:5] == [f"{z0:.2f}", f"{z0 + COOP_GAIN:.2f}", f"{z0 - 1:.2f}", f"{z0 - 2:.2f}"]
    for m in METHODS:
        shift = 1.0 if METHOD_TABLE[m].base == "nf4" else 0.0
        assert s[m]["zero_shot_mean"] == pytest.approx(_mean([ZERO_SHOT[d] for d in DATASETS]) - shift)


def test_zero_shot_file_without_a_dataset_names_it(tmp_path):
    make_inputs(tmp_path)
    p = tmp_path / "metrics" / "zeroshot" / "bf16.json"
    z = json.loads(p.read_text())
    del z["datasets"]["dtd"]
    p.write_text(json.dumps(z))
    with pytest.raises(UserError, match=r"bf16\.json: no zero-shot result for dataset 'dtd'; rerun the zeroshot "
                                        r"stage \(dvc repro zeroshot@bf16\)"):
        run(tmp_path)
    assert not (tmp_path / "reports" / "results.md").exists()


def test_malformed_input_is_user_error(tmp_path):
    make_inputs(tmp_path)
    p = tmp_path / "metrics" / "eval" / "qlora" / "dtd.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "accuracy_mean": None}))
    with pytest.raises(UserError, match="accuracy_mean"):
        run(tmp_path)
    with pytest.raises(UserError, match="unknown method"):
        run(tmp_path, methods=["lora", "dora"])


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(repo / ".site_cache")}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=120)


def test_dvc_plots_show_renders(gpu_run, cpu_run, tmp_path):
    # the project's own plot declarations, as `dvc plots show` reads them
    snippet = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["plots"]
    # aggregate's plots only: scale_report's (plots/scale/) are rendered in test_pipeline.test_plots_show
    snippet = [e for e in snippet if not next(iter(e)).startswith("plots/scale/")]
    assert isinstance(snippet, list) and snippet
    for root, _, _ in (gpu_run, cpu_run):
        repo = tmp_path / root.name
        shutil.copytree(root, repo)
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        for args in (("init", "-q"), ("config", "core.analytics", "false")):
            r = _dvc(repo, *args)
            assert r.returncode == 0, r.stderr
        (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": snippet}, sort_keys=False))
        (repo / "params.yaml").write_text(yaml.safe_dump({"methods": METHODS}))  # the loss plot's y: ${methods}
        r = _dvc(repo, "plots", "show", "--json")
        assert r.returncode == 0, r.stderr
        shown = json.loads(r.stdout)
        assert not shown.get("errors"), shown.get("errors")
        data = shown["data"]
        ids = set(data)
        for d in DATASETS:
            assert f"plots/loss/{d}.json" in ids and f"plots/confusion_best/{d}.json" in ids
        assert {"plots/accuracy.json", "plots/memory.json", "plots/step_time.json"} <= ids
        for pid, items in data.items():
            assert items and all(it.get("type") == "vega" for it in items), pid
            assert all(it["content"]["data"]["values"] for it in items), f"{pid}: no datapoints"
        if root == cpu_run[0]:
            continue  # the HTML writer is exercised once (on the GPU-shaped data), to keep the test fast
        r = _dvc(repo, "plots", "show", "-o", "html")
        assert r.returncode == 0, r.stderr
        assert "WARNING" not in r.stderr and "ERROR" not in r.stderr, r.stderr
        html = (repo / "html" / "index.html").read_text()
        for pid in ids:  # one vegaEmbed div per plot, id = path with separators replaced
            assert f"vegaEmbed('#{pid.replace('/', '_').replace('.', '_')}'" in html, pid


def test_zero_shot_with_both_prompt_sets_and_the_protocol_section(cpu_run):
    root, _, _ = cpu_run
    text = (root / "reports/results.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| dataset"))
    assert "zero-shot, 'a photo of a {}.'" in header and "zero-shot, CoOp templates" in header
    first = next(line for line in text.splitlines() if line.startswith(f"| {DATASETS[0]} "))
    cells = [c.strip() for c in first.strip("|").split("|")]
    assert cells[1] == f"{ZERO_SHOT[DATASETS[0]]:.2f}" and cells[2] == f"{ZERO_SHOT[DATASETS[0]] + COOP_GAIN:.2f}"
    section = text[text.index("## Protocol and deviations from CLIP-LoRA"):]
    section = section[:section.index("\n## ", 5)]
    assert section.count("What ran:") == 1 and "few-shot draw clip_lora" in section
    for deviation in protocol.deviations(PROTOCOL):
        assert deviation in section
    # the reference's fp16 GradScaler skips its first iteration(s) while the scheduler steps: ours does not
    assert "loss scale of 65536" in section and "scheduler still steps" in section


def test_tables_printed_to_a_pipe_keep_every_cell(tmp_path, capfd, monkeypatch):
    """Piped (a log, `| tee`), rich assumes 80 columns and cuts cells to "Lo…": the tables keep their width."""
    monkeypatch.delenv("COLUMNS", raising=False)
    make_inputs(tmp_path)
    report.aggregate(METHODS, DATASETS, tmp_path, tmp_path / "reports" / "results.md", tmp_path / "plots" / "figures")
    out = capfd.readouterr().out
    assert "…" not in out and max(len(line) for line in out.splitlines()) > 80
    assert "QLoRA + GC (qlora_gc)" in out


def exp_show_columns(repo: Path, args: list[str]) -> list[str]:
    """The header of `dvc exp show <args>` piped, as the sweep prints it (wide enough for every column)."""
    from cli_helpers import ENV

    out = subprocess.run(["dvc", "exp", "show", "--no-pager", *args], cwd=repo, capture_output=True, text=True,
                         env={**ENV, "COLUMNS": "1000"}, check=True).stdout
    return next(line for line in out.splitlines() if "Experiment" in line).split()


def test_exp_show_forms_keep_the_swept_params_and_each_methods_figures(tmp_path):
    """The README's `dvc exp show --drop/--keep` form and the sweep's closing table, on a Git + DVC project with
    the summary's column names and, as metrics/scale/ does, a metrics file that records lora.* too (DVC then
    names the param `params.yaml:lora.r`)."""
    import shlex

    from dulwich import porcelain

    from tools.sweep import SHOW
    from cli_helpers import ENV

    repo = tmp_path / "project"
    porcelain.init(str(repo)).close()
    subprocess.run(["dvc", "init", "-q"], cwd=repo, env=ENV, check=True)
    (repo / "params.yaml").write_text(yaml.safe_dump({"lora": {"r": 2, "dropout": 0.25, "alpha": 1},
                                                      "train": {"lr": 2e-4}}))
    (repo / "summary.json").write_text(json.dumps(
        {m: {"accuracy_mean": 50.0, "peak_allocated_bytes": 10**9, "step_ms": 12.5, "train_seconds": 60.0,
             "profile": {"4x8": {"step_ms": 30.0}}} for m in METHODS}))
    (repo / "scale.json").write_text(json.dumps({"lora": {"r": 2, "dropout": 0.25}}))
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    params: [lora, train]\n"
                                   "    metrics: [summary.json: {cache: false}, scale.json: {cache: false}]\n")
    with porcelain.open_repo_closing(str(repo)) as r:
        porcelain.add(r)
        porcelain.commit(r, message=b"baseline", author=b"t <t@t>", committer=b"t <t@t>")

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("dvc exp show --drop"))
    cols = exp_show_columns(repo, shlex.split(line)[3:])
    figures = [f"{m}.{k}" for m in METHODS for k in ("accuracy_mean", "peak_allocated_bytes", "step_ms")]
    assert sorted(cols) == sorted(["Experiment", *figures, "params.yaml:lora.r"])
    cols = exp_show_columns(repo, SHOW)
    assert sorted(cols) == sorted(["Experiment", "State", *(f"{m}.accuracy_mean" for m in METHODS),
                                   "params.yaml:lora.r", "params.yaml:lora.dropout"])


def test_readme_links_and_code_paths_are_inside_the_repository():
    """The README's relative links and the files it names in backticks exist in the repository (the protocol
    it cites once lived outside it, in ../shared/)."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in t]
    assert "docs/protocol.md" in links
    for target in links + re.findall(r"`((?:docs|benchmarks|src)/[\w./-]+\.(?:md|py|sh|html))`", text):
        assert (root / target).is_file(), target


def test_memory_bars_of_a_small_model_read_apart(tmp_path, monkeypatch):
    """A 2-block model's bases are a few MiB: in GiB to two decimals every bar read 0.01."""
    from clip_qlora.report import figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig))
    mib = 2**20
    small = {"lora": 10.4 * mib, "lora_gc": 10.4 * mib, "qlora": 4.23 * mib, "qlora_gc": 4.23 * mib}
    figures.memory_figure(tmp_path / "m.png", methods=list(small), measures=["static"],
                          values={m: {"static": int(v)} for m, v in small.items()}, device="cpu", pretrained=False)
    ax = drawn[0].axes[0]
    assert ax.get_ylabel() == "memory (MiB)"
    assert [t.get_text() for t in ax.texts] == ["10.4", "10.4", "4.23", "4.23"]
    figures.memory_figure(tmp_path / "b.png", methods=["lora"], measures=["static"],
                          values={"lora": {"static": 3 * 2**30}}, device="cpu", pretrained=True)
    assert drawn[1].axes[0].get_ylabel() == "memory (GiB)" and drawn[1].axes[0].texts[0].get_text() == "3"


def _table(md: str) -> tuple[list[str], dict[str, list[str]]]:
    """The accuracy table: its header cells and each row's cells by dataset."""
    lines = md[md.index("| dataset"):].split("\n\n")[0].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], {row[0]: row for row in cells[2:]}


def test_the_report_for_a_dataset_of_your_own(tmp_path):
    """Means over the datasets that ran; the quoted paper values only beside the paper's datasets, and said so;
    the CoOp zero-shot column names the declared template it holds for an own dataset."""
    datasets = ["eurosat", OWN]
    make_inputs(tmp_path / "mixed", datasets=datasets)
    s, out = run(tmp_path / "mixed", datasets=datasets)
    for m in METHODS:
        assert s[m]["accuracy_mean"] == _mean([_mean(ACC[m, d]) for d in datasets])
    md = (tmp_path / "mixed" / "reports" / "results.md").read_text()
    header, rows = _table(md)
    assert "zero-shot, CoOp templates, as the paper's zero-shot row (own datasets: their declared template)" in header
    assert header[-2:] == ["CLIP-LoRA paper (quoted, not measured here)", "QLoRA+GC study s1 (quoted, not measured here)"]
    assert rows["eurosat"][-2:] == ["84.9", "87.90"] and rows[OWN][-2:] == ["—", "—"]
    assert rows["**mean**"][-2:] == ["—", "—"]
    assert rows[OWN][2] == f"{ZERO_SHOT[OWN] + COOP_GAIN:.2f}"
    assert "The quoted columns have no value for textile (not among the paper's 8 datasets), hence no mean row." in md
    assert "Dataset of your own (textile)" in md and "### Reference rows" in md

    make_inputs(tmp_path / "alone", datasets=[OWN])
    run(tmp_path / "alone", datasets=[OWN])
    md = (tmp_path / "alone" / "reports" / "results.md").read_text()
    header, rows = _table(md)
    assert not any("quoted" in h for h in header) and len(rows[OWN]) == len(header) == 1 + 2 + len(METHODS)
    assert "None of these datasets is one of the paper's 8 (EuroSAT, DTD, Caltech, Pets, Flowers, Food, " \
           "Aircraft, UCF), so no published accuracy is quoted beside them." in md
    assert "### Reference rows" not in md and "84.9" not in md
