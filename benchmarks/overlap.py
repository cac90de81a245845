"""Overlap (issue 7): local training steps/s of a peer that averages in the background, vs averaging off.

Two processes train side by side on this machine in each of these conditions, one after the other,
interleaved, ``--repeats`` times:

- ``plain``: averaging off.  GossipOptimizer has no off switch, so this is the CLI peer's training
  loop without it (same task, model, batch size, Adam, ``loss.item()`` per step): what a user's
  script does before it joins a swarm.  Two such loops run at once, so they share the CPU as the
  two peers below do.
- ``alone`` (with ``--conditions``, not by default): a ``gossiptrain peer`` in a run of its own.
  Rounds find no partner, so this is the facade's own cost (snapshots, round bookkeeping, the
  daemon and DHT heartbeats) without any exchange.
- ``averaging``: two ``gossiptrain peer`` processes of one run, averaging every
  ``--average-every`` seconds, with one bootstrap node.

Every process uses ``--threads 1`` (``torch.set_num_threads(1)``), so that the two processes do
not fight over the cores: on a 2-core machine that leaves no core spare, and the libp2p daemons,
the asyncio loop thread and the bootstrap node take their CPU from the same two cores (that cost
is part of what is measured).  Steps/s is measured per process over its steady state: from
``--warmup`` seconds after it started training until the end of its ``--duration``, from its
records (``step``, ``time``).  Reported: the median over processes and repeats per condition, ``averaging / plain``
(the target is >= 85%), the same ratio repeat by repeat (each against the plain pair run just
before it, which cancels slow drifts of the machine's load), and CPU time per step, which other
load barely changes.  Other load on the machine shifts every condition,
which is why they are interleaved; the load average at the start is in the JSON.

    python benchmarks/overlap.py                                   # charlm, 3 x 2 conditions (~3 min)
    python benchmarks/overlap.py --conditions plain,alone,averaging --repeats 5

Writes ``benchmarks/results/overlap.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import report_header, write_report

from gossiptrain.demo import read_records
from gossiptrain.rounds import AVERAGED
from gossiptrain.testing import LocalSwarm

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "overlap.json"
CONDITIONS = ("plain", "alone", "averaging")
WORKER_ONLY = ("plain_worker", "seed", "threads", "metrics_file")


def plain_worker(args: argparse.Namespace) -> None:
    """The CLI peer's training loop without GossipOptimizer; writes a ``step``/``time`` record every 0.5 s."""
    import torch

    from gossiptrain.tasks import TASKS

    torch.set_num_threads(args.threads)
    task = TASKS[args.example]()
    optimizer = torch.optim.Adam(task.model.parameters(), lr=args.lr)
    batches = task.batches(args.seed, args.batch_size)
    with open(args.metrics_file, "a") as metrics:
        started = time.time()
        metrics.write(json.dumps({"event": "joined", "time": started, "step": 0}) + "\n")
        step, last_record = 0, started
        while time.time() < started + args.duration:
            task.train_step(optimizer, next(batches))
            step += 1
            if time.time() - last_record >= 0.5:
                last_record = time.time()
                metrics.write(json.dumps({"step": step, "time": last_record}) + "\n")
        metrics.write(json.dumps({"step": step, "time": time.time(), "final": True}) + "\n")


