"""Progress for long loops: a rich bar (rate, ETA) on a terminal, a few plain lines otherwise (DVC logs, CI)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True)


class Bar:
    """`for i in bar(range(start, n))`; `bar.note('loss 1.23')` shows a short status beside the bar.

    `done`: steps finished before this loop (a resumed run), so the count reads "done+i/total" and the rate
    and ETA cover only the steps this process runs.
    """

    def __init__(self, total: int, description: str, done: int = 0):
        self.total, self.description, self.done = total, description, done
        self.status, self._fresh = "", False

    def note(self, status: str) -> None:
        self.status, self._fresh = status, True

    def __call__(self, it: Iterable) -> Iterator:
        if console.is_terminal:
            cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(show_speed=True), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
            with Progress(*cols, console=console, transient=False) as prog:
                task = prog.add_task(self.description, total=self.total, completed=self.done, status="")
                for x in it:
                    yield x
                    prog.update(task, advance=1, status=self.status)
            return
        start, every, done = time.perf_counter(), max(1, self.total // 10), self.done
        for x in it:
            yield x
            done += 1
            if done % every == 0 or done == self.total:
                rate = (done - self.done) / max(time.perf_counter() - start, 1e-9)
                eta = (self.total - done) / rate
                # a status is printed once: a later line without a new one would show a stale value as current
                status, self._fresh = (self.status if self._fresh else ""), False
                print(f"{self.description}: {done}/{self.total} ({rate:.1f}/s, ETA {eta:.0f}s) {status}".rstrip(),
                      file=sys.stderr, flush=True)
