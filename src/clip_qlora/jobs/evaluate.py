"""Top-1 accuracy of each seed's adapters on the full test split (the base's zero-shot: `scoring.zero_shot`).

Both arms are evaluated the same way: the function that was trained, adapters unmerged (merging the bf16 arm's
small update into bf16 weights would round it, and a 4-bit base cannot absorb it at all: an accuracy
difference between arms that is not quantization), under the same autocast as training, with the logits
taken from fp32 features (`model.cosine_logits`, as the training loss takes them).
"""
from __future__ import annotations

from pathlib import Path

import torch

from clip_qlora.core import adapters as ad
from clip_qlora.core.base import load_base
from clip_qlora.core.model import preprocess_stats
from clip_qlora.core.scoring import accuracy, class_features, logits, per_class, predict, tokens_of


def with_adapters(base, adapter_dirs: dict[str, str | Path]):
    """The trained functions on `base`, one PEFT adapter per seed: unmerged, eval mode (dropout off), their
    inputs left to autocast as in training. `set_adapter(seed)` picks one; `disable_adapter()` is the base."""
    peft_model = ad.load_adapter_set(base, adapter_dirs)
    ad.let_autocast_cast_inputs(peft_model)
    peft_model.eval()
    return peft_model


def evaluate_method(base_dir, adapter_dirs: dict[str, str], prompts, classnames, make_batches, device: str):
    """Accuracy of each seed's adapters, in one pass over the test split: each batch is decoded once and goes
    through every seed's adapters, switched in place; the base is loaded once."""
    model, meta = load_base(base_dir, device)
    dtype = getattr(torch, meta["compute_dtype"])
    size, mean, std = preprocess_stats(model)
    peft_model = with_adapters(model, {str(seed): d for seed, d in adapter_dirs.items()})
    clip = ad.inner(peft_model)
    tokens = tokens_of(prompts, meta["arch"], device)
    texts = {}
    for seed in adapter_dirs:
        peft_model.set_adapter(str(seed))
        texts[str(seed)] = class_features(clip, tokens, device, dtype)

    def score(images):
        out = {}
        for seed, text in texts.items():
            peft_model.set_adapter(seed)
            out[seed] = logits(clip, text, images, device, dtype)
        return out

    preds, gold, seconds = predict(make_batches(size, mean, std), score, device, "evaluate (every seed)")
    out = {"n_test": int(len(gold)), "is_pretrained": meta["is_pretrained"], "accuracy": {},
           "per_seed_per_class": {}, "confusion": None,
           # decode once, then one forward per seed on every batch
           "eval_seconds": seconds, "passes": len(texts), "test_images_per_second": len(gold) / seconds}
    for seed in texts:
        pred = preds[seed]
        out["accuracy"][seed] = accuracy(pred, gold)
        out["per_seed_per_class"][seed] = per_class(pred, gold, classnames)
        if out["confusion"] is None:  # the first seed's confusion records, for DVC's confusion plot
            out["confusion"] = [{"actual": classnames[a], "predicted": classnames[p]}
                                for a, p in zip(gold.tolist(), pred.tolist())]
    return out
