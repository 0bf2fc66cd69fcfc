"""Warm stage processes: one server imports torch, open_clip and PEFT once; every stage is a fork of it.

Why: DVC starts each stage as a new process, and most of a stage's start-up is importing (torch, torchvision
and with it torch._dynamo, open_clip and with it transformers, PEFT and its transformers auto classes,
bitsandbytes): 11-20 s per stage on the H200 machine, for about 80 stages in the study. Forking a process
that already holds those modules takes milliseconds.

    python -m clip_qlora.warm -- dvc repro      # what `make run` does

starts the server, runs the command with CLIP_QLORA_WARM=<socket> in its environment, and stops the server
when the command ends. `python -m stages ...` with that variable set hands its argv, working directory,
environment, sys.path and stdin/stdout/stderr (the descriptors themselves) to the server, which forks a
child to run the stage and reports its exit code; the caller exits with it, so DVC sees the stage's
output and status as if it had run in its own process. The child drops every module of the project the
server may hold and imports the project from the caller's sys.path (a queued experiment's temporary copy
stays its own code): only third-party libraries come from the server.

What is never served, and then runs in the caller's process as before: no server (or one that is gone), an
environment that differs from the server's in anything but DVC's own variables (libraries read some of it
at import, e.g. HF_HUB_OFFLINE), and a server whose preloading initialised CUDA (a forked child cannot use
a CUDA context of its parent; PYTORCH_NVML_BASED_CUDA_CHECK keeps torch.cuda.is_available() from creating
one). The wrapper prints how many stages were served and why any were not.

This module imports only the standard library: the caller side runs before anything heavy is imported.
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings

ENV = "CLIP_QLORA_WARM"
# Third-party modules the stages import; the server imports them once (project code is never preloaded).
PRELOAD = ("torch", "torchvision", "torchvision.transforms.v2", "open_clip", "peft", "bitsandbytes",
           "safetensors.torch", "dvclive", "typer", "rich.progress", "yaml", "PIL.Image")
# Variables that may differ between the server and a caller: set per stage by DVC, read at run time only.
IGNORED_ENV_PREFIXES = ("DVC_", ENV)
IGNORED_ENV = {"PWD", "OLDPWD", "SHLVL", "_"}
_HEADER = struct.Struct("!Q")


def _relevant_env(env: dict) -> dict:
    return {k: v for k, v in env.items()
            if k not in IGNORED_ENV and not k.startswith(IGNORED_ENV_PREFIXES)}


def env_difference(server: dict, caller: dict) -> str | None:
    """The first variable (sorted) whose value differs, or None when the two environments match."""
    a, b = _relevant_env(server), _relevant_env(caller)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key
    return None


def _send(conn: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    msg = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(conn, [msg], fds)
    else:
        conn.sendall(msg)


def _recv(conn: socket.socket, with_fds: bool = False) -> tuple[dict | None, list[int]]:
    """One message (and the descriptors sent with it); (None, []) if the peer closed first."""
    fds: list[int] = []
    if with_fds:
        buf, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    else:
        buf = conn.recv(1 << 16)
    if not buf:
        return None, fds
    while len(buf) < _HEADER.size:
        more = conn.recv(1 << 16)
        if not more:
            return None, fds
        buf += more
    (n,) = _HEADER.unpack(buf[:_HEADER.size])
    buf = buf[_HEADER.size:]
    while len(buf) < n:
        more = conn.recv(1 << 16)
        if not more:
            return None, fds
        buf += more
    return json.loads(buf[:n]), fds


# ---- caller side (python -m stages) ------------------------------------------------------------------------

def forward(module: str = "stages") -> int | None:
    """Run `python -m <module> <argv>` of this process in a fork of the server; its exit code, or None if the
    server cannot serve it (the caller then runs the stage itself; the reason goes to stderr)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
    except OSError as e:
        print(f"warm: no stage server at {path} ({e.strerror or e}); running here", file=sys.stderr)
        return None
    with conn:
        request = {"module": module, "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
                   "path": sys.path}
        try:
            _send(conn, request, [0, 1, 2])
            reply, _ = _recv(conn)
        except OSError as e:
            print(f"warm: stage server at {path} failed ({e}); running here", file=sys.stderr)
            return None
        if reply is None or "refused" in reply:
            why = "it closed the connection" if reply is None else reply["refused"]
            print(f"warm: not served ({why}); running here", file=sys.stderr)
            return None
        pid = reply["pid"]

        def relay(signum, _frame):  # DVC stopping the stage stops the child that runs it
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, relay)
        while True:
            try:
                reply, _ = _recv(conn)
                break
            except InterruptedError:
                continue
        if reply is None:
            print("warm: the stage server went away before the stage ended", file=sys.stderr)
            return 1
        return int(reply["rc"])


