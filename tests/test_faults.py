"""Faults: reproducibility, provenance in every metrics file, non-finite loss, atomic writes, unreadable
images, untrusted checkpoints and CUDA out-of-memory, each through the code path a stage really takes.
"""
from __future__ import annotations

import errno
import importlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clip_qlora.core.adapters as adapters_mod
import clip_qlora.core.step as step_mod
from clip_qlora import config
from cli_helpers import train_stage
from clip_qlora.runtime.io import UserError, atomic_dir, atomic_path, write_json
from clip_qlora.core.step import build_run, groups_of
from clip_qlora.jobs.checkpoint import load_checkpoint, save_checkpoint

from cli_helpers import demo_params, invoke, project, single_thread, stderr_lines, all_files, write_params
from data_fixtures import truncate

SEEDS = [1, 2]
METHODS = ["lora", "qlora"]
PARAMS = demo_params({"data.seeds": SEEDS, "methods": METHODS, "train.iterations_per_shot": 3,
                      "runtime.checkpoint_every": 5})  # 12 steps per seed, checkpoints at 5 and 10


def full_run(folder: Path) -> Path:
    """prepare, both bases, train and evaluate both methods, both bases' zero-shot, profile lora: every stage but
    aggregate."""
    with project(folder, PARAMS), single_thread():
        steps = [("prepare", "--dataset", "shapes"), ("quantize", "--base", "bf16"), ("quantize", "--base", "nf4")]
        for m in METHODS:
            steps += [("train", "--method", m, "--dataset", "shapes"), ("evaluate", "--method", m, "--dataset", "shapes")]
        steps += [("zeroshot", "--base", b) for b in ("bf16", "nf4")]
        steps += [("profile", "--method", "lora")]
        for args in steps:
            r = invoke(*args)
            assert r.exit_code == 0, (args, r.output, r.exception)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same params run twice, in two folders, from nothing (the shapes data is generated in each)."""
    root = tmp_path_factory.mktemp("repro")
    return full_run(root / "one"), full_run(root / "two")


@pytest.fixture
def trained_copy(runs, tmp_path):
    """A fresh project folder holding the first run's data and bases (no adapters, metrics or checkpoints)."""
    one, _ = runs
    write_params(tmp_path, PARAMS)
    for part in ("data", "models"):
        shutil.copytree(one / part, tmp_path / part)
    return tmp_path


# ---- reproducibility -------------------------------------------------------------------------------------------

def test_split_files_are_byte_identical(runs):
    one, two = runs
    a, b = (f / "data/splits/shapes.json" for f in runs)
    assert a.read_bytes() == b.read_bytes()
    split = json.loads(a.read_text())
    assert sorted(split["train"]) == ["1", "2"]
    assert split["train"]["1"] != split["train"]["2"]  # each seed draws its own shots
    # the generated images themselves are byte-identical too
    img = split["train"]["1"][0][0]
    assert (one / "data/raw" / img).read_bytes() == (two / "data/raw" / img).read_bytes()


@pytest.mark.parametrize("method", METHODS)
def test_adapters_are_bitwise_identical(runs, method):
    one, two = runs
    per_seed = {}
    for seed in SEEDS:
        rel = f"adapters/{method}/shapes/seed{seed}/adapter_model.safetensors"
        a, b = load_file(str(one / rel)), load_file(str(two / rel))
        assert a.keys() == b.keys() and a
        for k in a:
            assert a[k].dtype == b[k].dtype
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), (method, seed, k)
        per_seed[seed] = a
    # and the seeds really differ (identical adapters would make the check above trivially true)
    k = next(iter(per_seed[1]))
    assert not torch.equal(per_seed[1][k], per_seed[2][k])


@pytest.mark.parametrize("base", ["bf16", "nf4"])
def test_zero_shot_metrics_are_identical(runs, base):
    z = [json.loads((f / f"metrics/zeroshot/{base}.json").read_text()) for f in runs]
    assert z[0] == z[1] and z[0]["datasets"]["shapes"]["n_test"] == 240


