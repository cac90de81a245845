"""Time to loss (issue 7): gossiptrain vs ``hivemind.Optimizer``, 4 peers on bandwidth-limited links.

For each ``--mbit`` setting, ``EmulatedLinks`` puts a bootstrap node and ``--peers`` peers in network
namespaces of their own, each behind a link of that many Mbit/s per direction and ``--rtt-ms`` of
round-trip time (0 by default; the README's runs used 0, when the links were ``tbf`` veths), and the two
systems train the char-LM (``charlm_task``: same model, same initial parameters, peer ``i`` draws
its batches from seed ``i``, same per-peer batch size, Adam learning rate and one torch thread per
peer) for ``--duration`` seconds each, one after the other:

- ``gossiptrain``: ``gossiptrain peer`` processes, ``--codec`` (int8 by default: within 1% of
  ``none``'s loss at ~1 byte per value in ``benchmarks/results/compression.json``; the sparse chains
  send fewer bytes but cost a few % of loss), averaging every ``--average-every`` seconds.
- ``hivemind``: ``hivemind.Optimizer`` with ``use_local_updates=True`` (each peer steps its own Adam,
  parameters are averaged with the delta rule at the end of each epoch: hivemind's counterpart of
  gossiptrain's asynchronous averaging, though its ``step()`` waits for the round in flight, so its
  local steps pause while it averages), ``Float16Compression`` for the averaged state (its
  recommended setting; its 8-bit codecs silently average nothing on NumPy 2), groups of all the
  peers, ``matchmaking_time`` 3 s (the low end of what it recommends for small runs).  Cadence: an
  epoch is ``target_batch_size`` samples of the whole swarm, set to the swarm's samples per averaged
  gossiptrain round in the run just before (peers x batch size x local steps per averaged round),
  so that both average after about as many local steps (``--hivemind-epoch-steps`` fixes it instead).

Both start training together (gossiptrain: ``--wait-for-peers``; hivemind: once every peer has
built its optimizer) and evaluate with ``PeriodicEvaluation`` (the same function, the char-LM's held-out
windows, every ``--eval-every`` seconds of training).  Time is training time: wall time since the
peer started training minus its own evaluations, so the slow evaluation on 2 cores costs neither
side.  The loss curve of a system is the mean over its peers of their k-th evaluations; its time to
``--target-loss`` is where that curve first reaches it (linear between evaluations).  Bytes per peer
are what crossed the peer's link in both directions (``EmulatedLinks.bytes_moved``: payloads, DHT,
TCP/IP headers, gossiptrain's state download at start), from just before the peers start until they
have exited; gossiptrain's own count of round bytes (payload and framing) is in the JSON too.

Every peer uses one torch thread: 4 peers already oversubscribe 2 cores, and the libp2p daemons
(and hivemind's DHT and averager processes) take their CPU from the same cores, which is part of
what is measured.  The machine's other load shifts both systems' times: compare the rows of one run.

    python benchmarks/time_to_loss.py                        # 50 and 10 Mbit/s, both systems (~14 min)
    python benchmarks/time_to_loss.py --mbit 10 --duration 120 --codec topk:0.01+int8

Needs root (or CAP_NET_ADMIN) for the namespaces; without, it says why and stops.  Writes
``benchmarks/results/time_to_loss.json`` and ``.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from harness import figure, report_header, save_figure, write_report

from gossiptrain.demo import read_records
from gossiptrain.metrics import PeriodicEvaluation
from gossiptrain.netns import EmulatedLinks, EmulationUnavailable
from gossiptrain.rounds import AVERAGED
from gossiptrain.testing import LocalSwarm

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "time_to_loss"
SYSTEMS = ("gossiptrain", "hivemind")
WORKER_ONLY = (
    "hivemind_worker",
    "run_id",
    "seed",
    "host_maddr",
    "initial_peer",
    "metrics_file",
    "go_file",
    "target_batch_size",
)


def hivemind_worker(args: argparse.Namespace, evaluate_at_end: bool = False) -> None:
    """One ``hivemind.Optimizer`` peer: the CLI peer's training loop and evaluation, hivemind averaging.

    With ``evaluate_at_end``, the final record also holds the evaluation of the peer's model at the end.
    """
    import hivemind
    import torch
    from hivemind.compression import Float16Compression

    from gossiptrain.tasks import charlm_task

    torch.set_num_threads(1)
    task = charlm_task()
    dht = hivemind.DHT(initial_peers=[args.initial_peer], host_maddrs=[args.host_maddr], start=True)
    optimizer = hivemind.Optimizer(
        dht=dht,
        run_id=args.run_id,
        optimizer=torch.optim.Adam(task.model.parameters(), lr=args.lr),
        target_batch_size=args.target_batch_size,
        batch_size_per_step=args.batch_size,
        use_local_updates=True,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        state_averaging_compression=Float16Compression(),
        averager_opts={"target_group_size": args.peers},
    )
    print("ready", flush=True)
    while not Path(args.go_file).exists():  # the benchmark starts every peer at once
        time.sleep(0.05)
    with open(args.metrics_file, "a") as metrics:
        metrics.write(json.dumps({"event": "joined", "time": time.time(), "step": 0}) + "\n")
        batches = task.batches(args.seed, args.batch_size)
        evaluation = PeriodicEvaluation(lambda: task.evaluate(task.model), args.eval_every, metrics)
        step, deadline = 0, time.monotonic() + args.duration
        while time.monotonic() < deadline:
            evaluation.maybe_evaluate(step)
            task.train_step(optimizer, next(batches))
            step += 1
        final = {"final": True, "step": step, "train_seconds": evaluation.train_seconds()}
        if evaluate_at_end:
            final.update(task.evaluate(task.model))
        metrics.write(json.dumps({**final, "epochs": optimizer.local_epoch}) + "\n")
    optimizer.shutdown()
    dht.shutdown()


def start_in(swarm: LocalSwarm, links: EmulatedLinks, i: int, argv: list[str], prefix: Sequence[str] = ()):
    """Start ``argv`` in namespace ``i``, owned by ``swarm``: one OpenMP thread (hivemind's forked
    averager and DHT processes too), hivemind's logs at warnings only.  ``prefix`` runs before the namespace is
    entered (a cgroup: inside the namespace, ``/sys`` is the namespace's own)."""
    env = {"OMP_NUM_THREADS": "1", "HIVEMIND_LOGLEVEL": "WARNING"}
    return swarm.start([*prefix, *links.exec_prefix(i), *argv], env=env)


def run_system(
    system: str, links: EmulatedLinks, bootstrap: str, work: Path, args: argparse.Namespace, epoch_steps: float
) -> dict:
    """Train one swarm of ``system`` over ``links``; its peers' records and the bytes that crossed their links."""
    run_id = f"ttl-{os.getpid()}-{work.name}"
    common = ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--eval-every", str(args.eval_every)]
    common += ["--duration", str(args.duration)]
    peers = range(1, args.peers + 1)
    before = {i: links.bytes_moved(i) for i in peers}
    with LocalSwarm() as swarm:
        processes = []
        for i in peers:
            metrics = ["--metrics-file", str(work / f"peer{i}.jsonl"), "--seed", str(i)]
            if system == "gossiptrain":
                argv = [sys.executable, "-m", "gossiptrain", "peer", "--example", "charlm", "--run-id", run_id]
                argv += ["--host-maddrs", links.maddr(i), "--initial-peers", bootstrap, "--threads", "1"]
                argv += ["--codec", args.codec, "--average-every", str(args.average_every)]
                argv += ["--wait-for-peers", str(args.peers), "--finish-timeout", "10"]
            else:
                argv = [sys.executable, __file__, "--hivemind-worker", "--run-id", run_id, "--peers", str(args.peers)]
                argv += ["--host-maddr", links.maddr(i), "--initial-peer", bootstrap, "--go-file", str(work / "go")]
                argv += ["--target-batch-size", str(round(args.peers * args.batch_size * epoch_steps))]
                argv += ["--matchmaking-time", str(args.matchmaking_time)]
                argv += ["--averaging-timeout", str(args.averaging_timeout)]
            processes.append(start_in(swarm, links, i, [*argv, *common, *metrics]))
        if system == "hivemind":
            for _, output in processes:
                output.wait_for(lambda line: line == "ready", timeout=120)
            (work / "go").touch()
        deadline = time.monotonic() + args.duration + 180
        while any(p.poll() is None for p, _ in processes) and time.monotonic() < deadline:
            time.sleep(0.5)
        unfinished = [i for i, (p, _) in zip(peers, processes) if p.poll() is None]
    after = {i: links.bytes_moved(i) for i in peers}
    records = {i: read_records(work / f"peer{i}.jsonl") for i in peers}
    if any(not any(r.get("final") for r in recs) for recs in records.values()):
        raise RuntimeError(f"{system}: a peer wrote no final record (its output is above)")
    return {
        "records": records,
        "unfinished_peers": unfinished,
        "link_bytes": {i: after[i][0] - before[i][0] + after[i][1] - before[i][1] for i in peers},
    }


def loss_curve(records: dict[int, list[dict]]) -> list[tuple[float, float]]:
    """(training seconds, loss): the mean over peers of their k-th evaluations, for every k that all peers reached."""
    evals = [[r for r in recs if r.get("event") == "eval"] for recs in records.values()]
    return [
        (statistics.fmean(e[k]["train_seconds"] for e in evals), statistics.fmean(e[k]["loss"] for e in evals))
        for k in range(min(len(e) for e in evals))
    ]


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """When ``curve`` first reaches ``target`` (linear between points), or None if it never does."""
    for (t0, loss0), (t1, loss1) in zip(curve, curve[1:]):
        if loss1 <= target:
            return t0 + (t1 - t0) * (loss0 - target) / (loss0 - loss1) if loss0 > target else t0
    return None


def value_at(curve: list[tuple[float, float]], when: float) -> float:
    """The curve's loss at training time ``when`` (linear between points, its last loss after its end)."""
    for (t0, loss0), (t1, loss1) in zip(curve, curve[1:]):
        if t0 <= when <= t1:
            return loss0 + (loss1 - loss0) * (when - t0) / (t1 - t0)
    return curve[-1][1]


def summarize(system: str, run: dict, target: float) -> dict:
    records = run["records"]
    finals = [next(r for r in recs if r.get("final")) for recs in records.values()]
    rounds = [[r for r in recs if "round" in r] for recs in records.values()]
    curve = loss_curve(records)
    summary = {
        "system": system,
        "time_to_target_seconds": time_to(curve, target),
        "curve": curve,
        "curves_per_peer": {i: loss_curve({i: recs}) for i, recs in records.items()},
        "link_mb_per_peer": statistics.fmean(run["link_bytes"].values()) / 1e6,
        "link_bytes": run["link_bytes"],
        "steps_per_second_per_peer": statistics.fmean(f["step"] / f["train_seconds"] for f in finals),
        "steps_per_peer": [f["step"] for f in finals],
        "unfinished_peers": run["unfinished_peers"],
    }
    if system == "gossiptrain":
        averaged = [sum(r["status"] in AVERAGED for r in peer_rounds) for peer_rounds in rounds]
        summary["rounds_averaged_per_peer"] = statistics.fmean(averaged)
        summary["steps_per_averaged_round"] = statistics.fmean(f["step"] / max(n, 1) for f, n in zip(finals, averaged))
        summary["metrics_mb_per_peer"] = statistics.fmean(
            sum(r["bytes_sent"] + r["bytes_received"] for r in peer_rounds) / 1e6 for peer_rounds in rounds
        )
    else:
        summary["epochs_per_peer"] = statistics.fmean(f["epochs"] for f in finals)
    return summary


def compare(results: list[dict]) -> None:
    """Add the gossiptrain/hivemind ratio of times to target and both losses at their common end of training."""
    by_system = {r["system"]: r for r in results if "curve" in r}
    if len(by_system) < 2:
        return
    gossip, hive = by_system["gossiptrain"], by_system["hivemind"]
    common_end = min(gossip["curve"][-1][0], hive["curve"][-1][0])
    for r in results:
        r["loss_at_common_end"], r["common_end_seconds"] = value_at(r["curve"], common_end), common_end
    if gossip["time_to_target_seconds"] is not None and hive["time_to_target_seconds"] is not None:
        gossip["ratio_to_hivemind"] = gossip["time_to_target_seconds"] / hive["time_to_target_seconds"]


def table(report: dict) -> str:
    header = (
        f"{'Mbit/s':>6} {'system':<12} {'to target s':>11} {'ratio g/h':>9} {'MB/peer':>8} {'final loss':>10} "
        f"{'steps/s/peer':>12} {'avg rounds':>10}"
    )
    rows = [header, "-" * len(header)]
    for run in report["runs"]:
        for r in run["results"]:
            if "error" in r:
                rows.append(f"{run['mbit']:>6g} {r['system']:<12} failed: {r['error'].splitlines()[0]}")
                continue
            reached = "not reached" if r["time_to_target_seconds"] is None else f"{r['time_to_target_seconds']:.1f}"
            ratio = f"{r['ratio_to_hivemind']:.2f}" if "ratio_to_hivemind" in r else "-"
            rounds = r.get("rounds_averaged_per_peer", r.get("epochs_per_peer"))
            rows.append(
                f"{run['mbit']:>6g} {r['system']:<12} {reached:>11} {ratio:>9} {r['link_mb_per_peer']:>8.1f} "
                f"{r.get('loss_at_common_end', r['curve'][-1][1]):>10.4f} {r['steps_per_second_per_peer']:>12.2f} "
                f"{rounds:>10.1f}"
            )
    rows.append(
        f"target validation loss {report['settings']['target_loss']}; times are training seconds (evaluations "
        "excluded); MB/peer: bytes through the peer's link, both directions, whole run; final loss: mean over peers "
        "at the two systems' common end of training; avg rounds: gossiptrain's averaged rounds, hivemind's epochs"
    )
    return "\n".join(rows)


def plot(report: dict, path: Path) -> None:
    mbits = sorted({run["mbit"] for run in report["runs"]}, reverse=True)
    fig, axes = figure(1, len(mbits), figsize=(6 * len(mbits), 4.5), squeeze=False, sharey=True)
    colors = {"gossiptrain": "tab:blue", "hivemind": "tab:orange"}
    for ax, mbit in zip(axes[0], mbits):
        for run in (run for run in report["runs"] if run["mbit"] == mbit):
            for r in (r for r in run["results"] if "curve" in r):
                for peer_curve in r["curves_per_peer"].values():
                    ax.plot(*zip(*peer_curve), color=colors[r["system"]], alpha=0.2, linewidth=0.8)
                label = r["system"] if run["repeat"] == 0 else None
                ax.plot(*zip(*r["curve"]), color=colors[r["system"]], linewidth=2, label=label)
                if r["time_to_target_seconds"] is not None:
                    ax.axvline(r["time_to_target_seconds"], color=colors[r["system"]], linestyle=":")
        ax.axhline(report["settings"]["target_loss"], color="gray", linestyle="--", label="target")
        ax.set_title(f"{report['settings']['peers']} peers, {mbit:g} Mbit/s links")
        ax.set_ylim(top=3.1)  # every curve starts at ~5.5 (untrained): cut there, the race is below
        ax.set_xlabel("training seconds (evaluations excluded)")
        ax.set_ylabel("validation loss (nats/byte; thick: mean over peers)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"char-LM, codec {report['settings']['codec']}; {report['date']}", fontsize=9)
    save_figure(fig, path)


def run_setting(mbit: float, repeat: int, args: argparse.Namespace, workdir: Path) -> dict:
    """Both systems, one after the other, over the same links of ``mbit`` Mbit/s and ``--rtt-ms``."""
    results = []
    with EmulatedLinks(args.peers + 1, mbit=mbit, rtt_ms=args.rtt_ms) as links, LocalSwarm() as swarm:
        argv = [sys.executable, "-m", "gossiptrain", "bootstrap", "--host-maddrs", links.maddr(0)]
        _, output = start_in(swarm, links, 0, argv)
        bootstrap = output.wait_for(lambda line: line.startswith("/ip4/"), timeout=60)
        epoch_steps = args.hivemind_epoch_steps
        for system in SYSTEMS:
            work = workdir / f"{system}-{mbit:g}-{repeat}"
            work.mkdir()
            print(f"{mbit:g} Mbit/s, repeat {repeat}: {system} for {args.duration:g} s", flush=True)
            if system == "hivemind" and epoch_steps is None:
                results.append({"system": system, "error": "gossiptrain failed: pass --hivemind-epoch-steps"})
                continue
            try:
                run = run_system(system, links, bootstrap, work, args, epoch_steps)
                summary = summarize(system, run, args.target_loss)
            except RuntimeError as e:  # a swarm that fails is a result too; the run goes on
                print(f"  failed: {e}", flush=True)
                results.append({"system": system, "error": str(e)})
                continue
            results.append(summary)
            if system == "gossiptrain" and epoch_steps is None:
                epoch_steps = summary["steps_per_averaged_round"]
            reached = summary["time_to_target_seconds"]
            print(
                f"  {'not reached' if reached is None else f'{reached:.1f} s'} to the target, "
                f"last loss {summary['curve'][-1][1]:.4f}, {summary['link_mb_per_peer']:.1f} MB per peer",
                flush=True,
            )
    compare(results)
    return {
        "mbit": mbit,
        "rtt_ms": args.rtt_ms,
        "repeat": repeat,
        "hivemind_epoch_steps": epoch_steps,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbit", type=float, nargs="+", default=[50.0, 10.0], help="link bandwidths, one run each")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time of every link (ms)")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of training per swarm")
    parser.add_argument("--target-loss", type=float, default=2.6, help="validation loss to reach")
    parser.add_argument("--codec", default="int8", help="gossiptrain's codec")
    parser.add_argument("--average-every", type=float, default=2.0, help="gossiptrain's seconds between rounds")
    parser.add_argument(
        "--hivemind-epoch-steps",
        type=float,
        default=None,
        help="local steps per peer per hivemind epoch (default: gossiptrain's steps per averaged round)",
    )
    parser.add_argument("--matchmaking-time", type=float, default=3.0, help="hivemind's matchmaking_time")
    parser.add_argument("--averaging-timeout", type=float, default=30.0, help="hivemind's averaging_timeout")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=float, default=15.0, help="seconds of training between evaluations")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.json and OUT.png")
    parser.add_argument("--hivemind-worker", action="store_true", help=argparse.SUPPRESS)
    for worker_arg in ("--run-id", "--host-maddr", "--initial-peer", "--metrics-file", "--go-file"):
        parser.add_argument(worker_arg, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--target-batch-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hivemind_worker:
        return hivemind_worker(args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed benchmark still stops its peers

    report = report_header("time_to_loss", args, WORKER_ONLY)
    report["runs"] = []
    started = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="gossiptrain-ttl-") as workdir:
            for repeat in range(args.repeats):
                for mbit in args.mbit:
                    report["runs"].append(run_setting(mbit, repeat, args, Path(workdir)))
                    write_report(report, args.out.with_suffix(".json"))  # so far
    except EmulationUnavailable as e:
        print(f"skipped: cannot emulate bandwidth-limited links on this machine: {e}")
        return
    report.update(total_seconds=time.monotonic() - started, load_average_at_end=list(os.getloadavg()))
    print(table(report))
    write_report(report, args.out.with_suffix(".json"))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
