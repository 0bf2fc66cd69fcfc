"""One whole GPU per stage process: `model.device: auto` claims a free GPU by holding an exclusive lock on it.

Why a lock: DVC's experiment queue (`dvc queue start --jobs N`) runs N experiments at once, each in its own
temporary workspace, and tells a run neither a worker index nor anything of the environment of the shell
that queued it (a stage sees the environment of whoever started the queue's workers, the same for all of
them). So a run cannot be told which GPU is its own; it takes one. Each stage process takes an exclusive
`flock` on one lock file per GPU, in a folder every run on the host shares, and keeps it until it exits:
the kernel drops the lock when the process dies, however it dies, so a crashed or killed run never leaves a
GPU claimed. When every GPU is held the run waits (up to CLIP_QLORA_GPU_WAIT_S) instead of sharing one:
two runs on one GPU would make each other's step times and allocator peaks meaningless.

Environment (read by every stage process; for queued runs, set it where `dvc queue start` runs):
  CLIP_QLORA_GPU_LOCKS   lock folder (default: <system temp dir>/clip-qlora-gpu-locks, shared by every run
                         of every clone and user on the host, since a GPU is a host resource)
  CLIP_QLORA_GPU_WAIT_S  seconds to wait for a free GPU before failing (default 3600)
  CLIP_QLORA_FAKE_GPUS   simulation only (tests, CPU machines): pretend this many GPUs exist for the claim
                         itself; nothing runs on them, and model.device still resolves to cpu without CUDA
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from clip_qlora.runtime.io import UserError

ENV_LOCKS = "CLIP_QLORA_GPU_LOCKS"
ENV_WAIT = "CLIP_QLORA_GPU_WAIT_S"
ENV_FAKE = "CLIP_QLORA_FAKE_GPUS"
DEFAULT_WAIT_S = 3600.0  # far longer than any one stage of the study on one GPU (minutes), so a run queued
#                          behind a busy GPU gets it; a GPU held for longer is most likely not ours to wait for
POLL_S = 0.2


@dataclass
class Claim:
    index: int       # CUDA device index in this process
    path: Path       # its lock file
    fd: int          # the open lock file: the lock lives as long as this descriptor
    waited_s: float  # how long the claim waited for a free GPU


_held: dict[int, Claim] = {}  # claims of this process, kept (with their descriptors) until it exits


def lock_dir() -> Path:
    folder = os.environ.get(ENV_LOCKS)
    path = Path(folder) if folder else Path(tempfile.gettempdir()) / "clip-qlora-gpu-locks"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not folder and path.stat().st_uid == os.getuid():
            path.chmod(0o1777)  # like /tmp: every user's runs create their locks here, none removes another's
    except OSError as e:
        raise UserError(f"{ENV_LOCKS}: cannot use {path} as the GPU lock folder ({e}); set it to a writable "
                        f"folder shared by all runs on this host") from None
    return path


def wait_seconds() -> float:
    raw = os.environ.get(ENV_WAIT, "")
    try:
        value = float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise UserError(f"{ENV_WAIT}: {raw!r} is not a number of seconds >= 0")
    return value


def gpu_keys() -> list[str]:
    """One name per visible GPU, in CUDA index order. Real GPUs are named by UUID, not index: runs started
    with different CUDA_VISIBLE_DEVICES number the same GPU differently, and must still see one lock."""
    fake = os.environ.get(ENV_FAKE)
    if fake is not None:
        if not fake.isdigit():
            raise UserError(f"{ENV_FAKE}: {fake!r} is not a whole number of simulated GPUs")
        return [f"fake{i}" for i in range(int(fake))]
    import torch

    return [f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(torch.cuda.device_count())]


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            os.fchmod(fd, 0o666)  # another user's runs may claim this GPU later and record themselves
        except OSError:
            pass
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)  # another user's file: flock needs no write access
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _record_holder(fd: int) -> None:
    env = os.environ
    who = (f"pid {os.getpid()} on {socket.gethostname()}, {os.getcwd()}"
           + (f", experiment {env['DVC_EXP_NAME']}" if env.get("DVC_EXP_NAME") else "")
           + (f", stage {env['DVC_STAGE']}" if env.get("DVC_STAGE") else ""))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (who + "\n").encode(), 0)
    except OSError:
        pass  # read-only (another user's lock file): the lock holds all the same, only the note is missing


def holders(folder: Path, keys: list[str]) -> str:
    notes = []
    for i, key in enumerate(keys):
        try:
            note = (folder / f"{key}.lock").read_text().strip()
        except OSError:
            note = ""
        notes.append(f"{i}: {note or 'unknown holder'}")
    return "; ".join(notes)


def claim(index: int | None = None) -> Claim:
    """Hold GPU `index`, or with None the first free GPU, for the rest of this process's life.

    Waits while it (or every GPU) is held by other processes; after CLIP_QLORA_GPU_WAIT_S, one-line UserError.
    A second call in the same process returns the GPU it already holds.
    """
    for held in _held.values():
        if index is None or held.index == index:
            return held
    if _held:
        raise UserError(f"model.device: this process already holds GPU {next(iter(_held))}, not {index}")
    keys = gpu_keys()
    if not keys:
        raise UserError("model.device: no GPU visible to claim")
    if index is not None and not 0 <= index < len(keys):
        raise UserError(f"model.device: 'cuda:{index}' asked for but {len(keys)} GPU(s) are visible "
                        f"(cuda:0..cuda:{len(keys) - 1})")
    folder = lock_dir()
    wait = wait_seconds()
    candidates = range(len(keys)) if index is None else [index]
    t0 = time.monotonic()
    told = False
    while True:
        for i in candidates:
            fd = _try_lock(folder / f"{keys[i]}.lock")
            if fd is not None:
                _record_holder(fd)
                c = Claim(i, folder / f"{keys[i]}.lock", fd, time.monotonic() - t0)
                _held[i] = c
                print(f"GPU claim: GPU {i} ({keys[i]}) for pid {os.getpid()}"
                      + (f" after waiting {c.waited_s:.0f} s" if c.waited_s >= 1 else ""), file=sys.stderr,
                      flush=True)
                return c
        waited = time.monotonic() - t0
        wanted = "every GPU is" if index is None else f"GPU {index} is"
        if waited >= wait:
            raise UserError(f"model.device: {wanted} still claimed by other runs after {wait:g} s "
                            f"({holders(folder, keys)}); run at most one queued experiment per GPU "
                            f"(dvc queue start --jobs N) or raise {ENV_WAIT}")
        if not told:
            print(f"GPU claim: {wanted} claimed ({holders(folder, keys)}); waiting up to {wait:g} s "
                  f"for one to be released", file=sys.stderr, flush=True)
            told = True
        time.sleep(POLL_S)


def release(c: Claim) -> None:
    """Give a claim back before the process ends (tests; a stage simply exits)."""
    if _held.get(c.index) is c:
        del _held[c.index]
    os.close(c.fd)


def claim_cuda(device: str) -> str:
    """`auto`/`cuda`: the first free GPU; `cuda:N`: GPU N, also claimed, so a pinned run and an automatic one
    never share it. Makes the claimed GPU the current device (what device-less CUDA calls use) and returns
    'cuda:<index>'."""
    import torch

    c = claim(None if device in ("auto", "cuda") else int(device.split(":", 1)[1]))
    torch.cuda.set_device(c.index)
    return f"cuda:{c.index}"
