"""dvc.yaml against the code: each stage's code deps are its import closure, and the lists DVC cannot import
from Python agree with clip_qlora.core.backends (quantize's and zeroshot's bases: generated with the code deps by
`python -m tools.dvc_deps`; the loss plot's methods: params.yaml's)."""
from __future__ import annotations

import copy
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clip_qlora.core.backends import BACKENDS, METHODS

from cli_helpers import ENV
from tools.dvc_deps import (COMMAND, REPO, DvcYamlError, backends_package, closure, code_dep_problems,
                            load_pipeline, module_file, rewrite, stage_instances, stale_message)

DVC_YAML = (REPO / "dvc.yaml").read_text()
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
BACKENDS_DIR = module_file(backends_package()).parent.as_posix()  # wherever the package sits


def test_dvc_yaml_is_what_the_generator_writes():
    """Rewriting the committed dvc.yaml changes no byte (every comment, data dep and layout stays); when the
    code has moved on, the failure names what differs and the command that rewrites it."""
    result = rewrite(DVC_YAML, PARAMS)
    assert result.text == DVC_YAML, stale_message(Path("dvc.yaml"), result)
    assert result.stale == []


def test_every_stage_lists_exactly_the_code_it_imports():
    """The same, instance by instance as DVC expands them, without the generator's templating."""
    dvc, params = load_pipeline()
    problems = code_dep_problems(dvc, params)
    assert not problems, ("dvc.yaml code deps differ from the import closure:\n" + "\n".join(problems)
                          + f"\nregenerate them with: {COMMAND}")


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def test_a_removed_or_extra_code_line_is_restored():
    """From a dvc.yaml missing code lines (one, the templated backend of quantize, all of aggregate's) or listing
    one too many, the rewrite gives back the committed file, naming each stale stage and what it runs."""
    backend = f"{BACKENDS_DIR}/${{key}}.py"
    stale = _edit(DVC_YAML, "      - stages/prepare.py\n", "")
    stale = _edit(stale, f"      - {backend}\n", "")
    stale = _edit(stale, "    - metrics/scale\n", "    - metrics/scale\n    - stages/train.py\n")
    start = stale.index("  aggregate:")  # the last stage
    tail, removed = re.subn(r"^    - (stages|src/clip_qlora)/\S+\.py\n", "", stale[start:], flags=re.M)
    assert removed > 3
    result = rewrite(stale[:start] + tail, PARAMS)
    assert result.text == DVC_YAML
    assert result.stale == ["prepare", "quantize", "scale_report", "aggregate"]
    package = backends_package()
    for line in ("prepare: runs stages.prepare (stages/prepare.py) but its deps do not list it",
                 f"quantize@nf4: runs {package}.nf4 ({BACKENDS_DIR}/nf4.py) but its deps do not list it",
                 "scale_report: lists stages/train.py but does not import it",
                 "aggregate: runs stages.aggregate (stages/aggregate.py) but its deps do not list it"):
        assert line in result.details, result.details


def test_a_base_missing_from_a_foreach_is_restored():
    """The foreach lists over bases are the backends table: a base left out (or a field wrong) is put back."""
    stale = DVC_YAML.replace("      nf4: {params: quant, method: qlora}\n", "")
    stale = stale.replace("      bf16: {params: model, method: lora}\n", "      bf16: {params: quant, method: lora}\n")
    stale = stale.replace("foreach: [bf16, nf4]", "foreach: [bf16]")
    assert stale != DVC_YAML
    result = rewrite(stale, PARAMS)
    assert result.text == DVC_YAML
    assert result.stale == ["quantize", "zeroshot"]


def _code_copy(tmp_path: Path) -> Path:
    """The project's .py files (its whole import graph) under tmp_path, to change the layout there."""
    def not_code(folder, names):
        return [n for n in names if n == "__pycache__" or not (n.endswith(".py") or Path(folder, n).is_dir())]

    for name in ("src", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=not_code)
    return tmp_path


