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

A healed split (``--split-seconds``, default 30; 0 skips it): 6 peers train the digits model (one initialisation,
each its own batches, Adam) with a parameter round every 2 s of virtual time and 20 local steps between rounds,
but as two halves of 3 that average only among themselves (a DHT split: the halves take turns in the slots, so
neither ever meets the other) for that long; then as one swarm for 10 rounds, and ``finish()``'s rounds of the
parameters without steps until they agree within 1e-6 (at most 20).  ``off`` and ``default``, reported: how far
apart the halves were at the heal and the peers at the end (``demo.spread``), the finishing rounds it took, every
defence's count over the merged rounds, honest peers caught over the run, and the final validation loss.

    python benchmarks/diversity.py        # a few seconds per row

Writes ``<out>.json`` (a ``summary`` row per swarm and rule) and ``<out>.png`` (``--out``, default
``benchmarks/results/diversity``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import re
import time
from pathlib import Path

import torch
from harness import figure, fmt, inner_steps, load_vector, report_header, save_figure, write_report
from torch.nn.utils import parameters_to_vector

from gossiptrain.allreduce import PARAMETERS, VECTOR, Defences
from gossiptrain.demo import spread
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


def rejections_of(swarm: SimulatedSwarm) -> collections.Counter:
    """Every peer's refusals so far, by kind, summed."""
    total: collections.Counter = collections.Counter()
    for peer in swarm.peers.values():
        total.update(peer.rejections)
    return total


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
        rejected = rejections_of(swarm)
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


SPLIT_PEERS, SPLIT_STEPS, SPLIT_MERGED_ROUNDS, SPLIT_FINISH_ROUNDS = 6, 20, 10, 20


def measure_split(rule: str, apart_seconds: float, seed: int) -> dict:
    """Two halves that trained apart, healed (see the module docstring), under ``rule`` of ``RULES``."""
    from gossiptrain.tasks import TASKS

    defences, _ = RULES[rule]
    task = TASKS["digits"](model_seed=seed)
    models = [copy.deepcopy(task.model) for _ in range(SPLIT_PEERS)]
    optimizers = [torch.optim.Adam(model.parameters(), lr=1e-3) for model in models]
    batches = [task.batches(1000 * seed + i, 32) for i in range(SPLIT_PEERS)]

    def flats() -> list[torch.Tensor]:
        return [parameters_to_vector(model.parameters()).detach() for model in models]

    async def average(swarm: SimulatedSwarm, members: range, round_id: int) -> collections.Counter:
        values = {f"peer{i}": flat for i, flat in zip(members, flats()[members.start : members.stop])}
        results = await swarm.round(values, round_id=round_id, mode=PARAMETERS)
        for i in members:
            load_vector(models[i], results[f"peer{i}"].averaged)
        return collections.Counter(r.status for r in results.values())

    def train() -> None:
        for model, optimizer, batch in zip(models, optimizers, batches):
            inner_steps(task, model, optimizer, batch, SPLIT_STEPS)

    async def main() -> dict:
        swarm = SimulatedSwarm(seed=seed, defences=defences, round_interval=2.0, target_group_size=3)
        for i in range(SPLIT_PEERS):
            await swarm.add(f"peer{i}")
        round_id = max(peer.next_round_id() for peer in swarm.peers.values())
        halves = (range(0, 3), range(3, SPLIT_PEERS))
        for _ in range(round(apart_seconds / 2.0)):  # one slot each: a half averages every other slot
            train()
            await average(swarm, halves[round_id % 2], round_id)
            round_id += 1
        apart = spread(flats())
        statuses: collections.Counter = collections.Counter()
        before_heal = rejections_of(swarm)
        for _ in range(SPLIT_MERGED_ROUNDS):
            train()
            statuses += await average(swarm, range(SPLIT_PEERS), round_id)
            round_id += 1
        finish_rounds = 0
        while finish_rounds < SPLIT_FINISH_ROUNDS and spread(flats()) >= 1e-6:
            statuses += await average(swarm, range(SPLIT_PEERS), round_id)
            round_id, finish_rounds = round_id + 1, finish_rounds + 1
        rejected = rejections_of(swarm)
        rejected.subtract(before_heal)
        caught = set().union(*(peer.caught for peer in swarm.peers.values()))
        await swarm.close()
        return {
            "rule": rule,
            "apart_seconds": apart_seconds,
            "spread_at_heal": apart,
            "spread_at_end": spread(flats()),
            "finish_rounds": finish_rounds,
            "averaged_share": (statuses["averaged"] + statuses["partial"]) / sum(statuses.values()),
            "partial_share": statuses["partial"] / sum(statuses.values()),
            "clipped": rejected["clipped"],
            "dropped": rejected["dropped"],
            "refused_means": rejected["hostile_mean"],
            "honest_caught": len(caught),
            "final_loss": sum(task.evaluate(model)["loss"] for model in models) / SPLIT_PEERS,
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


SPLIT_COLUMNS = (
    ("rule", "rule", "<8"),
    ("apart s", "apart_seconds", "7.0f"),
    ("at heal", "spread_at_heal", "8.2e"),
    ("at end", "spread_at_end", "8.2e"),
    ("fin rnds", "finish_rounds", "8d"),
    ("partial", "partial_share", "8.1%"),
    ("clipped", "clipped", "7d"),
    ("dropped", "dropped", "7d"),
    ("refused", "refused_means", "7d"),
    ("caught", "honest_caught", "6d"),
    ("loss", "final_loss", "7.4f"),
)


def table(rows: list[dict], columns: tuple = COLUMNS) -> str:
    widths = [int(re.match(r"<?(\d+)", spec).group(1)) for _, _, spec in columns]
    cells = [f"{name:<{w}}" if spec[0] == "<" else f"{name:>{w}}" for (name, _, spec), w in zip(columns, widths)]
    header = " ".join(cells)
    lines = [header]
    for row in rows:
        lines.append(" ".join(fmt(row[key], spec) for _, key, spec in columns))
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
    parser.add_argument("--split-seconds", type=float, default=30.0, help="a healed split's time apart (0: none)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="write OUT.json and OUT.png")
    args = parser.parse_args(argv)
    rows = []
    for peers, group, rounds in SWARMS:
        for rule in RULES:
            rows.append(measure(peers, group, rounds, rule, args.numel, args.seed))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    split = [measure_split(rule, args.split_seconds, args.seed) for rule in ("off", "default") if args.split_seconds]
    if split:
        print(f"a split healed after {args.split_seconds:g} s apart (6 peers, digits):")
        print(table(split, SPLIT_COLUMNS))
    report = {**report_header("diversity", args), "summary": rows, "split": split}
    write_report(report, args.out.with_suffix(".json"))
    plot(rows, args.out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
