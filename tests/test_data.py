"""The data layer against small copies of every on-disk layout (no network, no real datasets)."""
from __future__ import annotations

import json
import random
import logging
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision.datasets

from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from clip_qlora.data.images import RATIO, SCALE, TrainImages, augment, crop_params, eval_loader, load_train_images
from clip_qlora.data.digest import digest_path, images_digest, listed_images, split_digests, write_digests
from clip_qlora.data.registry import DATASETS, DatasetSpec
from clip_qlora.data.splits import class_prompts, load_split, prepare_split, write_split
from clip_qlora.runtime.io import UserError

from data_fixtures import (CLASSNAMES, LAYOUTS, N_TEST, TRAIN_COUNTS, build, hash_key, root_path, truncate,
                           write_image)

LAYOUT_NAMES = list(LAYOUTS)
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def prepare(root: Path, dataset: str, shots: int = 4, seeds=(1, 2), template: str = "clip",
            draw: str = "clip_lora") -> dict:
    return prepare_split(dataset, root, shots, list(seeds), download=False, template=template, draw=draw)


def test_registry_has_every_dataset():
    assert set(DATASETS) == {"eurosat", "dtd", "caltech101", "oxford_pets", "oxford_flowers", "food101",
                             "fgvc_aircraft", "ucf101", "shapes"}
    assert set(LAYOUTS) == set(DATASETS) - {"shapes"}


@pytest.mark.parametrize("dataset", LAYOUT_NAMES)
def test_reads_layout_and_draws_k_shots(tmp_path, dataset):
    rows = build(tmp_path, dataset)
    split = prepare(tmp_path, dataset)
    assert split["dataset"] == dataset
    assert split["classnames"] == CLASSNAMES[dataset]
    assert split["template"] == "a photo of a {}."
    assert split["source"] == DATASETS[dataset].split_file
    assert split["shots"] == 4
    assert sorted(map(tuple, split["test"])) == sorted((root_path(dataset, rel), label)
                                                       for rel, label, _ in rows["test"])
    train_by_class = {label: {root_path(dataset, rel) for rel, lab, _ in rows["train"] if lab == label}
                      for label in range(3)}
    for seed in ("1", "2"):
        drawn = split["train"][seed]
        assert [label for _, label in drawn] == [0] * 4 + [1] * 4 + [2] * 4
        for label in range(3):
            paths = [path for path, lab in drawn if lab == label]
            assert set(paths) <= train_by_class[label]  # never val or test images
            # k distinct where the class has k, all of them (repeated) where it has fewer
            assert len(set(paths)) == min(4, TRAIN_COUNTS[label])
        assert split["replacement"][seed] == [CLASSNAMES[dataset][2]]
    assert split["train"]["1"] != split["train"]["2"]


COOP_FIRST_PROMPT = {
    "eurosat": "a centered satellite photo of Annual Crop Land.",
    "dtd": "banded texture.",
    "caltech101": "a photo of a accordion.",
    "oxford_pets": "a photo of a abyssinian, a type of pet.",
    "oxford_flowers": "a photo of a pink primrose, a type of flower.",
    "food101": "a photo of apple pie, a type of food.",
    "fgvc_aircraft": "a photo of a 707-320, a type of aircraft.",
    "ucf101": "a photo of a person doing Apply Eye Makeup.",
}


@pytest.mark.parametrize("dataset", LAYOUT_NAMES)
def test_both_templates(tmp_path, dataset):
    build(tmp_path, dataset)
    clip = class_prompts(prepare(tmp_path, dataset, template="clip"))
    coop = class_prompts(prepare(tmp_path, dataset, template="coop"))
    assert clip == [f"a photo of a {name}." for name in CLASSNAMES[dataset]]
    assert coop[0] == COOP_FIRST_PROMPT[dataset]
    assert len(coop) == 3


@pytest.mark.parametrize("dataset", LAYOUT_NAMES)
def test_keyed_split_is_reproducible_and_independent_of_listing_order(tmp_path, dataset):
    plain = build(tmp_path / "a", dataset)
    shuffled = build(tmp_path / "b", dataset, shuffle=7)
    assert plain["train"] != shuffled["train"]  # the second tree really lists things in another order
    first = prepare(tmp_path / "a", dataset, draw="keyed")
    assert prepare(tmp_path / "a", dataset, draw="keyed") == first
    assert prepare(tmp_path / "b", dataset, draw="keyed") == first
    assert first["draw"].startswith("keyed")


