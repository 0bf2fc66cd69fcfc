"""Top-1 accuracy on the full test split: the unadapted base (zero-shot) and each seed's adapters.

Both arms are evaluated the same way: the function that was trained, adapters unmerged (merging the bf16 arm's
small update into bf16 weights would round it, and a 4-bit base cannot absorb it at all: an accuracy
difference between arms that is not quantization), under the same autocast as training, with the logits
taken from fp32 features (`model.cosine_logits`, as the training loss takes them).
"""
from __future__ import annotations

import torch

from . import adapters as ad
from .base import load_base
from .model import TextTokens, cosine_logits, encode_image, encode_text, preprocess_stats, unit
from .progress import Bar

LOGIT_SCALE = 100.0  # argmax does not depend on it; kept so `logits` returns what the loss saw


def _autocast(device: str, compute_dtype):
    return torch.autocast(device.split(":")[0], dtype=compute_dtype, enabled=compute_dtype != torch.float32)


@torch.no_grad()
def class_features(clip, tokens: torch.Tensor, device: str, compute_dtype) -> torch.Tensor:
    with _autocast(device, compute_dtype):
        return unit(encode_text(clip, tokens))


@torch.no_grad()
def logits(clip, text_unit: torch.Tensor, images: torch.Tensor, device: str, compute_dtype) -> torch.Tensor:
    with _autocast(device, compute_dtype):
        img = unit(encode_image(clip, images))
    return cosine_logits(img, text_unit, LOGIT_SCALE)


@torch.no_grad()
def predict(clip, tokens: torch.Tensor, loader, device: str, compute_dtype, description: str):
    """(predictions, labels) over the loader; class features encoded once."""
    text = class_features(clip, tokens, device, compute_dtype)
    preds, gold = [], []
    for images, labels in Bar(len(loader), description)(loader):
        preds.append(logits(clip, text, images.to(device, non_blocking=True), device, compute_dtype).argmax(-1).cpu())
        gold.append(labels)
    return torch.cat(preds), torch.cat(gold)


def accuracy(preds: torch.Tensor, gold: torch.Tensor) -> float:
    return round(float((preds == gold).double().mean() * 100), 4)


def per_class(preds, gold, classnames) -> dict[str, float]:
    return {name: accuracy(preds[gold == i], gold[gold == i]) if (gold == i).any() else None
            for i, name in enumerate(classnames)}


def with_adapters(base, adapter_dir):
    """The trained function on `base`: PEFT adapters unmerged, in eval mode (dropout off), their inputs left to
    autocast as in training. `.unload()` of the result gives the untouched base back for the next seed."""
    peft_model = ad.load_adapters(base, adapter_dir)
    ad.let_autocast_cast_inputs(peft_model)
    peft_model.eval()
    return peft_model


def evaluate_method(base_dir, adapter_dirs: dict[str, str], prompts, zero_shot_prompts: dict[str, list[str]],
                    classnames, make_loader, device: str):
    """Zero-shot accuracy of the base with each template set, then accuracy of each seed's adapters."""
    model, meta = load_base(base_dir, device)  # once: each seed's adapters go on and come off again
    dtype = getattr(torch, meta["compute_dtype"])
    tokens = TextTokens.from_prompts(prompts, meta["arch"]).tokens.to(device)
    size, mean, std = preprocess_stats(model)
    loader = make_loader(size, mean, std)
    out = {"zero_shot": {}, "is_pretrained": meta["is_pretrained"], "accuracy": {}, "per_seed_per_class": {},
           "confusion": None}
    for name, zs_prompts in zero_shot_prompts.items():
        zs_tokens = TextTokens.from_prompts(zs_prompts, meta["arch"]).tokens.to(device)
        zs_pred, gold = predict(model, zs_tokens, loader, device, dtype, f"zero-shot ({name} prompts)")
        out["zero_shot"][name] = accuracy(zs_pred, gold)
        out["n_test"] = int(len(gold))
    for seed, adapter_dir in adapter_dirs.items():
        peft_model = with_adapters(model, adapter_dir)
        pred, gold = predict(ad.inner(peft_model), tokens, loader, device, dtype, f"eval seed {seed}")
        model = peft_model.unload()
        out["accuracy"][str(seed)] = accuracy(pred, gold)
        out["per_seed_per_class"][str(seed)] = per_class(pred, gold, classnames)
        out["n_test"] = int(len(gold))
        if out["confusion"] is None:  # the first seed's confusion records, for DVC's confusion plot
            out["confusion"] = [{"actual": classnames[a], "predicted": classnames[p]}
                                for a, p in zip(gold.tolist(), pred.tolist())]
    return out
