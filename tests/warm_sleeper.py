"""A stand-in stage for tests/test_warm.py: records who runs it, then waits to be stopped.

argv: <record file> [seconds]. Writes {"pid", "ppid", "cwd", "marker"} (marker: WARM_TEST_MARKER from the
environment), then sleeps `seconds` (default 0) and exits 7.

`python warm_sleeper.py --as-dvc <record> <seconds>` stands in for `dvc repro` running that stage: it starts
the stage's caller (CALLER: what `python -m stages` does, handing the stage to the warm server) and, as DVC
does while a stage runs, ignores SIGINT (the stage stops itself) and dies at once on SIGTERM.
"""
import json
import os
import signal
import subprocess
import sys
import time

CALLER = ("import sys; from clip_qlora.runtime import warm; rc = warm.forward(module='warm_sleeper'); "
          "sys.exit(99) if rc is None else warm.exit_with(rc)")


def stage(argv: list[str]) -> None:
    record = {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
              "marker": os.environ.get("WARM_TEST_MARKER"), "argv": argv}
    with open(argv[0] + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(argv[0] + ".tmp", argv[0])
    print("sleeper says hello", flush=True)
    print("sleeper warns", file=sys.stderr, flush=True)
    time.sleep(float(argv[1]) if len(argv) > 1 else 0)
    sys.exit(7)


def as_dvc(argv: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CALLER, *argv])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(proc.wait() and 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--as-dvc"]:
        as_dvc(sys.argv[2:])
    else:
        stage(sys.argv[1:])
