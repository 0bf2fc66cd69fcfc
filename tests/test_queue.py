"""DVC's experiment queue as the sweep runner, on CPU: the real `dvc exp run --queue` / `dvc queue start --jobs`
with a one-stage project whose stage claims a simulated GPU through clip_qlora.runtime.gpu_claim
(tests/claim_probe.py), so a run takes seconds; experiments shared between two clones through
`dvc exp push` / `dvc exp pull`; and the stage entry point importing its own copy of the code.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clip_qlora.runtime import gpu_claim

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")

BASE_ENV = {**os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
for var in (gpu_claim.ENV_FAKE, gpu_claim.ENV_LOCKS, gpu_claim.ENV_WAIT):
    BASE_ENV.pop(var, None)


def run(cwd: Path, *cmd: str, env: dict | None = None, timeout: float = 120) -> str:
    r = subprocess.run(list(cmd), cwd=cwd, env=env or BASE_ENV, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}", pytrace=False)
    return r.stdout


def init_project(root: Path, stage: dict, files: dict[str, str]) -> None:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "dvc.yaml").write_text(json.dumps({"stages": {"s": stage}}, indent=1))  # JSON is YAML
    run(root, "git", "init", "-q", "-b", "main")
    run(root, DVC, "init", "-q")
    run(root, DVC, "config", "core.analytics", "false")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "project")


def experiments(root: Path) -> dict[str, dict]:
    """name -> {"params": params.yaml's data, "metrics": {file: data}} from `dvc exp show --json`."""
    out = {}
    for row in json.loads(run(root, DVC, "exp", "show", "--json")):
        for group in row.get("experiments") or []:
            for rev in group["revs"]:
                d = rev["data"]
                out[rev["name"]] = {"params": d["params"]["params.yaml"]["data"],
                                    "metrics": {k: v.get("data") for k, v in d["metrics"].items()}}
    return out


def stop_workers(root: Path) -> None:
    """The queue's workers idle a few seconds before exiting: stop ours (by their pid files) so none outlives
    the test's folder."""
    pids = [int(p.read_text()) for p in (root / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid")
            if p.read_text().strip().isdigit()]
    subprocess.run([DVC, "queue", "stop"], cwd=root, env=BASE_ENV, capture_output=True, timeout=60)
    deadline = time.time() + 30
    for pid in pids:
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_queue_runs_experiments_at_once_on_distinct_simulated_gpus_and_one_waits(tmp_path):
    """Three queued experiments, three workers, two simulated GPUs. Each probe holds its GPU until two are
    held and a third run has found none free, so the test sees the runs overlap for certain: two at once on
    two GPUs, never two on one, and the third waiting for a GPU (not for a worker) until one is released."""
    root, log, locks = tmp_path / "proj", tmp_path / "events.jsonl", tmp_path / "locks"
    init_project(root, {"cmd": "python probe.py", "deps": ["probe.py"], "params": ["x"],
                        "metrics": [{"m.json": {"cache": False}}]},
                 {"probe.py": (REPO / "tests" / "claim_probe.py").read_text(), "params.yaml": "x: 1\n"})
    # queued from an environment that has only a marker; the claim's settings go to the worker starter only
    run(root, DVC, "exp", "run", "--queue", "-S", "x=2,3,4", env={**BASE_ENV, "CLAIM_PROBE_QUEUED_ONLY": "1"})
    worker_env = {**BASE_ENV, gpu_claim.ENV_FAKE: "2", gpu_claim.ENV_LOCKS: str(locks),
                  "CLAIM_PROBE_LOG": str(log), "CLAIM_PROBE_HOLD": "peers:2", "CLAIM_PROBE_TRY_FIRST": "1",
                  "CLAIM_PROBE_METRICS": "m.json"}
    try:
        run(root, DVC, "queue", "start", "--jobs", "3", env=worker_env)
        deadline = time.time() + 150
        while time.time() < deadline:
            status = run(root, DVC, "queue", "status")
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(2)
        exps = experiments(root)
    finally:
        stop_workers(root)
    ev = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert status.count("Success") == 3, status + "\n" + "\n".join(map(str, ev))
    by = lambda name: [e for e in ev if e["event"] == name]  # noqa: E731

    # each run: in its own temporary workspace, with the environment of `dvc queue start`, not of the queuer
    starts = by("start")
    assert len(starts) == 3 and len({e["cwd"] for e in starts}) == 3
    for e in starts:
        assert Path(e["cwd"]).parent == root / ".dvc/tmp/exps"
        assert e["env"][gpu_claim.ENV_FAKE] == "2" and e["env"][gpu_claim.ENV_LOCKS] == str(locks)
        assert "CLAIM_PROBE_QUEUED_ONLY" not in e["env"]
        assert e["env"]["DVC_ROOT"] == str(root)
    assert not by("alone"), "the runs did not overlap: " + str(ev)

    # never two runs on one GPU: per GPU, each claim starts after the previous holder released
    claims = {e["pid"]: e for e in by("claimed")}
    released = {e["pid"]: e for e in by("released")}
    assert set(claims) == set(released) and len(claims) == 3
    for gpu in (0, 1):
        spans = sorted((claims[p]["t"], released[p]["t"]) for p in claims if claims[p]["gpu"] == gpu)
        assert all(a_end < b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), (gpu, spans)
    # two at once, on both GPUs
    first_two = sorted(claims.values(), key=lambda e: e["t"])[:2]
    assert {e["gpu"] for e in first_two} == {0, 1}
    assert max(e["t"] for e in first_two) < min(e["t"] for e in released.values())
    # the third found both held, waited, and got the GPU one of them gave back
    (blocked,) = by("blocked")
    third = claims[blocked["pid"]]
    (freed,) = [released[p] for p in claims if p != third["pid"] and claims[p]["gpu"] == third["gpu"]]
    assert blocked["t"] < freed["t"] < third["t"]

    # `dvc exp show` lists every variant with its metric
    assert sorted(e["params"]["x"] for e in exps.values()) == [2, 3, 4]
    gpus = {e["exp"]: e["gpu"] for e in claims.values()}
    for name, e in exps.items():
        assert e["metrics"]["m.json"] == {"x": e["params"]["x"], "gpu": gpus[name]}


@pytest.mark.slow
def test_experiment_moves_between_clones_through_git_and_dvc_remotes(tmp_path):
    """Host A runs an experiment and `dvc exp push`es it; host B, another clone of the same Git remote with
    the same DVC remote, `dvc exp pull`s it, sees it in `dvc exp show` and restores its cached output."""
    git_remote, dvc_remote = tmp_path / "git.git", tmp_path / "dvc-remote"
    run(tmp_path, "git", "init", "-q", "--bare", str(git_remote))
    a, b = tmp_path / "a", tmp_path / "b"
    script = "import yaml; x = yaml.safe_load(open('params.yaml'))['x']; open('out.txt', 'w').write(f'x={x}\\n')\n"
    init_project(a, {"cmd": "python make.py", "deps": ["make.py"], "params": ["x"], "outs": ["out.txt"]},
                 {"make.py": script, "params.yaml": "x: 1\n"})
    run(a, DVC, "remote", "add", "-d", "shared", str(dvc_remote))
    run(a, "git", "commit", "-qam", "shared DVC remote")
    run(a, "git", "remote", "add", "origin", str(git_remote))
    run(a, "git", "push", "-q", "origin", "main")
    run(a, DVC, "exp", "run", "-S", "x=7", "-n", "seven")
    run(a, DVC, "exp", "push", "origin", "seven")  # Git refs to origin, the cached out.txt to `shared`

    run(tmp_path, "git", "clone", "-q", "-b", "main", str(git_remote), str(b))
    assert "seven" in run(b, DVC, "exp", "list", "--name-only", "origin")
    run(b, DVC, "exp", "pull", "origin", "seven")
    assert experiments(b)["seven"]["params"] == {"x": 7}
    run(b, DVC, "exp", "apply", "seven")
    assert (b / "out.txt").read_text() == "x=7\n"  # from the DVC remote: b never ran the stage
    assert yaml.safe_load((b / "dvc.lock").read_text())["stages"]["s"]["params"]["params.yaml"] == {"x": 7}


def test_stage_entry_point_imports_the_code_beside_it(tmp_path):
    """A queued run's `python -m stages` must use its workspace's src/, whatever PYTHONPATH or an editable
    install says (DVC hashed that copy as the stages' deps)."""
    shutil.copytree(REPO / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "src" / "clip_qlora").mkdir(parents=True)
    (tmp_path / "src" / "clip_qlora" / "__init__.py").write_text("COPY = True\n")
    out = subprocess.run([sys.executable, "-c", "import stages, clip_qlora; print(clip_qlora.__file__)"],
                         cwd=tmp_path, env=BASE_ENV, capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == tmp_path / "src" / "clip_qlora" / "__init__.py"


def test_sweep_reads_queue_status_and_claims():
    from tools.sweep import claims_in_log, queue_tasks

    status = ("Task     Name        Created    Status\n"
              "674f9b3  tarot-kind  03:12 PM   Success\n"
              "a1fe077  waspy-bosk  03:12 PM   Failed\n"
              "b2aa101  gusty-lamb  Dec 01, 2026  Queued\n\n"
              "Worker status: 0 active, 1 idle\n")
    assert queue_tasks(status) == {"tarot-kind": "Success", "waspy-bosk": "Failed", "gusty-lamb": "Queued"}
    log = ("Running stage 'train@lora-shapes':\n> python -m stages train --method lora --dataset shapes\n"
           "GPU claim: GPU 1 (GPU-5e2a) for pid 4242\nWARNING clip_qlora.core.model: GPU claim: not a claim\n")
    assert claims_in_log(log) == ["GPU claim: GPU 1 (GPU-5e2a) for pid 4242"]


def test_sweep_reads_finish_times_of_its_variants():
    from tools.sweep import finish_times

    def rev(name, ts):
        return {"rev": "abc", "name": name, "data": {"timestamp": ts, "params": {}, "metrics": {}}}

    show = json.dumps([{"rev": "workspace", "experiments": None, "data": {"timestamp": None}},
                       {"rev": "base", "name": "main", "data": {"timestamp": "2026-12-01T15:00:00"},
                        "experiments": [{"revs": [rev("a", "2026-12-01T15:01:40")]},
                                        {"revs": [rev("old", "2026-12-01T14:00:00")]}]}])
    t = finish_times(show, ["a"])
    assert list(t) == ["a"]
    assert t["a"] - datetime.datetime(2026, 12, 1, 15, 0, 0).timestamp() == 100


def test_sweep_benchmark_counts_processes_per_gpu():
    """benchmarks/sweep_gpu.py reads nvidia-smi's samples: most processes on one GPU at once, and a process
    seen on two GPUs (a CUDA context on a GPU it did not claim)."""
    from cli_helpers import load_benchmark

    mod = load_benchmark("sweep_gpu")
    apps = ("T 1.0\n"
            "T 2.0\n101, GPU-a, 900\n102, GPU-b, 800\n"
            "T 3.0\n101, GPU-a, 900\n103, GPU-a, 500\n103, GPU-b, 300\n"
            "T 4.0\nNo running processes found\n")
    occ = mod.occupancy(apps)
    assert occ["samples"] == 4
    assert occ["gpus"] == {"GPU-a": {"busy_samples": 2, "max_processes": 2},
                           "GPU-b": {"busy_samples": 2, "max_processes": 1}}
    assert occ["pids_on_several_gpus"] == ["103"]


def test_sigterm_of_the_sweep_stops_its_dvc_command_and_stage(tmp_path):
    """`make sweep` stopped while DVC builds its baseline: SIGTERM reaches `dvc repro` and the stage it runs (a
    stand-in that records its pid and waits), the sweep exits as killed by SIGTERM, and nothing is left."""
    from proc_helpers import assert_all_gone, process_tree

    project, record = tmp_path / "project", tmp_path / "stage.pid"
    (project / "stages").mkdir(parents=True)
    (project / "src").mkdir()
    (project / "configs").mkdir()
    (project / "configs" / "demo.yaml").write_text("data: {root: data/raw}\n")
    (project / "params.yaml").write_text("data: {root: data/raw}\n")
    (project / "stages" / "wait.py").write_text(
        f"import os, time\nopen({str(record)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    stages = {name: {"cmd": "python stages/wait.py"} for name in ("prepare", "quantize")}
    (project / "dvc.yaml").write_text(json.dumps({"stages": stages}))
    p = subprocess.Popen([sys.executable, "-m", "tools.sweep", str(project), str(tmp_path / "sweep")],
                         env=BASE_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    with process_tree(p, record) as procs:
        assert any("repro" in q.cmdline() for q in procs)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        assert_all_gone(procs)
    assert p.returncode == -signal.SIGTERM and "Traceback" not in err, err
    assert "sweep: stopped by SIGTERM" in err
