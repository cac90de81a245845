"""Progress of long waits (state download, waiting for peers, ``finish()``): a bar on a terminal, else log lines.

``show_progress`` is the one place that decides how: a ``rich`` bar on stderr when stderr is a terminal
and not a notebook's, else INFO lines on the ``gossiptrain.progress`` logger, at each tenth of the way
and every ``log_every`` seconds in between (the CLI shows them; a library user sees them when logging
shows INFO).  ``GOSSIPTRAIN_PROGRESS`` overrides the choice: ``bar``, ``log``, ``off`` (the demo turns
its peers' progress off: its own table is the output), or ``auto`` (the default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

ENV = "GOSSIPTRAIN_PROGRESS"
MODES = ("auto", "bar", "log", "off")
LOG_EVERY = 5.0  # seconds between log lines when nothing else made one
LOG_STEPS = 10  # a log line at each tenth of the total


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its stderr is the notebook's, whatever ``isatty`` says)."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_mode() -> str:
    """``bar``, ``log`` or ``off``: ``GOSSIPTRAIN_PROGRESS`` if set, else a bar on a terminal (not a notebook's)."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        logger.warning("%s=%r is not one of %s; using auto", ENV, mode, ", ".join(MODES))
        mode = "auto"
    if mode != "auto":
        return mode
    stderr = sys.stderr
    return "bar" if stderr is not None and stderr.isatty() and not in_notebook() else "log"


def _amounts(completed: float, total: float | None, unit: str) -> str:
    """``"1 of 4 peers (25%)"``, ``"12.0 MB of 400.0 MB (3%)"``, or without a total ``"3 rounds"``."""
    if unit == "bytes":
        done = f"{completed / 1e6:.1f} MB" + (f" of {total / 1e6:.1f} MB" if total else "")
    else:
        done = f"{completed:g}" + (f" of {total:g}" if total else "") + (f" {unit}" if unit else "")
    return f"{done} ({100 * completed / total:.0f}%)" if total else done


class ShownProgress:
    """One long wait's progress, as ``show_progress`` shows it; ``update`` may be called from any thread."""

    def __init__(self, description: str, total: float | None, unit: str, mode: str, log_every: float):
        self.description, self.total, self.unit, self.mode = description, total, unit, mode
        self.completed, self.log_every = 0.0, log_every
        self._started = self._logged_at = time.monotonic()
        self._logged_step: int | None = None
        self._lock = threading.Lock()
        self._bar: Any = None
        self._task: Any = None

    def start(self) -> None:
        if self.mode != "bar":
            return
        from rich.console import Console
        from rich.errors import LiveError
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        if self.unit == "bytes":
            columns = [DownloadColumn(), TransferSpeedColumn()]
        else:
            columns = [MofNCompleteColumn(), TextColumn(self.unit)]
        bar = Progress(  # no redirection of sys.stdout and sys.stderr: no side effect on the process
            TextColumn("{task.description}"),
            BarColumn(),
            *columns,
            TimeElapsedColumn(),
            console=Console(stderr=True),
            redirect_stdout=False,
            redirect_stderr=False,
        )
        try:
            bar.start()
        except LiveError:  # another bar is shown already (two peers in one process): log lines instead
            self.mode = "log"
            return
        self._bar, self._task = bar, bar.add_task(self.description, total=self.total)

    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None:
        """``completed`` of ``total`` (kept from before if None) so far; ``description`` replaces the phase's name."""
        with self._lock:
            self.completed = completed
            self.total = self.total if total is None else total
            self.description = self.description if description is None else description
            if self._bar is not None:
                self._bar.update(self._task, completed=completed, total=self.total, description=self.description)
            elif self.mode == "log":
                self._maybe_log()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        step = int(LOG_STEPS * self.completed / self.total) if self.total else None
        if self._logged_step is None or step != self._logged_step or now - self._logged_at >= self.log_every:
            self._logged_step, self._logged_at = step if step is not None else 0, now
            done = _amounts(self.completed, self.total, self.unit)
            logger.info("%s: %s after %.1fs", self.description, done, now - self._started)

    def stop(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None


@contextlib.contextmanager
def show_progress(
    description: str, total: float | None = None, *, unit: str = "", log_every: float = LOG_EVERY
) -> Iterator[ShownProgress]:
    """Show the progress of one long wait for the ``with`` block's duration (see the module docstring).

    Args:
        description: what is being waited for, e.g. "downloading the training state".
        total: the amount that means done, if known (it may come later, through ``update``).
        unit: of the amounts: ``"bytes"`` shows MB and a transfer speed; any other is printed after the numbers.
        log_every: seconds between log lines when no tenth of the total was passed meanwhile.
    """
    shown = ShownProgress(description, total, unit, progress_mode(), log_every)
    shown.start()
    try:
        yield shown
    finally:
        shown.stop()
