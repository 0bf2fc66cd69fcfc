"""Interruption: a training stage killed mid-run leaves nothing half-written and, rerun, resumes from its last
checkpoint to exactly the adapters an uninterrupted run makes (each step's randomness derives from (seed, step)).
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clip_qlora.jobs.train as train_mod
from clip_qlora import config
from cli_helpers import train_stage
from clip_qlora.runtime.io import UserError

from cli_helpers import (demo_params, invoke, project, run_stage, set_key, single_thread, start_stage,
                         all_files, write_params)

TRAIN = ("train", "--method", "lora", "--dataset", "shapes")
CKPT = Path(".ckpt/train/lora/shapes/seed1.pt")


def prepared(folder: Path, params: dict, bases=("bf16",)) -> None:
    """prepare + quantize through the stage commands (in-process), as DVC would run them before train."""
    with project(folder, params), single_thread():
        for args in [("prepare", "--dataset", "shapes")] + [("quantize", "--base", b) for b in bases]:
            r = invoke(*args)
            assert r.exit_code == 0, (args, r.output, r.exception)


def adapter_tensors(folder: Path, method: str = "lora", seed: int = 1) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapters" / method / "shapes" / f"seed{seed}" / "adapter_model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)), k


def train_metrics(folder: Path, method: str = "lora") -> dict:
    return json.loads((folder / "metrics" / "train" / method / "shapes.json").read_text())


# what a resumed run may report differently from an uninterrupted one: times, and where it resumed from
TIMES = {"train_seconds", "train_seconds_mean", "step_ms_median", "resumed_from", "timestamp"}


def without_times(x):
    if isinstance(x, dict):
        return {k: without_times(v) for k, v in x.items() if k not in TIMES}
    if isinstance(x, list):
        return [without_times(v) for v in x]
    return x


def reported(folder: Path, method: str = "lora") -> dict:
    """Everything the train stage reports (its metrics file and its DVCLive folder), times left out."""
    out = {"metrics": without_times(train_metrics(folder, method))}
    live = folder / "dvclive" / "train" / method / "shapes"
    for f in all_files(live):
        text = (live / f).read_text()
        if f.endswith(".tsv"):  # DVCLive's history: drop the wall-clock column
            rows = [line.split("\t") for line in text.splitlines()]
            keep = [i for i, name in enumerate(rows[0]) if name != "timestamp"]
            out[f] = [[r[i] for i in keep] for r in rows]
        else:
            out[f] = without_times(json.loads(text)) if f.endswith(".json") else text
    return out


def assert_reports_equal(a: Path, b: Path, method: str = "lora") -> None:
    """A resumed run (a) reports what the uninterrupted one (b) does: the same loss history from step 1."""
    ra, rb = reported(a, method), reported(b, method)
    assert ra == rb
    loss = ra["seed1/plots/metrics/train/loss.tsv"]
    assert loss[0] == ["step", "loss"] and len(loss) > 2


def test_killed_training_resumes_bit_identical(tmp_path):
    # 50 x 4 shots = 200 steps, a checkpoint every 20: the kill lands well before the end
    params = demo_params({"data.seeds": [1], "train.iterations_per_shot": 50, "train.batch_size": 4,
                          "runtime.checkpoint_every": 20})
    a, b = tmp_path / "a", tmp_path / "b"
    prepared(a, params)
    shutil.copytree(a, b)  # same split and base: b is the uninterrupted reference
    ckpt = a / CKPT

    reference = start_stage(b, *TRAIN, log=tmp_path / "b.err")
    try:
        victim = start_stage(a, *TRAIN, log=tmp_path / "a.err")
        try:
            deadline = time.monotonic() + 300
            while not ckpt.exists():
                assert victim.poll() is None, f"train ended ({victim.returncode}) before its first checkpoint:\n" \
                    + (tmp_path / "a.err").read_text()
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.01)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=60)
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()
        assert victim.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
        check_killed_and_resume(a, b, tmp_path, ckpt, reference)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()


def check_killed_and_resume(a: Path, b: Path, tmp_path: Path, ckpt: Path, reference) -> None:
    """After the kill: nothing half-written; then the rerun resumes and matches the reference bit for bit."""
    # nothing half-written: no adapters, no train metrics; only the (complete, renamed) checkpoint
    assert all_files(a / "adapters") == []
    assert not (a / "metrics" / "train").exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    killed_at = state["step"]
    assert killed_at % 20 == 0 and 20 <= killed_at < 200
    assert all(torch.isfinite(v).all() for v in state["adapters"].values())

    resumed = run_stage(a, *TRAIN, timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=400) == 0, (tmp_path / "b.err").read_text()

    ma, mb = train_metrics(a), train_metrics(b)
    assert ma["per_seed"]["1"]["resumed_from"] == killed_at > 0
    assert mb["per_seed"]["1"]["resumed_from"] == 0
    assert ma["steps"] == mb["steps"] == 200
    assert ma["per_seed"]["1"]["final_loss"] == mb["per_seed"]["1"]["final_loss"]
    assert_reports_equal(a, b)
    # training time is the sum of both parts: at least what the killed part had run when it checkpointed
    assert ma["per_seed"]["1"]["train_seconds"] > state["record"]["seconds"] > 0
    # the plain progress lines count from the checkpoint (every 20th of 200 steps), not from 0
    counts = [line.split(": ")[1].split(" ")[0] for line in resumed.stderr.splitlines()
              if line.startswith("train lora shapes seed 1: ")]
    assert counts == [f"{n}/200" for n in range(killed_at + 20, 201, 20)]
    assert_bitwise_equal(adapter_tensors(a), adapter_tensors(b))
    cfg = "adapters/lora/shapes/seed1/adapter_config.json"
    assert json.loads((a / cfg).read_text()) == json.loads((b / cfg).read_text())
    # the checkpoint is gone once the adapters are written
    assert not ckpt.exists() and not (b / CKPT).exists()


class Interrupted(BaseException):
    """Stands for SIGINT/SIGTERM in-process: not an Exception, so no handler turns it into an exit code."""


def interrupt_at(monkeypatch, at_step: int) -> None:
    """Make training stop when it reaches `at_step` (0-based), as an interruption between steps would."""
    real = train_mod.make_micro_batches

    def batches(run, images, seed, step, *rest):
        if step == at_step:
            raise Interrupted(step)
        return real(run, images, seed, step, *rest)

    monkeypatch.setattr(train_mod, "make_micro_batches", batches)


SHORT = {"data.seeds": [1], "train.iterations_per_shot": 5, "train.batch_size": 4, "runtime.checkpoint_every": 5}


@pytest.mark.parametrize("method,base", [("qlora", "nf4"), ("lora_gc", "bf16")])
def test_interrupted_training_resumes_bit_identical_in_process(tmp_path, monkeypatch, method, base):
    """The same on the NF4 base (and with gradient checkpointing), interrupted in-process at step 63 of 80:
    past the first loss row (every 50 steps), so the resumed run must carry that row over."""
    params = demo_params({**SHORT, "train.iterations_per_shot": 20, "runtime.checkpoint_every": 20,
                          "methods": [method]})
    a, b = tmp_path / "a", tmp_path / "b"
    prepared(a, params, bases=(base,))
    shutil.copytree(a, b)
    ckpt = Path(f".ckpt/train/{method}/shapes/seed1.pt")

    with project(b), single_thread():
        reference = train_stage(config.load(), method, "shapes")
    with project(a), single_thread():
        p = config.load()
        interrupt_at(monkeypatch, 63)
        with pytest.raises(Interrupted):
            train_stage(p, method, "shapes")
        monkeypatch.undo()
        state = torch.load(ckpt, weights_only=True)
        assert state["step"] == 60 and [r["step"] for r in state["record"]["rows"]] == [50]
        assert all_files(Path("adapters")) == [] and not Path("metrics/train").exists()
        resumed = train_stage(p, method, "shapes")
        assert not ckpt.exists()
    assert resumed.per_seed["1"].resumed_from == 60
    assert resumed.per_seed["1"].train_seconds > state["record"]["seconds"] > 0  # the sum of both parts
    assert reference.per_seed["1"].resumed_from == 0
    assert_reports_equal(a, b, method)
    assert_bitwise_equal(adapter_tensors(a, method), adapter_tensors(b, method))


@pytest.mark.parametrize("key,value", [("train.lr", 5e-3), ("lora.r", 4), ("train.iterations_per_shot", 2),
                                       ("data.shots", 2)])
def test_checkpoint_from_other_params_is_not_resumed(tmp_path, monkeypatch, key, value):
    """After an interruption, a params change must not resume the stale checkpoint.

    DVC reruns train when lora.*/train.* change and .ckpt/ survives that on purpose, so the checkpoint of
    the interrupted run is still there. Without a record of the params, a changed lr would silently
    continues the old run (adapters that match neither params), a changed rank crashes with a raw
    RuntimeError (shape mismatch in load_checkpoint), and fewer total steps than the checkpoint's step
    "train" zero steps and save the checkpoint's adapters. Acceptable: start afresh, or refuse in one line.
    """
    params = demo_params(SHORT)
    prepared(tmp_path, params)
    with project(tmp_path), single_thread():
        interrupt_at(monkeypatch, 13)
        with pytest.raises(Interrupted):
            train_stage(config.load(), "lora", "shapes")
        monkeypatch.undo()
        assert CKPT.exists()
        if key == "data.shots":  # the split must follow, as `dvc repro` would rerun prepare first
            write_params(Path("."), set_key(params, key, value))
            assert invoke("prepare", "--dataset", "shapes").exit_code == 0
        write_params(Path("."), set_key(params, key, value))
        try:
            m = train_stage(config.load(), "lora", "shapes")
        except UserError as e:  # refusing with a line that says what to do is fine
            assert ".ckpt" in str(e) or "checkpoint" in str(e)
            return
    assert m.per_seed["1"].resumed_from == 0, "resumed a checkpoint made with other params"


def test_progress_lines_count_from_the_resumed_step_and_show_each_status_once(capsys):
    from clip_qlora.runtime.progress import Bar

    bar = Bar(300, "train", done=100)
    for step in bar(range(100, 300)):
        if step + 1 == 150:
            bar.note("loss 1.000")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ")[1] for line in lines] == [f"{n}/300" for n in range(120, 301, 30)]
    # the status noted at step 150 shows on the line for 150, not again on the later ones
    assert [line.endswith("loss 1.000") for line in lines] == [n == 150 for n in range(120, 301, 30)]
