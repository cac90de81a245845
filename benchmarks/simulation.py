"""The simulator against live peers, and at the scale no machine of this size can host.

Faithful: for each setting of ``benchmarks/wan.py`` (4 and 8 peers, 50 Mbit/s, RTT 50 and 150 ms, loss 0 and 1%,
10 ms of jitter, 1M values in int8 every 2 s), the same swarm runs live (processes over ``gossiptrain.netns``
links, ``wan.run_setting``) and simulated (``gossiptrain.simulation``, the same peers' code in virtual time over
the modelled links), side by side in one run; the table compares the median round time of averaged rounds and
the share of rounds averaged.  Targets: the simulated p50 within 25% of the live one, the share within 5 points.

Scale: ``gossiptrain simulate`` in a fresh process per size (so that peak memory is its own): 100 and 1000
peers averaging 100k values every 2 s slot for 20 slots at 100 Mbit/s and 50 ms, 5% of them crashing and as many
joining.  Targets: 1000 peers within 10 minutes of wall time, 100 within 1 minute.

    sudo python benchmarks/simulation.py                 # both parts (~25 min: the live runs take most)
    python benchmarks/simulation.py --no-live            # the scale part only (no rights needed)
    sudo python benchmarks/simulation.py --quick         # 4 peers at 50 ms only, 100 peers: a smoke run

Writes ``benchmarks/results/simulation.json`` (``summary``: both parts and whether each target held) and
``simulation.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wan  # noqa: E402
from harness import figure, fmt, report_header, save_figure, write_report  # noqa: E402

from gossiptrain.netns import EmulationUnavailable  # noqa: E402
from gossiptrain.simulation import Scenario, simulate  # noqa: E402

WAN_SETTINGS = {"mbit": 50.0, "jitter_ms": 10.0, "numel": 1_000_000, "codec": "int8", "average_every": 2.0}
SCALE = [(100, 60.0), (1000, 600.0)]  # peers, and the wall time they must finish in


def faithful(peers: int, rtt_ms: float, loss: float, args: argparse.Namespace, live: bool) -> dict:
    """One setting, simulated, and live (if ``live``: measured now, or taken from ``--live-from``)."""
    row = {"peers": peers, "rtt_ms": rtt_ms, "loss": loss}
    scenario = Scenario(
        peers=peers,
        numel=WAN_SETTINGS["numel"],
        rounds=int(args.duration / WAN_SETTINGS["average_every"]),
        mbit=WAN_SETTINGS["mbit"],
        rtt_ms=rtt_ms,
        jitter_ms=WAN_SETTINGS["jitter_ms"],
        loss=loss,
        round_interval=WAN_SETTINGS["average_every"],
        codec=WAN_SETTINGS["codec"],
        seed=peers * 1000 + int(rtt_ms) + int(loss * 100),
    )
    simulated = simulate(scenario).summary
    row["sim_p50_s"], row["sim_averaged"] = simulated["averaged_round_p50_s"], simulated["averaged_share"]
    earlier = args.live_rows.get((peers, rtt_ms, loss))
    if earlier is not None:
        row["live_p50_s"], row["live_averaged"] = earlier["live_p50_s"], earlier["live_averaged"]
    elif live:
        options = argparse.Namespace(
            **WAN_SETTINGS,
            group_size=4,
            duration=args.duration,
            startup=15.0,
            mean_check=wan.DEFAULT_DEFENCES.mean_check,
        )
        measured = wan.summarize(wan.run_setting(peers, rtt_ms, loss, options))
        row["live_p50_s"], row["live_averaged"] = measured["round_p50_s"], measured["averaged_share"]
    if row.get("live_p50_s") is not None:
        row["p50_ratio"] = row["sim_p50_s"] / row["live_p50_s"] if row["live_p50_s"] and row["sim_p50_s"] else None
        row["averaged_points"] = 100 * (row["sim_averaged"] - row["live_averaged"])
    return row


def at_scale(peers: int, limit_s: float) -> dict:
    """``gossiptrain simulate`` with ``peers`` in a process of its own; its summary."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "run.json"
        command = [sys.executable, "-m", "gossiptrain", "simulate", "--peers", str(peers), "--numel", "100000"]
        command += ["--rounds", "20", "--churn", "0.05", "--mbit", "100", "--rtt-ms", "50", "--json", str(out)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=3 * limit_s)
        summary = json.loads(out.read_text())["summary"]
    return {"peers": peers, "limit_s": limit_s, "within_limit": summary["wall_s"] <= limit_s, **summary}


