"""Issue 4's benchmark: what each codec costs on the wire and in final loss, on a local swarm.

For every task and codec, the same swarm is trained from scratch: ``--peers`` CLI peers on
127.0.0.1 (one bootstrap node for all runs, a run id of their own per run), peer ``i`` drawing
its batches from seed ``i``, every peer taking the same number of local steps, then finishing
together (``GossipOptimizer.finish``).  Only the codec changes between runs of a task.

From the peers' metrics files and saved models it reports, per codec:

- bytes on the wire per parameter per round: mean over peers and averaged rounds of training of
  ``bytes_sent / num_params`` (``none`` sends float32, ~2 * 4 * (g - 1) / g bytes in a group of g:
  the slices to the shard owners, then the owners' means back); and the same mean over all
  averaged rounds, the finishing ones included (``finish()`` averages the parameters with the
  chain's dense stage, a one-off cost that a short run's few rounds make look large); and for
  sparse chains the expected mean of a long run (``long_run_bytes``: one dense round in ``sync_every``);
- total bytes sent by all peers during the run;
- final validation loss (and accuracy; next-byte accuracy for charlm), mean over peers, and its
  penalty vs ``none`` in %; with ``--repeats``, also the median of the paired penalties (run i of a
  codec against run i of ``none``: the codecs run interleaved, so a change in load hits them alike);
  and each peer's own loss just before ``finish()`` (``pre-fin``), to tell peers that trained badly
  from peers that drifted apart and were averaged at the end;
- spread of the peers' final parameters (``gossiptrain.demo.parameter_spread``), measured after
  the finishing rounds, so it is ~0 unless the last rounds disagreed or changed the values;
- median round time (``round_seconds`` of averaged rounds) and the run's wall time.

Rounds are timed slots (``--average-every``), so the number of rounds, their timing relative to
the local steps, and hence the final loss, vary from run to run even with the same seeds: use
``--repeats`` to see that noise before reading a loss penalty.

Writes ``<out>.json`` (machine, date, command, configuration, every number) and ``<out>.png``
(final validation loss vs total bytes sent, one subplot per task).

    python benchmarks/compression.py                         # every codec, both tasks (~9 min on 2 cores)
    python benchmarks/compression.py --codecs none,int8 --quick
    python benchmarks/compression.py --codecs none,topk:0.01+int8@sync=40   # a sparse chain, sync every 40 rounds
    python benchmarks/compression.py --codecs none,int8 --repeats 3   # run-to-run noise
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from harness import figure, median, run_info, save_figure, write_report

from gossiptrain.demo import parameter_spread, read_records
from gossiptrain.rounds import AVERAGED
from gossiptrain.testing import LocalSwarm
from gossiptrain.wire import SPARSE_SYNC_EVERY

DEFAULT_CODECS = ",".join(
    ["none", "fp16", "int8", "int4", "topk:0.01+int8", "topk:0.01+int8@sync=40", "randomk:0.01+int8"]
    + ["randomk:0.02+int8@sync=40", "lowrank:4+int8"]
)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compression"
# Per task: local steps per peer (full, --quick), batch size, learning rate, seconds between rounds.
# A charlm round (1M parameters) takes ~0.3-0.6 s on 2 loaded cores: 0.5 s slots make many rounds miss their start.
TASK_SETTINGS = {
    "digits": {"steps": 3000, "quick_steps": 500, "batch_size": 32, "lr": 1e-3, "average_every": 0.5},
    "charlm": {"steps": 200, "quick_steps": 60, "batch_size": 16, "lr": 2e-3, "average_every": 1.0},
}


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def average_every(task: str, args: argparse.Namespace) -> float:
    return args.average_every or TASK_SETTINGS[task]["average_every"]


def _error_kind(message: str) -> str:
    """An error line without its peer ids, numbers and reprs, to count errors by kind."""
    message = re.sub(r"12D3KooW\w+", "<peer>", message)
    return re.sub(r"\d+(\.\d+)?", "N", message)[:120]


def run_swarm(
    swarm: LocalSwarm,
    work: Path,
    run_id: str,
    task: str,
    codec: str,
    steps: int,
    args: argparse.Namespace,
) -> tuple[dict[int, list[dict]], list[dict[str, torch.Tensor]], float]:
    """Train one swarm to the end; returns each peer's metrics records, final state_dicts and the wall time."""
    settings = TASK_SETTINGS[task]
    spec, _, sync_every = codec.partition("@sync=")
    started = time.monotonic()
    peers = []
    for i in range(args.peers):
        peer_args = [
            *("--run-id", run_id, "--example", task, "--codec", spec, "--steps", str(steps), "--seed", str(i)),
            *(("--sync-every", sync_every) if sync_every else ()),
            *("--batch-size", str(settings["batch_size"]), "--lr", str(settings["lr"])),
            *("--wait-for-peers", str(args.peers), "--average-every", str(average_every(task, args))),
            *("--metrics-file", str(work / f"peer{i}.jsonl"), "--save-model", str(work / f"peer{i}.pt")),
            *shlex.split(args.peer_args),
        ]
        peers.append(swarm.start_peer(*peer_args))
    deadline, last_report = started + args.timeout, started
    while any(process.poll() is None for process, _ in peers) and time.monotonic() < deadline:
        time.sleep(0.5)
        if time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            steps_done = [
                next((r["step"] for r in reversed(read_records(work / f"peer{i}.jsonl"))), 0) for i in range(args.peers)
            ]
            print(f"  {time.monotonic() - started:5.0f}s  steps per peer: {steps_done}", flush=True)
    wall = time.monotonic() - started
    for process, output in peers:
        if process.poll() is None:
            LocalSwarm.kill(process.pid)
            tail = "\n".join(output.lines[-10:])
            raise RuntimeError(f"a peer of {run_id} was still running after {args.timeout}s; its last lines:\n{tail}")
        if process.returncode != 0:
            tail = "\n".join(output.lines[-10:])
            raise RuntimeError(
                f"a peer of {run_id} exited with {process.returncode} (its stderr is above); its last lines:\n{tail}"
            )
    records = {i: read_records(work / f"peer{i}.jsonl") for i in range(args.peers)}
    models = [torch.load(work / f"peer{i}.pt") for i in range(args.peers)]
    return records, models, wall


