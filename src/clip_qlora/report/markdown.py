"""reports/results.md: the accuracy and resources tables, the computed "what changed", the figures.

Every number is computed from the inputs (via the summary); the only hand-written ones are the quoted
references (references.py), always labelled "quoted, not measured here". The report is a list of sections
(`SECTIONS`), each a function of (inputs, summary) returning markdown lines: a new section is one function
and one entry there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clip_qlora import protocol
from clip_qlora.core.backends import label
from clip_qlora.report.references import (REFERENCE_COLUMNS, REFERENCE_ROWS, REFERENCE_SHORT, STUDY_DATASET, STUDY_DEVICE,
                         STUDY_PEAK_GB, STUDY_STATIC_GB, STUDY_TIME, reference_column)
from clip_qlora.report.inputs import GIB, TRAIN_ROW, Inputs, batch_label
from clip_qlora.report.summary import BASELINE, COMPARED, n_seeds_text, zero_shot_columns

RANDOM_INIT_BANNER = (
    "> **⚠ RANDOM-INITIALISED WEIGHTS (`model.pretrained`: none, random weights): the accuracy figures below are not a result.**\n"
    "> The CLIP weights were not loaded, so accuracy is near chance and says nothing about LoRA vs QLoRA.\n"
    "> Memory and time measurements do not depend on the weight values and remain valid.\n"
)
FIGURE_CAPTIONS = {"accuracy": "Accuracy per dataset and method",
                   "memory": "Static vs peak memory per method (GiB)",
                   "step_time": "Step time per method and batch configuration (ms)"}


# ---- formatting ---------------------------------------------------------------------------------------------

def gib(b: int | None) -> str:
    if b is None:
        return "n/a"
    g = b / GIB
    return f"{g:.2f}" if g >= 0.1 or g == 0 else f"{g:.3g}"


def ms(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def mmss(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    mi, se = divmod(rem, 60)
    return f"{h}:{mi:02d}:{se:02d}" if h else f"{mi}:{se:02d}"


def acc(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _x(r: float) -> str:
    return f"{r:.2f}x"


def what_changed(summary: dict[str, Any], batches: list[str]) -> list[str]:
    """One sentence group per `<method>_vs_lora` block, every number taken from `summary`."""
    out = []
    pretrained = summary["pretrained"]
    base = summary.get(BASELINE)
    for m in COMPARED:
        c = summary.get(f"{m}_vs_{BASELINE}")
        if c is None:
            continue
        a = summary[m]
        # static memory
        pct = c["static_saving_pct"]
        if pct is None:
            static = "has no comparable static memory figure"
        elif round(pct) == 0:
            static = f"keeps static memory unchanged ({gib(a['stored_base_bytes'])} GiB)"
        elif pct > 0:
            static = f"saves {pct:.0f} % of static memory ({gib(a['stored_base_bytes'])} vs {gib(base['stored_base_bytes'])} GiB)"
        else:
            static = f"uses {-pct:.0f} % more static memory ({gib(a['stored_base_bytes'])} vs {gib(base['stored_base_bytes'])} GiB)"
        # step time and accuracy
        st = c["step_time_ratio"]
        delta = c["accuracy_delta"]
        acc_word = "costs" if round(delta, 1) < 0 else "gains" if round(delta, 1) > 0 else None
        acc_amount = f"{abs(delta):.1f} points of accuracy"
        acc_note = " (not meaningful: random-initialised weights)" if not pretrained else ""
        if st is None:
            tail = (f"{acc_word} {acc_amount}" if acc_word else "leaves accuracy unchanged (±0.0 points)")
            sentence = f"{label(m)} {static} and {tail}{acc_note}."
        else:
            time_word = "costs" if st >= 1 else "needs only"
            if acc_word == time_word:
                tail = f"{time_word} {_x(st)} step time and {acc_amount}"
            elif acc_word:
                tail = f"{time_word} {_x(st)} step time and {acc_word} {acc_amount}"
            else:
                tail = f"{time_word} {_x(st)} step time and leaves accuracy unchanged (±0.0 points)"
            sentence = f"{label(m)} {static}, {tail}{acc_note}."
        parts = [sentence]
        # peaks and saved activations, each relative to LoRA, in training and per profiled batch
        for key, what, missing in (("peak_ratio", "Peak allocated memory",
                                    "Peak allocated memory was not measured on this device (no allocator statistics)."),
                                   ("saved_activation_ratio", "Saved activations", None)):
            bits = [f"{_x(c[key])} during training"] if c.get(key) is not None else []
            bits += [f"{_x(r)} at batch {batch_label(b)}" for b in batches
                     if (r := c["profile"].get(b, {}).get(key)) is not None]
            if bits:
                parts.append(f"{what} relative to LoRA: {', '.join(bits)}.")
            elif missing:
                parts.append(missing)
        if c.get("train_time_ratio") is not None:
            parts.append(f"Total training time: {_x(c['train_time_ratio'])} LoRA's "
                         f"({mmss(a['train_seconds'])} vs {mmss(base['train_seconds'])} per run).")
        out.append(" ".join(parts))
    return out


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


PROMPT_SETS = {"clip": "'a photo of a {}.'", "coop": "CoOp templates, as the paper's zero-shot row"}
OWN_TEMPLATE = "own datasets: their declared template"  # in the coop column (data/splits.py zero_shot_templates)


def own_datasets(inp: Inputs) -> list[str]:
    """The datasets of the run that are not built in (params' own_datasets)."""
    from clip_qlora.data.registry import DATASETS

    return [d for d in inp.datasets if d not in DATASETS]


def paper_datasets(inp: Inputs) -> list[str]:
    """The datasets of the run that the paper's rows quote (its 8)."""
    return [d for d in inp.datasets if reference_column(d)]


def _prompt_sets(inp: Inputs, base: str) -> list[str]:
    """The zero-shot prompt sets measured for `base` on every dataset."""
    sets = [set(inp.zeroshot[base, d].zero_shot) for d in inp.datasets]
    return [k for k in PROMPT_SETS if all(k in s for s in sets)]


def accuracy_rows(inp: Inputs, raw: dict) -> tuple[list[str], list[list[str]]]:
    """One row per dataset plus the mean row: zero-shot column(s), each method, the quoted references.

    Zero-shot is shown with each prompt set the evaluation measured: CLIP-LoRA trains and evaluates with
    "a photo of a {}.", while the zero-shot numbers of its paper used CoOp's per-dataset templates."""
    zs_cols = []  # (title, base supplying it, prompt set or None for the training template's value)
    own = own_datasets(inp)
    for title, src in zero_shot_columns(inp):
        sets = _prompt_sets(inp, src)
        zs_cols += [(f"{title}, {PROMPT_SETS[k]}" + (f" ({OWN_TEMPLATE})" if k == "coop" and own else ""), src, k)
                    for k in sets] or [(title, src, None)]

    def zero_shot(base, d, k):
        e = inp.zeroshot[base, d]
        return e.zero_shot_accuracy if k is None else e.zero_shot[k]

    refs = [reference_column(d) for d in inp.datasets]
    quoted = REFERENCE_ROWS if any(refs) else []  # no quoted columns beside datasets the paper never ran
    header = ["dataset", *(t for t, _, _ in zs_cols), *(f"{label(m)} (`{m}`)" for m in inp.methods),
              *(f"{s} (quoted, not measured here)" for s in REFERENCE_SHORT[:len(quoted)])]
    rows = []
    for d, ref in zip(inp.datasets, refs):
        row = [d]
        for _, src, k in zs_cols:
            z = zero_shot(src, d, k)
            row.append("n/a" if z is None else f"{z:.2f}")
        for m in inp.methods:
            e = inp.eval[m, d]
            row.append(acc(e.accuracy_mean, e.accuracy_std))
        for _, values in quoted:
            row.append(values[REFERENCE_COLUMNS.index(ref)] if ref else "—")
        rows.append(row)
    mean_row = ["**mean**"]
    for _, src, k in zs_cols:
        values = [zero_shot(src, d, k) for d in inp.datasets]
        z = None if any(v is None for v in values) else sum(values) / len(values)
        mean_row.append("n/a" if z is None else f"**{z:.2f}**")
    for m in inp.methods:
        mean_row.append(f"**{acc(raw[m]['accuracy_mean'], raw[m]['accuracy_std'])}**")
    matched = [r for r in refs if r]
    for _, values in quoted:
        if len(matched) == len(refs):
            vals = [float(values[REFERENCE_COLUMNS.index(r)]) for r in matched]
            mean_row.append(f"{sum(vals) / len(vals):.2f}¹")
        else:
            mean_row.append("—")
    rows.append(mean_row)
    return header, rows


def resource_rows(inp: Inputs, raw: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method", "batch", "stored base (GiB)", "base on device (GiB)", "allocated after load (GiB)",
              "peak allocated (GiB)", "peak reserved (GiB)", "saved activations (GiB)", "step time (ms)",
              "training time (m:ss)",
              "study static (GB)²", "study peak (GB)²", "study time²"]
    rows = []
    for m in inp.methods:
        s = raw[m]
        static = [gib(s["stored_base_bytes"]), gib(s["device_base_bytes"]), gib(s["static_allocated_bytes"])]
        for b in inp.batches:
            p = s["profile"].get(b)
            if p is None:
                continue
            rows.append([f"{label(m)} (`{m}`)", batch_label(b), *static,
                         gib(p["peak_allocated_bytes"]), gib(p["peak_reserved_bytes"]),
                         gib(p["saved_activation_bytes"]), ms(p["step_ms"]), "—",
                         STUDY_STATIC_GB.get(m, "—") if b == "b4x8" else "—",
                         STUDY_PEAK_GB.get((m, b), "—"), STUDY_TIME.get((m, b), "—")])
        rows.append([f"{label(m)} (`{m}`)", f"{TRAIN_ROW}³", *static,
                     gib(s["peak_allocated_bytes"]), gib(s["peak_reserved_bytes"]),
                     gib(s["saved_activation_bytes"]), ms(s["step_ms"]), mmss(s["train_seconds"]),
                     "—", "—", "—"])
    return header, rows


def study_table() -> str:
    header = ["method", "static (GB)", "peak 4x8 (GB)", "peak 32x1 (GB)", "training time 4x8"]
    rows = []
    for m in ("lora", "qlora", "qlora_gc"):
        peak4 = STUDY_PEAK_GB.get((m, "b4x8"), "—")
        if m == "qlora_gc":
            peak4 += f" (headline {STUDY_PEAK_GB[m, 'b1x32']} was the 1x32 run)"
        rows.append([label(m), STUDY_STATIC_GB.get(m, "—"), peak4, STUDY_PEAK_GB.get((m, "b32x1"), "—"),
                     STUDY_TIME.get((m, "b4x8"), "—")])
    return md_table(header, rows)


def relpath(target: Path, start_dir: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(start_dir).resolve())).as_posix()


