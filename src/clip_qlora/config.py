"""params.yaml as one typed schema, checked before any heavy work.

Each bad value gives one line naming the key, the value and what is allowed (raised as UserError).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from clip_qlora.core import archs
from clip_qlora.runtime.io import UserError, bad_param as _bad

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept on CPU and CUDA
TOWERS = ("vision", "text")
TARGETS = ("q", "k", "v", "out")
TEMPLATES = ("clip", "coop")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # model.compute_dtype (or auto) -> torch's name
SCALINGS = ("rslora", "standard")
SCHEDULES = ("cosine", "constant")
BATCHINGS = ("epochs", "full")
ADAPTER_KERNELS = ("triton", "torch")  # core/qkv.py
SPLIT_DRAWS = ("clip_lora", "keyed")  # data/draw.py implements them (it imports this; config imports no data code)
DECODES = ("reference", "fast")  # data/images.py eval_batches


# The schema: every key, its type, no values. params.yaml is the one home of every value: DVC hashes only what is
# in params.yaml, so a default written here could change results without DVC noticing (and would drift from
# params.yaml). A key missing from a params file is an error naming it. A new key is one line in params.yaml,
# its field here and its check in `validate`.


@dataclass
class Data:
    root: str
    shots: int
    seeds: list
    download: bool
    template: str
    split_draw: str


@dataclass
class OwnDataset:
    """One entry of own_datasets: a dataset of the user's own (clip_qlora/data/folder.py reads it)."""
    folder: str
    template: str
    test_fraction: float
    classnames: Any  # None, or a file in the dataset folder


@dataclass
class Model:
    arch: str
    pretrained: str
    compute_dtype: str
    device: str
    quick_gelu: Any


@dataclass
class Quant:
    type: str
    double_quant: bool
    blocksize: int
    expand_absmax: bool


@dataclass
class Lora:
    r: int
    alpha: float
    dropout: float
    targets: list
    towers: list
    layers: Any
    scaling: str


@dataclass
class Train:
    iterations_per_shot: int
    batch_size: int
    grad_accum: int
    batching: str
    decode_short_side: float
    lr: float
    weight_decay: float
    schedule: str
    min_lr: float
    logit_scale: float
    fused_qkv: bool
    adapter_kernel: str

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


@dataclass
class Eval:
    batch_size: int
    decode: str


@dataclass
class Runtime:
    """Knobs that change speed and memory, never a trained or evaluated number (see params.yaml, dvc.yaml)."""
    cuda_graph: bool
    cublas_workspace_kib: int
    overlap_text: bool
    layernorm_in_compute_dtype: bool
    fused_activation: bool
    checkpoint_every: int
    eval_workers: int


@dataclass
class Profile:
    batches: list
    n_classes: int
    warmup: int
    steps: int


@dataclass
class Scale:
    archs: list
    batches: list
    n_classes: int
    warmup: int
    steps: int
    gpu_gib: list


@dataclass
class Params:
    datasets: list
    methods: list
    data: Data
    own_datasets: dict  # name -> OwnDataset
    model: Model
    quant: Quant
    lora: Lora
    train: Train
    eval: Eval
    runtime: Runtime
    profile: Profile
    scale: Scale


def _int(key, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(key, v, f"an integer >= {lo}")
    return v


def _num(key, v, lo=0.0, strict=True):
    if isinstance(v, str):  # YAML 1.1 reads 2e-4 (no dot) as a string; accept what a person means
        try:
            v = float(v)
        except ValueError:
            pass
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            or (v <= lo if strict else v < lo)):
        raise _bad(key, v, f"a number {'>' if strict else '>='} {lo}")
    return float(v)


def _choice(key, v, allowed):
    # type check too: 64.0 == 64 and True == 1 in Python, but bitsandbytes wants the int
    if v not in allowed or type(v) not in {type(a) for a in allowed}:
        raise _bad(key, v, f"one of {', '.join(map(str, allowed))}")
    return v


def _subset(key, v, allowed):
    if not isinstance(v, list) or not v or any(x not in allowed for x in v) or len(set(v)) != len(v):
        raise _bad(key, v, f"a non-empty list of distinct values from {', '.join(allowed)}")
    return v


