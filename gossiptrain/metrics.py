"""Per-round records shared by logs, the CLI, the metrics file and the benchmarks."""

from __future__ import annotations

import json
import time
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
    loss: float | None
    bytes_sent: int
    bytes_received: int
    round_seconds: float
    param_norm: float
    param_checksum: float
    errors: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)  # refused network inputs so far, by kind
    time: float = field(default_factory=time.time)

    def line(self) -> str:
        """The human-readable line a peer prints per round."""
        loss = "n/a" if self.loss is None else f"{self.loss:.4f}"
        return (
            f"round {self.round} {self.status:<8} step {self.step:>6} group {self.group_size} loss {loss} "
            f"sent {self.bytes_sent / 2**20:.2f} MiB recv {self.bytes_received / 2**20:.2f} MiB "
            f"in {self.round_seconds:.3f}s norm {self.param_norm:.6f}"
        )


def write_jsonl(record: RoundRecord, stream: IO[str]) -> None:
    stream.write(json.dumps(asdict(record)) + "\n")
    stream.flush()