def reference_clip_lora_draw(train, val, shots, seed):
    """CLIP-LoRA's procedure as protocol.md states it, on the module-level generator as its code uses it."""
    def fewshot(items, k):
        tracker = {}
        for item in items:
            tracker.setdefault(item[1], []).append(item)
        out = []
        for items_of_label in tracker.values():
            if len(items_of_label) >= k:
                out.extend(random.sample(items_of_label, k))
            else:
                out.extend(random.choices(items_of_label, k=k))
        return out

    state = random.getstate()
    random.seed(seed)
    fewshot(val, min(shots, 4))
    drawn = fewshot(train, shots)
    random.setstate(state)
    return [[path, label] for path, label in drawn]


@pytest.mark.parametrize("dataset", ["dtd", "fgvc_aircraft", "oxford_pets"])
@pytest.mark.parametrize("shots", [1, 4, 6])
def test_clip_lora_draw_is_theirs(tmp_path, dataset, shots):
    rows = build(tmp_path, dataset, shuffle=3)  # file order not grouped by class: first appearance matters
    split = prepare(tmp_path, dataset, shots=shots, seeds=[1, 2, 3])
    as_read = {part: [(root_path(dataset, rel), label) for rel, label, _ in rows[part]] for part in rows}
    for seed in (1, 2, 3):
        assert split["train"][str(seed)] == reference_clip_lora_draw(as_read["train"], as_read["val"], shots, seed)
    assert split["draw"].startswith("clip_lora") and "validation shots" in split["draw"]
    counts = Counter(label for _, label, _ in rows["train"])
    assert split["replacement"]["1"] == [CLASSNAMES[dataset][lab] for lab in sorted(counts) if counts[lab] < shots]


def test_clip_lora_draw_consumes_the_generator_on_val_first(tmp_path):
    rows = build(tmp_path, "dtd")
    as_read = {part: [(root_path("dtd", rel), label) for rel, label, _ in rows[part]] for part in rows}
    split = prepare(tmp_path, "dtd", shots=2, seeds=[1, 2, 3, 4])
    without_val = [reference_clip_lora_draw(as_read["train"], [], 2, s) for s in (1, 2, 3, 4)]
    assert [split["train"][str(s)] for s in (1, 2, 3, 4)] != without_val


def test_clip_lora_draw_follows_the_split_files_order(tmp_path):
    build(tmp_path / "a", "dtd")
    build(tmp_path / "b", "dtd", shuffle=7)
    a = [prepare(tmp_path / "a", "dtd", shots=2, seeds=[s])["train"][str(s)] for s in range(1, 5)]
    assert a == [prepare(tmp_path / "a", "dtd", shots=2, seeds=[s])["train"][str(s)] for s in range(1, 5)]
    assert a != [prepare(tmp_path / "b", "dtd", shots=2, seeds=[s])["train"][str(s)] for s in range(1, 5)]


def test_a_partition_without_val_says_so_in_the_split(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "Food101", FakeFood101)
    split = prepare_split("food101", tmp_path, 4, [1], download=True, template="clip")
    assert "no 'val' list" in split["draw"] and "torchvision Food101" in split["source"]


def test_no_replacement_when_every_class_has_k(tmp_path):
    build(tmp_path, "dtd")
    split = prepare(tmp_path, "dtd", shots=2, seeds=[0, 1, 5])
    for seed in ("0", "1", "5"):
        assert split["replacement"][seed] == []
        paths = [path for path, _ in split["train"][seed]]
        assert len(paths) == len(set(paths)) == 6


def test_write_and_load_split_round_trip(tmp_path):
    build(tmp_path, "oxford_pets")
    split = prepare(tmp_path, "oxford_pets")
    write_split(tmp_path / "out" / "split.json", split)
    assert load_split(tmp_path / "out" / "split.json", tmp_path) == split
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "split.json"]  # no temporary left over


