"""Adding a quantization backend is one module and one `register` line (README, Extending): a backend made
here, registered like bf16 and nf4, goes through the config check, the quantize stage (its base and method
pointers), a training step of both its methods and the report's labels, with nothing else edited."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from clip_qlora.core import backends
from clip_qlora.core.backends import bf16

from cli_helpers import demo_params, invoke, project


def _half_backend() -> types.ModuleType:
    """Stores the block Linears as bf16 does, and records that each entry point was called."""
    mod = types.ModuleType("clip_qlora.core.backends.half")
    mod.calls = []

    def settings(params):
        return {"tag": f"half-{params.lora.r}"}  # something read from params, recorded with the saved base

    def convert(model, s, dtype, device):
        mod.calls.append(("convert", s["tag"]))
        return bf16.convert(model, s, dtype, device)

    def prepare_for_load(model, s, dtype):
        mod.calls.append(("prepare_for_load", s["tag"]))
        return model

    def load_quantized(model, state, device):
        mod.calls.append(("load_quantized", None))
        return set()

    def for_training(model, s):
        mod.calls.append(("for_training", s["tag"]))
        return model

    mod.__dict__.update(settings=settings, convert=convert, prepare_for_load=prepare_for_load,
                        load_quantized=load_quantized, for_training=for_training)
    return mod


@pytest.fixture
def half(monkeypatch):
    """The module, importable as clip_qlora.core.backends.half, and its one line: register("half", "hlora", ...)."""
    mod = _half_backend()
    monkeypatch.setitem(sys.modules, "clip_qlora.core.backends.half", mod)
    saved = dict(backends.BACKENDS), dict(backends.METHODS)
    backends.register("half", "hlora", "Half-LoRA", params="lora")  # its settings read lora.r
    yield mod
    for table, before in zip((backends.BACKENDS, backends.METHODS), saved):
        table.clear()
        table.update(before)


def test_a_registered_backend_is_used_end_to_end(half, tmp_path):
    from clip_qlora.core.step import build_run, optimizer_step, groups_of

    assert backends.METHODS["hlora_gc"] == backends.Method("half", True, "Half-LoRA + GC")
    params = demo_params({"methods": ["lora", "hlora", "hlora_gc"]})
    with project(tmp_path, params):
        r = invoke("quantize", "--base", "half")  # the real stage command: config check, --base choices
        assert r.exit_code == 0, r.output
        for method, gc in (("hlora", False), ("hlora_gc", True)):
            pointer = json.loads(Path(f"models/methods/{method}.json").read_text())
            assert pointer["base"] == "half" and pointer["gradient_checkpointing"] is gc
            assert pointer["settings"] == {"tag": f"half-{params['lora']['r']}"}
        assert not Path("models/methods/lora.json").exists()  # only the methods of the base built
        assert json.loads(Path("metrics/static/half.json").read_text())["stored_base_bytes"] > 0

        from clip_qlora import config

        p = config.load("params.yaml")
        for method in ("hlora", "hlora_gc"):
            torch.manual_seed(0)
            run = build_run(Path("models/half"), method, ["a photo of a x.", "a photo of a y."], "cpu", 2, **groups_of(p))
            assert run.blocks.checkpointing is (method == "hlora_gc")
            x = torch.randn(2, 3, run.size, run.size, generator=torch.Generator().manual_seed(0))
            loss = optimizer_step(run, [(x, torch.tensor([0, 1]))])
            assert torch.isfinite(loss)
    assert [c[0] for c in half.calls] == ["convert", "prepare_for_load", "load_quantized", "for_training",
                                          "prepare_for_load", "load_quantized", "for_training"]
    assert backends.label("hlora_gc") == "Half-LoRA + GC"


def test_an_unregistered_base_is_refused(tmp_path):
    with project(tmp_path, demo_params()):
        r = invoke("quantize", "--base", "half")
    assert r.exit_code == 2 and "--base 'half': expected one of bf16, nf4" in r.stderr
    with pytest.raises(KeyError, match="unknown backend 'half'"):
        backends.get("half")