def exit_with(rc: int) -> None:
    """Exit as the stage did: with its code, or killed by the signal that killed it (rc < 0)."""
    if rc < 0:
        try:
            signal.signal(-rc, signal.SIG_DFL)  # SIGKILL and SIGSTOP have no handler to reset
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), -rc)
    sys.exit(rc if rc >= 0 else 128 - rc)  # a signal that did not end this process: the shell's convention


# ---- the forked child -------------------------------------------------------------------------------------

def _run_child(request: dict, fds: list[int]) -> None:
    """In the fork: become the caller's stage process and run it; never returns."""
    code = 1
    try:
        _CAPABILITY.restore()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        env = {k: v for k, v in request["env"].items() if k != ENV}  # a stage it starts runs cold, not back here
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = request["path"]
        for name in list(sys.modules):
            if name.split(".")[0] in ("clip_qlora", "stages", "__mp_main__"):
                del sys.modules[name]
        sys.argv = list(request["argv"])
        import runpy

        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


# ---- the server -------------------------------------------------------------------------------------------

class _NvmlCapability:
    """While preloading: torch.cuda.get_device_capability answered by NVML, without a CUDA context.

    bitsandbytes (imported by PEFT too) reads every GPU's compute capability at import, to pick its kernels,
    through torch.cuda.get_device_capability, which creates the CUDA context; after that the server could not
    fork usable stages. NVML gives the same numbers without one. Only when every GPU has the same capability
    (then which GPU is asked does not matter, whatever CUDA_VISIBLE_DEVICES maps); otherwise nothing is
    patched, the import creates the context and the server declines every stage from then on. A stage forked
    before preloading is done restores torch's own function first thing.
    """

    def __init__(self):
        self.original = None

    def patch(self) -> None:
        torch = __import__("torch")
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                caps = {pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(i))
                        for i in range(pynvml.nvmlDeviceGetCount())}
            finally:
                pynvml.nvmlShutdown()  # the forked stages open NVML afresh (memory.DriverMemory)
        except Exception:  # no NVML (a CPU machine, or nvidia-ml-py missing): nothing to patch
            caps = set()
        if len(caps) == 1:
            (cap,) = caps
            self.original = torch.cuda.get_device_capability
            torch.cuda.get_device_capability = lambda device=None: tuple(cap)

    def restore(self) -> None:
        if self.original is not None:
            sys.modules["torch"].cuda.get_device_capability = self.original
            self.original = None


_CAPABILITY = _NvmlCapability()


