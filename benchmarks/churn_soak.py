"""Churn soak (issue 5): a swarm that loses a peer to SIGKILL and gains a fresh one every ~20 s.

Two swarms of ``--peers`` CLI peers on 127.0.0.1 train ``--task`` for ``--duration`` seconds each,
one after the other in the same invocation: a churn-free one, then one where every
``--churn-every`` seconds (+-25% jitter, seeded) one random live peer is killed with SIGKILL (its
whole session, libp2p daemon included, as a machine that dies) and a fresh peer joins, downloads
the state from a live peer and trains until the common end.  Churn stops 20 s before the end, so
that the last joiner trains too.  Every peer then finishes (``GossipOptimizer.finish``) and
evaluates its model.

Reported per swarm, from the peers' metrics files:

- rounds averaged / alone / failed (all peers, killed ones included);
- the longest any peer waited on one round (``round_seconds``), against the bound
  ``Timeouts.join + Timeouts.part + 2 s`` that a group whose member died must finish within;
- NaN/Inf seen: non-finite losses or parameter norms in any record, plus NaN/Inf payloads refused;
- per joiner: seconds from its process start, and from the end of its state download, to the end
  of its first averaged round (its first contribution), against ``state bytes / bandwidth + 5 s``
  (bandwidth: the joiner's own measured download rate);
- the final validation loss, mean over the peers alive at the end, and its change vs churn-free.

    python benchmarks/churn_soak.py                          # 8 peers, 2 x 5 min (~11 min)
    python benchmarks/churn_soak.py --duration 60 --peers 4   # a quick look

Writes ``benchmarks/results/churn_soak.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import fmt, median, report_header, write_report

from gossiptrain.demo import read_records
from gossiptrain.rounds import AVERAGED, Timeouts
from gossiptrain.state import serialize_state
from gossiptrain.tasks import TASKS
from gossiptrain.testing import LocalSwarm

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "churn_soak.json"


def state_bytes(task: str) -> int:
    """Size of the state a joiner downloads: parameters and Adam state after one step."""
    model = TASKS[task]().model
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    params = [p.detach() for p in model.parameters()]
    return len(serialize_state({"params": params, "optimizer": optimizer.state_dict(), "local_step": 0}))


def run_swarm(churn: bool, args: argparse.Namespace, work: Path) -> dict:
    """Train one swarm for ``args.duration`` seconds, with or without churn; returns its peers' records."""
    rng = random.Random(args.seed)
    peers: dict[int, dict] = {}
    run_id = f"soak-{'churn' if churn else 'steady'}-{int(time.time())}"
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()

        def start(index: int, duration: float, wait_for: int) -> None:
            metrics = work / f"{run_id}-peer{index}.jsonl"
            process, output = swarm.start_peer(
                *("--run-id", run_id, "--example", args.task, "--seed", str(index)),
                *("--duration", f"{duration:.1f}", "--wait-for-peers", str(wait_for)),
                *("--average-every", str(args.average_every), "--metrics-file", str(metrics)),
                *shlex.split(args.peer_args),
            )
            peers[index] = {"process": process, "output": output, "metrics": metrics, "spawned": time.time()}

        for index in range(args.peers):
            start(index, args.duration, args.peers)
        for peer in peers.values():
            peer["output"].wait_for(lambda line: "joined run" in line, timeout=120)
        begin = time.monotonic()
        end = begin + args.duration
        killed, joined = [], []
        next_churn = begin + args.churn_every * rng.uniform(0.75, 1.25)
        while churn and next_churn < end - 20:
            time.sleep(max(0.0, next_churn - time.monotonic()))
            alive = [i for i, p in peers.items() if p["process"].poll() is None]
            victim = rng.choice(alive)
            swarm.kill(peers[victim]["process"].pid)
            peers[victim]["killed_at"] = time.time()
            killed.append(victim)
            newcomer = len(peers)
            start(newcomer, end - time.monotonic(), 1)
            peers[newcomer]["joiner"] = True
            joined.append(newcomer)
            print(f"[{time.monotonic() - begin:5.0f}s] killed peer {victim}, started peer {newcomer}", flush=True)
            next_churn += args.churn_every * rng.uniform(0.75, 1.25)
        deadline = end + args.finish_timeout + 60
        while any(p["process"].poll() is None for p in peers.values()) and time.monotonic() < deadline:
            time.sleep(1.0)
        unfinished = [i for i, p in peers.items() if p["process"].poll() is None]
    records = {i: read_records(p["metrics"]) for i, p in peers.items()}
    return {
        "records": records,
        "spawned": {i: p["spawned"] for i, p in peers.items()},
        "killed": killed,
        "joined": joined,
        "unfinished": unfinished,
    }


