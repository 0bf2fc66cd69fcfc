"""Bad input: every bad params value and every bad split file gives one line naming what is wrong.

Most cases go through `config.load` (the only entry point the stages use); a representative subset through the
real command line (`python -m stages train ...` in a temporary project folder), which must exit 2 with exactly
one `error:` line on stderr and no traceback, unless --debug asks for it.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clip_qlora import config
from clip_qlora.data.splits import load_split, prepare_split, write_split
from clip_qlora.runtime.io import UserError

from cli_helpers import (DELETE, ENV, all_files, demo_params, invoke, project, set_key, start_stage, stderr_lines,
                         write_params)
from test_imports import HEAVY, PROBE

TRAIN = ("train", "--method", "lora", "--dataset", "shapes")


def base_params() -> dict:
    """The demo params as `make demo` writes them, with the batch the messages below quote pinned."""
    return demo_params({"train.batch_size": 32, "train.grad_accum": 1}, fast=False)


def bad_params(tmp_path: Path, key: str, value) -> Path:
    """The base params with one key changed."""
    return write_params(tmp_path, set_key(base_params(), key, value))


# (key, bad value, fragments the message must contain: the key, and the value or what is allowed)
BAD = [
    # names that do not exist
    ("methods", ["lora", "lora_xl"], ["methods", "'lora_xl'", "lora, lora_gc, qlora, qlora_gc"]),
    ("methods", [], ["methods", "[]", "non-empty"]),
    ("datasets", ["shapes", "imagenet"], ["datasets", "'imagenet'", "eurosat"]),
    ("datasets", "shapes", ["datasets", "'shapes'", "list"]),
    ("model.arch", "ViT-Q-99", ["model.arch", "'ViT-Q-99'", "clip-tiny"]),
    ("lora.towers", ["vision", "audio"], ["lora.towers", "'audio'", "vision, text"]),
    ("lora.towers", [], ["lora.towers", "[]", "non-empty"]),
    ("lora.targets", ["q", "mlp"], ["lora.targets", "'mlp'", "q, k, v, out"]),
    ("lora.targets", ["q", "q"], ["lora.targets", "distinct"]),
    ("lora.scaling", "none", ["lora.scaling", "'none'", "rslora, standard"]),
    ("train.schedule", "linear", ["train.schedule", "'linear'", "cosine, constant"]),
    ("train.adapter_kernel", "cuda", ["train.adapter_kernel", "'cuda'", "triton, torch"]),
    ("model.compute_dtype", "fp8", ["model.compute_dtype", "'fp8'", "bf16"]),
    ("model.device", "tpu", ["model.device", "'tpu'", "cuda:N"]),
    ("data.template", "fancy", ["data.template", "'fancy'", "clip, coop"]),
    # counts that must be >= 1
    ("data.shots", 0, ["data.shots", "= 0", "integer >= 1"]),
    ("data.shots", -4, ["data.shots", "= -4", "integer >= 1"]),
    ("lora.r", 0, ["lora.r", "= 0", "integer >= 1"]),
    ("lora.r", -2, ["lora.r", "= -2", "integer >= 1"]),
    ("train.batch_size", 0, ["train.batch_size", "= 0", "integer >= 1"]),
    ("train.batch_size", -32, ["train.batch_size", "= -32", "integer >= 1"]),
    ("train.iterations_per_shot", 0, ["train.iterations_per_shot", "= 0", "integer >= 1"]),
    ("train.iterations_per_shot", -500, ["train.iterations_per_shot", "= -500", "integer >= 1"]),
    ("runtime.checkpoint_every", 0, ["runtime.checkpoint_every", "= 0", "integer >= 1"]),
    ("train.grad_accum", 0, ["train.grad_accum", "= 0", "integer >= 1"]),
    ("eval.batch_size", 0, ["eval.batch_size", "= 0", "integer >= 1"]),
    ("runtime.eval_workers", -1, ["runtime.eval_workers", "= -1", "integer >= 0"]),
    ("runtime.eval_workers", "all", ["runtime.eval_workers", "all", "auto or an integer >= 0"]),
    ("runtime.cublas_workspace_kib", -1, ["runtime.cublas_workspace_kib", "= -1", "integer >= 0"]),
    ("profile.n_classes", 1, ["profile.n_classes", "= 1", "integer >= 2"]),
    # numbers out of range
    ("lora.dropout", 1.0, ["lora.dropout", "1.0", "[0, 1)"]),
    ("lora.dropout", 1.5, ["lora.dropout", "1.5", "[0, 1)"]),
    ("lora.dropout", -0.1, ["lora.dropout", "-0.1", "[0, 1)"]),
    ("train.lr", 0, ["train.lr", "= 0", "a number > 0"]),
    ("train.lr", -2.0e-4, ["train.lr", "-0.0002", "a number > 0"]),
    ("lora.alpha", 0, ["lora.alpha", "= 0", "a number > 0"]),
    ("train.weight_decay", -0.01, ["train.weight_decay", "-0.01", "a number >= 0"]),
    ("train.min_lr", 1.0, ["train.min_lr", "1.0", "at most train.lr"]),
    ("train.logit_scale", 0, ["train.logit_scale", "= 0", "a number > 0"]),
    # quantization settings bitsandbytes does not have
    ("quant.type", "int8", ["quant.type", "'int8'", "nf4, fp4"]),
    ("quant.type", "NF4", ["quant.type", "'NF4'", "nf4, fp4"]),
    ("quant.blocksize", 100, ["quant.blocksize", "100", "64, 128, 256"]),
    ("quant.blocksize", 32, ["quant.blocksize", "32", "64, 128, 256"]),
    ("quant.blocksize", 8192, ["quant.blocksize", "8192", "4096"]),
    ("quant.double_quant", "yes please", ["quant.double_quant", "'yes please'", "true or false"]),
    ("quant.expand_absmax", 1, ["quant.expand_absmax", "= 1", "true or false"]),
    ("runtime.cuda_graph", "on", ["runtime.cuda_graph", "'on'", "true or false"]),
    ("runtime.overlap_text", None, ["runtime.overlap_text", "None", "true or false"]),
    # micro-batch x accumulation must equal the batch
    ("train.grad_accum", 3, ["train.grad_accum", "= 3", "divisor of train.batch_size (32)"]),
    ("train.grad_accum", 64, ["train.grad_accum", "= 64", "divisor of train.batch_size (32)"]),
    # typos: unknown keys at the top level and inside groups
    ("method", ["lora"], ["unknown key method", "methods"]),
    ("dataset", ["shapes"], ["unknown key dataset", "datasets"]),
    ("train.learning_rate", 1.0e-3, ["unknown key train.learning_rate", "lr"]),
    ("lora.rank", 4, ["unknown key lora.rank", "r,"]),
    ("data.shot", 4, ["unknown key data.shot", "shots"]),
    ("quant.block_size", 64, ["unknown key quant.block_size", "blocksize"]),
    ("profile.batch", ["4x8"], ["unknown key profile.batch", "batches"]),
    # wrong types
    ("data.shots", "four", ["data.shots", "'four'", "integer"]),
    ("data.shots", 4.0, ["data.shots", "4.0", "integer"]),
    ("lora.r", 2.5, ["lora.r", "2.5", "integer"]),
    ("lora.r", True, ["lora.r", "True", "integer"]),
    ("train.batch_size", "32", ["train.batch_size", "'32'", "integer"]),
    ("train.lr", "fast", ["train.lr", "'fast'", "a number > 0"]),
    ("lora.alpha", False, ["lora.alpha", "False", "a number > 0"]),
    ("data.download", "maybe", ["data.download", "'maybe'", "true or false"]),
    ("data.seeds", 1, ["data.seeds", "= 1", "list"]),
    ("data.seeds", [], ["data.seeds", "[]", "non-empty list"]),
    ("data.seeds", [1, 1], ["data.seeds", "[1, 1]", "distinct"]),
    ("data.seeds", [1, "two"], ["data.seeds", "'two'", "integer"]),
    ("data.root", "", ["data.root", "''", "folder"]),
    ("model.pretrained", 7, ["model.pretrained", "= 7", "none"]),
    ("lora.layers", "first", ["lora.layers", "'first'", "'all' or a non-empty list"]),
    ("lora.layers", [0, -1], ["lora.layers", "-1", "block indices >= 0"]),
    ("train", 5, ["train", "= 5", "a mapping"]),
    ("lora", ["r", 2], ["lora", "['r', 2]", "a mapping"]),
    # profile.batches: 'micro x accumulation' strings
    ("profile.batches", ["4x"], ["profile.batches", "'4x'", "'4x8'"]),
    ("profile.batches", ["0x8"], ["profile.batches", "'0x8'", "'4x8'"]),
    ("profile.batches", ["4x0"], ["profile.batches", "'4x0'", "'4x8'"]),
    ("profile.batches", ["4*8"], ["profile.batches", "'4*8'", "'4x8'"]),
    ("profile.batches", ["4x8x2"], ["profile.batches", "'4x8x2'", "'4x8'"]),
    ("profile.batches", ["32x1", "ax b"], ["profile.batches", "'ax b'", "'4x8'"]),
    ("profile.batches", "4x8", ["profile.batches", "'4x8'", "non-empty list"]),
    ("profile.batches", [], ["profile.batches", "[]", "non-empty list"]),
    # the scale study
    ("scale.archs", ["clip-tiny", "ViT-Q-99"], ["scale.archs", "'ViT-Q-99'", "clip-tiny-wide"]),
    ("scale.archs", [], ["scale.archs", "[]", "non-empty list"]),
    ("scale.archs", ["clip-tiny", "clip-tiny"], ["scale.archs", "distinct"]),
    ("scale.batches", ["4x8", "4x8"], ["scale.batches", "distinct"]),
    ("scale.batches", ["32x"], ["scale.batches", "'32x'", "'4x8'"]),
    ("scale.n_classes", 1, ["scale.n_classes", "= 1", "integer >= 2"]),
    ("scale.steps", 0, ["scale.steps", "= 0", "integer >= 1"]),
    ("scale.warmup", 0, ["scale.warmup", "= 0", "integer >= 1"]),
    ("scale.gpu_gib", [16, 8], ["scale.gpu_gib", "[16, 8]", "increasing list"]),
    ("scale.gpu_gib", [8, 0], ["scale.gpu_gib", "[8, 0]", "GiB"]),
    ("scale.gpu_gib", "24", ["scale.gpu_gib", "'24'", "list"]),
    ("scale.arch", ["clip-tiny"], ["unknown key scale.arch", "archs"]),
]

# own_datasets: one entry changed from a good one
OWN = {"folder": "textile", "template": "a photo of a {} textile.", "test_fraction": 0.2, "classnames": None}
BAD += [
    ("own_datasets.eurosat", OWN, ["own_datasets.eurosat", "'eurosat' is a built-in dataset", "another name"]),
    ("own_datasets.My-Data", OWN, ["own_datasets", "'My-Data'", "lower-case letters, digits and underscores"]),
    ("own_datasets.mine", "textile", ["own_datasets.mine", "'textile'", "a mapping"]),
    ("own_datasets.mine", {**OWN, "folder": "../elsewhere"}, ["own_datasets.mine.folder", "'../elsewhere'",
                                                              "under data.root", "without '..'"]),
    ("own_datasets.mine", {**OWN, "folder": "/data/textile"}, ["own_datasets.mine.folder", "'/data/textile'"]),
    ("own_datasets.mine", {**OWN, "folder": ""}, ["own_datasets.mine.folder", "''", "under data.root"]),
    ("own_datasets.mine", {**OWN, "folder": "."}, ["own_datasets.mine.folder", "'.'", "under data.root"]),
    ("own_datasets.mine", {**OWN, "template": "a photo"}, ["own_datasets.mine.template", "'a photo'", "one {}"]),
    ("own_datasets.mine", {**OWN, "template": "a {0} of {}"}, ["own_datasets.mine.template", "'a {0} of {}'"]),
    ("own_datasets.mine", {**OWN, "template": "a {kind} {}"}, ["own_datasets.mine.template", "'a {kind} {}'"]),
    ("own_datasets.mine", {**OWN, "test_fraction": 0}, ["own_datasets.mine.test_fraction", "= 0", "between 0 and 1"]),
    ("own_datasets.mine", {**OWN, "test_fraction": 1}, ["own_datasets.mine.test_fraction", "= 1", "between 0 and 1"]),
    ("own_datasets.mine", {**OWN, "test_fraction": "half"}, ["own_datasets.mine.test_fraction", "'half'"]),
    ("own_datasets.mine", {**OWN, "test_fraction": True}, ["own_datasets.mine.test_fraction", "True"]),
    ("own_datasets.mine", {**OWN, "classnames": "/etc/names.txt"}, ["own_datasets.mine.classnames", "'/etc/names.txt'",
                                                                    "null or the name of a file at the top"]),
    ("own_datasets.mine", {**OWN, "classnames": "meta/names.txt"}, ["own_datasets.mine.classnames",
                                                                    "'meta/names.txt'"]),
    ("own_datasets.mine", {**OWN, "classnames": 3}, ["own_datasets.mine.classnames", "= 3"]),
    ("own_datasets.mine", {k: v for k, v in OWN.items() if k != "classnames"},
     ["missing key own_datasets.mine.classnames"]),
    ("own_datasets.mine", {**OWN, "classes": "x"}, ["unknown key own_datasets.mine.classes", "classnames"]),
    ("own_datasets", ["textile"], ["own_datasets", "['textile']", "a mapping", "{} for none"]),
    ("datasets", ["shapes", "textile"], ["datasets", "'textile'", "eurosat"]),  # not declared
]

# Bad values that once slipped through the schema: each one crashed or misbehaved later, deep in a
# stage, instead of being named up front; config.validate now names each one.
LATE_CHECKS = [
    # `quant.blocksize in BLOCKSIZES` is true for 64.0; bitsandbytes' quantize_4bit then raises a RuntimeError
    ("quant.blocksize", 64.0, ["quant.blocksize", "64.0"]),
    # nan/inf pass `v <= 0` checks: training then runs to a non-finite loss (or a nonsense temperature)
    ("train.lr", math.nan, ["train.lr", "nan"]),
    ("train.lr", math.inf, ["train.lr", "inf"]),
    ("train.logit_scale", math.inf, ["train.logit_scale", "inf"]),
    ("lora.alpha", math.nan, ["lora.alpha", "nan"]),
    # "cuda:N" is what the message promises; anything after "cuda:" is accepted and fails in torch.device
    ("model.device", "cuda:abc", ["model.device", "'cuda:abc'"]),
    # clip-tiny has 2 blocks per tower: block 7 does not exist, and PEFT silently adapts only block 0
    ("lora.layers", [0, 7], ["lora.layers", "7"]),
]


def _id(case) -> str:
    key, value, _ = case
    return f"{key}={value!r}"[:40]


@pytest.mark.parametrize("key,value,fragments", BAD, ids=[_id(c) for c in BAD])
def test_bad_param_is_named(tmp_path, key, value, fragments):
    path = bad_params(tmp_path, key, value)
    with pytest.raises(UserError) as e:
        config.load(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("params: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_an_own_dataset_is_declared_in_params_and_named_in_datasets(tmp_path):
    params = set_key(set_key(base_params(), "own_datasets.textile", OWN), "datasets", ["shapes", "textile"])
    p = config.load(write_params(tmp_path, params))
    assert p.datasets == ["shapes", "textile"]
    assert p.own_datasets == {"textile": config.OwnDataset("textile", "a photo of a {} textile.", 0.2, None)}
    # declared but not run, and none at all (`own_datasets:` left empty reads as null)
    p = config.load(write_params(tmp_path, set_key(base_params(), "own_datasets.textile", OWN)))
    assert p.datasets == ["shapes"] and list(p.own_datasets) == ["textile"]
    assert config.load(write_params(tmp_path, set_key(base_params(), "own_datasets", None))).own_datasets == {}


@pytest.mark.parametrize("key,value,fragments", LATE_CHECKS, ids=[_id(c) for c in LATE_CHECKS])
def test_bad_param_caught_by_later_checks(tmp_path, key, value, fragments):
    """Values that look right to Python (64.0 == 64, nan, cuda:abc, a block index past the depth)."""
    path = bad_params(tmp_path, key, value)
    with pytest.raises(UserError) as e:
        config.load(path)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_good_params_load(tmp_path):
    """The table's base is valid: each case above fails because of its one change."""
    p = config.load(write_params(tmp_path, base_params()))
    assert p.model.arch == "clip-tiny" and p.train.batch_size == 32 and p.datasets == ["shapes"]
    # YAML 1.1 reads 2e-4 (no dot) as a string; the schema takes it as the number a person meant
    p = config.load(bad_params(tmp_path, "train.lr", "2e-4"))
    assert p.train.lr == 2e-4


