"""End to end: the DVC pipeline on the offline demo profile, through real `dvc repro` / `dvc exp run`.

The project (dvc.yaml, params.yaml, src/, stages/, configs/, Makefile, pyproject.toml) is copied into a
temporary git + DVC repository whose params.yaml is the study's with configs/demo.yaml laid over it (as
`make demo` does) plus the test-speed overrides below. One module-scoped fixture pays for the expensive
runs; each check is its own test.

Cost: a cold stage is a fresh Python process spending ~10 s of CPU importing torch, open_clip, peft and
bitsandbytes, so the budget is counted in stage processes, not training steps (those are made negligible:
1 seed, 1 shot, 1 step, a tiny profile, one scale architecture). The first `dvc repro` runs its 19 stages
as `make run` does, those that import torch warm (forks of one server that imported the libraries once:
clip_qlora.runtime.warm); the stages
run later are cold: 1 for `dvc repro quantize@nf4` with quant.expand_absmax off (a setting that leaves the
stored tensors alone must still reach the qlora side, through the method pointers), 1 for `dvc exp run -S
quant.blocksize=128 quantize@nf4` (the real NF4 rebuild; what each makes stale is read from `dvc status`),
and 2 run by hand (evaluate and train), which must write what the warm run wrote.
The run has two datasets: the demo's generated `shapes` and a dataset of the user's own, `textile`
(conformal-clip-data's 2,000 real JPEGs copied under data.root as a user lays out theirs, declared in params'
own_datasets with a test_fraction that keeps its test split near 200 images): 9 more stage processes. What a lora.r, quant.* or runtime.* change reruns is also checked as DVC plans it
(`dvc status --json`, `dvc repro --dry --force-downstream`). PIPELINE_TEST_FULL=1 adds the real reruns
(the rest of the quant.* rerun and `dvc exp run -S lora.r=8`: 20 more stage processes, ~4 more minutes).

PIPELINE_TEST_PROJECT=<folder> runs the test against another checkout (default: this one).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clip_qlora.core.backends import METHODS as METHOD_TABLE
from tools.demo import merge  # how `make demo` lays configs/demo.yaml over params.yaml
from clip_qlora.runtime.warm import SERVED_STAGES
from conformal_clip_data import textile_simulated_root  # real JPEGs no one here made (pyproject's test extra)

pytestmark = pytest.mark.slow

PROJECT = Path(os.environ.get("PIPELINE_TEST_PROJECT") or Path(__file__).resolve().parents[1])
PROJECT_FILES = ("dvc.yaml", "params.yaml", "src", "stages", "configs", "Makefile", "pyproject.toml")
BIN = Path(sys.executable).parent

METHODS = list(METHOD_TABLE)
LORA_SIDE = [m for m, s in METHOD_TABLE.items() if s.base == "bf16"]
QLORA_SIDE = [m for m, s in METHOD_TABLE.items() if s.base == "nf4"]
DATASET = "shapes"
OWN = "textile"  # a dataset of the user's own: real images, declared in params.yaml
DATASETS = [DATASET, OWN]
OWN_ENTRY = {"folder": "textile", "template": "a photo of a {} textile.", "test_fraction": 0.1, "classnames": None}
SEED = 1
BATCHES = ["2x2", "4x1"]
SCALE_ARCH = "clip-tiny"

# On top of configs/demo.yaml: keep every code path (4 methods, both towers, accumulation in the profile),
# make the work inside each stage negligible.
SPEED = {
    "datasets": DATASETS,
    "own_datasets": {OWN: OWN_ENTRY},
    "data": {"seeds": [SEED], "shots": 1},
    "train": {"iterations_per_shot": 1, "batch_size": 4},
    "eval": {"batch_size": 256},
    "runtime": {"checkpoint_every": 100, "eval_workers": 0},
    "profile": {"warmup": 1, "steps": 1, "batches": BATCHES, "n_classes": 2},
    # one of the demo's two tiny architectures: the stage's code path, one stage process
    "scale": {"archs": [SCALE_ARCH], "batches": ["2x1"], "n_classes": 2, "warmup": 1, "steps": 1},
}

ZEROSHOT = {"zeroshot@bf16", "zeroshot@nf4"}  # once per base, not per method
PREPARE = {f"prepare@{d}" for d in DATASETS}
ALL_STAGES = {*PREPARE, "quantize@bf16", "quantize@nf4", "aggregate", *ZEROSHOT,
              *(f"train@{m}-{d}" for m in METHODS for d in DATASETS),
              *(f"evaluate@{m}-{d}" for m in METHODS for d in DATASETS),
              *(f"profile@{m}" for m in METHODS), f"scale@{SCALE_ARCH}", "scale_report"}
# what a change of quant.* must rerun: the NF4 base and everything downstream of the qlora pointers, and
# the scale study (it builds its NF4 bases itself, from quant.*)
SCALE_SIDE = {f"scale@{SCALE_ARCH}", "scale_report"}
BLOCKSIZE_RERUN = {"quantize@nf4", "zeroshot@nf4", "aggregate",
                   *(f"train@{m}-{d}" for m in QLORA_SIDE for d in DATASETS),
                   *(f"evaluate@{m}-{d}" for m in QLORA_SIDE for d in DATASETS), *(f"profile@{m}" for m in QLORA_SIDE),
                   *SCALE_SIDE}
# what a change of lora.* must rerun: every method's train, evaluate, profile, aggregate, and the scale study;
# not the bases' zero-shot (no adapters)
LORA_RERUN = ALL_STAGES - {*PREPARE, "quantize@bf16", "quantize@nf4", *ZEROSHOT}
# result-neutral knobs, each changed: the profile and the scale study measure the first four; no stage lists
# the last two
RUNTIME = {"runtime.cuda_graph": False, "runtime.cublas_workspace_kib": 0, "runtime.overlap_text": False,
           "runtime.layernorm_in_compute_dtype": False, "runtime.fused_activation": False,
           "runtime.checkpoint_every": 7, "runtime.eval_workers": 1}
PROFILED = {"runtime.cuda_graph", "runtime.cublas_workspace_kib", "runtime.overlap_text",
            "runtime.layernorm_in_compute_dtype", "runtime.fused_activation"}

STAGE_OPTIONS = {
    "prepare": ["--dataset", "--out"],
    "quantize": ["--base"],
    "train": ["--method", "--dataset"],
    "evaluate": ["--method", "--dataset"],
    "zeroshot": ["--base"],
    "profile": ["--method"],
    "aggregate": [],
    "scale": ["--arch"],
    "scale_report": [],
}
# metrics fields whose value depends on timing (or on the run that wrote them), not on the inputs
TIMING_KEYS = re.compile(r"(seconds|seconds_mean|_ms|_ms_median|step_ms|resumed_from|per_second)$")

_RAN = re.compile(r"Running stage '([^']+)'")
_RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")


# ---- helpers ------------------------------------------------------------------------------------------------

def stages_run(output: str) -> set[str]:
    """Stages DVC reproduced (ran, or restored from its run-cache) according to its output."""
    return set(_RAN.findall(output)) | set(_RESTORED.findall(output))


def read(repo: Path, rel: str):
    return json.loads((repo / rel).read_text())


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if not TIMING_KEYS.search(k)}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def set_param(repo: Path, dotted: str, value) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for k in parents:
        node = node[k]
    node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


class Repo:
    """The temporary project, and every command's combined output, for the assertion messages."""

    def __init__(self, root: Path):
        self.root = root
        self.env = dict(os.environ)
        self.env.update({
            "PATH": f"{BIN}{os.pathsep}{self.env.get('PATH', '')}",
            "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}",
            "HF_HUB_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1",
            "COLUMNS": "200",  # rich help/tables: no wrapped option names
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        })

    def run(self, *cmd: str, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), cwd=self.root, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` exited {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n"
                        f"--- stderr\n{r.stderr[-6000:]}", pytrace=False)
        return r

    def dvc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "dvc"), *args, **kw)

    def git(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("git", *args)

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)


def make_repo(dest: Path) -> Repo:
    for name in PROJECT_FILES:
        src = PROJECT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    shutil.copy2(PROJECT / ".gitignore", dest / ".gitignore")
    params = merge(yaml.safe_load((PROJECT / "params.yaml").read_text()),
                   yaml.safe_load((PROJECT / "configs" / "demo.yaml").read_text()))
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(params, SPEED), sort_keys=False))
    # the user's own images, laid out as the README's "Your own data" says: one folder per class under data.root
    shutil.copytree(textile_simulated_root(), dest / params["data"]["root"] / OWN_ENTRY["folder"])
    repo = Repo(dest)
    repo.git("init", "-q")
    repo.dvc("init", "-q")
    repo.dvc("config", "core.analytics", "false")
    repo.commit("project")
    return repo


# ---- the shared expensive part ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """First `dvc repro`, then a second one; committed so experiments have a baseline."""
    repo = make_repo(tmp_path_factory.mktemp("pipeline"))
    # as `make run` does: every torch stage a fork of one warm server (clip_qlora.runtime.warm); the stages run by hand
    # below run cold and must write the same
    first = repo.run(sys.executable, "-m", "clip_qlora.runtime.warm", "--", str(BIN / "dvc"), "repro", check=False)
    state = {"repo": repo, "first": first.stdout + first.stderr, "ok": first.returncode == 0}
    if not state["ok"]:  # the output checks still run on what was written; the rest fail on `good`
        return state
    # snapshots before anything else touches the workspace
    state["methods_before"] = {m: read(repo.root, f"models/methods/{m}.json") for m in METHODS}
    second = repo.dvc("repro")
    state["second"] = second.stdout + second.stderr
    state["status"] = repo.dvc("status").stdout
    repo.commit("first repro")
    return state


@pytest.fixture(scope="module")
def good(pipeline):
    """The pipeline fixture, for checks that need the first `dvc repro` to have succeeded."""
    if not pipeline["ok"]:
        pytest.fail("the first `dvc repro` failed (see test_first_repro_runs_every_stage):\n"
                    + pipeline["first"][-3000:], pytrace=False)
    return pipeline


def changed_params(status: dict) -> dict[str, set[str]]:
    """stage -> the params.yaml keys `dvc status --json` reports changed for it."""
    out = {}
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict):
                out.setdefault(stage, set()).update((entry.get("changed deps") or {}).get("params.yaml") or {})
    return out


def would_rerun(repo: Repo, dotted: str, value) -> dict:
    """Change one param, ask DVC what changed and what `dvc repro` would run, and put the file back."""
    path = repo.root / "params.yaml"
    original = path.read_text()
    set_param(repo.root, dotted, value)
    try:
        status = json.loads(repo.dvc("status", "--json").stdout or "{}")
        dry = repo.dvc("repro", "--dry", "--force-downstream")
    finally:
        path.write_text(original)
    return {"status": status, "dry": stages_run(dry.stdout + dry.stderr), "dry_text": dry.stdout + dry.stderr}


@pytest.fixture(scope="module")
def lora_r(good):
    """lora.r 2 -> 4 as DVC plans it (no stage runs; PIPELINE_TEST_FULL=1 adds the real experiment)."""
    return would_rerun(good["repo"], "lora.r", 4)


@pytest.fixture(scope="module")
def runtime_knobs(good, lora_r):
    """Every runtime.* key changed at once, as `dvc status` sees it (it names each changed key per stage)."""
    repo = good["repo"]
    path = repo.root / "params.yaml"
    original = path.read_text()
    for key, value in RUNTIME.items():
        set_param(repo.root, key, value)
    try:
        return json.loads(repo.dvc("status", "--json").stdout or "{}")
    finally:
        path.write_text(original)


@pytest.fixture(scope="module")
def expand_absmax(good, runtime_knobs):
    """quant.expand_absmax true -> false for real: `dvc repro quantize@nf4` (one stage process), then what
    the new NF4 base makes stale; afterwards the workspace is put back (git + dvc checkout, no stage runs)."""
    repo = good["repo"]
    set_param(repo.root, "quant.expand_absmax", False)
    out = {"status": json.loads(repo.dvc("status", "--json").stdout or "{}")}
    r = repo.dvc("repro", "quantize@nf4")
    out["output"] = r.stdout + r.stderr
    out["methods_after"] = {m: read(repo.root, f"models/methods/{m}.json") for m in METHODS}
    out["status_after"] = json.loads(repo.dvc("status", "--json").stdout or "{}")
    repo.git("checkout", "--", ".")
    repo.dvc("checkout", "--force")
    out["status_restored"] = repo.dvc("status").stdout
    return out


@pytest.fixture(scope="module")
def blocksize(good, lora_r, expand_absmax):
    """quant.blocksize 64 -> 128 as DVC plans it, then for real as `dvc exp run -S quant.blocksize=128
    quantize@nf4`: only the NF4 base is rebuilt (one stage process; the stages below it are what the new
    base makes stale, read from `dvc status`), then `exp show` and `metrics diff` of that experiment."""
    repo = good["repo"]
    out = would_rerun(repo, "quant.blocksize", 128)
    r = repo.dvc("exp", "run", "-S", "quant.blocksize=128", "quantize@nf4")
    out["output"] = r.stdout + r.stderr
    out["methods_after"] = {m: read(repo.root, f"models/methods/{m}.json") for m in METHODS}
    out["status_after"] = json.loads(repo.dvc("status", "--json").stdout or "{}")
    dry = repo.dvc("repro", "--dry", "--force-downstream")
    out["dry_after"], out["dry_after_text"] = stages_run(dry.stdout + dry.stderr), dry.stdout + dry.stderr
    show = repo.dvc("exp", "show", "--json").stdout
    diff = repo.dvc("metrics", "diff", "--all", "--json").stdout
    out.update(show=json.loads(show), show_text=show, diff=json.loads(diff), diff_text=diff)
    return out


@pytest.fixture(scope="module")
def full(request):
    """Opt-in (PIPELINE_TEST_FULL=1; ~20 more stage processes, past the CI budget): finish the quant.*
    rerun with `dvc repro`, commit, then `dvc exp run -S lora.r=8`."""
    if not os.environ.get("PIPELINE_TEST_FULL"):
        pytest.skip("PIPELINE_TEST_FULL=1 runs the full reruns (too slow for the CI budget)")
    request.getfixturevalue("blocksize")  # after the blocksize experiment, on its workspace
    repo = request.getfixturevalue("good")["repo"]
    rest = repo.dvc("repro")
    repo.commit("blocksize 128")
    exp = repo.dvc("exp", "run", "-S", "lora.r=8")
    diff = json.loads(repo.dvc("metrics", "diff", "--all", "--json").stdout)
    return {"rest": rest.stdout + rest.stderr, "exp": exp.stdout + exp.stderr, "diff": diff}


# ---- first repro: every output and its schema -------------------------------------------------------------

def test_first_repro_runs_every_stage(pipeline):
    assert pipeline["ok"], "`dvc repro` failed:\n" + pipeline["first"][-4000:]
    assert stages_run(pipeline["first"]) == ALL_STAGES, pipeline["first"][-4000:]


def test_first_repro_ran_every_torch_stage_warm(pipeline):
    out = pipeline["first"]
    served = {s for s in ALL_STAGES if s.partition("@")[0] in SERVED_STAGES}
    assert served != ALL_STAGES  # prepare, aggregate and scale_report start cold
    assert f"warm: {len(served)} stage processes served from the warm server" in out, out[-4000:]
    assert "not served" not in out and "running here" not in out, out[-4000:]


def test_split(pipeline):
    split = read(pipeline["repo"].root, f"data/splits/{DATASET}.json")
    assert {"dataset", "classnames", "template", "source", "shots", "test", "train", "replacement"} <= set(split)
    assert split["dataset"] == DATASET and split["shots"] == SPEED["data"]["shots"]
    assert set(split["train"]) == {str(SEED)} and split["test"]


@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_bases(pipeline, base):
    d = pipeline["repo"].root / "models" / base
    assert (d / "base.json").is_file() and (d / "model.safetensors").stat().st_size > 0
    assert json.loads((d / "base.json").read_text())


def test_method_pointers(pipeline):
    for m in METHODS:
        p = read(pipeline["repo"].root, f"models/methods/{m}.json")
        base = METHOD_TABLE[m].base
        assert p["method"] == m and p["base"] == base and p["gradient_checkpointing"] == METHOD_TABLE[m].checkpointing
        assert p["dir"] == f"models/{base}" and len(p["sha256"]) == 64
        assert p["settings"] == read(pipeline["repo"].root, f"models/{base}/base.json")["settings"]


def test_static_metrics(pipeline):
    s = {b: read(pipeline["repo"].root, f"metrics/static/{b}.json") for b in ("bf16", "nf4")}
    for b, m in s.items():
        assert m["base"] == b
        assert isinstance(m["stored_base_bytes"], int) and not isinstance(m["stored_base_bytes"], bool)
        assert m["stored_base_bytes"] > 0 and m["pretrained"] is False
    assert s["nf4"]["stored_base_bytes"] < s["bf16"]["stored_base_bytes"]
    assert s["nf4"]["quant"]["blocksize"] == 64


@pytest.mark.parametrize("method", METHODS)
def test_train_outputs(pipeline, method):
    root = pipeline["repo"].root
    adapters = root / "adapters" / method / DATASET / f"seed{SEED}"
    assert (adapters / "adapter_config.json").is_file()
    assert (adapters / "adapter_model.safetensors").stat().st_size > 0
    t = read(root, f"metrics/train/{method}/{DATASET}.json")
    assert t["method"] == method and t["dataset"] == DATASET and t["seeds"] == [SEED]
    assert t["steps"] == 1 and t["trainable_params"] > 0 and t["pretrained"] is False
    assert set(t["per_seed"]) == {str(SEED)}
    loss = root / "dvclive" / "train" / method / DATASET / f"seed{SEED}" / "plots" / "metrics" / "train" / "loss.tsv"
    header = loss.read_text().splitlines()[0].split("\t")
    assert {"step", "loss"} <= set(header), header


@pytest.mark.parametrize("method", METHODS)
def test_eval_metrics(pipeline, method):
    root = pipeline["repo"].root
    e = read(root, f"metrics/eval/{method}/{DATASET}.json")
    assert e["method"] == method and e["dataset"] == DATASET
    assert 0 <= e["accuracy_mean"] <= 100 and set(e["accuracy"]) == {str(SEED)}
    assert e["pretrained"] is False and e["n_test"] > 0
    confusion = read(root, f"plots/confusion/{method}/{DATASET}.json")
    assert len(confusion) == e["n_test"] and {"actual", "predicted"} <= set(confusion[0])


@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_zeroshot_metrics_once_per_base(pipeline, base):
    """Zero-shot is the zeroshot stage's, per base: not in any evaluate stage's metrics."""
    root = pipeline["repo"].root
    z = read(root, f"metrics/zeroshot/{base}.json")
    assert z["base"] == base and list(z["datasets"]) == DATASETS and z["pretrained"] is False
    d = z["datasets"][DATASET]
    assert set(d["zero_shot"]) == {"clip", "coop"} and d["zero_shot_accuracy"] == d["zero_shot"]["clip"]
    assert d["n_test"] == read(root, f"metrics/eval/lora/{DATASET}.json")["n_test"]
    assert all("zero_shot" not in read(root, f"metrics/eval/{m}/{DATASET}.json") for m in METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_profile_metrics(pipeline, method):
    p = read(pipeline["repo"].root, f"metrics/profile/{method}.json")
    assert {"device_base_bytes", "trainable_params", "device"} <= set(p)
    assert p["device_base_bytes"] > 0 and p["trainable_params"] > 0
    on_cpu = p["device"].startswith("cpu")
    for b in BATCHES:
        block = p[f"b{b}"]
        assert set(block) == {"saved_activation_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "step_ms"}
        assert block["saved_activation_bytes"] > 0 and block["step_ms"] > 0
        if on_cpu:
            assert block["peak_allocated_bytes"] is None and block["peak_reserved_bytes"] is None


def test_every_metrics_file_is_its_contract_byte_for_byte(pipeline):
    """Each metrics file the stages wrote is where its contract (clip_qlora.metrics) places it, reads back
    with every field checked, and writes back as the same bytes."""
    from clip_qlora import metrics as M

    root = pipeline["repo"].root
    files = sorted((root / "metrics").rglob("*.json"))
    for path in files:
        rel = path.relative_to(root)
        (contract,) = [c for c in M.FILES if c.ids_of(rel) is not None and c.path(*c.ids_of(rel)) == rel]
        assert json.dumps(contract.read(path).to_dict(), indent=2) + "\n" == path.read_text(), rel
    kinds = {path.relative_to(root / "metrics").parts[0] for path in files}
    assert kinds == {"static", "train", "eval", "zeroshot", "profile", "scale", "summary.json"}


def _leaves(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    else:
        yield path, obj


def test_summary(pipeline):
    s = read(pipeline["repo"].root, "metrics/summary.json")
    bad = [(k, v) for k, v in _leaves(s) if not isinstance(v, (int, float, str, bool))]
    assert not bad, f"summary.json leaves must be scalars: {bad}"
    assert s["pretrained"] is False and s["methods"] == ",".join(METHODS) and s["best_method"] in METHODS
    for m in METHODS:
        assert 0 <= s[m]["accuracy_mean"] <= 100
        assert set(s[m]["profile"]) == {f"b{b}" for b in BATCHES}
    for m in ("qlora", "qlora_gc", "lora_gc"):
        assert "static_ratio" in s[f"{m}_vs_lora"] and "accuracy_delta" in s[f"{m}_vs_lora"]
    assert s["qlora_vs_lora"]["static_ratio"] < 1


def test_report_and_plots(pipeline):
    from clip_qlora.report.markdown import RANDOM_INIT_BANNER

    root = pipeline["repo"].root
    assert RANDOM_INIT_BANNER in (root / "reports" / "results.md").read_text()
    for name in ("accuracy", "memory", "step_time"):
        png = root / "plots" / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert isinstance(read(root, f"plots/{name}.json"), list)
    loss = read(root, f"plots/loss/{DATASET}.json")
    assert loss and set(METHODS) <= set(loss[0])
    assert read(root, f"plots/confusion_best/{DATASET}.json")


def test_scale_outputs(pipeline):
    root = pipeline["repo"].root
    rec = read(root, f"metrics/scale/{SCALE_ARCH}.json")
    assert rec["arch"] == SCALE_ARCH and rec["params"] > 0 and rec["batches"] == SPEED["scale"]["batches"]
    assert list(rec["methods"]) == METHODS
    for m in METHODS:
        c = rec["methods"][m]["b2x1"]
        assert c["fits"] is True and c["device_base_bytes"] > 0 and c["step_ms"] > 0
    text = (root / "reports" / "scale.md").read_text()
    assert "Random weights" in text and f"| {SCALE_ARCH} |" in text
    assert read(root, "plots/scale/memory/2x1.json")[0]["arch"] == SCALE_ARCH
    for name in ("memory", "step_time"):
        assert (root / "plots" / "scale_figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_show(pipeline):
    """Every plot declared in dvc.yaml renders from the files aggregate and scale_report wrote."""
    r = pipeline["repo"].dvc("plots", "show", "--json")
    shown = json.loads(r.stdout)
    assert not shown.get("errors"), shown.get("errors")
    names = set(shown["data"])
    for name in ("plots/accuracy.json", "plots/memory.json", "plots/step_time.json", f"plots/loss/{DATASET}.json",
                 f"plots/confusion_best/{DATASET}.json", *(f"plots/confusion/{m}/{DATASET}.json" for m in METHODS),
                 "plots/scale/memory/2x1.json", "plots/scale/step_time/2x1.json"):
        assert name in names, (name, sorted(names))


def test_own_dataset_of_real_images(pipeline):
    """The textile images through prepare, train, evaluate, zeroshot and aggregate as a declared own dataset: the
    split as the README and params.yaml document it, every listed image decodes, the report names the dataset."""
    import hashlib

    from clip_qlora.data.decode import open_rgb

    root = pipeline["repo"].root
    data = root / "data" / "raw" / OWN_ENTRY["folder"]
    split = read(root, f"data/splits/{OWN}.json")
    assert split["dataset"] == OWN and split["classnames"] == ["global", "local", "nominal"]
    assert split["template"] == "a photo of a {}." and "2000 images, 3 classes" in split["source"]
    for label, cls in enumerate(split["classnames"]):
        files = sorted(f"{cls}/{f.name}" for f in (data / cls).iterdir())
        # the documented rule (params.yaml, README): a test image when SHA-256(salt, NUL, path) / 2^64 < fraction
        expected = [f"{OWN_ENTRY['folder']}/{rel}" for rel in files if int.from_bytes(hashlib.sha256(
            f"clip-qlora own-dataset partition\0{rel}".encode()).digest()[:8], "big") / 2**64
            < OWN_ENTRY["test_fraction"]]
        assert sorted(p for p, lab in split["test"] if lab == label) == expected
        assert len(files) == {"nominal": 1000}.get(cls, 500)  # the whole class folder was read
    assert [lab for _, lab in split["train"][str(SEED)]] == [0, 1, 2]  # 1 shot per class
    listed = [p for p, _ in split["test"]] + [p for p, _ in split["train"][str(SEED)]]
    for path in listed:
        assert open_rgb(root / "data" / "raw" / path).size == (250, 250)
    for m in METHODS:
        e = read(root, f"metrics/eval/{m}/{OWN}.json")
        assert e["dataset"] == OWN and e["n_test"] == len(split["test"])
    for base in ("bf16", "nf4"):
        z = read(root, f"metrics/zeroshot/{base}.json")["datasets"][OWN]
        assert set(z["zero_shot"]) == {"clip", "coop"} and z["n_test"] == len(split["test"])
    report = (root / "reports" / "results.md").read_text()
    assert f"| {OWN} |" in report and f"Dataset of your own ({OWN})" in report
    assert "None of these datasets is one of the paper's 8" in report  # shapes is not the paper's either
    assert read(root, "metrics/summary.json")["datasets"] == ",".join(DATASETS)


# ---- second repro ----------------------------------------------------------------------------------------

def test_second_repro_is_a_no_op(good):
    out = good["second"]
    assert stages_run(out) == set(), out
    skipped = set(re.findall(r"Stage '([^']+)' didn't change, skipping", out))
    assert skipped == ALL_STAGES, out
    assert "Data and pipelines are up to date" in good["status"], good["status"]


# ---- quant.blocksize 64 -> 128: only the NF4 side ---------------------------------------------------------

def test_blocksize_changes_only_quantize_nf4(blocksize):
    assert set(blocksize["status"]) == {"quantize@nf4", f"scale@{SCALE_ARCH}"}, blocksize["status"]
    assert blocksize["dry"] == BLOCKSIZE_RERUN, blocksize["dry_text"]


def test_blocksize_experiment_rebuilds_only_the_nf4_base(blocksize, good):
    assert stages_run(blocksize["output"]) == {"quantize@nf4"}, blocksize["output"][-4000:]
    before, after = good["methods_before"], blocksize["methods_after"]
    for m in LORA_SIDE:
        assert after[m] == before[m]
    for m in QLORA_SIDE:
        assert after[m]["sha256"] != before[m]["sha256"]
    assert read(good["repo"].root, "metrics/static/nf4.json")["quant"]["blocksize"] == 128


def test_new_nf4_base_makes_only_the_qlora_side_stale(blocksize):
    """Through the real new pointers and static metrics: qlora/qlora_gc train, evaluate, profile, aggregate, and
    the scale study."""
    # scale_report is stale only once scale@<arch> has rerun (its deps are that stage's outputs), so `dvc
    # status` does not list it yet; `dvc repro` would run it
    assert set(blocksize["status_after"]) == BLOCKSIZE_RERUN - {"quantize@nf4", "scale_report"}, \
        blocksize["status_after"]
    assert blocksize["dry_after"] == BLOCKSIZE_RERUN - {"quantize@nf4"}, blocksize["dry_after_text"]