# ---- the sections -------------------------------------------------------------------------------------------

def _demo(raw: dict) -> str:
    return "" if raw["pretrained"] else " — random-init demo, NOT a result"


def header_section(inp: Inputs, raw: dict, ctx: dict) -> list[str]:
    pre = raw["pretrained"]
    lines = ["# LoRA vs QLoRA on CLIP: results", ""]
    if not pre:
        lines += [RANDOM_INIT_BANNER, ""]
    archs = sorted({p.arch for p in inp.profile.values()} | {s.arch for s in inp.static.values()})
    return lines + [f"Measured on **{raw['device']}**; architecture {', '.join(archs) or 'n/a'}; "
                    f"datasets {', '.join(inp.datasets)}; {n_seeds_text(inp.n_seeds)} per dataset; "
                    f"pretrained weights: **{'yes' if pre else 'none (random weights)'}**.", ""]


def accuracy_section(inp: Inputs, raw: dict, ctx: dict) -> list[str]:
    pre = raw["pretrained"]
    header, rows = accuracy_rows(inp, raw)
    paper, own = paper_datasets(inp), own_datasets(inp)
    lines = [f"## Accuracy{_demo(raw)}", "",
             f"Top-1 accuracy (%) on the full test split, mean ± std over {n_seeds_text(inp.n_seeds)}"
             f"{' (random-init weights: not a result)' if not pre else ''}; the means are over the datasets above."
             + (" The last two columns are **quoted, not measured here** (the reference rows of the repository's "
                "`docs/protocol.md`), for the paper's 8 datasets only." if paper else ""), "",
             md_table(header, rows), ""]
    if own:
        lines += [f"Dataset{'s' if len(own) > 1 else ''} of your own ({', '.join(own)}): the zero-shot column of "
                  "CoOp's templates holds the declared template's accuracy instead.", ""]
    if not paper:
        return lines + [f"None of these datasets is one of the paper's 8 ({', '.join(REFERENCE_COLUMNS[:-1])}), so "
                        "no published accuracy is quoted beside them.", ""]
    others = [d for d in inp.datasets if d not in paper]
    lines += ["¹ Mean of the quoted per-dataset values over the datasets above, computed here from the quoted "
              "numbers." if not others else
              f"The quoted columns have no value for {', '.join(others)} (not among the paper's 8 datasets), "
              "hence no mean row.", ""]
    return lines + ["### Reference rows (quoted, not measured here)", "",
                    "ViT-B/16, 4 shots, top-1 %, as listed in `docs/protocol.md` (the paper row is marked there "
                    "'verify before quoting'; it was not re-verified by this stage).", "",
                    md_table(["source (quoted, not measured here)", *REFERENCE_COLUMNS],
                             [[name, *vals] for name, vals in REFERENCE_ROWS]), ""]


