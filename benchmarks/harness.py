"""The harness every benchmark script shares, so that a script holds its own measurement and nothing else.

What each benchmark records about the machine and the run, how it writes its results and how it draws them lives
here once, rather than copied from script to script: every result file then records the same things, written the
same way, and a new benchmark starts from its own logic.

- ``report_header(benchmark, args)``: the start of a benchmark's JSON: its name, date, command line, machine and
  settings; ``run_info()`` is the date, command line and machine alone, ``machine_info()`` the machine alone.
- ``write_report(report, path)``: the JSON file (indent 1, a newline at the end), its folder made where missing.
- ``fmt(value, spec)`` and ``median(values)``: a table cell and a median where a number may be missing (None).
- ``load_vector(model, vector)``: a flat vector copied into a model's parameters (never aliased to it).
- ``inner_steps(task, model, optimizer, batches, count)``: a peer's local optimizer steps on its next batches.
- ``figure(...)`` and ``save_figure(fig, path)``: a matplotlib figure on the Agg backend (benchmarks run without a
  display), then laid out, saved and closed.  matplotlib is imported only there: a script's ``--help`` and its
  runs without a plot do not need it.

A script imports it from its own folder (``from harness import ...``), which is on ``sys.path`` when it runs as
``python benchmarks/<script>.py``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch


def machine_info() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hivemind": importlib.metadata.version("hivemind"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_start": list(os.getloadavg()),
    }


def run_info(interpreter_path: bool = False) -> dict:
    """When, how and where a benchmark ran: ``date`` (UTC), ``command`` (shell-quoted) and ``machine``.

    The command names the interpreter by its file name, or by its whole path with ``interpreter_path`` (what
    ``round_time``, ``startup`` and ``compression`` have always recorded)."""
    interpreter = sys.executable if interpreter_path else Path(sys.executable).name
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([interpreter, *sys.argv]),
        "machine": machine_info(),
    }


def report_header(
    benchmark: str, args: argparse.Namespace, worker_only: tuple[str, ...] = (), interpreter_path: bool = False
) -> dict:
    """The start of a benchmark's JSON: its name, ``run_info()`` and its settings (``args`` less ``worker_only``)."""
    return {
        "benchmark": benchmark,
        **run_info(interpreter_path),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in worker_only},
    }


def write_report(report: dict, path: Path) -> None:
    """``report`` as JSON (indent 1, a newline at the end) in ``path``, its folder made where missing.

    Scripts that run for long call it after every run too: a partial result survives an interruption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def fmt(value: object, spec: str) -> str:
    """A table cell: ``format(value, spec)``, or ``-`` where ``value`` is None (not measured, never reached)."""
    return "-" if value is None else format(value, spec)


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (a None is a missing measurement, left out); None if none is.

    Not for times to a target, where a None (never reached) counts as longer than any time: there the median of
    ``[1, None, None]`` is "not reached", not 1 (``low_communication`` keeps its own)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


@torch.no_grad()
def load_vector(model: torch.nn.Module, vector: torch.Tensor) -> None:
    """Copy the flat ``vector`` into ``model``'s parameters, in their order.

    Not ``torch.nn.utils.vector_to_parameters``: that makes every parameter a view of ``vector``, so models loaded
    from one vector share one storage and each one's optimizer steps move all of them."""
    offset = 0
    for param in model.parameters():
        param.copy_(vector[offset : offset + param.numel()].view_as(param))
        offset += param.numel()


def inner_steps(task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, count: int) -> None:
    """``count`` steps of ``optimizer`` on ``model``'s loss of the next batches."""
    for _ in range(count):
        loss = task.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def figure(*args, **kwargs):
    """``pyplot.subplots(*args, **kwargs)``, its figure and axes, on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path, dpi: float = 120) -> None:
    """Lay ``fig`` out (``tight_layout``), save it in ``path`` at ``dpi`` and close it (pyplot keeps it otherwise)."""
    from matplotlib import pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