def serve(path: str) -> None:
    """Bind `path`, preload the libraries, then fork a child per request until SIGTERM. Single-threaded: a
    process with other threads cannot fork safely (a lock held by one of them stays held in the child)."""
    started_with = dict(os.environ)  # libraries set variables of their own at import (TOKENIZERS_PARALLELISM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process of the terminal: the stages
    #                                               and the wrapper handle it, the server lives on until told
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # bound before preloading: early callers are served while it goes on
    listener.listen(64)
    # Python 3.12 warns at every fork when the process has more than one OS thread. The extra threads here
    # are idle native helpers that torch and PEFT's imports start (one each on a CPU machine); this process
    # runs no Python thread and no torch work, and torch re-creates its own thread pools in a forked child,
    # as it does in the DataLoader's forked workers. Checked end to end: the CPU pipeline test and a
    # 13-stage `dvc repro` on an H200 ran every stage forked.
    warnings.filterwarnings("ignore", message=r"This process \(pid=\d+\) is multi-threaded, use of fork\(\)",
                            category=DeprecationWarning)
    # Libraries are imported one per turn of the loop below, between requests: a stage that comes early is
    # forked with what is loaded so far and imports the rest itself (prepare needs none of it), instead of
    # waiting for all of it.
    pending = list(PRELOAD)
    t0 = time.perf_counter()
    refuse = None
    _CAPABILITY.patch()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    children: dict[int, socket.socket] = {}
    served = 0
    while not stop:
        if pending:
            name = pending.pop(0)
            try:
                __import__(name)
            except Exception as e:  # a stage needing it reports the error itself, in its own process
                print(f"warm: could not preload {name} ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            torch = sys.modules.get("torch")
            if refuse is None and torch is not None and torch.cuda.is_initialized():
                refuse = f"importing {name} initialised CUDA in the server; a forked child could not use it"
                print(f"warm: {refuse}: stages from now on run cold", file=sys.stderr, flush=True)
            if not pending:
                _CAPABILITY.restore()
                print(f"warm: libraries loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for key, _ in sel.select(timeout=0 if pending else 0.2):
            if key.data is None:  # a new caller
                try:
                    conn, _ = listener.accept()
                    request, fds = _recv(conn, with_fds=True)
                except OSError:
                    continue
                if request is None or len(fds) != 3:
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                differs = env_difference(started_with, request["env"])
                why = refuse or (f"environment variable {differs} differs from the server's" if differs else None)
                if why:
                    for fd in fds:
                        os.close(fd)
                    _send(conn, {"refused": why})
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    _run_child(request, fds)
                for fd in fds:
                    os.close(fd)
                served += 1
                children[pid] = conn
                _send(conn, {"pid": pid})
                sel.register(conn, selectors.EVENT_READ, pid)
            else:  # a caller hung up (killed): stop its stage too
                pid = key.data
                try:
                    gone = not key.fileobj.recv(1)
                except OSError:
                    gone = True
                if gone and pid in children:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                    sel.unregister(key.fileobj)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    _send(conn, {"rc": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                conn.close()
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    listener.close()
    print(f"warm: {served} stage process{'es' if served != 1 else ''} served from the warm server",
          file=sys.stderr, flush=True)


# ---- the wrapper (python -m clip_qlora.warm -- CMD) ----------------------------------------------------------

def run_with_server(cmd: list[str]) -> int:
    """Start a server, run cmd with CLIP_QLORA_WARM pointing at it, stop the server; cmd's exit code."""
    folder = tempfile.mkdtemp(prefix="clip-qlora-warm-")  # 0700: only this user's processes can connect
    path = os.path.join(folder, "s")
    env = dict(os.environ)
    env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without creating a CUDA context
    env[ENV] = path
    server = subprocess.Popen([sys.executable, "-m", "clip_qlora.warm", "--serve", path], env=env)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not os.path.exists(path):
            print("warm: the stage server did not start; stages run cold", file=sys.stderr)
            env.pop(ENV)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command gets Ctrl-C and decides
        try:
            return subprocess.call(cmd, env=env)
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"] and len(argv) == 2:
        serve(argv[1])
        return 0
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0].startswith("-"):
        print("usage: python -m clip_qlora.warm -- COMMAND [ARGS...]   (e.g. -- dvc repro)", file=sys.stderr)
        return 2
    return run_with_server(argv)


if __name__ == "__main__":
    sys.exit(main())
