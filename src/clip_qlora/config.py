"""params.yaml as one typed schema, checked before any heavy work.

Each bad value gives one line naming the key, the value and what is allowed (raised as UserError).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .io import UserError

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept on CPU and CUDA
TOWERS = ("vision", "text")
TARGETS = ("q", "k", "v", "out")
TEMPLATES = ("clip", "coop")
DTYPES = ("auto", "bf16", "fp16", "fp32")
SCALINGS = ("rslora", "standard")
SCHEDULES = ("cosine", "constant")
BATCHINGS = ("epochs", "full")
SPLIT_DRAWS = ("clip_lora", "keyed")  # data/draw.py DRAWS; repeated here so params load imports no data code


@dataclass
class Data:
    root: str = "data/raw"
    shots: int = 4
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    download: bool = False
    template: str = "clip"
    split_draw: str = "clip_lora"


@dataclass
class Model:
    arch: str = "ViT-B-16"
    pretrained: str = "openai"
    compute_dtype: str = "auto"
    device: str = "auto"
    quick_gelu: Any = "auto"


@dataclass
class Quant:
    type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64


@dataclass
class Lora:
    r: int = 2
    alpha: float = 1
    dropout: float = 0.25
    targets: list = field(default_factory=lambda: ["q", "k", "v"])
    towers: list = field(default_factory=lambda: ["vision", "text"])
    layers: Any = "all"
    scaling: str = "rslora"


@dataclass
class Train:
    iterations_per_shot: int = 500
    batch_size: int = 32
    grad_accum: int = 1
    batching: str = "epochs"
    decode_short_side: float = 2.0
    lr: float = 2e-4
    weight_decay: float = 1e-2
    schedule: str = "cosine"
    min_lr: float = 1e-6
    logit_scale: float = 100.0
    checkpoint_every: int = 500
    cuda_graph: bool = True
    cublas_workspace_kib: int = 1024
    expand_absmax: bool = True
    overlap_text: bool = True

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


@dataclass
class Eval:
    batch_size: int = 128
    workers: int = 2


@dataclass
class Profile:
    batches: list = field(default_factory=lambda: ["4x8", "32x1"])
    n_classes: int = 100
    warmup: int = 3
    steps: int = 20


@dataclass
class Scale:
    archs: list = field(default_factory=lambda: ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14",
                                                 "ViT-bigG-14"])
    batches: list = field(default_factory=lambda: ["4x8", "32x1"])
    n_classes: int = 100
    warmup: int = 1
    steps: int = 5
    gpu_gib: list = field(default_factory=lambda: [8, 12, 16, 24, 48, 80])


@dataclass
class Params:
    datasets: list = field(default_factory=list)
    methods: list = field(default_factory=lambda: ["lora", "lora_gc", "qlora", "qlora_gc"])
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    quant: Quant = field(default_factory=Quant)
    lora: Lora = field(default_factory=Lora)
    train: Train = field(default_factory=Train)
    eval: Eval = field(default_factory=Eval)
    profile: Profile = field(default_factory=Profile)
    scale: Scale = field(default_factory=Scale)


def _bad(key: str, value: Any, allowed: str) -> UserError:
    return UserError(f"params: {key} = {value!r}: expected {allowed}")


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


def _batch_spec(key, v):
    try:
        micro, accum = (int(x) for x in str(v).split("x"))
        assert micro >= 1 and accum >= 1
    except (ValueError, AssertionError):
        raise _bad(key, v, "strings like '4x8' (micro-batch x accumulation steps)") from None
    return v


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise _bad(prefix, raw, "a mapping")
    names = {f.name for f in fields(cls)}
    for k in raw:
        if k not in names:
            raise UserError(f"params: unknown key {prefix}.{k} (a typo?); known keys of {prefix}: "
                            f"{', '.join(sorted(names))}")
    return cls(**raw)


def validate(p: Params, known_datasets, known_archs) -> Params:
    from .backends import METHODS  # late import: backends pull in bitsandbytes

    _subset("datasets", p.datasets, tuple(known_datasets))
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
    _choice("model.arch", m.arch, tuple(known_archs))
    if not isinstance(m.pretrained, str) or not m.pretrained:
        raise _bad("model.pretrained", m.pretrained, "an open_clip tag (openai), a checkpoint path, or none")
    _choice("model.compute_dtype", m.compute_dtype, DTYPES)
    if m.quick_gelu not in ("auto", True, False) or type(m.quick_gelu) not in (str, bool):
        raise _bad("model.quick_gelu", m.quick_gelu, "auto, true or false")
    if not (m.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(m.device))):
        raise _bad("model.device", m.device, "auto, cpu, cuda or cuda:N")
    q = p.quant
    _choice("quant.type", q.type, QUANT_TYPES)
    _bool("quant.double_quant", q.double_quant)
    _choice("quant.blocksize", q.blocksize, BLOCKSIZES)
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
        depth = min(_tower_depths(m.arch, lo.towers))
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
    _int("train.checkpoint_every", t.checkpoint_every)
    _bool("train.cuda_graph", t.cuda_graph)
    _int("train.cublas_workspace_kib", t.cublas_workspace_kib, lo=0)
    _bool("train.expand_absmax", t.expand_absmax)
    _bool("train.overlap_text", t.overlap_text)
    _int("eval.batch_size", p.eval.batch_size)
    _int("eval.workers", p.eval.workers, lo=0)
    pr = p.profile
    if not isinstance(pr.batches, list) or not pr.batches:
        raise _bad("profile.batches", pr.batches, "a non-empty list like ['4x8', '32x1']")
    for b in pr.batches:
        _batch_spec("profile.batches", b)
    _int("profile.n_classes", pr.n_classes, lo=2)
    _int("profile.warmup", pr.warmup, lo=1)
    _int("profile.steps", pr.steps)
    _validate_scale(p.scale, known_archs, lo.layers if lo.layers != "all" else None, lo.towers)
    return p


def _validate_scale(sc: Scale, known_archs, layers: list | None, towers: list) -> None:
    if not isinstance(sc.archs, list) or not sc.archs or len(set(map(str, sc.archs))) != len(sc.archs):
        raise _bad("scale.archs", sc.archs, "a non-empty list of distinct open_clip architectures")
    known = set(known_archs)
    for a in sc.archs:
        if not isinstance(a, str) or a not in known:
            raise _bad("scale.archs", a, "open_clip architectures such as ViT-B-16, or the shipped clip-tiny, "
                                         "clip-tiny-wide")
        depth = min(_tower_depths(a, towers))
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


def _tower_depths(arch: str, towers: list) -> list[int]:
    import open_clip

    cfg = open_clip.get_model_config(arch) or {}
    keys = {"vision": "vision_cfg", "text": "text_cfg"}
    return [int(cfg.get(keys[t], {}).get("layers", 12)) for t in towers]


def parse(raw: Any) -> Params:
    """Turn the loaded YAML mapping into Params, refusing unknown keys (likely typos)."""
    if not isinstance(raw, dict):
        raise UserError("params: the file must hold a mapping of groups (datasets, methods, data, ...)")
    top = {f.name: f for f in fields(Params)}
    kw = {}
    for k, v in raw.items():
        if k not in top:
            raise UserError(f"params: unknown key {k} (a typo?); known keys: {', '.join(top)}")
        ftype = top[k].default_factory() if top[k].default_factory is not dataclasses.MISSING else None
        kw[k] = _build(type(ftype), v, k) if dataclasses.is_dataclass(ftype) else v
    return Params(**kw)


def load(path: str | Path = "params.yaml") -> Params:
    """Read, parse and validate params; the only entry point stages use."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: params file not found (run from the project folder or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{where}") from None
    params = parse(raw)  # typos and unknown keys fail here, before the heavy imports below
    from .data import DATASETS
    from .model import register_configs
    import open_clip

    register_configs()
    return validate(params, DATASETS, open_clip.list_models())


def require_member(key: str, value: str, allowed) -> None:
    """A stage argument must name something params.yaml lists (so DVC tracks what the stage reads)."""
    if value not in allowed:
        raise UserError(f"--{key} {value!r}: expected one of {', '.join(map(str, allowed))} (from params)")
