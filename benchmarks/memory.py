"""Host memory of a peer: peak and steady RSS over model size, for each mode and codec family, and a soak.

Every run is a fresh pair of processes on 127.0.0.1 (``tests/memory_workers.py``, the same code as
``tests/test_memory.py``): a measured peer and its partner, each training a model of
``Linear(2048, 2048)`` layers with SGD (momentum 0.9) and averaging every ``--average-every``
seconds, in parameter gossip (``params``) or the outer mode (``outer``, DiLoCo-style, an outer
Nesterov SGD, one inner step per round) with one codec per family: ``none`` (dense, lossless),
``int8`` (dense, quantized, error feedback) and ``topk:0.01+int8`` (a sparse chain: delta rounds
against a reference, one params round in ten).  ``--serve`` adds, per size, a run in which the
partner joins by downloading the measured peer's state (then averages with it, ``none``).

The measured peer's baseline is its RSS after its first training step, before its first round
(model, gradients, momentum, the codec's own state, torch, hivemind); its peak is the larger of an
RSS sample every 5 ms and the kernel's high-water mark (``VmHWM``, reset at the baseline); the extra
peak is their difference, in bytes and in multiples of the model's fp32 size.  ``end`` is the RSS
when the run ends (steady state after the rounds).  Sizes whose two peers would not fit in the
memory available (``MemAvailable``) are skipped.  The measured process fixes glibc's mmap threshold
(``fix_mmap_threshold``), so that RSS follows live memory.  ``serve_extra_peak_x`` is the extra peak
until the joiner's download was served (alone rounds meanwhile included).

Soak (``--soak [SECONDS]``, 3600 by default): one measured peer and its partner train and average
for that long (``--soak-size``, ``--soak-codec``); RSS is kept every 5 s, and growth is the median
RSS of the last tenth of the run over the median of the tenth that follows the warm-up
(``--warmup`` seconds, 5 min by default): flat means within 5%.

    python benchmarks/memory.py                                   # 10M, 100M, 300M x modes x codecs
    python benchmarks/memory.py --sizes 10M,100M --modes params --codecs none,int8 --serve
    python benchmarks/memory.py --soak                            # one hour (results in memory-soak.json)

Writes ``benchmarks/results/memory.json`` (``--out``; the soak: ``memory-soak.json``) with a
``summary`` (one row per run) and a plot next to it (``.png``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from harness import figure, report_header, save_figure, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.memory_workers

from gossiptrain.rounds import AVERAGED  # noqa: E402
from tests.memory_workers import measure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"1M": 10**6, "10M": 10**7, "25M": 25 * 10**6, "100M": 10**8, "300M": 3 * 10**8}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def fits(numel: int) -> bool:
    """Two peers, each with parameters, gradients, momentum, an outer anchor and its state, and rounds."""
    return 2 * 10 * 4 * numel + 2 * 2**30 < available_bytes()


def row(result: dict, size: str) -> dict:
    mib = 2**20
    return {
        "size": size,
        "numel": result["numel"],
        "mode": result["mode"],
        "codec": result["codec"],
        "serve": result["serve"],
        "model_mib": round(result["model_bytes"] / mib, 1),
        "baseline_mib": round(result["baseline_bytes"] / mib, 1),
        "peak_mib": round(result["peak_bytes"] / mib, 1),
        "extra_peak_mib": round(result["extra_bytes"] / mib, 1),
        "extra_peak_x": round(result["extra_x"], 2),
        "end_mib": round(result["end_bytes"] / mib, 1),
        "steady_extra_x": round((result["end_bytes"] - result["baseline_bytes"]) / result["model_bytes"], 2),
        "rounds_averaged": sum(status in AVERAGED for status in result["statuses"]),
        "statuses": result["statuses"],
        "served": result["served"],
        "serve_extra_peak_x": None
        if result.get("serve_extra_bytes") is None
        else round(result["serve_extra_bytes"] / result["model_bytes"], 2),
        "seconds": round(result["seconds"], 1),
    }


def table(summary: list[dict]) -> str:
    lines = [
        "| size | mode | codec | baseline MiB | extra peak MiB | extra peak x model | steady extra x | rounds |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        codec = s["codec"] + (" (serving state)" if s["serve"] else "")
        lines.append(
            f"| {s['size']} | {s['mode']} | {codec} | {s['baseline_mib']:.0f} | {s['extra_peak_mib']:.0f} "
            f"| {s['extra_peak_x']:.2f} | {s['steady_extra_x']:.2f} | {s['rounds_averaged']} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    fig, ax = figure(figsize=(7, 4.5))
    keys = sorted({(s["mode"], s["codec"], s["serve"]) for s in summary})
    for mode, codec, serve in keys:
        rows = [s for s in summary if (s["mode"], s["codec"], s["serve"]) == (mode, codec, serve)]
        rows = sorted(rows, key=lambda s: s["numel"])
        label = f"{mode} {codec}" + (" serving state" if serve else "")
        ax.plot([s["numel"] for s in rows], [s["extra_peak_x"] for s in rows], marker="o", label=label)
    ax.axhline(1.0, color="grey", linestyle="--", label="target: 1x the fp32 model")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("extra peak RSS / fp32 model size")
    ax.set_title("A peer's extra peak host memory in a round (2 peers)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def soak(args: argparse.Namespace) -> dict:
    numel = SIZES[args.soak_size]
    result = measure(
        numel,
        args.soak_codec,
        rounds=10**9,
        average_every=args.average_every,
        seconds=args.soak,
        keep_every=5.0,
        timeout=args.soak + 60,
    )
    series = result.pop("series")
    start = min(args.warmup, args.soak / 2)
    after = [rss for t, rss in series if t >= start]
    tenth = max(1, len(after) // 10)
    first, last = statistics.median(after[:tenth]), statistics.median(after[-tenth:])
    growth = last / first - 1
    summary = {
        "size": args.soak_size,
        "codec": args.soak_codec,
        "seconds": round(result["seconds"], 1),
        "warmup_s": start,
        "rss_after_warmup_mib": round(first / 2**20, 1),
        "rss_at_end_mib": round(last / 2**20, 1),
        "growth": round(growth, 4),
        "flat_within_5_percent": abs(growth) <= 0.05,
        "rounds_averaged": sum(status in AVERAGED for status in result["statuses"]),
        "rounds": len(result["statuses"]),
        "extra_peak_x": round(result["extra_x"], 2),
    }
    return {"summary": summary, "series": series, "result": result}


def plot_soak(report: dict, path: Path) -> None:
    series = report["series"]
    fig, ax = figure(figsize=(7, 4))
    ax.plot([t / 60 for t, _ in series], [rss / 2**20 for _, rss in series])
    ax.axvline(report["summary"]["warmup_s"] / 60, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    s = report["summary"]
    ax.set_title(f"Soak: {s['size']} {s['codec']}, growth after warm-up {100 * s['growth']:+.1f}%")
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10M,100M,300M")
    parser.add_argument("--modes", default="params,outer")
    parser.add_argument("--codecs", default="none,int8,topk:0.01+int8")
    parser.add_argument("--serve", action="store_true", help="also a run per size that serves its state")
    parser.add_argument("--rounds", type=int, default=2, help="rounds averaged per run")
    parser.add_argument("--average-every", type=float, default=6.0)
    parser.add_argument("--soak", type=float, nargs="?", const=3600.0, default=None, metavar="SECONDS")
    parser.add_argument("--soak-size", default="25M", choices=list(SIZES))
    parser.add_argument("--soak-codec", default="int8")
    parser.add_argument("--warmup", type=float, default=300.0, help="soak: seconds before growth is measured")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    if args.out is not None:  # made now: a soak's hour must not be lost to a missing folder at its end
        args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.soak is not None:
        out = args.out or RESULTS / "memory-soak.json"
        report = {**report_header("memory-soak", args), **soak(args)}
        report["wall_seconds"] = round(time.monotonic() - started, 1)
        write_report(report, out)
        plot_soak(report, out.with_suffix(".png"))
        print(json.dumps(report["summary"], indent=1))
        return
    out = args.out or RESULTS / "memory.json"
    report, summary, results = report_header("memory", args), [], []
    runs = [
        (size, mode, codec, False)
        for size in args.sizes.split(",")
        for mode in args.modes.split(",")
        for codec in args.codecs.split(",")
    ]
    if args.serve:
        runs += [(size, "params", "none", True) for size in args.sizes.split(",")]
    for size, mode, codec, serve in runs:
        numel = SIZES[size]
        if not fits(numel):
            print(f"skipping {size}: two peers need more than the {available_bytes() / 2**30:.1f} GiB available")
            continue
        result = measure(
            numel, codec, outer=mode == "outer", serve=serve, rounds=args.rounds, average_every=args.average_every
        )
        result.pop("series")
        results.append(result)
        summary.append(row(result, size))
        print(table(summary[-1:]).splitlines()[-1], flush=True)
        report.update(summary=summary, results=results, wall_seconds=round(time.monotonic() - started, 1))
        write_report(report, out)  # after every run: a partial result survives
    plot(summary, out.with_suffix(".png"))
    print(table(summary))


if __name__ == "__main__":
    main()
