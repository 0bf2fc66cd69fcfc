"""The evaluate stage: each seed's accuracy (overall, per class, confusion) and the base's zero-shot accuracy."""
from __future__ import annotations

import statistics
from pathlib import Path

from ..base import resolve_device
from ..data.images import eval_loader
from ..data.splits import class_prompts, load_split
from ..evaluate import evaluate_method
from ..io import UserError, write_json
from . import adapter_dir, base_of, common, split_path


def evaluate(p, method: str, dataset: str) -> dict:
    device = resolve_device(p.model.device)
    root = Path(p.data.root)
    split = load_split(split_path(dataset), root)
    dirs = {str(s): adapter_dir(method, dataset, s) for s in p.data.seeds}
    for d in dirs.values():
        if not (d / "adapter_config.json").exists():
            raise UserError(f"{d}: no adapters; run the train stage first (dvc repro train@{method}-{dataset})")

    def make_loader(size, mean, std):
        return eval_loader(split, root, size, mean, std, p.eval.batch_size, p.runtime.eval_workers)

    r = evaluate_method(base_dir=base_of(method), adapter_dirs=dirs, prompts=class_prompts(split),
                        classnames=split["classnames"], make_loader=make_loader, device=device)
    accs = list(r["accuracy"].values())
    per_class = {c: statistics.mean(v[c] for v in r["per_seed_per_class"].values()
                                    if v[c] is not None) if any(v[c] is not None for v in
                                                                r["per_seed_per_class"].values()) else None
                 for c in split["classnames"]}
    metrics = {"method": method, "dataset": dataset, "seeds": list(p.data.seeds),
               "accuracy_mean": statistics.mean(accs),
               "accuracy_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
               "accuracy": r["accuracy"], "zero_shot_accuracy": r["zero_shot_accuracy"],
               "per_class": per_class, "n_test": r["n_test"], **common(device, r["is_pretrained"])}
    write_json(Path("metrics/eval") / method / f"{dataset}.json", metrics)
    write_json(Path("plots/confusion") / method / f"{dataset}.json", r["confusion"])
    return metrics
