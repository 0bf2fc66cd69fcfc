"""The `aggregate` stage: per-stage metrics in, summary + report + figures + DVC plot data out.

One module per job: inputs (read and check every input), summary (the arithmetic), markdown (the report),
tables (rich tables for the terminal), plot_data (DVC plot records and the figures' data), figures
(matplotlib), references (the quoted numbers). Nothing here imports torch: aggregate reads JSON.

Outputs:
    metrics/summary.json   clip_qlora.metrics.Summary: scalar-leafed (nested dicts of numbers/strings/bools)
                           for `dvc metrics`
    reports/results.md     accuracy table, Table-1-shaped resources table, computed "what changed"
    <plots_dir>/{accuracy,memory,step_time}.png   (plots_dir: e.g. plots/figures)
    plots/{accuracy,memory,step_time}.json, plots/loss/<dataset>.json, plots/confusion_best/<dataset>.json
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from clip_qlora.metrics import Summary
from clip_qlora.report import plot_data, inputs as report_inputs
from clip_qlora.runtime.io import atomic_dir, write_json, write_text
from clip_qlora.report.markdown import render_report
from clip_qlora.report.tables import rich_tables, table_console
from clip_qlora.report.summary import build_summary, clean


def aggregate(methods: list[str], datasets: list[str], root: Path, report_path: Path, plots_dir: Path,
              console: Console | None = None, *, plot_data_dir: Path | None = None, dvclive_dir: Path | None = None,
              confusion_dir: Path | None = None) -> dict:
    """Read every stage's metrics; write summary, report, figures and DVC plot data; return the summary.

    `root` is the project folder: the metrics files are read, and metrics/summary.json written, where
    clip_qlora.metrics places them under it. PNGs go to `plots_dir`. The data files that dvc.yaml's `plots:`
    declares go to `plot_data_dir`, default `<root>/plots`, so they stay where the plot declarations expect
    them whatever `plots_dir` is. Loss logs are read from `dvclive_dir` (default `<root>/dvclive/train`),
    confusion records from `confusion_dir` (default `<root>/plots/confusion`).
    """
    root, plots_dir, report_path = Path(root), Path(plots_dir), Path(report_path)
    plot_data_dir = Path(plot_data_dir) if plot_data_dir is not None else root / "plots"
    dvclive_dir = Path(dvclive_dir) if dvclive_dir is not None else root / "dvclive" / "train"
    confusion_dir = Path(confusion_dir) if confusion_dir is not None else root / "plots" / "confusion"

    # read everything first, so that a missing input leaves every output untouched
    inp = report_inputs.load(methods, datasets, root)
    raw = build_summary(inp)
    best = raw["best_method"]
    confusion = {d: report_inputs.confusion_records(confusion_dir / best / f"{d}.json") for d in inp.datasets}
    loss = plot_data.loss_tables(inp, dvclive_dir)
    summary = Summary.from_dict(clean(raw), "the summary")

    pngs = {"accuracy": plots_dir / "accuracy.png", "memory": plots_dir / "memory.png",
            "step_time": plots_dir / "step_time.png"}
    plot_data.draw_figures(inp, raw, pngs)
    for name, records in plot_data.plot_records(inp, raw).items():
        write_json(plot_data_dir / f"{name}.json", records)
    with atomic_dir(plot_data_dir / "loss") as tmp:
        for d, rows in loss.items():
            write_json(tmp / f"{d}.json", rows)
    with atomic_dir(plot_data_dir / "confusion_best") as tmp:
        for d, records in confusion.items():
            write_json(tmp / f"{d}.json", records)

    write_text(report_path, render_report(inp, raw, report_path, pngs))
    summary.write(root)

    console = console or table_console()
    for table in rich_tables(inp, raw):
        console.print(table)
    return summary.to_dict()
