"""dvc.yaml's mechanical facts, derived from the code: each stage's code deps and the foreach lists of bases.

    python -m tools.dvc_deps           rewrite them in dvc.yaml (after adding, moving or removing a module,
                                       or registering a backend)
    python -m tools.dvc_deps --check   change nothing; exit 1 naming the stale stages

Code deps. A stage's command is `python -m stages <name> ...`, which runs the Typer command in
`stages/<name>.py`. Its closure is every project module (src/clip_qlora/..., stages/...) that module imports,
transitively, whether the import is at the top of a file or inside a function (imports made lazily, to keep
torch out of `--help`, still run when the stage does), plus the package `__init__.py` of each. Only imports
of the project count.

One import is dynamic: `backends.get(name)` imports `backends/<name>.py`. A module that takes the backends
package itself (`from clip_qlora.core import backends`, `import clip_qlora.core.backends`, `from .backends import get`)
can call it, so it reaches every backend of `BACKENDS`, except in a stage instance whose foreach key is a base
(quantize@nf4), which runs only that backend: its deps name it through the key (`backends/${key}.py`). A
module that takes only names from it (`from .backends import METHODS`, the method table) reaches just the
package. The backends package is found by its folder name, wherever it sits under src/clip_qlora.

What is rewritten. In a stage's `deps:`, the entries that are code (a .py file under stages/ or
src/clip_qlora/, or a folder of them) are replaced by the closure, sorted, stages/ first, where the first
code entry was (at the top of the list when there was none). Everything else stays byte for byte: comments,
data deps (data/splits/..., ${data.root}) and the data files code opens rather than imports
(src/clip_qlora/model_configs: whether a stage reads them depends on which functions it calls, not on what
it imports, so they are kept by hand). A literal foreach any of whose keys is a base (quantize, zeroshot)
becomes the bases of BACKENDS in their order; a mapping entry's fields (`{params: quant, method: qlora}`)
are the base's attributes of those names. DVC cannot import Python, hence the generated copy.
"""
from __future__ import annotations

import argparse
import ast
import collections
import functools
import importlib
import itertools
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"stages": Path("stages"), "clip_qlora": Path("src/clip_qlora")}  # package -> folder; deps list in this order
GET_BACKEND = "<backends.get>"  # marker: may import any backend module by name
COMMAND = "python -m tools.dvc_deps"


class DvcYamlError(Exception):
    """dvc.yaml (or the code) is shaped so that its generated parts cannot be derived or written: one line.
    Not clip_qlora's UserError: this tool reads the library's layout and must not depend on where a module sits."""


@functools.cache
def backends_package(repo: Path = REPO) -> str:
    """The dotted name of the project's backends package (the one folder named `backends`)."""
    found = [p for p in (repo / ROOTS["clip_qlora"]).rglob("backends/__init__.py")]
    if len(found) != 1:
        raise DvcYamlError(f"expected one package folder named backends under {ROOTS['clip_qlora']}, found "
                        f"{len(found)}")
    return module_name(found[0].relative_to(repo))