def long_run_bytes(training: list[dict], averaged: list[dict], sync_every: int) -> float | None:
    """Bytes sent per round in a run long enough that one round in ``sync_every`` is dense: the
    measured means of the two kinds of rounds, mixed in that ratio.  A short run has 0, 1 or 2 dense
    rounds among its ~30 depending on where the slots fall, which moves its plain mean by ±50%;
    the finishing rounds are dense rounds of the same cost, so they give the dense mean too."""
    delta = [r["bytes_sent"] for r in training if r["mode"] == "delta"]
    if not delta:
        return _mean([r["bytes_sent"] for r in training])
    dense = _mean([r["bytes_sent"] for r in averaged if r["mode"] == "params"])
    return None if dense is None else ((sync_every - 1) * statistics.fmean(delta) + dense) / sync_every


def summarize(
    records: dict[int, list[dict]], models: list[dict[str, torch.Tensor]], wall: float, sync_every: int
) -> dict:
    """The numbers of one run (see the module docstring)."""
    num_params = sum(t.numel() for t in models[0].values() if t.is_floating_point())
    rounds = [r for recs in records.values() for r in recs if "round" in r]
    averaged = [r for r in rounds if r["status"] in AVERAGED]
    finals = [next((r for r in recs if r.get("final")), None) for recs in records.values()]
    if any(f is None for f in finals):
        raise RuntimeError("a peer wrote no final record; see its output above")
    training = [r for r in averaged if r["step"] < max(f["step"] for f in finals)]  # not the finishing rounds
    errors = Counter(_error_kind(e) for r in rounds for e in r.get("errors", []))
    rejected: dict[str, int] = {}
    for recs in records.values():
        last = next((r for r in reversed(recs) if "round" in r), None)
        for kind, count in (last or {}).get("rejected", {}).items():
            rejected[kind] = rejected.get(kind, 0) + count
    summary = {
        "num_params": num_params,
        "bytes_per_param_per_round": _mean([r["bytes_sent"] / num_params for r in averaged]),
        "received_bytes_per_param_per_round": _mean([r["bytes_received"] / num_params for r in averaged]),
        "bytes_per_param_per_training_round": _mean([r["bytes_sent"] / num_params for r in training]),
        "bytes_per_param_per_round_long_run": (long_run_bytes(training, averaged, sync_every) or math.nan) / num_params,
        "total_bytes_sent": sum(r["bytes_sent"] for r in rounds),
        "rounds_averaged_per_peer": len(averaged) / len(records),
        "rounds_partial_per_peer": sum(r["status"] == "partial" for r in rounds) / len(records),
        "rounds_alone_per_peer": sum(r["status"] == "alone" for r in rounds) / len(records),
        "rounds_failed_per_peer": sum(r["status"] == "failed" for r in rounds) / len(records),
        "median_group_size": median([r["group_size"] for r in averaged]),
        "median_round_seconds": median([r["round_seconds"] for r in averaged]),
        "wall_seconds": wall,
        "steps": [f["step"] for f in finals],
        "val_loss": _mean([f["loss"] for f in finals]),
        "val_loss_per_peer": [f["loss"] for f in finals],
        "val_loss_before_finish": _mean([f["loss_before_finish"] for f in finals]),
        "val_loss_before_finish_per_peer": [f["loss_before_finish"] for f in finals],
        "accuracy": _mean([f["accuracy"] for f in finals]) if all("accuracy" in f for f in finals) else None,
        "spread": parameter_spread(models),
        "rejected": rejected,
        "round_errors": sum(errors.values()),
        "round_errors_by_kind": dict(errors.most_common(8)),
    }
    return summary


