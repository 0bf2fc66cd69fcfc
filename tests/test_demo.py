"""`make demo`: the demo's stages import the copy of the code in runs/demo, not the checkout's; runs/demo is a
Git repository where DVC's experiment commands work; a user's params.yaml is kept; stopping the demo leaves
nothing running.

A stand-in project (the real code, a one-stage dvc.yaml) keeps each `python -m tools.demo` to seconds:
what is tested is how the demo makes and runs its folder, not the pipeline (tests/test_pipeline.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from proc_helpers import assert_all_gone, process_tree

from clip_qlora.runtime import warm
from tools.demo import DEMO_THREADS, committed, env_for

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The stand-in stage: writes a metric and a plot from params.yaml, and the CPU threads it was given. With
# DEMO_TEST_RECORD set it records its pid there and waits to be stopped, as a long stage would.
STAGE = """\
import json, os, sys, time, yaml
p = yaml.safe_load(open("params.yaml"))
os.makedirs("metrics", exist_ok=True); os.makedirs("plots", exist_ok=True)
if os.environ.get("DEMO_TEST_RECORD"):
    open(os.environ["DEMO_TEST_RECORD"], "w").write(str(os.getpid()))
    try:
        time.sleep(120)
    except KeyboardInterrupt:  # as the project's stages end on Ctrl-C: exit code 130, no traceback
        sys.exit(130)
