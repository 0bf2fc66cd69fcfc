"""The datasets, one entry each. A new dataset is one more entry (plus a reader if its layout is new)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clip_qlora.data import fetch
from clip_qlora.data.layouts import Partition, read_coop, read_fgvc

CLIP_TEMPLATE = "a photo of a {}."  # CLIP-LoRA uses this one prompt for every dataset


@dataclass(frozen=True)
class DatasetSpec:
    folder: str  # under data.root
    image_dir: str  # under folder; split files give image paths relative to it
    split_file: str  # what holds the partition (also the default "source" of a split)
    coop_template: str  # CoOp's dataset-specific prompt
    read: Callable[[DatasetSpec, Path], Partition] = read_coop
    # fills an empty dataset folder with the layout `read` expects; None = must be placed by hand
    fetch: Callable[[DatasetSpec, Path], None] | None = None
    offline: bool = False  # fetch needs no network (generated data), so it runs even with data.download off

    def partition(self, root: Path) -> Partition:
        return self.read(self, root)


def _shapes(spec: DatasetSpec, dest: Path) -> None:
    from clip_qlora.data import synthetic  # numpy and PIL only when the shapes are really drawn, not to check params

    synthetic.generate(dest, 0, spec.image_dir, spec.split_file)


DATASETS: dict[str, DatasetSpec] = {
    "eurosat": DatasetSpec("eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.",
                           fetch=fetch.eurosat),
    "dtd": DatasetSpec("DTD", "images", "split_zhou_DescribableTextures.json", "{} texture.",
                       fetch=fetch.official("DTD", {"train": "train", "val": "val", "test": "test"},
                                            "dtd/dtd/images", partition=1)),
    "caltech101": DatasetSpec("Caltech101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}.",
                              fetch=fetch.caltech101),
    "oxford_pets": DatasetSpec("OxfordPets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet.",
                               fetch=fetch.official("OxfordIIITPet", {"train": "trainval", "test": "test"},
                                                    "oxford-iiit-pet/images")),
    "oxford_flowers": DatasetSpec("Flower102", "jpg", "split_zhou_OxfordFlowers.json",
                                  "a photo of a {}, a type of flower.", fetch=fetch.flowers102),
    "food101": DatasetSpec("Food101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food.",
                           fetch=fetch.official("Food101", {"train": "train", "test": "test"}, "food-101/images")),
    "fgvc_aircraft": DatasetSpec("fgvc_aircraft", "images", "variants.txt + images_variant_{train,val,test}.txt",
                                 "a photo of a {}, a type of aircraft.", read=read_fgvc, fetch=fetch.fgvc_aircraft),
    "ucf101": DatasetSpec("UCF101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."),
    "shapes": DatasetSpec("shapes", "images", "split_zhou_Shapes.json", "a drawing of a {}.",
                          fetch=_shapes, offline=True),
}
