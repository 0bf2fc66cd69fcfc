"""Downloads through torchvision, rearranged into the CoOp layout.

A fetcher fills an empty dataset folder (a temporary one that replaces the real folder only when complete)
with the image folder and split file that the dataset's reader expects, so that a downloaded copy and a
hand-placed copy are read by the same code. The split file written here carries a "source" key saying which
partition it holds; the reader copies that into the split, so a downloaded partition is never mistaken for
CoOp's own.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from clip_qlora.runtime.io import UserError, write_json
from clip_qlora.data.draw import keyed_order

if TYPE_CHECKING:
    from clip_qlora.data.registry import DatasetSpec

STAGE = ".torchvision"  # where torchvision downloads, inside the temporary dataset folder

Listing = list[tuple[Path, int]]


def _torchvision_class(name: str):
    return getattr(importlib.import_module("torchvision.datasets"), name)


def _place(spec: DatasetSpec, dest: Path, images: Path, classnames: list[str], parts: dict[str, Listing],
           source: str) -> None:
    rows = {part: [[f.relative_to(images).as_posix(), label, classnames[label]] for f, label in items]
            for part, items in parts.items()}
    os.replace(images, dest / spec.image_dir)
    write_json(dest / spec.split_file, {"source": source, **rows})
    shutil.rmtree(dest / STAGE)  # archives and torchvision's metadata: not needed once the split file exists


def _listing(ds) -> Listing:
    # torchvision keeps the parsed partition files in private lists (names checked against torchvision 0.29)
    files = ds._image_files if hasattr(ds, "_image_files") else ds._images
    return [(Path(f), int(label)) for f, label in zip(files, ds._labels)]


def official(tv_name: str, splits: dict[str, str], images: str, **kwargs) -> Callable[[DatasetSpec, Path], None]:
    """Fetcher for a dataset with an official partition torchvision parses; `splits`: our part -> its split."""
    def fetch(spec: DatasetSpec, dest: Path) -> None:
        stage = dest.resolve() / STAGE
        sets = {part: _torchvision_class(tv_name)(stage, split=s, download=True, **kwargs)
                for part, s in splits.items()}
        source = f"torchvision {tv_name} official {'/'.join(splits.values())} partition, made by clip-qlora"
        _place(spec, dest, stage / images, list(sets["test"].classes),
               {part: _listing(ds) for part, ds in sets.items()}, source)
    return fetch


def _holdout(images: Path, classes: list[str]) -> dict[str, Listing]:
    """Per class 50% train, 20% val, 30% test (CoOp's proportions where a dataset has no official split)."""
    parts: dict[str, Listing] = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(classes):
        names = keyed_order(0, (p.relative_to(images).as_posix() for p in (images / cls).glob("*.jpg")))
        n_train, n_val = round(0.5 * len(names)), round(0.2 * len(names))
        for part, chunk in [("train", names[:n_train]), ("val", names[n_train:n_train + n_val]),
                            ("test", names[n_train + n_val:])]:
            parts[part] += [(images / name, label) for name in chunk]
    return parts


HOLDOUT_SOURCE = "torchvision {} (no official partition): per-class 50/20/30 train/val/test holdout, made by clip-qlora"


def eurosat(spec: DatasetSpec, dest: Path) -> None:
    stage = dest.resolve() / STAGE
    _torchvision_class("EuroSAT")(stage, download=True)
    images = stage / "eurosat" / "2750"
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    # folder names are CamelCase ("AnnualCrop"); prompts read better as words
    names = [re.sub(r"(?<=[a-z])(?=[A-Z])", " ", c) for c in classes]
    _place(spec, dest, images, names, _holdout(images, classes), HOLDOUT_SOURCE.format("EuroSAT"))


def caltech101(spec: DatasetSpec, dest: Path) -> None:
    stage = dest.resolve() / STAGE
    _torchvision_class("Caltech101")(stage, download=True)
    images = stage / "caltech101" / "101_ObjectCategories"
    # BACKGROUND_Google is clutter, not a class, and Faces_easy repeats the Faces photos cropped tighter;
    # dropping both leaves the 100 classes that the few-shot literature uses
    classes = sorted(p.name for p in images.iterdir()
                     if p.is_dir() and p.name not in ("BACKGROUND_Google", "Faces_easy"))
    _place(spec, dest, images, classes, _holdout(images, classes), HOLDOUT_SOURCE.format("Caltech101"))


def flowers102(spec: DatasetSpec, dest: Path) -> None:
    try:
        importlib.import_module("scipy.io")
    except ImportError:
        raise UserError("oxford_flowers: torchvision reads the Flowers102 partition (.mat files) with scipy; "
                        "pip install scipy, or place the CoOp layout by hand") from None
    official("Flowers102", {"train": "train", "val": "val", "test": "test"}, "flowers-102/jpg")(spec, dest)


def fgvc_aircraft(spec: DatasetSpec, dest: Path) -> None:
    # the official variant files are already the layout read_fgvc reads: move them out of torchvision's folder
    stage = dest.resolve() / STAGE
    _torchvision_class("FGVCAircraft")(stage, split="trainval", download=True)
    data = stage / "fgvc-aircraft-2013b" / "data"
    for name in [spec.image_dir, "variants.txt", *(f"images_variant_{p}.txt" for p in ("train", "val", "test"))]:
        os.replace(data / name, dest / name)
    shutil.rmtree(stage)
