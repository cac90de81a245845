"""Per-round records shared by logs, the CLI, the metrics file and the benchmarks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO


@dataclass
class RoundRecord:
    """One averaging round as seen by one peer."""

    peer: str
    round: int
    status: str
    step: int
    group_size: int
    participants: int  # the round's registrations this peer saw
    mode: str  # what was averaged: "params", or "delta" (sparse codecs, see gossiptrain.wire)
    loss: float | None
    bytes_sent: int
    bytes_received: int
    round_seconds: float
    param_norm: float
    errors: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)  # refused network inputs so far, by kind
    # this round's defences (``RoundResult``; any makes it "partial"): means refused, contributions to our
    # shard clipped or left out
    refused: int = 0
    clipped: int = 0
    dropped: int = 0
    time: float = field(default_factory=time.time)
    # finish()'s rounds only: random projections of the parameters (``params.param_digest``)
    param_digest: list[float] | None = None

    def line(self) -> str:
        """The human-readable line a peer prints per round."""
        loss = "n/a" if self.loss is None else f"{self.loss:.4f}"
        return (
            f"round {self.round} {self.status:<8} {self.mode:<6} step {self.step:>6} group {self.group_size} "
            f"loss {loss} sent {self.bytes_sent / 2**20:.2f} MiB recv {self.bytes_received / 2**20:.2f} MiB "
            f"in {self.round_seconds:.3f}s norm {self.param_norm:.6f}"
        )


def write_jsonl(record: RoundRecord, stream: IO[str]) -> None:
    stream.write(json.dumps(asdict(record)) + "\n")
    stream.flush()


class PeriodicEvaluation:
    """Evaluates a model every ``every`` seconds of training time and writes one ``eval`` record per evaluation.

    Training time is the wall time since ``start()`` minus the time spent in these evaluations, so that a
    loss curve over it does not depend on how slow the evaluation is.  The CLI peer and the benchmarks'
    other training loops share it, so that every curve is measured the same way.
    """

    def __init__(self, evaluate: Callable[[], dict[str, float]], every: float, stream: IO[str] | None):
        self.evaluate, self.every, self.stream = evaluate, every, stream
        self.start()

    def start(self) -> None:
        self._started, self._due, self.eval_seconds = time.monotonic(), 0.0, 0.0

    def train_seconds(self) -> float:
        return time.monotonic() - self._started - self.eval_seconds

    def maybe_evaluate(self, step: int) -> dict | None:
        """Evaluate at the start and then once ``every`` seconds of training time have passed since the last time."""
        train_seconds = self.train_seconds()
        if train_seconds < self._due:
            return None
        began = time.monotonic()
        record = {"event": "eval", "time": time.time(), "step": step, "train_seconds": train_seconds, **self.evaluate()}
        record["eval_seconds"] = time.monotonic() - began
        self.eval_seconds += record["eval_seconds"]
        self._due = (train_seconds // self.every + 1) * self.every
        if self.stream is not None:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
        return record
