"""Swarms of live ``Peer`` objects in one process, on a modelled network, in virtual time.

Nothing of the round is re-implemented here: each simulated peer is a ``gossiptrain.peer.Peer`` (membership,
the clock, guarded groups, the exchange with its straggler deadlines, defences, codecs and error feedback,
state download) started on a port of a ``simnet.SimulatedNetwork`` instead of a libp2p daemon, and the whole
swarm runs on a ``virtual_time`` loop: a slot of ``round_interval`` seconds costs only the CPU time of what
happens in it.  The same seed gives the same run, bit for bit (one process, one order of events).

``SimulatedSwarm`` is the building block (add, crash, leave peers; run a round of chosen peers), used by the
tests and benchmarks; ``simulate(Scenario(...))`` (and ``gossiptrain simulate``) answers "what will my swarm
do": peers averaging a vector every slot over given links, with churn, and a table of what happened.

Failure semantics: an exception raised in a simulated peer's code propagates out of ``simulate`` and of
``SimulatedSwarm.round``; network failures are results, as for live peers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gossiptrain.allreduce import PARAMETERS, VECTOR
from gossiptrain.linkswitch import LinkSpec
from gossiptrain.membership import DHTTraffic
from gossiptrain.peer import Peer
from gossiptrain.rounds import AVERAGED, RoundResult
from gossiptrain.simnet import SimulatedNetwork, SimulatedPort
from gossiptrain.state import StateDownloadError, download_state
from gossiptrain.virtual_time import run

logger = logging.getLogger(__name__)

IDEAL_LINK = LinkSpec(mbit=math.inf, rtt_ms=0.0)
TASKS = ("vector", "regression")


class Regression:
    """Linear regression ``y = x . w* + noise`` for a simulated swarm: every peer draws its own batches (its seed),
    all share the true weights and a test set.  Small on purpose: ``numel`` weights, batches of ``BATCH``."""

    BATCH, TEST, LR, NOISE = 16, 256, 0.5, 0.1

    def __init__(self, numel: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.truth = torch.randn(numel, generator=generator) / math.sqrt(numel)
        self.test_x = torch.randn(self.TEST, numel, generator=generator)
        self.test_y = self.test_x @ self.truth + self.NOISE * torch.randn(self.TEST, generator=generator)
        self.numel = numel

    def steps(self, w: torch.Tensor, generator: torch.Generator, count: int) -> torch.Tensor:
        """``count`` SGD steps on fresh batches from ``generator`` (normalised: stable at any ``numel``)."""
        rate = self.LR / (self.BATCH + self.numel)
        for _ in range(count):
            x = torch.randn(self.BATCH, self.numel, generator=generator)
            y = x @ self.truth + self.NOISE * torch.randn(self.BATCH, generator=generator)
            w = w - rate * (x.T @ (x @ w - y))
        return w

    def loss(self, w: torch.Tensor) -> float:
        return ((self.test_x @ w - self.test_y) ** 2).mean().item()


class SimulatedSwarm:
    """Live ``Peer``s on one ``SimulatedNetwork``; use it inside a ``virtual_time`` loop (``virtual_time.run``).

    Args:
        run_id: the peers' run.
        seed: seeds the network (identities, jitter, losses, DHT misses) and Python's ``random`` (the live
            code's own draws, such as the order of state donors).
        link: every peer's link unless ``add`` names another.
        dht_miss: chance that a DHT read misses a record (``simnet.SimulatedNetwork``).
        dht_lag: seconds before a stored record is seen.
        peer_options: passed to every ``Peer`` (``target_group_size``, ``round_interval``, ``timeouts``, ...).
    """

    def __init__(
        self,
        run_id: str = "simulated",
        *,
        seed: int = 0,
        link: LinkSpec = IDEAL_LINK,
        dht_miss: float = 0.0,
        dht_lag: float = 0.0,
        **peer_options: Any,
    ):
        self.run_id, self.link, self.peer_options = run_id, link, peer_options
        self.network = SimulatedNetwork(seed, dht_miss=dht_miss, dht_lag=dht_lag)
        random.seed(seed)
        self.peers: dict[str, Peer] = {}  # the live ones, by name
        self._ports: dict[str, SimulatedPort] = {}

    async def add(self, name: str, *, link: LinkSpec | None = None, client: bool = False, **options: Any) -> Peer:
        """Start peer ``name`` (its identity follows from the seed and the name), joined to the live peers."""
        if name in self.peers:
            raise ValueError(f"peer {name!r} is already in the swarm")
        port = self.network.port(name, link or self.link, client=client)
        initial = [self.maddr(other) for other in list(self.peers)[:1]]
        loop = asyncio.get_running_loop()
        peer = Peer(
            self.run_id,
            initial_peers=initial,
            client_mode=client,
            network=port,
            clock=loop.time,
            **{**self.peer_options, **options},
        )
        await peer.start()
        self.peers[name], self._ports[name] = peer, port
        return peer

    def maddr(self, name: str) -> str:
        return f"{self.network.address(name)}/p2p/{self.peers[name].peer_id}"

    async def crash(self, name: str) -> None:
        """Peer ``name`` vanishes: its streams reset, its record stays until it expires."""
        peer = self.peers.pop(name)
        self._ports.pop(name).transport.crash()
        await peer.stop(announce=False)

    async def leave(self, name: str) -> None:
        """Peer ``name`` leaves cleanly (a tombstone in the DHT)."""
        await self.peers.pop(name).stop()
        self._ports.pop(name)

    async def close(self) -> None:
        for name in list(self.peers):
            await self.leave(name)

    async def round(
        self,
        values: dict[str, torch.Tensor],
        weights: dict[str, float] | None = None,
        *,
        round_id: int | None = None,
        residuals: dict[str, torch.Tensor] | None = None,
        **options: Any,
    ) -> dict[str, RoundResult]:
        """Peers ``values`` names average their values in one slot (the next one all of them can make, or
        ``round_id``), each through ``Peer.average`` with ``options``; returns each one's result."""
        names = list(values)
        if round_id is None:
            round_id = max(self.peers[name].next_round_id() for name in names)
        outcomes = await asyncio.gather(
            *(
                self.peers[name].average(
                    values[name],
                    (weights or {}).get(name, 1.0),
                    round_id,
                    residual=(residuals or {}).get(name),
                    **options,
                )
                for name in names
            )
        )
        return dict(zip(names, outcomes))


