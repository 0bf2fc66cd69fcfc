"""dvc.yaml against the code: each stage's code deps are its import closure, and the foreach lists DVC cannot
import from Python (quantize's bases, the loss plot's methods) agree with clip_qlora.core.backends."""
from __future__ import annotations

import copy

from clip_qlora.core.backends import BACKENDS, METHODS

from import_closure import REPO, closure, code_dep_problems, load_pipeline, stage_instances


def test_every_stage_lists_exactly_the_code_it_imports():
    dvc, params = load_pipeline()
    problems = code_dep_problems(dvc, params)
    assert not problems, "dvc.yaml code deps differ from the import closure:\n" + "\n".join(problems)


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
    from pathlib import Path

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
