"""Top-1 accuracy on the full test split: the unadapted base (zero-shot) and each seed's adapters.

Both arms are evaluated the same way: the function that was trained, adapters unmerged (merging the bf16 arm's
small update into bf16 weights would round it, and a 4-bit base cannot absorb it at all: an accuracy
difference between arms that is not quantization), under the same autocast as training, with the logits
taken from fp32 features (`model.cosine_logits`, as the training loss takes them).
"""
from __future__ import annotations

import time
from pathlib import Path

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


def accuracy(preds: torch.Tensor, gold: torch.Tensor) -> float:
    return round(float((preds == gold).double().mean() * 100), 4)


def per_class(preds, gold, classnames) -> dict[str, float]:
    return {name: accuracy(preds[gold == i], gold[gold == i]) if (gold == i).any() else None
            for i, name in enumerate(classnames)}


def with_adapters(base, adapter_dirs: dict[str, str | Path]):
    """The trained functions on `base`, one PEFT adapter per seed: unmerged, eval mode (dropout off), their
    inputs left to autocast as in training. `set_adapter(seed)` picks one; `disable_adapter()` is the base."""
    peft_model = ad.load_adapter_set(base, adapter_dirs)
    ad.let_autocast_cast_inputs(peft_model)
    peft_model.eval()
    return peft_model


def evaluate_method(base_dir, adapter_dirs: dict[str, str], prompts, zero_shot_prompts: dict[str, list[str]],
                    classnames, make_batches, device: str):
    """Zero-shot accuracy of the base with each prompt set, and accuracy of each seed's adapters.

    One pass over the test split: each batch is decoded once and goes through the base (zero-shot) and every
    seed's adapters, switched in place; the base is loaded once.
    """
    model, meta = load_base(base_dir, device)
    dtype = getattr(torch, meta["compute_dtype"])
    size, mean, std = preprocess_stats(model)

    def tokens_of(p):
        return TextTokens.from_prompts(p, meta["arch"]).tokens.to(device)

    texts = {("zero_shot", name): class_features(model, tokens_of(p), device, dtype)
             for name, p in zero_shot_prompts.items()}
    peft_model = with_adapters(model, {str(seed): d for seed, d in adapter_dirs.items()})
    clip = ad.inner(peft_model)
    tokens = tokens_of(prompts)
    for seed in adapter_dirs:
        peft_model.set_adapter(str(seed))
        texts[("seed", str(seed))] = class_features(clip, tokens, device, dtype)
    preds: dict[tuple, list] = {key: [] for key in texts}
    gold = []
    batches = make_batches(size, mean, std)
    t0 = time.perf_counter()
    for images, labels in Bar(len(batches), "evaluate (zero-shot and every seed)")(batches):
        images = images.to(device, non_blocking=True)
        for key, text in texts.items():
            if key[0] == "zero_shot":
                with peft_model.disable_adapter():
                    preds[key].append(logits(clip, text, images, device, dtype).argmax(-1).cpu())
            else:
                peft_model.set_adapter(key[1])
                preds[key].append(logits(clip, text, images, device, dtype).argmax(-1).cpu())
        gold.append(labels.cpu())
    gold = torch.cat(gold)  # the host has every prediction: the device is done
    seconds = time.perf_counter() - t0
    preds = {key: torch.cat(v) for key, v in preds.items()}
    out = {"zero_shot": {name: accuracy(preds["zero_shot", name], gold) for name in zero_shot_prompts},
           "n_test": int(len(gold)), "is_pretrained": meta["is_pretrained"], "accuracy": {},
           "per_seed_per_class": {}, "confusion": None,
           # decode once, then one forward per pass (zero-shot prompt sets and seeds) on every batch
           "eval_seconds": seconds, "passes": len(texts), "test_images_per_second": len(gold) / seconds}
    for seed in adapter_dirs:
        pred = preds["seed", str(seed)]
        out["accuracy"][str(seed)] = accuracy(pred, gold)
        out["per_seed_per_class"][str(seed)] = per_class(pred, gold, classnames)
        if out["confusion"] is None:  # the first seed's confusion records, for DVC's confusion plot
            out["confusion"] = [{"actual": classnames[a], "predicted": classnames[p]}
                                for a, p in zip(gold.tolist(), pred.tolist())]
    return out
