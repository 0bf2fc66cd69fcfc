"""The LoRA arm's base: block Linears stay in the compute dtype. Nothing to convert."""
from __future__ import annotations

import torch.nn as nn


def settings(params) -> None:
    """Backend-specific params recorded with the saved base (none for bf16)."""
    return None


def convert(model: nn.Module, settings, compute_dtype, device) -> nn.Module:
    return model.to(device)


def prepare_for_load(model: nn.Module, settings, compute_dtype) -> nn.Module:
    return model


def for_training(model: nn.Module, settings) -> nn.Module:
    """Nothing is quantized: nothing to prepare."""
    return model


def load_quantized(model: nn.Module, state: dict, device) -> set[str]:
    """Nothing is quantized: every tensor goes through plain load_state_dict."""
    return set()
