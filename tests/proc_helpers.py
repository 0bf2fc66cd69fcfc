"""Calls for the fresh-process runner's test: importable by a spawned child without torch."""
from __future__ import annotations

import os

from clip_qlora.io import UserError


def pid() -> int:
    return os.getpid()


def add(a: int, b: int) -> int:
    return a + b


def fail() -> None:
    raise ValueError("broken on purpose")


def fail_user() -> None:
    raise UserError("scale.archs: nothing here")