def test_image_digests_follow_the_bytes_of_the_listed_images_only(tmp_path):
    """An image replaced under the same name leaves the split file byte for byte the same; the train digest
    changes with a drawn shot's bytes only, the test digest with a test image's only, and an image the split
    does not list (an undrawn training image, a val image) changes neither."""
    rows = build(tmp_path, "eurosat")
    split = prepare(tmp_path, "eurosat")
    write_split(tmp_path / "before.json", split)
    written = write_digests(tmp_path / "before.json", split, tmp_path)
    assert written == split_digests(split, tmp_path)
    for part in ("train", "test"):
        assert (tmp_path / f"before.{part}.sha256").read_text() == written[part] + "\n"
        assert digest_path(tmp_path / "before.json", part) == tmp_path / f"before.{part}.sha256"

    shots, tests = listed_images(split, "train"), listed_images(split, "test")
    assert shots == sorted({p for rows_ in split["train"].values() for p, _ in rows_}) and not set(shots) & set(tests)
    every = {root_path("eurosat", rel) for part in rows.values() for rel, _, _ in part}
    unlisted = sorted(every - set(shots) - set(tests))
    assert unlisted  # the fixture has undrawn training images and val images

    def replace(path: str) -> None:
        before = (tmp_path / path).read_bytes()
        write_image(tmp_path / path, hash_key(path) + 1)  # another readable image under the same name
        assert (tmp_path / path).read_bytes() != before

    def digests_after(path: str) -> dict[str, str]:
        replace(path)
        again = prepare(tmp_path, "eurosat")
        write_split(tmp_path / "after.json", again)
        assert (tmp_path / "after.json").read_bytes() == (tmp_path / "before.json").read_bytes()
        return split_digests(again, tmp_path)

    was = written
    for path, changed in [(shots[0], {"train"}), (tests[-1], {"test"}), (unlisted[0], set())]:
        now = digests_after(path)
        assert {part for part in now if now[part] != was[part]} == changed, path
        was = now