@pytest.mark.parametrize("method", METHODS)
def test_metrics_are_identical(runs, method):
    one, two = runs
    ev = [json.loads((f / f"metrics/eval/{method}/shapes.json").read_text()) for f in runs]
    for key in ("accuracy", "accuracy_mean", "accuracy_std", "per_class", "n_test"):
        assert ev[0][key] == ev[1][key], key
    assert ev[0]["n_test"] == 240 and set(ev[0]["accuracy"]) == {"1", "2"}
    tr = [json.loads((f / f"metrics/train/{method}/shapes.json").read_text()) for f in runs]
    for seed in ("1", "2"):
        assert tr[0]["per_seed"][seed]["final_loss"] == tr[1]["per_seed"][seed]["final_loss"]
    confusion = [(f / f"plots/confusion/{method}/shapes.json").read_bytes() for f in runs]
    assert confusion[0] == confusion[1]


# ---- provenance --------------------------------------------------------------------------------------------

def test_every_metrics_file_records_versions_device_and_seeds(runs):
    import bitsandbytes
    import open_clip
    import peft

    one, _ = runs
    files = sorted((one / "metrics").rglob("*.json"))
    names = [str(f.relative_to(one / "metrics")) for f in files]
    assert names == ["eval/lora/shapes.json", "eval/qlora/shapes.json", "profile/lora.json", "static/bf16.json",
                     "static/nf4.json", "train/lora/shapes.json", "train/qlora/shapes.json",
                     "zeroshot/bf16.json", "zeroshot/nf4.json"]
    expected = {"torch": torch.__version__, "open_clip": open_clip.__version__, "peft": peft.__version__,
                "bitsandbytes": bitsandbytes.__version__}
    for f, name in zip(files, names):
        m = json.loads(f.read_text())
        assert {k: m["versions"].get(k) for k in expected} == expected, name
        assert isinstance(m["device"], str) and m["device"].startswith("cpu"), name
        assert m["pretrained"] is False, name
        if name.startswith("train/"):
            assert m["seeds"] == SEEDS, name
            assert sorted(m["per_seed"]) == ["1", "2"]
        if name.startswith("eval/"):  # one accuracy per seed, keyed by the seed
            assert sorted(m["accuracy"]) == ["1", "2"], name


# ---- non-finite loss ---------------------------------------------------------------------------------------

def nan_from(monkeypatch, call: int) -> None:
    """Training's loss becomes NaN from the `call`-th loss evaluation on (gradients NaN too)."""
    real, calls = step_mod.loss_on, {"n": 0}

    def loss_on(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= call else loss

    monkeypatch.setattr(step_mod, "loss_on", loss_on)


def test_non_finite_loss_stops_training_with_the_step(trained_copy, monkeypatch):
    with project(trained_copy), single_thread():
        nan_from(monkeypatch, 3)  # step 3 of 12
        with pytest.raises(UserError) as e:
            train_stage(config.load(), "lora", "shapes")
        m = re.fullmatch(r"train: loss became nan by step (\d+) \(lora, seed 1\); lower train\.lr .*", str(e.value))
        assert m, str(e.value)
        assert 3 <= int(m.group(1)) <= 12  # checked once per 50-step window and at the last step
        # nothing written for DVC to take as a result
        assert all_files(Path("adapters")) == []
        assert not Path("metrics/train").exists()

        # the stage reports it in one line (after the progress lines), exit 2
        shutil.rmtree(".ckpt", ignore_errors=True)
        r = invoke("train", "--method", "lora", "--dataset", "shapes")
    assert r.exit_code == 2, r.output
    lines = stderr_lines(r.stderr)
    assert [line for line in lines if not line.startswith("train lora shapes seed 1: ")] == [lines[-1]]
    assert lines[-1].startswith("error: train: loss became nan by step ") and "Traceback" not in r.stderr


def test_non_finite_loss_leaves_no_poisoned_checkpoint(trained_copy, monkeypatch):
    """A NaN step before a checkpoint is saved, then found at the window check, must not leave a
    checkpoint with NaN adapters; the rerun the message asks for ("lower train.lr") resumes from it and fails
    again however the params change. Checkpoints must hold only finite state (or be dropped on that error).
    """
    with project(trained_copy), single_thread():
        p = config.load()
        nan_from(monkeypatch, 3)
        with pytest.raises(UserError, match="loss became nan"):
            train_stage(p, "lora", "shapes")
        monkeypatch.undo()
        for ckpt in Path(".ckpt").rglob("*.pt"):
            state = torch.load(ckpt, weights_only=True)
            bad = [k for k, v in state["adapters"].items() if not torch.isfinite(v).all()]
            assert not bad, f"{ckpt} (step {state['step']}) holds non-finite adapters: {bad[:2]}"
        # the cause is gone: the rerun must train normally
        m = train_stage(p, "lora", "shapes")
    assert math.isfinite(m.per_seed["1"].final_loss)


# ---- atomic writes -----------------------------------------------------------------------------------------

def test_failed_write_json_keeps_the_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "metrics.json"
    write_json(out, {"accuracy": 1.0})
    before = out.read_bytes()
    real_write_text = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(UserError) as e:
        write_json(out, {"accuracy": 2.0, "per_class": list(range(1000))})
    monkeypatch.undo()
    assert str(e.value) == (f"{out}: could not write it: No space left on device; free space on {tmp_path} (df -h) "
                            f"and rerun (the previous version is kept)")
    assert out.read_bytes() == before
    assert all_files(tmp_path) == ["metrics.json"]  # no temporary file left behind


# how a full disk reaches the atomic writers: an OSError from Python's own writes, safetensors' error type (Rust
# io::Error text), torch.save's RuntimeError with the OSError chained or only "file write failed"
def _enospc():
    raise OSError(errno.ENOSPC, "No space left on device")


class SafetensorError(Exception):
    pass


def _safetensors_full():
    raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                          "message: \"No space left on device\" })")


