"""Where the stages' files live (metrics files: clip_qlora.metrics). Paths are relative to the working folder
(the DVC project root): every output is declared in dvc.yaml; checkpoints live in .ckpt/ (not an output) so
they survive `dvc repro` clearing outputs."""
from __future__ import annotations

from pathlib import Path


def split_path(dataset: str) -> Path:
    return Path("data/splits") / f"{dataset}.json"


def base_dir(base: str) -> Path:
    return Path("models") / base


def method_pointer(method: str) -> Path:
    """A small file per method naming its base, the base's settings and hash.

    DVC cannot look up a method's base inside a matrix stage, so each train/evaluate/profile stage depends on
    this pointer instead: it changes exactly when that method's base changes (quant.* reruns only the NF4 side).
    """
    return Path("models/methods") / f"{method}.json"


def adapter_dir(method: str, dataset: str, seed) -> Path:
    return Path("adapters") / method / dataset / f"seed{seed}"


def checkpoint_path(method: str, dataset: str, seed) -> Path:
    return Path(".ckpt/train") / method / dataset / f"seed{seed}.pt"


def base_of(method: str) -> Path:
    """The saved base a method trains on, from the method table (its pointer file is what DVC tracks)."""
    from clip_qlora.core.backends import METHODS  # the table only: imports no torch

    return base_dir(METHODS[method].base)
