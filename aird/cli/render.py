"""Terminal rendering: rich tables and progress on stderr, JSONL records on stdout when piped or --json."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from aird.core.artifacts import dumps
from aird.core.progress import Reporter

console = Console(stderr=True)


def wants_json(flag: bool) -> bool:
    return flag or not sys.stdout.isatty()


def emit(records: Iterable[dict]) -> None:
    for r in records:
        sys.stdout.write(dumps(r) + "\n")
    sys.stdout.flush()


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(title: str, columns: list[str], rows: Iterable[Iterable], **kw) -> Table:
    t = Table(title=title, title_justify="left", **kw)
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*[fmt(x) for x in row])
    return t


class RichReporter(Reporter):
    """Progress bars on stderr. Stages may nest (a study runs probes that run stages): one live display holds
    them all, an inner bar disappears when its stage ends and the outer one (the study's steps) stays."""

    def __init__(self) -> None:
        self._progress: Progress | None = None

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        outer = self._progress is None
        if outer:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
            )
            self._progress.start()
        progress = self._progress
        task = progress.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            progress.update(task, advance=n, **({"description": description} if description else {}))

        try:
            yield advance
        finally:
            if outer:
                progress.stop()
                self._progress = None
            else:
                progress.remove_task(task)

    def note(self, message: str) -> None:
        console.print(f"[yellow]{message}", soft_wrap=True)


def read_ref_from_stdin(keys: tuple[str, ...] = ("out", "path", "model_path")) -> str:
    """Read the artifact path of the first JSONL record (or a plain path) from stdin, for pipelines."""
    from aird.core.errors import AirdError

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise AirdError("stdin holds a line that is not valid JSON.") from None
            for k in keys:
                if rec.get(k):
                    return str(rec[k])
            raise AirdError(f"the record on stdin has none of the fields {', '.join(keys)}.")
        return line
    raise AirdError("'-' reads a path or a record from stdin, but stdin was empty.")
