"""The zeroshot stage: one base's zero-shot accuracy on every dataset's test split, with every prompt set.

Once per base and dataset: the methods that share a base (lora and lora_gc, qlora and qlora_gc) share its
zero-shot numbers, so no evaluate stage measures them. One stage per base, not per (base, dataset): a stage's
start-up (importing torch, open_clip, bitsandbytes) takes as long as a small dataset's zero-shot pass or longer
(start-up cold and warm, and the pass over Food101's, the largest test split, are measured in
benchmarks/results/2026-12-01-nvidia-h200-study.md), so 16 small stages would spend more time starting than the
passes they save. The price: adding a dataset reruns both bases' zero-shot, a pass over every test split.
"""
from __future__ import annotations

import sys
from pathlib import Path

from clip_qlora.core.base import load_base, resolve_device
from clip_qlora.data.images import eval_batches
from clip_qlora.data.splits import load_split, zero_shot_templates
from clip_qlora.core.scoring import zero_shot
from clip_qlora.metrics import Common, Zeroshot, ZeroshotDataset
from clip_qlora.paths import base_dir, split_path


def zeroshot_base(base: str, datasets: list[str], *, data, own_datasets: dict, eval, train, runtime,
                  device: str) -> Zeroshot:
    """The zeroshot stage: metrics/zeroshot/<base>.json. data: root and template; own_datasets: the declared
    datasets (their templates); eval: the eval group; train: logit_scale only; runtime: eval_workers only;
    device: model.device."""
    device = resolve_device(device)
    root = Path(data.root)
    splits = {d: load_split(split_path(d), root) for d in datasets}  # every split checked before the model
    model, meta = load_base(base_dir(base), device)
    per_dataset = {}
    for dataset, split in splits.items():
        def make_batches(size, mean, std, split=split):  # the reference's pixels unless eval.decode is fast
            return eval_batches(split, root, size, mean, std, eval.batch_size, runtime.eval_workers, device,
                                eval.decode)

        # both prompt sets: CLIP-LoRA trains with "a photo of a {}.", its paper's zero-shot row used CoOp's
        # per-dataset templates
        prompt_sets = {name: [template.format(c) for c in split["classnames"]]
                       for name, template in zero_shot_templates(dataset, own_datasets).items()}
        r = zero_shot(model, meta, prompt_sets, make_batches, device, train.logit_scale)
        # zero_shot_accuracy: with the prompts training used (data.template); zero_shot: every set
        per_dataset[dataset] = ZeroshotDataset(zero_shot_accuracy=r["zero_shot"][data.template],
                                               zero_shot=r["zero_shot"], n_test=r["n_test"])
        # the time goes to the log, not the metrics: a rerun must write the same outputs DVC recorded
        print(f"zeroshot {base} {dataset}: {r['n_test']} test images, "
              f"{r['passes']} pass{'es' if r['passes'] != 1 else ''}, "
              f"{r['eval_seconds']:.2f} s ({r['test_images_per_second']:.0f} images/s)", file=sys.stderr)
    metrics = Zeroshot(base=base, datasets=per_dataset, eval_decode=eval.decode, common=Common.of(device, meta))
    metrics.write()  # one file, written once every dataset is scored
    return metrics
