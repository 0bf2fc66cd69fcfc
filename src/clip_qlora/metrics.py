"""Every metrics file's contract, in one place: where it lives, its fields in file order, their types.

A stage writes its file by building its record here and calling `write()`; the report reads it back with
`read()`, which checks every field and says in one line which file and which field is missing or wrong (a file
written by an older version names the field it lacks and the command that writes it again). dvc.yaml declares
the same paths; tests/test_metrics.py checks that the two agree.

    Static    metrics/static/<base>.json               quantize@<base>
    Train     metrics/train/<method>/<dataset>.json     train@<method>-<dataset>
    Eval      metrics/eval/<method>/<dataset>.json      evaluate@<method>-<dataset>
    Zeroshot  metrics/zeroshot/<base>.json              zeroshot@<base>
    Profile   metrics/profile/<method>.json             profile@<method>
    Scale     metrics/scale/<arch>.json                 scale@<arch>
    Summary   metrics/summary.json                      aggregate

The JSON is the records' fields in declaration order (so the order of a dataclass's fields is the order of the
keys in its file). A field declared with `inline()` has no key of its own: its entries sit among the record's
keys, at its place (the `Common` fields of every stage's file, the profile's `b<micro>x<accum>` entries).
Values are checked, never converted: what a record holds is what its file says, byte for byte.
"""
from __future__ import annotations

import dataclasses
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from clip_qlora.runtime.io import UserError, device_name, read_json, remake, versions, write_json


def inline(select: Callable[[str], bool] | None = None):
    """A field whose entries sit among the record's own keys: a nested record's fields (`select` None), or
    a dict of the keys that are not the record's own fields and that `select` accepts."""
    return field(metadata={"inline": select or True})


class _Invalid(Exception):
    def __init__(self, problem: str, missing: bool = False):
        super().__init__(problem)
        self.missing = missing


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "an object"}