def _torch_save_full():
    try:
        _enospc()
    except OSError as e:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 2240 vs 2125") from e


def _torch_save_native():
    raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                       "data/3: file write failed")


@pytest.mark.parametrize("fail", [_enospc, _safetensors_full, _torch_save_full, _torch_save_native],
                         ids=["oserror", "safetensors", "torch-chained", "torch-native"])
def test_full_disk_while_saving_a_base_is_one_line_and_keeps_the_previous(saved_bases, tmp_path, monkeypatch, fail):
    """save_base (quantize) and the checkpoint's atomic_path: one line naming the output, nothing half-written."""
    import clip_qlora.core.base as base_mod
    from clip_qlora.core.base import read_base, save_base

    out = tmp_path / "models" / "bf16"
    shutil.copytree(saved_bases["bf16"], out)
    before = {f: (out / f).read_bytes() for f in ("base.json", "model.safetensors")}
    model, meta = base_mod.load_base(out, "cpu")

    def full_save(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a tensor")
        fail()

    monkeypatch.setattr(base_mod, "save_file", full_save)
    with pytest.raises(UserError) as e:
        save_base(model, meta, out)
    assert str(e.value).startswith(f"{out}: could not write it: ") and "(the previous version is kept)" in str(e.value)
    assert "\n" not in str(e.value)
    assert {f: (out / f).read_bytes() for f in before} == before
    assert all_files(tmp_path) == ["models/bf16/base.json", "models/bf16/model.safetensors"]
    read_base(out)  # still loads

    ckpt = tmp_path / ".ckpt" / "seed1.pt"
    with pytest.raises(UserError, match=rf"^{re.escape(str(ckpt))}: could not write it: .*\(nothing was written\)$"):
        with atomic_path(ckpt) as tmp:
            tmp.write_bytes(b"half")
            fail()
    assert all_files(tmp_path / ".ckpt") == []


def test_other_errors_inside_the_writers_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "x.json"):
            raise FileNotFoundError(errno.ENOENT, "an input is missing")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with atomic_dir(tmp_path / "d"):
            raise RuntimeError("shape mismatch")
    assert all_files(tmp_path) == []


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """A writer killed outright (SIGKILL while quantize saves models/nf4) leaves its temporary; the next write of the
    same target removes it. A live writer's temporary and other targets' are left alone."""
    dead = _dead_pid()
    models = tmp_path / "models"
    stale_dir = models / f".nf4.{dead}.k2j4h1x0.tmp"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "model.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".summary.json.{dead}.abcd_123.tmp"
    stale_file.write_text("{")
    live = models / f".nf4.{os.getpid()}.zzzzzzzz.tmp"  # this process: alive
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"being written")
    other = models / f".nf4.12.{dead}.abcdefgh.tmp"  # the temporary of a target named "nf4.12", not "nf4"
    other.write_text("x")
    old_style = models / ".nf4.q8w7e6r5.tmp"  # no PID (written before PIDs were in the name): writer unknown
    old_style.write_text("x")

    with atomic_dir(models / "nf4") as tmp:
        (tmp / "base.json").write_text("{}")
    write_json(tmp_path / "summary.json", {})
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and other.exists() and old_style.exists()
    assert all_files(models) == sorted(["nf4/base.json", f"{live.name}/model.safetensors", other.name,
                                        old_style.name])