def merge_repeats(runs: list[dict]) -> dict:
    """One summary of repeated runs: numbers averaged over the runs that worked, each run kept under ``runs``."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"], "runs": runs}
    merged = dict(ok[0])
    for key, value in ok[0].items():
        values = [r[key] for r in ok]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and None not in values:
            merged[key] = statistics.fmean(values)
    merged["val_loss_runs"] = [r["val_loss"] for r in ok]
    merged["val_loss_std"] = statistics.stdev(merged["val_loss_runs"]) if len(ok) > 1 else None
    merged["failed_runs"] = len(runs) - len(ok)
    merged["runs"] = runs
    return merged


def table(results: dict[str, dict[str, dict]]) -> str:
    header = (
        f"{'task':<7} {'codec':<26} {'B/param/rnd':>11} {'long run':>8} {'+finish':>7} {'B/value':>7} {'MiB sent':>9} "
        f"{'rounds':>6} {'val loss':>15} {'pre-fin':>7} "
        f"{'acc':>6} {'penalty':>8} {'paired':>7} {'spread':>8} {'round s':>7} {'wall s':>6}"
    )
    rows = [header, "-" * len(header)]
    for task, by_codec in results.items():
        for codec, s in by_codec.items():
            if "error" in s:
                rows.append(f"{task:<7} {codec:<26} failed: {s['error'].splitlines()[0]}")
                continue
            penalty = "n/a" if s.get("loss_penalty_pct") is None else f"{s['loss_penalty_pct']:+.1f}%"
            paired = s.get("paired_penalty_median_pct")
            paired = "-" if paired is None else f"{paired:+.1f}%"
            acc = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
            training = s["bytes_per_param_per_training_round"]
            per_round = "n/a" if training is None else f"{training:.3f}"
            finishing = "n/a" if s["bytes_per_param_per_round"] is None else f"{s['bytes_per_param_per_round']:.3f}"
            long_run = f"{s['bytes_per_param_per_round_long_run']:.3f}"
            round_s = "n/a" if s["median_round_seconds"] is None else f"{s['median_round_seconds']:.2f}"
            per_value = "n/a" if s.get("bytes_per_value_sent") is None else f"{s['bytes_per_value_sent']:.3f}"
            loss = f"{s['val_loss']:.4f}" + ("" if s.get("val_loss_std") is None else f" ±{s['val_loss_std']:.4f}")
            rows.append(
                f"{task:<7} {codec:<26} {per_round:>11} {long_run:>8} {finishing:>7} {per_value:>7} "
                f"{s['total_bytes_sent'] / 2**20:>9.1f} {s['rounds_averaged_per_peer']:>6.1f} {loss:>15} "
                f"{s['val_loss_before_finish']:>7.4f} {acc:>6} "
                f"{penalty:>8} {paired:>7} {s['spread']:>8.1e} {round_s:>7} {s['wall_seconds']:>6.0f}"
            )
    return "\n".join(rows)


def add_penalties(results: dict[str, dict[str, dict]]) -> None:
    """Loss penalty vs ``none``, and bytes per value sent: the codec's bytes per parameter per training
    round scaled by ``none``'s 4-byte values, i.e. without the all-reduce's ~2(g-1)/g values sent per parameter."""
    for by_codec in results.values():
        baseline = by_codec.get("none", {}).get("val_loss")
        dense = by_codec.get("none", {}).get("bytes_per_param_per_training_round")
        for s in by_codec.values():
            if "val_loss" in s:
                s["loss_penalty_pct"] = None if baseline is None else 100 * (s["val_loss"] / baseline - 1)
                pairs = [
                    100 * (run["val_loss"] / base["val_loss"] - 1)
                    for run, base in zip(s.get("runs", []), by_codec.get("none", {}).get("runs", []))
                    if "error" not in run and "error" not in base
                ]
                s["paired_penalty_pct"] = pairs  # run i against none's run i, run side by side
                s["paired_penalty_median_pct"] = median(pairs)
            if s.get("bytes_per_param_per_training_round") is not None and dense:
                s["bytes_per_value_sent"] = 4 * s["bytes_per_param_per_training_round"] / dense


def plot_title(report: dict) -> str:
    config = report["config"]
    return (
        f"{config['peers']} peers, steps {config['steps']}, average every {config['average_every']} s, "
        f"{config['repeats']} run(s) each{' (quick)' if config['quick'] else ''}; "
        f"{report['machine']['cpu_count']} CPUs; {report['date']}"
    )


def plot(results: dict[str, dict[str, dict]], path: Path, title: str, spread_over: str = "peers") -> None:
    from matplotlib import ticker

    fig, axes = figure(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (task, by_codec) in zip(axes[0], results.items()):
        for codec, s in by_codec.items():
            if "val_loss" not in s:
                continue
            losses = s["val_loss_runs"] if len(s.get("val_loss_runs", [])) > 1 else s["val_loss_per_peer"]
            x = s["total_bytes_sent"] / 2**20
            err = [[s["val_loss"] - min(losses)], [max(losses) - s["val_loss"]]]
            ax.errorbar([x], [s["val_loss"]], yerr=err, fmt="o", capsize=3, label=codec)
            ax.annotate(codec, (x, s["val_loss"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("total MiB sent by all peers (log scale)")
        ax.set_ylabel(f"final validation loss (mean; bars: min-max over {spread_over})")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--codecs",
        default=DEFAULT_CODECS,
        help="comma-separated codec specs; SPEC@sync=N also sets --sync-every N for that run",
    )
    parser.add_argument("--tasks", default="digits,charlm", help="comma-separated example tasks")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="fewer steps per peer (a smoke test, not a result)")
    parser.add_argument("--steps", type=int, default=None, help="local steps per peer for every task")
    parser.add_argument(
        "--average-every", type=float, default=None, help="seconds between averaging rounds (default: per task)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="run every task and codec this many times")
    parser.add_argument("--peer-args", default="", help="extra arguments for every `gossiptrain peer`")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for one swarm's run")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"write OUT.json and OUT.png (default: {DEFAULT_OUT}[-quick])"
    )
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR", help="keep metrics files and models here")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT.with_name(DEFAULT_OUT.name + "-quick") if args.quick else DEFAULT_OUT
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_SETTINGS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}: choose from {sorted(TASK_SETTINGS)}")
    steps = {task: args.steps or TASK_SETTINGS[task]["quick_steps" if args.quick else "steps"] for task in tasks}
    report = {
        "benchmark": "compression",
        **run_info(interpreter_path=True),
        "config": {
            "codecs": codecs,
            "tasks": tasks,
            "peers": args.peers,
            "quick": args.quick,
            "steps": steps,
            "average_every": {task: average_every(task, args) for task in tasks},
            "repeats": args.repeats,
            "peer_args": args.peer_args,
            "task_settings": {task: TASK_SETTINGS[task] for task in tasks},
        },
        "results": {task: {} for task in tasks},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        for task in tasks:
            runs: dict[str, list[dict]] = {codec: [] for codec in codecs}
            for repeat in range(args.repeats):  # codecs interleaved: a change in the machine's load hits them alike
                for codec in codecs:
                    run_id = re.sub(r"[^A-Za-z0-9-]+", "-", f"bench-{os.getpid()}-{task}-{codec}-{repeat}")  # no dots
                    print(
                        f"[{time.monotonic() - started:5.0f}s] {task} / {codec} (run {repeat + 1}/{args.repeats}): "
                        f"{args.peers} peers x {steps[task]} steps",
                        flush=True,
                    )
                    with tempfile.TemporaryDirectory(prefix="gossiptrain-bench-") as workdir:
                        work = Path(workdir) if args.keep is None else args.keep / run_id
                        work.mkdir(parents=True, exist_ok=True)
                        try:
                            records, models, wall = run_swarm(swarm, work, run_id, task, codec, steps[task], args)
                            sync_every = int(codec.partition("@sync=")[2] or SPARSE_SYNC_EVERY)
                            runs[codec].append(summarize(records, models, wall, sync_every))
                        except (RuntimeError, OSError, ValueError) as e:
                            print(f"  failed: {e}", flush=True)
                            runs[codec].append({"error": str(e)})
                    report["results"][task][codec] = runs[codec][0] if args.repeats == 1 else merge_repeats(runs[codec])
                    add_penalties(report["results"])
                    write_report(report, args.out.with_suffix(".json"))
    report["total_seconds"] = time.monotonic() - started
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    write_report(report, args.out.with_suffix(".json"))
    print()
    print(table(report["results"]))
    plot(report["results"], args.out.with_suffix(".png"), plot_title(report), "runs" if args.repeats > 1 else "peers")
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