def table(report: dict) -> str:
    lines = ["peers rtt_ms  loss   live_p50  sim_p50  ratio   live_avg  sim_avg  points"]
    for row in report["faithful"]:
        lines.append(
            f"{row['peers']:>5} {row['rtt_ms']:>6g} {row['loss']:>5g} {fmt(row.get('live_p50_s'), '>10.3f')} "
            f"{fmt(row['sim_p50_s'], '>8.3f')} {fmt(row.get('p50_ratio'), '>6.2f')} "
            f"{fmt(row.get('live_averaged'), '>10.1%')} {row['sim_averaged']:>8.1%} "
            f"{fmt(row.get('averaged_points'), '>7.1f')}"
        )
    lines.append("peers  wall_s  s/round  peak_rss_MB  averaged  spread_after  crashed/joined")
    for row in report["scale"]:
        lines.append(
            f"{row['peers']:>5} {row['wall_s']:>7.1f} {row['wall_s_per_round']:>8.2f} {row['peak_rss_mb']:>12} "
            f"{row['averaged_share']:>9.1%} {row['spread_after']:>13.2e}  {row['crashed']}/{row['joined']}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    rows = [row for row in report["faithful"] if row.get("live_p50_s")]
    fig, (left, right) = figure(1, 2, figsize=(11, 3.8))
    labels = [f"{r['peers']}p {r['rtt_ms']:g}ms {r['loss']:g}" for r in rows]
    x = range(len(rows))
    left.bar([i - 0.2 for i in x], [r["live_p50_s"] for r in rows], 0.4, label="live")
    left.bar([i + 0.2 for i in x], [r["sim_p50_s"] for r in rows], 0.4, label="simulated")
    left.set_xticks(list(x), labels, rotation=30, fontsize=8)
    left.set(ylabel="round p50 (s)", title="round time: live vs simulated")
    left.legend()
    scale = report["scale"]
    right.plot([r["peers"] for r in scale], [r["wall_s"] for r in scale], marker="o", label="wall time, 20 slots")
    right.plot([r["peers"] for r in scale], [r["limit_s"] for r in scale], "k--", label="target")
    right.set(xlabel="simulated peers", ylabel="seconds", title="simulator at scale")
    if scale:
        right.set(xscale="log", yscale="log")
    right.legend()
    save_figure(fig, path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-live", action="store_true", help="skip the live runs (they need root for netns)")
    parser.add_argument("--quick", action="store_true", help="one setting and 100 peers: a smoke run")
    parser.add_argument(
        "--live-from",
        type=Path,
        default=None,
        help="take the live rows from this earlier report (live runs do not depend on the simulator's model)",
    )
    parser.add_argument("--no-scale", action="store_true", help="skip the scale part")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of rounds per live setting")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "simulation.json")
    args = parser.parse_args()
    logging.getLogger("gossiptrain").setLevel(logging.ERROR)
    report = report_header("simulation", args)
    args.live_rows, report["live_from"] = {}, None
    if args.live_from is not None:
        earlier = json.loads(args.live_from.read_text())
        args.live_rows = {(r["peers"], r["rtt_ms"], r["loss"]): r for r in earlier["faithful"] if "live_p50_s" in r}
        report["live_from"] = {"file": str(args.live_from), "machine": earlier["machine"], "date": earlier["date"]}
    started = time.monotonic()
    settings = (
        [(4, 50.0, 0.0)] if args.quick else [(p, r, x) for p in (4, 8) for r in (50.0, 150.0) for x in (0.0, 0.01)]
    )
    report["faithful"] = []
    try:
        for peers, rtt_ms, loss in settings:
            print(f"{peers} peers, RTT {rtt_ms:g} ms, loss {loss:g} ...", flush=True)
            report["faithful"].append(faithful(peers, rtt_ms, loss, args, live=not args.no_live))
    except EmulationUnavailable as e:
        parser.exit(1, f"cannot emulate links here ({e}): run with --no-live for the scale part only\n")
    scale = [] if args.no_scale else SCALE[:1] if args.quick else SCALE
    report["scale"] = [at_scale(peers, limit) for peers, limit in scale]
    compared = [row for row in report["faithful"] if row.get("p50_ratio") is not None]
    report["summary"] = {
        "faithful_p50_within_25pct": sum(abs(row["p50_ratio"] - 1) <= 0.25 for row in compared),
        "faithful_averaged_within_5_points": sum(abs(row["averaged_points"]) <= 5 for row in compared),
        "settings_compared": len(compared),
        "scale": {
            row["peers"]: {"wall_s": row["wall_s"], "within_limit": row["within_limit"]} for row in report["scale"]
        },
    }
    report["wall_s"] = time.monotonic() - started
    print(table(report))
    print(json.dumps(report["summary"]))
    write_report(report, args.out)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