def _experiment_summary(show: list, dotted: str, value):
    *parents, leaf = dotted.split(".")
    for row in show:
        for e in row.get("experiments") or []:
            for run in e.get("revs") or []:
                data = run.get("data") or {}
                node = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                for k in parents:
                    node = node.get(k) or {}
                if node.get(leaf) == value:
                    return ((data.get("metrics") or {}).get("metrics/summary.json") or {}).get("data")
    return None


def test_exp_show_lists_every_method(blocksize):
    summary = _experiment_summary(blocksize["show"], "quant.blocksize", 128)
    assert summary, blocksize["show_text"][:3000]
    for m in METHODS:
        assert "accuracy_mean" in summary[m] and "trainable_params" in summary[m]
    for m in ("qlora", "qlora_gc", "lora_gc"):
        assert "static_ratio" in summary[f"{m}_vs_lora"]


def test_metrics_diff_lists_every_method(blocksize):
    diff = blocksize["diff"]
    summary = diff.get("metrics/summary.json", {})
    for m in METHODS:
        assert f"{m}.accuracy_mean" in summary, sorted(summary)
    for m in ("qlora", "qlora_gc", "lora_gc"):
        assert f"{m}_vs_lora.static_ratio" in summary, sorted(summary)
    for m in METHODS:
        assert f"metrics/eval/{m}/{DATASET}.json" in diff and f"metrics/profile/{m}.json" in diff, sorted(diff)
    static = diff["metrics/static/nf4.json"]["stored_base_bytes"]
    assert static["new"] != static["old"], static
    assert diff["metrics/static/bf16.json"]["stored_base_bytes"]["diff"] == 0


