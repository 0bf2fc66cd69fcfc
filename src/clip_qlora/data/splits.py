"""Split files: preparing them from a dataset folder, writing, and reading them back validated.

A split file is the whole data contract between stages: class names, prompt template, test list and one
k-shot draw per seed, with image paths relative to data.root. Later stages trust a split only after
`load_split` has checked it, so every problem surfaces as one line naming the file.
"""
from __future__ import annotations

import logging
from pathlib import Path

from clip_qlora.runtime.io import UserError, atomic_dir, read_json, write_json
from clip_qlora.data.decode import open_rgb
from clip_qlora.data.draw import DRAWS, describe, draw_clip_lora, draw_shots
from clip_qlora.data.folder import own_spec
from clip_qlora.data.layouts import escapes
from clip_qlora.data.registry import CLIP_TEMPLATE, DATASETS, DatasetSpec

log = logging.getLogger(__name__)

KEYS = ("dataset", "classnames", "template", "source", "draw", "shots", "test", "train", "replacement")


def _ensure_folder(name: str, spec: DatasetSpec, root: Path, download: bool) -> None:
    folder = root / spec.folder
    if folder.is_dir():
        return
    if spec.fetch is None:
        raise UserError(f"{name}: no data at {folder}, and it cannot be downloaded: place {spec.image_dir}/ and "
                        f"{spec.split_file} at {folder}")
    if not (download or spec.offline):
        raise UserError(f"{name}: no data at {folder}; place {spec.image_dir}/ and {spec.split_file} there "
                        f"(CoOp layout), or set data.download: true to fetch it with torchvision")
    try:
        # built in a temporary folder that replaces `folder` only when complete: an interrupted download
        # leaves no half-filled folder that a later run would take for data
        with atomic_dir(folder) as tmp:
            spec.fetch(spec, tmp)
    except (OSError, RuntimeError) as e:
        raise UserError(f"{name}: could not fetch into {folder} ({e}); place the data there by hand") from None


def _readable(root: Path):
    def check(path: str) -> bool:
        try:
            open_rgb(root / path)
            return True
        except UserError as e:
            log.warning("skipping unreadable training image: %s", e)
            return False
    return check


def _exact_draw(part, shots: int, seed: int, root: Path, dataset: str) -> tuple[list[list], list[str]]:
    try:
        drawn, replaced = draw_clip_lora(part.train, list(part.val), part.classnames, shots, seed)
    except ValueError as e:
        raise UserError(f"{dataset}: class {e.args[0]!r} has no training images") from None
    for path in sorted({p for p, _ in drawn}):
        try:
            open_rgb(root / path)
        except UserError as e:
            # the exact draw cannot step over a file without changing every later draw of the stream
            raise UserError(f"{e} (drawn for seed {seed}; the exact clip_lora draw cannot skip it: replace the "
                            f"file, or set data.split_draw: keyed to draw around unreadable images)") from None
    return drawn, replaced


