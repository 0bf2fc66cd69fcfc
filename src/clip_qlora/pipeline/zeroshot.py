"""The zeroshot stage: one base's zero-shot accuracy on one dataset's test split, with every prompt set.

Once per base and dataset: the methods that share a base (lora and lora_gc, qlora and qlora_gc) share its
zero-shot numbers, so no evaluate stage measures them again.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..base import resolve_device
from ..data.images import eval_batches
from ..data.splits import load_split, zero_shot_templates
from ..io import read_json, write_json
from ..scoring import zero_shot
from . import base_dir, common, split_path


def metrics_path(base: str, dataset: str) -> Path:
    return Path("metrics/zeroshot") / base / f"{dataset}.json"


def zeroshot(p, base: str, dataset: str) -> dict:
    device = resolve_device(p.model.device)
    root = Path(p.data.root)
    split = load_split(split_path(dataset), root)
    model_dir = base_dir(base)
    meta = read_json(model_dir / "base.json")

    def make_batches(size, mean, std):  # decoded on the GPU when evaluating on one
        return eval_batches(split, root, size, mean, std, p.eval.batch_size, p.runtime.eval_workers, device)

    # both prompt sets: CLIP-LoRA trains with "a photo of a {}.", its paper's zero-shot row used CoOp's
    # per-dataset templates
    prompt_sets = {name: [template.format(c) for c in split["classnames"]]
                   for name, template in zero_shot_templates(dataset).items()}
    r = zero_shot(model_dir, prompt_sets, make_batches, device)
    metrics = {"base": base, "dataset": dataset,
               # zero_shot_accuracy: with the prompts training used (data.template); zero_shot: every set
               "zero_shot_accuracy": r["zero_shot"][p.data.template], "zero_shot": r["zero_shot"],
               "n_test": r["n_test"], **common(device, meta)}
    write_json(metrics_path(base, dataset), metrics)
    # the time goes to the log, not the metrics: a rerun must write the same outputs DVC recorded
    print(f"zeroshot {base} {dataset}: {r['n_test']} test images, {r['passes']} passes, {r['eval_seconds']:.2f} s "
          f"({r['test_images_per_second']:.0f} images/s)", file=sys.stderr)
    return metrics