def _bool(key, v):
    if not isinstance(v, bool):
        raise _bad(key, v, "true or false")
    return v


_BATCH = re.compile(r"([0-9]+)x([0-9]+)")


def parse_batch(spec: Any) -> tuple[int, int] | None:
    """A batch configuration, '4x8': (micro-batch, accumulation steps), both >= 1; None if `spec` is not one.
    The one reading of profile.batches and scale.batches, and of the profile metrics' keys after their 'b'."""
    m = _BATCH.fullmatch(spec) if isinstance(spec, str) else None
    if m is None or int(m[1]) < 1 or int(m[2]) < 1:
        return None
    return int(m[1]), int(m[2])


def _batch_spec(key, v):
    if parse_batch(v) is None:
        raise _bad(key, v, "strings like '4x8' (micro-batch x accumulation steps)")
    return v


def _missing(key: str) -> UserError:
    return UserError(f"params: missing key {key}: every key must be set in the params file "
                     f"(there are no defaults elsewhere; the study's params.yaml lists each one)")


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise _bad(prefix, raw, "a mapping")
    names = [f.name for f in fields(cls)]
    for k in raw:
        if k not in names:
            raise UserError(f"params: unknown key {prefix}.{k} (a typo?); known keys of {prefix}: "
                            f"{', '.join(sorted(names))}")
    for k in names:
        if k not in raw:
            raise _missing(f"{prefix}.{k}")
    return cls(**raw)


