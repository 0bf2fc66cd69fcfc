"""Figures of the scale report: memory and step time against parameter count, log axes, one panel per batch.

Object-oriented matplotlib only (no pyplot), PNGs written atomically with the aggregate figures' settings.
"""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from clip_qlora.report.figures import _colour, _save
from clip_qlora.report.scale import base_label

GIB = 2**30


def _panels(n: int, height: float = 4.8) -> tuple[Figure, list]:
    fig = Figure(figsize=(6.4 * n, height), facecolor="white", layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    return fig, list(axes)


def _arch_axis(ax, records: list[dict]) -> None:
    # architectures within 5% of each other's size (ViT-B-16 and ViT-B-32) share one tick and label
    ticks: list[tuple[int, list[str]]] = []
    for r in records:
        if ticks and r["params"] <= ticks[-1][0] * 1.05:
            ticks[-1][1].append(r["arch"])
        else:
            ticks.append((r["params"], [r["arch"]]))
    ax.set_xscale("log")
    ax.set_xticks([x for x, _ in ticks], [f"{' / '.join(a)}\n{x / 1e6:,.0f} M" for x, a in ticks],
                  rotation=45, ha="right", fontsize=7)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("parameters (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.set_axisbelow(True)


def _frozen(records, methods, base):
    """Frozen bytes per architecture of one base, from any configuration measured on it (batch-independent)."""
    xs, ys = [], []
    for r in records:
        got = [c["device_base_bytes"] for (m, _), c in r["configs"].items()
               if r["methods"][m]["base"] == base and m in methods and c.get("fits")]
        if got:
            xs.append(r["params"])
            ys.append(got[0])
    return xs, ys


def _series(records, method, batch, key):
    xs, ys = [], []
    for r in records:
        c = r["configs"][method, batch]
        if c.get("fits") and c.get(key) is not None:
            xs.append(r["params"])
            ys.append(c[key])
    return xs, ys


def memory_figure(path: Path, records: list[dict], methods: list[str], batches: list[str],
                  sizes: list[float]) -> None:
    """Driver-reported memory (solid) and peak allocated (dashed) per method, frozen base per base (dotted),
    horizontal lines at the GPU sizes; configurations that ran out of memory marked at the device's size."""
    fig, axes = _panels(len(batches))
    any_driver = any(_series(records, m, b, "driver_bytes")[0] for m in methods for b in batches)
    for ax, b in zip(axes, batches):
        frozen_done = set()
        for i, m in enumerate(methods):
            colour = _colour(m, i)
            xs, ys = _series(records, m, b, "driver_bytes")
            if xs:
                ax.plot(xs, [y / GIB for y in ys], "-o", color=colour, label=f"{m}: driver", markersize=4)
            xa, ya = _series(records, m, b, "peak_allocated_bytes")
            if xa:
                ax.plot(xa, [y / GIB for y in ya], "--x", color=colour, label=f"{m}: peak allocated",
                        markersize=4, linewidth=1)
            base = records[0]["methods"][m]["base"]
            if base not in frozen_done:
                xf, yf = _frozen(records, methods, base)
                if xf:
                    frozen_done.add(base)
                    ax.plot(xf, [y / GIB for y in yf], ":.", color=colour, linewidth=1.5,
                            label=f"frozen {base_label(base, records[0]['compute_dtype'])} base")
            oom = [(r["params"], r["configs"][m, b].get("gpu_gib")) for r in records
                   if r["configs"][m, b].get("fits") is False and r["configs"][m, b].get("gpu_gib")]
            if oom:
                ax.scatter([x for x, _ in oom], [g for _, g in oom], marker="^", color=colour, s=40,
                           label=f"{m}: out of memory (at the device's size)")
        ax.set_yscale("log")
        # no GPU sizes without driver figures (CPU): tiny models' frozen bytes sit decades below any card
        for s in sizes if any_driver else []:
            ax.axhline(s, color="grey", linestyle=(0, (2, 3)), linewidth=0.8)
            ax.annotate(f"{s:g} GiB", (1.0, s), xycoords=("axes fraction", "data"), fontsize=7,
                        color="grey", ha="left", va="center", xytext=(2, 0), textcoords="offset points")
        _arch_axis(ax, records)
        ax.set_ylabel(f"{'GPU memory' if any_driver else 'memory'} (GiB, log scale)")
        ax.set_title(f"{b} (micro-batch x accumulation)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.08, 1.0), frameon=False, fontsize=8)
    note = "" if any_driver else "\n(no GPU: frozen bytes only, no allocator or driver figures)"
    fig.suptitle("Memory per method against model size (random weights; memory does not depend on them)"
                 + note)
    _save(fig, path)


def step_time_figure(path: Path, records: list[dict], methods: list[str], batches: list[str]) -> None:
    """Median step time per method against parameter count."""
    fig, axes = _panels(len(batches))
    for ax, b in zip(axes, batches):
        for i, m in enumerate(methods):
            xs, ys = _series(records, m, b, "step_ms")
            if xs:
                ax.plot(xs, ys, "-o", color=_colour(m, i), label=m, markersize=4)
        ax.set_yscale("log")
        _arch_axis(ax, records)
        ax.set_ylabel("step time (ms, log scale)")
        ax.set_title(f"{b} (micro-batch x accumulation)")
    axes[-1].legend(title="method", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    device = ", ".join(sorted({r["device"] for r in records}))
    fig.suptitle(f"Step time per method against model size ({device})")
    _save(fig, path)
