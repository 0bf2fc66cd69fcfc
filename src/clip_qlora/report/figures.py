"""Matplotlib figures of the aggregate stage (PNG, Agg canvas, written atomically).

Only the object-oriented API is used (`matplotlib.figure.Figure`), never `pyplot`, so importing this
module neither changes the global backend nor keeps figures alive between calls.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from clip_qlora.core.backends import METHODS
from clip_qlora.runtime.io import atomic_path
from clip_qlora.report.inputs import GIB

# One colour per method, consistent across figures: by base (bf16 in blues, NF4 in oranges), the gradient-
# checkpointing variant a lighter shade of its base. Methods of another base take the fallback colours.
BASE_COLOURS = {"bf16": ("#1f77b4", "#9ecae1"), "nf4": ("#e6550d", "#fdae6b")}
_FALLBACK = ["#31a354", "#a1d99b", "#756bb1", "#bcbddc", "#636363"]
# Hatches tell the bar kinds apart in the memory figure independently of colour.
_HATCHES = ["", "//", "..", "xx", "\\\\", "++", "oo"]


def _value_label(v: float) -> str:
    """A bar's label: three significant digits (small values stay apart), whole numbers from 100 on."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _colour(method: str, i: int) -> str:
    spec = METHODS.get(method)
    if spec is not None and spec.base in BASE_COLOURS:
        return BASE_COLOURS[spec.base][spec.checkpointing]
    return _FALLBACK[i % len(_FALLBACK)]


def _title(text: str, pretrained: bool, accuracy: bool = False) -> str:
    if pretrained:
        return text
    note = "accuracy is not a result" if accuracy else "memory and time remain valid"
    return f"{text}\n(random-init demo: {note})"


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        # metadata Software=None keeps the PNG bytes independent of the matplotlib version.
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", facecolor="white",
                    metadata={"Software": None})


def _new_figure(n_groups: int, n_bars: int) -> Figure:
    width = min(16.0, max(6.4, 1.5 + 0.5 * n_groups * max(n_bars, 1)))
    fig = Figure(figsize=(width, 4.8), facecolor="white")
    return fig


def accuracy_figure(path: Path, *, methods: list[str], datasets: list[str],
                    mean: dict[str, dict[str, float]], std: dict[str, dict[str, float]],
                    zero_shot: dict[str, float | None], n_seeds_text: str, pretrained: bool) -> None:
    """Grouped bars: one group per dataset (plus the mean over datasets), one bar per method.

    `mean[method][dataset]`, `std[method][dataset]`; `zero_shot[dataset]` drawn as a black tick.
    """
    groups = [*datasets, "mean"]
    fig = _new_figure(len(groups), len(methods))
    ax = fig.add_subplot()
    n = len(methods)
    width = 0.8 / max(n, 1)
    for i, m in enumerate(methods):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ys = [mean[m][d] for d in datasets] + [sum(mean[m][d] for d in datasets) / len(datasets)]
        es = [std[m][d] for d in datasets] + [sum(std[m][d] for d in datasets) / len(datasets)]
        ax.bar(xs, ys, width=width * 0.95, yerr=es, capsize=2, color=_colour(m, i), label=m,
               edgecolor="black", linewidth=0.4, error_kw={"elinewidth": 0.8})
    zs = [zero_shot.get(d) for d in datasets]
    if any(z is not None for z in zs):
        known = [z for z in zs if z is not None]
        zs_all = zs + [sum(known) / len(known) if len(known) == len(zs) else None]
        first = True
        for g, z in enumerate(zs_all):
            if z is None:
                continue
            ax.hlines(z, g - 0.45, g + 0.45, colors="black", linestyles="--", linewidth=1.2,
                      label="zero-shot" if first else None)
            first = False
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 5 else 0)
    ax.set_xlabel("dataset")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(_title(f"Few-shot top-1 accuracy per dataset and method (mean ± std over {n_seeds_text})",
                        pretrained, accuracy=True))
    ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    _save(fig, path)


