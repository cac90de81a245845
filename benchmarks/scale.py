"""Matchmaking at scale: live swarms of 16, 32 and 64 peer processes, simulated ones of 100, 300 and 1000 peers.

Live: N peer processes on this machine (one libp2p daemon each), bootstrapped from one address (for 16 peers, a
plain ``hivemind-dht`` node: a DHT node that is not a gossiptrain peer), with a user's defaults (groups of 4,
``Peer``'s timeouts), average a vector of ``--numel`` values (seeded ``randn`` per peer, equal weights) in
``--rounds`` slots of ``--every`` seconds, and report: the share of (peer, round) pairs averaged in a group of 3
or more; the relative spread after the run (the largest distance of a peer's values from the mean of all, over
the mean's norm); the longest round against its bound (``Timeouts``: the slowest path a round may take); and the
DHT calls and record bytes per peer and round, as each peer counted them (``membership.DHTTraffic``); and the CPU
the peers and their daemons used over the rounds, per peer and in all (in cores: above this machine's count, every
peer waits for the CPU, which the round's timeouts do not allow for).  With the swarm still up, ``gossiptrain
status`` is timed and its swarm size read.

Simulated: ``gossiptrain.simulation`` (the same peers' code on modelled links, in virtual time) at 100, 300 and
1000 peers, 150 ms RTT, 1% loss, 5% of peers crashing and as many joining over 10 slots of ``--every`` seconds; then
32 peers whose DHT reads each miss 10% of the records.

Targets (issue 27): live, >= 95% of pairs in groups of 3+, relative spread < 1e-6, no round past its bound; DHT
calls and bytes per peer-round at 64 peers <= 2x those at 16; simulated, the same at 1000 peers <= 3x those at
100, >= 90% of pairs in groups of 3+ at 1000 peers and a spread 100x smaller after 10 slots; with 10% of reads
missing, >= 90% of rounds averaged.

    python benchmarks/scale.py                      # everything (~15 min on 2 cores)
    python benchmarks/scale.py --live 16 --no-sim   # one live size

Writes ``benchmarks/results/scale.json`` (``summary``: per N and whether each target held) and ``scale.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import figure, fmt, report_header, save_figure, write_report  # noqa: E402

RUN_ID = "scale"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
SIMULATED = [100, 300, 1000]
START_BATCH = 8  # live peers started at a time, each batch once the one before is up


def live_worker(index: int, initial_peers: list[str], args: dict, ready, start, results) -> None:
    """One live peer: start, say so, wait for the common first round, average ``rounds`` times, report."""
    import torch

    from gossiptrain.peer import Peer

    torch.set_num_threads(1)  # dozens of processes on a few cores: no thread pools fighting over them

    async def main() -> None:
        options = dict(initial_peers=initial_peers, host_maddrs=[LOOPBACK], round_interval=args["every"])
        options["heartbeat_ttl"] = args["heartbeat_ttl"]
        async with Peer(RUN_ID, **options) as peer:
            values = torch.randn(args["numel"], generator=torch.Generator().manual_seed(index))
            ready.put(index)
            while start.value == 0:
                await asyncio.sleep(0.2)
            before = peer.membership.traffic.requests, peer.membership.traffic.bytes
            history = []
            for round_id in range(start.value, start.value + args["rounds"]):
                result = await peer.average(values, round_id=round_id)
                values = result.averaged
                level = peer.membership.level, round(peer.membership.swarm_size, 1)
                history.append((result.status, len(result.group), result.seconds, *level, result.errors[:1]))
            requests = peer.membership.traffic.requests - before[0]
            dht_bytes = peer.membership.traffic.bytes - before[1]
            results.put((index, history, requests, dht_bytes, values.numpy(), peer.swarm_size))
            await asyncio.sleep(args["linger"])  # the swarm stays up while ``status`` is timed

    asyncio.run(main())


def bootstrap(processes: list, hivemind_dht: bool) -> str:
    """A DHT node to bootstrap from: ``hivemind-dht`` (not a gossiptrain peer) or ``gossiptrain bootstrap``."""
    if hivemind_dht:
        argv = [sys.executable, "-m", "hivemind.hivemind_cli.run_dht", "--host_maddrs", LOOPBACK]
    else:
        argv = [sys.executable, "-m", "gossiptrain", "bootstrap", "--host-maddrs", LOOPBACK]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    processes.append(process)
    deadline = time.monotonic() + 60
    for line in process.stdout:
        found = re.search(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)", line)
        if found:
            return found.group(1)
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"{argv[0]} printed no address")


def timed_status(initial: list[str]) -> tuple[float, float | None, re.Match | None]:
    """Run ``gossiptrain status``: the seconds to its exit, to its answer (the line naming the swarm's size), and
    that line's match (its number is group 2)."""
    argv = [sys.executable, "-m", "gossiptrain", "status", "--run-id", RUN_ID, "--initial-peers", *initial]
    started, answered, title = time.monotonic(), None, None
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if title is None and (title := re.search(r"(about )?(\d+) live peers", line)):
            answered = time.monotonic() - started
    process.wait(60)
    return time.monotonic() - started, answered, title


def cpu_seconds(pids: list[int]) -> float:
    """The CPU seconds used so far by processes ``pids`` and their descendants (each peer's libp2p daemon)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for member in [process, *process.children(recursive=True)]:
                times = member.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def round_bound() -> float:
    """The longest a round may take with default ``Timeouts``: reading the cell, joining the leader (its wait and
    the answer), opening the exchange's streams, the result's wait."""
    from gossiptrain.rounds import Timeouts

    t = Timeouts()
    return t.matchmaking + 3 * t.join + t.join + t.part + t.result


def run_live(peers: int, args: argparse.Namespace) -> dict:
    import numpy as np

    from gossiptrain.rounds import AVERAGED

    context = multiprocessing.get_context("spawn")
    ready, results, start = context.Queue(), context.Queue(), context.Value("q", 0)
    processes: list = []
    workers = []
    try:
        initial = [bootstrap(processes, hivemind_dht=peers == min(args.live))]
        print("bootstrap:", *initial, flush=True)
        options = {"numel": args.numel, "rounds": args.rounds, "every": args.every, "linger": args.linger}
        options["heartbeat_ttl"] = args.heartbeat_ttl
        started = time.monotonic()
        for batch in range(0, peers, START_BATCH):  # 64 daemons started at once miss p2pd's 15 s start-up limit
            for index in range(batch, min(peers, batch + START_BATCH)):
                worker = context.Process(target=live_worker, args=(index, initial, options, ready, start, results))
                worker.start()
                workers.append(worker)
            for _ in range(batch, min(peers, batch + START_BATCH)):
                ready.get(timeout=300)
        startup_s = time.monotonic() - started
        time.sleep(2 * args.every)  # the records of the last to start reach the others
        start.value = math.ceil(time.time() / args.every) + 2
        pids = [worker.pid for worker in workers]
        cpu_before, rounds_started = cpu_seconds(pids), time.monotonic()
        collected = [results.get(timeout=args.rounds * args.every + 300) for _ in range(peers)]
        cpu_cores = (cpu_seconds(pids) - cpu_before) / (time.monotonic() - rounds_started)
        status_s, answered_s, title = timed_status(initial)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(10)
        for process in processes:
            process.terminate()
            process.wait(10)
    histories = [history for _, history, *_ in collected]
    pairs = [entry for history in histories for entry in history]
    final = np.stack([values for *_, values, _ in collected]).astype(np.float64)
    mean = final.mean(0)

    return {
        "peers": peers,
        "bootstrap": "hivemind-dht" if peers == min(args.live) else "gossiptrain bootstrap",
        "startup_s": round(startup_s, 1),
        "group3_share": round(sum(s in AVERAGED and g >= 3 for s, g, *_ in pairs) / len(pairs), 4),
        "averaged_share": round(sum(s in AVERAGED for s, *_ in pairs) / len(pairs), 4),
        "relative_spread": float(f"{np.abs(final - mean).max() / np.linalg.norm(mean):.3g}"),
        "round_max_s": round(max(seconds for _, _, seconds, *_ in pairs), 3),
        "round_bound_s": round_bound(),
        "dht_requests_per_peer_round": round(sum(c[2] for c in collected) / len(pairs), 2),
        "dht_bytes_per_peer_round": round(sum(c[3] for c in collected) / len(pairs)),
        "cpu_cores": round(cpu_cores, 2),
        "cpu_per_peer_pct": round(100 * cpu_cores / peers, 2),
        "swarm_size_estimates": sorted({c[5] for c in collected}),
        "status_s": round(status_s, 2),
        "status_answered_s": round(answered_s, 2) if answered_s is not None else None,
        "status_peers": int(title.group(2)) if title else None,
        "histories": histories,
    }


def run_simulated(peers: int, args: argparse.Namespace, **options) -> dict:
    from gossiptrain.simulation import Scenario, simulate

    scenario = Scenario(
        peers=peers, numel=args.numel, rounds=10, rtt_ms=150.0, loss=0.01, round_interval=args.every, **options
    )
    report = simulate(scenario)
    keys = ("averaged_share", "group3_share", "spread_after", "round_p50_s", "crashed", "joined", "wall_s")
    keys += ("dht_requests_per_peer_round", "dht_bytes_per_peer_round", "peak_rss_mb")
    return {"peers": peers, **{key: report.summary[key] for key in keys}, **options}


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["  ".join(f"{title:>{len(title)}}" for title, _, _ in columns)]
    for row in rows:
        lines.append("  ".join(f"{fmt(row.get(key), spec):>{len(title)}}" for title, key, spec in columns))
    return "\n".join(lines)


LIVE_COLUMNS = [
    ("peers", "peers", "d"),
    ("in groups 3+", "group3_share", ".1%"),
    ("rel. spread", "relative_spread", ".1e"),
    ("max round s", "round_max_s", ".2f"),
    ("DHT calls/round", "dht_requests_per_peer_round", ".2f"),
    ("DHT bytes/round", "dht_bytes_per_peer_round", "d"),
    ("CPU cores", "cpu_cores", ".2f"),
    ("status s", "status_s", ".2f"),
    ("answered s", "status_answered_s", ".2f"),
    ("status peers", "status_peers", "d"),
]
SIM_COLUMNS = [
    ("peers", "peers", "d"),
    ("dht miss", "dht_miss", ".0%"),
    ("averaged", "averaged_share", ".1%"),
    ("in groups 3+", "group3_share", ".1%"),
    ("spread after", "spread_after", ".1e"),
    ("DHT calls/round", "dht_requests_per_peer_round", ".2f"),
    ("DHT bytes/round", "dht_bytes_per_peer_round", "d"),
    ("wall s", "wall_s", ".0f"),
]


def targets(live: list[dict], simulated: list[dict], missing: dict | None) -> dict:
    held: dict = {}
    if live:
        held["live_groups_95"] = all(row["group3_share"] >= 0.95 for row in live)
        held["live_spread_1e-6"] = all(row["relative_spread"] < 1e-6 for row in live)
        held["live_rounds_within_bounds"] = all(row["round_max_s"] <= row["round_bound_s"] for row in live)
        held["status_under_5s"] = all(row["status_answered_s"] < 5 and row["status_peers"] for row in live)
        small, large = min(live, key=lambda r: r["peers"]), max(live, key=lambda r: r["peers"])
        if large["peers"] >= 4 * small["peers"]:
            for key in ("dht_requests_per_peer_round", "dht_bytes_per_peer_round"):
                held[f"live_{key}_growth_2x"] = large[key] <= 2 * small[key]
    if simulated:
        small, large = simulated[0], simulated[-1]
        for key in ("dht_requests_per_peer_round", "dht_bytes_per_peer_round"):
            held[f"sim_{key}_growth_3x"] = large[key] <= 3 * small[key]
        held["sim_1000_groups_90"] = large["group3_share"] >= 0.9
        held["sim_1000_spread_100x"] = large["spread_after"] <= 0.01
    if missing:
        held["views_differ_90"] = missing["averaged_share"] >= 0.9
    return held


def plot(live: list[dict], simulated: list[dict], path: Path) -> None:
    fig, (left, right) = figure(1, 2, figsize=(10, 3.8))
    for rows, label in ((live, "live"), (simulated, "simulated")):
        if rows:
            peers = [row["peers"] for row in rows]
            left.plot(peers, [row["dht_bytes_per_peer_round"] for row in rows], marker="o", label=f"{label}: bytes")
            right.plot(peers, [row["group3_share"] for row in rows], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="peers", ylabel="DHT record bytes per peer-round")
    right.set(xscale="log", xlabel="peers", ylabel="share of (peer, round) in groups of 3+", ylim=(0, 1.05))
    left.legend()
    right.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", type=int, nargs="*", default=[16, 32, 64], help="live swarm sizes")
    parser.add_argument("--no-sim", action="store_true", help="skip the simulated part")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--every", type=float, default=4.0, help="seconds per slot (live)")
    parser.add_argument("--numel", type=int, default=1000)
    parser.add_argument(
        "--heartbeat-ttl", type=float, default=None, help="the live peers' heartbeat_ttl (default: Peer's)"
    )
    parser.add_argument("--linger", type=float, default=30.0, help="seconds the live peers stay up after their rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    args = parser.parse_args()
    report = report_header("scale", args)
    live, simulated, missing = [], [], None
    for peers in args.live:
        live.append(run_live(peers, args))
        print(table(live[-1:], LIVE_COLUMNS), flush=True)
        report["live"] = live
        write_report(report, args.out)
    if not args.no_sim:
        for peers in SIMULATED:
            simulated.append(run_simulated(peers, args, churn=0.05))
            print(table(simulated[-1:], SIM_COLUMNS), flush=True)
        missing = run_simulated(32, args, dht_miss=0.1)
        report["simulated"], report["views_differ"] = simulated, missing
    print("\nlive\n" + table(live, LIVE_COLUMNS))
    print("\nsimulated (150 ms RTT, 1% loss, 5% crashing and as many joining; then 10% of reads missing)")
    print(table(simulated + ([missing] if missing else []), SIM_COLUMNS))
    report["summary"] = {
        "live": {row["peers"]: {k: v for k, v in row.items() if k != "peers"} for row in live},
        "simulated": {row["peers"]: {k: v for k, v in row.items() if k != "peers"} for row in simulated},
        "views_differ": missing,
        "targets": targets(live, simulated, missing),
    }
    print("\ntargets:", report["summary"]["targets"])
    write_report(report, args.out)
    plot(live, simulated, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
