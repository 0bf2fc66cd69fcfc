"""The warm stage server (clip_qlora.runtime.warm): a stage forked from it behaves as the same stage run cold.

The end-to-end check is tests/test_pipeline.py: its first `dvc repro` runs under the server, as `make run`
does, and stages run by hand there (cold) write what DVC's warm runs wrote. Here: the protocol itself, with a
stand-in stage (tests/warm_sleeper.py) and one real stage command.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from tools.dvc_deps import closure
from proc_helpers import assert_all_gone
from warm_sleeper import CALLER

from clip_qlora.runtime import warm
from clip_qlora.core.backends import BACKENDS

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
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}  # what open_clip sets
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), str(TESTS)]),
           "PYTORCH_NVML_BASED_CUDA_CHECK": "1", warm.ENV: path}
    log = open(folder / "server.log", "w")
    # a process group of its own, as a terminal's foreground job (test_ctrl_c_reaches_a_served_stage_once)
    proc = subprocess.Popen([sys.executable, "-m", "clip_qlora.runtime.warm", "--serve", path], env=env, cwd=ROOT,
                            stderr=log, process_group=0)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
        time.sleep(0.05)
    state = {"proc": proc, "env": env, "folder": folder, "path": path}
    yield state
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def client(server, record: Path, seconds: float = 0, env_extra: dict | None = None, mode: str = "",
           **kw) -> subprocess.Popen:
    """`python -m warm_sleeper <record> <seconds> [mode]` as `python -m stages` forwards itself."""
    return subprocess.Popen([sys.executable, "-c", CALLER, str(record), str(seconds), *([mode] if mode else [])],
                            env={**server["env"], **(env_extra or {})}, cwd=server["folder"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def wait_for(path: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return json.loads(path.read_text())


def preloaded(server) -> str:
    """The server's log once preloading is done (it goes on between requests: it may not be yet)."""
    log, deadline = "", time.monotonic() + 120
    while "libraries loaded in" not in log:
        assert time.monotonic() < deadline, log
        time.sleep(0.2)
        log = (server["folder"] / "server.log").read_text()
    return log


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


def test_a_served_stage_ends_as_a_cold_one_running_its_atexit_handlers(server, tmp_path):
    """Logging's shutdown and multiprocessing's clean-up are atexit handlers: a served stage runs them too."""
    record = tmp_path / "rec.json"
    p = client(server, record)
    p.communicate(timeout=60)
    assert p.returncode == 7
    assert json.loads(Path(f"{record}.atexit").read_text()) is True  # written before the caller returned


def test_a_served_stage_sees_what_preloading_set_in_the_environment(server, tmp_path):
    """open_clip's tokenizer sets TOKENIZERS_PARALLELISM at import, in a cold stage as in the server: a served
    stage has it too, though its caller's environment has not."""
    preloaded(server)
    assert "TOKENIZERS_PARALLELISM" not in server["env"]
    record = tmp_path / "rec.json"
    client(server, record).communicate(timeout=60)
    assert json.loads(record.read_text())["env"]["TOKENIZERS_PARALLELISM"] == "false"


def test_the_stage_environment_is_the_callers_with_what_preloading_changed():
    before = {"PATH": "/bin", "GONE": "1", "DVC_X": "a", warm.ENV: "/s"}
    after = {"PATH": "/bin", "DVC_X": "b", "SET_AT_IMPORT": "false", warm.ENV: "/s"}
    caller = {"PATH": "/bin", "GONE": "1", "DVC_X": "caller's own", warm.ENV: "/s"}
    assert warm._stage_environ(caller, before, after) == {"PATH": "/bin", "DVC_X": "caller's own",
                                                          "SET_AT_IMPORT": "false"}


def test_a_served_stage_holds_none_of_the_servers_descriptors(server, tmp_path):
    """Not the listening socket, the selector, or a sibling stage's connection to its caller: one kept open would
    hide the server's death from that caller."""
    first = client(server, tmp_path / "first.json", seconds=120)
    try:
        wait_for(tmp_path / "first.json")
        client(server, tmp_path / "second.json").communicate(timeout=60)
    finally:
        first.terminate()  # relayed to its stage
        first.wait(timeout=30)
    fds = json.loads((tmp_path / "second.json").read_text())["fds"]
    assert {fd: to for fd, to in fds.items() if to.startswith("socket:") or "eventpoll" in to} == {}


