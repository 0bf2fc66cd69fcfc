"""What each stage reads that another stage writes, checked before the stage's slow imports.

A stage run by hand (`python -m stages train ...`) without its inputs says which stage makes the missing file
and how to run it, in a fraction of a second rather than after torch and open_clip have loaded; a truncated
JSON input says the same. The files' layout is clip_qlora.paths's; the stage that makes each is dvc.yaml's.
"""
from __future__ import annotations

from pathlib import Path

from clip_qlora.core.backends import METHODS
from clip_qlora.runtime.io import UserError, read_json, remake
from clip_qlora.paths import adapter_dir, base_dir, method_pointer, split_path


def quantize_stage(base: str) -> str:
    return f"quantize@{base}"


def _need(path: Path, stage: str) -> Path:
    if not path.exists():
        raise UserError(f"{path}: missing; the {stage.split('@')[0]} stage makes it: run `dvc repro {stage}` first")
    return path


def split(dataset: str, root, shots: int | None = None, seeds: list | None = None) -> None:
    """The split file, checked whole (every image it lists must exist under data.root `root`); with `shots`
    and `seeds` (what training draws from it), made for those."""
    from clip_qlora.data.splits import load_split

    path = _need(split_path(dataset), f"prepare@{dataset}")
    s = load_split(path, Path(root))
    if shots is not None and (s["shots"] != shots or any(str(seed) not in s["train"] for seed in seeds)):
        raise UserError(f"{path}: made for shots={s['shots']} and seeds {sorted(s['train'])}, params ask "
                        f"shots={shots} seeds {seeds}; rerun prepare (dvc repro prepare@{dataset})")


def base(name: str) -> None:
    stage = quantize_stage(name)
    read_json(_need(base_dir(name) / "base.json", stage), remake(stage))
    _need(base_dir(name) / "model.safetensors", stage)  # read (and checked) by the stage itself: too big here


def method(name: str) -> None:
    """The method's pointer and the base it points to."""
    stage = quantize_stage(METHODS[name].base)
    read_json(_need(method_pointer(name), stage), remake(stage))
    base(METHODS[name].base)


def adapters(name: str, dataset: str, seeds: list) -> None:
    for seed in seeds:
        _need(adapter_dir(name, dataset, seed) / "adapter_config.json", f"train@{name}-{dataset}")
