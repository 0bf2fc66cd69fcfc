"""The aggregate stage's inputs: every per-stage file read and checked before anything is written.

Inputs (written by the quantize, train, evaluate, zeroshot and profile stages; numbers may be null where
unmeasured):
    metrics/static/<base>.json, metrics/train/<method>/<dataset>.json,
    metrics/eval/<method>/<dataset>.json, metrics/zeroshot/<base>.json, metrics/profile/<method>.json,
    dvclive/train/<method>/<dataset>/seed<k>/plots/metrics/train/loss.tsv,
    plots/confusion/<method>/<dataset>.json
A missing or malformed file is one line naming it (UserError).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from clip_qlora.config import parse_batch
from clip_qlora.core.backends import METHODS
from clip_qlora.runtime.io import UserError, read_json

GIB = 1024**3
TRAIN_ROW = "training"  # the pseudo batch config of the rows measured during the training stage


def _num(d: dict, key: str, path: Path, *, nullable: bool = False, integer: bool = False):
    if not isinstance(d, dict) or key not in d:
        raise UserError(f"{path}: missing key '{key}'")
    v = d[key]
    if v is None and nullable:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise UserError(f"{path}: '{key}' must be {kind}{' or null' if nullable else ''}, got {v!r}")
    if isinstance(v, float) and math.isnan(v):
        return None if nullable else v
    return v


def _bool(d: dict, key: str, path: Path) -> bool:
    if key not in d or not isinstance(d[key], bool):
        raise UserError(f"{path}: '{key}' must be true or false")
    return d[key]


def _obj(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _check_ids(data: dict, path: Path, **expected: str) -> None:
    for key, want in expected.items():
        if key in data and data[key] != want:
            raise UserError(f"{path}: '{key}' is {data[key]!r} but the file is for {want!r}")


@dataclass
class Inputs:
    methods: list[str]
    datasets: list[str]
    static: dict[str, dict] = field(default_factory=dict)  # base -> static file
    train: dict[tuple[str, str], dict] = field(default_factory=dict)
    eval: dict[tuple[str, str], dict] = field(default_factory=dict)
    zeroshot: dict[tuple[str, str], dict] = field(default_factory=dict)  # (base, dataset) -> its results
    profile: dict[str, dict] = field(default_factory=dict)
    batches: list[str] = field(default_factory=list)  # union of profile batch keys, in file order
    pretrained: bool = True
    devices: list[str] = field(default_factory=list)
    n_seeds: list[int] = field(default_factory=list)


def load(methods: list[str], datasets: list[str], metrics_dir: Path) -> Inputs:
    if not methods:
        raise UserError("aggregate: no methods given")
    if not datasets:
        raise UserError("aggregate: no datasets given")
    for m in methods:
        if m not in METHODS:
            raise UserError(f"aggregate: unknown method {m!r} (known: {', '.join(METHODS)})")
    if len(set(methods)) != len(methods) or len(set(datasets)) != len(datasets):
        raise UserError("aggregate: methods and datasets must not repeat")
    inp = Inputs(methods=list(methods), datasets=list(datasets))
    flags: list[bool] = []

    def device(data: dict, path: Path) -> None:
        dev = data.get("device")
        if not isinstance(dev, str):
            raise UserError(f"{path}: 'device' must be a string")
        if dev not in inp.devices:
            inp.devices.append(dev)

    for base in dict.fromkeys(METHODS[m].base for m in methods):
        path = metrics_dir / "static" / f"{base}.json"
        data = _obj(path)
        _check_ids(data, path, base=base)
        _num(data, "stored_base_bytes", path, integer=True)
        _num(data, "memory_allocated_bytes", path, nullable=True, integer=True)
        flags.append(_bool(data, "pretrained", path))
        device(data, path)
        inp.static[base] = data
        path = metrics_dir / "zeroshot" / f"{base}.json"
        data = _obj(path)
        _check_ids(data, path, base=base)
        flags.append(_bool(data, "pretrained", path))
        per_dataset = data.get("datasets")
        if not isinstance(per_dataset, dict):
            raise UserError(f"{path}: 'datasets' must be an object of dataset -> zero-shot results")
        for ds in datasets:
            if ds not in per_dataset:
                raise UserError(f"{path}: no zero-shot result for dataset {ds!r}; rerun the zeroshot stage "
                                f"(dvc repro zeroshot@{base})")
            entry = per_dataset[ds]
            _num(entry, "zero_shot_accuracy", path, nullable=True)
            sets = entry.get("zero_shot") if isinstance(entry, dict) else None
            if not isinstance(sets, dict) or not sets:
                raise UserError(f"{path}: datasets.{ds}.zero_shot must be a non-empty object of prompt set -> "
                                f"accuracy")
            for name in sets:
                _num(sets, name, path, nullable=True)
            inp.zeroshot[base, ds] = entry

    for m in methods:
        for ds in datasets:
            path = metrics_dir / "train" / m / f"{ds}.json"
            data = _obj(path)
            _check_ids(data, path, method=m, dataset=ds)
            _num(data, "train_seconds_mean", path)
            _num(data, "step_ms_median", path, nullable=True)
            _num(data, "trainable_params", path, nullable=True, integer=True)
            for key in ("peak_allocated_bytes", "peak_reserved_bytes", "saved_activation_bytes"):
                _num(data, key, path, nullable=True, integer=True)
            flags.append(_bool(data, "pretrained", path))
            device(data, path)
            inp.train[m, ds] = data

            path = metrics_dir / "eval" / m / f"{ds}.json"
            data = _obj(path)
            _check_ids(data, path, method=m, dataset=ds)
            _num(data, "accuracy_mean", path)
            _num(data, "accuracy_std", path, nullable=True)
            acc = data.get("accuracy")
            if not isinstance(acc, dict) or not acc:
                raise UserError(f"{path}: 'accuracy' must be a non-empty object of seed -> accuracy")
            inp.n_seeds.append(len(acc))
            flags.append(_bool(data, "pretrained", path))
            inp.eval[m, ds] = data

        path = metrics_dir / "profile" / f"{m}.json"
        data = _obj(path)
        _check_ids(data, path, method=m)
        _num(data, "device_base_bytes", path, integer=True)
        flags.append(_bool(data, "pretrained", path))
        device(data, path)
        for key, val in data.items():
            if is_batch_key(key):
                if not isinstance(val, dict):
                    raise UserError(f"{path}: '{key}' must be an object")
                _num(val, "step_ms", path / key, nullable=True)
                for k in ("peak_allocated_bytes", "peak_reserved_bytes", "saved_activation_bytes"):
                    if k in val:
                        _num(val, k, path / key, nullable=True, integer=True)
                if key not in inp.batches:
                    inp.batches.append(key)
        inp.profile[m] = data

    inp.pretrained = all(flags)
    return inp


def is_batch_key(key: str) -> bool:
    """`b<micro>x<accum>`, e.g. b4x8, b32x1."""
    return key.startswith("b") and parse_batch(key[1:]) is not None


def batch_label(key: str) -> str:
    return key[1:] if is_batch_key(key) else key


def read_loss(path: Path) -> list[tuple[float, float]]:
    if not path.exists():
        raise UserError(f"{path}: file not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        if not reader.fieldnames or "step" not in reader.fieldnames or "loss" not in reader.fieldnames:
            raise UserError(f"{path}: expected tab-separated columns 'step' and 'loss'")
        out = []
        for i, row in enumerate(reader, start=2):
            try:
                out.append((float(row["step"]), float(row["loss"])))
            except (TypeError, ValueError):
                raise UserError(f"{path}: line {i}: step and loss must be numbers") from None
    return out


def confusion_records(path: Path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list) or not all(
            isinstance(r, dict) and "actual" in r and "predicted" in r for r in data):
        raise UserError(f"{path}: expected a list of {{\"actual\": ..., \"predicted\": ...}} records")
    return [{"actual": r["actual"], "predicted": r["predicted"]} for r in data]