def test_a_module_in_a_new_folder_is_listed_where_it_sorts(tmp_path):
    """The layout is read from the files: a new package under src/clip_qlora that a stage imports lazily lands in
    that stage's deps (its __init__.py too), in sorted place, and nowhere else."""
    repo = _code_copy(tmp_path)
    room = repo / "src/clip_qlora/room"
    room.mkdir()
    (room / "__init__.py").write_text("")
    (room / "helper.py").write_text("import clip_qlora\n")
    with open(repo / "stages/aggregate.py", "a") as f:
        f.write("\n\ndef _later():\n    from clip_qlora.room import helper  # noqa: F401\n")
    result = rewrite(DVC_YAML, PARAMS, repo)
    assert result.stale == ["aggregate"]
    assert result.details == ["aggregate: runs clip_qlora.room (src/clip_qlora/room/__init__.py) but its deps do not "
                              "list it", "aggregate: runs clip_qlora.room.helper (src/clip_qlora/room/helper.py) but "
                              "its deps do not list it"]
    new = ["    - src/clip_qlora/room/__init__.py\n", "    - src/clip_qlora/room/helper.py\n"]
    lines = result.text.splitlines(keepends=True)
    at = lines.index(new[0])
    assert lines[at:at + 2] == new and "".join(lines[:at] + lines[at + 2:]) == DVC_YAML
    block = lines[result.text[:result.text.index("  aggregate:")].count("\n"):]
    src = [line for line in block if line.startswith("    - src/clip_qlora/") and line.endswith(".py\n")]
    assert new[0] in src and src == sorted(src)


def test_a_registered_backend_is_written_into_the_foreach_lists_and_deps(tmp_path, monkeypatch):
    """A base registered in the backends table (README, Extending) gets its quantize entry (fields from the
    table), its zeroshot entry and, in every stage that may call backends.get, its module; the per-base stages
    keep their one templated entry."""
    backends = importlib.import_module(backends_package())
    repo = _code_copy(tmp_path)
    (repo / BACKENDS_DIR / "half.py").write_text('"""A base stored in fp16."""\n')
    monkeypatch.setitem(backends.BACKENDS, "half", backends.Backend("hlora", "Half-LoRA", "model"))
    result = rewrite(DVC_YAML, PARAMS, repo)
    assert result.stale == ["quantize", "zeroshot", "train", "evaluate", "profile", "scale"]
    expected = _edit(DVC_YAML, "      nf4: {params: quant, method: qlora}\n",
                     "      nf4: {params: quant, method: qlora}\n      half: {params: model, method: hlora}\n")
    expected = _edit(expected, "foreach: [bf16, nf4]", "foreach: [bf16, nf4, half]")
    nf4 = re.escape(f"{BACKENDS_DIR}/nf4.py")
    expected, n = re.subn(rf"^( +- ){nf4}\n", rf"\1{BACKENDS_DIR}/half.py\n\g<0>", expected, flags=re.M)
    assert n == 4
    assert result.text == expected


def test_a_hand_kept_path_that_is_gone_is_one_line():
    """Data the code opens (model_configs) is listed by hand and kept as written; after a move that left it
    behind, the rewrite stops naming the entry rather than writing a dvc.yaml DVC would refuse."""
    gone = DVC_YAML.replace("model_configs\n", "model_configs_moved\n")
    assert gone != DVC_YAML
    with pytest.raises(DvcYamlError, match=r"^dvc.yaml: quantize@bf16 lists src/clip_qlora/\S*model_configs_moved, "
                                           r"which does not exist \(data files the code opens are listed by hand"):
        rewrite(gone, PARAMS)


def _command(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "tools.dvc_deps", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=60)


def test_the_command_checks_and_rewrites_in_place(tmp_path):
    """`python -m tools.dvc_deps` from the repository root: --check passes on the committed file; on a stale copy
    it exits 1 naming the stage and the command to run, changing nothing; without --check it rewrites the copy
    back to the committed file. A code dep it cannot rewrite in place is one line naming the line, exit 2."""
    assert _command("--check").returncode == 0
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    target = tmp_path / "dvc.yaml"
    stale = _edit(DVC_YAML, "    - stages/scale_report.py\n", "")
    target.write_text(stale)
    r = _command("--check", "--file", str(target))
    assert r.returncode == 1 and target.read_text() == stale
    assert r.stderr.splitlines() == [
        "dvc.yaml is stale: the code deps or the foreach lists of bases of scale_report differ from the code",
        "  scale_report: runs stages.scale_report (stages/scale_report.py) but its deps do not list it",
        f"regenerate it with: {COMMAND}"]
    r = _command("--file", str(target))
    assert r.returncode == 0, r.stderr
    assert target.read_text() == DVC_YAML
    assert _command("--check", "--file", str(target)).returncode == 0

    commented = _edit(stale, "    - stages/app.py\n", "    - stages/app.py  # why\n")
    target.write_text(commented)
    r = _command("--file", str(target))
    line = commented[:commented.index("app.py  # why")].count("\n") + 1
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: dvc.yaml line {line}: code dep stages/app.py "
                                                  f"must stand alone on its line (`- path` or `name: value`) to be "
                                                  f"rewritten\n")
    assert target.read_text() == commented


