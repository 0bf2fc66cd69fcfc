"""Atomic file writes and run metadata shared by every stage.

Every output goes through a temporary file in the same folder followed by `os.replace`, so a stage that
dies half-way leaves the previous file intact or no file at all, never a truncated one.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class UserError(Exception):
    """A problem the user can fix (bad params, missing data or weights). Shown as one line, exit code 2."""


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o644)  # mkstemp makes 0600 files; outputs are ordinary files
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read JSON, turning a syntax error into one line naming the file and the position."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
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
    importing PEFT (and the transformers modules it pulls in) costs 10-20 s on a GPU machine, and a stage that
    never uses it must not pay that to name it."""
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