def test_image_digest_tells_where_each_name_and_file_ends(tmp_path):
    """Names and bytes are length-prefixed: one file "a" holding b"bcx" and two files "a" (empty) and "bc"
    (b"x") concatenate alike, and must not hash alike; a renamed file changes the digest too."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "a").write_bytes(b"bcx")
    (two / "a").write_bytes(b"")
    (two / "bc").write_bytes(b"x")
    assert images_digest(one, ["a"]) != images_digest(two, ["a", "bc"])
    before = images_digest(one, ["a"])
    (one / "a").rename(one / "b")
    assert images_digest(one, ["b"]) != before
    with pytest.raises(UserError, match=f"^{one / 'a'}: cannot read it"):
        images_digest(one, ["a"])


def test_load_train_images_keeps_each_image_whole(tmp_path):
    build(tmp_path, "caltech101")
    split = prepare(tmp_path, "caltech101")
    images = load_train_images(split, 2, tmp_path, 448)
    paths = [path for path, _ in split["train"]["2"]]
    assert images.pixels.dtype == torch.uint8 and len(images) == 12
    assert images.labels.dtype == torch.int64
    assert images.labels.tolist() == [label for _, label in split["train"]["2"]]
    for k, path in enumerate(paths):  # below the cap: exactly the decoded file, padding left at zero
        whole = v2.PILToTensor()(Image.open(tmp_path / path).convert("RGB"))
        h, w = images.sizes[k]
        assert (h, w) == tuple(whole.shape[1:])
        assert torch.equal(images.pixels[k, :, :h, :w], whole)
        assert not images.pixels[k, :, h:].any() and not images.pixels[k, :, :, w:].any()
    # the class with 2 images was drawn with replacement: a repeated path decodes to the same pixels
    repeated = Counter(paths).most_common(1)[0][0]
    i, j = [k for k, path in enumerate(paths) if path == repeated][:2]
    assert torch.equal(images.pixels[i], images.pixels[j])
    assert images.nbytes == images.pixels.numel()
    with pytest.raises(UserError, match="seed 9"):
        load_train_images(split, 9, tmp_path, 448)


def test_large_images_are_brought_down_to_the_cap_whole(tmp_path):
    Image.new("RGB", (600, 400), (200, 10, 10)).save(tmp_path / "wide.png")
    Image.new("RGB", (300, 900), (10, 200, 10)).save(tmp_path / "tall.png")
    split = {"dataset": "x", "train": {"1": [["wide.png", 0], ["tall.png", 1]]}}
    images = load_train_images(split, 1, tmp_path, 200)
    assert images.sizes == [(200, 300), (600, 200)]  # shorter side 200, aspect kept, nothing cropped
    assert tuple(images.pixels.shape) == (2, 3, 600, 300)
    assert load_train_images(split, 1, tmp_path, 0).sizes == [(400, 600), (900, 300)]  # 0: full resolution


@pytest.mark.parametrize("height,width", [(224, 224), (375, 500), (500, 333), (64, 64), (20, 300), (300, 20)])
def test_crop_boxes_are_torchvisions_draw_for_draw(height, width):
    from torchvision.transforms import RandomResizedCrop

    for seed in range(200):
        torch.manual_seed(seed)
        theirs = RandomResizedCrop.get_params(torch.empty(3, height, width), list(SCALE), list(RATIO))
        assert crop_params(height, width, torch.Generator().manual_seed(seed)) == tuple(theirs)


def test_every_pixel_of_the_whole_image_is_reachable():
    height, width = 30, 40  # stored in a larger canvas: boxes must stay inside the image, and reach all of it
    gen = torch.Generator().manual_seed(0)
    covered = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(3000):
        top, left, h, w = crop_params(height, width, gen)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        covered[top:top + h, left:left + w] = True
    assert covered.all()


def _smooth_image(width: int, height: int) -> Image.Image:
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    rgb = torch.stack([128 + 100 * torch.sin(6 * x + 3 * y), 128 + 90 * torch.cos(5 * y), 255 * x * y])
    noise = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0)) * 40
    return v2.ToPILImage()((rgb + noise).clamp(0, 255).to(torch.uint8))


def test_augment_equals_pil_random_resized_crop_of_the_file(tmp_path):
    """The device path against what CLIP-LoRA runs: PIL crop + bicubic resize of the decoded file, then flip."""
    image = _smooth_image(150, 112)
    image.save(tmp_path / "a.png")
    images = load_train_images({"dataset": "x", "train": {"1": [["a.png", 0]]}}, 1, tmp_path, 448)
    worst = []
    for seed in range(40):
        ours = augment(images, [0], torch.Generator().manual_seed(seed), 64, (0, 0, 0), (1, 1, 1))[0] * 255
        gen = torch.Generator().manual_seed(seed)
        top, left, h, w = crop_params(112, 150, gen)
        ref = TF.resized_crop(image, top, left, h, w, [64, 64], interpolation=InterpolationMode.BICUBIC)
        if torch.rand(1, generator=gen).item() < 0.5:
            ref = TF.horizontal_flip(ref)
        diff = (ours - v2.PILToTensor()(ref).float()).abs()
        worst.append((float(diff.mean()), float(diff.max())))
    assert max(m for m, _ in worst) < 0.5 and max(x for _, x in worst) <= 3  # interpolation, not geometry


def test_augment_is_deterministic_per_generator():
    pixels = torch.randint(0, 256, (16, 3, 40, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = TrainImages(pixels, [(40, 50)] * 8 + [(30, 20)] * 8, torch.zeros(16, dtype=torch.long))

    def run(seed: int) -> torch.Tensor:
        return augment(images, list(range(16)), torch.Generator().manual_seed(seed), 24, MEAN, STD)

    out = run(0)
    assert out.shape == (16, 3, 24, 24) and out.dtype == torch.float32
    assert torch.equal(out, run(0))
    assert not torch.allclose(out, run(1))


def test_augment_normalises():
    colour = torch.tensor([10, 128, 250], dtype=torch.uint8).view(1, 3, 1, 1)
    images = TrainImages(colour.expand(8, 3, 32, 32).contiguous(), [(32, 32)] * 8, torch.zeros(8, dtype=torch.long))
    out = augment(images, list(range(8)), torch.Generator().manual_seed(3), 32, MEAN, STD)
    expected = (colour.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)


def test_augment_crops_and_flips():
    # a left-to-right ramp: each output row is monotone, its direction tells the flip, its span the crop width
    size = 32
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
    pixels = ramp.view(1, 1, 1, size).expand(400, 3, size, size).contiguous()
    images = TrainImages(pixels, [(size, size)] * 400, torch.zeros(400, dtype=torch.long))
    out = augment(images, list(range(400)), torch.Generator().manual_seed(0), size, (0, 0, 0), (1, 1, 1))
    row = out[:, 0, size // 2] * 255
    first, last = row[:, 2], row[:, -3]  # away from the edges, where bicubic overshoot is clamped
    falling = first > last
    assert 150 < int(falling.sum()) < 250  # flip with p = 0.5
    span = (row.amax(1) - row.amin(1)) / 255
    assert span.max() <= 1.0 + 1e-4
    assert span.min() > 0.2  # widest aspect and smallest area: sqrt(0.08 * 3/4) of the width
    assert span.std() > 0.1  # crops of many sizes


def test_tensor_decode_path_gives_the_pil_paths_inputs(tmp_path):
    """The path a GPU evaluation takes (decode, resize and crop where the model runs), here on the CPU, against
    the PIL path of CPU workers: the same images within resize tolerance, in the same order."""
    from clip_qlora.data.images import tensor_batches

    rows = []
    for k, (w, h) in enumerate([(150, 112), (90, 160), (64, 64), (300, 200), (41, 77)]):
        _smooth_image(w, h).save(tmp_path / f"{k}.jpg", quality=92)
        rows.append([f"{k}.jpg", k % 2])
    _smooth_image(120, 100).save(tmp_path / "5.png")  # not a JPEG: the fallback decoder
    rows.append(["5.png", 1])
    split = {"test": rows}
    pil = list(eval_loader(split, tmp_path, 48, (0, 0, 0), (1, 1, 1), batch_size=4, workers=0))
    ours = list(tensor_batches(split, tmp_path, 48, (0, 0, 0), (1, 1, 1), batch_size=4, device="cpu"))
    assert [len(y) for _, y in ours] == [len(y) for _, y in pil] == [4, 2]
    a = torch.cat([x for x, _ in pil]) * 255
    b = torch.cat([x for x, _ in ours]) * 255
    assert torch.equal(torch.cat([y for _, y in pil]), torch.cat([y for _, y in ours]))
    diff = (a - b).abs()
    assert diff.mean() < 1.0 and diff.amax() <= 12, (diff.mean(), diff.amax())  # decoder IDCT + resize rounding
    assert torch.equal(a[-1], b[-1]) or diff[-1].amax() <= 3  # the PNG: same decoder, resize rounding only


@pytest.mark.parametrize("workers", [0, 1])
def test_eval_loader_yields_whole_test_split(tmp_path, workers):
    build(tmp_path, "food101")
    split = prepare(tmp_path, "food101")
    batches = list(eval_loader(split, tmp_path, 20, MEAN, STD, batch_size=4, workers=workers))
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.shape == (3 * N_TEST, 3, 20, 20) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.tolist() == [label for _, label in split["test"]]
    # write_image fills with one colour, so the normalised mean recovers it
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    per_channel = images.mean(dim=(2, 3))
    assert ((per_channel >= low - 0.05) & (per_channel <= high + 0.05)).all()


def test_shapes_is_generated_offline_and_deterministic(tmp_path):
    start = time.perf_counter()
    split = prepare(tmp_path / "a", "shapes", shots=16)
    assert time.perf_counter() - start < 5
    assert len(split["classnames"]) == 12 and "red circle" in split["classnames"]
    assert all(len(name.split()) == 2 for name in split["classnames"])
    assert len(split["test"]) == 12 * 20
    assert Counter(label for _, label in split["train"]["1"]) == {label: 16 for label in range(12)}
    assert split["replacement"] == {"1": [], "2": []}
    assert split["source"] == "synthetic shapes, seed 0, generated by clip-qlora"
    assert prepare(tmp_path / "b", "shapes", shots=16) == split
    path = split["test"][-1][0]
    assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    images = load_train_images(split, 1, tmp_path / "a", 128)
    assert images.pixels.float().std() > 20  # backgrounds are noisy, not flat


def test_a_ninth_dataset_is_one_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "dtd_copy", DatasetSpec("DTD", "images", "split_zhou_DescribableTextures.json",
                                                          "{} pattern."))
    build(tmp_path, "dtd")
    split = prepare(tmp_path, "dtd_copy", template="coop")
    assert split["dataset"] == "dtd_copy" and class_prompts(split)[0] == "banded pattern."


# ---- error cases ----

@pytest.mark.parametrize("dataset", [d for d in LAYOUT_NAMES if d != "ucf101"])
def test_missing_dataset_without_download(tmp_path, dataset):
    with pytest.raises(UserError) as e:
        prepare(tmp_path, dataset)
    message = str(e.value)
    assert "\n" not in message
    assert dataset in message and str(tmp_path / DATASETS[dataset].folder) in message
    assert "data.download: true" in message and DATASETS[dataset].image_dir in message


def test_ucf101_cannot_be_downloaded(tmp_path):
    with pytest.raises(UserError, match=r"cannot be downloaded: place UCF-101-midframes/ .* at .*UCF101"):
        prepare_split("ucf101", tmp_path, 4, [1], download=True, template="clip")


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        prepare_split("imagenet", tmp_path, 4, [1], download=False, template="clip")
    with pytest.raises(UserError, match="template must be"):
        prepare_split("shapes", tmp_path, 4, [1], download=False, template="fancy")
    with pytest.raises(UserError, match="shots"):
        prepare_split("shapes", tmp_path, 0, [1], download=False, template="clip")
    with pytest.raises(UserError, match="seeds"):
        prepare_split("shapes", tmp_path, 4, [1, 1], download=False, template="clip")


def test_split_file_naming_a_missing_image(tmp_path):
    rows = build(tmp_path, "eurosat")
    split = prepare(tmp_path, "eurosat")
    write_split(tmp_path / "split.json", split)
    gone = tmp_path / split["train"]["1"][0][0]
    gone.unlink()
    with pytest.raises(UserError) as e:
        load_split(tmp_path / "split.json", tmp_path)
    assert str(tmp_path / "split.json") in str(e.value) and str(gone) in str(e.value)
    assert "does not exist" in str(e.value)
    # at preparation a missing test image is an error naming the dataset's split file and the image
    write_image(gone, 0)
    (tmp_path / root_path("eurosat", rows["test"][0][0])).unlink()
    with pytest.raises(UserError, match=r"split_zhou_EuroSAT\.json: image .*does not exist"):
        prepare(tmp_path, "eurosat")


def test_malformed_json(tmp_path):
    (tmp_path / "split.json").write_text('{"dataset": "dtd",\n  "classnames": [}')
    with pytest.raises(UserError, match=r"split\.json: malformed JSON at line 2, column"):
        load_split(tmp_path / "split.json", tmp_path)
    build(tmp_path, "dtd")
    (tmp_path / "DTD" / "split_zhou_DescribableTextures.json").write_text('{"train": [')
    with pytest.raises(UserError, match=r"split_zhou_DescribableTextures\.json: malformed JSON"):
        prepare(tmp_path, "dtd")


@pytest.mark.parametrize("bad_path", ["../x.jpg", "DTD/images/../../../x.jpg", "/etc/x.jpg"])
def test_paths_escaping_root(tmp_path, bad_path):
    build(tmp_path, "dtd")
    split = prepare(tmp_path, "dtd")
    split["test"][0][0] = bad_path
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(UserError, match=r"split\.json: image path .* is outside data\.root"):
        load_split(tmp_path / "split.json", tmp_path)
    # the same in a dataset's own split file
    file = tmp_path / "DTD" / "split_zhou_DescribableTextures.json"
    rows = json.loads(file.read_text())
    rows["train"][0][0] = bad_path
    file.write_text(json.dumps(rows))
    with pytest.raises(UserError, match=r"split_zhou_DescribableTextures\.json: image path"):
        prepare(tmp_path, "dtd")


def test_missing_keys_and_bad_labels(tmp_path):
    build(tmp_path, "ucf101")
    split = prepare(tmp_path, "ucf101")
    file = tmp_path / "split.json"
    file.write_text(json.dumps({k: v for k, v in split.items() if k not in ("test", "shots")}))
    with pytest.raises(UserError, match=r"split\.json: missing key\(s\) shots, test"):
        load_split(file, tmp_path)
    split["train"]["1"][0][1] = 3
    file.write_text(json.dumps(split))
    with pytest.raises(UserError, match=r"split\.json: label 3 of .* out of range 0\.\.2"):
        load_split(file, tmp_path)
    split["train"]["1"][0] = ["UCF101/x.jpg"]
    file.write_text(json.dumps(split))
    with pytest.raises(UserError, match=r"split\.json: train\[1\] entry .* is not \[path, label\]"):
        load_split(file, tmp_path)


def test_fgvc_unknown_variant(tmp_path):
    build(tmp_path, "fgvc_aircraft")
    with open(tmp_path / "fgvc_aircraft" / "images_variant_test.txt", "a") as f:
        f.write("0999999 Concorde\n")
    with pytest.raises(UserError, match=r"images_variant_test\.txt:7: variant 'Concorde' is not in variants\.txt"):
        prepare(tmp_path, "fgvc_aircraft")


def test_unreadable_training_image_stops_the_exact_draw(tmp_path):
    build(tmp_path, "dtd")
    drawn = prepare(tmp_path, "dtd", seeds=[1])["train"]["1"]
    truncate(tmp_path / drawn[2][0])
    with pytest.raises(UserError, match=r"cannot decode image.*seed 1.*data.split_draw: keyed") as e:
        prepare(tmp_path, "dtd", seeds=[1])
    assert "\n" not in str(e.value) and drawn[2][0] in str(e.value)


def test_unreadable_training_image_is_skipped_or_fatal_in_the_keyed_draw(tmp_path, caplog):
    build(tmp_path, "dtd")
    first = prepare(tmp_path, "dtd", seeds=[1], draw="keyed")
    drawn = [path for path, label in first["train"]["1"] if label == 0]
    truncate(tmp_path / drawn[0])
    with caplog.at_level(logging.WARNING):
        split = prepare(tmp_path, "dtd", seeds=[1], draw="keyed")
    assert drawn[0] in caplog.text
    again = [path for path, label in split["train"]["1"] if label == 0]
    assert drawn[0] not in again and len(set(again)) == 4  # the class still has 4 readable images
    assert set(drawn[1:]) <= set(again)
    (tmp_path / again[0]).write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"dtd: class 'banded' has 3 readable training images, fewer than 4"):
        prepare(tmp_path, "dtd", seeds=[1], draw="keyed")


# ---- download branch, with torchvision's dataset classes replaced by fakes that write its layout ----

class FakeFood101:
    def __init__(self, root, split, download):
        assert download
        self.classes = ["apple_pie", "sushi"]
        self._image_files, self._labels = [], []
        for label, cls in enumerate(self.classes):
            for i in range(6 if split == "train" else 2):
                file = Path(root) / "food-101" / "images" / cls / f"{split}{i}.jpg"
                if not file.exists():
                    write_image(file, 10 * label + i)
                self._image_files.append(file)
                self._labels.append(label)
        (Path(root) / "food-101.tar.gz").write_bytes(b"archive")


class FakeEuroSAT:
    def __init__(self, root, download):
        for label, cls in enumerate(["AnnualCrop", "Forest"]):
            for i in range(10):
                write_image(Path(root) / "eurosat" / "2750" / cls / f"{cls}_{i}.jpg", 10 * label + i)


class FakeFGVCAircraft:
    def __init__(self, root, split, download):
        data = Path(root) / "fgvc-aircraft-2013b" / "data"
        data.mkdir(parents=True)
        (data / "variants.txt").write_text("707-320\nA300B4\n")
        for part, ids in [("train", [1, 2, 3, 4, 5, 6]), ("val", [7, 8]), ("test", [9, 10])]:
            (data / f"images_variant_{part}.txt").write_text(
                "".join(f"{i:07d} {'707-320' if i % 2 else 'A300B4'}\n" for i in ids))
            for i in ids:
                write_image(data / "images" / f"{i:07d}.jpg", i)


def test_download_food101(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "Food101", FakeFood101)
    split = prepare_split("food101", tmp_path, 4, [1], download=True, template="coop")
    assert split["source"] == "torchvision Food101 official train/test partition, made by clip-qlora"
    assert split["classnames"] == ["apple pie", "sushi"]
    assert len(split["test"]) == 4 and split["test"][0][0] == "Food101/images/apple_pie/test0.jpg"
    assert sorted(p.name for p in (tmp_path / "Food101").iterdir()) == ["images", "split_zhou_Food101.json"]
    # the placed copy is read like a hand-placed one, and keeps saying where it came from
    assert prepare_split("food101", tmp_path, 4, [1], download=False, template="coop") == split


def test_download_eurosat_has_a_holdout_partition(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "EuroSAT", FakeEuroSAT)
    split = prepare_split("eurosat", tmp_path, 4, [1], download=True, template="clip")
    assert split["classnames"] == ["Annual Crop", "Forest"]
    assert "no official partition" in split["source"]
    assert len(split["test"]) == 2 * 3  # 30% of 10 per class
    assert not {p for p, _ in split["train"]["1"]} & {p for p, _ in split["test"]}


def test_download_fgvc(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "FGVCAircraft", FakeFGVCAircraft)
    split = prepare_split("fgvc_aircraft", tmp_path, 2, [1], download=True, template="clip")
    assert split["classnames"] == ["707-320", "A300B4"]
    assert [p for p, _ in split["test"]] == ["fgvc_aircraft/images/0000009.jpg", "fgvc_aircraft/images/0000010.jpg"]


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets, "DTD", offline)
    with pytest.raises(UserError, match=r"dtd: could not fetch into .*DTD \(network is unreachable\)"):
        prepare_split("dtd", tmp_path, 4, [1], download=True, template="clip")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("draw", ["clip_lora", "keyed"])
def test_shots_drawn_with_replacement_are_said_once_on_stderr(tmp_path, caplog, draw):
    """A class with fewer training images than data.shots: one warning naming the dataset and the classes,
    whatever the number of seeds; none when every class has enough."""
    build(tmp_path, "dtd")  # TRAIN_COUNTS: the third class has 2 images
    caplog.set_level(logging.WARNING, logger="clip_qlora.data.splits")
    prepare(tmp_path, "dtd", shots=4, seeds=(1, 2, 3), draw=draw)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "dtd: 1 of its classes have fewer training images than data.shots = 4, so their shots are drawn with "
        "replacement (repeated images): zigzagged (the split file's 'replacement' lists them)"]
    caplog.clear()
    prepare(tmp_path, "dtd", shots=2, draw=draw)
    assert [r for r in caplog.records if r.levelno == logging.WARNING] == []
    prepare(tmp_path, "dtd", shots=6, draw=draw)
    assert ("3 of its classes have fewer training images than data.shots = 6, so their shots are drawn with "
            "replacement (repeated images): banded, bubbly, zigzagged (") in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "empty", "png-crc"])
def test_a_damaged_test_image_fails_prepare_naming_it(tmp_path, damage):
    """Every test image the split lists is opened (header, and a PNG's checksums) before any training: a damaged
    one stops prepare with one line naming it and what to do."""
    prepare_split("shapes", tmp_path, 1, [1], download=False, template="clip")  # generates the images
    images = sorted((tmp_path / "shapes" / "images").rglob("test_*.png"))
    bad = images[7]
    data = bytearray(bad.read_bytes())
    if damage == "garbage":
        bad.write_bytes(b"<html>not found</html>")
    elif damage == "empty":
        bad.write_bytes(b"")
    else:  # a flipped byte inside the image data: the header still reads
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        prepare_split("shapes", tmp_path, 1, [1], download=False, template="clip")
    message = str(e.value)
    assert message.startswith(f"{bad}: test image cannot be opened (") and "\n" not in message
    assert message.endswith(f"; replace it (or remove it from the test list of "
                            f"{tmp_path / 'shapes' / 'split_zhou_Shapes.json'}) and rerun prepare")