def _without(dvc: dict, stage: str, dep: str) -> dict:
    dvc = copy.deepcopy(dvc)
    body = dvc["stages"][stage].get("do", dvc["stages"][stage])
    assert dep in body["deps"], (stage, dep)
    body["deps"].remove(dep)
    return dvc


def test_a_removed_dependency_is_named():
    """The check fails, naming the module, when dvc.yaml drops a file the stage imports: at the top of a module
    (evaluate -> pipeline/__init__), only inside a function (prepare: the shapes generator, imported when the
    dataset is drawn) and only through backends.get (train -> backends/nf4.py)."""
    dvc, params = load_pipeline()
    cases = [("evaluate", "src/clip_qlora/paths.py", "clip_qlora.paths"),
             ("prepare", "src/clip_qlora/data/synthetic.py", "clip_qlora.data.synthetic"),
             ("train", "src/clip_qlora/core/backends/nf4.py", "clip_qlora.core.backends.nf4")]
    for stage, dep, module in cases:
        problems = code_dep_problems(_without(dvc, stage, dep), params)
        assert problems, (stage, dep)
        assert all(f"runs {module} ({dep}) but its deps do not list it" in p for p in problems), problems
        assert {p.split(":")[0].split("@")[0] for p in problems} == {stage}, problems


def test_an_extra_dependency_is_named():
    """Deps are exactly the code: a module the stage never imports is reported too."""
    dvc, params = load_pipeline()
    dvc = copy.deepcopy(dvc)
    dvc["stages"]["aggregate"]["deps"].append("src/clip_qlora/jobs/train.py")
    assert code_dep_problems(dvc, params) == ["aggregate: lists src/clip_qlora/jobs/train.py but does not import it"]


def test_closure_follows_lazy_imports_and_pins_the_quantized_base():
    prepare = closure("stages.prepare", list(BACKENDS))
    assert Path("src/clip_qlora/data/splits.py") in prepare  # imported inside the command function
    assert Path("src/clip_qlora/data/images.py") not in prepare  # torch: prepare never imports it
    for base in BACKENDS:
        files = closure("stages.quantize", [base])
        assert {p.stem for p in files if p.parent == Path("src/clip_qlora/core/backends")} == {"__init__", base}


def test_quantize_bases_and_pointers_agree_with_backends():
    dvc, params = load_pipeline()
    foreach = dvc["stages"]["quantize"]["foreach"]
    assert list(foreach) == list(BACKENDS)
    for base, item in foreach.items():
        assert item == {"params": BACKENDS[base].params, "method": BACKENDS[base].method}, base
    for name, stage in stage_instances(dvc, params).items():
        if name.startswith("quantize@"):
            base = stage["_key"]
            pointers = {o for o in stage["outs"] if isinstance(o, str) and o.startswith("models/methods/")}
            assert pointers == {f"models/methods/{m}.json" for m, s in METHODS.items() if s.base == base}, name


def test_zeroshot_bases_agree_with_backends():
    dvc, _ = load_pipeline()
    assert dvc["stages"]["zeroshot"]["foreach"] == list(BACKENDS)


