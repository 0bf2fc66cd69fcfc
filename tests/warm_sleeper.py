"""A stand-in stage for tests/test_warm.py: records who runs it, then waits to be stopped.

argv: <record file> [seconds] [mode]. Writes {"pid", "ppid", "pgid", "sid", "cwd", "marker", "argv", "env",
"fds"} (marker: WARM_TEST_MARKER from the environment; fds: what each open descriptor refers to), then sleeps
`seconds` (default 0) and exits 7; at its exit an atexit handler writes <record>.atexit. Modes:
  ignore-term  SIGTERM ignored (a stage that handles it and goes on writing)
  sigwait      instead of sleeping, waits for SIGINT and SIGTERM and, at SIGTERM, writes every signal it got
               as [number, sender pid] to <record>.signals
`python warm_sleeper.py --as-dvc <record> <seconds> [mode]` stands in for `dvc repro` running that stage: it
starts the stage's caller (CALLER: what `python -m stages` does, handing the stage to the warm server) and, as
DVC does while a stage runs, ignores SIGINT (the stage stops itself) and dies at once on SIGTERM.
"""
import atexit
import json
import os
import signal
import subprocess
import sys
import time

CALLER = ("import sys; from clip_qlora.runtime import warm; rc = warm.forward(module='warm_sleeper'); "
          "sys.exit(99) if rc is None else warm.exit_with(rc)")


def _write(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _fds() -> dict:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return out


def stage(argv: list[str]) -> None:
    seconds, mode = float(argv[1]) if len(argv) > 1 else 0, argv[2] if len(argv) > 2 else ""
    waited = {signal.SIGINT, signal.SIGTERM}
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif mode == "sigwait":
        signal.pthread_sigmask(signal.SIG_BLOCK, waited)  # held for sigwaitinfo, from before the record exists
    atexit.register(_write, argv[0] + ".atexit", True)
    record = {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
              "cwd": os.getcwd(), "marker": os.environ.get("WARM_TEST_MARKER"), "argv": argv,
              "env": dict(os.environ), "fds": _fds()}
    _write(argv[0], record)
    print("sleeper says hello", flush=True)
    print("sleeper warns", file=sys.stderr, flush=True)
    if mode == "sigwait":
        got = []
        while not got or got[-1][0] != signal.SIGTERM:
            info = signal.sigwaitinfo(waited)
            got.append([info.si_signo, info.si_pid])
        _write(argv[0] + ".signals", got)
    else:
        time.sleep(seconds)
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