def resources_section(inp: Inputs, raw: dict, ctx: dict) -> list[str]:
    header, rows = resource_rows(inp, raw)
    return ["## Resources", "",
            f"Measured on **{raw['device']}**. Stored base = the frozen base as the quantize stage saves it "
            "(`stored_base_bytes`, comparable with the original study's static figures); base on device = what a "
            "training run keeps of it on the device (`device_base_bytes`: the token-embedding table stays on "
            "the host); 'allocated after load' is `torch.cuda.memory_allocated`. Peaks are "
            "`torch.cuda.max_memory_allocated` / `max_memory_reserved` after a reset just before the loop; "
            "n/a = not measured on this device. Batch rows come from the profile stage; the "
            f"'{TRAIN_ROW}' row from the training stage (peaks: max over datasets; step time: median, "
            "training time: per run, both averaged over datasets). GiB = 2³⁰ bytes.", "",
            md_table(header, rows), "",
            f"² Quoted, not measured here: the original study's Table 1 ({STUDY_DEVICE}, {STUDY_DATASET}; "
            "its GB unit base is not stated). Its training times are for the 4x8 run.", "",
            "³ Measured during the training stage itself (same device).", "",
            f"### The original study's Table 1 (quoted, not measured here; {STUDY_DEVICE}, {STUDY_DATASET})", "",
            study_table(), ""]