# ---- result-neutral knobs: no training or evaluation reruns ------------------------------------------------

def test_runtime_knobs_leave_train_and_evaluate_up_to_date(runtime_knobs):
    changed = changed_params(runtime_knobs)
    assert set(runtime_knobs) == {*(f"profile@{m}" for m in METHODS), f"scale@{SCALE_ARCH}"}, runtime_knobs
    for stage, keys in changed.items():
        assert keys == PROFILED, (stage, keys)  # the other two keys reach no stage at all


# ---- quant.expand_absmax: only the NF4 side, through the method pointers ------------------------------------

def test_expand_absmax_changes_only_quantize_nf4(expand_absmax):
    # and the scale study, which measures the NF4 methods with the quant settings
    assert changed_params(expand_absmax["status"]) == {"quantize@nf4": {"quant"}, f"scale@{SCALE_ARCH}": {"quant"}}, \
        expand_absmax["status"]


def test_expand_absmax_reruns_only_the_qlora_side(expand_absmax, good):
    assert stages_run(expand_absmax["output"]) == {"quantize@nf4"}, expand_absmax["output"][-4000:]
    before, after = good["methods_before"], expand_absmax["methods_after"]
    for m in LORA_SIDE:
        assert after[m] == before[m]
    for m in QLORA_SIDE:
        # the stored tensors are the same; the pointer changes through the base's settings
        assert after[m]["sha256"] == before[m]["sha256"]
        assert after[m]["settings"]["expand_absmax"] is False and before[m]["settings"]["expand_absmax"] is True
    # scale_report turns stale only once scale@ has rerun (its deps are that stage's outputs)
    assert set(expand_absmax["status_after"]) == BLOCKSIZE_RERUN - {"quantize@nf4", "scale_report"}, \
        expand_absmax["status_after"]
    assert "Data and pipelines are up to date" in expand_absmax["status_restored"], expand_absmax["status_restored"]


