"""The study benchmark: the real `dvc repro` at the study's real size, timed stage by stage (a GPU run).

Datasets are synthetic but have the real layouts, class counts, split sizes and typical image sizes of
protocol.md (distinct JPEGs are few and hard-linked many times: decoding cost is what matters, not content).
The weights are random (memory and time do not depend on their values). One device call is at most 10
minutes, so this measures what fits, one dataset with every method, and projects the whole study from the
measured parts with the formula it prints beside the projection.

    python benchmarks/study.py --out $OUT --dataset food101 --seeds 1
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# protocol.md: (classes, train, val, test, typical image size w x h); CoOp split sizes "as recalled"
REAL = {
    "eurosat": (10, 13500, 5400, 8100, (64, 64)),
    "dtd": (47, 2820, 1128, 1692, (640, 480)),
    "caltech101": (100, 4128, 1649, 2465, (300, 200)),
    "oxford_pets": (37, 2944, 736, 3669, (500, 375)),
    "oxford_flowers": (102, 4093, 1633, 2463, (500, 375)),
    "food101": (101, 50500, 20200, 30300, (512, 384)),
    "fgvc_aircraft": (100, 3334, 3333, 3333, (1000, 700)),
    "ucf101": (101, 7639, 1898, 3783, (320, 240)),
}
DISTINCT = 256  # distinct JPEG files per dataset; every other image is a hard link to one of them


def make_dataset(root: Path, name: str) -> None:
    """The dataset's CoOp layout (FGVC's text files for fgvc_aircraft) with synthetic JPEGs."""
    import numpy as np
    from PIL import Image

    from clip_qlora.data.registry import DATASETS

    classes, n_train, n_val, n_test, (w, h) = REAL[name]
    spec = DATASETS[name]
    images = root / spec.folder / spec.image_dir
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = []
    for k in range(DISTINCT):
        path = images / f"pool_{k}.jpg"
        base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.BICUBIC).save(path, quality=90)
        pool.append(path)
    names = [f"class_{c:03d}" for c in range(classes)]
    rows = {"train": [], "val": [], "test": []}
    n = 0
    for part, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(count):
            label = i % classes
            rel = f"img_{n:06d}.jpg"
            os.link(pool[n % DISTINCT], images / rel)
            rows[part].append([rel, label, names[label]])
            n += 1
    if name == "fgvc_aircraft":
        folder = root / spec.folder
        (folder / "variants.txt").write_text("".join(f"{c}\n" for c in names))
        for part, entries in rows.items():
            (folder / f"images_variant_{part}.txt").write_text(
                "".join(f"{rel.removesuffix('.jpg')} {cls}\n" for rel, _, cls in entries))
    else:
        (root / spec.folder / spec.split_file).write_text(json.dumps(rows))


def project_dir(dest: Path, dataset: str, seeds: list[int], methods: list[str], arch: str, device: str,
                iterations: int) -> None:
    import yaml

    from clip_qlora import config
    from clip_qlora.core.model import stand_in_quick_gelu
    from tools.demo import prepare_dir

    # random weights, with the activation the configured weights train with (QuickGELU for OpenAI's ViT-B/16)
    quick_gelu = stand_in_quick_gelu(arch, config.load(REPO / "params.yaml").model)
    over = {"datasets": [dataset], "methods": methods, "data": {"seeds": seeds, "root": "data/raw"},
            "model": {"arch": arch, "pretrained": "none", "device": device, "quick_gelu": quick_gelu},
            "train": {"iterations_per_shot": iterations}}
    dest.parent.mkdir(parents=True, exist_ok=True)
    over_path = dest.parent / "study-overrides.yaml"
    over_path.write_text(yaml.safe_dump(over))
    prepare_dir(REPO, dest, over_path)


def timed_repro(dest: Path, targets: list[str], log, partial=lambda walls: None, warm: bool = True) -> dict[str, float]:
    """Run `dvc repro targets`, timestamping each 'Running stage' line: {stage: wall seconds}.

    warm: under `python -m clip_qlora.runtime.warm` as `make run` runs it (each stage a fork of one process that has
    the libraries imported); else plain `dvc repro`, every stage a fresh process.
    `partial(walls)` is called as each stage ends, so a run cut off by its time limit keeps what it measured."""
    env = {**os.environ, "PYTHONPATH": f"{dest / 'src'}{os.pathsep}{dest}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ["dvc", "repro", *targets]
    if warm:
        cmd = [sys.executable, "-m", "clip_qlora.runtime.warm", "--", *cmd]
    proc = subprocess.Popen(cmd, cwd=dest, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    walls, current, started = {}, None, time.perf_counter()
    for line in proc.stdout:
        log.write(line)
        log.flush()
        m = re.match(r"Running stage '([^']+)'", line.strip())
        if m:
            now = time.perf_counter()
            if current:
                walls[current] = now - started
                partial(walls)
            current, started = m.group(1), now
    proc.wait()
    if current:
        walls[current] = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"dvc repro failed ({proc.returncode}); see the log")
    return walls


def startup_probe(dest: Path) -> dict[str, float]:
    """Seconds for a bare stage start: `--help`, and importing what train imports."""
    env = {**os.environ, "PYTHONPATH": f"{dest / 'src'}{os.pathsep}{dest}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = {}
    for key, cmd in (("stages_help", [sys.executable, "-m", "stages", "--help"]),
                     ("import_train", [sys.executable, "-c", "import clip_qlora.jobs.train"])):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=dest, env=env, capture_output=True, check=True)
        out[key] = time.perf_counter() - t0
    return out


def project(r: dict, seeds: int = 3) -> dict:
    """The whole study (8 datasets x methods x `seeds`) from one measured dataset: a projection, not a measurement.

    Per method m: train(m, d) = o_m + seeds x T_m, where T_m is the measured per-seed loop time (2000 steps for
    every dataset: 500 x 4 shots, batch 32) and o_m the rest of the measured stage's wall time (start-up, image
    decoding, saving); evaluate(m, d) = e_m + N_d x seeds / F_m, with F_m the measured forward passes per
    second (N_x x passes / eval_seconds, decoding included) and e_m the rest of its wall time; zeroshot(b) =
    z_b + sum_d N_d / Z_b, one stage per base over every dataset, with Z_b the measured test images per second
    of zeroshot@b (one pass: one image forward serves both prompt sets) and z_b the rest of its measured wall
    time, counted once (the per-dataset part of it, a split read and two prompt sets' text features, is
    taken as negligible); prepare(d) scales with d's image count; quantize is counted once. Datasets with
    fewer classes have cheaper text towers and EuroSAT's short batches are cheaper steps, so the training
    terms are an upper bound.
    """
    walls, x = r["stage_wall_seconds"], r["dataset"]
    files_x = sum(REAL[x][1:4])
    total, terms = 0.0, {}
    terms["quantize"] = sum(v for k, v in walls.items() if k.startswith("quantize"))
    terms["prepare"] = sum(walls[f"prepare@{x}"] * sum(REAL[d][1:4]) / files_x for d in REAL)
    for m in r["methods"]:
        t, e = r["train"][m], r["eval"][m]
        loop = t["train_seconds_mean"]
        overhead = walls[f"train@{m}-{x}"] - len(r["seeds"]) * loop
        fps = e["n_test"] * e["passes"] / e["eval_seconds"]
        e_over = walls[f"evaluate@{m}-{x}"] - e["eval_seconds"]
        terms[f"train@{m}"] = len(REAL) * (overhead + seeds * loop)
        terms[f"evaluate@{m}"] = sum(e_over + REAL[d][3] * seeds / fps for d in REAL)
    for b, z in r.get("zeroshot", {}).items():
        z_over = walls[f"zeroshot@{b}"] - z["eval_seconds"]
        per_second = z["n_test"] / z["eval_seconds"]
        terms[f"zeroshot@{b}"] = z_over + sum(REAL[d][3] / per_second for d in REAL)
    total = sum(terms.values())
    return {"label": "PROJECTION (not measured): formula in benchmarks/study.py project()",
            "seeds": seeds, "terms_seconds": terms, "total_minutes": total / 60}


EVAL_LINE = re.compile(r"evaluate (\S+) (\S+): (\d+) test images, (\d+) passes, ([\d.]+) s")
ZEROSHOT_LINE = re.compile(r"zeroshot (\S+) (\S+): (\d+) test images, (\d+) passes, ([\d.]+) s")


def collect(result: dict, dest: Path, log: Path) -> None:
    """What the train and evaluate stages wrote so far (metrics, and evaluation times from the log)."""
    from clip_qlora.metrics import Eval, Train, Zeroshot

    x = result["dataset"]
    for m in result["methods"]:
        tr, ev = Train.path(m, x, root=dest), Eval.path(m, x, root=dest)
        if tr.exists():
            t = json.loads(tr.read_text())
            result.setdefault("train", {})[m] = {k: t.get(k) for k in (
                "train_seconds_mean", "step_ms_median", "steps", "peak_allocated_bytes", "train_images_bytes",
                "per_seed")}
            result["device"], result["versions"] = t["device"], t["versions"]
        if ev.exists():
            e = json.loads(ev.read_text())
            result.setdefault("eval", {})[m] = {k: e.get(k) for k in ("passes", "n_test")}
            timed = EVAL_LINE.findall(log.read_text()) if log.exists() else []
            for method, _, n, passes, seconds in timed:  # the stage logs its time (metrics stay deterministic)
                if method == m:
                    result["eval"][m].update(eval_seconds=float(seconds), test_images_per_second=int(n) / float(seconds))
    for base, dataset, n, passes, seconds in ZEROSHOT_LINE.findall(log.read_text()) if log.exists() else []:
        if dataset != x:
            continue
        zs = Zeroshot.path(base, root=dest)
        result.setdefault("zeroshot", {})[base] = {
            "n_test": int(n), "passes": int(passes), "eval_seconds": float(seconds),
            "zero_shot": json.loads(zs.read_text())["datasets"][x]["zero_shot"] if zs.exists() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dataset", default="food101", choices=sorted(REAL))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--methods", nargs="+", default=["lora", "lora_gc", "qlora", "qlora_gc"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/study-bench"))
    ap.add_argument("--cold", action="store_true", help="plain `dvc repro` (default: warm, as `make run`)")
    ap.add_argument("--only-zeroshot", action="store_true",
                    help="repro only the zeroshot stages (and prepare, quantize): start-up and passes without training")
    # smoke-test knobs only (a CPU try of the script); the benchmark is the defaults
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iterations-per-shot", type=int, default=500)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.work, ignore_errors=True)
    dest = a.work / "project"
    project_dir(dest, a.dataset, a.seeds, a.methods, a.arch, a.device, a.iterations_per_shot)
    t0 = time.perf_counter()
    make_dataset(dest / "data/raw", a.dataset)
    result = {"dataset": a.dataset, "warm": not a.cold, "seeds": a.seeds, "methods": a.methods, "real_size": REAL[a.dataset],
              "make_dataset_seconds": time.perf_counter() - t0, "startup": startup_probe(dest)}
    (a.out / "study.json").write_text(json.dumps(result, indent=2))
    from clip_qlora.core.backends import METHODS

    bases = dict.fromkeys(METHODS[m].base for m in a.methods)
    targets = [] if a.only_zeroshot else [f"evaluate@{m}-{a.dataset}" for m in a.methods]
    targets += [f"zeroshot@{b}" for b in bases]
    with open(a.out / "study-repro.log", "w") as log:
        def partial(walls):
            result["stage_wall_seconds"] = walls
            collect(result, dest, a.out / "study-repro.log")
            (a.out / "study.json").write_text(json.dumps(result, indent=2))

        result["stage_wall_seconds"] = timed_repro(dest, targets, log, partial, warm=not a.cold)
        (a.out / "study.json").write_text(json.dumps(result, indent=2))
    collect(result, dest, a.out / "study-repro.log")
    if not a.only_zeroshot:
        result["projection"] = project(result)
    (a.out / "study.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
