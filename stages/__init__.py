"""The stage commands. Importing this package puts the project's own src/ first on sys.path.

A queued DVC experiment runs `python -m stages` in a temporary copy of the project (.dvc/tmp/exps/tmp*):
its clip_qlora must be that copy's src/, the code DVC hashed as the stages' deps, and not what an editable
install or the environment of `dvc queue start` points at (the main checkout, perhaps edited since the run
was queued).
"""
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if (_SRC / "clip_qlora").is_dir() and str(_SRC) not in sys.path[:1]:
    sys.path.insert(0, str(_SRC))
