"""Warm stage processes: one server imports torch, open_clip and PEFT once; every stage is a fork of it.

Why: DVC starts each stage as a new process, and most of a stage's start-up is importing (torch, torchvision
and with it torch._dynamo, open_clip and with it transformers, PEFT and its transformers auto classes,
bitsandbytes): most of a cold stage's start-up on the GPU machine, for about 80 stages in the study
(measured: benchmarks/results/2026-12-01-nvidia-h200-study.md). Forking a process that already holds those
modules takes milliseconds.

    python -m clip_qlora.runtime.warm -- dvc repro      # what `make run` does

starts the server, runs the command with CLIP_QLORA_WARM=<socket> in its environment, and stops the server
when the command ends. However the wrapper ends, nothing of the run outlives it: Ctrl-C, SIGTERM and SIGHUP
sent to the wrapper go to the command's process group (DVC and the stages it started), and a wrapper killed
outright closes the server's stdin, on which the server stops that group, its own stages and itself and
removes its socket folder; a folder whose wrapper and server were both killed is removed by the next run.

`python -m stages <stage>` with CLIP_QLORA_WARM set, for a stage that imports torch (SERVED_STAGES), hands
its argv, working directory, environment, sys.path and stdin/stdout/stderr (the descriptors themselves) to
the server, which forks a child to run the stage and reports its exit code; the caller exits with it, so DVC
sees the stage's output and status as if it had run in its own process. The child is what a cold stage would
be: none of the server's descriptors, a session of its own (signals reach it through its caller only), the
caller's environment plus what the preloaded libraries set at import, atexit handlers run at its end, and the
project's modules imported afresh from the caller's sys.path (a queued experiment's temporary copy stays its
own code): only third-party libraries come from the server. A caller whose server dies kills its stage.

What is never served, and then runs in the caller's process as before: the other stages, no server (or one
that is gone), an environment that differs from the server's in anything but DVC's own variables (libraries
read some of it at import, e.g. HF_HUB_OFFLINE), and a server whose preloading initialised CUDA (a forked
child cannot use a CUDA context of its parent; PYTORCH_NVML_BASED_CUDA_CHECK keeps
torch.cuda.is_available() from creating one). The wrapper prints how many stages were served and why any
were not.

This module imports only the standard library: the caller side runs before anything heavy is imported.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings

ENV = "CLIP_QLORA_WARM"
# Third-party modules the stages import; the server imports them once (project code is never preloaded).
PRELOAD = ("torch", "torchvision", "torchvision.transforms.v2", "open_clip", "peft", "bitsandbytes",
           "safetensors.torch", "dvclive", "typer", "rich.progress", "yaml", "PIL.Image")
# The stages served: those whose code imports torch (tests/test_warm.py checks it against their imports). The
# others start cold in well under a second; a fork buys them nothing.
SERVED_STAGES = frozenset({"quantize", "train", "evaluate", "zeroshot", "profile", "scale"})
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
        try:  # this very process, even once its pid is free again
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux, or it has ended already (its exit code is on its way)
            pidfd = None

        def relay(signum, _frame):  # DVC stopping the stage stops the child that runs it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, relay)
        try:
            reply, _ = _recv(conn)  # a relayed signal does not cut this short: the call is retried (PEP 475)
        except OSError:
            reply = None
        if reply is None:
            # The server died (its stages get SIGTERM from the kernel, which a stage may handle): the stage
            # ends before DVC hears of the failure, instead of writing outputs DVC has recorded as failed.
            if pidfd is not None:
                _kill_and_wait(pid, pidfd)
            print("warm: the stage server went away before the stage ended", file=sys.stderr)
            return 1
        if pidfd is not None:
            os.close(pidfd)
        return int(reply["rc"])


def _kill_and_wait(pid: int, pidfd: int) -> None:
    """SIGKILL the stage and whatever it started (it leads a session of its own), and wait until it has ended."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:  # ended and reaped already
        pass
    else:  # alive: its pid is still its group's id
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    select.select([pidfd], [], [])  # readable once the process has ended
    os.close(pidfd)


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

