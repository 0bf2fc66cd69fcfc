"""Scoring a model on a test split: class features, logits, accuracy, and the base's zero-shot accuracy.

No PEFT here: the zero-shot stage scores the saved base as it is, so its start-up does not import PEFT and the
transformers auto classes PEFT loads (tests/test_imports.py). `evaluate` adds each seed's adapters on top.
Logits come from fp32 unit features (`model.cosine_logits`) at train.logit_scale, as the training loss takes
them, under the training autocast (only their argmax is scored, which the scale does not move).
"""
from __future__ import annotations

import time

import torch

from clip_qlora.core.model import TextTokens, autocast, cosine_logits, encode_image, encode_text, preprocess_stats, unit
from clip_qlora.runtime.progress import Bar

@torch.no_grad()
def class_features(clip, tokens: torch.Tensor, device: str, compute_dtype) -> torch.Tensor:
    with autocast(device, compute_dtype):
        return unit(encode_text(clip, tokens))


@torch.no_grad()
def image_features(clip, images: torch.Tensor, device: str, compute_dtype) -> torch.Tensor:
    with autocast(device, compute_dtype):
        return unit(encode_image(clip, images))


def logits(clip, text_unit: torch.Tensor, images: torch.Tensor, device: str, compute_dtype,
           logit_scale: float) -> torch.Tensor:
    return cosine_logits(image_features(clip, images, device, compute_dtype), text_unit, logit_scale)


def accuracy(preds: torch.Tensor, gold: torch.Tensor) -> float:
    return round(float((preds == gold).double().mean() * 100), 4)


def per_class(preds, gold, classnames) -> dict[str, float]:
    return {name: accuracy(preds[gold == i], gold[gold == i]) if (gold == i).any() else None
            for i, name in enumerate(classnames)}


def tokens_of(prompts: list[str], arch: str, device: str) -> torch.Tensor:
    return TextTokens.from_prompts(prompts, arch).tokens.to(device)


def predict(batches, score, device: str, label: str):
    """One pass over the test batches, each decoded once: `score(images)` -> {key: logits}. Returns the
    predictions per key, the gold labels and the seconds the pass took (predictions reach the host once, at the end)."""
    preds: dict = {}
    gold = []
    t0 = time.perf_counter()
    for images, labels in Bar(len(batches), label)(batches):
        for key, out in score(images.to(device, non_blocking=True)).items():
            preds.setdefault(key, []).append(out.argmax(-1))  # kept on the device: no wait per batch
        gold.append(labels.cpu())
    gold = torch.cat(gold)
    preds = {key: torch.cat(v).cpu() for key, v in preds.items()}
    seconds = time.perf_counter() - t0
    return preds, gold, seconds


def zero_shot(model, meta: dict, prompt_sets: dict[str, list[str]], make_batches, device: str,
              logit_scale: float) -> dict:
    """Accuracy of a loaded base (`base.load_base`), no adapters, with each prompt set: one image forward per
    test image, the class features of every prompt set compared with it (logit_scale: train.logit_scale)."""
    model.eval()
    dtype = getattr(torch, meta["compute_dtype"])
    size, mean, std = preprocess_stats(model)
    texts = {name: class_features(model, tokens_of(p, meta["arch"], device), device, dtype)
             for name, p in prompt_sets.items()}

    def score(images):
        img = image_features(model, images, device, dtype)
        return {name: cosine_logits(img, text, logit_scale) for name, text in texts.items()}

    preds, gold, seconds = predict(make_batches(size, mean, std), score, device, "zero-shot")
    return {"zero_shot": {name: accuracy(preds[name], gold) for name in prompt_sets}, "n_test": int(len(gold)),
            "is_pretrained": meta["is_pretrained"], "eval_seconds": seconds, "passes": 1,
            "test_images_per_second": len(gold) / seconds}
