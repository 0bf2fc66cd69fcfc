"""Fresh processes for measurements, one at a time, with the next ones started ahead.

Kept free of torch imports: the parent only hands calls out; the spares import what `warm` names.
"""
from __future__ import annotations

from clip_qlora.runtime.io import UserError


def _serve(conn, warm: tuple[str, ...], cuda_index: int | None) -> None:
    """A fresh process: import `warm` ahead (the slow part of a start), then run one call and exit."""
    import importlib
    import traceback

    for name in warm:
        importlib.import_module(name)
    try:
        fn, args = conn.recv()
    except EOFError:  # the parent finished without needing this spare
        return
    try:
        if cuda_index is not None:  # only now: a spare touches no GPU before its call
            importlib.import_module("torch").cuda.set_device(cuda_index)
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # handed to the parent, which re-raises it
        try:
            conn.send(("error", e, traceback.format_exc()))
        except Exception:  # an exception that does not pickle: its text still goes back
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}"), traceback.format_exc()))


class FreshProcesses:
    """Calls on CUDA each in a process of its own, one at a time, the next processes started ahead; in-process
    off CUDA, where the allocator is not measured.

    A fresh process per configuration keeps each one's peaks and driver memory its own (nothing a library keeps
    alive after one configuration inflates the next one's), but its start costs as much as measuring a small
    model (importing torch, open_clip, peft and bitsandbytes; benchmarks/results/2026-12-01-nvidia-h200-study.md
    measures a cold stage's start-up). Here
    `ahead` spare processes import `warm` while a call runs, so a later call starts with its imports done.
    Spares do not touch CUDA before their call, and a call starts only after the previous process has exited:
    one measuring process at a time. On `cuda:N` the call runs with GPU N as its current device (the one
    device-less CUDA calls use), as in the parent that claimed it (gpu_claim), not CUDA's default GPU 0.
    """

    def __init__(self, device: str, warm: tuple[str, ...] = (), ahead: int = 2):
        self.fresh = str(device).startswith("cuda")
        _, _, index = str(device).partition(":")
        self.cuda_index = int(index) if self.fresh and index else None
        self.warm, self.ahead, self._spares = tuple(warm), ahead, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc, conn in self._spares:
            conn.close()
            proc.join(timeout=5)  # a spare waiting for its call ends when its pipe closes
            if proc.is_alive():
                proc.terminate()
        self._spares = []

    def _start(self):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, self.warm, self.cuda_index), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def __call__(self, fn, *args):
        if not self.fresh:
            return fn(*args)
        while len(self._spares) < 1 + self.ahead:
            self._spares.append(self._start())
        proc, conn = self._spares.pop(0)
        try:
            conn.send((fn, args))
            reply = conn.recv()
        except (EOFError, ConnectionError):
            proc.join()
            reply = ("error", RuntimeError(f"the measuring process died (exit code {proc.exitcode})"), "")
        finally:
            conn.close()
            proc.join()
        self._spares.append(self._start())
        if reply[0] == "ok":
            return reply[1]
        error, trace = reply[1], reply[2]
        if trace and not isinstance(error, UserError):
            error.add_note(f"in the measuring process:\n{trace}")
        raise error