@dataclass
class Scenario:
    """A swarm to simulate: ``peers`` averaging a vector of ``numel`` values every slot for ``rounds`` slots.

    Args:
        peers: peers at the start (and at every moment: each crash is followed by a join).
        numel: values each peer averages (float32).
        rounds: slots simulated.
        mbit: every peer's link rate, Mbit/s each way (``linkswitch.LinkSpec``).
        rtt_ms: round-trip time between two peers.
        jitter_ms: spread of a message's one-way delay.
        loss: share of packets lost one way.
        slow_peers: that many peers have a link of ``slow_mbit`` instead.
        slow_mbit: the slow peers' rate.
        task: what the peers average: ``"vector"`` (random values, nothing else: the spread shows the mixing) or
            ``"regression"`` (each peer trains a linear model of ``numel`` weights on its own data stream,
            ``local_steps`` SGD steps before each round: the report adds the test loss per slot).
        local_steps: the regression task's local steps per round (computed for real; ``compute_s`` is their
            virtual time).
        compute_s: seconds of local work (training steps) a peer does before each round, at full speed.
        compute_spread: the slowest peer's work takes this many times ``compute_s``; the peers' slowness is
            spread evenly between 1 and it.
        leaves: share of ``peers`` that leave cleanly over the run (a tombstone in the DHT), each replaced as after
            a crash.
        churn: share of ``peers`` that crash over the run, each replaced at once by a joiner that downloads
            a live peer's values (``state.download_state``) and averages from its next slot.
        group_size: the peers' ``target_group_size``.
        round_interval: seconds between round slots.
        codec: the codec on the wire.
        dht_miss: chance that a DHT read misses a record (``simnet.SimulatedNetwork``): views that differ.
        dht_lag: seconds before a stored record is seen.
        seed: everything random (values, links, churn) follows from it.
    """

    peers: int = 100
    numel: int = 100_000
    rounds: int = 20
    mbit: float = 100.0
    rtt_ms: float = 50.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    slow_peers: int = 0
    slow_mbit: float = 5.0
    compute_s: float = 0.0
    compute_spread: float = 1.0
    task: str = "vector"
    local_steps: int = 10
    churn: float = 0.0
    leaves: float = 0.0
    group_size: int = 4
    round_interval: float = 2.0
    codec: str = "none"
    dht_miss: float = 0.0
    dht_lag: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.peers < 1 or self.numel < 1 or self.rounds < 1:
            raise ValueError(f"peers, numel and rounds must be at least 1: {self}")
        if not 0 <= self.churn <= 1 or not 0 <= self.leaves <= 1 or not 0 <= self.slow_peers <= self.peers:
            raise ValueError(f"churn and leaves must be in [0, 1], slow_peers in [0, peers]: {self}")
        if self.compute_s < 0 or self.compute_spread < 1:
            raise ValueError(f"compute_s must be >= 0 and compute_spread >= 1: {self}")
        if self.task not in TASKS or self.local_steps < 1:
            raise ValueError(f"task must be one of {TASKS} and local_steps at least 1: {self}")


