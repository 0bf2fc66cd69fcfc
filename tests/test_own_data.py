"""A dataset of the user's own (params.yaml own_datasets): the ImageFolder reader, its partition, its bad input,
and the image kinds a user's folder holds, decoded alike on the CPU (PIL) and device (torchvision) paths.

Small generated images only (seconds); the real-image run through `dvc repro` is in tests/test_pipeline.py."""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_qlora import config
from clip_qlora.data.decode import open_rgb
from clip_qlora.data.splits import class_prompts, load_split, prepare_split, zero_shot_templates
from clip_qlora.runtime.io import UserError

NAME = "mine"
TEMPLATE = "a close-up photo of a {}."


def own(folder: str = NAME, test_fraction: float = 0.5, classnames=None, template: str = TEMPLATE) -> dict:
    """own_datasets as the stages get it: through params validation."""
    entry = {"folder": folder, "template": template, "test_fraction": test_fraction, "classnames": classnames}
    return config.load_with({"own_datasets": {NAME: entry}, "datasets": [NAME]}).own_datasets


def write(path: Path, key: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8 + key % 5, 6 + key % 3), (37 * key % 256, 91 * key % 256, 53 * key % 256)).save(path, fmt)


def layout(root: Path, counts: dict[str, int], folder: str = NAME) -> dict[str, list[str]]:
    """One subfolder per class under root/folder; {class folder: image paths relative to the dataset folder}."""
    out = {}
    for c, n in counts.items():
        out[c] = [f"{c}/img_{k:03d}.png" for k in range(n)]
        for k, rel in enumerate(out[c]):
            write(root / folder / rel, hash(rel) % 97 + k)
    return out


def prepare(root: Path, shots: int = 2, template: str = "coop", draw: str = "keyed", **kw) -> dict:
    return prepare_split(NAME, root, shots, [1, 2], download=False, template=template, draw=draw, own=own(**kw))


def key(rel: str) -> float:
    """The documented rule, written out again: SHA-256 of the salt, NUL and the path; 8 bytes over 2^64."""
    return int.from_bytes(hashlib.sha256(f"clip-qlora own-dataset partition\0{rel}".encode()).digest()[:8],
                          "big") / 2**64


def test_a_folder_per_class_is_a_dataset(tmp_path):
    images = layout(tmp_path, {"golden_retriever": 9, "Beagle": 8, "tabby_cat": 10})
    split = prepare(tmp_path, shots=2)
    assert split["dataset"] == NAME
    assert split["classnames"] == ["Beagle", "golden retriever", "tabby cat"]  # sorted folders, as ImageFolder
    assert split["template"] == TEMPLATE and class_prompts(split)[1] == "a close-up photo of a golden retriever."
    assert zero_shot_templates(NAME, own()) == {"clip": "a photo of a {}.", "coop": TEMPLATE}
    assert prepare(tmp_path, template="clip")["template"] == "a photo of a {}."
    # every image once, in its own class, the test list as the documented rule says (no class bound binds here)
    labels = {c: i for i, c in enumerate(sorted(images))}
    expected = sorted((f"{NAME}/{rel}", labels[c]) for c, rels in images.items() for rel in rels if key(rel) < 0.5)
    assert sorted(map(tuple, split["test"])) == expected
    for seed in ("1", "2"):
        assert Counter(label for _, label in split["train"][seed]) == {0: 2, 1: 2, 2: 2}
        assert not {p for p, _ in split["train"][seed]} & {p for p, _ in split["test"]}
    assert "test_fraction 0.5" in split["source"] and "SHA-256" in split["source"]
    write_and_load = tmp_path / "split.json"
    write_and_load.write_text(json.dumps(split))
    assert load_split(write_and_load, tmp_path) == split


