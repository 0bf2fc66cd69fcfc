"""The `scale_report` stage: metrics/scale/<arch>.json in; the report, DVC plot data and figures out.

    reports/scale.md                    tables and sentences, every number computed from the metrics files
    plots/scale/memory/<batch>.json     per architecture: `params`, `arch`, per method `<method>` (the
                                        driver's GiB) and `<method>_allocated` (peak allocated GiB), per base
                                        `frozen_<base>` (frozen GiB); null where not measured
    plots/scale/step_time/<batch>.json  per architecture: `params`, `arch`, step ms per method
    plots/scale_figures/{memory,step_time}.png

A method "fits" a GPU of N GiB at a batch configuration when the memory the driver reported for its training
process (CUDA context, the allocator's reservations, the captured step's pool) is at most N GiB. That is the
whole card: a real one has a little less free (display, driver reservations), and a smaller card's allocator
could release cached blocks that an 80+ GiB card never needs to, so the figure is what a run shows on
nvidia-smi, neither a hard floor nor a ceiling.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from clip_qlora.metrics import Scale
from clip_qlora.runtime.io import UserError, atomic_dir, write_text

GIB = 2**30
MEMORY_FIELDS = ("driver_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "saved_activation_bytes")


# ---- reading ------------------------------------------------------------------------------------------------

def _int_or_none(c: dict, key: str, where: str):
    v = c.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise UserError(f"{where}: '{key}' must be an integer number of bytes or null, got {v!r}")
    return v


def _config(rec: dict, method: str, spec: str, where: str) -> dict:
    entry = rec["methods"].get(method)
    if not isinstance(entry, dict) or entry.get("base") not in ("bf16", "nf4"):
        raise UserError(f"{where}: no method {method!r} with its base (measured: {', '.join(rec['methods'])}); "
                        f"rerun the scale stage")
    c = entry.get(f"b{spec}")
    where = f"{where}: methods.{method}.b{spec}"
    if not isinstance(c, dict):
        raise UserError(f"{where}: missing; rerun the scale stage")
    if "error" in c:
        return c
    if not isinstance(c.get("fits"), bool):
        raise UserError(f"{where}: 'fits' must be true or false")
    if not c["fits"]:
        if c.get("gpu_gib") is not None and not isinstance(c["gpu_gib"], (int, float)):
            raise UserError(f"{where}: 'gpu_gib' must be a number or null")
        return c
    for key in ("device_base_bytes", "trainable_params", *MEMORY_FIELDS):
        _int_or_none(c, key, where)
    if c.get("device_base_bytes") is None:
        raise UserError(f"{where}: 'device_base_bytes' missing")
    step = c.get("step_ms")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0:
        raise UserError(f"{where}: 'step_ms' must be a positive number, got {step!r}")
    return c


def load(folder: Path | None, archs: list[str], methods: list[str], batches: list[str]) -> list[dict]:
    """The records of `archs` (each read as clip_qlora.metrics.Scale, then its configurations checked) as
    dicts with their configurations under "configs", smallest model first (the order of the report and the
    figures). folder: where the <arch>.json files are, if not where the scale stage writes them."""
    records = []
    for arch in archs:
        path = Scale.path(arch) if folder is None else Path(folder) / Scale.path(arch).name
        rec = Scale.read(path).to_dict()
        if rec["params"] <= 0:
            raise UserError(f"{path}: 'params' must be a positive integer")
        rec["configs"] = {(m, b): _config(rec, m, b, str(path)) for m in methods for b in batches}
        records.append(rec)
    return sorted(records, key=lambda r: r["params"])


# ---- what fits ------------------------------------------------------------------------------------------------

def fits_in(c: dict, size_gib: float) -> bool | None:
    """Whether a configuration fits a GPU of size_gib; None where the measurements cannot say."""
    if "error" in c:
        return None
    if not c["fits"]:
        return False if c.get("gpu_gib") is not None and size_gib <= c["gpu_gib"] else None
    if c.get("driver_bytes") is None:
        return None
    return c["driver_bytes"] <= size_gib * GIB


def smallest_fit(c: dict, sizes: list[float]) -> tuple[float | None, str]:
    """(the smallest size it fits, or None; the table's text)."""
    if "error" in c:
        return None, "error"
    if not c["fits"]:
        return None, f"> {c['gpu_gib']:g} GiB (out of memory)" if c.get("gpu_gib") else "out of memory"
    if c.get("driver_bytes") is None:
        return None, "n/a"
    for s in sizes:
        if c["driver_bytes"] <= s * GIB:
            return s, f"{s:g} GiB"
    return None, f"> {sizes[-1]:g} GiB"


def _names(ms: list[str], methods: list[str], records: list[dict]) -> str:
    """The methods by name, and by what they share when they are all of the study's methods that do."""
    info = records[0]["methods"]
    words = ms[0] if len(ms) == 1 else ", ".join(ms[:-1]) + " and " + ms[-1]
    for kind, members in (("4-bit", [m for m in methods if info[m]["base"] == "nf4"]),
                          ("checkpointed", [m for m in methods if info[m]["gradient_checkpointing"]])):
        if ms == members and len(members) < len(methods):
            return f"the {kind} method{'s' if len(ms) > 1 else ''} ({words})"
    return words


def fit_sentences(records: list[dict], methods: list[str], batches: list[str], sizes: list[float]) -> list[str]:
    """For each batch configuration and GPU size: from which architecture on only some methods fit."""
    out = []
    for b in batches:
        per_size = []
        for s in sizes:
            sets = []
            for rec in records:
                known = [fits_in(rec["configs"][m, b], s) for m in methods]
                sets.append(None if any(k is None for k in known)
                            else [m for m, k in zip(methods, known) if k])
            if sets[-1] is None:
                continue
            start = len(sets) - 1
            while start > 0 and sets[start - 1] == sets[-1]:
                start -= 1
            per_size.append((s, start, sets[-1]))
        # of consecutive sizes with the same answer, the largest says the most ("not even in 80 GiB")
        per_size = [x for i, x in enumerate(per_size)
                    if i + 1 == len(per_size) or per_size[i + 1][1:] != x[1:] or x[2] == methods]
        everyone = [x for x in per_size if x[1] == 0 and x[2] == methods]
        nobody = [x for x in per_size if not x[2]]
        for s, start, fit in per_size:
            arch = records[start]["arch"]
            if fit == methods:
                if everyone and (s, start, fit) == everyone[0]:  # the smallest size that holds them all
                    out.append(f"At {b}, every method fits in {s:g} GiB on every architecture measured "
                               f"(up to {records[-1]['arch']}).")
            elif not fit:
                if (s, start, fit) == nobody[-1]:  # the largest size no method fits in says the most
                    where = f"From {arch} on, no" if start else "No"
                    out.append(f"{where} method fits in {s:g} GiB at {b}"
                               f"{'' if start else ' on any architecture measured'}.")
            else:
                where = f"From {arch} on, only" if start else "On every architecture measured, only"
                out.append(f"{where} {_names(fit, methods, records)} fit{'s' if len(fit) == 1 else ''} in {s:g} GiB "
                           f"at {b}.")
    return out


DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def base_label(base: str, compute_dtype: str) -> str:
    """The unquantized base as it ran: bf16 on a GPU, fp32 on a CPU (the base is named after the GPU case)."""
    if base != "bf16":
        return base.upper()
    dtype = DTYPE_SHORT.get(compute_dtype, compute_dtype)
    return dtype if dtype == "bf16" else f"{dtype} (unquantized)"


def _gib(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / GIB:.2f}" if b >= GIB else f"{b / GIB:.3g}"  # tiny models: three significant digits


def _pairs(records: list[dict], methods: list[str]) -> list[tuple[str, str]]:
    """(4-bit method, the bf16 method with the same checkpointing), for the methods present."""
    info = records[0]["methods"]
    out = []
    for q in methods:
        if info[q]["base"] != "nf4":
            continue
        for l in methods:
            if info[l]["base"] == "bf16" and info[l]["gradient_checkpointing"] == info[q]["gradient_checkpointing"]:
                out.append((q, l))
    return out


def payoff_sentences(records: list[dict], methods: list[str], batches: list[str], sizes: list[float]) -> list[str]:
    """Where the 4-bit base first moves a method to a smaller GPU, and what it saves at the largest model."""
    out = []
    for q, l in _pairs(records, methods):
        for b in batches:
            for rec in records:
                (sq, tq), (sl, tl) = (smallest_fit(rec["configs"][m, b], sizes) for m in (q, l))
                if sq is not None and (sl is None and tl.startswith(">") or sl is not None and sq < sl):
                    out.append(f"At {b}, {q} first fits a smaller GPU than {l} at {rec['arch']} "
                               f"({rec['params'] / 1e9:.2f} billion parameters): {tq} against {tl}.")
                    break
            else:
                if all(smallest_fit(r["configs"][q, b], sizes)[0] is not None for r in records):
                    out.append(f"At {b}, {q} never fits a smaller GPU than {l} among the sizes "
                               f"{', '.join(f'{s:g}' for s in sizes)} GiB.")
    big = records[-1]
    for q, l in _pairs(records, methods):
        b = batches[0]
        cq, cl = big["configs"][q, b], big["configs"][l, b]
        if cq.get("fits") and cl.get("fits"):
            saved = cl["device_base_bytes"] - cq["device_base_bytes"]
            line = (f"At {big['arch']}, the frozen base takes {_gib(cl['device_base_bytes'])} GiB on the GPU for {l} and "
                    f"{_gib(cq['device_base_bytes'])} GiB for {q} ({cq['device_base_bytes'] / cl['device_base_bytes']:.3f} of it): "
                    f"{_gib(saved)} GiB saved")
            if cl.get("driver_bytes") and cq.get("driver_bytes"):
                line += (f"; the driver reports {_gib(cl['driver_bytes'])} and {_gib(cq['driver_bytes'])} GiB at {b} "
                         f"({(cl['driver_bytes'] - cq['driver_bytes']) / GIB:.2f} GiB less)")
            out.append(line + ".")
    return out


def time_sentences(records: list[dict], methods: list[str], batches: list[str]) -> list[str]:
    """Step time of each method against the first one, at the smallest and the largest model."""
    out = []
    ref = methods[0]
    for rec in ([records[0], records[-1]] if len(records) > 1 else records):
        for b in batches:
            cref = rec["configs"][ref, b]
            if not cref.get("fits") or "step_ms" not in cref:
                continue
            parts = [f"{ref} {cref['step_ms']:.1f} ms"]
            for m in methods[1:]:
                c = rec["configs"][m, b]
                if c.get("fits") and "step_ms" in c:
                    parts.append(f"{m} {c['step_ms']:.1f} ms ({c['step_ms'] / cref['step_ms']:.2f}x)")
            out.append(f"At {rec['arch']}, {b}: " + ", ".join(parts) + ".")
    return out


# ---- the report ---------------------------------------------------------------------------------------------

def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def render(records: list[dict], methods: list[str], batches: list[str], sizes: list[float],
           figures: dict[str, str] | None = None) -> str:
    """The report; `figures`: caption -> link (relative to the report) of each figure to show."""
    first = records[0]
    devices = sorted({r["device"] for r in records})
    cuda = any(c.get("driver_bytes") is not None or c.get("peak_allocated_bytes") is not None
               for r in records for c in r["configs"].values())
    lora = first.get("lora") or {}
    towers = lora.get("towers", [])
    towers = "both towers" if set(towers) == {"vision", "text"} else f"the {' and '.join(towers)} tower"
    lines = ["# When does QLoRA pay off? Memory and step time across model sizes", "",
             "> Random weights (`pretrained: none` for this study whatever `model.pretrained` says): memory and",
             "> time do not depend on the weight values. Each base is built and initialised on the device with",
             "> open_clip's own initialisers; on a GPU its values are therefore not open_clip's CPU",
             "> initialisation bit for bit (same distributions, another generator, the compute dtype).",
             "",
             f"Device: {', '.join(devices)}. Compute dtype {first['compute_dtype']}; adapters r={lora.get('r')} on "
             f"{', '.join(lora.get('targets', []))} of {towers}; {first['n_classes']} class prompts; {first['warmup']} "
             f"warm-up and {first['steps']} measured step(s) per configuration, each configuration in a fresh "
             f"process on CUDA. "
             f"Peaks are the allocator's maxima over the eager steps; the driver's figure (NVML, what nvidia-smi "
             f"shows: CUDA context included) is read after the CUDA-graph steps, as the process of a training "
             f"run holds it; step time is the median of the timed steps in the mode shown.", ""]
    if not cuda:
        lines += ["**Not measured on a GPU**: no allocator or driver figures, so no fit table; frozen bytes and "
                  "CPU step times only.", ""]
    lines += ["## Architectures", ""]
    rows = []
    for r in records:
        fb = {}
        for m in methods:
            c = r["configs"][m, batches[0]]
            base = r["methods"][m]["base"]
            if c.get("fits") and base not in fb:
                fb[base] = c["device_base_bytes"]
        rows.append([r["arch"], f"{r['params'] / 1e6:,.0f} M", _gib(fb.get("bf16")), _gib(fb.get("nf4")),
                     "n/a" if "bf16" not in fb or "nf4" not in fb else f"{fb['nf4'] / fb['bf16']:.3f}"])
    plain = base_label("bf16", first["compute_dtype"])
    lines += _table(["architecture", "parameters", f"frozen {plain} base GiB", "frozen NF4 base GiB",
                     f"NF4/{plain.split()[0]}"], rows)
    lines += ["Frozen = exact bytes of the frozen weights on the device (parameters, buffers and bitsandbytes "
              "quantization state; the token-embedding table stays on the host during training).", ""]
    if cuda:
        lines += ["## The smallest GPU each method fits", "",
                  "A method fits N GiB when the driver-reported memory of its process is at most N GiB (see "
                  "the caveats below).", ""]
        for b in batches:
            lines += [f"### {b}", ""]
            lines += _table(["architecture", *methods],
                            [[r["arch"], *(smallest_fit(r["configs"][m, b], sizes)[1] for m in methods)]
                             for r in records])
    sentences = fit_sentences(records, methods, batches, sizes) if cuda else []
    sentences += payoff_sentences(records, methods, batches, sizes) if cuda else []
    sentences += time_sentences(records, methods, batches)
    if sentences:
        lines += ["## What the numbers say", "", *(f"- {s}" for s in sentences), ""]
    lines += ["## Measurements", ""]
    for b in batches:
        rows = []
        for r in records:
            for m in methods:
                c = r["configs"][m, b]
                if "error" in c:
                    rows.append([r["arch"], m, "error: " + c["error"][:80], *[""] * 6])
                elif not c["fits"]:
                    rows.append([r["arch"], m, f"out of memory on {c.get('gpu_gib')} GiB", *[""] * 6])
                else:
                    rows.append([r["arch"], m, _gib(c.get("driver_bytes")), _gib(c.get("peak_allocated_bytes")),
                                 _gib(c.get("peak_reserved_bytes")), _gib(c["device_base_bytes"]),
                                 _gib(c.get("saved_activation_bytes")), f"{c['step_ms']:.1f}",
                                 str(c.get("step_mode", ""))])
        lines += [f"### {b}", ""]
        lines += _table(["architecture", "method", "driver GiB", "peak alloc GiB", "peak reserved GiB",
                         "frozen GiB", "saved act GiB", "step ms", "step mode"], rows)
    contexts = [c["driver_context_bytes"] for r in records for c in r["configs"].values()
                if c.get("fits") and c.get("driver_context_bytes")]
    if contexts:
        lines += [f"Before its first allocation a measuring process already holds {_gib(min(contexts))} to "
                  f"{_gib(max(contexts))} GiB as the driver reports it (CUDA context and loaded modules): part "
                  f"of every driver figure above, the same for every method.", ""]
    big = records[-1]
    builds = {}
    for (m, _), c in big["configs"].items():
        if c.get("fits") and isinstance(c.get("base_build_seconds"), (int, float)):
            base = big["methods"][m]["base"]
            builds[base] = max(builds.get(base, 0.0), c["base_build_seconds"])
    if builds:
        lines += [f"Building the {big['arch']} base on the device (construction, initialisation, quantization) "
                  f"took at most " + ", ".join(f"{sec:.1f} s ({base_label(base, big['compute_dtype'])})"
                                               for base, sec in builds.items()) + ".", ""]
    lines += ["## Caveats", "",
              "- Fits are read against the whole card: a real N GiB card has a little less free (display, "
              "driver reservations). A card short of memory makes the allocator release cached blocks before "
              "failing, which an H200 never needs to, so a run could fit somewhat less than the driver figure "
              "here; and the CUDA context's size differs between GPUs and drivers.",
              "- Allocator peaks come from eager steps (a replayed CUDA graph bypasses the allocator's "
              "statistics); the eager and the graph step do the same arithmetic.",
              "- Absolute step times move between machines of the same kind; compare ratios from one run.", ""]
    if not cuda:
        lines.insert(-1, "- Step times here come from a CPU, where their ratios mean little: they move with whatever "
                         "else holds the cores, and 4-bit dequantization and recomputation cost a CPU otherwise "
                         "than the GPUs the comparison is about.")
    if figures:
        lines += ["## Figures", "", *(f"![{caption}]({link})\n" for caption, link in figures.items())]
    return "\n".join(lines)


# ---- DVC plot data ------------------------------------------------------------------------------------------

def plot_records(records: list[dict], methods: list[str], batch: str) -> tuple[list[dict], list[dict]]:
    """(memory rows, step-time rows) of one batch configuration.

    Every column dvc.yaml's plots name is present in every row, null where not measured (a method left out
    of `methods`, an out-of-memory configuration, allocator figures off CUDA): DVC refuses a plot whose
    field is missing, not one whose value is null.
    """
    from clip_qlora.core.backends import BACKENDS, METHODS  # the study's method table names the columns

    memory, steps = [], []
    for r in records:
        mem = {"arch": r["arch"], "params": r["params"],
               **{k: None for m in METHODS for k in (m, f"{m}_allocated")},
               **{f"frozen_{b}": None for b in BACKENDS}}
        st = {"arch": r["arch"], "params": r["params"], **{m: None for m in METHODS}}
        for m in methods:
            c = r["configs"][m, batch]
            if not c.get("fits"):
                continue
            for name, key in ((m, "driver_bytes"), (f"{m}_allocated", "peak_allocated_bytes"),
                              (f"frozen_{r['methods'][m]['base']}", "device_base_bytes")):
                if c.get(key) is not None:
                    mem[name] = round(c[key] / GIB, 4)
            st[m] = round(c["step_ms"], 3)
        memory.append(mem)
        steps.append(st)
    return memory, steps


def write(records: list[dict], methods: list[str], batches: list[str], sizes: list[float], report_path: Path,
          plots_dir: Path, figures_dir: Path) -> str:
    """Every output of the stage; each written whole or not at all."""
    import json

    from clip_qlora.report import scale_figures

    pngs = {"memory": "Memory per method against model size", "step_time": "Step time per method against model size"}
    links = {caption: Path(os.path.relpath(Path(figures_dir, f"{name}.png").resolve(),
                                           Path(report_path).parent.resolve())).as_posix()
             for name, caption in pngs.items()}
    text = render(records, methods, batches, sizes, links)
    with atomic_dir(plots_dir) as tmp:
        for b in batches:
            memory, steps = plot_records(records, methods, b)
            for kind, rows in (("memory", memory), ("step_time", steps)):
                (tmp / kind).mkdir(exist_ok=True)
                (tmp / kind / f"{b}.json").write_text(json.dumps(rows, indent=1) + "\n")
    with atomic_dir(figures_dir) as tmp:
        scale_figures.memory_figure(tmp / "memory.png", records, methods, batches, sizes)
        scale_figures.step_time_figure(tmp / "step_time.png", records, methods, batches)
    write_text(report_path, text + "\n")
    return text


def report(p, folder: Path | None = None, report_path: Path = Path("reports/scale.md"),
           plots_dir: Path = Path("plots/scale"), figures_dir: Path = Path("plots/scale_figures")) -> str:
    """The stage: read everything first (a bad input leaves every output untouched), then write."""
    records = load(folder, p.scale.archs, p.methods, p.scale.batches)
    return write(records, p.methods, p.scale.batches, [float(s) for s in p.scale.gpu_gib], report_path,
                 plots_dir, figures_dir)