MALFORMED = [
    ("datasets: [shapes]\ntrain:\n  lr: [1e-3\n", 4, 1),        # unclosed flow sequence
    ("datasets: [shapes]\nlora:\n  r: 2\n   alpha: 1\n", 4, 9),  # bad indentation
    ("data:\n\tshots: 4\n", 2, 1),                               # a tab
    ("datasets: [shapes]\nmodel: arch: clip-tiny\n", 2, 12),     # mapping value in a plain scalar
]


@pytest.mark.parametrize("text,line,column", MALFORMED, ids=["unclosed", "indent", "tab", "colon"])
def test_malformed_yaml_names_the_position(tmp_path, text, line, column):
    path = write_params(tmp_path, text)
    with pytest.raises(UserError, match=rf"params\.yaml: malformed YAML at line {line}, column {column}$"):
        config.load(path)


@pytest.mark.parametrize("text", ["- datasets\n- methods\n", "just a string\n"], ids=["list", "scalar"])
def test_params_file_that_is_not_a_mapping(tmp_path, text):
    with pytest.raises(UserError, match="must hold a mapping of groups"):
        config.load(write_params(tmp_path, text))


@pytest.mark.parametrize("text", ["", "# only a comment\n"], ids=["empty", "comment"])
def test_empty_params_file_names_the_groups(tmp_path, text):
    with pytest.raises(UserError, match=r"^params: the file is empty; expected the groups datasets, methods, data, "):
        config.load(write_params(tmp_path, text))