def memory_figure(path: Path, *, methods: list[str], measures: list[str],
                  values: dict[str, dict[str, int | None]], device: str, pretrained: bool) -> None:
    """Grouped bars in GiB (MiB for a model whose bars are all below 1 GiB): one group per method, one bar
    per measure (static, peaks...).

    `values[method][measure]` in bytes; None (not measured, e.g. allocator statistics on CPU) is left
    out and noted in the figure.
    """
    absent = [meas for meas in measures if all(values[m].get(meas) is None for m in methods)]
    shown = [meas for meas in measures if meas not in absent]
    fig = _new_figure(len(methods), len(shown))
    ax = fig.add_subplot()
    n = len(shown)
    width = 0.8 / max(n, 1)
    partial = False
    top = 0.0
    # GiB, or MiB when every bar is below 1 GiB (a small model's bars would all read 0.01 GiB)
    biggest = max((v for m in methods for meas in shown if (v := values[m].get(meas)) is not None), default=0)
    unit, scale = ("GiB", GIB) if biggest >= GIB else ("MiB", 2**20)
    for j, meas in enumerate(shown):
        xs, ys, cs = [], [], []
        for g, m in enumerate(methods):
            v = values[m].get(meas)
            if v is None:
                partial = True
                continue
            xs.append(g + (j - (n - 1) / 2) * width)
            ys.append(v / scale)
            cs.append(_colour(m, g))
        ax.bar(xs, ys, width=width * 0.95, color=cs, hatch=_HATCHES[j % len(_HATCHES)],
               edgecolor="black", linewidth=0.4, label=meas)
        for x, y in zip(xs, ys):
            ax.annotate(_value_label(y), (x, y), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
        top = max([top, *ys])
    ax.set_xlim(-0.5, len(methods) - 0.5)
    ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlabel("method")
    ax.set_ylabel(f"memory ({unit})")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(_title(f"Static vs peak memory per method ({device})", pretrained))
    # Legend by hatch only (colour encodes the method on the x axis).
    handles = [Patch(facecolor="white", edgecolor="black", hatch=_HATCHES[j % len(_HATCHES)])
               for j in range(len(shown))]
    ax.legend(handles=handles, labels=shown, title="measure", loc="upper left",
              bbox_to_anchor=(1.0, 1.0), frameon=False)
    notes = []
    if absent:
        notes.append("not measured on this device (no allocator statistics): " + ", ".join(absent))
    if partial:
        notes.append("missing bars: not measured for that method")
    if notes:
        fig.text(0.01, -0.02, "\n".join(notes), ha="left", va="top", fontsize=8, style="italic")
    _save(fig, path)


def step_time_figure(path: Path, *, methods: list[str], batches: list[str],
                     values: dict[str, dict[str, float | None]], device: str, pretrained: bool) -> None:
    """Grouped bars in ms: one group per batch configuration, one bar per method."""
    fig = _new_figure(len(batches), len(methods))
    ax = fig.add_subplot()
    n = len(methods)
    width = 0.8 / max(n, 1)
    for i, m in enumerate(methods):
        xs, ys = [], []
        for g, b in enumerate(batches):
            v = values[m].get(b)
            if v is None:
                continue
            xs.append(g + (i - (n - 1) / 2) * width)
            ys.append(v)
        ax.bar(xs, ys, width=width * 0.95, color=_colour(m, i), edgecolor="black", linewidth=0.4, label=m)
        for x, y in zip(xs, ys):
            ax.annotate(_value_label(y), (x, y), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xlim(-0.5, len(batches) - 0.5)
    ax.set_xticks(range(len(batches)), batches)
    ax.set_xlabel("batch configuration (micro-batch x accumulation steps)")
    ax.set_ylabel("step time (ms)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(_title(f"Step time per method ({device})", pretrained))
    ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    _save(fig, path)
