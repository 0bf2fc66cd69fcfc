"""The scale study on CPU: the on-device base builder, exact byte accounting, the record's structure, the
out-of-memory path (simulated), the fresh-process runner and the report built from the records."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from clip_qlora import config
from clip_qlora.jobs import scale
from clip_qlora.report import scale as scale_report
from clip_qlora.config import Params
from clip_qlora.runtime.io import UserError
from clip_qlora.core.model import block_linears, build_base
from clip_qlora.runtime.processes import FreshProcesses
from clip_qlora.core.random_base import build_on_device, make_random_base, parameter_count

from cli_helpers import demo_params, invoke, project, single_thread
import proc_helpers

NF4 = {"type": "nf4", "double_quant": True, "blocksize": 64}
TINY = ("clip-tiny", "clip-tiny-wide")


def tiny_scale_params(**scale_overrides) -> Params:
    p = config.load_with({"datasets": ["shapes"], "model.arch": "clip-tiny", "model.pretrained": "none",
                          "scale.archs": list(TINY), "scale.batches": ["2x2"], "scale.n_classes": 3,
                          "scale.warmup": 1, "scale.steps": 1})
    for k, v in scale_overrides.items():
        setattr(p.scale, k, v)
    return p


# ---- the base built on the device ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY)
def test_fp32_build_on_cpu_is_build_base_bit_for_bit(arch):
    """Same constructors, same generator, same seed: on CPU in fp32 the builder changes nothing."""
    ref, _ = build_base(arch, "none", torch.float32)
    got = build_on_device(arch, torch.float32, "cpu")
    a, b = ref.state_dict(), got.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(ref.attn_mask, got.attn_mask)
    assert torch.get_default_dtype() == torch.float32 and torch.get_default_device().type == "cpu"


def test_bf16_build_has_build_base_structure_and_scale():
    """Initialised in the compute dtype: other values, but every tensor's dtype and shape, LayerNorms in fp32,
    the causal mask, and weights of the same spread as build_base's."""
    ref, _ = build_base("clip-tiny-wide", "none", torch.bfloat16)
    got = build_on_device("clip-tiny-wide", torch.bfloat16, "cpu")
    a, b = ref.state_dict(), got.state_dict()
    assert [(k, v.dtype, v.shape) for k, v in a.items()] == [(k, v.dtype, v.shape) for k, v in b.items()]
    assert all(m.weight.dtype == torch.float32 for m in got.modules() if isinstance(m, nn.LayerNorm))
    assert torch.equal(ref.attn_mask, got.attn_mask) and not any(p.requires_grad for p in got.parameters())
    for k in ("visual.transformer.resblocks.0.attn.q_proj.weight", "transformer.resblocks.2.mlp.c_fc.weight",
              "token_embedding.weight", "visual.conv1.weight"):
        sa, sb = a[k].float().std().item(), b[k].float().std().item()
        assert abs(sa - sb) < 0.05 * sa, (k, sa, sb)


@pytest.mark.parametrize("arch", TINY)
def test_parameter_count_on_meta_is_the_built_models(arch):
    model = build_on_device(arch, torch.float32, "cpu")
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())


def test_unknown_arch_is_named():
    with pytest.raises(UserError, match="^params: scale.archs = 'ViT-Q-99': expected an open_clip architecture"):
        parameter_count("ViT-Q-99")


# ---- byte accounting ----------------------------------------------------------------------------------------

