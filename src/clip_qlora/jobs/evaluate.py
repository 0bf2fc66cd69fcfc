"""Top-1 accuracy of each seed's adapters on the full test split (the base's zero-shot: `scoring.zero_shot`).

Both arms are evaluated the same way: the function that was trained, adapters unmerged (merging the bf16 arm's
small update into bf16 weights would round it, and a 4-bit base cannot absorb it at all: an accuracy
difference between arms that is not quantization), under the same autocast as training, with the logits
taken from fp32 features (`model.cosine_logits`, as the training loss takes them).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from clip_qlora.core import adapters as ad
from clip_qlora.core.base import load_base, resolve_device
from clip_qlora.core.model import preprocess_stats
from clip_qlora.core.scoring import accuracy, class_features, logits, per_class, predict, tokens_of
from clip_qlora.data.images import eval_batches
from clip_qlora.data.splits import class_prompts, load_split
from clip_qlora.metrics import Common, Eval
from clip_qlora.paths import adapter_dir, base_of, split_path
from clip_qlora.runtime.io import UserError, read_json, write_json


def with_adapters(base, adapter_dirs: dict[str, str | Path]):
    """The trained functions on `base`, one PEFT adapter per seed: unmerged, eval mode (dropout off), their
    inputs left to autocast as in training. `set_adapter(seed)` picks one; `disable_adapter()` is the base."""
    peft_model = ad.load_adapter_set(base, adapter_dirs)
    ad.let_autocast_cast_inputs(peft_model)
    peft_model.eval()
    return peft_model


def evaluate_seeds(base_dir, adapter_dirs: dict[str, str], prompts, classnames, make_batches, device: str,
                   logit_scale: float):
    """Accuracy of each seed's adapters, in one pass over the test split: each batch is decoded once and goes
    through every seed's adapters, switched in place; the base is loaded once. logit_scale: train.logit_scale."""
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
            out[seed] = logits(clip, text, images, device, dtype, logit_scale)
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


def evaluate_dataset(method: str, dataset: str, *, data, eval, train, runtime, device: str) -> Eval:
    """The evaluate stage: metrics/eval/<method>/<dataset>.json and its confusion plot. data: root and seeds;
    eval: the eval group; train: logit_scale only; runtime: eval_workers only (same images, same order);
    device: model.device."""
    device = resolve_device(device)
    root = Path(data.root)
    split = load_split(split_path(dataset), root)
    dirs = {str(s): adapter_dir(method, dataset, s) for s in data.seeds}
    for d in dirs.values():
        if not (d / "adapter_config.json").exists():
            raise UserError(f"{d}: no adapters; run the train stage first (dvc repro train@{method}-{dataset})")

    def make_batches(size, mean, std):  # the reference's pixels unless eval.decode is fast
        return eval_batches(split, root, size, mean, std, eval.batch_size, runtime.eval_workers, device,
                            eval.decode)

    r = evaluate_seeds(base_dir=base_of(method), adapter_dirs=dirs, prompts=class_prompts(split),
                        classnames=split["classnames"], make_batches=make_batches, device=device,
                        logit_scale=train.logit_scale)
    accs = list(r["accuracy"].values())
    per_class = {c: statistics.mean(v[c] for v in r["per_seed_per_class"].values()
                                    if v[c] is not None) if any(v[c] is not None for v in
                                                                r["per_seed_per_class"].values()) else None
                 for c in split["classnames"]}
    metrics = Eval(method=method, dataset=dataset, seeds=list(data.seeds),
                   accuracy_mean=statistics.mean(accs),
                   accuracy_std=statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                   accuracy=r["accuracy"],
                   per_class=per_class, n_test=r["n_test"], passes=r["passes"],
                   eval_decode=eval.decode,  # the report lists the fast path among the deviations
                   common=Common.of(device, read_json(base_of(method) / "base.json")))
    metrics.write()
    # the time goes to the log, not the metrics: a rerun must write the same outputs DVC recorded
    print(f"evaluate {method} {dataset}: {r['n_test']} test images, "
          f"{r['passes']} pass{'es' if r['passes'] != 1 else ''}, {r['eval_seconds']:.2f} s "
          f"({r['test_images_per_second']:.0f} images/s)", file=sys.stderr)
    write_json(Path("plots/confusion") / method / f"{dataset}.json", r["confusion"])
    return metrics