def test_outputs_get_the_umask_modes(tmp_path, saved_bases):
    """safetensors writes 0600 files and mkstemp/mkdtemp make 0600/0700: outputs are ordinary files, as the umask
    says (0644 and 0755 under the usual 022)."""
    from clip_qlora.core.base import load_base, save_base

    model, meta = load_base(saved_bases["bf16"], "cpu")
    for umask, file_mode, dir_mode in [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]:
        old = os.umask(umask)
        try:
            out = tmp_path / f"u{umask:o}"
            save_base(model, meta, out / "models" / "bf16")
            write_json(out / "metrics.json", {})
            with atomic_path(out / "ckpt.pt") as tmp:
                torch.save({"step": 1}, tmp)
        finally:
            os.umask(old)
        modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*")}
        assert modes == {"models": dir_mode, "models/bf16": dir_mode, "models/bf16/base.json": file_mode,
                         "models/bf16/model.safetensors": file_mode, "metrics.json": file_mode,
                         "ckpt.pt": file_mode}, (oct(umask), modes)


# ---- damaged or missing inputs: one line naming the file and the stage that makes it ------------------------------

@pytest.mark.parametrize("damaged", ["model.safetensors", "base.json"])
def test_truncated_base_names_the_file_and_the_stage(saved_bases, tmp_path, damaged):
    from clip_qlora.core.base import read_base

    out = tmp_path / "models" / "nf4"
    shutil.copytree(saved_bases["nf4"], out)
    truncate(out / damaged)
    with pytest.raises(UserError) as e:
        read_base(out)
    message = str(e.value)
    assert message.startswith(f"{out / damaged}: ") and "\n" not in message
    assert message.endswith("`dvc repro -f quantize@nf4`"), message


def test_failure_inside_atomic_path_keeps_previous_or_nothing(tmp_path):
    out = tmp_path / "sub" / "model.pt"
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert not out.exists() and all_files(tmp_path) == []  # a new file: nothing at all
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"complete")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"par")
            raise KeyboardInterrupt
    assert out.read_bytes() == b"complete" and all_files(tmp_path) == ["sub/model.pt"]


