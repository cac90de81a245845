"""``gossiptrain demo``: a local swarm of CLI peers training digits, with a live table."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from gossiptrain.dashboard import Column, Dashboard
from gossiptrain.progress import ENV as PROGRESS_ENV
from gossiptrain.rounds import AVERAGED
from gossiptrain.testing import LocalSwarm


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spread(flats: list[torch.Tensor]) -> float:
    """Largest distance of a peer's flat parameters from the peers' mean, relative to the mean's norm."""
    stacked = torch.stack(flats).double()
    mean = stacked.mean(0)
    return ((stacked - mean).norm(dim=1).max() / mean.norm()).item()


def parameter_spread(state_dicts: list[dict[str, torch.Tensor]]) -> float:
    """``spread`` of the peers' saved models."""
    return spread([torch.cat([t.flatten().double() for t in sd.values()]) for sd in state_dicts])


DEMO_COLUMNS = [
    Column("peer", 4),
    Column("step", 8),
    Column("rounds", 6),
    Column("averaged", 8),
    Column("status", 9),
    Column("group", 5),
    Column("loss", 8),
    Column("MiB sent", 9),
]


def _rows(records: dict[int, list[dict]]) -> list[list[str]]:
    """One row per peer: its step, rounds since it started (and how many averaged), its last round, loss, MiB sent."""
    rows = []
    for index, recs in sorted(records.items()):
        rounds = [r for r in recs if "round" in r]
        if not rounds:
            rows.append([str(index), "starting"])
            continue
        last = rounds[-1]
        averaged = sum(r["status"] in AVERAGED for r in rounds)
        loss = "n/a" if last["loss"] is None else f"{last['loss']:.4f}"
        sent = sum(r["bytes_sent"] for r in rounds) / 2**20
        row = [index, last["step"], len(rounds), averaged, last["status"], last["group_size"], loss, f"{sent:.2f}"]
        rows.append([str(value) for value in row])
    return rows


def run_demo(
    num_peers: int = 4, steps: int = 3000, timeout: float = 300.0, codec: str = "none", average_every: float = 1.0
) -> dict:
    """Train digits with ``num_peers`` local peers; returns the peers' final accuracy and spread.

    The output is the table and two closing lines: the peers' progress display is off (``GOSSIPTRAIN_PROGRESS``),
    and the slot is the CLI's default, 1 s.  A 0.5 s slot is too short where the peers outnumber the cores: their
    training then slows each round to 0.2-0.5 s, which with the registration lead no longer fits the slot, and the
    peers then average every second slot (``gossiptrain.timing``).
    """
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm() as swarm:
        work = Path(workdir)
        swarm.start_bootstrap()
        peers = [
            swarm.start_peer(
                *("--steps", str(steps), "--seed", str(i), "--average-every", str(average_every), "--codec", codec),
                *("--wait-for-peers", str(num_peers), "--metrics-file", str(work / f"peer{i}.jsonl")),
                *("--save-model", str(work / f"peer{i}.pt")),
                env={PROGRESS_ENV: "off"},  # their stderr is ours: bars or lines would break into the table
            )[0]
            for i in range(num_peers)
        ]
        started = time.monotonic()
        with Dashboard(DEMO_COLUMNS) as dashboard:
            while any(p.poll() is None for p in peers) and time.monotonic() < started + timeout:
                time.sleep(1.0)
                title = f"{num_peers} peers training digits, {time.monotonic() - started:.0f}s"
                dashboard.show(title, _rows({i: read_records(work / f"peer{i}.jsonl") for i in range(num_peers)}))
        finals = [
            next((r for r in read_records(work / f"peer{i}.jsonl") if r.get("final")), None) for i in range(num_peers)
        ]
        if any(f is None for f in finals):
            raise RuntimeError("some peers did not finish; see their output above")
        spread = parameter_spread([torch.load(work / f"peer{i}.pt") for i in range(num_peers)])
    accuracy = [f["accuracy"] for f in finals]
    print(f"test accuracy per peer: {', '.join(f'{a:.3f}' for a in accuracy)}")
    print(f"relative spread between peers' parameters: {spread:.2e}")
    return {"accuracy": accuracy, "spread": spread}
