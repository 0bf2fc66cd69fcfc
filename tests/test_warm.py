"""The warm stage server (clip_qlora.warm): a stage forked from it behaves as the same stage run cold.

The end-to-end check is tests/test_pipeline.py: its first `dvc repro` runs under the server, as `make run`
does, and stages run by hand there (cold) write what DVC's warm runs wrote. Here: the protocol itself, with a
stand-in stage (tests/warm_sleeper.py) and one real stage command.
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

from clip_qlora import warm

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def test_env_difference_ignores_only_dvc_and_shell_variables():
    base = {"PATH": "/bin", "HF_HUB_OFFLINE": "1"}
    assert warm.env_difference(base, {**base, "DVC_STAGE": "x", "PWD": "/tmp", warm.ENV: "/s"}) is None
    assert warm.env_difference(base, {**base, "HF_HUB_OFFLINE": "0"}) == "HF_HUB_OFFLINE"
    assert warm.env_difference(base, {"PATH": "/bin"}) == "HF_HUB_OFFLINE"
    assert warm.env_difference(base, {**base, "CUDA_VISIBLE_DEVICES": "1"}) == "CUDA_VISIBLE_DEVICES"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("warm")
    path = str(folder / "s")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), str(TESTS)]),
           "PYTORCH_NVML_BASED_CUDA_CHECK": "1", warm.ENV: path}
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "clip_qlora.warm", "--serve", path], env=env, cwd=ROOT,
                            stderr=log)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
        time.sleep(0.05)
    state = {"proc": proc, "env": env, "folder": folder, "path": path}
    yield state
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def client(server, record: Path, seconds: float = 0, env_extra: dict | None = None, **kw) -> subprocess.Popen:
    """`python -m warm_sleeper <record> <seconds>` as `python -m stages` forwards itself."""
    code = ("import sys; from clip_qlora import warm; rc = warm.forward(module='warm_sleeper'); "
            "sys.exit(99) if rc is None else warm.exit_with(rc)")
    return subprocess.Popen([sys.executable, "-c", code, str(record), str(seconds)],
                            env={**server["env"], **(env_extra or {})}, cwd=server["folder"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(path: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return json.loads(path.read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by the server) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_served_stage_is_a_fork_of_the_server_with_the_callers_world(server, tmp_path):
    record = tmp_path / "rec.json"
    p = client(server, record, env_extra={"DVC_STAGE": "whatever"})  # DVC's own variables may differ
    out, err = p.communicate(timeout=60)
    rec = json.loads(record.read_text())
    assert rec["ppid"] == server["proc"].pid  # forked by the server, not started by the caller
    assert rec["cwd"] == str(server["folder"])  # the caller's working folder
    assert rec["argv"] == [str(record), "0"]
    assert out == "sleeper says hello\n" and err == "sleeper warns\n"  # the caller's own stdout and stderr
    assert p.returncode == 7  # the stage's exit code


def test_another_environment_runs_cold(server, tmp_path):
    p = client(server, tmp_path / "rec.json", env_extra={"WARM_TEST_MARKER": "other"})
    _, err = p.communicate(timeout=60)
    assert p.returncode == 99  # forward() declined: the caller runs the stage itself
    assert "environment variable WARM_TEST_MARKER differs from the server's" in err
    assert not (tmp_path / "rec.json").exists()


def test_no_server_runs_cold(server, tmp_path):
    p = client(server, tmp_path / "rec.json", env_extra={warm.ENV: str(tmp_path / "nothing-here")})
    _, err = p.communicate(timeout=60)
    assert p.returncode == 99 and "no stage server at" in err


def test_stopping_the_caller_stops_the_stage(server, tmp_path):
    record = tmp_path / "rec.json"
    p = client(server, record, seconds=120)
    pid = wait_for(record)["pid"]
    p.send_signal(signal.SIGTERM)  # as DVC stops a stage it runs
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGTERM  # the caller ends as the stage did: killed by SIGTERM
    deadline = time.monotonic() + 30
    while alive(pid):
        assert time.monotonic() < deadline, "the forked stage outlived its caller's SIGTERM"
        time.sleep(0.1)


def test_a_stage_killed_outright_ends_its_caller_the_same_way(server, tmp_path):
    record = tmp_path / "rec.json"
    p = client(server, record, seconds=120)
    os.kill(wait_for(record)["pid"], signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL


def test_a_killed_caller_takes_its_stage_with_it(server, tmp_path):
    record = tmp_path / "rec.json"
    p = client(server, record, seconds=120)
    pid = wait_for(record)["pid"]
    p.kill()  # SIGKILL: nothing can be relayed; the server sees the connection drop
    p.wait(timeout=30)
    deadline = time.monotonic() + 30
    while alive(pid):
        assert time.monotonic() < deadline, "the forked stage outlived its killed caller"
        time.sleep(0.1)


def test_a_real_stage_fails_the_same_warm_and_cold(server, tmp_path):
    cmd = [sys.executable, "-m", "stages", "train", "--method", "nosuch", "--dataset", "x"]
    served = subprocess.run(cmd, cwd=ROOT, env=server["env"], capture_output=True, text=True, timeout=120)
    cold_env = {k: v for k, v in server["env"].items() if k != warm.ENV}
    cold = subprocess.run(cmd, cwd=ROOT, env=cold_env, capture_output=True, text=True, timeout=120)
    assert served.returncode == cold.returncode == 2
    assert served.stderr == cold.stderr and "--method 'nosuch'" in cold.stderr
    assert "warm:" not in served.stderr  # served, nothing to say


def test_the_server_preloads_every_library(server):
    log, deadline = "", time.monotonic() + 120  # preloading goes on between requests: it may not be done yet
    while "libraries loaded in" not in log:
        assert time.monotonic() < deadline, log
        time.sleep(0.2)
        log = (server["folder"] / "server.log").read_text()
    assert "could not preload" not in log and "cold" not in log, log
