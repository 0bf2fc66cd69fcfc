"""What each DVC stage does, in terms of files: where it reads, what it writes. Stages call these.

Paths are relative to the working folder (the DVC project root): every output below is declared in
dvc.yaml; checkpoints live in .ckpt/ (not an output) so they survive `dvc repro` clearing outputs.
"""
from __future__ import annotations

import hashlib
import statistics
from pathlib import Path

import torch

from . import backends
from .backends import METHODS
from .base import make_base, resolve_device, resolve_dtype, save_base
from .io import UserError, device_name, read_json, versions, write_json
from .memory import allocated_bytes, frozen_weight_bytes

BASES = tuple(backends.BACKENDS)


def split_path(dataset: str) -> Path:
    return Path("data/splits") / f"{dataset}.json"


def base_dir(base: str) -> Path:
    return Path("models") / base


def method_pointer(method: str) -> Path:
    """A small file per method naming its base and the base's hash.

    DVC cannot look up a method's base inside a matrix stage, so each train/profile stage depends on this
    pointer instead: it changes exactly when that method's base changes (quant.* reruns only the nf4 side).
    """
    return Path("models/methods") / f"{method}.json"


def adapter_dir(method: str, dataset: str, seed) -> Path:
    return Path("adapters") / method / dataset / f"seed{seed}"


def checkpoint_path(method: str, dataset: str, seed) -> Path:
    return Path(".ckpt/train") / method / dataset / f"seed{seed}.pt"


def _base_of(method: str) -> Path:
    pointer = read_json(method_pointer(method))
    return Path(pointer["dir"])


def _common(p, device: str, is_pretrained: bool) -> dict:
    return {"pretrained": bool(is_pretrained), "device": device_name(device), "versions": versions()}


# ---- quantize -----------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantize(p, base: str) -> dict:
    device = resolve_device(p.model.device)
    dtype = resolve_dtype(p.model.compute_dtype, device)
    settings = backends.get(base).settings(p)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = allocated_bytes(device) or 0
    model, meta = make_base(p.model.arch, p.model.pretrained, base, settings, dtype, device)
    after = allocated_bytes(device)
    save_base(model, meta, base_dir(base))
    digest = _sha256(base_dir(base) / "model.safetensors")
    for method, (b, gc) in METHODS.items():
        if b == base:
            write_json(method_pointer(method), {"method": method, "base": base, "gradient_checkpointing": gc,
                                                "dir": str(base_dir(base)), "sha256": digest})
    metrics = {"base": base, "static_bytes": frozen_weight_bytes(model),
               "memory_allocated_bytes": None if after is None else after - before,
               "arch": p.model.arch, "compute_dtype": meta["compute_dtype"], "quant": settings,
               **_common(p, device, meta["is_pretrained"])}
    write_json(Path("metrics/static") / f"{base}.json", metrics)
    return metrics


# ---- train ---------------------------------------------------------------------------------------------------

