"""Top-1 accuracy on the full test split: the unadapted base (zero-shot) and each seed's adapters."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import adapters as ad
from .base import load_base
from .model import TextTokens, encode_image, encode_text, preprocess_stats
from .progress import Bar


@torch.no_grad()
def predict(clip, tokens: torch.Tensor, loader, device: str, compute_dtype, description: str):
    """(predictions, labels) over the loader; class features encoded once."""
    amp = (torch.autocast(device.split(":")[0], dtype=compute_dtype) if compute_dtype != torch.float32
           else torch.autocast("cpu", enabled=False))
    preds, gold = [], []
    with amp:
        text = F.normalize(encode_text(clip, tokens), dim=-1)
        bar = Bar(len(loader), description)
        for images, labels in bar(loader):
            img = F.normalize(encode_image(clip, images.to(device, non_blocking=True)), dim=-1)
            preds.append((img @ text.t()).argmax(dim=-1).cpu())
            gold.append(labels)
    return torch.cat(preds), torch.cat(gold)


def accuracy(preds: torch.Tensor, gold: torch.Tensor) -> float:
    return round(float((preds == gold).double().mean() * 100), 4)


def per_class(preds, gold, classnames) -> dict[str, float]:
    return {name: accuracy(preds[gold == i], gold[gold == i]) if (gold == i).any() else None
            for i, name in enumerate(classnames)}


def evaluate_method(base_dir, adapter_dirs: dict[str, str], prompts, classnames, make_loader, device: str):
    """Zero-shot accuracy of the base, then accuracy of each seed's adapters (merged where the base is bf16)."""
    model, meta = load_base(base_dir, device)
    dtype = getattr(torch, meta["compute_dtype"])
    tokens = TextTokens.from_prompts(prompts, meta["arch"]).tokens.to(device)
    size, mean, std = preprocess_stats(model)
    loader = make_loader(size, mean, std)
    zs_pred, gold = predict(model, tokens, loader, device, dtype, "zero-shot")
    out = {"zero_shot_accuracy": accuracy(zs_pred, gold), "n_test": int(len(gold)),
           "is_pretrained": meta["is_pretrained"], "accuracy": {}, "per_seed_per_class": {}, "confusion": None}
    for seed, adapter_dir in adapter_dirs.items():
        base, _ = load_base(base_dir, device)
        peft_model = ad.load_adapters(base, adapter_dir)
        # Merging folds B@A into a bf16 weight: same function, no adapter matmuls at inference. A 4-bit base
        # cannot absorb the update without re-quantizing it, which would change the model under test.
        clip = peft_model.merge_and_unload() if meta["base"] == "bf16" else ad.inner(peft_model)
        clip.eval()
        pred, gold = predict(clip, tokens, loader, device, dtype, f"eval seed {seed}")
        out["accuracy"][str(seed)] = accuracy(pred, gold)
        out["per_seed_per_class"][str(seed)] = per_class(pred, gold, classnames)
        if out["confusion"] is None:  # the first seed's confusion records, for DVC's confusion plot
            out["confusion"] = [{"actual": classnames[a], "predicted": classnames[p]}
                                for a, p in zip(gold.tolist(), pred.tolist())]
    return out