def _is(value, kind) -> bool:
    if kind in (int, float) and isinstance(value, bool):  # JSON's true is no number
        return False
    if kind is float:  # a number: a whole one may have been written as an integer
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _check(value, tp, where: str):
    """value, checked against the type hint tp; where: its dotted name in the file."""
    nullable = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if nullable:
        if value is None:
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    kind, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if isinstance(kind, type) and issubclass(kind, Fields):
        if not isinstance(value, dict):
            raise _Invalid(f"field '{where}' must be an object{' or null' if nullable else ''}, got {_short(value)}")
        return kind._build(value, where + ".")
    if not _is(value, kind):
        raise _Invalid(f"field '{where}' must be {_KINDS[kind]}{' or null' if nullable else ''}, got {_short(value)}")
    if kind is list and args:
        return [_check(v, args[0], f"{where}.{i}") for i, v in enumerate(value)]
    if kind is dict and args:
        return {k: _check(v, args[1], f"{where}.{k}") for k, v in value.items()}
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain(value):
    if isinstance(value, Fields):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Fields:
    """A dataclass that becomes a JSON object and is checked back from one (its type hints say how)."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = _plain(getattr(self, f.name))
            if f.metadata.get("inline"):
                out.update(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def own_keys(cls) -> list[str]:
        """The file keys of the record's fields: an inline record's in its place; not an inline dict's entries,
        whose names the file chooses."""
        hints = typing.get_type_hints(cls)
        keys = []
        for f in dataclasses.fields(cls):
            select = f.metadata.get("inline")
            if select is True:
                keys += hints[f.name].own_keys()
            elif not select:
                keys.append(f.name)
        return keys

    @classmethod
    def _build(cls, data: dict, prefix: str = ""):
        hints = typing.get_type_hints(cls)
        own = set(cls.own_keys())
        taken, values = set(own), {}
        for f in dataclasses.fields(cls):
            tp, select = hints[f.name], f.metadata.get("inline")
            if select is True:
                values[f.name] = tp._build({k: data[k] for k in tp.own_keys() if k in data}, prefix)
            elif select:
                _, entry = typing.get_args(tp)
                values[f.name] = {k: _check(v, entry, prefix + k) for k, v in data.items()
                                  if k not in own and select(k)}
                taken |= set(values[f.name])
            elif f.name not in data:
                raise _Invalid(f"missing field '{prefix}{f.name}'", missing=True)
            else:
                values[f.name] = _check(data[f.name], tp, prefix + f.name)
        extra = [k for k in data if k not in taken]
        if extra:
            raise _Invalid(f"unexpected field '{prefix}{extra[0]}'")
        return cls(**values)

    @classmethod
    def from_dict(cls, data, where: str, stage: str | None = None):
        """The record `data` holds, checked; a bad field is a UserError naming `where` and the field (and what
        to rerun: `stage`)."""
        try:
            if not isinstance(data, dict):
                raise _Invalid(f"expected a JSON object, got {type(data).__name__}")
            return cls._build(data)
        except _Invalid as e:
            rerun = "" if stage is None else (f" (written by an older version? rerun: dvc repro {stage})" if e.missing
                                              else f" (rerun: dvc repro {stage})")
            raise UserError(f"{where}: {e}{rerun}") from None


class MetricsFile(Fields):
    """A record with a file of its own: PATTERN its path (ids in braces, fields of the record), STAGE the DVC
    stage that writes it."""

    PATTERN: ClassVar[str]
    STAGE: ClassVar[str]

    @classmethod
    def id_names(cls) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(cls.PATTERN) if name]

    @classmethod
    def path(cls, *ids: str, root: str | Path = ".") -> Path:
        """The file of these ids (in PATTERN's order), under the project folder `root`."""
        names = cls.id_names()
        if len(ids) != len(names):
            raise TypeError(f"{cls.__name__}.path takes {', '.join(names) or 'no ids'}, got {ids!r}")
        return Path(root) / cls.PATTERN.format(**dict(zip(names, ids)))

    @classmethod
    def stage(cls, *ids: str) -> str:
        return cls.STAGE.format(**dict(zip(cls.id_names(), ids)))

    @classmethod
    def ids_of(cls, path: Path) -> tuple[str, ...] | None:
        """The ids a path names (from its last components, as PATTERN places them), or None if it does not."""
        names = cls.id_names()
        tail = [p for p in cls.PATTERN.split("/") if "{" in p]
        if not tail:
            return ()
        got = {}
        for pattern, part in zip(tail, Path(path).parts[-len(tail):]):
            rx = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+)", re.escape(pattern))
            m = re.fullmatch(rx, part)
            if m is None:
                return None
            got.update(m.groupdict())
        return tuple(got[n] for n in names) if len(got) == len(names) else None

    def write(self, root: str | Path = ".") -> Path:
        """Write the file (atomically: the previous one stays whole until the new one replaces it)."""
        path = self.path(*(getattr(self, n) for n in self.id_names()), root=root)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, path: str | Path):
        """The record in `path`, every field checked; one line naming the file and the field otherwise."""
        path = Path(path)
        ids = cls.ids_of(path)
        stage = cls.stage(*ids) if ids is not None else cls.STAGE.format(**{n: f"<{n}>" for n in cls.id_names()})
        if not path.exists():
            raise UserError(f"{path}: missing; run the {stage.partition('@')[0]} stage first (dvc repro {stage})")
        record = cls.from_dict(read_json(path, remake(stage)), str(path), stage)
        for name, want in zip(cls.id_names(), ids or ()):
            if getattr(record, name) != want:
                raise UserError(f"{path}: '{name}' is {getattr(record, name)!r} but the file is for {want!r}")
        return record


# ---- what every stage records -------------------------------------------------------------------------------

@dataclass
class Common(Fields):
    """What every stage's file records about the run that wrote it: real weights or not, the activation that
    ran (from the base's meta), the device and the library versions."""
    pretrained: bool
    activation: str
    device: str
    versions: dict[str, str]

    @classmethod
    def of(cls, device: str, meta: dict) -> Common:
        return cls(pretrained=bool(meta["is_pretrained"]), activation=meta["activation"],
                   device=device_name(device), versions=versions())


# ---- the files ----------------------------------------------------------------------------------------------

@dataclass
class Static(MetricsFile):
    """The base as stored (the quantize stage): comparable with the original study's static figures."""
    PATTERN: ClassVar[str] = "metrics/static/{base}.json"
    STAGE: ClassVar[str] = "quantize@{base}"
    base: str
    stored_base_bytes: int
    memory_allocated_bytes: int | None  # null off CUDA
    arch: str
    compute_dtype: str
    quant: dict | None  # the backend's settings (null for bf16)
    common: Common = inline()


@dataclass
class TrainSeed(Fields):
    train_seconds: float
    final_loss: float | None
    peak_allocated_bytes: int | None
    resumed_from: int  # the step a checkpoint resumed from (0: uninterrupted)


