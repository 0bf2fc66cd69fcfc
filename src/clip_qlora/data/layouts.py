"""Readers for the on-disk layouts users already have (CoOp `split_zhou_*.json`, FGVC-Aircraft text files).

A reader turns a dataset folder into a `Partition`: class names in label order and (path, label) lists whose
paths are relative to data.root, so a split file stays valid when the whole root is moved.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from clip_qlora.runtime.io import UserError, read_json

if TYPE_CHECKING:
    from clip_qlora.data.registry import DatasetSpec


@dataclass(frozen=True)
class Partition:
    classnames: list[str]  # label order, underscores already turned into spaces
    train: list[tuple[str, int]]  # (path relative to data.root, label), in the split file's order
    test: list[tuple[str, int]]
    source: str  # how the partition was made, copied into the split file
    val: list[tuple[str, int]] = ()  # read only for CLIP-LoRA's draw, which consumes its RNG on it


def escapes(path: str) -> bool:
    """True when a relative path from a file could point outside the folder it is meant to stay in."""
    pure = PurePosixPath(path)
    return pure.is_absolute() or ".." in pure.parts or bool(PureWindowsPath(path).drive)


def clean_classname(name: str) -> str:
    return name.replace("_", " ").strip()


def _label_order(names: dict[int, str], where: Path) -> list[str]:
    missing = sorted(set(range(len(names))) - set(names))
    if missing:
        raise UserError(f"{where}: labels must run 0..{len(names) - 1} without gaps; label {missing[0]} is missing")
    return [clean_classname(names[i]) for i in range(len(names))]


def read_coop(spec: DatasetSpec, root: Path) -> Partition:
    """`split_zhou_*.json`: {"train"|"val"|"test": [[path relative to the image folder, label, classname], ...]}."""
    path = root / spec.folder / spec.split_file
    if not path.is_file():
        raise UserError(f"{path}: split file not found; {root / spec.folder} needs {spec.image_dir}/ and "
                        f"{spec.split_file}")
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("train", "test")):
        raise UserError(f"{path}: expected an object with 'train' and 'test' lists of [image_path, label, classname]")
    names: dict[int, str] = {}
    parts: dict[str, list[tuple[str, int]]] = {}
    # val is never trained or tested on; CLIP-LoRA's draw takes (unused) shots from it first, and its class names
    # take part in the label check
    for part in ("train", "val", "test"):
        rows = []
        for entry in data.get(part) or []:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and type(entry[1]) is int and entry[1] >= 0 and isinstance(entry[2], str)):
                raise UserError(f"{path}: {part} entry {entry!r} is not [image_path, label, classname]")
            rel, label, name = entry
            if escapes(rel):
                raise UserError(f"{path}: image path {rel!r} leaves {spec.image_dir or spec.folder}/ (absolute or "
                                f"containing '..')")
            if names.setdefault(label, name) != name:
                raise UserError(f"{path}: label {label} is used for both {names[label]!r} and {name!r}")
            # an own dataset's image folder is the dataset folder itself (image_dir "")
            rows.append((PurePosixPath(spec.folder, spec.image_dir, rel).as_posix(), label))
        parts[part] = rows
    # A file made by our torchvision fetcher or the synthetic generator says so; CoOp's own files do not
    source = data.get("source") if isinstance(data.get("source"), str) else spec.split_file
    return Partition(_label_order(names, path), parts["train"], parts["test"], source, parts["val"])


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise UserError(f"{path}: file not found; FGVC-Aircraft needs images/, variants.txt and "
                        f"images_variant_{{train,val,test}}.txt in {path.parent}")
    return [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


def read_fgvc(spec: DatasetSpec, root: Path) -> Partition:
    """FGVC-Aircraft: variants.txt (label = line index) + `images_variant_<split>.txt` lines `<id> <variant>`."""
    folder = root / spec.folder
    classnames = [name for _, name in _lines(folder / "variants.txt")]
    index = {name: i for i, name in enumerate(classnames)}
    parts: dict[str, list[tuple[str, int]]] = {}
    for part in ("train", "val", "test"):
        path = folder / f"images_variant_{part}.txt"
        rows = []
        for lineno, line in _lines(path):
            image_id, _, name = line.partition(" ")
            if name not in index:
                raise UserError(f"{path}:{lineno}: variant {name!r} is not in variants.txt")
            if escapes(image_id):
                raise UserError(f"{path}:{lineno}: image id {image_id!r} leaves {spec.image_dir}/")
            rows.append((f"{spec.folder}/{spec.image_dir}/{image_id}.jpg", index[name]))
        parts[part] = rows
    return Partition([clean_classname(n) for n in classnames], parts["train"], parts["test"], spec.split_file,
                     parts["val"])
