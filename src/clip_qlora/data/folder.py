"""A dataset of the user's own, declared in params.yaml (`own_datasets`): a folder under data.root with one
subfolder of images per class (torchvision's ImageFolder layout), read like the built-in datasets.

Classes are the subfolders in sorted order (as ImageFolder numbers them), named after the folder (underscores
to spaces) unless a classnames file maps them. Images are found by extension, as ImageFolder finds them, in a
class folder and its subfolders; any other file is skipped and counted on stderr; folders and files whose name
starts with a dot are not looked at (.ipynb_checkpoints, .DS_Store).

If the folder holds a CoOp split file (`split_zhou_*.json`, paths relative to the folder) it is the partition.
Otherwise the partition is drawn here, keyed by each image's path alone, so that adding images never moves the
others: an image is a test image when the first 8 bytes of SHA-256(SALT, NUL, its path in the folder), read as
a fraction of 2^64, fall below `test_fraction`. Per class that count is then brought within [1, n - data.shots]
(the test images are always the lowest keys), so every class has a test image and enough distinct training
images for its shots; a class with fewer than data.shots + 1 images is refused with the counts. Only where that
bound binds can an added image move another one.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from functools import partial
from pathlib import Path, PurePosixPath

from clip_qlora.runtime.io import UserError
from clip_qlora.data.layouts import Partition, clean_classname
from clip_qlora.data.registry import DatasetSpec

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions (IMG_EXTENSIONS), case ignored
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
COOP_SPLIT = "split_zhou_*.json"
SALT = "clip-qlora own-dataset partition"
LAYOUT = "one subfolder of images per class"


def own_spec(name: str, entry, root: Path, shots: int) -> DatasetSpec:
    """The DatasetSpec of own dataset `name` (an own_datasets entry of params) under `root`: its CoOp split file
    if the folder has one, else the partition drawn here with at least `shots` training images per class."""
    rel = PurePosixPath(entry.folder).as_posix()
    folder = Path(root) / rel
    if not folder.is_dir():
        raise UserError(f"{name}: no folder {folder} (own_datasets.{name}.folder, under data.root): put {LAYOUT} "
                        f"there")
    coop = sorted(p.name for p in folder.glob(COOP_SPLIT))
    if len(coop) > 1:
        raise UserError(f"{name}: {folder} holds {len(coop)} CoOp split files ({', '.join(coop)}): keep one")
    if coop:
        return DatasetSpec(rel, "", coop[0], entry.template)
    return DatasetSpec(rel, "", "", entry.template,
                       read=partial(read_folder, name=name, test_fraction=entry.test_fraction,
                                    classnames=entry.classnames, shots=shots))


def partition_key(path: str) -> float:
    """Where `path` (relative to the dataset folder) falls in [0, 1): below test_fraction, a test image."""
    digest = hashlib.sha256(f"{SALT}\0{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan(folder: Path, keep: set[str]) -> tuple[dict[str, list[str]], list[str]]:
    """({class folder: its image paths relative to `folder`, sorted}, [skipped files relative to `folder`]).

    `keep`: files at the top of the folder that belong there (the classnames file) and are not counted."""
    classes: dict[str, list[str]] = {}
    skipped: list[str] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if entry.name not in keep:
                skipped.append(entry.name)
            continue
        images = []
        for here, dirs, files in os.walk(entry.path, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = Path(here).relative_to(folder).as_posix()
            for f in sorted(files):
                (images if _is_image(f) and not f.startswith(".") else skipped).append(f"{rel}/{f}")
        classes[entry.name] = sorted(images)
    return classes, skipped


def read_classnames(path: Path, folders: list[str], option: str) -> dict[str, str]:
    """A classnames file: one line per class folder, `<folder> <class name>` (a tab instead of the space where the
    folder's name has spaces); every class folder once, nothing else."""
    if not path.is_file():
        raise UserError(f"{path}: classnames file not found ({option}, relative to the dataset folder)")
    names: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        folder, _, name = line.strip().partition("\t" if "\t" in line.strip() else " ")
        folder, name = folder.strip(), name.strip()
        if not name:
            raise UserError(f"{path}:{n}: expected '<class folder> <class name>', got {line.strip()!r}")
        if folder not in folders:
            raise UserError(f"{path}:{n}: {folder!r} is not a class folder (they are: {', '.join(folders)})")
        if folder in names:
            raise UserError(f"{path}:{n}: class folder {folder!r} is named twice")
        names[folder] = name
    missing = [f for f in folders if f not in names]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{path}: no class name for the class folder {missing[0]!r}{more}")
    return names


def _unique(names: dict[str, str], where: Path, dataset: str) -> None:
    """Two classes whose prompts CLIP cannot tell apart: its tokenizer lower-cases text and collapses spaces."""
    seen: dict[str, str] = {}
    for folder, name in names.items():
        if not name.strip():
            raise UserError(f"{dataset}: class folder {folder!r} of {where} gives an empty class name")
        key = " ".join(name.split()).casefold()
        if key in seen:
            raise UserError(f"{dataset}: class folders {seen[key]!r} and {folder!r} of {where} give the same class "
                            f"name {name!r} (case and spaces aside, as CLIP's tokenizer reads it): rename one, or "
                            f"name them in a classnames file")
        seen[key] = folder


def read_folder(spec: DatasetSpec, root: Path, *, name: str, test_fraction: float, classnames: str | None,
                shots: int) -> Partition:
    """The ImageFolder layout at root/spec.folder, partitioned as the module docstring says."""
    folder = Path(root) / spec.folder
    option = f"own_datasets.{name}"
    classes, skipped = scan(folder, {PurePosixPath(classnames).as_posix()} if classnames else set())
    if len(classes) < 2:
        raise UserError(f"{name}: {folder} has {len(classes)} class folder{'s' if len(classes) != 1 else ''}; "
                        f"expected {LAYOUT}, at least two")
    empty = [c for c, images in classes.items() if not images]
    if empty:
        raise UserError(f"{name}: class folder {folder / empty[0]} holds no images (by extension: "
                        f"{', '.join(IMAGE_EXTENSIONS)})" + (f", nor do {len(empty) - 1} more" if len(empty) > 1
                                                             else "") + ": add images or remove it")
    names = (read_classnames(folder / classnames, list(classes), f"{option}.classnames") if classnames
             else {c: clean_classname(c) for c in classes})
    _unique(names, folder, name)
    small = [f"{c!r} ({len(images)})" for c, images in classes.items() if len(images) < shots + 1]
    if small:
        raise UserError(f"{name}: class folder{'s' if len(small) > 1 else ''} {', '.join(small[:5])}"
                        f"{f' and {len(small) - 5} more' if len(small) > 5 else ''} of {folder} "
                        f"{'have' if len(small) > 1 else 'has'} fewer images than data.shots + 1 = {shots + 1} "
                        f"({shots} distinct training shots and a test image): add images, or lower data.shots")
    if skipped:
        log.warning("%s: skipped %d file%s in %s that %s not an image by extension (%s): %s", name, len(skipped),
                    "s" if len(skipped) > 1 else "", folder, "are" if len(skipped) > 1 else "is",
                    ", ".join(IMAGE_EXTENSIONS), ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    links = [p for p in (folder, *(folder / c for c in classes)) if p.is_symlink()]
    if links:
        log.warning("%s: %s is a symbolic link: DVC does not look inside it, so a changed image there will not "
                    "rerun prepare; copy the folder under data.root instead", name, links[0])
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    adjusted = 0
    for label, images in enumerate(classes.values()):
        order = sorted(images, key=lambda p: (partition_key(p), p))
        drawn = sum(partition_key(p) < test_fraction for p in images)
        n_test = max(1, min(drawn, len(images) - shots))
        adjusted += n_test != drawn
        test += [(f"{spec.folder}/{p}", label) for p in order[:n_test]]
        train += sorted((f"{spec.folder}/{p}", label) for p in order[n_test:])
    n = len(train) + len(test)
    print(f"{name}: {n} images in {len(classes)} classes, {len(train)} to draw training shots from and "
          f"{len(test)} to test on (test_fraction {test_fraction})", file=sys.stderr)
    source = (f"{LAYOUT} ({n} images, {len(classes)} classes), partitioned by clip-qlora: a test image is one whose "
              f"SHA-256('{SALT}', NUL, path in the folder), first 8 bytes / 2^64, is below test_fraction "
              f"{test_fraction}, per class kept within 1 and images - data.shots ({shots}) "
              f"({adjusted} class{'es' if adjusted != 1 else ''} adjusted)")
    return Partition([names[c] for c in classes], train, test, source)
