"""Outer-optimizer settings for DiLoCo-style training of the char LM: a single-process simulation of W workers.

Every worker ``i`` starts from the task's initial model, draws batches of ``--batch-size`` from seed ``i`` and
takes ``--steps`` inner steps of its own ``torch.optim.Adam`` (lr ``--lr``; its state is kept across rounds).
Every ``H`` inner steps a round runs, as in DiLoCo (Douillard et al., 2023, arXiv:2311.08105):

1. each worker's pseudo-gradient ``g_i = anchor - theta_i`` (the anchor: the parameters at the last round);
2. with a lossy codec, each worker sends ``C(g_i + e_i)`` in parts of ``PART_NUMEL`` values and keeps the
   error-feedback residual ``e_i = g_i + e_i - C(g_i + e_i)``, as ``RoundExchange.payloads`` does; the mean of
   the decoded contributions (equal weights) is encoded once more with ``codec.for_mean`` and decoded, as a
   shard owner does before replying (a top-k mean is re-sparsified to the codec's fraction, and where the
   returned mean is zero every worker puts what it sent there back into its residual);
3. the anchor's ``.grad`` is set to that mean and ``torch.optim.SGD(lr=outer_lr, momentum=m, nesterov=m > 0)``
   steps; every worker's parameters become the anchor.  ``lr=1, m=0`` is plain periodic parameter averaging.

``delay<D>`` models an asynchronous system that overlaps the round with training: the pseudo-gradient of the
round at step ``kH`` is applied at step ``kH + D``, and each worker keeps the ``D`` inner steps it took since:
``theta_i <- anchor_new + (theta_i(kH + D) - theta_i(kH))``.  The next pseudo-gradient is taken against
``anchor_new``.  At the end a pending update is applied with no further steps.

Configs (``--configs``, comma-separated): ``solo`` (one worker, no rounds); ``lr<L>-m<M>-H<H>``; any of those
followed by ``/<codec spec>`` (``gossiptrain.codecs.get_codec``, e.g. ``/int8``, ``/topk:0.01+int8``) and/or
``/delay<D>``; ``best/...`` stands for the config with the lowest final loss among the multi-worker,
uncompressed, undelayed configs run before it in this sweep.

Reported per config: final validation loss (``task.evaluate`` of the anchor after the last round; along the
way, of the mean of the workers' parameters every ``--eval-every`` steps); bytes per parameter per inner
step that one worker uploads: the payload of one pseudo-gradient / numel / H (float32: 4 / H).  A
sharded all-reduce of W peers sends ~2 (W - 1) / W times that per peer (slices out, the owned mean back).

One run per config, with the same seeds: differences of a few 0.01 nats are within run-to-run noise.

    python benchmarks/outer_settings.py                              # the default sweep (~23 min on one thread)
    python benchmarks/outer_settings.py --steps 100 --configs solo,lr1-m0-H25,best/int8,best/delay5
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from harness import figure, load_vector, report_header, save_figure, write_report
from torch.nn.utils import parameters_to_vector

from gossiptrain.codecs import Codec, get_codec
from gossiptrain.exchange import PART_NUMEL
from gossiptrain.tasks import Task, charlm_task

logger = logging.getLogger("outer_settings")

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "outer_settings"
DEFAULT_CONFIGS = ",".join(
    ["solo", "lr1-m0-H25", "lr1-m0-H50", "lr1-m0-H100", "lr0.7-m0.9-H50", "lr1-m0.5-H50", "lr0.8-m0.6-H50"]
    + ["best/int8", "best/int4", "best/delay5"]
)
_BASE = re.compile(r"lr(?P<lr>[0-9.]+)-m(?P<m>[0-9.]+)-H(?P<H>[0-9]+)")


@dataclass(frozen=True)
class Config:
    name: str
    workers: int
    H: int = 0  # inner steps per round; 0: no rounds (solo)
    outer_lr: float = 1.0
    momentum: float = 0.0
    codec: str = "none"
    delay: int = 0

    @property
    def base(self) -> bool:
        """A multi-worker config without codec or delay: a candidate for ``best``."""
        return self.workers > 1 and self.codec == "none" and self.delay == 0


def parse_config(name: str, workers: int, best: Config | None) -> Config:
    """``solo``, ``lr<L>-m<M>-H<H>`` or ``best``, then ``/<codec>`` and ``/delay<D>`` modifiers (module docstring)."""
    head, *modifiers = name.split("/")
    if head == "solo":
        if modifiers:
            raise ValueError(f"{name!r}: solo takes no modifiers (it never communicates)")
        return Config(name, 1)
    if head == "best":
        if best is None:
            raise ValueError(f"{name!r}: no multi-worker config without codec or delay ran before it to be 'best'")
        config = replace(best, name=name)
    elif match := _BASE.fullmatch(head):
        lr, m, h = float(match["lr"]), float(match["m"]), int(match["H"])
        config = Config(name, workers, h, lr, m)
    else:
        raise ValueError(f"{name!r}: a config is solo, lr<L>-m<M>-H<H> or best, then /<codec> or /delay<D>")
    for modifier in modifiers:
        if match := re.fullmatch(r"delay([0-9]+)", modifier):
            config = replace(config, delay=int(match[1]))
        else:
            get_codec(modifier)  # raises on an unknown spec
            config = replace(config, codec=modifier)
    if config.H <= 0 or config.delay >= config.H:
        raise ValueError(f"{name!r}: needs H > 0 and a delay shorter than H (H={config.H}, delay={config.delay})")
    return config


def _parts(numel: int) -> list[tuple[int, int]]:
    return [(a, min(a + PART_NUMEL, numel)) for a in range(0, numel, PART_NUMEL)]


def _union_fraction(values: torch.Tensor) -> float:
    """As ``gossiptrain.exchange._union_fraction``: the largest share of non-zeros in any part, plus one value."""
    return max((int(torch.count_nonzero(values[a:b])) + 1) / (b - a) for a, b in _parts(values.numel()))


class Compressor:
    """Every worker's uplink with error feedback, then the owner's re-encoded mean, as one round of the exchange."""

    def __init__(self, spec: str, workers: int, numel: int):
        self.codec: Codec = get_codec(spec)
        self.workers, self.numel = workers, numel
        self.residuals = [torch.zeros(numel) for _ in range(workers)]

    def mean(self, pseudo_grads: list[torch.Tensor], round_id: int) -> tuple[torch.Tensor, int]:
        """The mean the workers receive, and the bytes one worker uploaded (mean over workers)."""
        if self.codec.lossless:
            return torch.stack(pseudo_grads).mean(0), 4 * self.numel
        decoded, targets, sent = torch.zeros(self.numel), [], 0
        for g, residual in zip(pseudo_grads, self.residuals):
            target = g + residual
            for a, b in _parts(self.numel):
                payload = self.codec.encode(target[a:b], seed=zlib.crc32(f"{round_id}:{a}".encode()))
                piece = self.codec.decode(payload, b - a)
                residual[a:b] = target[a:b] - piece
                decoded[a:b] += piece
                sent += len(payload)
            targets.append(target)
        decoded /= self.workers
        mean_codec = self.codec.for_mean(self.workers, _union_fraction(decoded))
        returned = torch.cat([mean_codec.decode(mean_codec.encode(decoded[a:b]), b - a) for a, b in _parts(self.numel)])
        if not self.codec.is_dense:  # where the sparse mean is zero nothing was exchanged: send it again later
            dropped = returned == 0
            for target, residual in zip(targets, self.residuals):
                residual[dropped] = target[dropped]
        return returned, sent // self.workers


def _vector(model: torch.nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


def simulate(task: Task, config: Config, args: argparse.Namespace) -> dict:
    """Train one config from the task's initial model; returns its curve and final numbers."""
    started = time.monotonic()
    anchor = copy.deepcopy(task.model)
    numel = sum(p.numel() for p in anchor.parameters())
    models = [copy.deepcopy(task.model) for _ in range(config.workers)]
    inner = [torch.optim.Adam(m.parameters(), lr=args.lr) for m in models]
    batches = [task.batches(i, args.batch_size) for i in range(config.workers)]
    outer = torch.optim.SGD(
        anchor.parameters(), lr=config.outer_lr, momentum=config.momentum, nesterov=config.momentum > 0
    )
    compressor = Compressor(config.codec, config.workers, numel) if config.H else None
    probe = copy.deepcopy(task.model)
    pending: tuple[int, torch.Tensor, list[torch.Tensor]] | None = None  # (due step, mean, thetas at the round)
    curve = [{"step": 0, **task.evaluate(task.model), "train_loss": None}]
    train_losses: list[float] = []
    bytes_per_round: list[int] = []

    def outer_step(mean: torch.Tensor) -> torch.Tensor:
        offset = 0
        for p in anchor.parameters():
            p.grad = mean[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        outer.step()
        return _vector(anchor)

    for step in range(1, args.steps + 1):
        for model, optimizer, stream in zip(models, inner, batches):
            loss = task.loss(model, next(stream))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train_losses.append(loss.item())
        if compressor is not None and step % config.H == 0:
            thetas = [_vector(m) for m in models]
            anchor_vector = _vector(anchor)
            mean, sent = compressor.mean([anchor_vector - theta for theta in thetas], step // config.H)
            bytes_per_round.append(sent)
            if config.delay == 0:
                new = outer_step(mean)
                for model in models:
                    load_vector(model, new)
            else:
                pending = (step + config.delay, mean, thetas)
        if pending is not None and (step == pending[0] or step == args.steps):
            _, mean, thetas = pending
            new = outer_step(mean)
            for model, theta in zip(models, thetas):
                load_vector(model, new + (_vector(model) - theta))
            pending = None
        if step % args.eval_every == 0 or step == args.steps:
            load_vector(probe, torch.stack([_vector(m) for m in models]).mean(0))
            recent = train_losses[-args.eval_every * config.workers :]
            curve.append({"step": step, **task.evaluate(probe), "train_loss": sum(recent) / len(recent)})
            logger.info(
                "  %-22s step %4d  val loss %.4f  train loss %.4f  (%.0fs)",
                config.name,
                step,
                curve[-1]["loss"],
                curve[-1]["train_loss"],
                time.monotonic() - started,
            )
    per_step = sum(bytes_per_round) / len(bytes_per_round) / numel / config.H if bytes_per_round else 0.0
    return {
        "config": config.name,
        **{k: v for k, v in asdict(config).items() if k != "name"},
        "num_params": numel,
        "steps": args.steps,
        "rounds": len(bytes_per_round),
        "val_loss": curve[-1]["loss"],
        "bits_per_byte": curve[-1]["bits_per_byte"],
        "accuracy": curve[-1]["accuracy"],
        "bytes_per_param_per_step": per_step,
        "bytes_per_round_per_worker": (sum(bytes_per_round) / len(bytes_per_round)) if bytes_per_round else 0,
        "wall_seconds": time.monotonic() - started,
        "curve": curve,
    }


def table(rows: list[dict]) -> str:
    header = (
        f"{'config':<24} {'H':>4} {'outer lr':>8} {'mom':>5} {'codec':<15} {'delay':>5} {'val loss':>8} "
        f"{'vs solo':>8} {'B/param/step':>12} {'wall s':>6}"
    )
    solo = next((r["val_loss"] for r in rows if r["config"] == "solo"), None)
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:<24} failed: {r['error']}")
            continue
        multi = r["H"] > 0
        name = r["config"].replace("best", r["best_is"], 1) if "best_is" in r else r["config"]
        vs_solo = "-" if solo is None else f"{r['val_loss'] - solo:+.4f}"
        lines.append(
            f"{name:<24} {r['H'] if multi else '-':>4} {r['outer_lr'] if multi else '-':>8} "
            f"{r['momentum'] if multi else '-':>5} {r['codec'] if multi else '-':<15} "
            f"{r['delay'] if multi else '-':>5} {r['val_loss']:>8.4f} {vs_solo:>8} "
            f"{r['bytes_per_param_per_step']:>12.4f} {r['wall_seconds']:>6.0f}"
        )
    lines.append("val loss: nats per byte after the last round; B/param/step: one worker's upload / numel / H")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    fig, axes = figure(1, 2, figsize=(13, 5))
    for r in rows:
        if "curve" not in r:
            continue
        steps = [p["step"] for p in r["curve"]]
        losses = [p["loss"] for p in r["curve"]]
        name = r["config"].replace("best", r["best_is"], 1) if "best_is" in r else r["config"]
        style = "--" if r["workers"] == 1 else ":" if r["delay"] or r["codec"] != "none" else "-"
        for ax in axes:
            ax.plot(steps, losses, style, marker="o", markersize=3, label=f"{name} ({r['val_loss']:.3f})")
    done = [r for r in rows if "curve" in r]
    if done:
        half = max(1, len(done[0]["curve"]) // 2)
        tail = [p["loss"] for r in done for p in r["curve"][half:]]
        finals = sorted(r["val_loss"] for r in done)
        axes[1].set_xlim(done[0]["curve"][half]["step"], None)  # outliers (e.g. top-k) leave the zoom
        axes[1].set_ylim(min(tail) - 0.02, min(max(tail), finals[len(finals) // 2] + 0.3) + 0.02)
    for ax, what in zip(axes, ["all steps", "second half (zoom)"]):
        ax.set_xlabel("inner steps per worker")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(what, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="inner steps per worker (a multiple of every H)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated configs (module docstring)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="inner Adam learning rate")
    parser.add_argument("--eval-every", type=int, default=50, help="inner steps between validation points")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for i, name in enumerate(names):  # fail before training, not after 20 minutes
        try:
            bases = [parse_config(n, args.workers, None) for n in names[:i] if not n.startswith("best")]
            config = parse_config(name, args.workers, next((c for c in bases if c.base), None))
        except ValueError as e:
            parser.error(str(e))
        if config.H and args.steps % config.H:
            parser.error(f"{name}: --steps {args.steps} is not a multiple of H={config.H}")

    task = charlm_task()
    report = report_header("outer_settings", args)
    report["settings"]["configs"] = names
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for name in names:
        candidates = [r for r in rows if "error" not in r and r["workers"] > 1 and r["codec"] == "none"]
        best_row = min((r for r in candidates if not r["delay"]), key=lambda r: r["val_loss"], default=None)
        best = parse_config(best_row["config"], args.workers, None) if best_row else None
        try:
            config = parse_config(name, args.workers, best)
        except ValueError as e:
            logger.error("%s", e)
            rows.append({"config": name, "error": str(e)})
            continue
        logger.info("[%5.0fs] %s: %s", time.monotonic() - started, name, config)
        rows.append(simulate(task, config, args))
        if name.startswith("best"):
            rows[-1]["best_is"] = best.name
        report.update(summary=rows, total_seconds=time.monotonic() - started)
        write_report(report, args.out.with_suffix(".json"))
    report.update(summary=rows, total_seconds=time.monotonic() - started, load_average_at_end=list(os.getloadavg()))
    write_report(report, args.out.with_suffix(".json"))
    print(table(rows))
    title = (
        f"charlm, {args.workers} workers x {args.steps} inner steps (Adam lr {args.lr}, batch {args.batch_size}); "
        f"{report['date']}"
    )
    plot(rows, args.out.with_suffix(".png"), title)
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
