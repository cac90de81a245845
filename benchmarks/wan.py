"""Rounds over internet-like links: share of rounds averaged, round time and consensus vs RTT and loss.

For every setting (peers x RTT x loss, with ``--jitter-ms`` of jitter) it builds fresh
``gossiptrain.netns.EmulatedLinks`` (namespace 0: a bootstrap node; 1..N: one peer each) and runs one
worker process per peer in its namespace.  A worker holds a flat tensor of ``--numel`` values drawn
from ``randn`` with its own seed and averages it every slot (``round_interval = --average-every``,
nothing else set: the timing adapts itself) with ``--codec``, taking the result as its new values,
until a common end time; then it writes its values.  Nothing else runs, so what the table shows is
the rounds alone:

- ``averaged_share``: rounds that came back ``averaged`` (or ``partial``) with more than one member, over every
  round a peer tried (a round alone or failed counts against it);
- ``round_p50_s``/``round_p95_s``: ``RoundResult.seconds`` (the slot's start to the result) over
  the averaged rounds of every peer;
- ``final_spread``: the peers' final values' standard deviation across peers, averaged over the
  coordinates, relative to the start (1.0: no averaging at all; int8 rounding leaves ~1e-3).

The heterogeneous case (``--slow-mbit``, one peer among ``--mbit`` peers) runs at ``--slow-rtt-ms``
with each of ``--slow-peers`` swarm sizes and ``--slow-numel`` values, three times in the same invocation: all
peers fast; the last peer slow; the last peer slow and declaring its speed (``bandwidth_mbit``).  It reports the
fast peers' round times (``fast_round_p50_s``) and their ratio to the all-fast run (``slowdown``), per size in
the list ``slow_peers``.

The NAT case (``--nat N``) runs one reachable peer and N peers behind emulated NATs (``behind_nat``: reached
through the bootstrap node, their initial peer, as a circuit relay; no client mode) at ``--slow-rtt-ms``, and
reports the share of rounds each kind averaged and the bytes the relay's link carried beside the peers' own;
``--strict-nat``: NATs that refuse a simultaneous open, so that no hole punching can succeed.

    sudo python benchmarks/wan.py                        # 4,8 peers x RTT 0,50,150,300 x loss 0,1% + slow peer
    sudo python benchmarks/wan.py --peers 4 --rtt-ms 150 --loss 0.01 --duration 30 --no-slow
    sudo python benchmarks/wan.py --peers 4 --rtt-ms 0 --loss 0 --no-slow --nat 6    # the NAT case only

Needs the rights to create network namespaces (root); writes ``benchmarks/results/wan.json`` and
``wan.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import figure, fmt, median, report_header, save_figure, write_report  # noqa: E402

from gossiptrain.allreduce import DEFAULT_DEFENCES  # noqa: E402
from gossiptrain.netns import EmulatedLinks, EmulationUnavailable  # noqa: E402
from gossiptrain.rounds import AVERAGED  # noqa: E402
from gossiptrain.testing import LocalSwarm  # noqa: E402

LINGER = 8.0  # seconds a worker stays up after the end, so that the others' last rounds can finish


# --- worker (one peer, in its namespace) ---------------------------------------------------------------------------


async def _worker(args: argparse.Namespace) -> None:
    from gossiptrain.peer import Peer

    generator = torch.Generator().manual_seed(args.index)
    values = torch.randn(args.numel, generator=generator)
    rounds = []
    async with Peer(
        args.run_id,
        initial_peers=[args.entry],
        host_maddrs=[args.host_maddr],
        target_group_size=args.group_size,
        round_interval=args.average_every,
        codec=args.codec,
        bandwidth_mbit=args.bandwidth_mbit,
        behind_nat=args.behind_nat,
        defences=dataclasses.replace(DEFAULT_DEFENCES, mean_check=args.mean_check or None),
    ) as peer:
        await peer.wait_for_peers(args.peers, timeout=120)
        print("ready", flush=True)
        while peer.now() + peer.registration_lead < args.end_time:
            result = await peer.average(values)
            rounds.append(
                {
                    "round_id": result.round_id,
                    "status": result.status,
                    "group_size": len(result.group),
                    "seconds": result.seconds,
                    "errors": result.errors[:3],
                }
            )
            if result.status in AVERAGED:
                values = result.averaged
        await asyncio.sleep(max(0.0, args.end_time + LINGER - peer.now()))
    torch.save(values, args.out.with_suffix(".pt"))
    args.out.write_text(json.dumps({"index": args.index, "rounds": rounds}))


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    asyncio.run(_worker(args))


# --- one setting ------------------------------------------------------------------------------------------------


def run_setting(
    peers: int,
    rtt_ms: float,
    loss: float,
    args: argparse.Namespace,
    slow: int | None = None,
    declare: bool = False,
    nated: range = range(0),
) -> dict:
    """One swarm of ``peers`` workers over fresh links; every peer's rounds, the final spread and the bytes each
    link carried (index 0: the bootstrap node).  ``slow``: the peer on a ``--slow-mbit`` link; ``declare``: it
    passes that speed as ``bandwidth_mbit``; ``nated``: peers behind a NAT, reached through the bootstrap node."""
    overrides = {slow: {"mbit": args.slow_mbit}} if slow else {}
    overrides.update({i: {"nat": True, "strict_nat": args.strict_nat} for i in nated})
    jitter = args.jitter_ms if rtt_ms > 0 else 0.0
    links = EmulatedLinks(peers + 1, mbit=args.mbit, rtt_ms=rtt_ms, jitter_ms=jitter, loss=loss, overrides=overrides)
    with tempfile.TemporaryDirectory() as work, links, LocalSwarm() as swarm:
        work = Path(work)
        env = {"OMP_NUM_THREADS": "1"}
        bootstrap = [sys.executable, "-m", "gossiptrain", "bootstrap", "--host-maddrs", links.maddr(0)]
        _, output = swarm.start([*links.exec_prefix(0), *bootstrap], env=env)
        entry = output.wait_for(lambda line: line.startswith("/ip4/"), timeout=60)
        end_time = time.time() + args.startup + args.duration
        run_id = f"wan-{int(time.time())}-{peers}-{int(rtt_ms)}-{int(loss * 1000)}"
        processes = []
        for i in range(1, peers + 1):
            argv = [sys.executable, __file__, "--worker", "--index", str(i), "--entry", entry, "--run-id", run_id]
            argv += ["--host-maddr", links.maddr(i), "--peers", str(peers), "--group-size", str(args.group_size)]
            argv += ["--numel", str(args.numel), "--codec", args.codec, "--average-every", str(args.average_every)]
            argv += ["--end-time", str(end_time), "--out", str(work / f"peer{i}.json")]
            argv += ["--mean-check", str(args.mean_check)]
            if declare and i == slow:
                argv += ["--bandwidth-mbit", str(args.slow_mbit)]
            if i in nated:
                argv += ["--behind-nat"]
            processes.append(swarm.start([*links.exec_prefix(i), *argv], env=env)[0])
        deadline = end_time + LINGER + 60
        while any(p.poll() is None for p in processes) and time.time() < deadline:
            time.sleep(0.5)
        failed = [i for i, p in enumerate(processes, 1) if p.poll() != 0]
        if failed:
            raise RuntimeError(f"peers {failed} did not finish cleanly (their output is above)")
        records = [json.loads((work / f"peer{i}.json").read_text()) for i in range(1, peers + 1)]
        link_bytes = [sum(links.bytes_moved(i)) for i in range(peers + 1)]
        finals = torch.stack([torch.load(work / f"peer{i}.pt") for i in range(1, peers + 1)])
    start = torch.stack(
        [torch.randn(args.numel, generator=torch.Generator().manual_seed(i)) for i in range(1, peers + 1)]
    )
    spread = (finals.std(dim=0).mean() / start.std(dim=0).mean()).item()
    return {
        "peers": peers,
        "rtt_ms": rtt_ms,
        "loss": loss,
        "records": records,
        "final_spread": spread,
        "link_bytes": link_bytes,
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.floor(q * len(ordered)))]


def summarize(result: dict, indices: range | None = None) -> dict:
    """The summary entry of one setting; ``indices`` (1-based peers) restricts it to some peers."""
    chosen = [r for r in result["records"] if indices is None or r["index"] in indices]
    rounds = [round_ for record in chosen for round_ in record["rounds"]]
    averaged = [r for r in rounds if r["status"] in AVERAGED and r["group_size"] > 1]
    seconds = [r["seconds"] for r in averaged]
    return {
        "peers": result["peers"],
        "rtt_ms": result["rtt_ms"],
        "loss": result["loss"],
        "rounds": len(rounds),
        "averaged_share": len(averaged) / len(rounds) if rounds else 0.0,
        "round_p50_s": median(seconds),
        "round_p95_s": _quantile(seconds, 0.95),
        "final_spread": result["final_spread"],
        "first_errors": sorted({e for r in rounds for e in r["errors"]})[:5],
    }


def table(report: dict) -> str:
    lines = ["peers  rtt_ms  loss   rounds  averaged  p50_s  p95_s  final_spread"]
    for s in report["summary"]:
        lines.append(
            f"{s['peers']:>5}  {s['rtt_ms']:>6g}  {s['loss']:<5g}  {s['rounds']:>6}  {s['averaged_share']:>8.1%}  "
            f"{fmt(s['round_p50_s'], '5.2f')}  {fmt(s['round_p95_s'], '5.2f')}  {s['final_spread']:>12.2e}"
        )
    for slow in report.get("slow_peers", []):
        lines.append(
            f"one {slow['slow_mbit']:g} Mbit/s peer among {slow['mbit']:g} Mbit/s ({slow['peers']} peers, "
            f"{slow['rtt_ms']:g} ms RTT): fast peers' round p50 {fmt(slow['baseline_round_p50_s'], '.2f')} s alone"
        )
        for case in ("undeclared", "declared"):
            if result := slow.get(case):
                lines.append(
                    f"  its bandwidth {case}: fast peers' p50 {fmt(result['fast_round_p50_s'], '.2f')} s "
                    f"({fmt(result['slowdown'], '.2f')}x), fast peers averaged {result['fast_averaged_share']:.0%}, "
                    f"slow peer {result['slow_peer_averaged_share']:.0%}, final spread {result['final_spread']:.1e}"
                )
    if nat := report.get("nat"):
        lines.append(
            f"1 reachable peer and {nat['nated']} behind {'strict ' if nat.get('strict') else ''}NAT "
            f"({nat['rtt_ms']:g} ms RTT, the bootstrap node relays): "
            f"reachable averaged {nat['reachable_averaged_share']:.0%}, behind NAT {nat['nated_averaged_share']:.0%} "
            f"(p50 {fmt(nat['nated_round_p50_s'], '.2f')} s); relay's link {nat['relay_mb']:.1f} MB, "
            f"{nat['relay_share']:.0%} of the peers' bytes; final spread {nat['final_spread']:.1e}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    fig, (share_ax, time_ax) = figure(1, 2, figsize=(10, 4))
    for peers in sorted({s["peers"] for s in report["summary"]}):
        for loss in sorted({s["loss"] for s in report["summary"]}):
            rows = sorted(
                (s for s in report["summary"] if s["peers"] == peers and s["loss"] == loss), key=lambda s: s["rtt_ms"]
            )
            label = f"{peers} peers, {loss:.0%} loss"
            share_ax.plot([s["rtt_ms"] for s in rows], [s["averaged_share"] for s in rows], "o-", label=label)
            time_ax.plot([s["rtt_ms"] for s in rows], [s["round_p50_s"] or math.nan for s in rows], "o-", label=label)
    share_ax.set(xlabel="RTT (ms)", ylabel="share of rounds averaged", ylim=(0, 1.05))
    time_ax.set(xlabel="RTT (ms)", ylabel="round time p50 (s)")
    if report["summary"]:  # none with --peers '' (the slow-peer case alone)
        share_ax.legend()
    save_figure(fig, path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    numbers = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--peers", type=lambda t: [int(x) for x in t.split(",") if x], default=[4, 8])
    parser.add_argument("--rtt-ms", type=numbers, default=[0, 50, 150, 300])
    parser.add_argument("--loss", type=numbers, default=[0.0, 0.01])
    parser.add_argument("--jitter-ms", type=float, default=10.0)
    parser.add_argument("--mbit", type=float, default=50.0)
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--codec", default="int8")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--average-every", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of rounds per setting")
    parser.add_argument("--startup", type=float, default=15.0, help="seconds from launch to the first round")
    parser.add_argument("--slow-mbit", type=float, default=5.0)
    parser.add_argument("--slow-rtt-ms", type=float, default=50.0)
    parser.add_argument(
        "--slow-peers", type=lambda t: [int(x) for x in t.split(",")], default=[4, 8], help="swarm sizes, slow case"
    )
    parser.add_argument("--slow-numel", type=int, default=4_000_000, help="values averaged in the slow-peer case")
    parser.add_argument("--no-slow", action="store_true", help="skip the heterogeneous case")
    parser.add_argument("--nat", type=int, default=6, help="peers behind NAT in the NAT case (0: skip it)")
    parser.add_argument(
        "--strict-nat", action="store_true", help="the NATs refuse a simultaneous open: hole punching fails"
    )
    parser.add_argument(
        "--mean-check",
        type=float,
        default=DEFAULT_DEFENCES.mean_check,
        help="members' check of the owners' means (Defences.mean_check; 0: off), to measure what it costs",
    )
    parser.add_argument("--bandwidth-mbit", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--behind-nat", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "wan.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--index", "--entry", "--run-id", "--host-maddr", "--end-time"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.index, args.end_time, args.peers, args.out = (
            int(args.index),
            float(args.end_time),
            args.peers[0],
            Path(args.out),
        )
        worker(args)
        return

    report = report_header("wan", args)
    started = time.monotonic()
    report["summary"], report["runs"] = [], []
    numel = args.numel
    try:
        for peers in args.peers:
            for rtt in args.rtt_ms:
                for loss in args.loss:
                    print(f"{peers} peers, RTT {rtt:g} ms, loss {loss:g} ...", flush=True)
                    result = run_setting(peers, rtt, loss, args)
                    report["runs"].append(result)
                    report["summary"].append(summarize(result))
                    print(table({"summary": report["summary"][-1:]}), flush=True)
        for peers in [] if args.no_slow else args.slow_peers:
            rtt, fast = args.slow_rtt_ms, range(1, peers)
            args.numel = args.slow_numel
            print(f"one {args.slow_mbit:g} Mbit/s peer among {peers} ...", flush=True)
            baseline = run_setting(peers, rtt, 0.0, args)
            slow_peer = {"peers": peers, "rtt_ms": rtt, "mbit": args.mbit, "slow_mbit": args.slow_mbit}
            slow_peer.update(numel=args.numel, baseline_round_p50_s=summarize(baseline, fast)["round_p50_s"])
            report["runs"].append({**baseline, "case": "slow-baseline"})
            for declare in (False, True):
                slow = run_setting(peers, rtt, 0.0, args, slow=peers, declare=declare)
                fast_p50, base_p50 = summarize(slow, fast)["round_p50_s"], slow_peer["baseline_round_p50_s"]
                slow_peer["declared" if declare else "undeclared"] = {
                    "fast_round_p50_s": fast_p50,
                    "slowdown": fast_p50 / base_p50 if fast_p50 and base_p50 else None,
                    "fast_averaged_share": summarize(slow, fast)["averaged_share"],
                    "slow_peer_averaged_share": summarize(slow, range(peers, peers + 1))["averaged_share"],
                    "final_spread": slow["final_spread"],
                }
                report["runs"].append({**slow, "case": f"slow-peer-{'declared' if declare else 'undeclared'}"})
            report.setdefault("slow_peers", []).append(slow_peer)
            print(table({"summary": [], "slow_peers": [slow_peer]}), flush=True)
        if args.nat:
            peers, nated = 1 + args.nat, range(2, 2 + args.nat)
            print(f"1 reachable peer and {args.nat} behind NAT ...", flush=True)
            args.numel = numel
            result = run_setting(peers, args.slow_rtt_ms, 0.0, args, nated=nated)
            relay, own = result["link_bytes"][0], sum(result["link_bytes"][1:])
            report["nat"] = {
                "nated": args.nat,
                "strict": args.strict_nat,
                "rtt_ms": args.slow_rtt_ms,
                "numel": args.numel,
                "reachable_averaged_share": summarize(result, range(1, 2))["averaged_share"],
                "nated_averaged_share": summarize(result, nated)["averaged_share"],
                "nated_round_p50_s": summarize(result, nated)["round_p50_s"],
                "relay_mb": relay / 1e6,
                "relay_share": relay / own if own else 0.0,
                "final_spread": result["final_spread"],
            }
            report["runs"].append({**result, "case": "nat"})
    except EmulationUnavailable as e:
        parser.exit(1, f"cannot emulate links here: {e}\n")
    report["wall_s"] = time.monotonic() - started
    print(table(report))
    write_report(report, args.out)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