def _expected_frozen(model_bf16: nn.Module) -> tuple[int, int]:
    """(bf16 base, NF4 base with expand_absmax) frozen bytes from the parameter shapes alone."""
    ln = {id(p) for m in model_bf16.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    dense = sum(p.numel() * (4 if id(p) in ln else 2) for p in model_bf16.parameters())
    dense += 77 * 77 * 2  # the causal mask buffer, in the compute dtype
    block_weights = [lin.in_features * lin.out_features for *_, lin in block_linears(model_bf16)]
    # NF4: two 4-bit codes a byte, one fp32 absmax per 64 weights (double quantization expanded for
    # training), the 16-entry fp32 code book of each Linear; biases stay in bf16 among the dense bytes
    nf4 = dense - 2 * sum(block_weights) + sum(n // 2 + (n // 64) * 4 + 16 * 4 for n in block_weights)
    return dense, nf4


@pytest.mark.parametrize("arch", ["clip-tiny-wide"])
def test_frozen_bytes_of_the_records_are_exact(arch):
    """bf16 = 2 bytes per parameter (4 for LayerNorms) + the mask; NF4 = that with each block weight packed to
    0.5 byte plus its absmax and code book. On CPU the token table stays on the device, so it counts."""
    p = tiny_scale_params()
    p.model.compute_dtype = "bf16"
    p.methods = ["lora", "qlora"]
    ref, _ = build_base(arch, "none", torch.bfloat16)
    bf16, nf4 = _expected_frozen(ref)
    with single_thread():
        rec = scale.measure_arch(p, arch, "cpu")
    assert rec["methods"]["lora"]["b2x2"]["device_base_bytes"] == bf16
    assert rec["methods"]["qlora"]["b2x2"]["device_base_bytes"] == nf4
    # trainable: r=2 A and B matrices on q, k, v of every block of both towers, fp32
    lora = sum(2 * 2 * lin.in_features for name, _, attr, lin in block_linears(ref) if attr in ("q_proj", "k_proj",
                                                                                                 "v_proj"))
    for m in p.methods:
        c = rec["methods"][m]["b2x2"]
        assert c["trainable_params"] == lora
        n_tensors = 2 * 3 * sum(len(t.transformer.resblocks) for t in (ref.visual, ref))
        assert c["trainable_bytes"] == 16 * lora + 4 * n_tensors  # param, grad, exp_avg, exp_avg_sq; step


def test_nf4_base_quantizes_every_block_linear():
    from bitsandbytes.nn import Linear4bit

    model, meta = make_random_base("clip-tiny", "nf4", NF4, torch.bfloat16, "cpu")
    assert all(isinstance(lin, Linear4bit) for *_, lin in block_linears(model))
    assert meta["base"] == "nf4" and meta["is_pretrained"] is False and meta["build_seconds"] >= 0


# ---- the record ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_record():
    p = tiny_scale_params(n_classes=2)
    with single_thread():
        return p, scale.measure_arch(p, "clip-tiny", "cpu")


def test_record_structure(tiny_record):
    p, rec = tiny_record
    assert rec["arch"] == "clip-tiny" and rec["params"] == parameter_count("clip-tiny")
    assert rec["batches"] == ["2x2"] and rec["n_classes"] == 2 and rec["pretrained"] is False
    assert rec["device"].startswith("cpu") and rec["gpu_gib"] is None and rec["lora"]["towers"] == ["vision", "text"]
    assert list(rec["methods"]) == p.methods
    for m, entry in rec["methods"].items():
        assert entry["base"] == ("nf4" if m.startswith("qlora") else "bf16")
        assert entry["gradient_checkpointing"] == m.endswith("_gc")
        assert set(entry) == {"base", "gradient_checkpointing", "b2x2"}
        for spec in ("b2x2",):
            c = entry[spec]
            assert c["fits"] is True and c["step_mode"] == "eager" and c["step_ms"] > 0
            assert c["device_base_bytes"] > 0 and c["saved_activation_bytes"] > 0 and c["trainable_params"] > 0
            # off CUDA the allocator and the driver say nothing
            for k in ("peak_allocated_bytes", "peak_reserved_bytes", "driver_bytes", "driver_eager_bytes",
                      "driver_context_bytes", "memory_allocated_bytes", "baseline_allocated_bytes"):
                assert c[k] is None, (m, spec, k)
    json.dumps(rec)  # what the stage writes


def test_checkpointing_cuts_saved_activations_in_the_record(tiny_record):
    _, rec = tiny_record
    for spec in ("b2x2",):
        for plain, gc in (("lora", "lora_gc"), ("qlora", "qlora_gc")):
            assert rec["methods"][gc][spec]["saved_activation_bytes"] < rec["methods"][plain][spec]["saved_activation_bytes"]


# ---- out of memory ------------------------------------------------------------------------------------------

def _oom_for(monkeypatch, method: str, spec_micro: int):
    """The training step raises CUDA's out-of-memory error for one method at one micro-batch size."""
    import clip_qlora.jobs.profile as profile

    real = profile.optimizer_step

    def step(run, batches):
        if run.meta["base"] == scale.METHODS[method].base and run.blocks.checkpointing == scale.METHODS[method].checkpointing \
                and batches[0][0].shape[0] == spec_micro:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(run, batches)

    monkeypatch.setattr(profile, "optimizer_step", step)


def test_out_of_memory_is_recorded_and_the_arch_goes_on(monkeypatch):
    p = tiny_scale_params(batches=["2x2", "4x1"], n_classes=2)
    p.methods = ["lora", "qlora"]
    _oom_for(monkeypatch, "lora", 4)
    with single_thread():
        rec = scale.measure_arch(p, "clip-tiny", "cpu")
    assert rec["methods"]["lora"]["b4x1"] == {"fits": False, "gpu_gib": None}
    assert rec["methods"]["lora"]["b2x2"]["fits"] is True  # the same method at the other configuration
    assert rec["methods"]["qlora"]["b4x1"]["fits"] is True and rec["methods"]["qlora"]["b2x2"]["fits"] is True


def test_out_of_memory_through_the_stage(tmp_path, monkeypatch):
    """The stage writes the record with the configuration that did not fit, exit code 0."""
    _oom_for(monkeypatch, "qlora", 2)
    params = demo_params({"scale.batches": ["2x2"], "scale.steps": 1, "scale.n_classes": 3})
    with project(tmp_path, params), single_thread():
        r = invoke("scale", "--arch", "clip-tiny")
        assert r.exit_code == 0, r.stderr
        rec = json.loads((tmp_path / "metrics/scale/clip-tiny.json").read_text())
    assert rec["methods"]["qlora"]["b2x2"] == {"fits": False, "gpu_gib": None}
    assert rec["methods"]["lora"]["b2x2"]["fits"] is True
    assert "qlora 2x2: out of memory" in r.stderr


def test_other_errors_stop_the_stage_unless_keep_going(monkeypatch):
    import clip_qlora.jobs.profile as profile

    def broken(run, batches):
        raise RuntimeError("an unrelated failure")

    monkeypatch.setattr(profile, "optimizer_step", broken)
    p = tiny_scale_params()
    p.methods = ["lora"]
    with pytest.raises(RuntimeError, match="unrelated"):
        scale.measure_arch(p, "clip-tiny", "cpu")
    rec = scale.measure_arch(p, "clip-tiny", "cpu", keep_going=True)
    assert rec["methods"]["lora"]["b2x2"] == {"error": "RuntimeError: an unrelated failure"}


def test_stage_refuses_an_arch_not_in_params(tmp_path):
    with project(tmp_path, demo_params()):
        r = invoke("scale", "--arch", "ViT-B-16")
    assert r.exit_code == 2 and "--arch 'ViT-B-16': expected one of clip-tiny, clip-tiny-wide" in r.stderr


# ---- fresh processes ----------------------------------------------------------------------------------------

def test_fresh_processes_one_per_call():
    """Forced on (a 'cuda' device string; the calls touch no GPU): every call in a new process, never this one,
    results and errors handed back; a user error stays the one line it was."""
    with FreshProcesses("cuda", warm=("proc_helpers",), ahead=1) as call:
        pids = [call(proc_helpers.pid) for _ in range(3)]
        with pytest.raises(UserError, match="^scale.archs: nothing here$"):
            call(proc_helpers.fail_user)
        with pytest.raises(ValueError, match="broken") as e:
            call(proc_helpers.fail)
        assert "in the measuring process" in str(e.value.__notes__)
        assert call(proc_helpers.add, 2, 3) == 5
    assert len(set(pids)) == 3 and os.getpid() not in pids


def test_fresh_processes_in_process_off_cuda():
    with FreshProcesses("cpu") as call:
        assert call(proc_helpers.pid) == os.getpid()


def test_fresh_processes_use_the_gpu_named():
    """cuda:N becomes the measuring process's current device (as gpu_claim made it the parent's); a bare cuda
    leaves CUDA's default."""
    assert [FreshProcesses(d).cuda_index for d in ("cuda:3", "cuda", "cpu")] == [3, None, None]


# ---- the report ---------------------------------------------------------------------------------------------

GIB = 2**30


def _synthetic(folder, sizes_gib: dict, methods=("lora", "lora_gc", "qlora", "qlora_gc"), batch="4x8",
               oom=()):
    """Records whose driver figures are given (GiB per arch and method): for the report's logic only."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (arch, per_method) in enumerate(sizes_gib.items()):
        rec = {"arch": arch, "params": (i + 1) * 10**8, "n_classes": 100, "batches": [batch], "warmup": 1,
               "steps": 5, "compute_dtype": "bfloat16", "device": "GPU", "gpu_gib": 139.8, "pretrained": False,
               "lora": {"r": 2, "targets": ["q", "k", "v"], "towers": ["vision", "text"]},
               "versions": {"python": "3.11"}, "methods": {}}
        for m in methods:
            static = (i + 1) * (GIB // 4 if m.startswith("qlora") else GIB)
            c = ({"fits": False, "gpu_gib": 139.8} if (arch, m) in oom else
                 {"fits": True, "device_base_bytes": static, "driver_bytes": int(per_method[m] * GIB),
                  "peak_allocated_bytes": int(per_method[m] * GIB) - GIB // 2, "peak_reserved_bytes": None,
                  "saved_activation_bytes": 1000, "trainable_params": 10, "step_ms": 10.0 * (i + 1),
                  "step_mode": "cuda_graph", "base_build_seconds": 1.5})
            rec["methods"][m] = {"base": "nf4" if m.startswith("qlora") else "bf16",
                                 "gradient_checkpointing": m.endswith("_gc"), f"b{batch}": c}
        (folder / f"{arch}.json").write_text(json.dumps(rec))
    return list(sizes_gib)


def test_fit_table_and_sentences_from_the_numbers(tmp_path):
    archs = _synthetic(tmp_path, {
        "small": {"lora": 6, "lora_gc": 3, "qlora": 5, "qlora_gc": 2},
        "mid": {"lora": 20, "lora_gc": 14, "qlora": 15, "qlora_gc": 9},
        "large": {"lora": 40, "lora_gc": 30, "qlora": 15.5, "qlora_gc": 10},
    }, oom=[("large", "lora")])
    methods, sizes = ["lora", "lora_gc", "qlora", "qlora_gc"], [8.0, 16.0, 24.0]
    recs = scale_report.load(tmp_path, archs, methods, ["4x8"])
    table = {r["arch"]: [scale_report.smallest_fit(r["configs"][m, "4x8"], sizes)[1] for m in methods] for r in recs}
    assert table == {"small": ["8 GiB"] * 4, "mid": ["24 GiB", "16 GiB", "16 GiB", "16 GiB"],
                     "large": ["> 139.8 GiB (out of memory)", "> 24 GiB", "16 GiB", "16 GiB"]}
    said = scale_report.fit_sentences(recs, methods, ["4x8"], sizes)
    assert "At 4x8, every method fits in 8 GiB on every architecture measured (up to large)." not in said
    assert "From mid on, no method fits in 8 GiB at 4x8." in said
    assert "From large on, only the 4-bit methods (qlora and qlora_gc) fit in 24 GiB at 4x8." in said
    payoff = scale_report.payoff_sentences(recs, methods, ["4x8"], sizes)
    assert any(s.startswith("At 4x8, qlora first fits a smaller GPU than lora at mid") for s in payoff), payoff
    assert any(s.startswith("At 4x8, qlora_gc first fits a smaller GPU than lora_gc at large") for s in payoff)


def test_report_outputs(tmp_path):
    archs = _synthetic(tmp_path / "metrics", {"a": {"lora": 6, "lora_gc": 3, "qlora": 5, "qlora_gc": 2},
                                              "b": {"lora": 20, "lora_gc": 9, "qlora": 15, "qlora_gc": 7}})
    p = tiny_scale_params(archs=archs, batches=["4x8"], gpu_gib=[8, 16, 24])
    text = scale_report.report(p, tmp_path / "metrics", tmp_path / "scale.md", tmp_path / "plots",
                               tmp_path / "figs")
    assert (tmp_path / "scale.md").read_text() == text + "\n"
    assert "| b | 24 GiB | 16 GiB | 16 GiB | 8 GiB |" in text and "Random weights" in text
    assert "| frozen bf16 base GiB | frozen NF4 base GiB | NF4/bf16 |" in text and "from a CPU" not in text
    # the figures are linked, relative to the report
    assert "![Memory per method against model size](figs/memory.png)" in text
    assert "![Step time per method against model size](figs/step_time.png)" in text
    memory = json.loads((tmp_path / "plots/memory/4x8.json").read_text())
    assert [r["arch"] for r in memory] == ["a", "b"] and memory[1]["qlora"] == 15.0
    assert memory[0]["frozen_bf16"] == 1.0 and memory[0]["frozen_nf4"] == 0.25
    assert json.loads((tmp_path / "plots/step_time/4x8.json").read_text())[1]["lora"] == 20.0
    # every column dvc.yaml's plots name is there, null where not measured (DVC refuses a missing field)
    recs = scale_report.load(tmp_path / "metrics", archs, ["lora"], ["4x8"])
    rows = scale_report.plot_records(recs, ["lora"], "4x8")[0]
    assert rows[0]["lora"] == 6.0 and rows[0]["qlora"] is None and rows[0]["frozen_nf4"] is None
    for name in ("memory", "step_time"):
        assert (tmp_path / "figs" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_a_missing_record_and_writes_nothing(tmp_path):
    archs = _synthetic(tmp_path / "metrics", {"a": {"lora": 6, "lora_gc": 3, "qlora": 5, "qlora_gc": 2}})
    p = tiny_scale_params(archs=[*archs, "ViT-B-16"], batches=["4x8"])
    with pytest.raises(UserError, match=r"ViT-B-16.json: missing; run the scale stage first \(dvc repro scale@ViT-B-16\)"):
        scale_report.report(p, tmp_path / "metrics", tmp_path / "scale.md", tmp_path / "plots", tmp_path / "figs")
    assert not (tmp_path / "scale.md").exists() and not (tmp_path / "plots").exists()


def test_report_names_a_bad_field(tmp_path):
    archs = _synthetic(tmp_path, {"a": {"lora": 6, "lora_gc": 3, "qlora": 5, "qlora_gc": 2}})
    rec = json.loads((tmp_path / "a.json").read_text())
    rec["methods"]["qlora"]["b4x8"]["step_ms"] = "fast"
    (tmp_path / "a.json").write_text(json.dumps(rec))
    with pytest.raises(UserError, match=r"a.json: methods.qlora.b4x8: 'step_ms' must be a positive number"):
        scale_report.load(tmp_path, archs, ["lora", "qlora"], ["4x8"])


def test_report_on_cpu_records(tiny_record, tmp_path):
    """CPU records (no allocator or driver figures): no fit table, frozen bytes and step times only."""
    _, rec = tiny_record
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "clip-tiny.json").write_text(json.dumps(rec))
    recs = scale_report.load(tmp_path / "m", ["clip-tiny"], list(rec["methods"]), rec["batches"])
    text = scale_report.render(recs, list(rec["methods"]), rec["batches"], [8.0])
    assert "Not measured on a GPU" in text and "The smallest GPU" not in text
    # the unquantized base ran in fp32 on the CPU: not called bf16; and its time ratios are flagged
    assert rec["compute_dtype"] == "float32"
    assert "| frozen fp32 (unquantized) base GiB | frozen NF4 base GiB | NF4/fp32 |" in text and "bf16" not in text
    assert "Step times here come from a CPU, where their ratios mean little" in text


def test_scale_memory_figure_off_a_gpu_says_neither_gpu_nor_bf16(tiny_record, tmp_path, monkeypatch):
    from clip_qlora.report import scale_figures

    _, rec = tiny_record
    (tmp_path / "clip-tiny.json").write_text(json.dumps(rec))
    recs = scale_report.load(tmp_path, ["clip-tiny"], list(rec["methods"]), rec["batches"])
    drawn = []
    monkeypatch.setattr(scale_figures, "_save", lambda fig, path: drawn.append(fig))
    scale_figures.memory_figure(tmp_path / "m.png", recs, list(rec["methods"]), rec["batches"], [8.0])
    ax = drawn[0].axes[0]
    assert ax.get_ylabel() == "memory (GiB, log scale)"
    assert {line.get_label() for line in ax.get_lines()} == {"frozen fp32 (unquantized) base", "frozen NF4 base"}


# ---- the GPU script, on CPU -----------------------------------------------------------------------------------

def test_gpu_script_measures_then_collects_what_the_pipeline_writes(tmp_path):
    """measure (cut off by its budget, then the rest) and collect: metrics/scale/<arch>.json are the records
    scale@<arch> writes, and the report, result files and README figures follow from them."""
    from cli_helpers import load_benchmark, write_params

    bench = load_benchmark("scale")
    params = write_params(tmp_path / "proj", demo_params({
        "methods": ["lora", "qlora"], "scale.archs": list(TINY), "scale.batches": ["2x1"],
        "scale.n_classes": 2, "scale.steps": 1}))
    first, second = tmp_path / "call1", tmp_path / "call2"
    with project(tmp_path / "proj"), single_thread():
        # a budget of 0 s: the first configuration, then it stops; the architecture stays incomplete
        assert bench.main(["measure", "--out", str(first), "--params", str(params), "--device", "cpu",
                           "--budget-s", "0"]) == 1
        run = json.loads((first / "scale.json").read_text())
        assert run["complete"] is False and run["archs"]["clip-tiny"]["complete"] is False
        assert list(run["archs"]["clip-tiny"]["record"]["methods"]) == ["lora"]
        assert bench.main(["collect", str(first), "--params", str(params)]) == 2  # nothing complete yet
        assert bench.main(["measure", "--out", str(second), "--params", str(params), "--device", "cpu",
                           "--archs", ",".join(TINY)]) == 0
        assert bench.main(["collect", str(first), str(second), "--params", str(params),
                           "--results", str(tmp_path / "results"), "--docs", str(tmp_path / "docs")]) == 0
        rec = json.loads(Path("metrics/scale/clip-tiny-wide.json").read_text())
        assert rec == json.loads((second / "scale.json").read_text())["archs"]["clip-tiny-wide"]["record"]
        assert Path("reports/scale.md").exists() and Path("plots/scale_figures/memory.png").exists()
    (res,) = (tmp_path / "results").glob("*-scale.json")
    assert res.name.startswith(run["date"] + "-cpu-")
    out = json.loads(res.read_text())
    assert set(out["archs"]) == set(TINY) and out["environment"]["torch"]
    status = {t["target"]: (t["status"], t["value"]) for t in out["targets"]}
    assert status["all 4 measurements on one H200"] == ("MISSED", 4)  # all four, but on a CPU
    assert status["qlora_gc on ViT-bigG-14 at 4x8 within 4 GiB as the driver reports it"] == ("n/a", None)
    assert "Targets (issue 15)" in res.with_suffix(".md").read_text()
    assert (tmp_path / "docs" / "scale-memory.png").read_bytes()[:4] == b"\x89PNG"
    # a committed results file counts as the calls it was collected from: collecting it with nothing else
    # gives the same records and the same calls, so a later device call can extend it
    with project(tmp_path / "proj"), single_thread():
        assert bench.main(["collect", str(res), "--params", str(params), "--results", str(tmp_path / "again"),
                           "--docs", str(tmp_path / "docs2")]) == 0
    again = json.loads((tmp_path / "again" / res.name).read_text())
    assert again["archs"] == out["archs"] and again["calls"] == out["calls"]
    assert [c["archs"] for c in out["calls"]] == [list(TINY)]  # the cut-off first call supplied nothing
