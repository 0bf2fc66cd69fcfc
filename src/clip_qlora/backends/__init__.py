"""Storage backends for the frozen base: one small module each, chosen by name.

A backend decides how the frozen block Linears are stored (bf16 as is, or bitsandbytes 4-bit) and how a
saved base is rebuilt. Everything else (adapters, training, evaluation) is shared by all backends.
Adding one (e.g. an 8-bit or HQQ base) means a module with the functions bf16.py has (settings, convert,
prepare_for_load, load_quantized, for_training) and an entry below.
"""
from __future__ import annotations

from types import ModuleType

from . import bf16, nf4

BACKENDS: dict[str, ModuleType] = {"bf16": bf16, "nf4": nf4}

# A method is a base plus the checkpointing flag; adapter settings are shared by all four.
METHODS: dict[str, tuple[str, bool]] = {
    "lora": ("bf16", False),
    "lora_gc": ("bf16", True),
    "qlora": ("nf4", False),
    "qlora_gc": ("nf4", True),
}


def get(name: str) -> ModuleType:
    return BACKENDS[name]