def bases(repo: Path = REPO) -> dict:
    """The backends table (base -> Backend), as the package registers it."""
    return importlib.import_module(backends_package(repo)).BACKENDS


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
    backends = backends_package(repo)
    found: set[str] = set()
    for node in ast.walk(ast.parse((repo / path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
                if alias.name == backends:
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
                if sub == backends or (source == backends and alias.name == "get"):
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
            todo += [f"{backends_package(repo)}.{b}" for b in backends]
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
    """stage name as DVC spells it (prepare@shapes, train@lora-shapes) -> resolved definition, with `_key` (the
    foreach key) and `_vars` (each `${...}` naming the instance -> its value, e.g. {"key": "nf4"})."""
    out = {}
    for name, stage in dvc["stages"].items():
        if "foreach" in stage:
            items = _values(stage["foreach"], params)
            if isinstance(items, dict):
                pairs, var = items.items(), "key"
            else:
                pairs, var = ((v, v) for v in items), "item"
            for key, item in pairs:
                out[f"{name}@{key}"] = {**_resolve(stage["do"], params, key, item), "_key": key, "_vars": {var: key}}
        elif "matrix" in stage:
            axes = {k: _values(v, params) for k, v in stage["matrix"].items()}
            body = {k: v for k, v in stage.items() if k != "matrix"}
            for combo in itertools.product(*axes.values()):
                item = dict(zip(axes, combo))
                out[f"{name}@{'-'.join(map(str, combo))}"] = {**_resolve(body, params, None, item), "_key": None,
                                                              "_vars": {f"item.{k}": v for k, v in item.items()}}
        else:
            out[name] = {**stage, "_key": None, "_vars": {}}
    return out


def load_pipeline(repo: Path = REPO) -> tuple[dict, dict]:
    return (yaml.safe_load((repo / "dvc.yaml").read_text()), yaml.safe_load((repo / "params.yaml").read_text()))


def _is_code(dep: str, repo: Path) -> bool:
    """A deps entry that names project code: a .py file, or a folder holding some, under stages/ or src/."""
    if not any(Path(dep).is_relative_to(folder) for folder in ROOTS.values()):
        return False
    return dep.endswith(".py") or ((repo / dep).is_dir() and any((repo / dep).rglob("*.py")))


def _listed_code(deps: list, repo: Path) -> set[Path]:
    """The project .py files a stage's deps cover (a listed folder covers every .py file under it)."""
    out = set()
    for dep in deps:
        if not _is_code(dep, repo):
            continue
        if (repo / dep).is_dir():
            out |= {p.relative_to(repo) for p in (repo / dep).rglob("*.py")}
        else:
            out.add(Path(dep))
    return out


def _runs(stage: dict, name: str, repo: Path) -> frozenset[Path]:
    """The project files a resolved stage instance runs."""
    words = stage["cmd"].split()
    if words[:3] != ["python", "-m", "stages"] or len(words) < 4:
        raise DvcYamlError(f"dvc.yaml: stage {name}: cmd {stage['cmd']!r} is not `python -m stages <stage> ...`")
    table = bases(repo)
    return closure(f"stages.{words[3]}", [stage["_key"]] if stage["_key"] in table else list(table), repo)


def code_dep_problems(dvc: dict, params: dict, repo: Path = REPO) -> list[str]:
    """One line per stage whose code deps differ from its import closure (empty when they agree)."""
    problems = []
    for name, stage in stage_instances(dvc, params).items():
        runs = _runs(stage, name, repo)
        listed = _listed_code(stage.get("deps", []), repo)
        for path in sorted(runs - listed):
            problems.append(f"{name}: runs {module_name(path)} ({path}) but its deps do not list it")
        for path in sorted(listed - runs):
            problems.append(f"{name}: lists {path} but does not import it")
    return problems


# ---- the rewrite: text edits at the positions PyYAML reports, so comments and layout stay ----------------

def code_deps(dvc: dict, params: dict, stage: str, repo: Path = REPO) -> list[str]:
    """The code entries `stage` should list: what all its instances run, plus what one instance runs alone
    written with the `${...}` that names it (backends/${key}.py), sorted, stages/ first."""
    instances = {n: s for n, s in stage_instances(dvc, params).items() if n.partition("@")[0] == stage}
    if not instances:
        raise DvcYamlError(f"dvc.yaml: stage {stage} has no instance under params.yaml, so its code cannot be derived")
    runs = {n: {str(p) for p in _runs(s, n, repo)} for n, s in instances.items()}
    common = set.intersection(*runs.values())
    templated = {n: {_template(p, instances[n]["_vars"], n) for p in files - common} for n, files in runs.items()}
    if len({frozenset(t) for t in templated.values()}) > 1:
        raise DvcYamlError(f"dvc.yaml: the instances of stage {stage} run different modules ({templated}), which no "
                        f"`${{...}}` of the stage names")
    order = list(ROOTS.values())
    entries = common | next(iter(templated.values()))
    return sorted(entries, key=lambda p: (next(i for i, f in enumerate(order) if Path(p).is_relative_to(f)), p))


def _template(path: str, variables: dict, instance: str) -> str:
    """`path` with the folder or module named after the instance written as the `${...}` that names it."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        for var, value in variables.items():
            if part == str(value):
                parts[i] = f"${{{var}}}"
            elif part == f"{value}.py":
                parts[i] = f"${{{var}}}.py"
            else:
                continue
            return "/".join(parts)
    raise DvcYamlError(f"dvc.yaml: {instance} alone runs {path}, whose path names none of its "
                    f"{', '.join(variables) or '${...}'}")


@dataclass
class Rewrite:
    text: str           # dvc.yaml as it should be
    stale: list[str]    # stages whose generated parts differ from the text given
    details: list[str]  # what differs, one line each


def _child(node, key: str):
    """(key node, value node) of `key` in a mapping node, or (None, None)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == key:
                return k, v
    return None, None


def _stages(text: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """(name, stage node, body node: its `do` for a foreach) of each stage."""
    _, stages = _child(yaml.compose(text, Loader=yaml.SafeLoader), "stages")
    if not isinstance(stages, yaml.MappingNode):
        raise DvcYamlError("dvc.yaml: no `stages:` mapping")
    out = []
    for k, v in stages.value:
        _, do = _child(v, "do")
        out.append((k.value, v, do if do is not None else v))
    return out


def _line(text: str, first: yaml.Node, last: yaml.Node, what: str) -> tuple[int, int, str]:
    """(start, end) of the line(s) holding first..last, and the text before `first` on its line (`      - `)."""
    start = first.start_mark.index - first.start_mark.column
    end = text.find("\n", last.end_mark.index) + 1 or len(text)
    prefix = text[start:first.start_mark.index]
    if not re.fullmatch(r"\s*(-\s+)?", prefix) or text[last.end_mark.index:end].strip():
        raise DvcYamlError(f"dvc.yaml line {first.start_mark.line + 1}: {what} must stand alone on its line "
                        f"(`- path` or `name: value`) to be rewritten")
    return start, end, prefix


def _apply(text: str, edits: list[tuple[int, int, str]]) -> str:
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _flow(mapping: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def _foreach_edits(text: str, table: dict) -> tuple[list, dict[str, list[str]]]:
    """Edits making each literal foreach over bases list the bases of `table`, and what they change per stage."""
    edits, stale = [], {}
    for name, stage, _ in _stages(text):
        _, node = _child(stage, "foreach")
        if isinstance(node, yaml.SequenceNode):
            keys, values = [n.value for n in node.value], None
        elif isinstance(node, yaml.MappingNode):
            keys, values = [k.value for k, _ in node.value], [v for _, v in node.value]
        else:
            continue  # absent, or ${...} of params
        if not set(keys) & set(table):
            continue
        if values is None:
            entries = list(table)
        else:
            if not all(isinstance(v, yaml.MappingNode) for v in values):
                raise DvcYamlError(f"dvc.yaml: stage {name}: each foreach entry of a base must be a mapping "
                                f"(`nf4: {{params: quant, method: qlora}}`)")
            fields = list(dict.fromkeys(k.value for v in values for k, _ in v.value))
            missing = [f for f in fields if not hasattr(next(iter(table.values())), f)]
            if missing:
                raise DvcYamlError(f"dvc.yaml: stage {name}: foreach field {missing[0]} is not an attribute of the "
                                f"backends table (known: {', '.join(vars(next(iter(table.values()))))})")
            entries = {b: _flow({f: getattr(table[b], f) for f in fields}) for b in table}
        if node.flow_style:
            new = _flow(entries) if values is not None else "[" + ", ".join(entries) + "]"
            edit = (node.start_mark.index, node.end_mark.index, new)
        else:  # one entry a line: `- nf4` or `nf4: {params: quant, method: qlora}`
            spans = [_line(text, n, n, f"a foreach entry of {name}") for n in node.value] if values is None else \
                [_line(text, k, v, f"a foreach entry of {name}") for k, v in node.value]
            start, end, prefix = spans[0][0], spans[-1][1], spans[0][2]
            if "#" in text[start:end] or any(s[1] != e[0] for s, e in zip(spans, spans[1:])):
                raise DvcYamlError(f"dvc.yaml: stage {name}: its foreach entries must be consecutive lines (no comment "
                                f"between them) to be rewritten")
            lines = [f"{prefix}{e}\n" for e in entries] if values is None else \
                [f"{prefix}{b}: {v}\n" for b, v in entries.items()]
            edit = (start, end, "".join(lines))
        if text[edit[0]:edit[1]] != edit[2]:
            edits.append(edit)
            stale[name] = [f"{name}: its foreach is not the bases of the backends table ({', '.join(table)})"]
    return edits, stale


def _deps_edits(text: str, params: dict, repo: Path) -> tuple[list, dict[str, list[str]]]:
    """Edits replacing each stage's code deps by the generated ones, and what they change per stage."""
    dvc = yaml.safe_load(text)
    problems = code_dep_problems(dvc, params, repo)
    counts = collections.Counter(n.partition("@")[0] for n in stage_instances(dvc, params))
    edits, stale = [], {}
    for name, _, body in _stages(text):
        key, deps = _child(body, "deps")
        if not isinstance(deps, yaml.SequenceNode) or deps.flow_style or not deps.value:
            raise DvcYamlError(f"dvc.yaml: stage {name} needs a `deps:` list, one entry per line")
        wanted = code_deps(dvc, params, name, repo)
        code = [n for n in deps.value if isinstance(n, yaml.ScalarNode) and _is_code(n.value, repo)]
        spans = [_line(text, n, n, f"code dep {n.value}") for n in code]  # checked even when current
        if [n.value for n in code] == wanted:
            continue
        if spans:
            at, prefix = spans[0][0], spans[0][2]
        else:  # no code entry yet: at the top of the list, before any comment there
            at = text.index("\n", key.end_mark.index) + 1
            prefix = _line(text, deps.value[0], deps.value[0], "a dep")[2]
        edits += [(start, end, "") for start, end, _ in spans]
        edits.append((at, at, "".join(f"{prefix}{w}\n" for w in wanted)))
        stale[name] = (_per_stage(name, problems, counts[name])
                       or [f"{name}: its code deps are not in the generated order"])
    return edits, stale


def _per_stage(stage: str, problems: list[str], instances: int) -> list[str]:
    """The problems of `stage`'s instances, each said once for the stage when all its instances have it."""
    said: dict[str, list[str]] = {}
    for line in problems:
        instance, _, problem = line.partition(": ")
        if instance.partition("@")[0] == stage:
            said.setdefault(problem, []).append(instance)
    return [f"{stage if len(names) == instances else ', '.join(names)}: {problem}" for problem, names in said.items()]


def _check_kept_by_hand(dvc: dict, params: dict, repo: Path) -> None:
    """A dep under stages/ or src/clip_qlora/ that is not code is kept as written, so after a move it must still
    name something (src/clip_qlora/model_configs)."""
    for name, stage in stage_instances(dvc, params).items():
        for dep in stage.get("deps", []):
            if any(Path(dep).is_relative_to(f) for f in ROOTS.values()) and not (repo / dep).exists():
                raise DvcYamlError(f"dvc.yaml: {name} lists {dep}, which does not exist (data files the code opens "
                                   f"are listed by hand: correct the path)")


def rewrite(text: str, params: dict, repo: Path = REPO) -> Rewrite:
    """dvc.yaml's text with its foreach lists of bases and its code deps generated; nothing else changes."""
    edits, stale = _foreach_edits(text, bases(repo))
    text = _apply(text, edits)
    edits, stale_deps = _deps_edits(text, params, repo)
    text = _apply(text, edits)
    _check_kept_by_hand(yaml.safe_load(text), params, repo)
    for name, lines in stale_deps.items():
        stale[name] = stale.get(name, []) + lines
    return Rewrite(text, list(stale), [line for lines in stale.values() for line in lines])


def stale_message(path: Path, result: Rewrite) -> str:
    """What is stale in dvc.yaml, and the command that regenerates it."""
    return "\n".join([f"{path.name} is stale: the code deps or the foreach lists of bases of "
                      f"{', '.join(result.stale)} differ from the code",
                      *(f"  {line}" for line in result.details), f"regenerate it with: {COMMAND}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Rewrite dvc.yaml's code deps and foreach lists "
                                     "of bases from the code (comments and everything else kept).")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming the stale stages")
    parser.add_argument("--file", type=Path, default=REPO / "dvc.yaml",
                        help="the dvc.yaml to rewrite (params.yaml beside it expands its foreach/matrix)")
    args = parser.parse_args(argv)
    try:
        text = args.file.read_text()
        params = yaml.safe_load((args.file.parent / "params.yaml").read_text())
        result = rewrite(text, params)
    except (DvcYamlError, OSError, yaml.YAMLError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.check:
        if result.stale:
            print(stale_message(args.file, result), file=sys.stderr)
            return 1
        return 0
    if result.stale:
        with tempfile.NamedTemporaryFile("w", dir=args.file.parent, suffix=".tmp", delete=False) as f:
            f.write(result.text)  # beside it, then renamed over it: never a half-written dvc.yaml
        os.chmod(f.name, args.file.stat().st_mode)
        os.replace(f.name, args.file)
        print(f"{args.file}: rewrote the generated parts of {', '.join(result.stale)}")
    else:
        print(f"{args.file}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