@dataclass
class SimulationReport:
    """What a simulated run did.  ``rounds``: per slot, the peers that took part, the share that averaged, the
    median round time, and the spread after it (RMS distance of the peers' values from their mean, relative to
    the start).  ``summary``: over the run (``round_p50_s`` over every round, ``averaged_round_p50_s`` over
    the averaged ones, ``group3_share`` the rounds averaged in a group of 3 or more; "averaged" counts
    ``"partial"`` rounds too, ``partial_share`` counts only them (the defences acted); bytes at the links, DHT
    included; the DHT's calls and record bytes per peer-round as the peers counted them, ``membership.DHTTraffic``)."""

    scenario: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        losses = any("loss" in row for row in self.rounds)
        lines = [f"{'slot':>5} {'peers':>6} {'averaged':>9} {'round p50 s':>12} {'spread':>9}" + " test loss" * losses]
        for row in self.rounds:
            lines.append(
                f"{row['slot']:>5} {row['peers']:>6} {row['averaged_share']:>9.1%} "
                f"{row['round_p50_s']:>12.3f} {row['spread']:>9.2e}" + (f" {row.get('loss', math.nan):>9.4f}" * losses)
            )
        lines.append(", ".join(f"{key} {value}" for key, value in self.summary.items()))
        return "\n".join(lines)

    def save(self, json_path: str, plot_path: str | None = None) -> None:
        with open(json_path, "w") as f:
            json.dump(asdict(self), f, indent=1)
        if plot_path is not None:
            self.plot(plot_path)

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        slots = [row["slot"] for row in self.rounds]
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        left.plot(slots, [row["averaged_share"] for row in self.rounds], marker=".")
        left.set(xlabel="slot", ylabel="share of peers averaged", ylim=(0, 1.05))
        right.semilogy(slots, [max(row["spread"], 1e-12) for row in self.rounds], marker=".", label="spread")
        right.set(xlabel="slot", ylabel="relative to the start")
        if any("loss" in row for row in self.rounds):
            first = next(row["loss"] for row in self.rounds if "loss" in row)
            right.semilogy(
                slots, [row.get("loss", math.nan) / first for row in self.rounds], marker=".", label="test loss"
            )
        right.legend()
        figure.suptitle(
            f"{self.scenario['peers']} simulated peers, {self.scenario['mbit']} Mbit/s, "
            f"{self.scenario['rtt_ms']} ms RTT, churn {self.scenario['churn']}"
        )
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)