def _run_child(request: dict, fds: list[int], environ_before: dict) -> int:
    """In the fork, back out of the server's loop: become the caller's stage process and run it; its exit code.
    environ_before: the server's environment before preloading."""
    # A session of its own: a terminal's Ctrl-C reaches the stage only through its caller's relay, once (in the
    # server's process group it would get it from the terminal too, were the server started from one).
    os.setsid()
    die_with_parent()  # a server killed outright takes its stages with it
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _CAPABILITY.restore()  # forked while preloading
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    env = _stage_environ(request["env"], environ_before, dict(os.environ))
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
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def _exit(code: int) -> None:
    """End the child as the interpreter ends a cold stage: its threads joined, the atexit handlers run (logging's
    shutdown, multiprocessing's clean-up of the processes it started), stdio flushed. Only the teardown of
    every module is skipped: in a fork it touches each object shared with the server, copying the memory
    under it page by page, which takes seconds."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _stage_environ(caller: dict, before: dict, after: dict) -> dict:
    """The stage's environment: the caller's, with what preloading changed in the server's (`before` -> `after`:
    open_clip's tokenizer sets TOKENIZERS_PARALLELISM at import), since a cold stage's own imports change it
    the same way. The caller's environment equals the server's before preloading, or it is refused, except in
    DVC's own variables: where the caller's value differs, it stays."""
    env = {k: v for k, v in caller.items() if k != ENV}  # a stage this one starts runs cold, not back here
    for key in before.keys() | after.keys():
        if after.get(key) != before.get(key) and caller.get(key) == before.get(key):
            if key in after:
                env[key] = after[key]
            else:
                env.pop(key, None)
    return env


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


def serve(path: str, owner_stdin: bool = False) -> tuple[dict, list[int], dict] | None:
    """Bind `path`, preload the libraries, then fork a child per request until SIGTERM. Single-threaded: a
    process with other threads cannot fork safely (a lock held by one of them stays held in the child).

    Returns None in the server, once stopped; in a forked child, `_run_child`'s arguments, so that the stage
    runs outside this loop.

    owner_stdin: stdin is a pipe from the wrapper, which writes "group <pgid>" (its command's process group)
    and "stop". End of file without "stop" means the wrapper was killed outright: the server then stops that
    group too, so no DVC or stage of the run is left behind."""
    server = _Server(path, owner_stdin)
    t0 = time.perf_counter()
    try:
        # Whoever comes while the libraries load is answered between two imports: a stage that comes early is
        # forked with what is loaded so far and imports the rest itself, instead of waiting for all of it.
        for name in PRELOAD:
            if server.stop:
                break
            server.preload(name)
            forked = server.poll(0)
            if forked:
                return forked
        else:
            _CAPABILITY.restore()
            print(f"warm: libraries loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        while not server.stop:
            forked = server.poll(0.2)
            if forked:
                return forked
    except _Stop:  # stopped while preloading: the import was cut short
        pass
    server.close()
    return None


class _Server:
    """The listening socket, the callers whose stages run (pid -> connection) and the wrapper's stdin."""

    def __init__(self, path: str, owner_stdin: bool):
        self.path, self.owner_stdin = path, owner_stdin
        self.environ_before = dict(os.environ)  # libraries set variables at import (TOKENIZERS_PARALLELISM)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process of the terminal: the
        #                                               wrapper handles it, the server lives on until told
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)  # bound before preloading: early callers are served while it goes on
        self.listener.listen(64)
        # Python 3.12 warns at every fork when the process has more than one OS thread. The extra threads here
        # are idle native helpers that torch and PEFT's imports start (one each on a CPU machine); this process
        # runs no Python thread and no torch work, and torch re-creates its own thread pools in a forked child,
        # as it does in the DataLoader's forked workers. Checked end to end: the CPU pipeline test and a
        # 13-stage `dvc repro` on an H200 ran every stage forked.
        warnings.filterwarnings("ignore", message=r"This process \(pid=\d+\) is multi-threaded, use of fork\(\)",
                                category=DeprecationWarning)
        self.refuse: str | None = None
        self.stop, self.importing = False, False
        _CAPABILITY.patch()
        signal.signal(signal.SIGTERM, self._on_term)
        if owner_stdin:
            die_with_parent()  # a wrapper killed outright: SIGTERM now, even in the middle of an import
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.owner = {"lines": b"", "group": None, "stopped": False, "eof": False}
        if owner_stdin:
            self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "owner")
        self.children: dict[int, socket.socket] = {}
        self.served = 0

    def _on_term(self, *_):
        self.stop = True
        if self.importing:  # cut a long import short: the server is going away
            raise _Stop

    def preload(self, name: str) -> None:
        try:
            self.importing = True
            __import__(name)
        except Exception as e:  # a stage needing it reports the error itself, in its own process
            print(f"warm: could not preload {name} ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        finally:
            self.importing = False
        torch = sys.modules.get("torch")
        if self.refuse is None and torch is not None and torch.cuda.is_initialized():
            self.refuse = f"importing {name} initialised CUDA in the server; a forked child could not use it"
            print(f"warm: {self.refuse}: stages from now on run cold", file=sys.stderr, flush=True)

    def poll(self, timeout: float) -> tuple[dict, list[int], dict] | None:
        """Handle what is ready within `timeout` s: the wrapper's lines, new callers, callers that hung up,
        stages that ended. In a child just forked: its `_run_child` arguments."""
        for key, _ in self.sel.select(timeout):
            if key.data == "owner":
                if _read_owner(self.owner):
                    self.stop = True
                    self.sel.unregister(key.fileobj)
            elif key.data is None:
                forked = self._accept()
                if forked:
                    return forked
            else:  # a caller hung up (killed): stop its stage too
                pid = key.data
                try:
                    gone = not key.fileobj.recv(1)
                except OSError:
                    gone = True
                if gone and pid in self.children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                    self.sel.unregister(key.fileobj)
        self._reap()
        return None

    def _accept(self) -> tuple[dict, list[int], dict] | None:
        try:
            conn, _ = self.listener.accept()
            request, fds = _recv(conn, with_fds=True)
        except OSError:
            return None
        differs = None if request is None else env_difference(self.environ_before, request["env"])
        why = self.refuse or (f"environment variable {differs} differs from the server's" if differs else None)
        if request is None or len(fds) != 3 or why:
            for fd in fds:
                os.close(fd)
            if request is not None and why:
                _send(conn, {"refused": why})
            conn.close()
            return None
        for stream in (sys.stdout, sys.stderr):  # nothing buffered here is written again at the child's exit
            stream.flush()
        pid = os.fork()
        if pid == 0:
            # The child holds none of the server's descriptors: a sibling's connection kept open here would hide
            # the server's death from that sibling's caller.
            for sock in (self.listener, *self.children.values(), conn):
                sock.close()
            self.sel.close()
            return request, fds, self.environ_before
        for fd in fds:
            os.close(fd)
        self.served += 1
        self.children[pid] = conn
        _send(conn, {"pid": pid})
        self.sel.register(conn, selectors.EVENT_READ, pid)
        return None

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = self.children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    _send(conn, {"rc": os.waitstatus_to_exitcode(status)})
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(conn)
                conn.close()

    def close(self) -> None:
        """Stop: the wrapper's command if the wrapper was killed, every stage, the socket and its folder."""
        if self.owner_stdin:
            _drain_owner(self.owner)
        owner = self.owner
        if owner["eof"] and not owner["stopped"] and owner["group"]:  # the wrapper was killed: so is its command
            _signal_group(owner["group"], signal.SIGTERM)
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(os.path.dirname(self.path))  # the wrapper's folder, once empty; a folder with more stays
        print(f"warm: {self.served} stage process{'es' if self.served != 1 else ''} served from the warm server",
              file=sys.stderr, flush=True)


class _Stop(BaseException):  # not an Exception: the preloading's `except Exception` lets it through
    pass


def _read_owner(owner: dict) -> bool:
    """Read what the wrapper wrote on stdin into `owner`; True when the server should stop."""
    data = os.read(sys.stdin.fileno(), 4096)
    owner["eof"] = owner["eof"] or not data
    owner["lines"] += data
    *lines, owner["lines"] = owner["lines"].split(b"\n")
    for line in lines:
        word, _, arg = line.decode().partition(" ")
        if word == "group":
            owner["group"] = int(arg)
        elif word == "stop":
            owner["stopped"] = True
    return not data or owner["stopped"]


def _drain_owner(owner: dict) -> None:
    """Read what is left on stdin without waiting: at its end unless the wrapper still holds it open."""
    os.set_blocking(sys.stdin.fileno(), False)
    with contextlib.suppress(BlockingIOError):
        while not owner["eof"]:
            _read_owner(owner)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: the kernel sends `sig` to this process when its parent exits, however the parent ends."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a stage then outlives a server killed outright
        pass


# ---- running a command so that nothing of it outlives the caller --------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """A stop signal arrived while no command ran (raised in the main thread by `SignalsToCommand`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalsToCommand:
    """While active, Ctrl-C, SIGTERM and SIGHUP sent to this process go to the process group of the command it
    runs (`popen`), once, instead of ending this process half-way through its clean-up.

    The command runs in a process group of its own, so a terminal's Ctrl-C reaches it only through here:
    exactly once, whether the signal came from the terminal to the whole foreground group or from `kill` to
    this process alone. SIGINT is passed on as SIGINT (DVC ignores it while a stage runs; the stage stops
    itself, DVC records the failure and exits), SIGTERM and SIGHUP as SIGTERM. A signal that comes while no
    command runs raises `Interrupted`, unless `quiet` (set while cleaning up)."""

    def __init__(self):
        self.pgid: int | None = None
        self.received: list[int] = []
        self.quiet = False
        self._starting = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, _frame):
        self.received.append(signum)
        if self.pgid is not None:
            self._pass_on(signum)
        elif not (self.quiet or self._starting):
            raise Interrupted(signum)

    def _pass_on(self, signum: int) -> None:
        _signal_group(self.pgid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        seen, self._starting = len(self.received), True  # a signal now is passed on once the command exists
        try:
            proc = subprocess.Popen(cmd, process_group=0, **kw)
        finally:
            self._starting = False
        self.pgid = proc.pid
        if len(self.received) > seen:
            self._pass_on(self.received[-1])
        return proc

    def wait(self, proc: subprocess.Popen, input: str | None = None) -> tuple[int, str, str]:
        """Wait for the command (its output if piped); its exit code. Signals meanwhile go to it."""
        try:
            out, err = proc.communicate(input)
        finally:
            self.pgid = None
        return proc.returncode, out or "", err or ""

    def call(self, cmd: list[str], **kw) -> tuple[int, str, str]:
        return self.wait(self.popen(cmd, **kw))


def command_error(cmd: list[str], env: dict, cwd: str | None = None) -> str | None:
    """One line saying why `cmd` cannot be started (a typo in its program name), or None."""
    prog = cmd[0]
    where = os.path.join(cwd or ".", prog) if os.sep in prog else shutil.which(prog, path=env.get("PATH"))
    if where and os.path.isfile(where) and os.access(where, os.X_OK):
        return None
    return (f"warm: no command {prog!r} {'at that path' if os.sep in prog else 'on PATH'}: expected a program "
            "with its arguments after --, e.g. python -m clip_qlora.runtime.warm -- dvc repro")


# ---- stale folders of runs killed outright -------------------------------------------------------------------

FOLDER_PREFIX = "clip-qlora-warm-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead, only not yet reaped by its parent
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _listening(sock_path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(sock_path)
            return True
        except OSError:
            return False


SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path holds 108 with the closing NUL on Linux)


def socket_folder() -> str:
    """A new 0700 folder for the server's socket (only this user's processes can connect), named by this
    process so that a later run can tell it is stale: in TMPDIR, or in /tmp where TMPDIR's path is too long
    for a socket address (the server could not bind, and every stage would run cold)."""
    for base in (tempfile.gettempdir(), "/tmp"):
        folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=base)
        if len(os.fsencode(os.path.join(folder, "s"))) <= SOCKET_PATH_MAX:
            return folder
        os.rmdir(folder)
    return folder  # /tmp itself too long cannot happen; the server then says it could not start