def test_method_lists_come_from_params():
    """dvc.yaml names no method: train/evaluate/profile run over params.yaml's `methods`, and so does the
    loss plot; the study's params.yaml runs every method of the table."""
    dvc, params = load_pipeline()
    assert dvc["stages"]["train"]["matrix"]["method"] == "${methods}"
    assert dvc["stages"]["evaluate"]["matrix"]["method"] == "${methods}"
    assert dvc["stages"]["profile"]["foreach"] == "${methods}"
    loss = next(p["plots/loss"] for p in dvc["plots"] if "plots/loss" in p)
    assert loss["y"] == "${methods}"
    assert params["methods"] == list(METHODS)
    text = (REPO / "dvc.yaml").read_text()
    for method in METHODS:
        assert f"[{method}," not in text and f" {method}]" not in text  # no hand-written method list


def test_stage_instances_match_dvcs_names():
    """The expansion the checks use names stages as DVC does (the pipeline test sees DVC's own names)."""
    dvc, params = load_pipeline()
    params = {**params, "datasets": ["shapes"], "methods": ["lora", "qlora"],
              "scale": {**params["scale"], "archs": ["clip-tiny"]}}
    names = set(stage_instances(dvc, params))
    assert names == {"prepare@shapes", "quantize@bf16", "quantize@nf4", "train@lora-shapes", "train@qlora-shapes",
                     "evaluate@lora-shapes", "evaluate@qlora-shapes", "zeroshot@bf16", "zeroshot@nf4",
                     "profile@lora", "profile@qlora", "aggregate",
                     "scale@clip-tiny", "scale_report"}


def test_train_and_evaluate_depend_on_the_digests_of_the_images_they_read():
    """prepare writes the split and its two image digests where clip_qlora.data.digest says; train depends on
    the train digest only, evaluate on the test digest only (each also on the split itself)."""
    from clip_qlora.data.digest import PARTS, digest_path
    from clip_qlora.paths import split_path

    dvc, params = load_pipeline()
    stages = stage_instances(dvc, params)
    for dataset in params["datasets"]:
        split = str(split_path(dataset))
        digests = {part: str(digest_path(split_path(dataset), part)) for part in PARTS}
        assert stages[f"prepare@{dataset}"]["outs"] == [split, digests["train"], digests["test"]]
        for method in params["methods"]:
            for stage, part in (("train", "train"), ("evaluate", "test")):
                deps = stages[f"{stage}@{method}-{dataset}"]["deps"]
                assert split in deps and digests[part] in deps, (stage, method, dataset)
                assert set(digests.values()) & set(deps) == {digests[part]}, (stage, method, dataset)


def _prepared_project(tmp_path):
    """A copy of the project with the demo's params and `dvc repro prepare@shapes` done (seconds); returns a
    function that runs a command there."""
    import os
    import shutil
    import subprocess
    import sys

    from cli_helpers import ENV, demo_params, write_params

    for name in ("dvc.yaml", "src", "stages", "configs"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, tmp_path / name)
    write_params(tmp_path, demo_params())
    env = {**ENV, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{ENV.get('PATH', '')}"}

    def run(*cmd):
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert run("dvc", "init", "--no-scm", "-q").returncode == 0
    assert run(sys.executable, "-m", "stages", "check").returncode == 0  # as `make run` does: makes data.root
    r = run("dvc", "repro", "prepare@shapes")
    assert r.returncode == 0, r.stdout + r.stderr
    return run


def _status(run, *stages) -> dict:
    import json

    r = run("dvc", "status", "--json", *stages)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout or "{}")


def test_dataset_files_are_a_dependency_of_prepare(tmp_path):
    """Through real DVC, prepare alone (seconds): replacing an image of data.root makes prepare stale; a damaged
    test image then fails prepare with one line naming it, before any stage that trains."""
    from PIL import Image

    run = _prepared_project(tmp_path)
    assert _status(run, "prepare@shapes") == {}

    image = tmp_path / "data/raw/shapes/images/red_circle/train_000.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(image)  # replaced by another readable image
    status = _status(run, "prepare@shapes")
    assert status == {"prepare@shapes": [{"changed deps": {"data/raw": "modified"}}]}, status

    test_image = tmp_path / "data/raw/shapes/images/blue_square/test_003.png"
    test_image.write_bytes(b"")
    r = run("dvc", "repro", "prepare@shapes")
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    bad = "data/raw/shapes/images/blue_square/test_003.png"
    assert errors == [f"error: {bad}: test image cannot be opened (cannot identify image file '{bad}'); replace it "
                      f"(or remove it from the test list of data/raw/shapes/split_zhou_Shapes.json) and rerun "
                      f"prepare"], r.stdout + r.stderr