def validate(p: Params) -> Params:
    """Check every value against what the code accepts; raise one line naming the first bad key."""
    from clip_qlora.core.backends import METHODS  # the table only: backend modules (bitsandbytes) are imported on use
    from clip_qlora.data.registry import DATASETS

    p.own_datasets = _own_datasets(p.own_datasets, DATASETS)
    _subset("datasets", p.datasets, (*DATASETS, *p.own_datasets))
    _subset("methods", p.methods, tuple(METHODS))
    d = p.data
    if not isinstance(d.root, str) or not d.root:
        raise _bad("data.root", d.root, "a folder path")
    _int("data.shots", d.shots)
    if not isinstance(d.seeds, list) or not d.seeds or len(set(map(str, d.seeds))) != len(d.seeds):
        raise _bad("data.seeds", d.seeds, "a non-empty list of distinct integers")
    for s in d.seeds:
        _int("data.seeds", s, lo=0)
    _bool("data.download", d.download)
    _choice("data.template", d.template, TEMPLATES)
    _choice("data.split_draw", d.split_draw, SPLIT_DRAWS)
    m = p.model
    archs.check(m.arch, "model.arch")
    if not isinstance(m.pretrained, str) or not m.pretrained:
        raise _bad("model.pretrained", m.pretrained, "an open_clip tag (openai), a checkpoint path, or none")
    _choice("model.compute_dtype", m.compute_dtype, ("auto", *DTYPES))
    archs.check_quick_gelu(m.quick_gelu)
    if not (m.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(m.device))):
        raise _bad("model.device", m.device, "auto, cpu, cuda or cuda:N")
    q = p.quant
    _choice("quant.type", q.type, QUANT_TYPES)
    _bool("quant.double_quant", q.double_quant)
    _choice("quant.blocksize", q.blocksize, BLOCKSIZES)
    _bool("quant.expand_absmax", q.expand_absmax)
    lo = p.lora
    _int("lora.r", lo.r)
    lo.alpha = _num("lora.alpha", lo.alpha)
    if (isinstance(lo.dropout, bool) or not isinstance(lo.dropout, (int, float)) or not math.isfinite(lo.dropout)
            or not 0 <= lo.dropout < 1):
        raise _bad("lora.dropout", lo.dropout, "a number in [0, 1)")
    _subset("lora.targets", lo.targets, TARGETS)
    _subset("lora.towers", lo.towers, TOWERS)
    if lo.layers != "all":
        if (not isinstance(lo.layers, list) or not lo.layers
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in lo.layers)):
            raise _bad("lora.layers", lo.layers, "'all' or a non-empty list of block indices >= 0")
        depth = min(archs.tower_depth(m.arch, t) for t in lo.towers)
        if max(lo.layers) >= depth:
            raise _bad("lora.layers", lo.layers, f"block indices below {depth} ({m.arch} has {depth} blocks "
                                                 f"in the smallest adapted tower)")
    _choice("lora.scaling", lo.scaling, SCALINGS)
    t = p.train
    _int("train.iterations_per_shot", t.iterations_per_shot)
    _int("train.batch_size", t.batch_size)
    _int("train.grad_accum", t.grad_accum)
    if t.batch_size % t.grad_accum:
        raise _bad("train.grad_accum", t.grad_accum,
                   f"a divisor of train.batch_size ({t.batch_size}): micro-batch x accumulation must equal it")
    _choice("train.batching", t.batching, BATCHINGS)
    t.decode_short_side = _num("train.decode_short_side", t.decode_short_side, strict=False)
    if 0 < t.decode_short_side < 1:
        raise _bad("train.decode_short_side", t.decode_short_side,
                   "0 (full resolution) or at least 1 (x the model's input size): below it every crop is upsampled")
    t.lr = _num("train.lr", t.lr)
    t.weight_decay = _num("train.weight_decay", t.weight_decay, strict=False)
    _choice("train.schedule", t.schedule, SCHEDULES)
    t.min_lr = _num("train.min_lr", t.min_lr, strict=False)
    if t.min_lr > t.lr:
        raise _bad("train.min_lr", t.min_lr, f"at most train.lr ({t.lr})")
    t.logit_scale = _num("train.logit_scale", t.logit_scale)
    _bool("train.fused_qkv", t.fused_qkv)
    _choice("train.adapter_kernel", t.adapter_kernel, ADAPTER_KERNELS)
    _int("eval.batch_size", p.eval.batch_size)
    _choice("eval.decode", p.eval.decode, DECODES)
    r = p.runtime
    _bool("runtime.cuda_graph", r.cuda_graph)
    _int("runtime.cublas_workspace_kib", r.cublas_workspace_kib, lo=0)
    _bool("runtime.overlap_text", r.overlap_text)
    _bool("runtime.layernorm_in_compute_dtype", r.layernorm_in_compute_dtype)
    _bool("runtime.fused_activation", r.fused_activation)
    _int("runtime.checkpoint_every", r.checkpoint_every)
    if r.eval_workers == "auto":  # resolved where the stage runs: the cores it may use
        r.eval_workers = auto_eval_workers()
    elif isinstance(r.eval_workers, str):
        raise _bad("runtime.eval_workers", r.eval_workers, "auto or an integer >= 0")
    _int("runtime.eval_workers", r.eval_workers, lo=0)
    pr = p.profile
    if not isinstance(pr.batches, list) or not pr.batches:
        raise _bad("profile.batches", pr.batches, "a non-empty list like ['4x8', '32x1']")
    for b in pr.batches:
        _batch_spec("profile.batches", b)
    _int("profile.n_classes", pr.n_classes, lo=2)
    _int("profile.warmup", pr.warmup, lo=1)
    _int("profile.steps", pr.steps)
    _validate_scale(p.scale, lo.layers if lo.layers != "all" else None, lo.towers)
    return p


OWN_NAME = re.compile(r"[a-z][a-z0-9_]*")  # a stage name part (prepare@<name>) and a file name (<name>.json)


def _relative(key: str, v, what: str) -> str:
    from clip_qlora.data.layouts import escapes

    # "." would make data.root itself the dataset, every other dataset's folder one of its classes
    if not isinstance(v, str) or not PurePosixPath(v.strip()).parts or escapes(v):
        raise _bad(key, v, f"{what}, a relative path without '..'")
    return v


