"""Quoted reference figures (docs/protocol.md): never computed here, always labelled "quoted, not measured here".

The only hand-written numbers of the report. Method names in the original study's tables are its own
(lora, qlora, qlora_gc); batch keys are `b<micro>x<accum>`.
"""
from __future__ import annotations

REFERENCE_COLUMNS = ["EuroSAT", "DTD", "Caltech", "Pets", "Flowers", "Food", "Aircraft", "UCF", "mean"]
REFERENCE_ROWS = [
    ("CLIP-LoRA, paper Table 1 (ViT-B/16, 4 shots)",
     ["84.9", "63.8", "95.2", "91.0", "93.7", "82.7", "37.9", "81.1", "78.79"]),
    ("QLoRA + GC, bs 32x1, seed 1 (QLoRA study's own logs)",
     ["87.90", "58.39", "94.36", "91.50", "87.49", "82.29", "32.58", "75.97", "76.31"]),
]
REFERENCE_SHORT = ["CLIP-LoRA paper", "QLoRA+GC study s1"]
# The paper's 8 datasets by their `datasets:` names -> reference column. Only these: a dataset of the user's own
# has no quoted value, whatever it is called (own dataset names cannot be built-in ones; params check it).
PAPER_COLUMNS = {"eurosat": "EuroSAT", "dtd": "DTD", "caltech101": "Caltech", "oxford_pets": "Pets",
                 "oxford_flowers": "Flowers", "food101": "Food", "fgvc_aircraft": "Aircraft", "ucf101": "UCF"}

# The original study's Table 1
STUDY_DEVICE, STUDY_DATASET = "RTX 4090", "Caltech101"
STUDY_STATIC_GB = {"lora": "0.29", "qlora": "0.11"}
STUDY_PEAK_GB = {("lora", "b4x8"): "0.71", ("qlora", "b4x8"): "1.02", ("qlora_gc", "b4x8"): "0.25",
                 ("qlora_gc", "b1x32"): "0.17",
                 ("lora", "b32x1"): "3.53", ("qlora", "b32x1"): "6.96", ("qlora_gc", "b32x1"): "1.07"}
STUDY_TIME = {("lora", "b4x8"): "6:46", ("qlora", "b4x8"): "12:13", ("qlora_gc", "b4x8"): "11:55"}


def reference_column(dataset: str) -> str | None:
    """The reference column quoting `dataset`, or None where it is not one of the paper's 8."""
    return PAPER_COLUMNS.get(dataset)
