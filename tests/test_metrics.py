"""The metrics files' contracts (clip_qlora.metrics): the files round-trip byte for byte, a missing or mistyped
field is one line naming the file and the field, and every path is the one dvc.yaml declares.

tests/recorded_metrics/ holds files written by the stages of a demo-profile `dvc repro` (tests/test_pipeline.py's
settings) before the contracts existed: the writers must still write exactly that.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from clip_qlora import metrics as M
from clip_qlora.runtime.io import UserError

ROOT = Path(__file__).resolve().parents[1]
RECORDED = Path(__file__).parent / "recorded_metrics"
# one recorded file of each contract, by its ids
SAMPLES = {M.Static: ("nf4",), M.Train: ("qlora", "shapes"), M.Eval: ("qlora", "shapes"), M.Zeroshot: ("nf4",),
           M.Profile: ("qlora_gc",), M.Scale: ("clip-tiny",), M.Summary: ()}


def text_of(record: M.MetricsFile) -> str:
    return json.dumps(record.to_dict(), indent=2) + "\n"


def copy_sample(contract, tmp_path: Path, edit=None) -> Path:
    """The recorded file of `contract` under tmp_path, where the contract places it; edit(data) changes it."""
    path = contract.path(*SAMPLES[contract], root=tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(contract.path(*SAMPLES[contract], root=RECORDED).read_text())
    if edit is not None:
        edit(data)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def test_every_contract_has_a_recorded_sample():
    assert set(SAMPLES) == set(M.FILES)
    assert sorted(p.relative_to(RECORDED).as_posix() for p in RECORDED.rglob("*.json")) == sorted(
        c.path(*ids).as_posix() for c, ids in SAMPLES.items())


@pytest.mark.parametrize("contract", M.FILES, ids=lambda c: c.__name__)
def test_a_recorded_file_reads_and_writes_back_byte_for_byte(contract, tmp_path):
    src = contract.path(*SAMPLES[contract], root=RECORDED)
    record = contract.read(src)
    assert isinstance(record, contract)
    written = record.write(tmp_path)
    assert written == contract.path(*SAMPLES[contract], root=tmp_path)
    assert written.read_bytes() == src.read_bytes()


def test_the_committed_gpu_scale_records_round_trip():
    files = sorted((ROOT / "metrics" / "scale").glob("*.json"))
    assert files
    for path in files:
        record = M.Scale.read(path)
        assert record.arch == path.stem and text_of(record) == path.read_text(), path


def test_records_are_typed_where_the_report_reads_them():
    train = M.Train.read(M.Train.path("qlora", "shapes", root=RECORDED))
    assert isinstance(train.per_seed["1"], M.TrainSeed) and train.per_seed["1"].resumed_from == 0
    assert train.common.activation == "gelu" and train.common.pretrained is False
    profile = M.Profile.read(M.Profile.path("qlora_gc", root=RECORDED))
    assert list(profile.batches) == ["b2x2", "b4x1"] and isinstance(profile.batches["b2x2"], M.ProfileBatch)
    summary = M.Summary.read(M.Summary.path(root=RECORDED))
    assert list(summary.per_method) == summary.methods.split(",")
    assert list(summary.comparisons) == ["qlora_vs_lora", "qlora_gc_vs_lora", "lora_gc_vs_lora"]


def _drop(*keys):
    def edit(data):
        node = data
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return edit


@pytest.mark.parametrize("contract,keys,field", [
    (M.Train, ("step_ms_median",), "step_ms_median"),
    (M.Train, ("per_seed", "1", "resumed_from"), "per_seed.1.resumed_from"),
    (M.Eval, ("activation",), "activation"),  # a Common field
    (M.Zeroshot, ("datasets", "shapes", "n_test"), "datasets.shapes.n_test"),
    (M.Profile, ("b4x1", "step_ms"), "b4x1.step_ms"),
    (M.Scale, ("versions",), "versions"),
    (M.Summary, ("best_method",), "best_method"),
], ids=lambda v: getattr(v, "__name__", None) or (v if isinstance(v, str) else "-"))
def test_a_missing_field_is_one_line_naming_the_file_the_field_and_the_rerun(contract, keys, field, tmp_path):
    path = copy_sample(contract, tmp_path, _drop(*keys))
    with pytest.raises(UserError) as e:
        contract.read(path)
    stage = contract.stage(*SAMPLES[contract])
    assert str(e.value) == (f"{path}: missing field '{field}' (written by an older version? rerun: "
                            f"dvc repro {stage})")


def test_the_message_of_an_older_train_file_in_the_project(tmp_path, monkeypatch):
    copy_sample(M.Train, tmp_path, _drop("step_ms_median"))
    monkeypatch.chdir(tmp_path)  # as a stage runs: paths relative to the project
    with pytest.raises(UserError) as e:
        M.Train.read(M.Train.path("qlora", "shapes"))
    assert str(e.value) == ("metrics/train/qlora/shapes.json: missing field 'step_ms_median' "
                            "(written by an older version? rerun: dvc repro train@qlora-shapes)")


@pytest.mark.parametrize("contract,keys,value,says", [
    (M.Train, ("trainable_params",), "many", "field 'trainable_params' must be an integer, got 'many'"),
    (M.Train, ("trainable_params",), True, "field 'trainable_params' must be an integer, got True"),
    (M.Train, ("step_ms_median",), "fast", "field 'step_ms_median' must be a number or null, got 'fast'"),
    (M.Eval, ("accuracy_mean",), None, "field 'accuracy_mean' must be a number, got None"),
    (M.Eval, ("accuracy", "1"), "8%", "field 'accuracy.1' must be a number, got '8%'"),
    (M.Static, ("pretrained",), "yes", "field 'pretrained' must be true or false, got 'yes'"),
    (M.Zeroshot, ("datasets",), [], "field 'datasets' must be an object, got []"),
    (M.Profile, ("b2x2",), 3, "field 'b2x2' must be an object, got 3"),
    (M.Scale, ("methods", "lora", "base"), 16, "field 'methods.lora.base' must be a string, got 16"),
], ids=lambda v: getattr(v, "__name__", None) if isinstance(v, type) else "-")
def test_a_wrong_type_is_one_line_naming_the_file_and_the_field(contract, keys, value, says, tmp_path):
    def edit(data):
        node = data
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    path = copy_sample(contract, tmp_path, edit)
    with pytest.raises(UserError) as e:
        contract.read(path)
    assert str(e.value) == f"{path}: {says} (rerun: dvc repro {contract.stage(*SAMPLES[contract])})"


def test_an_unknown_field_a_foreign_file_and_a_missing_file_are_named(tmp_path):
    path = copy_sample(M.Static, tmp_path, lambda d: d.update(stored_bytes=1))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: unexpected field 'stored_bytes' \(rerun: "
                                        r"dvc repro quantize@nf4\)$"):
        M.Static.read(path)
    # the file of one id holding another's record (copied by hand, say)
    path = copy_sample(M.Eval, tmp_path)
    other = M.Eval.path("lora", "shapes", root=tmp_path)
    other.parent.mkdir()
    shutil.copy(path, other)
    with pytest.raises(UserError, match=rf"^{re.escape(str(other))}: 'method' is 'qlora' but the file is for 'lora'$"):
        M.Eval.read(other)
    missing = M.Profile.path("lora", root=tmp_path)
    with pytest.raises(UserError, match=rf"^{re.escape(str(missing))}: missing; run the profile stage first "
                                        r"\(dvc repro profile@lora\)$"):
        M.Profile.read(missing)
    bad = M.Zeroshot.path("bf16", root=tmp_path)
    bad.parent.mkdir(parents=True)
    bad.write_text("[1, 2]\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(bad))}: expected a JSON object, got list"):
        M.Zeroshot.read(bad)


def test_the_report_of_an_older_file_names_the_file_and_the_field(tmp_path):
    """What a user sees: the aggregate stage over metrics where one train file predates a field."""
    from clip_qlora.report import aggregate as report
    from test_report import DATASETS, METHODS, make_inputs

    make_inputs(tmp_path)
    path = M.Train.path("lora_gc", "dtd", root=tmp_path)
    data = json.loads(path.read_text())
    del data["train_images_bytes"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        report.aggregate(METHODS, DATASETS, tmp_path, tmp_path / "results.md", tmp_path / "figures")
    assert str(e.value) == (f"{path}: missing field 'train_images_bytes' (written by an older version? rerun: "
                            f"dvc repro train@lora_gc-dtd)")
    assert not M.Summary.path(root=tmp_path).exists() and not (tmp_path / "results.md").exists()


def test_path_and_ids_agree():
    assert M.Train.path("lora", "shapes") == Path("metrics/train/lora/shapes.json")
    assert M.Train.ids_of(Path("/x/metrics/train/lora/shapes.json")) == ("lora", "shapes")
    assert M.Scale.ids_of(Path("elsewhere/ViT-B-16.json")) == ("ViT-B-16",)
    assert M.Static.ids_of(Path("metrics/static/nf4.txt")) is None
    assert M.Summary.path(root="runs/demo") == Path("runs/demo/metrics/summary.json")
    with pytest.raises(TypeError, match="method, dataset"):
        M.Eval.path("lora")


# ---- dvc.yaml declares the same files -----------------------------------------------------------------------

def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _declared(stage: dict, ids: list[str]) -> list[str]:
    """A stage's `metrics:` paths with DVC's ${item...} written as the contract's {id}: a foreach over a list
    names its item ${item}, over a mapping ${key}; a matrix names each ${item.<name>}."""
    body = stage.get("do", stage)
    out = []
    for entry in body.get("metrics", []):
        (path,) = entry if isinstance(entry, dict) else [entry]
        path = re.sub(r"\$\{item\.(\w+)\}", r"{\1}", path)
        out.append(re.sub(r"\$\{(item|key)\}", "{%s}" % (ids[0] if ids else "?"), path))
    return out


@pytest.mark.parametrize("contract", M.FILES, ids=lambda c: c.__name__)
def test_the_path_and_the_stage_are_the_ones_dvc_yaml_declares(contract):
    name, _, _ = contract.STAGE.partition("@")
    stage = _stages()[name]
    ids = contract.id_names()
    assert _declared(stage, ids) == [contract.PATTERN]
    # DVC names a foreach stage <name>@<item>, a matrix stage <name>@<value>-<value> in the matrix's order
    if "matrix" in stage:
        assert list(stage["matrix"]) == ids
        assert contract.STAGE == f"{name}@" + "-".join(f"{{{i}}}" for i in ids)
    elif "foreach" in stage:
        assert contract.STAGE == f"{name}@{{{ids[0]}}}"
    else:
        assert contract.STAGE == name and ids == []


@pytest.mark.parametrize("reader,contracts", [
    ("aggregate", [M.Static, M.Train, M.Eval, M.Zeroshot, M.Profile]), ("scale_report", [M.Scale])])
def test_the_reports_depend_on_the_folders_of_what_they_read(reader, contracts):
    deps = _stages()[reader]["deps"]
    for contract in contracts:
        folder = contract.PATTERN[:contract.PATTERN.index("{")].rstrip("/")
        assert folder in deps, f"dvc.yaml's {reader} stage must depend on {folder} ({contract.__name__})"
