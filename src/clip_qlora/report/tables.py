"""The rich tables `aggregate` prints: the report's accuracy and resources tables, for the terminal."""
from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

from clip_qlora.report.inputs import Inputs
from clip_qlora.report.markdown import accuracy_rows, resource_rows
from clip_qlora.report.summary import n_seeds_text


PIPED_WIDTH = 1000  # wider than any table here: rich then draws each at its own width


def table_console() -> Console:
    """stdout for the tables: a terminal's width, and when piped (a log file, `| tee`) as wide as a table
    needs, where rich would otherwise assume 80 columns and cut cells to "Lo…" (COLUMNS, if set, still rules)."""
    out = Console()
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(width=PIPED_WIDTH)
    return out


def rich_tables(inp: Inputs, raw: dict) -> list[Table]:
    pre = raw["pretrained"]
    acc = Table(title=f"Accuracy (top-1 %, mean ± std over {n_seeds_text(inp.n_seeds)})"
                      + ("" if pre else " — RANDOM-INIT, NOT A RESULT"))
    header, rows = accuracy_rows(inp, raw)
    for i, h in enumerate(header):
        acc.add_column(h.replace("`", ""), justify="left" if i == 0 else "right")
    for r in rows:
        acc.add_row(*(c.replace("**", "") for c in r))
    res = Table(title=f"Resources on {raw['device']} (GiB, ms, m:ss; study columns quoted, not measured here)")
    header, rows = resource_rows(inp, raw)
    for i, h in enumerate(header):
        res.add_column(h.replace("`", ""), justify="left" if i < 2 else "right")
    for r in rows:
        res.add_row(*(c.replace("`", "") for c in r))
    return [acc, res]