def test_failure_inside_atomic_dir_keeps_the_previous_folder(tmp_path):
    out = tmp_path / "adapters" / "seed1"
    with atomic_dir(out) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"old weights")
        (tmp / "adapter_config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"new wei")
            raise RuntimeError("killed mid-save")
    assert (out / "adapter_model.safetensors").read_bytes() == b"old weights"
    assert all_files(tmp_path) == ["adapters/seed1/adapter_config.json", "adapters/seed1/adapter_model.safetensors"]
    # success replaces the folder as a whole: files of the old version do not linger
    with atomic_dir(out) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"new weights")
    assert all_files(tmp_path) == ["adapters/seed1/adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"new weights"


def test_failed_adapter_save_keeps_previous_adapters_and_metrics(runs, trained_copy, monkeypatch):
    """Through train: a save that dies half-way leaves the previous adapters and metrics exactly as they were."""
    one, _ = runs
    for part in ("adapters/lora", "metrics/train/lora"):
        shutil.copytree(one / part, trained_copy / part)
    def adapter_bytes():
        folder = trained_copy / "adapters"
        return {f: (folder / f).read_bytes() for f in all_files(folder)}

    before = adapter_bytes()
    assert "lora/shapes/seed1/adapter_model.safetensors" in before
    metrics_before = (trained_copy / "metrics/train/lora/shapes.json").read_bytes()
    real_save = adapters_mod.save_adapters

    def dies(model, out_dir):
        real_save(model, out_dir)
        (Path(out_dir) / "adapter_model.safetensors").write_bytes(b"trunc")
        raise OSError(errno.EIO, "I/O error")

    with project(trained_copy), single_thread():
        monkeypatch.setattr(adapters_mod, "save_adapters", dies)
        r = invoke("train", "--method", "lora", "--dataset", "shapes")
    assert r.exit_code != 0 and isinstance(r.exception, OSError)
    assert adapter_bytes() == before  # every file, hidden ones included: no temporary folder left either
    assert (trained_copy / "metrics/train/lora/shapes.json").read_bytes() == metrics_before


# ---- unreadable training images ----------------------------------------------------------------------------

def test_unreadable_training_image_is_reported_and_skipped(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    # the keyed draw steps over unreadable files (the exact clip_lora draw cannot: test_data.py)
    with project(tmp_path, demo_params({"data.seeds": [1], "data.split_draw": "keyed"})), single_thread():
        assert invoke("prepare", "--dataset", "shapes").exit_code == 0
        split_file = Path("data/splits/shapes.json")
        first = json.loads(split_file.read_text())
        drawn = [path for path, label in first["train"]["1"] if label == 0]
        assert len(drawn) == 4
        bad = Path("data/raw") / drawn[1]
        truncate(bad)
        caplog.clear()
        r = invoke("prepare", "--dataset", "shapes")
        assert r.exit_code == 0, r.output
        assert str(bad) in caplog.text and "cannot decode image" in caplog.text
        again = [path for path, label in json.loads(split_file.read_text())["train"]["1"] if label == 0]
        assert drawn[1] not in again and len(set(again)) == 4  # replaced by the next image of the class
        assert set(drawn) - {drawn[1]} <= set(again)
        assert json.loads(split_file.read_text())["replacement"] == {"1": []}  # no silent duplicates

        # below k readable images the class is an error naming it; the previous split stays
        previous = split_file.read_bytes()
        images = sorted(Path("data/raw/shapes/images/red_circle").glob("train_*.png"))
        assert len(images) == 16 and bad in images
        keep = [img for img in images if img != bad][:2]
        for img in images:
            if img not in keep:
                img.write_bytes(b"not a png")
        r = invoke("prepare", "--dataset", "shapes")
        assert r.exit_code == 2
        assert len(stderr_lines(r.stderr)) == 1
        assert re.fullmatch(r"error: shapes: class 'red circle' has 2 readable training images, fewer than 4 shots, "
                            r"after skipping 14 unreadable \(e\.g\. shapes/images/red_circle/train_\d+\.png\)\n",
                            r.stderr), r.stderr
        assert split_file.read_bytes() == previous


# ---- checkpoints hold tensors only --------------------------------------------------------------------------

def _payload(path: str) -> str:
    """What a malicious pickle would run on load; here it only leaves a file behind."""
    Path(path).write_text("code ran")
    return "pwned"


class Payload:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return _payload, (self.path,)


def test_checkpoint_with_pickled_object_is_refused(saved_bases, tiny_params, tmp_path):
    run = build_run(saved_bases["bf16"], "lora", ["a photo of a x.", "a photo of a y."], "cpu", 10, **groups_of(tiny_params))
    good = tmp_path / "good.pt"
    save_checkpoint(run, good, 7)
    assert load_checkpoint(run, good) == 7  # a real checkpoint loads (tensors, numbers, strings only)

    marker = tmp_path / "ran"
    state = torch.load(good, weights_only=True)
    state["extra"] = Payload(marker)
    evil = tmp_path / "evil.pt"
    torch.save(state, evil)
    # the payload is live: an unrestricted load runs it
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()

    with pytest.raises(UserError, match="unreadable checkpoint \\(UnpicklingError\\); delete it"):
        load_checkpoint(run, evil)
    assert not marker.exists()


def test_training_never_runs_a_pickled_checkpoint(trained_copy):
    marker = trained_copy.parent / "ran"
    ckpt = trained_copy / ".ckpt/train/lora/shapes/seed1.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"step": 5, "adapters": {}, "optimizer": Payload(marker)}, ckpt)
    with project(trained_copy), single_thread():
        r = invoke("train", "--method", "lora", "--dataset", "shapes")
    assert r.exit_code != 0
    assert not marker.exists()
    assert all_files(trained_copy / "adapters") == []


# ---- CUDA out of memory ----------------------------------------------------------------------------------------

def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")


@pytest.mark.parametrize("job,target,args", [
    ("train", "train_dataset", ("train", "--method", "lora", "--dataset", "shapes")),
    ("evaluate", "evaluate_dataset", ("evaluate", "--method", "qlora", "--dataset", "shapes")),
    ("zeroshot", "zeroshot_base", ("zeroshot", "--base", "nf4")),
    ("profile", "profile_method", ("profile", "--method", "lora")),
    ("quantize", "quantize_base", ("quantize", "--base", "nf4")),
])
def test_cuda_oom_exits_3_with_advice(runs, tmp_path, monkeypatch, job, target, args):
    stage_module = importlib.import_module(f"clip_qlora.jobs.{job}")
    monkeypatch.setattr(stage_module, target, _oom)
    for part in ("data", "models", "adapters"):  # the inputs each stage checks before it runs
        shutil.copytree(runs[0] / part, tmp_path / part)
    with project(tmp_path, PARAMS):
        r = invoke(*args)
        assert r.exit_code == 3, (r.output, r.exception)
        lines = stderr_lines(r.stderr)
        assert len(lines) == 1 and "Traceback" not in r.output
        advice = (r"lower eval\.batch_size \(test images per forward\)" if job in ("evaluate", "zeroshot") else
                  r"use a method with gradient checkpointing \(lora_gc/qlora_gc\) or a smaller micro-batch with "
                  r"more accumulation \(train\.grad_accum\)")
        assert re.fullmatch(r"error: CUDA out of memory after a peak of (nan|\d+\.\d\d) GiB allocated; " + advice,
                            lines[0]), lines[0]
        # --debug: the original error, not the advice
        r = invoke(*args, "--debug")
        assert r.exit_code not in (0, 2, 3) and isinstance(r.exception, torch.OutOfMemoryError)
        # any other crash is not dressed up as OOM or as a user error
        monkeypatch.setattr(stage_module, target, lambda *a, **k: 1 / 0)
        r = invoke(*args)
        assert r.exit_code not in (0, 2, 3) and isinstance(r.exception, ZeroDivisionError)


def _probe(folder: Path, *args: str) -> tuple[dict, list[str]]:
    """A stage in a fresh interpreter: (exit code and the heavy modules it imported, its stderr lines)."""
    import subprocess
    import sys

    from cli_helpers import ENV
    from test_imports import HEAVY, PROBE

    r = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args), heavy=HEAVY)], cwd=folder, env=ENV,
                       capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1]), stderr_lines(r.stderr)


