"""Tiny copies of the eight on-disk dataset layouts, written with PIL into a temporary data.root."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clip_qlora.data.registry import DATASETS


@dataclass(frozen=True)
class Layout:
    classes: list[tuple[str, str]]  # (folder name used in image paths, class name as the split file spells it)
    path: str  # image path relative to the image folder; {folder} and {n} (a counter unique per dataset)


LAYOUTS = {
    "eurosat": Layout([("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"), ("SeaLake", "Sea or Lake")],
                      "{folder}/{folder}_{n}.jpg"),
    "dtd": Layout([("banded", "banded"), ("bubbly", "bubbly"), ("zigzagged", "zigzagged")],
                  "{folder}/{folder}_{n:04d}.jpg"),
    "caltech101": Layout([("accordion", "accordion"), ("Faces", "face"), ("wild_cat", "wild_cat")],
                         "{folder}/image_{n:04d}.jpg"),
    "oxford_pets": Layout([("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"),
                           ("yorkshire_terrier", "yorkshire_terrier")], "{folder}_{n}.jpg"),
    "oxford_flowers": Layout([("", "pink_primrose"), ("", "hard-leaved_pocket_orchid"), ("", "globe_thistle")],
                             "image_{n:05d}.jpg"),
    "food101": Layout([("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("sushi", "sushi")],
                      "{folder}/{n}0417.jpg"),
    "fgvc_aircraft": Layout([("", "707-320"), ("", "A300B4"), ("", "Cessna 172")], "{n:07d}.jpg"),
    "ucf101": Layout([("Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Basketball", "Basketball"), ("YoYo", "YoYo")],
                     "{folder}/v_{folder}_g{n:02d}_c01.jpg"),
}

# what the split must call the classes: underscores to spaces, label order
CLASSNAMES = {name: [cls.replace("_", " ") for _, cls in layout.classes] for name, layout in LAYOUTS.items()}

TRAIN_COUNTS = (5, 5, 2)  # the last class has fewer than 4 images, so 4 shots need replacement there
N_VAL, N_TEST = 1, 2


def write_image(path: Path, key: int) -> None:
    """A small JPEG whose size and colour depend on `key` only (so a rebuilt tree has the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (24 + 4 * (key % 5), 18 + 6 * (key % 3))
    Image.new("RGB", size, (40 * (key % 7), 255 - 9 * (key % 29), 13 * (key % 19))).save(path, quality=90)


def build(root: Path, dataset: str, shuffle: int | None = None) -> dict[str, list[list]]:
    """Write the dataset's layout under root; returns {"train"|"val"|"test": [[rel path, label, classname]]}.

    With `shuffle`, the split-file entries and the order images are written in are permuted by that seed.
    """
    spec, layout = DATASETS[dataset], LAYOUTS[dataset]
    rows: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    n = 0
    for label, (folder, name) in enumerate(layout.classes):
        for part, count in [("train", TRAIN_COUNTS[label]), ("val", N_VAL), ("test", N_TEST)]:
            for _ in range(count):
                rows[part].append([layout.path.format(folder=folder, n=n), label, name])
                n += 1
    every = [(rel, label) for part in rows.values() for rel, label, _ in part]
    if shuffle is not None:
        rng = random.Random(shuffle)
        for part in rows.values():
            rng.shuffle(part)
        rng.shuffle(every)
    images = root / spec.folder / spec.image_dir
    for rel, label in every:
        write_image(images / rel, hash_key(rel))
    if dataset == "fgvc_aircraft":
        folder = root / spec.folder
        (folder / "variants.txt").write_text("".join(f"{name}\n" for _, name in layout.classes))
        for part, entries in rows.items():
            text = "".join(f"{rel.removesuffix('.jpg')} {name}\n" for rel, _, name in entries)
            (folder / f"images_variant_{part}.txt").write_text(text)
    else:
        (root / spec.folder / spec.split_file).write_text(json.dumps(rows))
    return rows


def hash_key(text: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(text))


def root_path(dataset: str, rel: str) -> str:
    """An image path of the split file as the prepared split writes it (relative to data.root)."""
    spec = DATASETS[dataset]
    return f"{spec.folder}/{spec.image_dir}/{rel}"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