@pytest.mark.parametrize("key", ["model.arch", "scale.archs"])
def test_unknown_arch_names_a_few_close_matches(tmp_path, key):
    """Not open_clip's ~100 names on one line: a few close ones, case and separators forgiven."""
    value = "vit_b/16" if key == "model.arch" else ["clip-tiny", "vit_b/16"]
    with pytest.raises(UserError) as e:
        config.load(bad_params(tmp_path, key, value))
    message = str(e.value)
    assert message.startswith(f"params: {key} = 'vit_b/16': expected an open_clip architecture (close: ViT-B-16, ")
    assert len(message) < 300 and "ViT-bigG-14" not in message, message


@pytest.mark.parametrize("spec,parsed", [
    ("4x8", (4, 8)), ("32x1", (32, 1)), ("04x8", (4, 8)),
    ("0x8", None), ("4x", None), ("4x8x2", None), ("4*8", None), (" 4x8", None), ("4 x 8", None), ("+4x8", None),
    ("\uff14x8", None), (48, None),  # a full-width digit (int() reads it), a YAML number
])
def test_one_reading_of_a_batch_configuration(spec, parsed):
    """params (profile.batches, scale.batches), the jobs and the report read '4x8' the same way: a key the
    report would not read back as a batch is refused up front, as it once was not (' 4x8' passed int())."""
    from clip_qlora.report.inputs import is_batch_key

    assert config.parse_batch(spec) == parsed
    if isinstance(spec, str):
        assert is_batch_key(f"b{spec}") is (parsed is not None)
    if parsed is None:
        with pytest.raises(UserError, match=r"^params: profile\.batches = .*: expected strings like '4x8'"):
            config.load_with({"profile.batches": ["32x1", spec]})
    else:
        assert config.load_with({"profile.batches": [spec]}).profile.batches == [spec]


