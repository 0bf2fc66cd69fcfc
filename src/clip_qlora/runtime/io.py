"""Atomic file writes and run metadata shared by every stage.

Every output goes through a temporary file in the same folder followed by `os.replace`, so a stage that
dies half-way leaves the previous file intact or no file at all, never a truncated one.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class UserError(Exception):
    """A problem the user can fix (bad params, missing data or weights). Shown as one line, exit code 2."""


def bad_param(key: str, value: Any, allowed: str) -> UserError:
    """The one form of a bad params value's error: the key, the value, what is allowed."""
    return UserError(f"params: {key} = {value!r}: expected {allowed}")


# A temporary output is named `.<target>.<writer pid>.<random><suffix>.tmp` beside its target: a writer killed
# outright (SIGKILL, power loss) cannot remove its own, so the next writer of the same target removes those whose
# writer is gone. A live writer's (another process, or this one) is never touched. The pattern is strict (mkstemp's
# 8 random characters, at most one suffix) so that a target whose name extends this one's ("a" and "a.12") is
# never read as this one's temporary.
_TMP = re.compile(r"\.(?P<pid>\d+)\.[a-z0-9_]{8}(\.[^.]+)?\.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of `path` (files or folders) left by writers that no longer run; return them."""
    removed = []
    prefix = f".{path.name}."
    for entry in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        m = _TMP.fullmatch(entry.name[len(prefix) - 1:])
        if m is None or _pid_alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_error(exc: BaseException) -> str | None:
    """Why a write failed when the disk (or quota) is full, else None. Libraries that write in native code
    report it in their own exception types (safetensors: "No space left on device (os error 28)"; torch.save:
    "file write failed"), so the chain of causes and the messages are both looked at."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return os.strerror(exc.errno)
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "StorageFull" in text:
            return "No space left on device"
        if "file write failed" in text:
            return "file write failed (disk full?)"
        exc = exc.__cause__ or exc.__context__
    return None


def _write_failed(path: Path, exc: BaseException, why: str) -> UserError:
    kept = "the previous version is kept" if path.exists() else "nothing was written"
    return UserError(f"{path}: could not write it: {why}; free space on {path.parent.resolve()} (df -h) and rerun "
                     f"({kept})")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it.

    A full disk becomes a UserError naming `path`; the previous file stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are ordinary files
    try:
        try:
            yield tmp
            if tmp.exists():
                tmp.chmod(0o666 & ~_umask())  # a writer that replaced the file (safetensors: 0600) reset its mode
            os.replace(tmp, path)
        except Exception as e:
            why = _disk_error(e)
            if why is None:
                raise
            raise _write_failed(path, e, why) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remake(stage: str) -> str:
    """The command that makes a stage's outputs again, whatever DVC thinks of them (for a damaged output)."""
    return f"dvc repro -f {stage}"


def read_json(path: str | Path, remake: str | None = None) -> Any:
    """Read JSON, turning a missing file or a syntax error into one line naming the file and the position;
    `remake`: what makes the file again (`dvc repro -f quantize@nf4`), said on a truncated or missing one."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found" + (f"; make it with `{remake}`" if remake else ""))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = (f"at line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError)
                 else "(not text)")
        raise UserError(f"{path}: malformed JSON {where}"
                        + (f" (truncated or damaged?); make it again with `{remake}`" if remake else "")) from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` as a whole.

    Modes are the umask's (files 0644, folders 0755 with the usual 022): some writers (safetensors) create 0600
    files. A full disk becomes a UserError naming `path`; the previous folder stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    mask = _umask()
    tmp.chmod(0o777 & ~mask)
    try:
        try:
            yield tmp
        except Exception as e:
            why = _disk_error(e)
            if why is None:
                raise
            raise _write_failed(path, e, why) from None
        for sub, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(sub, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(sub, f), 0o666 & ~mask)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the numbers depend on.

    A module already imported tells its own version (torch's carries its CUDA build, "+cu130", which the
    distribution's metadata may not); one not imported is read from the installed distribution, not imported:
    importing PEFT (and the transformers modules it pulls in) is part of a cold stage's start-up (measured:
    benchmarks/results/2026-12-01-nvidia-h200-study.md), and a stage that never uses it must not pay for it to
    name it."""
    import sys
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name, mod, dist in [("torch", "torch", "torch"), ("open_clip", "open_clip", "open_clip_torch"),
                            ("peft", "peft", "peft"), ("bitsandbytes", "bitsandbytes", "bitsandbytes")]:
        try:
            out[name] = sys.modules[mod].__version__ if mod in sys.modules else metadata.version(dist)
        except (metadata.PackageNotFoundError, AttributeError):  # a missing optional library is recorded, not fatal
            out[name] = "missing"
    return out


def device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"
