"""One table that the CLI shows again and again: redrawn in place on a terminal (rich), plain lines elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any


@dataclass(frozen=True)
class Column:
    name: str
    width: int  # in plain lines; on a terminal, the least width of a right-aligned column
    left: bool = False  # aligned left (else right), shortened with an ellipsis on a narrow terminal


class Dashboard:
    """Shows successive versions of one table on ``stream`` (default stdout), used as ``with Dashboard(...) as d``.

    On a terminal, each ``show`` redraws the table in place (``rich.live.Live``), and the last version stays on
    the screen after the ``with`` block.  Elsewhere (a pipe, a file, a test), each version is printed as plain
    lines: the title, a header line, one line per row, columns separated by spaces, so that scripts can split
    them; versions after the first are preceded by an empty line.
    """

    def __init__(self, columns: Sequence[Column], stream: IO[str] | None = None):
        self.columns, self.stream = list(columns), stream or sys.stdout
        self._live: Any = None
        self._shown = 0

    def __enter__(self) -> Dashboard:
        if self.stream.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.stream), auto_refresh=False)
            self._live.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def show(self, title: str | None, rows: Sequence[Sequence[str]]) -> None:
        """Show ``rows`` (one string per column; a shorter row leaves its last columns empty) under ``title``."""
        rows = [[*row, *[""] * (len(self.columns) - len(row))] for row in rows]
        if self._live is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left")
            for column in self.columns:  # a narrow terminal shortens the left-aligned (name) columns only
                if column.left:
                    table.add_column(column.name, overflow="ellipsis")
                else:
                    table.add_column(column.name, justify="right", min_width=column.width, no_wrap=True)
            for row in rows:
                table.add_row(*row)
            self._live.update(table, refresh=True)
        else:
            lines = [] if title is None else [title]
            for row in [[c.name for c in self.columns], *rows]:
                cells = [f"{v:<{c.width}}" if c.left else f"{v:>{c.width}}" for c, v in zip(self.columns, row)]
                lines.append(" ".join(cells).rstrip())
            print(*([""] if self._shown else []), *lines, sep="\n", file=self.stream, flush=True)
        self._shown += 1
