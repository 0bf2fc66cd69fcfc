"""Helpers for the fault tests: demo params in a temporary project folder, stages run for real.

A project folder here is what `make demo` makes, minus DVC: a params.yaml (the study's with configs/demo.yaml
laid over it, plus a test's overrides) in an empty folder; the stages write their relative paths under it.
Stages run either as real subprocesses (`python -m stages ...`, the DVC command line) or in-process through
Typer's CliRunner (same wrapper, same exit codes, no interpreter start-up).
"""
from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from tools.demo import merge

REPO = Path(__file__).resolve().parents[1]

# Small enough that a clip-tiny stage takes seconds on one CPU core.
FAST = {
    "data.seeds": [1],
    "methods": ["lora", "qlora"],
    "train.iterations_per_shot": 3,
    "train.batch_size": 4,
    "runtime.checkpoint_every": 1000,
    "runtime.eval_workers": 0,
    "eval.batch_size": 64,
    "profile.batches": ["2x2"],
    "profile.warmup": 1,
    "profile.steps": 2,
}

# Subprocesses run with one thread each: on a small shared machine torch's thread pool spins against other
# processes (10x slower per step), and runs compared bitwise must use the same thread count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "DVC_NO_ANALYTICS": "1"}

DELETE = object()


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package): `load_benchmark("scale")`."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def set_key(params: dict, key: str, value: Any) -> dict:
    """Set (or with DELETE remove) a dotted key, creating groups on the way."""
    *groups, last = key.split(".")
    node = params
    for g in groups:
        node = node.setdefault(g, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return params


def get_key(params: dict, key: str) -> Any:
    node = params
    for part in key.split("."):
        node = node[part]
    return node


def demo_params(overrides: dict | None = None, fast: bool = True) -> dict:
    """params.yaml of the study with configs/demo.yaml laid over it (as `make demo` does), then overrides."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    params = copy.deepcopy(merge(base, demo))
    for key, value in {**(FAST if fast else {}), **(overrides or {})}.items():
        set_key(params, key, value)
    return params


def write_params(folder: Path, params: dict | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = params if isinstance(params, str) else yaml.safe_dump(params, sort_keys=False)
    path = folder / "params.yaml"
    path.write_text(text)
    return path


def stage_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages", *args]


def run_stage(folder: Path, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m stages <args>` with cwd = folder, as DVC runs it."""
    return subprocess.run(stage_cmd(*args), cwd=folder, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)


def start_stage(folder: Path, *args: str, log: Path) -> subprocess.Popen:
    """Start a stage without waiting; its stderr goes to `log` (outside the project folder)."""
    with open(log, "wb") as err:
        return subprocess.Popen(stage_cmd(*args), cwd=folder, env=ENV, stdout=subprocess.DEVNULL, stderr=err)


def invoke(*args: str):
    """Run a stage command in-process (Typer CliRunner); returns the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from stages.__main__ import app

    return CliRunner().invoke(app, list(args))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread in this process (see ENV), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def project(folder: Path, params: dict | str | None = None) -> Iterator[Path]:
    """cwd = folder (made, with params.yaml written if given) for in-process stage calls."""
    folder.mkdir(parents=True, exist_ok=True)
    if params is not None:
        write_params(folder, params)
    with contextlib.chdir(folder):
        yield folder


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def all_files(folder: Path) -> list[str]:
    """Every file under folder, relative, including hidden ones (temporary files are hidden)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def train_stage(p, method: str, dataset: str):
    """The train stage's job with the groups its command passes (stages/train.py), in this process."""
    from clip_qlora.jobs.train import train_dataset

    return train_dataset(method, dataset, data=p.data, lora=p.lora, train=p.train, runtime=p.runtime,
                         device=p.model.device)