def _spread(values: Sequence[torch.Tensor]) -> float:
    stacked = torch.stack(list(values)).double()
    return (stacked - stacked.mean(0)).pow(2).sum(1).mean().sqrt().item()


async def _run_scenario(scenario: Scenario) -> SimulationReport:
    rng = random.Random(scenario.seed)
    generator = torch.Generator().manual_seed(scenario.seed)
    swarm = SimulatedSwarm(
        "simulated",
        seed=scenario.seed,
        link=LinkSpec(mbit=scenario.mbit, rtt_ms=scenario.rtt_ms, jitter_ms=scenario.jitter_ms, loss=scenario.loss),
        dht_miss=scenario.dht_miss,
        dht_lag=scenario.dht_lag,
        target_group_size=scenario.group_size,
        round_interval=scenario.round_interval,
        codec=scenario.codec,
    )
    slow_link = dataclasses.replace(swarm.link, mbit=scenario.slow_mbit)
    slow = set(rng.sample(range(scenario.peers), scenario.slow_peers))
    values: dict[str, torch.Tensor] = {}
    results: dict[int, list[tuple[str, float, int]]] = {}  # per slot: each peer's status, round time, group size
    traffic: list[DHTTraffic] = []  # every peer's DHT calls and bytes, the crashed ones' included
    tasks: dict[str, asyncio.Task] = {}
    loop = asyncio.get_running_loop()

    async def take_part(name: str, index: int) -> None:
        peer = swarm.peers[name]
        slowness = 1 + (scenario.compute_spread - 1) * (index % scenario.peers) / max(1, scenario.peers - 1)
        data = torch.Generator().manual_seed(scenario.seed * 100_003 + index)
        while True:
            if regression is not None:
                values[name] = regression.steps(values[name], data, scenario.local_steps)
            await asyncio.sleep(scenario.compute_s * slowness)
            result = await peer.average(values[name], mode=PARAMETERS if regression is not None else VECTOR)
            values[name] = result.averaged
            results.setdefault(result.round_id, []).append((result.status, result.seconds, len(result.group)))

    async def start(name: str, index: int, joining: bool) -> None:
        peer = await swarm.add(name, link=slow_link if index in slow else None)
        traffic.append(peer.membership.traffic)
        if joining:
            try:
                state = await download_state(peer, timeout=10 * scenario.round_interval)
            except StateDownloadError:  # a network result, as for a live joiner: it gives up and leaves
                failed_joins.append(name)
                return await swarm.leave(name)
            values[name] = state["values"].clone()
        await peer.serve_state(lambda: {"values": values[name]})
        tasks[name] = asyncio.create_task(take_part(name, index))

    regression = Regression(scenario.numel, scenario.seed) if scenario.task == "regression" else None
    losses: dict[int, float] = {}
    failed_joins: list[str] = []
    scale = 1 / math.sqrt(scenario.numel) if regression is not None else 1.0  # the true weights' scale
    for index in range(scenario.peers):
        values[f"peer{index}"] = scale * torch.randn(scenario.numel, generator=generator)
    initial_spread = _spread(values.values())
    await asyncio.gather(*(start(f"peer{i}", i, False) for i in range(scenario.peers)))
    first_slot = max(peer.next_round_id() for peer in swarm.peers.values())
    crashes, leaves = round(scenario.churn * scenario.peers), round(scenario.leaves * scenario.peers)
    events = [(rng.uniform(first_slot + 1, first_slot + scenario.rounds - 1), "crash") for _ in range(crashes)]
    events += [(rng.uniform(first_slot + 1, first_slot + scenario.rounds - 1), "leave") for _ in range(leaves)]
    events.sort()
    spreads: dict[int, float] = {}
    joined, joiners = scenario.peers, []
    for slot in range(first_slot, first_slot + scenario.rounds + 1):
        while events and events[0][0] < slot:
            when, kind = events.pop(0)
            await asyncio.sleep(max(0.0, when * scenario.round_interval - loop.time()))
            victim = rng.choice(sorted(name for name in swarm.peers if name in tasks))
            tasks.pop(victim).cancel()
            await (swarm.crash(victim) if kind == "crash" else swarm.leave(victim))
            values.pop(victim)
            joiners.append(asyncio.create_task(start(f"peer{joined}", joined, True)))
            joined += 1
        await asyncio.sleep(max(0.0, slot * scenario.round_interval - loop.time()))
        live = [values[name] for name in swarm.peers if name in tasks]
        spreads[slot] = _spread(live) / initial_spread if live else math.nan
        if regression is not None and live:
            losses[slot] = statistics.fmean(regression.loss(w) for w in live)
    for task in [*joiners, *tasks.values()]:
        task.cancel()
    await asyncio.gather(*joiners, *tasks.values(), return_exceptions=True)
    report = SimulationReport(asdict(scenario))
    for slot in range(first_slot, first_slot + scenario.rounds):
        done = results.get(slot, [])
        report.rounds.append(
            {
                "slot": slot - first_slot,
                "peers": len(done),
                "averaged_share": sum(status in AVERAGED for status, _, _ in done) / len(done) if done else 0.0,
                "round_p50_s": statistics.median(seconds for _, seconds, _ in done) if done else math.nan,
                "spread": spreads[slot + 1],
                **({"loss": losses[slot + 1]} if slot + 1 in losses else {}),
            }
        )
    taken = [r for slot in range(first_slot, first_slot + scenario.rounds) for r in results.get(slot, [])]
    averaged = [seconds for status, seconds, _ in taken if status in AVERAGED]
    sent = sum(swarm.network.bytes_of(name)[0] for name in swarm.network.links)
    in_groups = sum(status in AVERAGED and size >= 3 for status, _, size in taken)
    report.summary = {
        "peer_rounds": len(taken),
        "averaged_share": round(sum(status in AVERAGED for status, _, _ in taken) / max(1, len(taken)), 4),
        "partial_share": round(sum(status == "partial" for status, _, _ in taken) / max(1, len(taken)), 4),
        "group3_share": round(in_groups / max(1, len(taken)), 4),
        "round_p50_s": round(statistics.median(seconds for _, seconds, _ in taken), 4) if taken else None,
        "averaged_round_p50_s": round(statistics.median(averaged), 4) if averaged else None,
        "bytes_sent_per_peer_round": round(sent / max(1, len(taken))),
        "dht_requests_per_peer_round": round(sum(t.requests for t in traffic) / max(1, len(taken)), 2),
        "dht_bytes_per_peer_round": round(sum(t.bytes for t in traffic) / max(1, len(taken))),
        "spread_after": float(f"{spreads[first_slot + scenario.rounds]:.3g}"),
        **({"loss_after": round(losses[first_slot + scenario.rounds], 5)} if losses else {}),
        "crashed": crashes,
        "left": leaves,
        "joined": joined - scenario.peers - len(failed_joins),
        "joins_failed": len(failed_joins),
    }
    await swarm.close()
    return report


def simulate(scenario: Scenario) -> SimulationReport:
    """Run ``scenario`` in virtual time; its report's summary also gives the wall time and peak memory."""
    started = time.perf_counter()
    report = run(_run_scenario(scenario))
    wall = time.perf_counter() - started
    report.summary["wall_s"] = round(wall, 2)
    report.summary["wall_s_per_round"] = round(wall / scenario.rounds, 3)
    report.summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return report
