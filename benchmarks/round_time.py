"""Round-time benchmark: one averaging round of gossiptrain vs hivemind's DecentralizedAverager.

For every configuration (number of peers x number of fp32 parameters) it runs, one after the
other in the same invocation, a fresh local swarm of each system: one process per peer on
127.0.0.1 (``gossiptrain.testing.LocalSwarm``), one bootstrap DHT node per swarm, every peer with
``torch.set_num_threads(1)`` and the same group size (= the number of peers).  Each swarm runs
``--rounds`` rounds, the first ``--warmup`` of which are not counted.

Before every round the peers meet at a barrier (``multiprocessing.Barrier``), so that each round
starts from idle peers and its time is not polluted by the previous round's stragglers:

- gossiptrain: peer 0 picks the round slot ``peer.next_round_id(lead)`` and every peer calls
  ``peer.average(tensor, round_id=R)``; the round time is ``RoundResult.seconds``: from the slot's
  start to the result (the DHT read of the participants + the exchange).  Registering for the
  slot (one DHT store, done before the slot starts) is not in it; it is reported separately as
  ``registration_s``, and the DHT read at the slot's start (which is in it) as ``participants_s``.
- hivemind: peer 0 picks a start time ``--hivemind-lead`` seconds ahead; every peer sleeps until
  then and times ``averager.step(timeout=...)``, which includes matchmaking (DHT declare, leader
  election, joining) and the butterfly all-reduce, as the user of ``step`` sees it.  Settings as in
  HIVEMIND_NOTES.md: ``target_group_size = min_group_size = N``, ``min_matchmaking_time = 1.5``
  (a full group starts as soon as the N-th peer joins, so this only bounds a group that does not
  fill), ``request_timeout = 1.0`` (must be below min_matchmaking_time), no compression.

Per round the time of the round is the **max over peers** (when the last peer has its result: the
honest "round done" time); the figure reported is the median of that over the measured rounds.
The JSON also keeps the median over peers, and every peer's every time.

Correctness: peer ``i`` averages ``randn`` values drawn from seeds ``(i, round, chunk)``; after the
round every peer draws all peers' values chunk by chunk, computes the true mean (in float64) and compares:
``max_abs_error`` is the largest |averaged - true mean| over all peers, rounds (warm-up included)
and elements, among the peer-rounds that reported success (a success that averaged nothing shows
here).  A round that did not average the whole group at every peer (gossiptrain status other
than "averaged" or a smaller group; hivemind ``step`` raising, returning None or a smaller group)
is counted in ``incomplete_rounds`` and left out of the round times.

Bytes: gossiptrain's ``RoundResult.bytes_sent`` (payload + framing, both directions of its own
streams: its slices to the owners and its shard's mean back to the contributors), median over
peers and measured rounds; the ideal for no compression is ``2 * 4 * numel * (N - 1) / N``.
hivemind does not report it.

Memory: ``peak_rss_mb_per_peer`` is the largest, over the peers, sum of the peak resident memory
(``VmHWM``) of the processes of a peer's session (as for CPU), interpreter and libraries included;
``model_mb`` is the tensor's fp32 size.  hivemind's shared-memory tensor counts in two of its processes.

CPU: ``cpu_s`` is the user + system CPU time, during the round, of every process of the peer's
session (its Python process, its p2pd daemon and, for hivemind, the DHT and averager processes it
forks), read from /proc.  Unlike wall time it hardly depends on what else runs on the machine; on
a machine with C cores and N peers, a round takes at least about N * cpu_s / C seconds.
``p2pd_cpu_s`` is the libp2p daemons' share of it: the floor that relaying the bytes sets alone.

    python benchmarks/round_time.py                         # 2,4 peers x 1M,10M (~3 min on 2 cores)
    python benchmarks/round_time.py --peers 4 --sizes 10M --rounds 8 --warmup 2
    python benchmarks/round_time.py --peers 4 --sizes 10M --systems gossiptrain --profile

``--profile`` runs cProfile in gossiptrain's peer 0 around its measured rounds and writes the
stats next to the JSON (``round_time-profile-<config>.pstats``); profiled times are slower and
are marked as such.  Writes ``benchmarks/results/round_time.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import math
import multiprocessing
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from harness import fmt, median, report_header, write_report

from gossiptrain.netns import EmulatedLinks, enter_namespace
from gossiptrain.testing import LOOPBACK, LocalSwarm

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "round_time.json"
SYSTEMS = ("gossiptrain", "hivemind", "undefended")  # undefended: gossiptrain with Defences.off()
BARRIER_TIMEOUT = 120.0


# ----------------------------------------------------------------------------- data and checks


CHUNK = 1 << 20  # values drawn per seed: the checks then need one chunk of each peer's values at a time


def peer_chunk(index: int, round_index: int, start: int, end: int) -> torch.Tensor:
    """Peer ``index``'s values ``[start, end)`` in round ``round_index`` (``start`` a multiple of ``CHUNK``)."""
    generator = torch.Generator().manual_seed(1_000_003 * (index + 1) + 7919 * (start // CHUNK) + round_index)
    return torch.randn(end - start, generator=generator)


def chunks(numel: int) -> list[tuple[int, int]]:
    return [(a, min(a + CHUNK, numel)) for a in range(0, numel, CHUNK)]


def peer_tensor(index: int, round_index: int, numel: int) -> torch.Tensor:
    return torch.cat([peer_chunk(index, round_index, a, b) for a, b in chunks(numel)])


def max_abs_error(averaged: torch.Tensor, num_peers: int, round_index: int) -> float:
    """The largest |averaged - true mean| (float64), the true mean computed chunk by chunk: the check
    adds no whole-model copy to the peak memory that the benchmark reports."""
    worst = 0.0
    for a, b in chunks(averaged.numel()):
        mean = sum(peer_chunk(i, round_index, a, b).double() for i in range(num_peers)) / num_peers
        worst = max(worst, float((averaged[a:b].double() - mean).abs().max()))
    return worst


def session_cpu_seconds() -> tuple[float, float]:
    """User + system CPU time so far of every process in this process's session (the peer's Python
    process, its libp2p daemon and, for hivemind, its DHT and averager processes), and of its libp2p
    daemons (``p2pd``) alone."""
    session, ticks, total, daemons = os.getsid(0), os.sysconf("SC_CLK_TCK"), 0, 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # fields[3]: session; [11], [12]: utime, stime
            if int(fields[3]) == session:
                ticks_used = int(fields[11]) + int(fields[12])
                total += ticks_used
                if stat[stat.index("(") + 1 : stat.rindex(")")] == "p2pd":
                    daemons += ticks_used
    return total / ticks, daemons / ticks


def cpu_since(before: tuple[float, float]) -> dict:
    now = session_cpu_seconds()
    return {"cpu_s": now[0] - before[0], "p2pd_cpu_s": now[1] - before[1]}


def session_peak_rss_mb() -> float:
    """The sum of the peak resident memory (``VmHWM``) of every process in this process's session, in MB.
    hivemind's averaged tensors live in shared memory, counted in both its peer and averager process."""
    session, total = os.getsid(0), 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[3]) != session:
                    continue
                status = (entry / "status").read_text()
            except (OSError, ValueError):
                continue
            total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return total / 1024


class Sync:
    """The peers of one swarm meet before every round; peer 0 publishes a number to all."""

    def __init__(self, context: multiprocessing.context.SpawnContext, num_peers: int):
        self.barrier = context.Barrier(num_peers)
        self.value = context.Value("d", 0.0)

    def meet(self, index: int, choose) -> float:
        """Blocking: wait for every peer, let peer 0 set the value with ``choose()``, return it."""
        self.barrier.wait(BARRIER_TIMEOUT)
        if index == 0:
            self.value.value = float(choose())
        self.barrier.wait(BARRIER_TIMEOUT)
        return self.value.value


# ----------------------------------------------------------------------------- gossiptrain peer


def gossiptrain_peer(
    index: int,
    num_peers: int,
    numel: int,
    rounds: int,
    initial_peers: list[str],
    run_id: str,
    sync: Sync,
    options: dict,
) -> dict:
    torch.set_num_threads(1)
    if options["namespaces"]:
        enter_namespace(options["namespaces"][index + 1])
    return asyncio.run(_gossiptrain_peer(index, num_peers, numel, rounds, initial_peers, run_id, sync, options))


async def _gossiptrain_peer(index, num_peers, numel, rounds, initial_peers, run_id, sync, options) -> dict:
    from gossiptrain.allreduce import Defences
    from gossiptrain.peer import Peer

    records = []
    profiler = cProfile.Profile() if options.get("profile_path") and index == 0 else None
    async with Peer(
        run_id,
        initial_peers=initial_peers,
        host_maddrs=[options["host_maddrs"][index]],
        target_group_size=num_peers,
        round_interval=options["round_interval"],
        defences=Defences() if options["defences"] else Defences.off(),
    ) as peer:
        join_round, registration = peer.membership.join_round, []

        async def timed_join_round(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await join_round(*args, **kwargs)
            finally:
                registration.append(time.perf_counter() - started)

        peer.membership.join_round = timed_join_round
        round_participants, reading = peer.membership.round_participants, []

        async def timed_round_participants(*args, **kwargs):
            started = time.perf_counter()
            try:
                return await round_participants(*args, **kwargs)
            finally:
                reading.append(time.perf_counter() - started)

        peer.membership.round_participants = timed_round_participants
        await peer.wait_for_peers(num_peers, timeout=60)
        for k in range(rounds):
            values = peer_tensor(index, k, numel)
            round_id = int(
                await asyncio.to_thread(sync.meet, index, lambda: peer.next_round_id(lead=options["gossip_lead"]))
            )
            measured = profiler is not None and k >= options["warmup"]
            cpu = session_cpu_seconds()
            if measured:
                profiler.enable()
            result = await peer.average(values, round_id=round_id)
            if measured:
                profiler.disable()
            cpu = cpu_since(cpu)
            records.append(
                {
                    "round": k,
                    "seconds": result.seconds,
                    **cpu,
                    "registration_s": registration[-1] if registration else None,
                    "participants_s": reading[-1] if reading else None,
                    "status": result.status,
                    "group_size": result.group_size,
                    "bytes_sent": result.bytes_sent,
                    "bytes_received": result.bytes_received,
                    "max_abs_error": max_abs_error(result.averaged, num_peers, k),
                    "errors": result.errors[:3],
                }
            )
            del values, result
        # Leave together: a peer that stops its daemon while a slower one still reads from it would fail that round.
        await asyncio.to_thread(sync.meet, index, lambda: 0)
        peak_rss_mb = session_peak_rss_mb()
    if profiler is not None:
        profiler.dump_stats(options["profile_path"])
    return {"peer": index, "rounds": records, "peak_rss_mb": peak_rss_mb}


# ----------------------------------------------------------------------------- hivemind peer


def hivemind_peer(
    index: int,
    num_peers: int,
    numel: int,
    rounds: int,
    initial_peers: list[str],
    prefix: str,
    sync: Sync,
    options: dict,
) -> dict:
    import hivemind
    from hivemind.averaging import DecentralizedAverager

    torch.set_num_threads(1)
    # LocalSwarm children are daemonic, and daemonic processes may not start processes; hivemind's DHT
    # and averager are processes.  They stay in this child's session, so LocalSwarm still kills them.
    multiprocessing.current_process()._config["daemon"] = False
    multiprocessing.set_start_method("fork", force=True)  # a spawned child inherits "spawn"; hivemind needs fork
    if options["namespaces"]:
        enter_namespace(options["namespaces"][index + 1])
    dht = hivemind.DHT(start=True, initial_peers=initial_peers, host_maddrs=[options["host_maddrs"][index]])
    tensor = torch.zeros(numel)
    averager = DecentralizedAverager(
        averaged_tensors=[tensor],
        dht=dht,
        prefix=prefix,
        target_group_size=num_peers,
        min_group_size=num_peers,
        min_matchmaking_time=options["min_matchmaking_time"],
        request_timeout=options["request_timeout"],
        start=True,
    )
    records = []
    try:
        for k in range(rounds):
            values = peer_tensor(index, k, numel)
            with averager.get_tensors() as tensors:
                tensors[0].copy_(values)
            start = sync.meet(index, lambda: time.time() + options["hivemind_lead"])
            cpu = session_cpu_seconds()
            time.sleep(max(0.0, start - time.time()))
            started = time.perf_counter()
            try:
                gathered, error_text = averager.step(timeout=options["step_timeout"]), None
            except Exception as e:  # hivemind raises AllreduceException when no group was found in time
                gathered, error_text = None, repr(e)
            seconds = time.perf_counter() - started
            cpu = cpu_since(cpu)
            with averager.get_tensors() as tensors:
                error = max_abs_error(tensors[0], num_peers, k)
                unchanged = bool(torch.equal(tensors[0], values))
            records.append(
                {
                    "round": k,
                    "seconds": seconds,
                    **cpu,
                    "status": "averaged" if gathered is not None else "failed",
                    "group_size": len(gathered) if gathered is not None else 1,
                    "max_abs_error": error,
                    "unchanged": unchanged,  # the tensor still holds this peer's own values after the step
                    "errors": [error_text] if error_text else [],
                }
            )
        # Leave together: a peer that shuts down while a slower one still downloads its averaged part makes
        # that peer keep its own values for the part, and hivemind still reports the step as a success.
        sync.meet(index, lambda: 0)
        peak_rss_mb = session_peak_rss_mb()
    finally:
        averager.shutdown()
        dht.shutdown()
    return {"peer": index, "rounds": records, "peak_rss_mb": peak_rss_mb}


# ----------------------------------------------------------------------------- driver


def run_swarm(system: str, num_peers: int, numel: int, args: argparse.Namespace, profile_path: Path | None) -> dict:
    """Start a bootstrap node and ``num_peers`` peer processes of ``system``; return their records."""
    options = {
        "warmup": args.warmup,
        "round_interval": args.round_interval,
        "gossip_lead": args.gossip_lead,
        "hivemind_lead": args.hivemind_lead,
        "min_matchmaking_time": args.min_matchmaking_time,
        "request_timeout": args.request_timeout,
        "step_timeout": args.step_timeout,
        "profile_path": str(profile_path) if profile_path else None,
        "namespaces": None,
        "host_maddrs": [LOOPBACK] * num_peers,
    }
    name = f"bench{os.getpid()}x{num_peers}x{numel}x{int(time.time())}"
    target = hivemind_peer if system == "hivemind" else gossiptrain_peer
    options["defences"] = system != "undefended"
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        swarm = stack.enter_context(LocalSwarm())
        if args.rtt_ms > 0:  # namespace 0: the bootstrap node; i + 1: peer i
            links = stack.enter_context(EmulatedLinks(num_peers + 1, mbit=args.mbit or math.inf, rtt_ms=args.rtt_ms))
            options["namespaces"] = links.names
            options["host_maddrs"] = [links.maddr(i + 1) for i in range(num_peers)]
            bootstrap = [sys.executable, "-m", "gossiptrain", "bootstrap", "--host-maddrs", links.maddr(0)]
            _, output = swarm.start([*links.exec_prefix(0), *bootstrap])
            swarm.initial_peers = [output.wait_for(lambda line: line.startswith("/ip4/"), timeout=30)]
        else:
            swarm.start_bootstrap()
        sessions = {process.pid for process in swarm._popen}
        sync = Sync(swarm.context, num_peers)
        for index in range(num_peers):
            process = swarm.spawn(
                index, target, index, num_peers, numel, args.rounds, swarm.initial_peers, name, sync, options
            )
            sessions.add(process.pid)
        per_round = 2 * args.hivemind_lead + args.round_interval + args.gossip_lead + numel / 2e6 * num_peers
        collected = swarm.results(num_peers, timeout=90 + args.rounds * per_round)
    leftovers = left_behind(sessions)
    if leftovers:
        print(f"  WARNING: processes left behind by the {system} swarm: {leftovers}", flush=True)
    return {
        "peers": [collected[i] for i in range(num_peers)],
        "wall_s": time.monotonic() - started,
        "left_behind": leftovers,
    }


def left_behind(sessions: set[int], grace: float = 5.0) -> list[str]:
    """Processes still alive in the sessions of a closed swarm (each peer and the bootstrap has its own)."""
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                    fields = stat[stat.rindex(")") + 2 :].split()
                    if int(fields[3]) in sessions and fields[0] != "Z":  # field 3 after the name: session id
                        command = (entry / "cmdline").read_bytes().split(bytes(1))[0].decode(errors="replace")
                        alive.append(f"{entry.name} {command}")
                except (OSError, ValueError):
                    pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def summarize(system: str, num_peers: int, numel: int, swarm: dict, warmup: int) -> dict:
    """Round times over the measured rounds that averaged the whole group at every peer."""
    peers = swarm["peers"]
    rounds = len(peers[0]["rounds"])
    per_round = [[p["rounds"][k] for p in peers] for k in range(rounds)]
    complete = [all(r["status"] == "averaged" and r["group_size"] == num_peers for r in rs) for rs in per_round]
    measured = [k for k in range(warmup, rounds) if complete[k]]
    round_max = [max(r["seconds"] for r in per_round[k]) for k in measured]
    round_median = [statistics.median(r["seconds"] for r in per_round[k]) for k in measured]
    incomplete = complete.count(False)
    summary = {
        "median_round_s": statistics.median(round_max) if measured else None,
        "median_round_s_median_over_peers": statistics.median(round_median) if measured else None,
        "measured_rounds": measured,
        "median_cpu_s_per_peer_round": statistics.median(r["cpu_s"] for k in measured for r in per_round[k])
        if measured
        else None,
        "median_p2pd_cpu_s_per_peer_round": statistics.median(r["p2pd_cpu_s"] for k in measured for r in per_round[k])
        if measured
        else None,
        "round_s_max_over_peers": round_max,
        "max_abs_error": max(
            (r["max_abs_error"] for k in range(rounds) for r in per_round[k] if r["status"] == "averaged"), default=None
        ),
        "incomplete_rounds": incomplete,
        "peak_rss_mb_per_peer": max(p["peak_rss_mb"] for p in peers),
        "model_mb": 4 * numel / 2**20,
        "rounds_total": rounds,
        "wall_s": swarm["wall_s"],
        "left_behind": swarm["left_behind"],
        "errors": sorted({e for k in range(rounds) for r in per_round[k] for e in r["errors"]})[:10],
        "per_peer": peers,
    }
    if system != "hivemind" and measured:
        summary["bytes_sent_per_peer_round"] = statistics.median_low(
            r["bytes_sent"] for k in measured for r in per_round[k]
        )
        summary["ideal_bytes_per_peer_round"] = round(2 * 4 * numel * (num_peers - 1) / num_peers)
        for name in ("registration_s", "participants_s"):
            summary[f"median_{name}"] = statistics.median(
                r[name] for k in measured for r in per_round[k] if r[name] is not None
            )
    return summary


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def size_name(numel: int) -> str:
    return f"{numel // 10**6}M" if numel % 10**6 == 0 else f"{numel // 10**3}K" if numel % 10**3 == 0 else str(numel)


def table(results: list[dict]) -> str:
    columns = [
        ("config", 7, lambda r, g, h: r["config"]),
        ("gossip s", 9, lambda r, g, h: fmt(g and g["median_round_s"], ".3f")),
        ("hivemind s", 10, lambda r, g, h: fmt(h and h["median_round_s"], ".3f")),
        ("ratio g/h", 9, lambda r, g, h: fmt(r.get("ratio_gossiptrain_over_hivemind"), ".2f")),
        ("undefended s", 12, lambda r, g, h: fmt(r.get("undefended", {}).get("median_round_s"), ".3f")),
        ("ratio g/u", 9, lambda r, g, h: fmt(r.get("ratio_defended_over_undefended"), ".2f")),
        ("g bytes/peer/rnd", 16, lambda r, g, h: fmt(g and g.get("bytes_sent_per_peer_round"), ",d")),
        ("ideal", 10, lambda r, g, h: fmt(g and g.get("ideal_bytes_per_peer_round"), ",d")),
        ("g max err", 9, lambda r, g, h: fmt(g and g["max_abs_error"], ".1e")),
        ("h max err", 9, lambda r, g, h: fmt(h and h["max_abs_error"], ".1e")),
        ("g peak MB", 9, lambda r, g, h: fmt(g and g["peak_rss_mb_per_peer"], ".0f")),
        ("h peak MB", 9, lambda r, g, h: fmt(h and h["peak_rss_mb_per_peer"], ".0f")),
        ("g cpu s", 7, lambda r, g, h: fmt(g and g["median_cpu_s_per_peer_round"], ".2f")),
        ("h cpu s", 7, lambda r, g, h: fmt(h and h["median_cpu_s_per_peer_round"], ".2f")),
        ("g p2pd s", 8, lambda r, g, h: fmt(g and g.get("median_p2pd_cpu_s_per_peer_round"), ".2f")),
        ("h p2pd s", 8, lambda r, g, h: fmt(h and h.get("median_p2pd_cpu_s_per_peer_round"), ".2f")),
        (
            "incomplete g/h",
            14,
            lambda r, g, h: f"{g['incomplete_rounds'] if g else '-'}/{h['incomplete_rounds'] if h else '-'}",
        ),
    ]
    header = " ".join(f"{name:>{width}}" for name, width, _ in columns)
    lines = [header, "-" * len(header)]
    for row in results:
        g, h = row.get("gossiptrain"), row.get("hivemind")
        lines.append(" ".join(f"{cell(row, g, h):>{width}}" for _, width, cell in columns))
    return "\n".join(lines)


def run_system(system: str, num_peers: int, numel: int, config: str, args: argparse.Namespace) -> dict:
    """One swarm of ``system`` for one config: its summary, printed as it ends."""
    profile_path = None
    if args.profile and system == "gossiptrain":
        profile_path = args.out.with_name(f"{args.out.stem}-profile-{config}.pstats")
    load = os.getloadavg()[0]
    print(f"{config} {system} ... (load average {load:.1f})", flush=True)
    swarm = run_swarm(system, num_peers, numel, args, profile_path)
    summary = summarize(system, num_peers, numel, swarm, args.warmup)
    summary["load_average_before"] = load
    if profile_path:
        summary["profiled"] = str(profile_path)
        stream = io.StringIO()
        pstats.Stats(str(profile_path), stream=stream).sort_stats("cumulative").print_stats(25)
        print(stream.getvalue())
    times = [round(t, 3) for t in summary["round_s_max_over_peers"]]
    print(
        f"  median {fmt(summary['median_round_s'], '.3f')}s  rounds {times}"
        f"  max err {fmt(summary['max_abs_error'], '.1e')}  incomplete {summary['incomplete_rounds']}"
        f"  wall {summary['wall_s']:.0f}s  errors {summary['errors'][:2]}",
        flush=True,
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="2,4", help="comma-separated numbers of peers (= group size)")
    parser.add_argument("--sizes", default="1M,10M", help="comma-separated numbers of fp32 parameters (1M, 10M, 250K)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per swarm, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="first rounds not counted")
    parser.add_argument(
        "--systems", default="gossiptrain,hivemind", help="gossiptrain,hivemind,undefended (Defences.off()) or some"
    )
    parser.add_argument("--round-interval", type=float, default=1.0, help="gossiptrain slot length (s)")
    parser.add_argument(
        "--gossip-lead", type=float, default=0.5, help="gossiptrain: pick a slot at least this far ahead"
    )
    parser.add_argument("--hivemind-lead", type=float, default=0.3, help="hivemind: common start this far ahead")
    parser.add_argument("--min-matchmaking-time", type=float, default=1.5)
    parser.add_argument("--request-timeout", type=float, default=1.0)
    parser.add_argument("--step-timeout", type=float, default=30.0, help="hivemind step(timeout=...)")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="run over EmulatedLinks with this RTT (0: loopback)")
    parser.add_argument("--mbit", type=float, default=None, help="with --rtt-ms: each peer's link rate (default: none)")
    parser.add_argument("--profile", action="store_true", help="cProfile gossiptrain peer 0 (slows it down)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run every system this many times per config, interleaved"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not 0 <= args.warmup < args.rounds:
        parser.error("--warmup must be smaller than --rounds")
    systems = [s for s in args.systems.split(",") if s]
    if not set(systems) <= set(SYSTEMS):
        parser.error(f"--systems takes {', '.join(SYSTEMS)}")
    configs = [(int(n), parse_size(s)) for n in args.peers.split(",") for s in args.sizes.split(",")]

    started, load_start = time.monotonic(), list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for num_peers, numel in configs:
        config = f"{num_peers}x{size_name(numel)}"
        row: dict = {"config": config, "peers": num_peers, "numel": numel}
        medians: dict[str, list[float | None]] = {system: [] for system in systems}
        for repeat in range(args.repeats):  # interleaved: every other repeat runs the systems in reverse order
            for system in systems if repeat % 2 == 0 else systems[::-1]:
                summary = row[system] = run_system(system, num_peers, numel, config, args)
                medians[system].append(summary["median_round_s"])
        if args.repeats > 1:  # the median over the repeats; the summaries' other numbers are the last repeat's
            row["repeats"] = medians
            for system in systems:
                row[system]["median_round_s"] = median(medians[system])
        for base, key in (
            ("hivemind", "ratio_gossiptrain_over_hivemind"),
            ("undefended", "ratio_defended_over_undefended"),
        ):
            ratios = [g / b for g, b in zip(medians.get("gossiptrain", []), medians.get(base, [])) if g and b]
            if ratios:  # per repeat (the two systems' runs side by side), then the median of those
                row[key] = median(ratios)
                row[key + "_per_repeat"] = ratios
        results.append(row)

    print()
    print(
        f"round time: median over {args.rounds - args.warmup} measured rounds of the per-round max over peers; "
        "cpu s: median CPU seconds per peer per round (all its processes: Python, p2pd, hivemind's DHT/averager); "
        "p2pd s: of that, its libp2p daemon's"
    )
    print(table(results))
    report = {
        **report_header("round_time", args, interpreter_path=True),
        "round_time_definition": "per round: max over peers of the round's time; reported: median over measured rounds",
        "wall_s": time.monotonic() - started,
        "results": results,
    }
    report["machine"].update(load_average_at_start=load_start, load_average_at_end=list(os.getloadavg()))
    write_report(report, args.out)
    print(f"\nwrote {args.out} ({report['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
