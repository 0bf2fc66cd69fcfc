"""What code each dvc.yaml stage runs, derived from the code: the import closure of its command module.

A stage's command is `python -m stages <name> ...`, which runs the Typer command in `stages/<name>.py`. Its
closure is every project module (src/clip_qlora/..., stages/...) that module imports, transitively, whether the
import is at the top of a file or inside a function (imports made lazily, to keep torch out of `--help`, still
run when the stage does), plus the package `__init__.py` of each. Only imports of the project count; data
files (model_configs/*.json) are not imports and are listed in dvc.yaml by hand.

One import is dynamic: `backends.get(name)` imports `backends/<name>.py`. A module that takes the `backends`
package itself (`from clip_qlora import backends`, `import clip_qlora.core.backends`, `from .backends import get`)
can call it, so it reaches every backend of `backends.BACKENDS`, except in a stage instance whose foreach key
is a base (quantize@nf4), which runs only that backend. A module that takes only names from it (`from
.backends import METHODS`, the method table) reaches just the package.
"""
from __future__ import annotations

import ast
import functools
import itertools
import re
from pathlib import Path

import yaml

from clip_qlora.core.backends import BACKENDS

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"clip_qlora": Path("src/clip_qlora"), "stages": Path("stages")}  # package -> folder, repo-relative
GET_BACKEND = "<backends.get>"  # marker: may import any backend module by name


def module_file(name: str, repo: Path = REPO) -> Path | None:
    """The repo-relative file of a project module or package, or None (not ours, or not a module)."""
    top, *rest = name.split(".")
    if top not in ROOTS:
        return None
    path = ROOTS[top].joinpath(*rest)
    if (repo / path).is_dir() and (repo / path / "__init__.py").exists():
        return path / "__init__.py"
    if (repo / path.with_suffix(".py")).exists():
        return path.with_suffix(".py")
    return None


def module_name(path: Path) -> str:
    for top, folder in ROOTS.items():
        if path.is_relative_to(folder):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(f"{path} is not in the project")


@functools.cache
def imports_of(path: Path, repo: Path = REPO) -> frozenset[str]:
    """Project modules `path` imports anywhere in the file (GET_BACKEND for the backends package itself)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse((repo / path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
                if alias.name == "clip_qlora.core.backends":
                    found.add(GET_BACKEND)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.add(source)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if module_file(sub, repo) is not None:
                    found.add(sub)  # `from pkg import module`
                if sub == "clip_qlora.core.backends" or (source == "clip_qlora.core.backends" and alias.name == "get"):
                    found.add(GET_BACKEND)
    return frozenset(found)


def closure(entry: str, backends, repo: Path = REPO) -> frozenset[Path]:
    """Repo-relative files of every project module `entry` runs (its packages' __init__.py included)."""
    return _closure(entry, tuple(backends), repo)


@functools.cache
def _closure(entry: str, backends: tuple[str, ...], repo: Path) -> frozenset[Path]:
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name == GET_BACKEND:
            todo += [f"clip_qlora.core.backends.{b}" for b in backends]
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            path = module_file(".".join(parts[:i]), repo)
            if path is not None and path not in seen:
                seen.add(path)
                todo += sorted(imports_of(path, repo))
    return frozenset(seen)


# ---- dvc.yaml, expanded as DVC expands foreach/matrix -------------------------------------------------

def _interpolate(text: str, params: dict, key, item) -> str:
    def value(expr: str):
        if expr == "key":
            return key
        if expr == "item" or expr.startswith("item."):
            v = item
            for part in expr.split(".")[1:]:
                v = v[part]
            return v
        v = params
        for part in expr.split("."):
            v = v[part]
        return v

    return re.sub(r"\$\{([^}]+)\}", lambda m: str(value(m.group(1).strip())), text)


def _resolve(obj, params, key, item):
    if isinstance(obj, str):
        return _interpolate(obj, params, key, item)
    if isinstance(obj, list):
        return [_resolve(v, params, key, item) for v in obj]
    if isinstance(obj, dict):
        return {_resolve(k, params, key, item): _resolve(v, params, key, item) for k, v in obj.items()}
    return obj


def _values(spec, params):
    """A foreach/matrix value: a list or mapping, or `${name}` of one in params."""
    if isinstance(spec, str):
        m = re.fullmatch(r"\$\{([^}]+)\}", spec.strip())
        v = params
        for part in m.group(1).strip().split("."):
            v = v[part]
        return v
    return spec


def stage_instances(dvc: dict, params: dict) -> dict[str, dict]:
    """stage name as DVC spells it (prepare@shapes, train@lora-shapes) -> resolved definition, with `_key`."""
    out = {}
    for name, stage in dvc["stages"].items():
        if "foreach" in stage:
            items = _values(stage["foreach"], params)
            pairs = items.items() if isinstance(items, dict) else ((v, v) for v in items)
            for key, item in pairs:
                out[f"{name}@{key}"] = {**_resolve(stage["do"], params, key, item), "_key": key}
        elif "matrix" in stage:
            axes = {k: _values(v, params) for k, v in stage["matrix"].items()}
            body = {k: v for k, v in stage.items() if k != "matrix"}
            for combo in itertools.product(*axes.values()):
                item = dict(zip(axes, combo))
                out[f"{name}@{'-'.join(map(str, combo))}"] = {**_resolve(body, params, None, item), "_key": None}
        else:
            out[name] = {**stage, "_key": None}
    return out


def load_pipeline(repo: Path = REPO) -> tuple[dict, dict]:
    return (yaml.safe_load((repo / "dvc.yaml").read_text()), yaml.safe_load((repo / "params.yaml").read_text()))


def _listed_code(deps: list, repo: Path) -> set[Path]:
    """The project .py files a stage's deps cover (a listed folder covers every .py file under it)."""
    out = set()
    for dep in deps:
        dep = Path(dep)
        if not any(dep.is_relative_to(folder) for folder in ROOTS.values()):
            continue
        if (repo / dep).is_dir():
            out |= {p.relative_to(repo) for p in (repo / dep).rglob("*.py")}
        elif dep.suffix == ".py":
            out.add(dep)
    return out


def code_dep_problems(dvc: dict, params: dict, repo: Path = REPO) -> list[str]:
    """One line per stage whose code deps differ from its import closure (empty when they agree)."""
    problems = []
    for name, stage in stage_instances(dvc, params).items():
        words = stage["cmd"].split()
        if words[:3] != ["python", "-m", "stages"]:
            problems.append(f"{name}: cmd {stage['cmd']!r} is not `python -m stages <stage> ...`")
            continue
        key = stage["_key"]
        backends = [key] if key in BACKENDS else list(BACKENDS)
        runs = closure(f"stages.{words[3]}", backends, repo)
        listed = _listed_code(stage.get("deps", []), repo)
        for path in sorted(runs - listed):
            problems.append(f"{name}: runs {module_name(path)} ({path}) but its deps do not list it")
        for path in sorted(listed - runs):
            problems.append(f"{name}: lists {path} but does not import it")
    return problems
