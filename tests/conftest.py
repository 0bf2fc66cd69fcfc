"""Shared fixtures: small bases built once per test session (clip-tiny, random weights, fp32 on CPU)."""
from __future__ import annotations

import logging

import pytest
import torch

from clip_qlora.core import backends
from clip_qlora import config
from clip_qlora.core.base import make_base, save_base

# The shipped architecture with random weights, everything else as params.yaml has it (the one home of values).
TINY = {"datasets": ["shapes"], "model.arch": "clip-tiny", "model.pretrained": "none"}
NF4 = backends.get("nf4").settings(config.load_with())  # the study's NF4 settings


@pytest.fixture(autouse=True)
def _quiet_random_init_warning(caplog):
    caplog.set_level(logging.ERROR)


@pytest.fixture(scope="session")
def saved_bases(tmp_path_factory):
    """models/bf16 and models/nf4 of clip-tiny in fp32 compute, as the quantize stage would save them."""
    root = tmp_path_factory.mktemp("models")
    for base, settings in (("bf16", None), ("nf4", NF4)):
        model, meta = make_base("clip-tiny", "none", base, settings, torch.float32, "cpu")
        save_base(model, meta, root / base)
    return {"bf16": root / "bf16", "nf4": root / "nf4"}


@pytest.fixture
def tiny_params():
    return config.load_with(TINY)
