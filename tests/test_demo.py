"""`make demo`: the demo's stages import the copy of the code in runs/demo, not the checkout's."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from clip_qlora.demo import env_for

REPO = Path(__file__).resolve().parents[1]


def test_stages_run_by_dvc_import_the_demo_copy(tmp_path, monkeypatch):
    """As `make demo` calls it: dest relative to the checkout (runs/demo), the stage run with cwd = dest."""
    monkeypatch.chdir(tmp_path)
    dest = Path("runs/demo")
    for name in ("src", "stages"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import json, clip_qlora, stages.app; "
             "print(json.dumps([clip_qlora.__file__, stages.app.__file__]))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=dest, env=env_for(dest), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    files = [Path(f) for f in json.loads(r.stdout.splitlines()[-1])]
    root = (tmp_path / dest).resolve()
    assert files == [root / "src" / "clip_qlora" / "__init__.py", root / "stages" / "app.py"]