def _process_table() -> dict[int, tuple[int, float]]:
    """Every process's parent pid and CPU seconds (user + system) so far, from /proc."""
    table, tick = {}, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        table[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def cpu_seconds(pid: int, table: dict[int, tuple[int, float]]) -> tuple[float, float]:
    """CPU seconds used so far by process ``pid``, and by its live descendants (its p2pd daemon)."""
    descendants, frontier = [], [pid]
    while frontier:
        frontier = [child for child, (parent, _) in table.items() if parent in frontier]
        descendants += frontier
    return table.get(pid, (0, 0.0))[1], sum(table[child][1] for child in descendants)


def _at(samples: list[list[float]], when: float) -> list[float]:
    """The CPU sample ``[time, own, descendants]`` nearest to ``when``."""
    return min(samples, key=lambda sample: abs(sample[0] - when))


def steady_rate(records: list[dict], samples: list[list[float]], warmup: float, duration: float) -> dict:
    """Steps/s between ``warmup`` s after the ``joined`` record and the end of training, and CPU per step."""
    joined = next(r for r in records if r.get("event") == "joined")
    begin, end = joined["time"] + warmup, joined["time"] + duration
    window = [r for r in records if "step" in r and "time" in r and begin <= r["time"] <= end and "event" not in r]
    if len(window) < 2:
        raise RuntimeError(f"fewer than 2 records in the steady-state window ({len(records)} records in all)")
    first, last = window[0], window[-1]
    rounds = [r for r in window if "status" in r]
    (t0, own0, kids0), (t1, own1, kids1) = _at(samples, first["time"]), _at(samples, last["time"])
    steps = max(last["step"] - first["step"], 1)
    return {
        "steps_per_second": (last["step"] - first["step"]) / (last["time"] - first["time"]),
        "window_seconds": last["time"] - first["time"],
        "steps": last["step"] - first["step"],
        "cpu_ms_per_step": 1000 * (own1 - own0) / steps,
        "daemon_cpu_ms_per_step": 1000 * (kids1 - kids0) / steps,
        "cpu_utilisation": (own1 - own0) / (t1 - t0) if t1 > t0 else None,
        "rounds_averaged": sum(r["status"] in AVERAGED for r in rounds),
        "rounds_alone": sum(r["status"] == "alone" for r in rounds),
        "rounds_failed": sum(r["status"] == "failed" for r in rounds),
        "bytes_sent": sum(r["bytes_sent"] for r in rounds),
    }


def run_pair(condition: str, repeat: int, args: argparse.Namespace, work: Path) -> list[dict]:
    """Two processes training at once in ``condition``; their steady-state rates."""
    metrics = [work / f"{condition}-{repeat}-{i}.jsonl" for i in range(2)]
    common = ("--example", args.example, "--duration", str(args.duration), "--batch-size", str(args.batch_size))
    common += ("--threads", "1", "--lr", str(args.lr))
    with LocalSwarm() as swarm:
        if condition == "plain":
            processes = []
            for i, path in enumerate(metrics):
                worker = [sys.executable, __file__, "--plain-worker", *common, "--seed", str(i)]
                processes.append(subprocess.Popen([*worker, "--metrics-file", str(path)], start_new_session=True))
                swarm.track(processes[-1])
        else:
            swarm.start_bootstrap()
            processes = []
            for i, path in enumerate(metrics):
                run_id = f"overlap-{os.getpid()}-{repeat}" + (f"-alone{i}" if condition == "alone" else "")
                wait_for = "2" if condition == "averaging" else "1"
                process, _ = swarm.start_peer(
                    *common,
                    *("--run-id", run_id, "--seed", str(i), "--wait-for-peers", wait_for),
                    *("--average-every", str(args.average_every), "--codec", args.codec),
                    *("--metrics-file", str(path), "--finish-timeout", "10"),
                )
                processes.append(process)
        deadline, samples = time.monotonic() + args.duration + 120, [[] for _ in processes]
        load = os.getloadavg()[0]
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            now, processes_now = time.time(), _process_table()
            for process, series in zip(processes, samples):
                if process.poll() is None:
                    series.append([now, *cpu_seconds(process.pid, processes_now)])
            time.sleep(0.25)
        if any(p.returncode != 0 for p in processes):
            raise RuntimeError(f"{condition} run {repeat}: exit codes {[p.returncode for p in processes]}")
    return [
        {
            "condition": condition,
            "repeat": repeat,
            "process": i,
            "load_average_at_start": load,
            **steady_rate(read_records(path), samples[i], args.warmup, args.duration),
        }
        for i, path in enumerate(metrics)
    ]


def _mean_rate(runs: list[dict], condition: str, repeat: int) -> float:
    rates = [r["steps_per_second"] for r in runs if r["condition"] == condition and r["repeat"] == repeat]
    return statistics.fmean(rates)


def summarize(runs: list[dict], conditions: list[str]) -> dict:
    summary = {}
    for condition in conditions:
        mine = [r for r in runs if r["condition"] == condition]
        rates = [r["steps_per_second"] for r in mine]
        summary[condition] = {
            "median_steps_per_second": statistics.median(rates),
            "min_steps_per_second": min(rates),
            "max_steps_per_second": max(rates),
            "samples": len(rates),
            "median_cpu_ms_per_step": statistics.median(r["cpu_ms_per_step"] for r in mine),
            "median_daemon_cpu_ms_per_step": statistics.median(r["daemon_cpu_ms_per_step"] for r in mine),
            "median_cpu_utilisation": statistics.median(r["cpu_utilisation"] or 0.0 for r in mine),
            "median_rounds_averaged": statistics.median(r["rounds_averaged"] for r in mine),
            "median_load_average_at_start": statistics.median(r["load_average_at_start"] for r in mine),
        }
    if "plain" in summary:
        plain = summary["plain"]
        for condition in conditions:
            if condition == "plain":
                continue
            mine = summary[condition]
            mine["ratio_to_plain"] = mine["median_steps_per_second"] / plain["median_steps_per_second"]
            repeats = sorted({r["repeat"] for r in runs})  # each against the plain pair run just before it
            mine["paired_ratios"] = [_mean_rate(runs, condition, k) / _mean_rate(runs, "plain", k) for k in repeats]
            mine["median_paired_ratio"] = statistics.median(mine["paired_ratios"])
            cpu = mine["median_cpu_ms_per_step"] + mine["median_daemon_cpu_ms_per_step"]
            mine["cpu_per_step_vs_plain"] = cpu / plain["median_cpu_ms_per_step"]
    return summary


def table(summary: dict) -> str:
    rows = [
        f"{'condition':<10} {'steps/s':>7} {'min':>6} {'max':>6} {'runs':>4} {'vs plain':>8} "
        f"{'CPU ms/step':>11} {'p2pd ms/step':>12} {'CPU use':>7} {'rounds':>6} {'load':>5}"
    ]
    for condition, s in summary.items():
        ratio = f"{100 * s['ratio_to_plain']:.1f}%" if "ratio_to_plain" in s else "-"
        rows.append(
            f"{condition:<10} {s['median_steps_per_second']:>7.2f} {s['min_steps_per_second']:>6.2f} "
            f"{s['max_steps_per_second']:>6.2f} {s['samples']:>4} {ratio:>8} {s['median_cpu_ms_per_step']:>11.2f} "
            f"{s['median_daemon_cpu_ms_per_step']:>12.2f} {100 * s['median_cpu_utilisation']:>6.0f}% "
            f"{s['median_rounds_averaged']:>6.0f} "
            f"{s['median_load_average_at_start']:>5.1f}"
        )
    for condition, s in summary.items():
        if "paired_ratios" in s:
            paired = ", ".join(f"{100 * r:.1f}%" for r in s["paired_ratios"])
            rows.append(
                f"{condition} vs plain, repeat by repeat: {paired} (median {100 * s['median_paired_ratio']:.1f}%); "
                f"CPU per step, p2pd included: {100 * s['cpu_per_step_vs_plain']:.1f}% of plain's"
            )
    rows.append(
        "medians over processes and repeats; steps/s over each process's steady state; CPU ms/step: the training "
        "process (all its threads), p2pd: its daemon; CPU use: training process CPU s per wall s; "
        "rounds: averaged in the window; load: 1-min load average at the start"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--example", default="charlm", choices=["digits", "charlm"])
    parser.add_argument("--conditions", default="plain,averaging", help=f"comma-separated, of {', '.join(CONDITIONS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of training per process")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds left out at the start of each")
    parser.add_argument("--average-every", type=float, default=1.0)
    parser.add_argument("--codec", default="none")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--metrics-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        return plain_worker(args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed benchmark still stops its peers
    conditions = args.conditions.split(",")
    if unknown := set(conditions) - set(CONDITIONS):
        parser.error(f"unknown conditions {sorted(unknown)}; choose from {CONDITIONS}")

    report = report_header("overlap", args, WORKER_ONLY)
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):
            for condition in conditions:
                pair = run_pair(condition, repeat, args, Path(workdir))
                rates = ", ".join(f"{r['steps_per_second']:.2f}" for r in pair)
                print(f"repeat {repeat} {condition:<9} steps/s {rates}", flush=True)
                runs.extend(pair)
    summary = summarize(runs, conditions)
    report.update(runs=runs, summary=summary, load_average_at_end=list(os.getloadavg()))
    print(table(summary))
    write_report(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