def test_a_replaced_image_reruns_the_stages_that_read_it(tmp_path):
    """Through real DVC, without training: train@lora-shapes, evaluate@lora-shapes and zeroshot@bf16 are recorded
    as done over placeholder inputs and outputs (`dvc commit`), then an image is replaced under the same name and
    prepare reruns (the split file stays byte for byte the same). A test image makes evaluate and zeroshot stale,
    not train; a drawn training image makes train (and zeroshot, which depends on the whole data/splits) stale,
    not evaluate."""
    import json

    from PIL import Image

    from cli_helpers import demo_params

    run = _prepared_project(tmp_path)
    readers = ["train@lora-shapes", "evaluate@lora-shapes", "zeroshot@bf16"]
    dvc, _ = load_pipeline(tmp_path)
    stages = stage_instances(dvc, demo_params())
    for name in readers:
        stage = stages[name]
        for entry in stage["deps"] + stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = tmp_path / (entry if isinstance(entry, str) else next(iter(entry)))
            if not path.exists():  # what quantize and train would have made: any content does for DVC
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}\n")
                else:
                    path.mkdir(parents=True)
                    (path / "placeholder").write_text("x\n")
    split_file = tmp_path / "data/splits/shapes.json"
    split, split_bytes = json.loads(split_file.read_text()), split_file.read_bytes()
    root = tmp_path / demo_params()["data"]["root"]

    def replace(path: str) -> dict:
        r = run("dvc", "commit", "-f", "-q", *readers)  # as if they had just run
        assert r.returncode == 0, r.stdout + r.stderr
        assert _status(run, *readers) == {}
        Image.new("RGB", (64, 64), (1, 2, 3)).save(root / path)  # another readable image under the same name
        r = run("dvc", "repro", "prepare@shapes")
        assert r.returncode == 0, r.stdout + r.stderr
        assert split_file.read_bytes() == split_bytes
        return _status(run, *readers)

    splits_changed = [{"changed deps": {"data/splits": "modified"}}]
    status = replace(split["test"][0][0])
    assert status == {"evaluate@lora-shapes": [{"changed deps": {"data/splits/shapes.test.sha256": "modified"}}],
                      "zeroshot@bf16": splits_changed}, status
    status = replace(split["train"]["1"][0][0])
    assert status == {"train@lora-shapes": [{"changed deps": {"data/splits/shapes.train.sha256": "modified"}}],
                      "zeroshot@bf16": splits_changed}, status


def test_each_stage_declares_the_params_dvc_yaml_lists():
    """A stage command reads params.yaml through a view of the keys it declares (stages/<stage>.py: PARAMS;
    quantize: per base); those are exactly its dvc.yaml `params:`, so a key read is a key DVC tracks."""
    from stages import quantize

    dvc, params = load_pipeline()
    for name, body in dvc["stages"].items():
        if name == "quantize":
            for base, item in body["foreach"].items():
                declared = quantize.params_of(base)
                listed = [p.replace("${item.params}", item["params"]) for p in body["do"]["params"]]
                assert list(declared) == list(dict.fromkeys(listed)), (name, base)
            continue
        module = importlib.import_module(f"stages.{name}")
        assert list(module.PARAMS) == body.get("do", body)["params"], name


def test_reading_an_undeclared_key_is_an_error_naming_it():
    from clip_qlora import config

    p = config.declared(config.load_with(), ("data.root", "lora"), "train")
    assert p.data.root and p.lora.r == 2 and p.methods  # declared keys, a whole group, an instance key
    with pytest.raises(config.Undeclared, match=r"stage train read data\.shots, which its dvc.yaml params do not"):
        p.data.shots
    with pytest.raises(config.Undeclared, match=r"stage train read quant,"):
        p.quant
    import pickle  # the profile and scale stages hand their view to fresh measuring processes

    q = pickle.loads(pickle.dumps(p))
    assert q.data.root == p.data.root and q.lora == p.lora
    with pytest.raises(config.Undeclared, match=r"read data\.shots"):
        q.data.shots
