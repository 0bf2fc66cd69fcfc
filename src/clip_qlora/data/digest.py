"""Digests of the images a split lists, written beside the split file for DVC to depend on.

A split lists image paths, not their contents: an image replaced under the same name reruns prepare (its deps
hold the whole data.root) but leaves the split file byte for byte the same, so DVC would keep every stage after
it. Each split therefore has two digests, one over the images training reads (every seed's shots) and one over
those evaluation reads (the test list): train depends on the first, evaluate on the second, so a changed test
image re-evaluates without retraining, and a changed training image that is not a test image retrains only.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from clip_qlora.runtime.io import UserError, write_text

PARTS = ("train", "test")


def digest_path(split_file: Path, part: str) -> Path:
    """`data/splits/<dataset>.json` -> `data/splits/<dataset>.<part>.sha256` (dvc.yaml names the same files)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    return Path(split_file).with_suffix(f".{part}.sha256")


def listed_images(split: dict, part: str) -> list[str]:
    """The distinct image paths the split lists for `part`, sorted (a shot drawn by several seeds counts once)."""
    if part == "test":
        rows = split["test"]
    elif part == "train":
        rows = [row for seed_rows in split["train"].values() for row in seed_rows]
    else:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    return sorted({path for path, _ in rows})


def images_digest(root: Path, paths: list[str]) -> str:
    """SHA-256 over each (relative path, bytes) in order. Each field is length-prefixed, so no two different
    lists of files (a byte moved from one file's end to the next one's start, a renamed file) hash alike."""
    h = hashlib.sha256()
    for path in paths:
        name = path.encode()
        try:
            data = (Path(root) / path).read_bytes()
        except OSError as e:
            raise UserError(f"{Path(root) / path}: cannot read it ({e.strerror or e}); the split lists it") from None
        for field in (name, data):
            h.update(len(field).to_bytes(8, "big"))
            h.update(field)
    return h.hexdigest()


def split_digests(split: dict, root: Path) -> dict[str, str]:
    return {part: images_digest(root, listed_images(split, part)) for part in PARTS}


def write_digests(split_file: Path, split: dict, root: Path) -> dict[str, str]:
    """Write `<dataset>.train.sha256` and `<dataset>.test.sha256` beside the split file (each atomically)."""
    digests = split_digests(split, root)
    for part, digest in digests.items():
        write_text(digest_path(split_file, part), digest + "\n")
    return digests
