"""Calls for the fresh-process runner's test (importable by a spawned child without torch), process-tree
checks for the tests that stop a run with real signals, and a runner for Triton kernels' interpreter checks."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from clip_qlora.runtime.io import UserError


def pid() -> int:
    return os.getpid()


def add(a: int, b: int) -> int:
    return a + b


def fail() -> None:
    raise ValueError("broken on purpose")


def fail_user() -> None:
    raise UserError("scale.archs: nothing here")


# ---- process trees of the wrapper tests (test_warm, test_demo, test_queue) ----------------------------------

@contextlib.contextmanager
def process_tree(p, record: Path, timeout: float = 120):
    """Wait until a stand-in stage of `p`'s run has written its pid to `record`, then yield every process of
    the run (p and its descendants, the stage among them); whatever a failed test leaves is killed after."""
    import psutil

    deadline = time.monotonic() + timeout
    while not record.exists() or not record.read_text():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.1)
    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    try:
        assert int(record.read_text()) in {q.pid for q in procs}
        yield procs
    finally:
        for q in procs:
            with contextlib.suppress(psutil.Error):
                q.kill()


def assert_all_gone(procs, timeout: float = 60) -> None:
    """Every process of `procs` ends within `timeout` (a zombie, dead but not yet reaped, counts as ended)."""
    import psutil

    _, left = psutil.wait_procs(procs, timeout=timeout)
    left = [q for q in left if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
    assert not left, [q.cmdline() for q in left]


def run_interpreted(script: Path, case: str) -> None:
    """`python script case` in a fresh process under Triton's CPU interpreter (TRITON_INTERPRET must be set before
    triton is imported, which decides then whether a kernel is compiled or interpreted); asserts it printed
    `ok case`."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, str(script), case], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert f"ok {case}" in out.stdout