def test_adding_images_moves_no_other_image(tmp_path):
    images = layout(tmp_path, {"a": 12, "b": 12})
    before = prepare(tmp_path)
    for c in images:  # a new image in each class, and one in a subfolder
        write(tmp_path / NAME / c / "new.png", 3)
        write(tmp_path / NAME / c / "more" / "deep.png", 4)
    after = prepare(tmp_path)
    old = {f"{NAME}/{rel}" for rels in images.values() for rel in rels}
    test_before = {p for p, _ in before["test"]}
    test_after = {p for p, _ in after["test"]}
    assert test_after & old == test_before
    added = [f"{c}/{n}" for c in images for n in ("new.png", "more/deep.png")]
    assert test_after - old == {f"{NAME}/{rel}" for rel in added if key(rel) < 0.5}


def test_the_partition_depends_on_the_path_in_the_folder_only(tmp_path):
    """The same images under another dataset folder (or data.root) are partitioned alike."""
    layout(tmp_path / "a", {"x": 9, "y": 9}, folder="one")
    layout(tmp_path / "b", {"x": 9, "y": 9}, folder="sub/two")
    first = prepare(tmp_path / "a", folder="one")
    second = prepare(tmp_path / "b", folder="sub/two/")
    assert [p.removeprefix("one/") for p, _ in first["test"]] == [p.removeprefix("sub/two/") for p, _ in
                                                                    second["test"]]


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_each_class_keeps_a_test_image_and_its_shots(tmp_path, fraction):
    layout(tmp_path, {"a": 5, "b": 9, "c": 30})
    split = prepare(tmp_path, shots=4, test_fraction=fraction)
    tested = Counter(label for _, label in split["test"])
    assert set(tested) == {0, 1, 2} and min(tested.values()) >= 1
    for label, n in enumerate((5, 9, 30)):
        assert n - tested[label] >= 4  # distinct training images for every shot
    assert split["replacement"] == {"1": [], "2": []}
    if fraction > 0.5:
        assert dict(tested) == {0: 1, 1: 5, 2: 26}  # n - shots: the bound binds in every class


def test_a_class_with_too_few_images_is_refused_with_the_counts(tmp_path):
    layout(tmp_path, {"a": 9, "b": 4, "c": 2})
    with pytest.raises(UserError) as e:
        prepare(tmp_path, shots=4)
    message = str(e.value)
    assert "\n" not in message
    assert "'b' (4), 'c' (2)" in message and "data.shots + 1 = 5" in message and "'a'" not in message


def test_empty_class_folder_is_refused(tmp_path):
    layout(tmp_path, {"a": 9, "b": 9})
    (tmp_path / NAME / "c").mkdir()
    (tmp_path / NAME / "c" / "readme.txt").write_text("nothing here")
    with pytest.raises(UserError, match=rf"mine: class folder {tmp_path / NAME / 'c'} holds no images .*\.webp\)"):
        prepare(tmp_path)


def test_non_images_are_skipped_and_counted(tmp_path, caplog):
    layout(tmp_path, {"a": 9, "b": 9})
    (tmp_path / NAME / "a" / "notes.txt").write_text("x")
    (tmp_path / NAME / "b" / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / NAME / "README.md").write_text("my data")
    (tmp_path / NAME / "names.txt").write_text("a apple\nb banana\n")
    (tmp_path / NAME / ".ipynb_checkpoints" / "x").mkdir(parents=True)  # hidden: not a class
    write(tmp_path / NAME / "a" / ".hidden" / "copy.png", 1)  # hidden: not looked at
    write(tmp_path / NAME / "b" / "UPPER.JPG", 2, "JPEG")  # extensions are case-blind
    with caplog.at_level(logging.WARNING):
        split = prepare(tmp_path, classnames="names.txt")
    assert split["classnames"] == ["apple", "banana"]
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 3 files" in warnings[0], warnings
    assert "README.md, a/notes.txt, b/Thumbs.db" in warnings[0]
    assert "(19 images, 2 classes)" in split["source"]  # 9 + 9 + UPPER.JPG; nothing hidden


@pytest.mark.parametrize("folders,clash", [(["dog_1", "dog 1"], "'dog 1' and 'dog_1'"),
                                           (["Cat", "cat"], "'Cat' and 'cat'")])
def test_class_names_clip_cannot_tell_apart_are_refused(tmp_path, folders, clash):
    layout(tmp_path, {f: 5 for f in [*folders, "other"]})
    with pytest.raises(UserError) as e:
        prepare(tmp_path)
    assert clash in str(e.value) and "classnames file" in str(e.value)


