"""The evaluate stage: each seed's accuracy (overall, per class, confusion); the base's zero-shot accuracy is
the zeroshot stage's (once per base and dataset)."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

from clip_qlora.core.base import resolve_device
from clip_qlora.data.images import eval_batches
from clip_qlora.data.splits import class_prompts, load_split
from clip_qlora.jobs.evaluate import evaluate_method
from clip_qlora.runtime.io import UserError, read_json, write_json
from clip_qlora.paths import adapter_dir, base_of, common, split_path


def evaluate(p, method: str, dataset: str) -> dict:
    device = resolve_device(p.model.device)
    root = Path(p.data.root)
    split = load_split(split_path(dataset), root)
    dirs = {str(s): adapter_dir(method, dataset, s) for s in p.data.seeds}
    for d in dirs.values():
        if not (d / "adapter_config.json").exists():
            raise UserError(f"{d}: no adapters; run the train stage first (dvc repro train@{method}-{dataset})")

    def make_batches(size, mean, std):  # the reference's pixels unless eval.decode is fast
        return eval_batches(split, root, size, mean, std, p.eval.batch_size, p.runtime.eval_workers, device,
                            p.eval.decode)

    r = evaluate_method(base_dir=base_of(method), adapter_dirs=dirs, prompts=class_prompts(split),
                        classnames=split["classnames"], make_batches=make_batches, device=device)
    accs = list(r["accuracy"].values())
    per_class = {c: statistics.mean(v[c] for v in r["per_seed_per_class"].values()
                                    if v[c] is not None) if any(v[c] is not None for v in
                                                                r["per_seed_per_class"].values()) else None
                 for c in split["classnames"]}
    metrics = {"method": method, "dataset": dataset, "seeds": list(p.data.seeds),
               "accuracy_mean": statistics.mean(accs),
               "accuracy_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
               "accuracy": r["accuracy"],
               "per_class": per_class, "n_test": r["n_test"], "passes": r["passes"],
               "eval_decode": p.eval.decode,  # the report lists the fast path among the deviations
               **common(device, read_json(base_of(method) / "base.json"))}
    write_json(Path("metrics/eval") / method / f"{dataset}.json", metrics)
    # the time goes to the log, not the metrics: a rerun must write the same outputs DVC recorded
    print(f"evaluate {method} {dataset}: {r['n_test']} test images, "
          f"{r['passes']} pass{'es' if r['passes'] != 1 else ''}, {r['eval_seconds']:.2f} s "
          f"({r['test_images_per_second']:.0f} images/s)", file=sys.stderr)
    write_json(Path("plots/confusion") / method / f"{dataset}.json", r["confusion"])
    return metrics
