"""LoRA adapters on the split-attention projections, through PEFT, saved in PEFT's own format."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

TOWER_PREFIX = {"vision": r"visual\.transformer", "text": r"transformer"}
TARGET_MODULE = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "out": "attn.out_proj"}


def target_regex(towers: list[str], targets: list[str], layers: str | list[int]) -> str:
    """A PEFT target_modules regex (full match on module names) for the chosen towers, matrices and blocks."""
    prefixes = "|".join(TOWER_PREFIX[t] for t in towers)
    blocks = r"\d+" if layers == "all" else "|".join(str(i) for i in layers)
    mats = "|".join(TARGET_MODULE[t].replace(".", r"\.") for t in targets)
    return rf"({prefixes})\.resblocks\.({blocks})\.({mats})"


def lora_config(lora) -> LoraConfig:
    """CLIP-LoRA's adapter: scaling alpha/sqrt(r) is PEFT's rsLoRA; 'standard' gives alpha/r."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_regex(lora.towers, lora.targets, lora.layers),
        use_rslora=lora.scaling == "rslora",
        bias="none",
    )


def _fp32_adapters(model: nn.Module) -> None:
    # Both arms keep adapter weights in fp32 whatever the base stores (PEFT already does this for bf16 bases;
    # stating it makes the policy independent of PEFT's defaults).
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()


def add_adapters(model: nn.Module, lora) -> PeftModel:
    peft_model = get_peft_model(model, lora_config(lora))
    _fp32_adapters(peft_model)
    return peft_model


def let_autocast_cast_inputs(model: nn.Module) -> None:
    """Stop PEFT from casting each adapted Linear's input to the adapter dtype; training runs under autocast,
    which casts the matmul inputs to the compute dtype anyway.

    PEFT's nn.Linear LoRA layer casts its input to fp32 (the adapters' dtype) before dropout and lora_A, and
    autocast casts the dropped input straight back to bf16 for the matmul: same values, but an fp32 copy and
    an fp32 dropout per adapted projection. PEFT's bitsandbytes layer already skips that cast under autocast,
    so with PEFT's defaults the bf16 arm moved more memory and time than the 4-bit arm: a dtype difference
    between arms, which this study exists to remove. `cast_input_dtype_enabled` is PEFT's own switch for it.
    """
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = False


def save_adapters(peft_model: PeftModel, out_dir: str | Path) -> None:
    """adapter_config.json + adapter_model.safetensors, loadable by any PEFT user."""
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)


def load_adapters(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    _fp32_adapters(peft_model)
    return peft_model


def load_adapter_set(model: nn.Module, adapter_dirs: dict[str, str | Path]) -> PeftModel:
    """Several saved adapters on one base under their own names (PEFT switches them with set_adapter)."""
    names = iter(adapter_dirs.items())
    name, first = next(names)
    peft_model = PeftModel.from_pretrained(model, str(first), adapter_name=name)
    for name, path in names:
        peft_model.load_adapter(str(path), adapter_name=name)
    _fp32_adapters(peft_model)
    return peft_model


def inner(model: nn.Module) -> nn.Module:
    """The CLIP module inside a PeftModel (our encoders take the CLIP module, adapters injected in place)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def text_has_adapters(lora) -> bool:
    return "text" in lora.towers
