"""The aggregate stage's plot data: DVC plot records (dvc.yaml `plots:`) and the matplotlib figures' inputs.

    plots/{accuracy,memory,step_time}.json   records for `dvc plots`
    plots/loss/<dataset>.json                training loss per method, one column per method
    plots/confusion_best/<dataset>.json      confusion records of the best method (copied by report.aggregate)
    <plots_dir>/{accuracy,memory,step_time}.png
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from clip_qlora.report import figures
from clip_qlora.report.inputs import GIB, TRAIN_ROW, Inputs, batch_label, read_loss
from clip_qlora.report.summary import n_seeds_text, zero_shot_columns


def loss_tables(inp: Inputs, dvclive_dir: Path) -> dict[str, list[dict]]:
    """dataset -> rows {step, <method>: loss or null} with a column for every method of the run.

    dvc.yaml's loss plot draws one line per params.yaml `methods` entry (the methods aggregate is given), and
    DVC only plots a list whose records all have the same keys, hence nulls (Vega-Lite skips them) where a
    method logged no loss at that step. A log holding several runs (steps restarting) is averaged per step.
    """
    cols = inp.methods
    tables = {}
    for d in inp.datasets:
        per_method: dict[str, dict[float, float]] = {}
        for m in inp.methods:
            acc: dict[float, list[float]] = {}
            # one DVCLive folder per seed (train writes dvclive/train/<method>/<dataset>/seed<k>/)
            logs = sorted((dvclive_dir / m / d).glob("seed*/plots/metrics/train/loss.tsv"))
            if not logs:  # named like the file a single seed would have, so the message points somewhere
                read_loss(dvclive_dir / m / d / "seed1" / "plots" / "metrics" / "train" / "loss.tsv")
            for log in logs:
                for step, loss in read_loss(log):
                    acc.setdefault(step, []).append(loss)
            per_method[m] = {s: sum(v) / len(v) for s, v in acc.items()}
        steps = sorted(set().union(*(set(v) for v in per_method.values())))
        rows = []
        for s in steps:
            row: dict[str, Any] = {"step": int(s) if float(s).is_integer() else s}
            for m in cols:
                v = per_method.get(m, {}).get(s)
                row[m] = None if v is None or math.isnan(v) else v
            rows.append(row)
        tables[d] = rows
    return tables


def plot_records(inp: Inputs, raw: dict) -> dict[str, list[dict]]:
    accuracy = [{"method": m, "dataset": d, "accuracy": inp.eval[m, d].accuracy_mean,
                 "std": inp.eval[m, d].accuracy_std or 0.0, "label": f"{d} / {m}"}
                for d in inp.datasets for m in inp.methods]
    memory = []
    step_time = []
    for m in inp.methods:
        s = raw[m]
        measures = [("static", s["stored_base_bytes"]), (f"peak allocated ({TRAIN_ROW})", s["peak_allocated_bytes"])]
        measures += [(f"peak allocated ({batch_label(b)})", s["profile"][b]["peak_allocated_bytes"])
                     for b in inp.batches if b in s["profile"]]
        for measure, v in measures:
            if v is not None:
                memory.append({"method": m, "measure": measure, "bytes": v, "gib": v / GIB,
                               "label": f"{m} / {measure}"})
        times = [(batch_label(b), s["profile"][b]["step_ms"]) for b in inp.batches if b in s["profile"]]
        times.append((TRAIN_ROW, s["step_ms"]))
        for batch, v in times:
            if v is not None:
                step_time.append({"method": m, "batch": batch, "step_ms": v, "label": f"{m} / {batch}"})
    return {"accuracy": accuracy, "memory": memory, "step_time": step_time}


def draw_figures(inp: Inputs, raw: dict, pngs: dict[str, Path]) -> None:
    """The three PNGs (`pngs`: accuracy, memory, step_time -> path) from the inputs and the summary."""
    pre, device = raw["pretrained"], raw["device"]
    zs_col = zero_shot_columns(inp)[0][1]
    figures.accuracy_figure(
        pngs["accuracy"], methods=inp.methods, datasets=inp.datasets,
        mean={m: {d: inp.eval[m, d].accuracy_mean for d in inp.datasets} for m in inp.methods},
        std={m: {d: inp.eval[m, d].accuracy_std or 0.0 for d in inp.datasets} for m in inp.methods},
        zero_shot={d: inp.zeroshot[zs_col, d].zero_shot_accuracy for d in inp.datasets},
        n_seeds_text=n_seeds_text(inp.n_seeds), pretrained=pre)
    measures = ["static", f"peak allocated ({TRAIN_ROW})",
                *(f"peak allocated ({batch_label(b)})" for b in inp.batches)]
    mem = {m: {"static": raw[m]["stored_base_bytes"], measures[1]: raw[m]["peak_allocated_bytes"],
               **{f"peak allocated ({batch_label(b)})": raw[m]["profile"].get(b, {}).get("peak_allocated_bytes")
                  for b in inp.batches}} for m in inp.methods}
    figures.memory_figure(pngs["memory"], methods=inp.methods, measures=measures, values=mem,
                          device=device, pretrained=pre)
    batches = [*(batch_label(b) for b in inp.batches), TRAIN_ROW]
    times = {m: {**{batch_label(b): raw[m]["profile"].get(b, {}).get("step_ms") for b in inp.batches},
                 TRAIN_ROW: raw[m]["step_ms"]} for m in inp.methods}
    figures.step_time_figure(pngs["step_time"], methods=inp.methods, batches=batches, values=times,
                             device=device, pretrained=pre)