def remove_stale_folders(tmp: str | None = None) -> list[str]:
    """Remove this user's socket folders whose wrapper is dead and whose server no longer listens (left when
    both were killed outright), in TMPDIR and in /tmp (`socket_folder`'s fallback); the folders removed."""
    removed = []
    for base in dict.fromkeys((tmp or tempfile.gettempdir(), "/tmp")):
        removed += _remove_stale(base)
    return removed


def _remove_stale(tmp: str) -> list[str]:
    removed = []
    for entry in os.scandir(tmp):
        m = re.fullmatch(re.escape(FOLDER_PREFIX) + r"(?:(\d+)-)?\w+", entry.name)
        try:
            mine = entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid()
        except OSError:
            continue
        if not m or not mine or (m[1] and _alive(int(m[1]))) or _listening(os.path.join(entry.path, "s")):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


# ---- the wrapper (python -m clip_qlora.runtime.warm -- CMD) ----------------------------------------------------------

def params_error(cmd: list[str], cwd=None) -> str | None:
    """For a `dvc repro` or `dvc exp run`: params.yaml checked before DVC starts, since DVC deletes a stage's
    outputs before the stage can reject a bad value (`python -m stages check` does the same by hand)."""
    from clip_qlora.config import check_params
    from clip_qlora.runtime.io import UserError

    words = [os.path.basename(cmd[0]), *cmd[1:3]]
    if words[0] != "dvc" or not ("repro" in words[1:] or words[1:3] == ["exp", "run"]):
        return None
    folder = cwd or os.getcwd()
    path, pipeline = os.path.join(folder, "params.yaml"), os.path.join(folder, "dvc.yaml")
    # only a pipeline of this project's stages reads params.yaml by this project's schema
    if not (os.path.exists(path) and os.path.exists(pipeline)
            and "python -m stages " in open(pipeline, encoding="utf8").read()):
        return None
    try:
        check_params(path)
    except UserError as e:
        return f"error: {e}"
    return None