def test_missing_params_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.yaml: params file not found"):
        config.load(tmp_path / "nope.yaml")


# ---- the command line: one line on stderr, exit 2; --debug shows the traceback ------------------------------

# (id, change to the demo params, what the error line must name)
CLI_CASES = [
    ("method", ("methods", ["lora", "lora_xl"]), ["methods", "'lora_xl'"]),
    ("r", ("lora.r", 0), ["lora.r", "= 0"]),
    ("typo", ("train.learning_rate", 1e-3), ["unknown key train.learning_rate"]),
    ("quant", ("quant.type", "int8"), ["quant.type", "'int8'", "nf4, fp4"]),
    ("accum", ("train.grad_accum", 3), ["train.grad_accum", "= 3", "train.batch_size (32)"]),
    ("yaml", "datasets: [shapes]\nlora:\n  r: 2\n   alpha: 1\n", ["params.yaml", "malformed YAML at line 4, column 9"]),
]
EXTRA = {
    "debug": (("lora.r", 0), TRAIN + ("--debug",)),
    "arg": (None, ("train", "--method", "nope", "--dataset", "shapes")),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every CLI case started at once (interpreter start-up dominates; the cases are independent)."""
    root = tmp_path_factory.mktemp("cli")
    jobs = {}
    for name, change, _ in CLI_CASES:
        params = change if isinstance(change, str) else set_key(base_params(), *change)
        jobs[name] = (params, TRAIN)
    for name, (change, args) in EXTRA.items():
        jobs[name] = (base_params() if change is None else set_key(base_params(), *change), args)
    procs = {}
    try:
        for name, (params, args) in jobs.items():
            folder = root / name
            write_params(folder, params)
            procs[name] = (folder, start_stage(folder, *args, log=root / f"{name}.err"))
        out = {}
        for name, (folder, proc) in procs.items():
            rc = proc.wait(timeout=300)
            out[name] = (rc, (root / f"{name}.err").read_text(), folder)
        return out
    finally:
        for _, proc in procs.values():  # only after a failure above: stop what this fixture started
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("name,fragments", [(n, f) for n, _, f in CLI_CASES], ids=[n for n, _, _ in CLI_CASES])
def test_cli_bad_params_one_line_exit_2(cli_runs, name, fragments):
    rc, stderr, folder = cli_runs[name]
    lines = stderr_lines(stderr)
    assert rc == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    # nothing was written: the stage stopped before any work
    assert sorted(p.name for p in folder.iterdir()) == ["params.yaml"]


def test_cli_debug_shows_the_traceback(cli_runs):
    rc, stderr, _ = cli_runs["debug"]
    assert rc not in (0, 2)
    assert "Traceback" in stderr
    assert "UserError" in stderr and "lora.r = 0" in stderr
    assert "config.py" in stderr  # the frames, not just the message


def test_cli_stage_argument_not_in_params(cli_runs):
    rc, stderr, _ = cli_runs["arg"]
    lines = stderr_lines(stderr)
    assert rc == 2, stderr
    assert lines == ["error: --method 'nope': expected one of lora, lora_gc, qlora, qlora_gc (from params)"]


@pytest.mark.parametrize("args,fragment", [
    (("train", "--method", "lora", "--dataset", "eurosat"), "--dataset 'eurosat': expected one of shapes"),
    (("evaluate", "--method", "qlora_xl", "--dataset", "shapes"), "--method 'qlora_xl'"),
    (("quantize", "--base", "int8"), "--base 'int8': expected one of bf16, nf4"),
    (("zeroshot", "--base", "int8"), "--base 'int8': expected one of bf16, nf4"),
    (("profile", "--method", "lora_gc"), "--method 'lora_gc': expected one of lora, qlora (from params)"),
    (("prepare", "--dataset", "imagenet"), "--dataset 'imagenet'"),
], ids=["train-dataset", "evaluate-method", "quantize-base", "zeroshot-base", "profile-method",
        "prepare-dataset"])
def test_stage_argument_not_in_params_in_process(tmp_path, args, fragment):
    with project(tmp_path, demo_params()):  # methods [lora, qlora], datasets [shapes]
        r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert len(stderr_lines(r.stderr)) == 1 and r.stderr.startswith("error: ")
    assert fragment in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_bad_params_through_each_stage_in_process(tmp_path):
    """Every stage reads params through config.load: the same line and exit code from each."""
    with project(tmp_path, set_key(demo_params(), "quant.type", "int4")):
        for args in [("prepare", "--dataset", "shapes"), ("quantize", "--base", "nf4"), TRAIN,
                     ("evaluate", "--method", "lora", "--dataset", "shapes"),
                     ("zeroshot", "--base", "bf16"), ("profile", "--method", "lora"),
                     ("aggregate",)]:
            r = invoke(*args)
            assert r.exit_code == 2, (args, r.output)
            assert stderr_lines(r.stderr) == ["error: params: quant.type = 'int4': expected one of nf4, fp4"]


# ---- `python -m stages check`: the whole file, before DVC touches an output -----------------------------------

CHECK_CASES = [  # (id, params text or change, the one error line)
    ("r", ("lora.r", -1), "error: params: lora.r = -1: expected an integer >= 1"),
    ("dora", ("methods", ["lora", "dora"]),
     "error: params: methods = ['lora', 'dora']: expected a non-empty list of distinct values from lora, lora_gc, "
     "qlora, qlora_gc"),
    ("string", ("datasets", "shapes"),
     "error: params: datasets = 'shapes': expected a non-empty list of distinct values from eurosat, dtd, "
     "caltech101, oxford_pets, oxford_flowers, food101, fgvc_aircraft, ucf101, shapes"),
    ("empty", "", "error: params: the file is empty; expected the groups datasets, methods, data, own_datasets, "
                  "model, quant, lora, train, eval, runtime, profile, scale (copy them from the study's params.yaml)"),
    # a group no training stage reads still fails the check (DVC would delete scale@*'s outputs for it)
    ("scale", ("scale.gpu_gib", [16, 8]), "error: params: scale.gpu_gib = [16, 8]: expected a non-empty increasing "
                                          "list of GPU sizes in GiB, e.g. [8, 16, 24]"),
]


def run_check(folder: Path) -> dict:
    """`python -m stages check` in a fresh interpreter: exit code, heavy modules it imported, stderr."""
    r = subprocess.run([sys.executable, "-c", PROBE.format(args=["check"], heavy=HEAVY)], cwd=folder, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "stderr": r.stderr}


@pytest.mark.parametrize("name,change,line", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
def test_check_command_fails_on_a_bad_param_and_touches_nothing(tmp_path, name, change, line):
    """What `make run` runs before `dvc repro`: exit 2, one line naming the key; a previous output is left as it
    was, and no torch is imported (so the check takes a fraction of a second)."""
    params = change if isinstance(change, str) else set_key(base_params(), *change)
    write_params(tmp_path, params)
    previous = tmp_path / "adapters" / "lora" / "shapes" / "seed1" / "adapter_model.safetensors"
    previous.parent.mkdir(parents=True)
    previous.write_bytes(b"trained weights")
    out = run_check(tmp_path)
    assert out["exit"] == 2 and out["heavy"] == [], out
    assert stderr_lines(out["stderr"]) == [line]
    assert previous.read_bytes() == b"trained weights"
    assert all_files(tmp_path) == ["adapters/lora/shapes/seed1/adapter_model.safetensors", "params.yaml"]


def test_check_command_passes_good_params_and_makes_data_root(tmp_path):
    """Every prepare stage depends on data.root (dvc.yaml), which DVC wants to exist before prepare can fill it."""
    write_params(tmp_path, base_params())
    out = run_check(tmp_path)
    assert out["exit"] in (0, None) and out["heavy"] == [], out
    assert (tmp_path / "data" / "raw").is_dir()
    assert config.check_params(tmp_path / "params.yaml").datasets == ["shapes"]


# ---- bad split files ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory):
    """A real split of the synthetic shapes dataset (root, split dict) to damage."""
    root = tmp_path_factory.mktemp("splitroot")
    split = prepare_split("shapes", root, 2, [1], download=False, template="clip")
    return root, split


def _damage(split: dict, how: str) -> dict:
    split = json.loads(json.dumps(split))
    if how == "dotdot":
        split["train"]["1"][0][0] = "../outside.png"
    elif how == "dotdot-deep":
        split["test"][3][0] = "shapes/images/../../../../etc/passwd"
    elif how == "absolute":
        split["test"][0][0] = "/etc/passwd"
    elif how == "missing-image":
        split["train"]["1"][1][0] = "shapes/images/red_circle/train_999.png"
    elif how.startswith("drop:"):
        for key in how[5:].split(","):
            del split[key]
    elif how == "label":
        split["test"][0][1] = 12
    elif how == "entry":
        split["train"]["1"][0] = [split["train"]["1"][0][0]]
    elif how == "classnames":
        split["classnames"] = []
    elif how == "template":
        split["template"] = "a photo"
    return split


SPLIT_CASES = [
    ("dotdot", r"image path '\.\./outside\.png' is outside data\.root \(absolute or containing '\.\.'\)"),
    ("dotdot-deep", r"image path 'shapes/images/\.\./\.\./\.\./\.\./etc/passwd' is outside data\.root"),
    ("absolute", r"image path '/etc/passwd' is outside data\.root"),
    ("missing-image", r"image .*shapes/images/red_circle/train_999\.png does not exist"),
    ("drop:test", r"missing key\(s\) test$"),
    ("drop:shots,train", r"missing key\(s\) shots, train$"),
    ("label", r"label 12 of .* is out of range 0\.\.11"),
    ("entry", r"train\[1\] entry \[.*\] is not \[path, label\]"),
    ("classnames", r"'classnames' must be a non-empty list of strings"),
    ("template", r"'template' must be a string containing \{\}"),
]


@pytest.mark.parametrize("how,pattern", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_bad_split_file_is_named(tmp_path, shapes_split, how, pattern):
    root, split = shapes_split
    file = tmp_path / "shapes.json"
    file.write_text(json.dumps(_damage(split, how)))
    with pytest.raises(UserError) as e:
        load_split(file, root)
    message = str(e.value)
    assert message.startswith(f"{file}: ") and "\n" not in message
    assert re.search(pattern, message), message


def test_good_split_loads(tmp_path, shapes_split):
    root, split = shapes_split
    write_split(tmp_path / "shapes.json", split)
    assert load_split(tmp_path / "shapes.json", root) == split


@pytest.mark.parametrize("text,position", [
    ('{"dataset": "shapes",\n  "classnames": [}', "line 2, column 18"),
    ('{"dataset": "shapes", "shots": 2,,}', "line 1, column 34"),
    ('{"dataset": "shapes",\n\n  "train": {"1": [["a.png", 0]', "line 3, column 31"),
], ids=["bracket", "comma", "truncated"])
def test_malformed_split_json_names_the_position(tmp_path, shapes_split, text, position):
    root, _ = shapes_split
    file = tmp_path / "shapes.json"
    file.write_text(text)
    with pytest.raises(UserError, match=rf"^{re.escape(str(file))}: malformed JSON at {position}: "):
        load_split(file, root)


def test_split_that_is_not_an_object(tmp_path, shapes_split):
    root, _ = shapes_split
    (tmp_path / "s.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"s\.json: expected a JSON object, got list"):
        load_split(tmp_path / "s.json", root)


def test_bad_split_through_the_train_stage(tmp_path, shapes_split):
    """The train stage reads the split first: a damaged one is one line and exit 2, before any model loads."""
    root, split = shapes_split
    params = demo_params({"data.shots": 2})
    with project(tmp_path, params):
        shutil.copytree(root, "data/raw")
        Path("data/splits").mkdir(parents=True)
        Path("data/splits/shapes.json").write_text(json.dumps(_damage(split, "absolute")))
        r = invoke(*TRAIN)
        assert r.exit_code == 2, r.output
        assert stderr_lines(r.stderr) == ["error: data/splits/shapes.json: image path '/etc/passwd' is outside "
                                          "data.root (absolute or containing '..')"]
        Path("data/splits/shapes.json").write_text(json.dumps(split)[:-40])
        r = invoke(*TRAIN)
        assert r.exit_code == 2
        assert re.fullmatch(r"error: data/splits/shapes\.json: malformed JSON at line 1, column \d+: .*\n", r.stderr)
        # a split made for other shots/seeds than params ask for: rerun prepare
        write_split(Path("data/splits/shapes.json"), split)
        write_params(Path("."), set_key(params, "data.seeds", [1, 5]))
        r = invoke(*TRAIN)
        assert r.exit_code == 2
        assert "made for shots=2 and seeds ['1']" in r.stderr and "rerun prepare" in r.stderr
        assert not Path("adapters").exists() and not Path("metrics").exists()


def test_lora_layers_past_a_scale_arch_are_named(tmp_path):
    """model.arch (clip-tiny-wide, 3 blocks) has block 2, but clip-tiny of scale.archs has only 2 blocks."""
    params = set_key(set_key(base_params(), "model.arch", "clip-tiny-wide"), "lora.layers", [0, 2])
    with pytest.raises(UserError, match=r"^params: lora.layers = \[0, 2\]: expected block indices below 2 "
                                        r"\(scale.archs has clip-tiny, "):
        config.load(write_params(tmp_path, params))


def test_group_left_empty_is_named(tmp_path):
    """A group whose keys are all commented out is YAML null: named, not an AttributeError."""
    params = base_params()
    params["quant"] = None
    with pytest.raises(UserError, match=r"^params: quant = None: expected a mapping$"):
        config.load(write_params(tmp_path, params))


@pytest.mark.parametrize("key", ["lora.scaling", "runtime.eval_workers", "quant.expand_absmax", "datasets",
                                 "runtime"])
def test_missing_key_is_named(tmp_path, key):
    """No defaults outside params.yaml: a key (or group) left out is one line naming it, not a value from code."""
    with pytest.raises(UserError) as e:
        config.load(write_params(tmp_path, set_key(base_params(), key, DELETE)))
    assert str(e.value).startswith(f"params: missing key {key}: ") and "\n" not in str(e.value)


def test_load_with_overrides_the_study_params():
    """The helper tests and benchmarks use: params.yaml plus dotted overrides, checked like a params file."""
    import yaml

    study = yaml.safe_load(config.STUDY_PARAMS.read_text())
    p = config.load_with({"model.arch": "clip-tiny", "runtime.eval_workers": 0, "datasets": ["shapes"]})
    assert (p.model.arch, p.runtime.eval_workers, p.datasets) == ("clip-tiny", 0, ["shapes"])
    assert p.train.lr == study["train"]["lr"] and p.quant.blocksize == study["quant"]["blocksize"]
    with pytest.raises(UserError, match=r"^params: lora.r = 0: expected an integer >= 1$"):
        config.load_with({"lora.r": 0})
    with pytest.raises(UserError, match=r"^params: unknown key train.cuda_graph"):
        config.load_with({"train.cuda_graph": False})  # moved to runtime: the old name is refused


def test_auto_eval_workers_are_the_cores_this_process_may_use(monkeypatch):
    """auto: one worker per CPU core the stage may run on (its affinity, not the machine's count), at most 16;
    none on a single core (decoding in the stage's own process)."""
    import os

    for cores, expected in ((1, 0), (2, 2), (12, 12), (64, 16)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert config.load_with({"runtime.eval_workers": "auto"}).runtime.eval_workers == expected