def what_changed_section(inp: Inputs, raw: dict, ctx: dict) -> list[str]:
    lines = ["## What changed", ""]
    sentences = what_changed(raw, inp.batches)
    if sentences:
        lines += [f"- {s}" for s in sentences]
    else:
        lines += [f"- No comparison: the baseline `{BASELINE}` is not among the methods."]
    if any(d.startswith("cpu") for d in inp.devices):
        lines += ["- The time ratios above come from a CPU run, where they mean little: a CPU step's time moves "
                  "with whatever else holds the cores (one busy core can change it several-fold between stages), "
                  "and 4-bit dequantization and recomputation cost a CPU otherwise than the GPUs the comparison "
                  "is about. Compare step times on a GPU."]
    best = raw["best_method"]
    return lines + [f"- Best mean accuracy: {label(best)} (`{best}`), {raw[best]['accuracy_mean']:.2f} %"
                    f"{' (random-init: not meaningful)' if not raw['pretrained'] else ''}.", ""]


def figures_section(inp: Inputs, raw: dict, ctx: dict) -> list[str]:
    lines = ["## Figures", ""]
    for key, png in ctx["pngs"].items():
        caption = FIGURE_CAPTIONS[key] + (_demo(raw) if key == "accuracy" else "")
        lines += [f"![{caption}]({relpath(png, ctx['report_path'].parent)})", ""]
    return lines


def protocol_section(inp: Inputs, raw: dict, ctx: dict) -> list[str]:
    """Which protocol ran and every deviation from CLIP-LoRA, from what each training run recorded."""
    records = {f"{m}/{d}": protocol.with_evaluation(inp.train[m, d].protocol,
                                                    {"eval_decode": inp.eval[m, d].eval_decode})
               for m in inp.methods for d in inp.datasets}
    return protocol.markdown(records)


# In report order.
SECTIONS = [header_section, accuracy_section, protocol_section, resources_section, what_changed_section,
            figures_section]


def render_report(inp: Inputs, raw: dict, report_path: Path, pngs: dict[str, Path]) -> str:
    ctx = {"report_path": report_path, "pngs": pngs}
    lines = [line for section in SECTIONS for line in section(inp, raw, ctx)]
    return "\n".join(lines).rstrip() + "\n"