def run_with_server(cmd: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None) -> int:
    """Start a server, run cmd with CLIP_QLORA_WARM pointing at it, stop the server; cmd's exit code (negative:
    the signal that ended it). A command that cannot be started: one line on stderr, 127, nothing started."""
    env = dict(os.environ if env is None else env)
    why = command_error(cmd, env, cwd)
    if why:
        print(why, file=sys.stderr)
        return 127
    why = params_error(cmd, cwd)
    if why:
        print(why, file=sys.stderr)
        return 2
    remove_stale_folders()
    env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without creating a CUDA context
    with SignalsToCommand() as signals:
        folder = socket_folder()
        path = os.path.join(folder, "s")
        env[ENV] = path
        # a session of its own: a terminal's Ctrl-C reaches the stages it forks only through their callers
        server = subprocess.Popen([sys.executable, "-m", "clip_qlora.runtime.warm", "--serve", path, "--owner-stdin"],
                                  env=env, stdin=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if not os.path.exists(path):
                print("warm: the stage server did not start; stages run cold", file=sys.stderr)
                env.pop(ENV)
            proc = signals.popen(cmd, env=env, cwd=cwd)
            with contextlib.suppress(OSError):
                server.stdin.write(f"group {proc.pid}\n".encode())
                server.stdin.flush()
            return signals.wait(proc)[0]
        except Interrupted as e:  # stopped before the command started
            return -e.signum
        finally:
            signals.quiet = True  # a second Ctrl-C does not cut the clean-up short
            with contextlib.suppress(OSError):
                server.stdin.write(b"stop\n")
                server.stdin.close()
            server.terminate()  # cuts a library import short: the server may still be preloading
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"] and len(argv) in (2, 3):
        forked = serve(argv[1], owner_stdin=argv[2:] == ["--owner-stdin"])
        if forked is None:
            return 0
        _exit(_run_child(*forked))
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0].startswith("-"):
        print("usage: python -m clip_qlora.runtime.warm -- COMMAND [ARGS...]   (e.g. -- dvc repro)", file=sys.stderr)
        return 2
    exit_with(run_with_server(argv))


if __name__ == "__main__":
    sys.exit(main())