def test_a_stage_run_by_hand_without_its_inputs_names_the_stage_that_makes_them(runs, tmp_path):
    """Before torch is imported: one line naming the missing file and the `dvc repro` that makes it."""
    one, _ = runs
    write_params(tmp_path, PARAMS)
    train = ("train", "--method", "qlora", "--dataset", "shapes")
    made_by = "missing; the {} stage makes it: run `dvc repro {}` first"
    steps = [  # (copied from the full run first, then each stage and what it must say is missing)
        (None, [(train, "data/splits/shapes.json: " + made_by.format("prepare", "prepare@shapes")),
                (("zeroshot", "--base", "bf16"),
                 "data/splits/shapes.json: " + made_by.format("prepare", "prepare@shapes"))]),
        ("data", [(train, "models/methods/qlora.json: " + made_by.format("quantize", "quantize@nf4")),
                  (("profile", "--method", "lora"),
                   "models/methods/lora.json: " + made_by.format("quantize", "quantize@bf16")),
                  (("zeroshot", "--base", "nf4"),
                   "models/nf4/base.json: " + made_by.format("quantize", "quantize@nf4"))]),
    ]
    for copied, cases in steps:
        if copied:
            shutil.copytree(one / copied, tmp_path / copied)
        for args, line in cases:
            out, lines = _probe(tmp_path, *args)
            assert (out["exit"], out["heavy"], lines) == (2, [], [f"error: {line}"]), args
    shutil.copytree(one / "models", tmp_path / "models")
    out, lines = _probe(tmp_path, "evaluate", "--method", "lora", "--dataset", "shapes")
    assert (out["exit"], out["heavy"]) == (2, [])
    assert lines == ["error: adapters/lora/shapes/seed1/adapter_config.json: missing; the train stage makes it: "
                     "run `dvc repro train@lora-shapes` first"]
    truncate(tmp_path / "models" / "nf4" / "base.json")
    out, lines = _probe(tmp_path, "profile", "--method", "qlora")
    assert (out["exit"], out["heavy"]) == (2, [])
    assert re.fullmatch(r"error: models/nf4/base\.json: malformed JSON at line \d+, column \d+: .* \(truncated or "
                        r"damaged\?\); make it again with `dvc repro -f quantize@nf4`", lines[0]) and len(lines) == 1