CLASSNAMES = [
    ("a apple\n", "no class name for the class folder 'b'"),
    ("a apple\nb banana\nc cherry\n", "names.txt:3: 'c' is not a class folder (they are: a, b)"),
    ("a apple\na avocado\nb banana\n", "names.txt:2: class folder 'a' is named twice"),
    ("a\nb banana\n", "names.txt:1: expected '<class folder> <class name>', got 'a'"),
    ("a fruit\nb Fruit\n", "give the same class name"),
]


@pytest.mark.parametrize("text,fragment", CLASSNAMES)
def test_a_bad_classnames_file_is_named(tmp_path, text, fragment):
    layout(tmp_path, {"a": 5, "b": 5})
    (tmp_path / NAME / "names.txt").write_text(text)
    with pytest.raises(UserError) as e:
        prepare(tmp_path, classnames="names.txt")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_classnames_file_with_a_tab_for_folders_with_spaces(tmp_path):
    layout(tmp_path, {"red fox": 5, "b": 5})
    (tmp_path / NAME / "names.txt").write_text("red fox\tVulpes vulpes\nb\tbadger\n")
    assert prepare(tmp_path, classnames="names.txt")["classnames"] == ["badger", "Vulpes vulpes"]  # folder order
    with pytest.raises(UserError, match=r"classnames file not found \(own_datasets\.mine\.classnames"):
        prepare(tmp_path, classnames="nope.txt")


def test_a_coop_split_file_in_the_folder_is_the_partition(tmp_path):
    images = layout(tmp_path, {"a_b": 4, "c": 4})
    rows = {"train": [[rel, i, c] for i, c in enumerate(images) for rel in images[c][:3]],
            "test": [[images[c][3], i, c] for i, c in enumerate(images)]}
    (tmp_path / NAME / "split_zhou_Mine.json").write_text(json.dumps(rows))
    split = prepare(tmp_path, shots=2, draw="clip_lora")
    assert split["source"] == "split_zhou_Mine.json" and split["classnames"] == ["a b", "c"]
    assert split["test"] == [[f"{NAME}/a_b/img_003.png", 0], [f"{NAME}/c/img_003.png", 1]]
    (tmp_path / NAME / "split_zhou_Other.json").write_text(json.dumps(rows))
    with pytest.raises(UserError, match="holds 2 CoOp split files .*: keep one"):
        prepare(tmp_path)


def test_an_unreadable_test_image_is_named(tmp_path):
    images = layout(tmp_path, {"a": 9, "b": 9})
    bad = next(rel for rel in images["a"] if key(rel) < 0.5)
    (tmp_path / NAME / bad).write_text("not a picture")
    with pytest.raises(UserError) as e:
        prepare(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / NAME / bad}: test image cannot be opened")
    assert str(e.value).endswith(f"replace it (or delete it from {tmp_path / NAME}) and rerun prepare")


def test_an_image_past_pils_decompression_limit_is_refused_naming_it(tmp_path, monkeypatch):
    """Decided: PIL's own limit holds (above 2 x MAX_IMAGE_PIXELS, 179 M pixels, a file is refused), here scaled
    down: prepare opens every test image with PIL, so no decoding path meets a larger one."""
    images = layout(tmp_path, {"a": 9, "b": 9})
    big = next(rel for rel in images["b"] if key(rel) < 0.5)
    Image.new("RGB", (300, 200)).save(tmp_path / NAME / big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 300 x 200 > 2 x 10,000; the others are tiny
    with pytest.raises(UserError, match=rf"^{tmp_path / NAME / big}: test image cannot be opened \(.*decompression"):
        prepare(tmp_path)


def test_missing_folder_and_too_few_classes(tmp_path):
    with pytest.raises(UserError, match=r"mine: no folder .*mine \(own_datasets\.mine\.folder, under data\.root\)"):
        prepare(tmp_path)
    layout(tmp_path, {"only": 9})
    with pytest.raises(UserError, match="has 1 class folder; expected one subfolder of images per class, at least two"):
        prepare(tmp_path)


def test_a_symlinked_folder_is_read_and_warned_about(tmp_path, caplog):
    """DVC does not look inside a symlinked folder under data.root: prepare says so."""
    layout(tmp_path / "elsewhere", {"a": 5, "b": 5})
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / NAME).symlink_to(tmp_path / "elsewhere" / NAME)
    with caplog.at_level(logging.WARNING):
        split = prepare(tmp_path / "root")
    assert len(split["test"]) >= 2
    assert any("symbolic link: DVC does not look inside it" in r.getMessage() for r in caplog.records)