def train(p, method: str, dataset: str) -> dict:
    from dvclive import Live

    from .data import class_prompts, load_split, load_train_images
    from .train import train_seed

    device = resolve_device(p.model.device)
    root = Path(p.data.root)
    split = load_split(split_path(dataset), root)
    missing = [s for s in p.data.seeds if str(s) not in split["train"]]
    if missing or split.get("shots") != p.data.shots:
        raise UserError(f"{split_path(dataset)}: made for shots={split.get('shots')} and seeds "
                        f"{sorted(split['train'])}, params ask shots={p.data.shots} seeds {p.data.seeds}; "
                        f"rerun prepare (dvc repro prepare@{dataset})")
    base = _base_of(method)
    meta = read_json(base / "base.json")
    import open_clip

    from .model import register_configs
    register_configs()
    size = open_clip.get_model_config(meta["arch"])["vision_cfg"]["image_size"]
    prompts = class_prompts(split)
    per_seed = {}
    for seed in p.data.seeds:
        images, labels = load_train_images(split, seed, root, size)
        live_dir = Path("dvclive/train") / method / dataset / f"seed{seed}"
        with Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=False) as live:
            r = train_seed(p, method, base, prompts, images, labels, seed, device,
                           adapter_dir(method, dataset, seed), checkpoint_path(method, dataset, seed), live,
                           description=f"train {method} {dataset} seed {seed}")
        per_seed[str(seed)] = r
    first = next(iter(per_seed.values()))
    peaks = [r["peak_allocated_bytes"] for r in per_seed.values() if r["peak_allocated_bytes"] is not None]
    reserved = [r["peak_reserved_bytes"] for r in per_seed.values() if r["peak_reserved_bytes"] is not None]
    metrics = {"method": method, "dataset": dataset, "seeds": list(p.data.seeds), "steps": first["steps"],
               "trainable_params": first["trainable_params"],
               "train_seconds_mean": statistics.mean(r["train_seconds"] for r in per_seed.values()),
               "peak_allocated_bytes": max(peaks) if peaks else None,
               "peak_reserved_bytes": max(reserved) if reserved else None,
               "saved_activation_bytes": first["saved_activation_bytes"],
               "step_ms_median": statistics.median(r["step_ms_median"] for r in per_seed.values()),
               "per_seed": {s: {"train_seconds": r["train_seconds"], "final_loss": r["final_loss"],
                                "peak_allocated_bytes": r["peak_allocated_bytes"],
                                "resumed_from": r["resumed_from"]} for s, r in per_seed.items()},
               **_common(p, device, first["is_pretrained"])}
    write_json(Path("metrics/train") / method / f"{dataset}.json", metrics)
    return metrics


# ---- evaluate ------------------------------------------------------------------------------------------------

def evaluate(p, method: str, dataset: str) -> dict:
    from .data import class_prompts, eval_loader, load_split
    from .evaluate import evaluate_method

    device = resolve_device(p.model.device)
    root = Path(p.data.root)
    split = load_split(split_path(dataset), root)
    dirs = {str(s): adapter_dir(method, dataset, s) for s in p.data.seeds}
    for d in dirs.values():
        if not (d / "adapter_config.json").exists():
            raise UserError(f"{d}: no adapters; run the train stage first (dvc repro train@{method}-{dataset})")

    def make_loader(size, mean, std):
        return eval_loader(split, root, size, mean, std, p.eval.batch_size, p.eval.workers)

    r = evaluate_method(base_dir=_base_of(method), adapter_dirs=dirs, prompts=class_prompts(split),
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
               "per_class": per_class, "n_test": r["n_test"], **_common(p, device, r["is_pretrained"])}
    write_json(Path("metrics/eval") / method / f"{dataset}.json", metrics)
    write_json(Path("plots/confusion") / method / f"{dataset}.json", r["confusion"])
    return metrics


# ---- profile -------------------------------------------------------------------------------------------------

def profile(p, method: str) -> dict:
    from .profile import isolated, measure, parse_batch

    device = resolve_device(p.model.device)
    base = _base_of(method)
    meta = read_json(base / "base.json")
    out = {"method": method, "arch": meta["arch"], "n_classes": p.profile.n_classes}
    for spec in p.profile.batches:
        micro, accum = parse_batch(spec)
        r = isolated(measure, p, method, base, micro, accum, p.profile.n_classes, p.profile.warmup,
                     p.profile.steps, device, device=device)
        out["static_bytes"] = r["static_bytes"]
        out["memory_allocated_bytes"] = r["memory_allocated_bytes"]
        out["trainable_params"] = r["trainable_params"]
        out["trainable_bytes"] = r["trainable_bytes"]
        out["step_mode"] = r["step_mode"]
        out[f"b{spec}"] = {k: r[k] for k in ("saved_activation_bytes", "peak_allocated_bytes",
                                             "peak_reserved_bytes", "step_ms")}
    out.update(_common(p, device, meta["is_pretrained"]))
    write_json(Path("metrics/profile") / f"{method}.json", out)
    return out
