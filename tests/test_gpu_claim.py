"""GPU claim (clip_qlora.runtime.gpu_claim): one GPU per process, waiting when all are held, released on death.

Simulated GPUs (CLIP_QLORA_FAKE_GPUS) and a lock folder per test; holders are real processes
(tests/claim_probe.py) so the locks are exactly those separate stage processes would take.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clip_qlora.core import base
from clip_qlora.runtime import gpu_claim
from clip_qlora.runtime.io import UserError

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "claim_probe.py"


@pytest.fixture
def gpus(tmp_path, monkeypatch):
    """Two simulated GPUs, a private lock folder; every claim of this (pytest) process is given back after."""
    monkeypatch.setenv(gpu_claim.ENV_FAKE, "2")
    monkeypatch.setenv(gpu_claim.ENV_LOCKS, str(tmp_path / "locks"))
    monkeypatch.delenv(gpu_claim.ENV_WAIT, raising=False)
    yield tmp_path
    for c in list(gpu_claim._held.values()):
        gpu_claim.release(c)


class Holders:
    """Probe processes holding simulated GPUs until their release file appears."""

    def __init__(self, folder: Path):
        self.folder, self.log, self.procs, self.files = folder, folder / "events.jsonl", {}, []

    def start(self, name: str, **env) -> subprocess.Popen:
        full = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "CLAIM_PROBE_LOG": str(self.log), "CLAIM_PROBE_HOLD": f"file:{self.folder / name}.release",
                **env}
        err = open(self.folder / f"{name}.err", "w")
        self.files.append(err)
        self.procs[name] = subprocess.Popen([sys.executable, str(PROBE)], env=full, stderr=err)
        return self.procs[name]

    def events(self, event: str | None = None) -> list[dict]:
        rows = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        return [r for r in rows if event is None or r["event"] == event]

    def of(self, name: str, event: str) -> dict | None:
        pid = self.procs[name].pid
        return next((r for r in self.events(event) if r["pid"] == pid), None)

    def wait_for(self, what, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = what()
            if got:
                return got
            for name, p in self.procs.items():
                if p.poll() not in (None, 0):
                    pytest.fail(f"probe {name} exited {p.returncode}: {(self.folder / f'{name}.err').read_text()}")
            time.sleep(0.05)
        pytest.fail(f"timed out; events so far: {self.events()}")

    def release(self, name: str) -> None:
        (self.folder / f"{name}.release").touch()
        assert self.procs[name].wait(30) == 0

    def stop(self) -> None:
        for name, p in self.procs.items():
            (self.folder / f"{name}.release").touch()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.files:
            f.close()


@pytest.fixture
def holders(gpus):
    h = Holders(gpus)
    yield h
    h.stop()


def test_processes_get_distinct_gpus_and_a_third_waits_for_a_release(holders):
    holders.start("a")
    holders.start("b")
    claimed = holders.wait_for(lambda: len(holders.events("claimed")) == 2 and holders.events("claimed"))
    assert sorted(e["gpu"] for e in claimed) == [0, 1]

    # a third process finds both held: it says it waits (the claim's own message), and does not take one
    holders.start("c")
    holders.wait_for(lambda: "waiting up to" in (holders.folder / "c.err").read_text())
    assert holders.of("c", "claimed") is None

    holders.release("a")
    got = holders.wait_for(lambda: holders.of("c", "claimed"))
    released = holders.of("a", "released")
    assert got["gpu"] == released["gpu"]
    assert got["t"] > released["t"]  # it got the GPU only once a had given it up
    assert holders.of("b", "released") is None  # b still holds the other one


def test_timeout_is_one_line_naming_the_holders(holders, monkeypatch):
    holders.start("a")
    holders.start("b")
    holders.wait_for(lambda: len(holders.events("claimed")) == 2)
    monkeypatch.setenv(gpu_claim.ENV_WAIT, "0.3")
    with pytest.raises(UserError) as e:
        gpu_claim.claim()
    msg = str(e.value)
    assert "\n" not in msg and gpu_claim.ENV_WAIT in msg and "--jobs" in msg
    for name in ("a", "b"):
        assert f"pid {holders.procs[name].pid}" in msg


def test_lock_is_released_when_its_holder_is_killed(holders, monkeypatch):
    monkeypatch.setenv(gpu_claim.ENV_FAKE, "1")
    holders.start("a")
    holders.wait_for(lambda: holders.of("a", "claimed"))
    monkeypatch.setenv(gpu_claim.ENV_WAIT, "0")
    with pytest.raises(UserError):
        gpu_claim.claim()
    holders.procs["a"].send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the lock
    holders.procs["a"].wait(10)
    monkeypatch.setenv(gpu_claim.ENV_WAIT, "10")
    assert gpu_claim.claim().index == 0


def test_explicit_index_is_claimed_too(holders, monkeypatch):
    holders.start("a")
    held = holders.wait_for(lambda: holders.of("a", "claimed"))["gpu"]
    monkeypatch.setenv(gpu_claim.ENV_WAIT, "0")
    with pytest.raises(UserError, match=f"GPU {held} is still claimed"):
        gpu_claim.claim(held)
    assert gpu_claim.claim(1 - held).index == 1 - held


@pytest.fixture
def fake_cuda(gpus, monkeypatch):
    """torch believes CUDA is there; set_device calls are recorded instead of made."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def test_resolve_device_auto_claims_once_per_process(fake_cuda, holders):
    holders.start("a", **{gpu_claim.ENV_FAKE: "2"})
    other = holders.wait_for(lambda: holders.of("a", "claimed"))["gpu"]
    assert base.resolve_device("auto") == f"cuda:{1 - other}"
    assert base.resolve_device("cuda") == f"cuda:{1 - other}"  # the same GPU again, not a second one
    assert fake_cuda == [1 - other, 1 - other]


def test_resolve_device_explicit_and_out_of_range(fake_cuda):
    assert base.resolve_device("cuda:1") == "cuda:1" and fake_cuda == [1]
    for c in list(gpu_claim._held.values()):
        gpu_claim.release(c)
    with pytest.raises(UserError, match=r"'cuda:5'.*2 GPU\(s\)"):
        base.resolve_device("cuda:5")


def test_cpu_takes_no_lock(gpus, monkeypatch):
    assert base.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert base.resolve_device("auto") == "cpu"  # simulated GPUs simulate the claim, not CUDA
    assert not (gpus / "locks").exists() or not any((gpus / "locks").iterdir())
    assert not gpu_claim._held


@pytest.mark.parametrize("var,value", [(gpu_claim.ENV_FAKE, "two"), (gpu_claim.ENV_WAIT, "-1"),
                                       (gpu_claim.ENV_WAIT, "nan"), (gpu_claim.ENV_WAIT, "soon")])
def test_bad_environment_is_one_line_naming_the_variable(gpus, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(UserError, match=f"^{var}: '{value}'"):
        gpu_claim.claim()