def test_ctrl_c_reaches_a_served_stage_once(server, tmp_path):
    """A terminal's Ctrl-C goes to its foreground process group: here the server's, which holds the caller too
    (a server started from a terminal). The stage gets SIGINT once, from its caller, which also relays the
    SIGTERM sent after it (a stage that got SIGINT from the terminal as well would list the test's pid)."""
    record = tmp_path / "rec.json"
    p = client(server, record, mode="sigwait", process_group=server["proc"].pid)
    stage = wait_for(record)["pid"]
    try:
        os.killpg(server["proc"].pid, signal.SIGINT)
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    except BaseException:  # blocking both signals, the stage would outlive the failed test
        with contextlib.suppress(ProcessLookupError):
            os.kill(stage, signal.SIGKILL)
        raise
    got = json.loads(Path(f"{record}.signals").read_text())
    assert got == [[signal.SIGINT, p.pid], [signal.SIGTERM, p.pid]]


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


def top_level_imports(path: Path) -> set[str]:
    """Top-level packages a module imports when it is imported (not those imported inside its functions)."""
    found: set[str] = set()

    def walk(body):
        for node in body:
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
            elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    walk(getattr(node, field, None) or [])

    walk(ast.parse((ROOT / path).read_text()).body)
    return found


def test_the_stages_served_are_those_that_import_torch():
    from stages.__main__ import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    imports_torch = {name for name in names
                     if any("torch" in top_level_imports(f) for f in closure(f"stages.{name}", list(BACKENDS)))}
    assert warm.SERVED_STAGES == imports_torch


def test_a_stage_without_torch_is_not_handed_to_the_server(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           warm.ENV: str(tmp_path / "no-server")}
    run = [subprocess.run([sys.executable, "-m", "stages", name, "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60) for name in ("aggregate", "train")]
    assert [r.returncode for r in run] == [0, 0]
    assert "warm:" not in run[0].stderr and "no stage server at" in run[1].stderr


def test_the_server_preloads_every_library(server):
    log = preloaded(server)
    assert "could not preload" not in log and "cold" not in log, log


# ---- the wrapper: however it or its server ends, nothing of the run is left -----------------------------------

def short_tmp(tmp_path: Path) -> Path:
    """The test's own temporary folder for the wrapper (TMPDIR): a short path under /tmp, linked from tmp_path
    as tmp (pytest-xdist's tmp_path is too long to hold a socket, and the wrapper would use /tmp instead)."""
    link = tmp_path / "tmp"
    if not link.is_symlink():
        link.symlink_to(tempfile.mkdtemp(prefix="cq-"))
    return Path(os.readlink(link))


def wrapper_env(tmp_path: Path) -> dict:
    """The test's own temporary folder as the wrapper's (TMPDIR): its socket folders are the test's to see."""
    env = {k: v for k, v in os.environ.items() if k != warm.ENV}
    return {**env, "TMPDIR": str(short_tmp(tmp_path)),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), str(TESTS)])}


@pytest.fixture
def start_run(tmp_path):
    """`start_run()`: `python -m clip_qlora.runtime.warm -- <DVC stand-in>` with one served stage sleeping; the wrapper
    leads a process group of its own, as a shell's foreground job does. Returns it, every process of the run
    once the stage runs (wrapper, server, DVC stand-in, caller, forked stage) and the stage's record. Whatever
    a failed test leaves is killed afterwards."""
    started: list[psutil.Process] = []

    def start(seconds: float = 120, mode: str = ""):
        p, procs, rec = _start_run(tmp_path, seconds, mode)
        started.extend(procs)
        return p, procs, rec

    yield start
    for q in started:
        with contextlib.suppress(psutil.Error):
            q.kill()