@dataclass
class Train(MetricsFile):
    """Every seed's training run of one method on one dataset."""
    PATTERN: ClassVar[str] = "metrics/train/{method}/{dataset}.json"
    STAGE: ClassVar[str] = "train@{method}-{dataset}"
    method: str
    dataset: str
    seeds: list[int]
    steps: int
    trainable_params: int
    train_seconds_mean: float
    peak_allocated_bytes: int | None  # the seeds' maximum; null off CUDA
    peak_reserved_bytes: int | None
    saved_activation_bytes: int
    train_images_bytes: int
    protocol: dict  # protocol.record: what ran, for the report's deviations
    step_ms_median: float | None
    per_seed: dict[str, TrainSeed]
    common: Common = inline()


@dataclass
class Eval(MetricsFile):
    """Accuracy of every seed's adapters of one method on one dataset's test split."""
    PATTERN: ClassVar[str] = "metrics/eval/{method}/{dataset}.json"
    STAGE: ClassVar[str] = "evaluate@{method}-{dataset}"
    method: str
    dataset: str
    seeds: list[int]
    accuracy_mean: float
    accuracy_std: float
    accuracy: dict[str, float]  # seed -> top-1 %
    per_class: dict[str, float | None]  # class -> mean over seeds; null for a class absent from the test split
    n_test: int
    passes: int
    eval_decode: str
    common: Common = inline()


@dataclass
class ZeroshotDataset(Fields):
    zero_shot_accuracy: float | None  # with the prompts training used (data.template)
    zero_shot: dict[str, float | None]  # prompt set -> accuracy
    n_test: int


@dataclass
class Zeroshot(MetricsFile):
    """One base's zero-shot accuracy on every dataset (the methods on that base share it)."""
    PATTERN: ClassVar[str] = "metrics/zeroshot/{base}.json"
    STAGE: ClassVar[str] = "zeroshot@{base}"
    base: str
    datasets: dict[str, ZeroshotDataset]
    eval_decode: str
    common: Common = inline()


@dataclass
class ProfileBatch(Fields):
    saved_activation_bytes: int | None
    peak_allocated_bytes: int | None  # null off CUDA
    peak_reserved_bytes: int | None
    step_ms: float | None


@dataclass
class Profile(MetricsFile):
    """One method's controlled memory/time profile at each profile.batches configuration."""
    PATTERN: ClassVar[str] = "metrics/profile/{method}.json"
    STAGE: ClassVar[str] = "profile@{method}"
    method: str
    arch: str
    n_classes: int
    device_base_bytes: int
    memory_allocated_bytes: int | None
    trainable_params: int
    trainable_bytes: int
    step_mode: str
    batches: dict[str, ProfileBatch] = inline(lambda key: True)  # "b<micro>x<accum>" -> its figures
    common: Common = inline()


@dataclass
class ScaleMethod(Fields):
    base: str
    gradient_checkpointing: bool
    # "b<micro>x<accum>" -> {"fits": true, the profile's fields...} | {"fits": false, "gpu_gib"} | {"error"}:
    # three shapes, checked by the scale report (report/scale.py)
    configs: dict[str, dict] = inline(lambda key: True)


@dataclass
class Scale(MetricsFile):
    """What each method needs in memory and time on one architecture (random weights); see jobs/scale.py."""
    PATTERN: ClassVar[str] = "metrics/scale/{arch}.json"
    STAGE: ClassVar[str] = "scale@{arch}"
    arch: str
    params: int
    n_classes: int
    batches: list[str]
    warmup: int
    steps: int
    compute_dtype: str
    device: str
    gpu_gib: float | None
    pretrained: bool
    lora: dict
    versions: dict[str, str]
    methods: dict[str, ScaleMethod]


@dataclass
class Summary(MetricsFile):
    """The aggregate's summary for `dvc metrics`: every leaf a number, string or bool (nulls left out)."""
    PATTERN: ClassVar[str] = "metrics/summary.json"
    STAGE: ClassVar[str] = "aggregate"
    pretrained: bool
    device: str
    n_seeds: int
    n_datasets: int
    datasets: str  # comma-separated
    methods: str
    per_method: dict[str, dict] = inline(lambda key: "_vs_" not in key)  # method -> its means and peaks
    best_method: str
    comparisons: dict[str, dict] = inline(lambda key: "_vs_" in key)  # "<method>_vs_lora" -> ratios


FILES = (Static, Train, Eval, Zeroshot, Profile, Scale, Summary)
