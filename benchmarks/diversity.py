"""Honest but far apart (issue 29): what each defence does to honest vectors that differ, with no attacker.

Peer ``i`` of a swarm averages ``randn(numel) + i`` through ``Peer.average`` (honest values as far apart as peers
on different data), in the simulator (``gossiptrain.simulation``: the live round code in virtual time, 100 Mbit/s
and 50 ms links), for a number of rounds of automatic groups, each round from the last one's results.  Two swarms:
27 peers in groups of 3 for 3 rounds (one Moshpit epoch where the swarm is one cell) and 32 peers in groups of 4
for 6 rounds.  Rules (``allreduce.Defences``; every peer the same):

- ``off``: plain means, the reference;
- ``default``: every defence, as ``Peer.average`` judges a vector by default (``mode="vector"``);
- ``default, no cell floor``: the same without the cell's spread as the radius's floor (``cell_spread=None``);
- ``clip only``, ``mean check only``: one of the two on, the other off;
- ``default, as parameters``: ``mode="params"``, where the size checks (``catch``, ``drop`` beyond 20x the
  owner's size) apply too: what a user who said "params" of vectors that are not parameters gets.

Reported per swarm and rule: the largest distance of a peer's values from the global mean (max abs), how far the
swarm's mean moved (relative to its norm; plain means keep it), the share of peer-rounds ``partial``, and every
defence's count: clipped and dropped contributions, refused means, honest peers caught (every one a false
positive: there is no attacker).

    python benchmarks/diversity.py        # a few seconds per row

Writes ``<out>.json`` (a ``summary`` row per swarm and rule) and ``<out>.png`` (``--out``, default
``benchmarks/results/diversity``).
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import time
from pathlib import Path

import torch
from harness import figure, fmt, report_header, save_figure, write_report

from gossiptrain.allreduce import PARAMETERS, VECTOR, Defences
from gossiptrain.linkswitch import LinkSpec
from gossiptrain.simulation import SimulatedSwarm
from gossiptrain.virtual_time import run

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "diversity"
SWARMS = ((27, 3, 3), (32, 4, 6))  # peers, target group size, rounds
RULES = {
    "off": (Defences.off(), VECTOR),
    "default": (Defences(), VECTOR),
    "default, no cell floor": (Defences(cell_spread=None), VECTOR),
    "clip only": (Defences(mean_check=None), VECTOR),
    "mean check only": (Defences(clip=None), VECTOR),
    "default, as parameters": (Defences(), PARAMETERS),
}


def far_apart(count: int, numel: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=generator) + i for i in range(count)]


def measure(peers: int, group: int, rounds: int, rule: str, numel: int, seed: int) -> dict:
    """One swarm under one rule (see the module docstring)."""
    defences, mode = RULES[rule]

    async def main() -> dict:
        link = LinkSpec(mbit=100, rtt_ms=50)
        swarm = SimulatedSwarm(link=link, seed=seed, defences=defences, round_interval=2.0, target_group_size=group)
        for i in range(peers):
            await swarm.add(f"peer{i}")
        values = dict(zip(swarm.peers, far_apart(peers, numel, seed)))
        expected = torch.stack(list(values.values())).mean(0)
        start = max((v - expected).abs().max().item() for v in values.values())
        first = max(peer.next_round_id() for peer in swarm.peers.values())
        first = group * math.ceil(first / group)  # the start of a Moshpit epoch
        statuses: collections.Counter = collections.Counter()
        for round_id in range(first, first + rounds):
            results = await swarm.round(values, round_id=round_id, mode=mode)
            statuses.update(r.status for r in results.values())
            values = {name: r.averaged for name, r in results.items()}
        rejected: collections.Counter = collections.Counter()
        for peer in swarm.peers.values():
            rejected.update(peer.rejections)
        caught = set().union(*(peer.caught for peer in swarm.peers.values()))
        await swarm.close()
        mean = torch.stack(list(values.values())).mean(0)
        return {
            "peers": peers,
            "group": group,
            "rounds": rounds,
            "rule": rule,
            "start_distance": start,
            "distance_to_mean": max((v - expected).abs().max().item() for v in values.values()),
            "mean_moved": (torch.linalg.vector_norm(mean - expected) / torch.linalg.vector_norm(expected)).item(),
            "partial_share": statuses["partial"] / sum(statuses.values()),
            "averaged_share": (statuses["averaged"] + statuses["partial"]) / sum(statuses.values()),
            "clipped": rejected["clipped"],
            "dropped": rejected["dropped"],
            "refused_means": rejected["hostile_mean"],
            "honest_caught": len(caught),
        }

    started = time.monotonic()
    row = run(main())
    return {**row, "wall_s": round(time.monotonic() - started, 1)}


COLUMNS = (
    ("peers", "peers", "5d"),
    ("rounds", "rounds", "6d"),
    ("rule", "rule", "<24"),
    ("to mean", "distance_to_mean", "9.2e"),
    ("mean moved", "mean_moved", "10.1e"),
    ("partial", "partial_share", "8.1%"),
    ("clipped", "clipped", "7d"),
    ("dropped", "dropped", "7d"),
    ("refused", "refused_means", "7d"),
    ("caught", "honest_caught", "6d"),
)


def table(rows: list[dict]) -> str:
    widths = [int(re.match(r"<?(\d+)", spec).group(1)) for _, _, spec in COLUMNS]
    cells = [f"{name:<{w}}" if spec[0] == "<" else f"{name:>{w}}" for (name, _, spec), w in zip(COLUMNS, widths)]
    header = " ".join(cells)
    lines = [header]
    for row in rows:
        lines.append(" ".join(fmt(row[key], spec) for _, key, spec in COLUMNS))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = figure(1, len(SWARMS), figsize=(6 * len(SWARMS), 4))
    for ax, (peers, group, rounds) in zip(axes, SWARMS):
        mine = [r for r in rows if r["peers"] == peers]
        ax.barh([r["rule"] for r in mine], [max(r["distance_to_mean"], 1e-9) for r in mine])
        ax.set_xscale("log")
        ax.set_xlabel("largest distance from the global mean (max abs)")
        ax.set_title(f"{peers} peers, groups of {group}, {rounds} rounds (start {mine[0]['start_distance']:.1f})")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=4096, help="values per peer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="write OUT.json and OUT.png")
    args = parser.parse_args(argv)
    rows = []
    for peers, group, rounds in SWARMS:
        for rule in RULES:
            rows.append(measure(peers, group, rounds, rule, args.numel, args.seed))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    report = {**report_header("diversity", args), "summary": rows}
    write_report(report, args.out.with_suffix(".json"))
    plot(rows, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