def _start_run(tmp_path: Path, seconds: float, mode: str) -> tuple[subprocess.Popen, list[psutil.Process], dict]:
    record = tmp_path / "rec.json"
    cmd = [sys.executable, "-m", "clip_qlora.runtime.warm", "--", sys.executable, str(TESTS / "warm_sleeper.py"), "--as-dvc",
           str(record), str(seconds), *([mode] if mode else [])]
    p = subprocess.Popen(cmd, env=wrapper_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    rec = wait_for(record, timeout=120)
    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    assert rec["pid"] in {q.pid for q in procs}  # the forked stage is the server's child, so the run's
    assert len(procs) == 5, [q.cmdline() for q in procs]
    return p, procs, rec


def socket_folders(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in short_tmp(tmp_path).glob(warm.FOLDER_PREFIX + "*"))


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_the_wrapper_leaves_no_process_and_no_folder(tmp_path, start_run, how):
    p, procs, _ = start_run()
    assert len(socket_folders(tmp_path)) == 1
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    else:
        p.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        assert_all_gone(procs)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # Ctrl-C: the stage stops itself (130) and the DVC stand-in reports a failure; otherwise killed as it was
    assert p.returncode == {"ctrl-c": 1, "sigterm": -signal.SIGTERM, "sigkill": -signal.SIGKILL}[how]
    assert socket_folders(tmp_path) == []  # removed by the wrapper, or by the server once its wrapper died


def test_a_server_killed_outright_takes_its_stages_with_it(tmp_path, start_run):
    """Even a stage that outlives the kernel's SIGTERM (its own handler): its caller kills it before failing."""
    p, procs, rec = start_run(mode="ignore-term")
    (server,) = [q for q in procs if q.ppid() == p.pid and "--serve" in q.cmdline()]
    server.kill()
    try:
        _, err = p.communicate(timeout=60)
        assert not alive(rec["pid"])  # gone before its caller failed, and so before DVC recorded the failure
    finally:
        assert_all_gone(procs)
    assert p.returncode == 1 and "the stage server went away" in err
    assert socket_folders(tmp_path) == []


def test_the_next_run_removes_folders_of_runs_killed_outright(tmp_path):
    env = wrapper_env(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process has now
    tmp = tmp_path / "tmp"
    stale = [tmp / f"{warm.FOLDER_PREFIX}{dead.pid}-abc123", tmp / f"{warm.FOLDER_PREFIX}older_run"]
    live = tmp / f"{warm.FOLDER_PREFIX}{os.getpid()}-def456"  # its wrapper (this test) is alive: kept
    for folder in (*stale, live):
        folder.mkdir()
        (folder / "s").write_text("")  # a socket file nothing listens on
    r = subprocess.run([sys.executable, "-m", "clip_qlora.runtime.warm", "--", "true"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert socket_folders(tmp_path) == [live.name]


def test_a_typo_in_the_command_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "clip_qlora.runtime.warm", "--", "dvcc", "repro"], env=wrapper_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "'dvcc'" in r.stderr and "-- dvc repro" in r.stderr, r.stderr
    assert socket_folders(tmp_path) == []  # nothing was started


def test_bad_params_stop_dvc_repro_before_it_starts(tmp_path):
    """`-- dvc repro` with a bad params.yaml: one line naming the key, exit 2, no server and no DVC started
    (DVC would delete the first stage's outputs before the stage could reject the value)."""
    from clip_qlora.config import STUDY_PARAMS

    text = STUDY_PARAMS.read_text().replace("  r: 2 ", "  r: -1 ", 1)
    assert "r: -1" in text
    (tmp_path / "params.yaml").write_text(text)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    r = subprocess.run([sys.executable, "-m", "clip_qlora.runtime.warm", "--", "dvc", "repro"], cwd=tmp_path,
                       env=wrapper_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "lora.r" in r.stderr, r.stderr
    assert socket_folders(tmp_path) == []


def test_a_tmpdir_too_long_for_a_socket_still_gets_a_warm_server(tmp_path):
    """A Unix socket's path holds 107 bytes: under a deeper TMPDIR the socket folder goes to /tmp, so the stages
    are still served warm (the server could not bind there, and every stage would run cold)."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    record = tmp_path / "rec.json"
    env = {**wrapper_env(tmp_path), "TMPDIR": str(deep)}
    r = subprocess.run([sys.executable, "-m", "clip_qlora.runtime.warm", "--", sys.executable, str(TESTS / "warm_sleeper.py"),
                        "--as-dvc", str(record), "0"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert "served from the warm server" in r.stderr and "did not start" not in r.stderr, r.stderr
    assert record.exists()  # the stage ran
    assert not list(deep.glob(warm.FOLDER_PREFIX + "*"))