# ---- image kinds: the same RGB on the CPU path (PIL) and the device path (torchvision's decode_jpeg) -----------

def _photo(w: int = 40, h: int = 24) -> Image.Image:
    rng = np.random.default_rng(w * h)
    small = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    return small.resize((w, h), Image.BICUBIC)


def _kinds(folder: Path) -> list[str]:
    """Files of each colour mode a user's folder may hold, JPEG and PNG; their names."""
    photo = _photo()
    rgba = photo.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    palette_alpha = photo.quantize(16)
    palette_alpha.info["transparency"] = 3
    files = {"grey.jpg": photo.convert("L"), "cmyk.jpg": photo.convert("CMYK"), "rgb.jpg": photo,
             "rgba.png": rgba, "grey_alpha.png": rgba.convert("LA"), "palette_alpha.png": palette_alpha,
             "grey16.png": Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)}
    for name, image in files.items():
        image.save(folder / name, quality=90) if name.endswith(".jpg") else image.save(folder / name)
    return list(files)


def _decoded_on_device_path(paths: list[Path]) -> list[torch.Tensor]:
    from torchvision.io import decode_jpeg, read_file

    from clip_qlora.data.images import _decode_many

    return _decode_many([read_file(str(p)) for p in paths], paths, "cpu", decode_jpeg)


def _pil(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(open_rgb(path)).copy()).permute(2, 0, 1)


def test_every_colour_mode_becomes_the_same_rgb_on_both_paths(tmp_path):
    """Grey and CMYK JPEGs (decoded by torchvision's decode_jpeg on the device path, in RGB mode), RGBA,
    grey+alpha, palette with transparency and 16-bit PNGs (PIL on both): the very same pixels as PIL's
    `convert("RGB")`, which drops alpha without compositing. On CUDA nvJPEG refuses CMYK and the path falls back
    to PIL (benchmarks/gpu_checks.py checks the GPU)."""
    names = _kinds(tmp_path)
    paths = [tmp_path / n for n in names]
    for name, image in zip(names, _decoded_on_device_path(paths)):
        reference = _pil(tmp_path / name)
        assert image.shape == reference.shape == (3, 24, 40), name
        assert torch.equal(image, reference), name
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK" and Image.open(tmp_path / "grey.jpg").mode == "L"


def test_exif_orientation_is_not_applied_on_either_path(tmp_path, caplog):
    """Decided: pixels as stored (CLIP-LoRA's loader and torchvision's ImageFolder do not turn them, nor does
    decode_jpeg by default); prepare counts the test images whose tag asks for a turn."""
    photo = _photo(40, 24)
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "turned.jpg"
    photo.save(path, quality=90, exif=exif.tobytes())
    assert open_rgb(path).size == (40, 24)
    [device] = _decoded_on_device_path([path])
    assert device.shape == (3, 24, 40) and torch.equal(device, _pil(path))
    # training decodes with PIL too
    from clip_qlora.data.images import decode_for_training

    assert torch.equal(decode_for_training(path, 0), _pil(path))

    images = layout(tmp_path, {"a": 9, "b": 9})
    tested = [rel for rels in images.values() for rel in rels if key(rel) < 0.5]
    for rel in tested[:2]:
        photo.save(tmp_path / NAME / rel, format="PNG", exif=exif.tobytes())
    with caplog.at_level(logging.WARNING):
        prepare(tmp_path)
    turned = [r.getMessage() for r in caplog.records if "EXIF orientation" in r.getMessage()]
    assert len(turned) == 1 and turned[0].startswith("mine: 2 test images carry an EXIF orientation tag"), turned
