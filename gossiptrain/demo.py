"""``gossiptrain demo``: a local swarm of CLI peers training digits, with a live table."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

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


def _table(records: dict[int, list[dict]]) -> str:
    rows = [f"{'peer':>4} {'step':>6} {'round':>11} {'status':>9} {'group':>5} {'loss':>8} {'MiB sent':>9}"]
    for index, recs in sorted(records.items()):
        rounds = [r for r in recs if "round" in r]
        if rounds:
            r = rounds[-1]
            loss = "n/a" if r["loss"] is None else f"{r['loss']:.4f}"
            sent = sum(x["bytes_sent"] for x in rounds) / 2**20
            status = f"{r['round']:>11} {r['status']:>9} {r['group_size']:>5}"
            rows.append(f"{index:>4} {r['step']:>6} {status} {loss:>8} {sent:>9.2f}")
        else:
            rows.append(f"{index:>4} {'starting':>6}")
    return "\n".join(rows)


def run_demo(
    num_peers: int = 4, steps: int = 3000, timeout: float = 300.0, codec: str = "none", average_every: float = 0.5
) -> dict:
    """Train digits with ``num_peers`` local peers; returns the peers' final accuracy and spread."""
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm() as swarm:
        work = Path(workdir)
        print(f"bootstrap node at {swarm.start_bootstrap()[0]}", flush=True)
        peers = [
            swarm.start_peer(
                *("--steps", str(steps), "--seed", str(i), "--average-every", str(average_every), "--codec", codec),
                *("--wait-for-peers", str(num_peers), "--metrics-file", str(work / f"peer{i}.jsonl")),
                *("--save-model", str(work / f"peer{i}.pt")),
            )[0]
            for i in range(num_peers)
        ]
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in peers) and time.monotonic() < deadline:
            time.sleep(1.0)
            print(_table({i: read_records(work / f"peer{i}.jsonl") for i in range(num_peers)}) + "\n", flush=True)
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