def prepare_split(dataset: str, root: Path, shots: int, seeds: list[int], download: bool, template: str,
                  draw: str = "clip_lora", own: dict | None = None) -> dict:
    """Read (fetching or generating it first if allowed) `dataset` under `root` and draw `shots` per class per seed.

    `own`: params' own_datasets (name -> entry), the datasets of the user's own besides the built-in ones."""
    own = own or {}
    if dataset not in DATASETS and dataset not in own:
        raise UserError(f"unknown dataset {dataset!r}; known: {', '.join([*DATASETS, *own])}")
    if template not in ("clip", "coop"):
        raise UserError(f"template must be 'clip' or 'coop', got {template!r}")
    if draw not in DRAWS:
        raise UserError(f"split_draw must be one of {', '.join(DRAWS)}, got {draw!r}")
    if type(shots) is not int or shots < 1:
        raise UserError(f"shots must be a positive integer, got {shots!r}")
    if not seeds or any(type(s) is not int for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    root = Path(root)
    if dataset in DATASETS:
        spec = DATASETS[dataset]
        _ensure_folder(dataset, spec, root, download)
    else:
        spec = own_spec(dataset, own[dataset], root, shots)
    part = spec.partition(root)
    train, replacement = {}, {}
    for seed in seeds:
        if draw == "clip_lora":
            train[str(seed)], replacement[str(seed)] = _exact_draw(part, shots, seed, root, dataset)
        else:
            train[str(seed)], replacement[str(seed)] = draw_shots(part.train, part.classnames, shots, seed,
                                                                 _readable(root), dataset)
    _warn_replacement(dataset, shots, replacement)
    split = {
        "dataset": dataset,
        "classnames": part.classnames,
        "template": CLIP_TEMPLATE if template == "clip" else spec.coop_template,
        "source": part.source,
        "draw": describe(draw, shots, bool(part.val)),
        "shots": shots,
        # sorted so the split does not depend on the order of the dataset's own files
        "test": [[path, label] for path, label in sorted(part.test, key=lambda e: (e[1], e[0]))],
        "train": train,
        "replacement": replacement,  # per seed, the classes with fewer than `shots` images (drawn with replacement)
    }
    listed_in = root / spec.folder / spec.split_file  # an own dataset partitioned here: its folder
    validate(split, root, str(listed_in))  # every listed file exists
    _check_test_images(root, part.test, f"remove it from the test list of {listed_in}" if spec.split_file else
                       f"delete it from {listed_in}", dataset)
    return split


def _warn_replacement(dataset: str, shots: int, replacement: dict[str, list[str]]) -> None:
    classes = sorted({name for names in replacement.values() for name in names})
    if classes:
        shown = ", ".join(classes[:6]) + (f" and {len(classes) - 6} more" if len(classes) > 6 else "")
        log.warning("%s: %d of its classes have fewer training images than data.shots = %d, so their shots are "
                    "drawn with replacement (repeated images): %s (the split file's 'replacement' lists them)",
                    dataset, len(classes), shots, shown)


def _check_test_images(root: Path, test: list[tuple[str, int]], fix: str, dataset: str) -> None:
    """Every test image must open (PIL reads the header, and a PNG's chunk checksums): a damaged one found here
    stops prepare, not evaluation after all the training. The pixels are decoded only when evaluated.

    An image larger than PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, 179 M pixels) counts as
    damaged: every decoding path (PIL, or the fast path, whose test images all passed here) sees only images
    below it. EXIF orientation is counted, not applied: both decoding paths use the pixels as stored, as
    CLIP-LoRA's loader and torchvision's ImageFolder do."""
    from PIL import Image  # here, not at the top: checking params imports the data layer and needs no PIL

    bad, turned = [], 0
    for path, _ in test:
        try:
            with Image.open(root / path) as image:
                turned += exif_orientation(image) != 1
                image.verify()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((root / path, e))
    if bad:
        (first, why), more = bad[0], len(bad) - 1
        raise UserError(f"{first}: test image cannot be opened ({why})" + (f", and {more} more" if more else "")
                        + f"; replace it (or {fix}) and rerun prepare")
    if turned:
        log.warning("%s: %d test image%s an EXIF orientation tag that asks for a rotation or flip; as CLIP-LoRA "
                    "and torchvision's ImageFolder do, the pixels are used as stored, not turned (rotate the files "
                    "themselves if their content lies on its side)", dataset, turned,
                    " carries" if turned == 1 else "s carry")


def exif_orientation(image) -> int:
    """The EXIF orientation tag of an opened image (1, upright, when absent), read without decoding pixels."""
    from PIL import Image

    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except (OSError, ValueError, SyntaxError):  # a damaged EXIF block: the pixels may still be fine
        return 1
    return exif.get(0x0112, 1)


def write_split(path: Path, split: dict) -> None:
    write_json(path, split)


def load_split(path: Path, root: Path) -> dict:
    return validate(read_json(path), Path(root), str(path))


def class_prompts(split: dict) -> list[str]:
    return [split["template"].format(name) for name in split["classnames"]]


def zero_shot_templates(dataset: str, own: dict) -> dict[str, str]:
    """The two prompt sets the zero-shot row is reported with, by data.template name: an own dataset's declared
    template takes the place of CoOp's (the report says so)."""
    return {"clip": CLIP_TEMPLATE, "coop": DATASETS[dataset].coop_template if dataset in DATASETS
            else own[dataset].template}


def _is_label(x) -> bool:
    return type(x) is int  # bool is an int subclass, and JSON 1.0 is not a label


def validate(split, root: Path, where: str) -> dict:
    """Check structure, paths and labels; raise one line naming `where` on the first problem."""
    if not isinstance(split, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(split).__name__}")
    missing = [k for k in KEYS if k not in split]
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
    names = split["classnames"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise UserError(f"{where}: 'classnames' must be a non-empty list of strings")
    if not (isinstance(split["template"], str) and "{}" in split["template"]):
        raise UserError(f"{where}: 'template' must be a string containing {{}}")
    if not isinstance(split["draw"], str):
        raise UserError(f"{where}: 'draw' must be a string saying how the shots were drawn")
    if not (_is_label(split["shots"]) and split["shots"] >= 1):
        raise UserError(f"{where}: 'shots' must be a positive integer")
    if not (isinstance(split["train"], dict) and split["train"]):
        raise UserError(f"{where}: 'train' must map each seed to a list of [path, label]")
    if not isinstance(split["replacement"], dict):
        raise UserError(f"{where}: 'replacement' must map each seed to a list of class names")
    lists = [("test", split["test"])] + [(f"train[{seed}]", rows) for seed, rows in split["train"].items()]
    seen: set[str] = set()
    for name, rows in lists:
        if not isinstance(rows, list):
            raise UserError(f"{where}: '{name}' must be a list of [path, label]")
        for entry in rows:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and _is_label(entry[1])):
                raise UserError(f"{where}: {name} entry {entry!r} is not [path, label]")
            path, label = entry
            if escapes(path):
                raise UserError(f"{where}: image path {path!r} is outside data.root (absolute or containing '..')")
            if not 0 <= label < len(names):
                raise UserError(f"{where}: label {label} of {path!r} is out of range 0..{len(names) - 1}")
            if path not in seen:
                if not (root / path).is_file():
                    raise UserError(f"{where}: image {root / path} does not exist")
                seen.add(path)
    return split
