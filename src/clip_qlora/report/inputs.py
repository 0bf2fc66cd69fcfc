"""The aggregate stage's inputs: every per-stage file read and checked before anything is written.

Inputs (written by the quantize, train, evaluate, zeroshot and profile stages, each file's fields and path in
clip_qlora.metrics; numbers may be null where unmeasured), under the project folder `root`:
    metrics/static/<base>.json, metrics/train/<method>/<dataset>.json,
    metrics/eval/<method>/<dataset>.json, metrics/zeroshot/<base>.json, metrics/profile/<method>.json,
    dvclive/train/<method>/<dataset>/seed<k>/plots/metrics/train/loss.tsv,
    plots/confusion/<method>/<dataset>.json
A missing or malformed file is one line naming it (UserError).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from clip_qlora.config import parse_batch
from clip_qlora.core.backends import METHODS
from clip_qlora.metrics import Eval, Profile, Static, Train, Zeroshot, ZeroshotDataset
from clip_qlora.runtime.io import UserError, read_json

GIB = 1024**3
TRAIN_ROW = "training"  # the pseudo batch config of the rows measured during the training stage


@dataclass
class Inputs:
    methods: list[str]
    datasets: list[str]
    static: dict[str, Static] = field(default_factory=dict)  # base -> its file
    train: dict[tuple[str, str], Train] = field(default_factory=dict)
    eval: dict[tuple[str, str], Eval] = field(default_factory=dict)
    zeroshot: dict[tuple[str, str], ZeroshotDataset] = field(default_factory=dict)  # (base, dataset) -> results
    profile: dict[str, Profile] = field(default_factory=dict)
    batches: list[str] = field(default_factory=list)  # union of profile batch keys, in file order
    pretrained: bool = True
    devices: list[str] = field(default_factory=list)
    n_seeds: list[int] = field(default_factory=list)


def load(methods: list[str], datasets: list[str], root: Path) -> Inputs:
    """Every input of the report, from the project folder `root` (holding metrics/)."""
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

    def device(dev: str) -> None:
        if dev not in inp.devices:
            inp.devices.append(dev)

    for base in dict.fromkeys(METHODS[m].base for m in methods):
        static = inp.static[base] = Static.read(Static.path(base, root=root))
        flags.append(static.common.pretrained)
        device(static.common.device)
        path = Zeroshot.path(base, root=root)
        zs = Zeroshot.read(path)
        flags.append(zs.common.pretrained)
        for ds in datasets:
            if ds not in zs.datasets:
                raise UserError(f"{path}: no zero-shot result for dataset {ds!r}; rerun the zeroshot stage "
                                f"(dvc repro {Zeroshot.stage(base)})")
            if not zs.datasets[ds].zero_shot:
                raise UserError(f"{path}: datasets.{ds}.zero_shot must be a non-empty object of prompt set -> "
                                f"accuracy")
            inp.zeroshot[base, ds] = zs.datasets[ds]

    for m in methods:
        for ds in datasets:
            train = inp.train[m, ds] = Train.read(Train.path(m, ds, root=root))
            flags.append(train.common.pretrained)
            device(train.common.device)
            path = Eval.path(m, ds, root=root)
            ev = inp.eval[m, ds] = Eval.read(path)
            if not ev.accuracy:
                raise UserError(f"{path}: 'accuracy' must be a non-empty object of seed -> accuracy")
            inp.n_seeds.append(len(ev.accuracy))
            flags.append(ev.common.pretrained)
        prof = inp.profile[m] = Profile.read(Profile.path(m, root=root))
        flags.append(prof.common.pretrained)
        device(prof.common.device)
        inp.batches += [key for key in prof.batches if key not in inp.batches]

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
