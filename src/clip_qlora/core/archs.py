"""The CLIP architectures params.yaml may name, read from their config files without importing open_clip.

open_clip knows an architecture by a JSON file in its `model_configs/` folder (or in a folder added with
`add_model_config`, as model.register_configs does for ours). Importing open_clip imports torch, which checking
params must not need (prepare and aggregate run without torch), so the same files are read here: open_clip's
folder is found through the import system without running the package, and a file counts as open_clip counts
it (it holds embed_dim, vision_cfg and text_cfg). tests/test_model.py checks the names against open_clip's.
"""
from __future__ import annotations

import difflib
import functools
import importlib.util
import json
from pathlib import Path

from clip_qlora.runtime.io import bad_param

CONFIG_DIR = Path(__file__).parent / "model_configs"  # the shipped architectures (clip-tiny)
TOWER_CFG = {"vision": "vision_cfg", "text": "text_cfg"}


@functools.cache
def configs() -> dict[str, dict]:
    """Architecture name -> its open_clip config: open_clip's own, then ours."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    out = {}
    for folder in [*folders, CONFIG_DIR]:
        for path in sorted(folder.glob("*.json")):
            cfg = json.loads(path.read_text())
            if all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                out[path.stem] = cfg
    return out


def tower_depth(arch: str, tower: str) -> int:
    """Transformer blocks of one tower (open_clip's default of 12 where the config does not say)."""
    return int(configs()[arch].get(TOWER_CFG[tower], {}).get("layers", 12))


def suggest(name) -> str:
    """What to say of an architecture name that is not known: a few close names, not all ~100."""
    def norm(n: str) -> str:  # "vit_b/16" is meant as ViT-B-16
        return n.lower().replace("_", "-").replace("/", "-")

    by_norm = {norm(n): n for n in configs()}
    close = [by_norm[n] for n in difflib.get_close_matches(norm(str(name)), list(by_norm), n=4, cutoff=0.5)]
    shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
    hint = f"close: {', '.join(close)}; " if close else ""
    return f"an open_clip architecture ({hint}all: open_clip.list_models()) or a shipped one ({shipped})"


def check(arch, key: str) -> None:
    """The one check of an architecture's name: params validation (model.arch, scale.archs) and the model
    builders run it, so an unknown name is the same one line wherever it is caught."""
    if not isinstance(arch, str) or arch not in configs():
        raise bad_param(key, arch, suggest(arch))


def check_quick_gelu(setting) -> None:
    """model.quick_gelu: auto (the weights' pretrained config says), or true or false (forced)."""
    # type checked too: 1 == True in Python
    if setting not in ("auto", True, False) or type(setting) not in (str, bool):
        raise bad_param("model.quick_gelu", setting, "auto, true or false")
