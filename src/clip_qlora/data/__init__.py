"""The data layer: dataset registry, k-shot split files, image decoding, augmentation and the test loader."""
from .images import augment, eval_loader, load_train_images, eval_batches
from .layouts import Partition
from .registry import DATASETS, DatasetSpec
from .splits import class_prompts, load_split, prepare_split, write_split, zero_shot_templates

__all__ = ["DATASETS", "DatasetSpec", "Partition", "augment", "class_prompts", "eval_loader", "load_split",
           "load_train_images", "prepare_split", "eval_batches", "write_split", "zero_shot_templates"]
