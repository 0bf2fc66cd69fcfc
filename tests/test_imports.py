"""What the light commands import, and what importing bitsandbytes prints.

`python -m stages --help`, `prepare` and `aggregate` read params and JSON: none of them may import torch (or
anything that does), so they start in a second, not ten. Each runs here in a fresh interpreter, for real,
and reports which heavy modules ended up in sys.modules.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from clip_qlora.core.backends import METHODS

from cli_helpers import ENV, demo_params, write_params

HEAVY = ("torch", "torchvision", "open_clip", "peft", "bitsandbytes")
PROBE = textwrap.dedent("""
    import json, sys
    sys.argv = ["stages", *{args!r}]
    from stages.__main__ import app
    try:
        app()
    except SystemExit as e:
        code = e.code
    print(json.dumps({{"exit": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
""")


def run_stage_probe(folder: Path, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args), heavy=HEAVY)], cwd=folder, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_imports_no_torch(tmp_path):
    out = run_stage_probe(tmp_path, "--help")
    assert out == {"exit": 0, "heavy": []}


def test_prepare_imports_no_torch(tmp_path):
    """The offline shapes dataset is generated and split for real (PIL only; torchvision only downloads)."""
    write_params(tmp_path, demo_params())
    out = run_stage_probe(tmp_path, "prepare", "--dataset", "shapes")
    assert out == {"exit": 0, "heavy": []}
    assert json.loads((tmp_path / "data" / "splits" / "shapes.json").read_text())["dataset"] == "shapes"


def test_zeroshot_imports_no_peft(tmp_path):
    """Scoring the base needs no adapters: the zeroshot stage runs without PEFT, whose import (it loads
    transformers' auto-model machinery) is most of a train or evaluate stage's start-up on a GPU machine.
    transformers itself is still imported, by open_clip (its Hugging Face text-tower module)."""
    write_params(tmp_path, demo_params())
    assert run_stage_probe(tmp_path, "prepare", "--dataset", "shapes")["exit"] == 0
    assert run_stage_probe(tmp_path, "quantize", "--base", "bf16")["exit"] == 0
    out = run_stage_probe(tmp_path, "zeroshot", "--base", "bf16")
    assert out["exit"] == 0 and "torch" in out["heavy"], out
    assert "peft" not in out["heavy"], out
    z = json.loads((tmp_path / "metrics" / "zeroshot" / "bf16.json").read_text())
    assert z["base"] == "bf16" and set(z["datasets"]["shapes"]["zero_shot"]) == {"clip", "coop"}


def test_aggregate_imports_no_torch(tmp_path):
    from test_report import DATASETS, make_inputs

    make_inputs(tmp_path)
    write_params(tmp_path, demo_params({"datasets": DATASETS, "methods": list(METHODS)}))
    out = run_stage_probe(tmp_path, "aggregate")
    assert out == {"exit": 0, "heavy": []}
    assert (tmp_path / "reports" / "results.md").is_file() and (tmp_path / "metrics" / "summary.json").is_file()


# ---- bitsandbytes' hub-kernel notice ------------------------------------------------------------------------

NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# On a CPU with AVX512-BF16, importing bitsandbytes tries the `kernels` package for a faster CPU kernel and
# logs NOTICE when it cannot. This machine may lack the instruction set, so the probe makes bitsandbytes
# believe it has it (patching bitsandbytes.functional.has_avx512bf16 as the module is loaded) and hides
# `kernels`, then imports `target` the way a stage does (logging configured as stages/app.py does).
BNB_PROBE = textwrap.dedent("""
    import importlib.abc, importlib.machinery, logging, sys

    class Patch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.functional":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Patch())
    sys.modules["kernels"] = None  # not installed (and offline): the fetch fails, as on a user's machine
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import {target}
    print("imported", flush=True)
""")


def test_bitsandbytes_hub_kernel_notice_is_not_shown():
    """Imported alone, bitsandbytes prints the notice (so the probe reaches it); through our backend, nothing.
    Both interpreters at once: each spends its time importing torch."""
    procs = {target: subprocess.Popen([sys.executable, "-c", BNB_PROBE.format(target=target)], env=ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for target in ("bitsandbytes", "clip_qlora.core.backends.nf4")}
    out = {target: proc.communicate(timeout=300) + (proc.returncode,) for target, proc in procs.items()}
    for target, (stdout, stderr, rc) in out.items():
        assert rc == 0 and stdout.strip() == "imported", (target, stderr)
    assert NOTICE in out["bitsandbytes"][1], out["bitsandbytes"][1]
    assert out["clip_qlora.core.backends.nf4"][1].strip() == "", out["clip_qlora.core.backends.nf4"][1]