# ---- lora.r 2 -> 4: train, evaluate, profile, aggregate; never prepare or quantize -----------------------

def test_lora_r_reruns_train_evaluate_profile_aggregate(lora_r):
    direct = {*(f"train@{m}-{d}" for m in METHODS for d in DATASETS), *(f"profile@{m}" for m in METHODS),
              f"scale@{SCALE_ARCH}"}
    assert set(lora_r["status"]) == direct, lora_r["status"]
    assert lora_r["dry"] == LORA_RERUN, lora_r["dry_text"]


# ---- PIPELINE_TEST_FULL=1: the same, through real reruns --------------------------------------------------

def test_full_blocksize_rerun(full):
    ran = stages_run(full["rest"])
    assert ran == BLOCKSIZE_RERUN - {"quantize@nf4"}, (sorted(ran), full["rest"][-4000:])


def test_full_lora_r_experiment(full):
    ran = stages_run(full["exp"])
    assert ran == LORA_RERUN, (sorted(ran), full["exp"][-4000:])
    s = full["diff"]["metrics/summary.json"]
    for m in METHODS:
        assert s[f"{m}.trainable_params"]["new"] > s[f"{m}.trainable_params"]["old"]
        assert f"{m}.accuracy_mean" in s
    assert "qlora_vs_lora.static_ratio" in s