def summarize(swarm: dict, state_size: int) -> dict:
    records, joined = swarm["records"], swarm["joined"]
    rounds = [r for recs in records.values() for r in recs if "round" in r]
    statuses = [r["status"] for r in rounds]
    finals = [next((r for r in recs if r.get("final")), None) for recs in records.values()]
    final_losses = [f["loss"] for f in finals if f is not None]
    non_finite_records = sum(
        1
        for r in rounds
        if not math.isfinite(r["param_norm"]) or (r["loss"] is not None and not math.isfinite(r["loss"]))
    )
    non_finite_refused = sum(
        max((r["rejected"].get("non_finite", 0) for r in recs if "round" in r), default=0) for recs in records.values()
    )
    joiners, killed_while_starting = [], []
    for index in joined:
        recs = records[index]
        event = next((r for r in recs if r.get("event") == "joined"), None)
        if event is None and index in swarm["killed"]:
            killed_while_starting.append(index)  # churn hit it before it had joined: nothing to time
            continue
        first = next((r for r in recs if r.get("status") in AVERAGED), None)
        download = event.get("state_download_seconds") if event else None
        bandwidth = state_size / download if download else None
        joiners.append(
            {
                "peer": index,
                "state_download_seconds": download,
                "download_bytes_per_second": bandwidth,
                "joined_after_spawn_seconds": event["time"] - swarm["spawned"][index] if event else None,
                "first_contribution_after_spawn_seconds": first["time"] - swarm["spawned"][index] if first else None,
                "first_contribution_after_joining_seconds": first["time"] - event["time"] if first and event else None,
                "bound_seconds": state_size / bandwidth + 5.0 if bandwidth else None,
            }
        )
    return {
        "peers_started": len(records),
        "killed": len(swarm["killed"]),
        "unfinished": swarm["unfinished"],
        "rounds_averaged": sum(status in AVERAGED for status in statuses),
        "rounds_alone": statuses.count("alone"),
        "rounds_failed": statuses.count("failed"),
        "max_round_seconds": max((r["round_seconds"] for r in rounds), default=None),
        "median_round_seconds": median(r["round_seconds"] for r in rounds),
        "non_finite_records": non_finite_records,
        "non_finite_refused": non_finite_refused,
        "joiners": joiners,
        "joiners_killed_while_starting": killed_while_starting,
        "final_loss": statistics.fmean(final_losses) if final_losses else None,
        "final_accuracy": statistics.fmean(f["accuracy"] for f in finals if f is not None) if final_losses else None,
        "peers_finished": len(final_losses),
    }


def table(results: dict, round_bound: float) -> str:
    rows = [
        f"{'swarm':<7} {'peers':>5} {'killed':>6} {'averaged':>8} {'alone':>5} {'failed':>6} {'max wait s':>10} "
        f"{'NaN/Inf':>7} {'join->1st s (max)':>17} {'spawn->1st s (max)':>18} {'final loss':>10} {'accuracy':>8}"
    ]
    for name, s in results.items():
        joins = [j["first_contribution_after_joining_seconds"] for j in s["joiners"]]
        spawns = [j["first_contribution_after_spawn_seconds"] for j in s["joiners"]]
        rows.append(
            f"{name:<7} {s['peers_started']:>5} {s['killed']:>6} {s['rounds_averaged']:>8} {s['rounds_alone']:>5} "
            f"{s['rounds_failed']:>6} {fmt(s['max_round_seconds'], '.2f'):>10} "
            f"{s['non_finite_records'] + s['non_finite_refused']:>7} "
            f"{fmt(max(joins, default=None) if None not in joins else None, '.2f'):>17} "
            f"{fmt(max(spawns, default=None) if None not in spawns else None, '.2f'):>18} "
            f"{fmt(s['final_loss'], '.4f'):>10} {fmt(s['final_accuracy'], '.4f'):>8}"
        )
    rows.append(f"round wait bound (join + part + 2 s): {round_bound:.1f} s")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of training per swarm")
    parser.add_argument("--churn-every", type=float, default=20.0, help="seconds between kill+join events")
    parser.add_argument("--task", default="digits", choices=sorted(TASKS))
    parser.add_argument("--average-every", type=float, default=1.0)
    parser.add_argument("--finish-timeout", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the churn schedule")
    parser.add_argument("--peer-args", default="", help="extra arguments for every `gossiptrain peer`")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    report = report_header("churn_soak", args)
    state_size = state_bytes(args.task)
    round_bound = Timeouts().join + Timeouts().part + 2.0
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, churn in (("steady", False), ("churn", True)):
            print(f"{name}: {args.peers} peers x {args.duration:.0f} s on {args.task}", flush=True)
            results[name] = summarize(run_swarm(churn, args, Path(workdir)), state_size)
    steady, churned = results["steady"]["final_loss"], results["churn"]["final_loss"]
    verdict = {
        "state_bytes": state_size,
        "round_wait_bound_seconds": round_bound,
        "max_round_within_bound": results["churn"]["max_round_seconds"] is not None
        and results["churn"]["max_round_seconds"] <= round_bound,
        "no_non_finite": all(s["non_finite_records"] + s["non_finite_refused"] == 0 for s in results.values()),
        **{
            f"joiners_within_bound_{since}": all(
                j[f"first_contribution_after_{since}_seconds"] is not None
                and j[f"first_contribution_after_{since}_seconds"] <= j["bound_seconds"]
                for j in results["churn"]["joiners"]
            )
            for since in ("joining", "spawn")
        },
        "final_loss_change_pct": 100 * (churned - steady) / steady if steady and churned else None,
    }
    report.update(results=results, verdict=verdict)
    print(table(results, round_bound))
    print(json.dumps(verdict, indent=1))
    write_report(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