json.dump({"x": p["x"], "threads": os.environ.get("OMP_NUM_THREADS")}, open("metrics/m.json", "w"))
json.dump([{"step": i, "loss": p["x"] / (i + 1)} for i in range(3)], open("plots/loss.json", "w"))
"""
DVC_YAML = {"stages": {"s": {"cmd": "python stages/s.py", "deps": ["stages/s.py"], "params": ["x", "y"],
                             "metrics": [{"metrics/m.json": {"cache": False}}],
                             "plots": [{"plots/loss.json": {"cache": False, "x": "step", "y": "loss"}}]}}}
ENV = {**{k: v for k, v in os.environ.items() if k not in (warm.ENV, "OMP_NUM_THREADS", "DEMO_TEST_RECORD")},
       "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO / "src"),
       "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
       "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The checkout's code with a one-stage pipeline; configs/demo.yaml lays y: 2 over params.yaml."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "stages").mkdir()
    (root / "stages" / "s.py").write_text(STAGE)
    (root / "configs").mkdir()
    (root / "configs" / "demo.yaml").write_text("y: 2\n")
    (root / "params.yaml").write_text("x: 1  # the study's value\ny: 1\n")
    (root / "dvc.yaml").write_text(json.dumps(DVC_YAML, indent=1))  # JSON is YAML
    return root


def demo(project: Path, dest: Path, env: dict | None = None, **kw):
    return subprocess.Popen([sys.executable, "-m", "tools.demo", str(project), str(dest)],
                            env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run_demo(project: Path, dest: Path) -> tuple[int, str]:
    p = demo(project, dest)
    out, err = p.communicate(timeout=180)
    return p.returncode, out + err


def dvc(dest: Path, *args: str) -> str:
    r = subprocess.run([str(BIN / "dvc"), *args], cwd=dest, env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"dvc {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


def test_stages_run_by_dvc_import_the_demo_copy(tmp_path, monkeypatch):
    """As `make demo` calls it: dest relative to the checkout (runs/demo), the stage run with cwd = dest. The
    caller's PYTHONPATH, the checkout's src/ on it, still reaches the stages, after the copy."""
    monkeypatch.chdir(tmp_path)
    dest = Path("runs/demo")
    for name in ("src", "stages"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "callers_package.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), str(site)]))
    probe = ("import json, clip_qlora, stages.app, callers_package; "
             "print(json.dumps([clip_qlora.__file__, stages.app.__file__]))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=dest, env=env_for(dest), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    files = [Path(f) for f in json.loads(r.stdout.splitlines()[-1])]
    root = (tmp_path / dest).resolve()
    assert files == [root / "src" / "clip_qlora" / "__init__.py", root / "stages" / "app.py"]


def test_the_demo_is_a_git_repository_for_dvcs_experiment_commands_and_keeps_the_users_params(project, tmp_path):
    dest = tmp_path / "runs" / "demo"
    rc, log = run_demo(project, dest)
    assert rc == 0, log
    m = json.loads((dest / "metrics" / "m.json").read_text())
    assert m == {"x": 1, "threads": str(DEMO_THREADS)}  # the stage ran with the demo's pinned thread count
    assert yaml.safe_load((dest / "params.yaml").read_text()) == {"x": 1, "y": 2}
    # the pipeline and the first results are committed: a clean workspace
    assert committed(dest, "dvc.yaml") and committed(dest, "dvc.lock") and committed(dest, "metrics/m.json")
    assert "up to date" in dvc(dest, "status")

    # the README's commands, in the demo folder
    dvc(dest, "exp", "run", "-S", "x=3", "-n", "three")
    names = {rev["name"]: rev["data"]["metrics"]["metrics/m.json"]["data"]
             for row in json.loads(dvc(dest, "exp", "show", "--json")) for group in row.get("experiments") or []
             for rev in group["revs"]}
    assert names["three"]["x"] == 3
    assert json.loads(dvc(dest, "params", "diff", "--json"))["params.yaml"]["x"] == {"old": 1, "new": 3, "diff": 2}
    assert json.loads(dvc(dest, "metrics", "diff", "--json"))["metrics/m.json"]["x"] == {"old": 1, "new": 3,
                                                                                           "diff": 2}
    dvc(dest, "plots", "diff", "HEAD", "three", "--out", "dvc_plots")
    assert "loss" in (dest / "dvc_plots" / "index.html").read_text()

    # a user's edit of params.yaml, comments and all, is theirs: the next `make demo` runs it as it is
    mine = "# my variant\nx: 5  # larger\ny: 2\n"
    (dest / "params.yaml").write_text(mine)
    rc, log = run_demo(project, dest)
    assert rc == 0, log
    assert (dest / "params.yaml").read_text() == mine
    assert json.loads((dest / "metrics" / "m.json").read_text())["x"] == 5

    # one that lacks a key the project's params.yaml has: one line saying how to start afresh, nothing rewritten
    (dest / "params.yaml").write_text("x: 5\n")
    rc, log = run_demo(project, dest)
    assert rc == 2 and log.count("\n") == 1 and "lacks y" in log and "make clean-demo" in log, log
    assert (dest / "params.yaml").read_text() == "x: 5\n"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_stopping_the_demo_leaves_no_process_and_no_folder(project, tmp_path, how):
    """Ctrl-C (the terminal's SIGINT to the whole foreground group), SIGTERM or SIGKILL of `make demo`'s
    process while a stage runs: DVC, the stage and the warm server all end, no traceback, no socket folder."""
    record, tmp = tmp_path / "stage.pid", Path(tempfile.mkdtemp(prefix="cq-"))  # short enough for a socket path
    p = demo(project, tmp_path / "demo", env={**ENV, "DEMO_TEST_RECORD": str(record), "TMPDIR": str(tmp)},
             start_new_session=True)
    with process_tree(p, record) as procs:
        assert any("--serve" in q.cmdline() for q in procs) and any("repro" in q.cmdline() for q in procs)
        if how == "ctrl-c":
            os.killpg(p.pid, signal.SIGINT)
        else:
            p.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        _, err = p.communicate(timeout=60)
        assert_all_gone(procs)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert p.returncode != 0
    assert not list(tmp.glob(warm.FOLDER_PREFIX + "*"))


def test_a_kept_params_file_lacking_an_empty_group_is_named():
    """own_datasets: {} is a key of the project's params: a demo params.yaml written before it existed lacks it
    (and every stage would fail on it), one that fills it has it."""
    from tools.demo import missing_keys

    project = {"x": 1, "own_datasets": {}, "data": {"root": "r", "shots": 4}}
    assert missing_keys(project, {"x": 1, "data": {"root": "r"}}) == ["data.shots", "own_datasets"]
    assert missing_keys(project, {"x": 2, "own_datasets": {}, "data": {"root": "q", "shots": 1}}) == []
    assert missing_keys(project, {"x": 2, "own_datasets": {"mine": {"folder": "m"}},
                                  "data": {"root": "q", "shots": 1}}) == []


def test_a_failing_dvc_command_is_one_line_with_what_dvc_said(tmp_path, monkeypatch, capsys):
    """`make demo` where DVC cannot set the folder up: DVC's own last line, no traceback."""
    from tools import demo

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dvc"
    fake.write_text("#!/bin/sh\necho 'some detail' >&2\necho 'ERROR: unexpected error - disk on fire' >&2\nexit 255\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(demo.sys, "executable", str(bin_dir / "python"))  # env_for puts its folder first
    assert demo.main([str(REPO), str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"demo: {tmp_path / 'demo'}: `dvc init -q` failed: ERROR: unexpected error - disk on fire"]