def _own_datasets(raw, builtin) -> dict[str, OwnDataset]:
    """own_datasets: name -> {folder, template, test_fraction, classnames}; null or {} = none."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad("own_datasets", raw, "a mapping of dataset name -> {folder, template, test_fraction, classnames} "
                                        "({} for none)")
    out = {}
    for name, entry in raw.items():
        key = f"own_datasets.{name}"
        if not isinstance(name, str) or not OWN_NAME.fullmatch(name):
            raise _bad("own_datasets", name, "dataset names of lower-case letters, digits and underscores, starting "
                                             "with a letter")
        if name in builtin:
            raise UserError(f"params: {key}: {name!r} is a built-in dataset; give your own dataset another name")
        e = entry if isinstance(entry, OwnDataset) else _build(OwnDataset, entry, key)
        _relative(f"{key}.folder", e.folder, "a folder under data.root")
        try:
            ok = isinstance(e.template, str) and "{}" in e.template and e.template.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _bad(f"{key}.template", e.template, "a prompt with one {} where the class name goes, e.g. "
                                                      "'a photo of a {}.'")
        if (isinstance(e.test_fraction, bool) or not isinstance(e.test_fraction, (int, float))
                or not 0 < e.test_fraction < 1):
            raise _bad(f"{key}.test_fraction", e.test_fraction, "a number between 0 and 1 (the share of each "
                                                                "class's images held out for testing)")
        # at the top of the dataset folder: in a subfolder it would sit in a class folder
        if e.classnames is not None and (not isinstance(e.classnames, str) or not e.classnames.strip()
                                         or "/" in e.classnames or "\\" in e.classnames
                                         or e.classnames in (".", "..")):
            raise _bad(f"{key}.classnames", e.classnames, "null or the name of a file at the top of the dataset "
                                                          "folder")
        out[name] = e
    return out


def _validate_scale(sc: Scale, layers: list | None, towers: list) -> None:
    if not isinstance(sc.archs, list) or not sc.archs or len(set(map(str, sc.archs))) != len(sc.archs):
        raise _bad("scale.archs", sc.archs, "a non-empty list of distinct open_clip architectures")
    for a in sc.archs:
        archs.check(a, "scale.archs")
        depth = min(archs.tower_depth(a, t) for t in towers)
        if layers is not None and max(layers) >= depth:
            raise _bad("lora.layers", layers, f"block indices below {depth} (scale.archs has {a}, {depth} blocks "
                                              f"in the smallest adapted tower)")
    if not isinstance(sc.batches, list) or not sc.batches:
        raise _bad("scale.batches", sc.batches, "a non-empty list like ['4x8', '32x1']")
    for b in sc.batches:
        _batch_spec("scale.batches", b)
    if len(set(sc.batches)) != len(sc.batches):
        raise _bad("scale.batches", sc.batches, "distinct configurations")
    _int("scale.n_classes", sc.n_classes, lo=2)
    _int("scale.warmup", sc.warmup, lo=1)
    _int("scale.steps", sc.steps)
    sizes = sc.gpu_gib
    if (not isinstance(sizes, list) or not sizes
            or any(isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0
                   for g in sizes)
            or sorted(set(sizes)) != sizes):
        raise _bad("scale.gpu_gib", sizes, "a non-empty increasing list of GPU sizes in GiB, e.g. [8, 16, 24]")


def parse(raw: Any) -> Params:
    """Turn the loaded YAML mapping into Params, refusing unknown keys (likely typos) and missing ones."""
    if raw is None:
        raise UserError(f"params: the file is empty; expected the groups {', '.join(f.name for f in fields(Params))} "
                        f"(copy them from the study's params.yaml)")
    if not isinstance(raw, dict):
        raise UserError("params: the file must hold a mapping of groups (datasets, methods, data, ...)")
    top = {f.name: f for f in fields(Params)}
    groups = {k: v for k, v in typing.get_type_hints(Params).items() if dataclasses.is_dataclass(v)}
    for k in raw:
        if k not in top:
            raise UserError(f"params: unknown key {k} (a typo?); known keys: {', '.join(top)}")
    kw = {}
    for k in top:
        if k not in raw:
            raise _missing(k)
        kw[k] = _build(groups[k], raw[k], k) if k in groups else raw[k]
    return Params(**kw)


def _read(path: Path) -> Any:
    if not path.exists():
        raise UserError(f"{path}: params file not found (run from the project folder or pass --params)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{where}") from None


def load(path: str | Path = "params.yaml") -> Params:
    """Read, parse and validate params; the only entry point stages use."""
    return validate(parse(_read(Path(path))))


class Undeclared(AttributeError):
    """A stage read a params key that its dvc.yaml entry does not list: DVC would not rerun it when that
    key changes. A programming error (add the key to the stage's PARAMS and to dvc.yaml), not a user's."""


class _Declared:
    """What a stage declared, by name: the top level of params, or a group of which it declared only some keys
    (`data.root`, not all of `data`). Reading any other name raises Undeclared."""

    def __init__(self, values: dict, where: str, stage: str):
        self._values, self._where, self._stage = values, where, stage

    def __getattr__(self, key: str):
        if key.startswith("_"):  # our own fields before unpickling restores them, copy/pickle probing
            raise AttributeError(key)
        if key not in self._values:
            raise Undeclared(f"stage {self._stage} read {self._where}{key}, which its dvc.yaml params do not list")
        return self._values[key]


# Read by every stage though dvc.yaml lists them only where they are inputs: they name the stage instances
# (matrix/foreach over ${methods} and ${datasets}), so DVC already reruns what a change to them touches.
INSTANCE_KEYS = ("datasets", "methods")


def declared(p: Params, keys, stage: str):
    """`p` as stage `stage` may read it: only `keys` (dvc.yaml's `params:` of the stage: a group, `group.key`,
    or a top-level key) and INSTANCE_KEYS; anything else raises Undeclared when read."""
    wanted: dict[str, set | None] = {}
    for k in (*keys, *INSTANCE_KEYS):
        group, _, key = k.partition(".")
        if not key:
            wanted[group] = None
        elif wanted.get(group, set()) is not None:
            wanted.setdefault(group, set()).add(key)
    groups = {g: getattr(p, g) if ks is None else _Declared({k: getattr(getattr(p, g), k) for k in ks}, f"{g}.", stage)
              for g, ks in wanted.items()}
    return _Declared(groups, "", stage)


def auto_eval_workers() -> int:
    """`runtime.eval_workers: auto`: the CPU cores this process may run on, at most 16. The reference decode
    path (PIL in DataLoader workers) needs them to keep a GPU fed; 16 fed an H200 1,690 test images/s
    (README, evaluation input). 0 (decode in the stage's own process) on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 0 if cores <= 1 else min(cores, 16)


def check_params(path: str | Path = "params.yaml") -> Params:
    """Everything `dvc repro` could trip on in params, checked before DVC runs (and so before it deletes any
    stage's outputs): every group of the file, as `load` does, without importing torch. Also creates data.root
    when missing: every prepare stage depends on it, and DVC refuses a dependency that does not exist, even
    where prepare itself would generate or download the data into it. `python -m stages check` runs this."""
    p = load(path)
    (Path(path).parent / p.data.root).mkdir(parents=True, exist_ok=True)  # DVC reads it beside params.yaml
    return p


# The study's params.yaml in a source checkout (src/clip_qlora/config.py -> the project root).
STUDY_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def load_with(overrides: dict[str, Any] | None = None, path: str | Path = STUDY_PARAMS) -> Params:
    """The study's params.yaml with dotted-key overrides ({"model.arch": "clip-tiny", "datasets": [...]}),
    parsed and validated like `load`: how tests and benchmarks get params without a second set of defaults."""
    raw = copy.deepcopy(_read(Path(path)))
    for key, value in (overrides or {}).items():
        *groups, last = key.split(".")
        node = raw
        for g in groups:
            if not isinstance(node.get(g), dict):
                raise UserError(f"params: override {key}: {g} is not a group of {path}")
            node = node[g]
        node[last] = value
    return validate(parse(raw))


def require_member(key: str, value: str, allowed) -> None:
    """A stage argument must name something params.yaml lists (so DVC tracks what the stage reads)."""
    if value not in allowed:
        raise UserError(f"--{key} {value!r}: expected one of {', '.join(map(str, allowed))} (from params)")