# ---- the stage CLI ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", sorted(STAGE_OPTIONS))
def test_stage_help(pipeline, stage):
    r = pipeline["repo"].run(sys.executable, "-m", "stages", stage, "--help")
    for opt in ["--params", "--debug", *STAGE_OPTIONS[stage]]:
        assert opt in r.stdout, (stage, opt, r.stdout)


def test_stage_by_hand_matches_dvc(good, blocksize):
    """`python -m stages evaluate` in the repo writes what DVC's run of the same stage wrote."""
    repo = good["repo"]
    rel = f"metrics/eval/lora/{DATASET}.json"
    by_dvc = read(repo.root, rel)
    repo.run(sys.executable, "-m", "stages", "evaluate", "--method", "lora", "--dataset", DATASET)
    by_hand = read(repo.root, rel)
    assert without_timing(by_hand) == without_timing(by_dvc)
    status = json.loads(repo.dvc("status", "--json").stdout or "{}")
    assert f"evaluate@lora-{DATASET}" not in status, status  # DVC sees the same outputs it recorded


def test_training_by_hand_cold_matches_dvc_warm(good, blocksize):
    """The same training run cold (by hand) writes the adapters and metrics DVC's warm run wrote."""
    repo = good["repo"]
    adapters = repo.root / "adapters" / "lora" / DATASET / f"seed{SEED}" / "adapter_model.safetensors"
    rel = f"metrics/train/lora/{DATASET}.json"
    by_dvc, weights = read(repo.root, rel), adapters.read_bytes()
    repo.run(sys.executable, "-m", "stages", "train", "--method", "lora", "--dataset", DATASET)
    assert adapters.read_bytes() == weights
    assert without_timing(read(repo.root, rel)) == without_timing(by_dvc)
