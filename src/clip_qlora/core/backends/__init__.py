"""Storage backends for the frozen base, and the method table: one home for both.

A backend decides how the frozen block Linears are stored (bf16 as is, or bitsandbytes 4-bit) and how a
saved base is rebuilt. Everything else (adapters, training, evaluation) is shared by all backends.
Each backend is the module `backends/<base>.py` with

    settings(params)                                  what the saved base records from params (or None)
    convert(model, settings, compute_dtype, device)   quantize the block Linears of a freshly built model
    prepare_for_load(model, settings, compute_dtype)  empty shells that `load_quantized` fills
    load_quantized(model, state, device)              fill them from a saved state dict; returns keys used
    for_training(model, settings)                     last touches before training (may return model as is)

and one `register` call below. Adding one (e.g. an 8-bit or HQQ base) is that module and that line: the
method table, the quantize stage's `--base` choices, the config check of `methods` and the report's labels
all read from here. dvc.yaml cannot import Python: `python -m tools.dvc_deps` writes this table's bases into
its quantize and zeroshot `foreach` lists (tests/test_deps.py fails until it has).

Backend modules are imported on first use (`get`): nf4 pulls in bitsandbytes (and torch), which validating
params, `--help`, prepare and aggregate never need.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Backend:
    method: str   # LoRA on this base; its gradient-checkpointing twin is `<method>_gc`
    label: str    # how the report and figures name that method
    params: str   # the params.yaml group its settings come from (quantize@<base> lists it); "model" = none


@dataclass(frozen=True)
class Method:
    base: str            # the backend the frozen base is stored with
    checkpointing: bool  # recompute each block's activations in backward: less memory, more time
    label: str


BACKENDS: dict[str, Backend] = {}
# The study's 2x2 design: {bf16, NF4 base} x {checkpointing off, on}. Adapter settings are shared by all.
METHODS: dict[str, Method] = {}


def register(base: str, method: str, label: str, params: str = "model") -> None:
    """A base (module backends/<base>.py) and the two methods that train on it: `method` and `method`_gc."""
    BACKENDS[base] = Backend(method, label, params)
    METHODS[method] = Method(base, False, label)
    METHODS[f"{method}_gc"] = Method(base, True, f"{label} + GC")


register("bf16", "lora", "LoRA")
register("nf4", "qlora", "QLoRA", params="quant")


def get(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    return importlib.import_module(f"{__name__}.{name}")


def label(method: str) -> str:
    """The method's display name; an unknown one is shown as is."""
    return METHODS[method].label if method in METHODS else method
