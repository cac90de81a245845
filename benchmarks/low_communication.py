"""Low communication (issue 16): six ways to train the char-LM with 4 peers over slow links, to one target loss.

Every system trains ``charlm_task()`` (same model, same initial parameters; peer ``i`` = 1..``--peers``
draws its batches from seed ``i``; batch ``--batch-size`` per peer; Adam, lr ``--lr``, as the inner
optimizer; one torch thread per process) for ``--duration`` seconds of wall clock, and evaluates with
``PeriodicEvaluation`` every ``--eval-every`` seconds of training and once more at the end.  Time is
training time (wall time since the peer started training minus its own evaluations, as in
``time_to_loss.py``).  Each run gets a fresh ``EmulatedLinks``: a namespace per peer behind a link of
``--mbit`` Mbit/s per direction and ``--rtt-ms`` of round-trip time, plus namespace 0 for the bootstrap node
or the ``torch.distributed`` store.  The emulator's switch is a process of this machine too: it takes CPU
from the same 2 cores in proportion to the packets moved (none for solo).  The systems:

1. ``solo``: ``--peers`` independent trainers at once (so each gets the CPU share of one swarm peer),
   no communication.  The target loss is their mean loss at the end of the budget (``--target-loss``
   fixes it instead); it is written in the JSON before the other systems of the setting run.
2. ``dp``: data parallel, ``torch.distributed`` (gloo) all-reduce of the gradients every step (the
   mean: an effective batch of peers x batch size).  At 10 Mbit/s it would take hours, so it runs on
   links without a rate limit or delay for as many steps as solo took (``--dp-steps``), once per repeat below
   ``--baseline-repeats``, and every link setting's numbers are PROJECTED (``projected: true``): a step
   takes its measured compute (the step's time outside the all-reduce) plus the bytes it sends per
   direction (link counters) / the link rate, plus (W - 1) x rtt for a ring's 2 (W - 1) one-way hops;
   the loss per step and the bytes per step are measured.
3. ``diloco``: synchronous DiLoCo, OpenDiLoCo's algorithm: every ``--inner-steps`` H inner steps each
   rank computes its pseudo-gradient ``anchor - params``, gloo ``all_reduce``s it in float32 (no codec)
   and divides by W, sets it as the anchor's ``.grad``, takes an outer
   ``SGD(--outer-lr, --outer-momentum, nesterov=momentum > 0)`` step on the anchor, and sets the
   parameters to the anchor; the inner Adam keeps its state.  Measured for real over the shaped links
   (each round blocks every rank until the slowest has sent its pseudo-gradient).
4. ``hivemind``: ``hivemind.Optimizer`` as in ``time_to_loss.py`` (``use_local_updates=True``,
   ``Float16Compression``, groups of all peers, ``--matchmaking-time`` 3 s); an epoch is
   ``--hivemind-epoch-steps`` local steps per peer (default H, so that it averages as often as
   DiLoCo and the outer mode): ``target_batch_size = peers x batch size x epoch steps``.
5. ``gossip``: ``gossiptrain peer`` in today's parameter-gossip mode, ``--gossip-codec`` (int8) every
   ``--gossip-average-every`` (2) seconds, as in ``time_to_loss.py``.
6. ``outer``: ``gossiptrain peer`` in outer mode, with this benchmark's ``--outer-codec`` (int8),
   ``--outer-lr`` and ``--outer-momentum`` (the same as diloco's), and ``--average-every`` S, the slot
   length: ``--outer-average-every``, by default the wall time (evaluations included) that solo took
   for H = ``--inner-steps`` steps in the same setting and repeat.  Peers average in every slot, so H
   is the steps a slot holds (each pseudo-gradient is weighted by its samples); a minimum of H steps
   (the CLI's ``--inner-steps``) is not passed: with slots, a peer a little slower than solo would
   then skip every other slot.  ``--outer-peer-args`` adds any other flags.

Reported per link setting and system (medians over repeats, min/max in ``summary_spread``):

- ``seconds_to_target``: when the mean over peers of their k-th evaluations first reaches the target
  (linear between evaluations); null if it never does.
- ``bytes_per_peer_to_target``: bytes through a peer's link, both directions (payloads, DHT, TCP/IP
  headers, state download at start), from just before the peers start until their training time
  reached ``seconds_to_target``: the parent samples ``EmulatedLinks.bytes_moved`` every second and
  interpolates; a peer's training time is mapped to wall time through its evaluation records.
- ``final_loss``: the mean over peers of their own model's loss at the end of the budget (the CLI's
  ``loss_before_finish``; gossiptrain's loss after ``finish()`` is in the raw records).
- ``final_loss_equal_tokens``: each system's loss (its loss-vs-steps curve, linear) at the step count
  that every system of the setting reached: the minimum over systems and repeats of steps per peer
  (dp's measured steps, not its projected ones: the comparison is of loss per token).
- ``compute_utilization``: steps/s per peer over solo's steps/s per peer in the same setting and repeat.

With ``--slow-peer-cpu F`` (issue 28's slow machine) the last peer of every system runs in a cgroup (v1 ``cpu``)
capped at F of one core, its libp2p daemon too: a machine that steps several times slower than the others.  Then also
``fast_compute_utilization`` (the other peers' steps/s over solo's other trainers', whose last trainer is capped
alike), ``fast_final_loss`` (their mean final loss) and ``slow_pace`` (the capped peer's steps/s over theirs);
compare them with a run of ``--peers`` one fewer, the same swarm without that peer.

The target, solo's steps/s and budget are per setting and repeat; repeats are interleaved (repeat r
runs every setting and every system in order, then r + 1).  The machine's other load shifts every
system: compare rows of one run.

    python benchmarks/low_communication.py             # 10 and 50 Mbit/s, 50 ms RTT, 6 systems, 3 repeats (~55 min)
    python benchmarks/low_communication.py --quick               # smoke run: 20 s, 50 Mbit/s, 1 repeat
    python benchmarks/low_communication.py --systems solo,outer --mbit 10 --outer-lr 1.0 --outer-momentum 0
    python benchmarks/low_communication.py --systems solo,gossip,outer --mbit 50 --repeats 1 --slow-peer-cpu 0.18

Needs root (or CAP_NET_ADMIN) for the namespaces; without, it says why and stops.  Writes
``benchmarks/results/low_communication.json`` (``summary``: the medians; ``summary_spread``: min/max and how
many runs reached the target; ``per_run``: every run's numbers; ``results``: every run's curves, link counter
samples and final records; ``targets``: the target per mbit/rtt/repeat) and ``.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from harness import figure, fmt, report_header, save_figure, write_report
from time_to_loss import hivemind_worker, start_in, time_to

from gossiptrain.demo import read_records
from gossiptrain.metrics import PeriodicEvaluation
from gossiptrain.netns import EmulatedLinks, EmulationUnavailable
from gossiptrain.rounds import AVERAGED
from gossiptrain.testing import LocalSwarm

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "low_communication"
SYSTEMS = ("solo", "dp", "diloco", "hivemind", "gossip", "outer")
TORCH_ONLY = ("solo", "dp", "diloco")  # this script's own workers
METRICS = (
    "bytes_per_peer_to_target",
    "seconds_to_target",
    "final_loss",
    "final_loss_equal_tokens",
    "compute_utilization",
    "fast_compute_utilization",
    "fast_final_loss",
    "slow_pace",
)
UNSHAPED_MBIT = math.inf  # dp's unshaped links: EmulatedLinks without a rate limit
STORE_PORT = 29500  # the torch.distributed store in namespace 0 (fresh namespaces: no other listener)
SAMPLE_EVERY = 1.0  # seconds between samples of the link counters
CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu controller (--slow-peer-cpu)
FULL = {"duration": 90.0, "repeats": 3, "mbit": [10.0, 50.0], "eval_every": 5.0, "inner_steps": 50}
QUICK = {"duration": 20.0, "repeats": 1, "mbit": [50.0], "eval_every": 2.0, "inner_steps": 10}
WORKER_ONLY = (
    "worker",
    "rank",
    "run_id",
    "seed",
    "host_maddr",
    "initial_peer",
    "master_addr",
    "metrics_file",
    "go_file",
    "target_batch_size",
)


# --- workers (run inside the namespaces) -----------------------------------------------------------------------


def store_worker(args: argparse.Namespace) -> None:
    """The ``torch.distributed`` TCP store of the dp and diloco ranks, on namespace 0's address."""
    import torch.distributed as dist

    _store = dist.TCPStore(args.master_addr, STORE_PORT, is_master=True, wait_for_workers=False)
    print("ready", flush=True)
    while True:  # until LocalSwarm stops it
        time.sleep(3600)


def torch_worker(args: argparse.Namespace) -> None:
    """One peer of ``solo``, ``dp`` or ``diloco``: the CLI peer's training loop and evaluation, torch only.

    dp and diloco decide together when to stop: every all-reduce carries one more value, 1 from a rank
    past its deadline, so that all ranks leave after the same collective and none waits for a partner
    that has gone.  A diloco rank past its deadline joins the next round at once, with fewer inner steps.
    """
    import datetime

    import torch
    import torch.distributed as dist

    from gossiptrain.tasks import charlm_task

    torch.set_num_threads(1)
    task = charlm_task()
    params = list(task.model.parameters())
    sizes = [p.numel() for p in params]
    inner = torch.optim.Adam(params, lr=args.lr)
    world = args.peers
    if args.worker != "solo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")  # the namespace's link, not loopback
        timeout = datetime.timedelta(seconds=300)
        store = dist.TCPStore(args.master_addr, STORE_PORT, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=args.rank, world_size=world, timeout=timeout)
    if args.worker == "diloco":
        anchor = [p.detach().clone().requires_grad_(True) for p in params]
        momentum = args.outer_momentum
        outer = torch.optim.SGD(anchor, lr=args.outer_lr, momentum=momentum, nesterov=momentum > 0)
    print("ready", flush=True)
    while not Path(args.go_file).exists():  # the benchmark starts every peer at once
        time.sleep(0.05)

    def all_reduce_mean(values: list[torch.Tensor], stop: bool) -> tuple[list[torch.Tensor], bool]:
        flat = torch.cat([*(v.reshape(-1) for v in values), torch.tensor([float(stop)])])
        dist.all_reduce(flat)  # sum
        return [g.view_as(v) for g, v in zip((flat[:-1] / world).split(sizes), values)], flat[-1].item() > 0

    with open(args.metrics_file, "a") as metrics:
        metrics.write(json.dumps({"event": "joined", "time": time.time(), "step": 0}) + "\n")
        batches = task.batches(args.seed, args.batch_size)
        evaluation = PeriodicEvaluation(lambda: task.evaluate(task.model), args.eval_every, metrics)
        step, rounds, since_round, comm_seconds, stop = 0, 0, 0, 0.0, False
        deadline = time.monotonic() + args.duration
        while not stop:
            evaluation.maybe_evaluate(step)
            batch = next(batches)
            if args.worker == "dp":
                loss = task.loss(task.model, batch)
                inner.zero_grad()
                loss.backward()
                began = time.monotonic()
                done = step + 1 >= args.dp_steps if args.dp_steps else time.monotonic() >= deadline
                grads, stop = all_reduce_mean([p.grad for p in params], done)
                comm_seconds += time.monotonic() - began
                for p, g in zip(params, grads):
                    p.grad.copy_(g)
                inner.step()
            else:
                task.train_step(inner, batch)
            step, since_round = step + 1, since_round + 1
            past_deadline = time.monotonic() >= deadline
            if args.worker == "solo":
                stop = past_deadline
            elif args.worker == "diloco" and (since_round >= args.inner_steps or past_deadline):
                began = time.monotonic()
                with torch.no_grad():
                    pseudo, stop = all_reduce_mean([a - p for a, p in zip(anchor, params)], past_deadline)
                    for a, g in zip(anchor, pseudo):
                        a.grad = g
                    outer.step()
                    for p, a in zip(params, anchor):
                        p.copy_(a)
                comm_seconds += time.monotonic() - began
                rounds, since_round = rounds + 1, 0
        final = {"final": True, "step": step, "train_seconds": evaluation.train_seconds()}
        final.update(comm_seconds=comm_seconds, rounds=rounds, numel=sum(sizes), **task.evaluate(task.model))
        metrics.write(json.dumps(final) + "\n")
    if args.worker != "solo":
        dist.destroy_process_group()


# --- one swarm ---------------------------------------------------------------------------------------------------


def emulated_links(args: argparse.Namespace, mbit: float, rtt_ms: float) -> EmulatedLinks:
    """Fresh links for one run: a namespace per peer and namespace 0 (bootstrap node or store)."""
    return EmulatedLinks(args.peers + 1, mbit=mbit, **({"rtt_ms": rtt_ms} if rtt_ms > 0 else {}))


def peer_argv(system: str, i: int, links: EmulatedLinks, entry: str, work: Path, args: argparse.Namespace) -> list:
    """The command line of peer ``i`` (namespace ``i``, data seed ``i``) of ``system``; ``entry``: the
    bootstrap node's multiaddr for the libp2p systems."""
    common = ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--eval-every", str(args.eval_every)]
    common += ["--duration", str(args.duration), "--metrics-file", str(work / f"peer{i}.jsonl"), "--seed", str(i)]
    if system in ("gossip", "outer"):
        argv = [sys.executable, "-m", "gossiptrain", "peer", "--example", "charlm", "--run-id", f"lc-{work.name}"]
        argv += ["--host-maddrs", links.maddr(i), "--initial-peers", entry, "--threads", "1"]
        # --finish-timeout bounds --wait-for-peers too: a capped peer (--slow-peer-cpu) takes a minute to start
        finish = "10" if args.slow_peer_cpu is None else "90"
        argv += ["--group-size", str(args.peers), "--wait-for-peers", str(args.peers), "--finish-timeout", finish]
        argv += ["--no-load-state"]  # every system starts from the same seeded model: no joiner's download
        if system == "gossip":
            argv += ["--codec", args.gossip_codec, "--average-every", str(args.gossip_average_every)]
        else:
            argv += ["--codec", args.outer_codec, "--outer-lr", str(args.outer_lr)]
            argv += ["--outer-momentum", str(args.outer_momentum)]
            argv += ["--average-every", f"{args.outer_average_every_now:.2f}", *shlex.split(args.outer_peer_args)]
        return [*argv, *common]
    argv = [sys.executable, __file__, "--worker", system, "--peers", str(args.peers), "--go-file", str(work / "go")]
    if system == "hivemind":
        argv += ["--run-id", f"lc-{work.name}", "--host-maddr", links.maddr(i), "--initial-peer", entry]
        argv += ["--target-batch-size", str(args.peers * args.batch_size * args.hivemind_epoch_steps)]
        argv += ["--matchmaking-time", str(args.matchmaking_time), "--averaging-timeout", str(args.averaging_timeout)]
    else:
        argv += ["--rank", str(i - 1), "--master-addr", links.address(0), "--inner-steps", str(args.inner_steps)]
        argv += ["--outer-lr", str(args.outer_lr), "--outer-momentum", str(args.outer_momentum)]
        argv += ["--dp-steps", str(args.dp_steps_now)]
    return [*argv, *common]


@contextlib.contextmanager
def cpu_quota(fraction: float | None) -> Iterator[list[str]]:
    """A command prefix that runs a process, and every process it starts, within ``fraction`` of one core (a cgroup
    removed on exit); an empty prefix for None.  Raises RuntimeError where cgroup v1's cpu controller is missing."""
    if fraction is None:
        yield []
        return
    group = CPU_CGROUPS / f"gossiptrain-slow-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
        period = int((group / "cpu.cfs_period_us").read_text())
        (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(fraction * period))))
    except OSError as e:
        raise RuntimeError(f"--slow-peer-cpu needs cgroup v1's cpu controller at {CPU_CGROUPS} (and root): {e}") from e
    try:
        yield ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group)]
    finally:
        for _ in range(50):  # its processes are gone once LocalSwarm has stopped them; the kernel may lag a little
            with contextlib.suppress(OSError):
                group.rmdir()
                break
            time.sleep(0.1)


def run_swarm(system: str, links: EmulatedLinks, work: Path, args: argparse.Namespace) -> dict:
    """Train one swarm of ``system`` over ``links``: its peers' records and their link counters over time."""
    peers = range(1, args.peers + 1)
    samples: dict[int, list[list[float]]] = {i: [] for i in peers}

    def sample() -> None:
        now = time.time()
        for i in peers:
            samples[i].append([now, *links.bytes_moved(i)])

    with cpu_quota(args.slow_peer_cpu) as slow_prefix, LocalSwarm() as swarm:
        entry = ""
        if system in ("hivemind", "gossip", "outer"):
            argv = [sys.executable, "-m", "gossiptrain", "bootstrap", "--host-maddrs", links.maddr(0)]
            entry = start_in(swarm, links, 0, argv)[1].wait_for(lambda line: line.startswith("/ip4/"), timeout=60)
        elif system in ("dp", "diloco"):
            argv = [sys.executable, __file__, "--worker", "store", "--master-addr", links.address(0)]
            start_in(swarm, links, 0, argv)[1].wait_for(lambda line: line == "ready", timeout=60)
        sample()
        processes = [
            start_in(swarm, links, i, peer_argv(system, i, links, entry, work, args), slow_prefix * (i == peers[-1]))
            for i in peers
        ]
        go_time = None
        if system not in ("gossip", "outer"):  # the CLI peers start together with --wait-for-peers
            try:
                for _, output in processes:
                    output.wait_for(lambda line: line == "ready", timeout=180)
            except TimeoutError as e:
                raise RuntimeError(f"{system}: a peer did not get ready: {e}") from None
            sample()
            go_time = time.time()
            (work / "go").touch()
        deadline = time.monotonic() + (3600 if args.dp_steps_now else args.duration) + 180
        next_sample = time.monotonic()
        while any(p.poll() is None for p, _ in processes) and time.monotonic() < deadline:
            if time.monotonic() >= next_sample:
                sample()
                next_sample += SAMPLE_EVERY
            time.sleep(0.1)
        sample()
        unfinished = [i for i, (p, _) in zip(peers, processes) if p.poll() is None]
    records = {i: read_records(work / f"peer{i}.jsonl") for i in peers}
    if any(not any(r.get("final") for r in recs) for recs in records.values()):
        raise RuntimeError(f"{system}: a peer wrote no final record (its output is above)")
    slow = peers[-1] if args.slow_peer_cpu is not None else None
    return {
        "system": system,
        "records": records,
        "samples": samples,
        "go_time": go_time,
        "unfinished": unfinished,
        "slow_peer": slow,
    }


# --- curves ------------------------------------------------------------------------------------------------------


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """The piecewise-linear function through ``points`` (increasing x) at ``x``, constant beyond its ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def wall_at(evals: list[dict], train_seconds: float) -> float:
    """The wall time at which a peer had trained ``train_seconds``: its clock stands still while it evaluates."""
    last = max([e for e in evals if e["train_seconds"] <= train_seconds] or evals[:1], key=lambda e: e["train_seconds"])
    return last["time"] + last["eval_seconds"] + train_seconds - last["train_seconds"]


def peer_curve(records: list[dict], samples: list[list[float]]) -> dict:
    """One peer's evaluations and final loss: training seconds, step, loss, link bytes so far (both directions)."""
    evals = [r for r in records if r.get("event") == "eval"]
    final = next(r for r in records if r.get("final"))
    base = samples[0][1] + samples[0][2]
    link = [(s[0], s[1] + s[2] - base) for s in samples]
    points = [(e["train_seconds"], e["step"], e["loss"], e["time"]) for e in evals]
    end_loss = final.get("loss_before_finish", final["loss"])
    points.append((final["train_seconds"], final["step"], end_loss, wall_at(evals, final["train_seconds"])))
    return {
        "points": [[t, step, loss, interpolate(link, wall)] for t, step, loss, wall in points],
        "bytes_at": lambda t: interpolate(link, wall_at(evals, t)),
        "final": final,
    }


def system_result(raw: dict) -> dict:
    """A run's curves and rates: the mean over peers of their k-th evaluations (every k all reached), then the end."""
    peers = {i: peer_curve(recs, raw["samples"][i]) for i, recs in raw["records"].items()}
    evals = [p["points"][:-1] for p in peers.values()]
    rows = [[e[k] for e in evals] for k in range(min(map(len, evals)))] + [[p["points"][-1] for p in peers.values()]]
    finals = [p["final"] for p in peers.values()]
    result = {
        "system": raw["system"],
        "curve": [[statistics.fmean(column) for column in zip(*row)] for row in rows],  # seconds, step, loss, bytes
        "curves_per_peer": {i: p["points"] for i, p in peers.items()},
        "steps_per_peer": statistics.fmean(f["step"] for f in finals),
        "steps_per_second_per_peer": statistics.fmean(f["step"] / f["train_seconds"] for f in finals),
        "train_seconds": statistics.fmean(f["train_seconds"] for f in finals),
        "link_bytes_per_peer": statistics.fmean(p["points"][-1][3] for p in peers.values()),
        "finals": finals,
        "unfinished_peers": raw["unfinished"],
        "link_samples": raw["samples"],
    }
    rounds = [[r for r in recs if "round" in r] for recs in raw["records"].values()]
    if any(rounds):  # gossiptrain
        averaged = [sum(r["status"] in AVERAGED for r in peer_rounds) for peer_rounds in rounds]
        result["rounds_averaged_per_peer"] = statistics.fmean(averaged)
        result["steps_per_averaged_round"] = statistics.fmean(f["step"] / max(n, 1) for f, n in zip(finals, averaged))
        result["round_bytes_per_peer"] = statistics.fmean(
            sum(r["bytes_sent"] + r["bytes_received"] for r in peer_rounds) for peer_rounds in rounds
        )
    if raw["system"] in ("dp", "diloco"):
        result["rounds_per_peer"] = statistics.fmean(f["rounds"] for f in finals)
        result["comm_seconds_per_peer"] = statistics.fmean(f["comm_seconds"] for f in finals)
    if raw["system"] == "dp":
        # bytes per step from the counters between the start signal and the end; a step's transfer time
        # is set by the busier direction of the link
        directions = [
            [(s[-1][k] - [x for x in s if x[0] <= raw["go_time"]][-1][k]) / f["step"] for k in (1, 2)]
            for s, f in zip(raw["samples"].values(), finals)
        ]
        result["bytes_per_step"] = statistics.fmean(rx + tx for rx, tx in directions)
        result["bytes_per_step_per_direction"] = statistics.fmean(max(d) for d in directions)
        numel, world = finals[0]["numel"] + 1, len(finals)
        result["ring_bytes_per_step_per_direction"] = 2 * (world - 1) / world * 4 * numel
        result["compute_seconds_per_step"] = statistics.fmean(
            (f["train_seconds"] - f["comm_seconds"]) / f["step"] for f in finals
        )
    if raw["system"] == "hivemind":
        result["epochs_per_peer"] = statistics.fmean(f["epochs"] for f in finals)
    if raw["system"] in ("gossip", "outer"):
        result["loss_after_finish"] = statistics.fmean(f["loss"] for f in finals)
    if (slow := raw.get("slow_peer")) is not None:  # --slow-peer-cpu: the others, and the capped peer's pace
        rates = {i: p["final"]["step"] / p["final"]["train_seconds"] for i, p in peers.items()}
        fast = [i for i in peers if i != slow]
        result["slow_peer"] = slow
        result["fast_steps_per_peer"] = statistics.fmean(peers[i]["final"]["step"] for i in fast)
        result["fast_steps_per_second_per_peer"] = statistics.fmean(rates[i] for i in fast)
        result["fast_final_loss"] = statistics.fmean(peers[i]["points"][-1][2] for i in fast)
        result["slow_pace"] = rates[slow] / result["fast_steps_per_second_per_peer"]
    result["_bytes_at"] = [p["bytes_at"] for p in peers.values()]  # dropped before the JSON
    return result


def dp_step_seconds(dp: dict, mbit: float, rtt_ms: float) -> float:
    """A projected dp step over links of ``mbit`` Mbit/s and ``rtt_ms``: compute + transfer + ring latency."""
    world = len(dp["finals"])
    return (
        dp["compute_seconds_per_step"]
        + dp["bytes_per_step_per_direction"] / (mbit * 1e6 / 8)
        + (world - 1) * rtt_ms / 1000
    )


def projected_curve(dp: dict, mbit: float, rtt_ms: float) -> list[list[float]]:
    """dp's curve with projected training seconds (``step x dp_step_seconds``) and bytes (``step x bytes/step``)."""
    seconds = dp_step_seconds(dp, mbit, rtt_ms)
    return [[step * seconds, step, loss, step * dp["bytes_per_step"]] for _, step, loss, _ in dp["curve"]]


def run_metrics(result: dict, context: dict) -> dict:
    """The summary's numbers of one system's run; ``context``: the setting's target, solo's budget and rates."""
    steps = [(step, loss) for _, step, loss, _ in result["curve"]]
    target, solo_rate = context["target"], context["solo_steps_per_second"]
    if result["system"] == "dp":
        curve = projected_curve(result, context["mbit"], context["rtt_ms"])
        seconds = time_to([(t, loss) for t, _, loss, _ in curve], target) if target is not None else None
        step_seconds = dp_step_seconds(result, context["mbit"], context["rtt_ms"])
        to_target = None if seconds is None else seconds / step_seconds * result["bytes_per_step"]
        budget = context["budget_seconds"]
        final = interpolate(steps, budget / step_seconds) if budget is not None else None
        rate, projected = 1 / step_seconds, True
    else:
        seconds = time_to([(t, loss) for t, _, loss, _ in result["curve"]], target) if target is not None else None
        to_target = None if seconds is None else statistics.fmean(at(seconds) for at in result["_bytes_at"])
        final, rate, projected = result["curve"][-1][2], result["steps_per_second_per_peer"], False
    solo_fast_rate = context.get("solo_fast_steps_per_second")
    fast_rate = result.get("fast_steps_per_second_per_peer")
    return {
        "fast_compute_utilization": fast_rate / solo_fast_rate if fast_rate and solo_fast_rate else None,
        "fast_final_loss": result.get("fast_final_loss"),
        "slow_pace": result.get("slow_pace"),
        "bytes_per_peer_to_target": to_target,
        "seconds_to_target": seconds,
        "final_loss": final,
        "final_loss_equal_tokens": interpolate(steps, context["equal_steps"]),
        "compute_utilization": rate / solo_rate if solo_rate else None,
        "projected": projected,
    }


def summarize(report: dict, results: dict) -> None:
    """Fill ``report``'s ``per_run``, ``summary`` (medians) and ``summary_spread`` (min/max) from ``results``:
    ``(mbit, rtt_ms, repeat) -> {system: system_result}``."""
    settings = sorted({(mbit, rtt) for mbit, rtt, _ in results}, key=lambda s: (-s[0], s[1]))
    dp_runs = {repeat: r["dp"] for (_, _, repeat), r in results.items() if "dp" in r}
    per_run, summary, spread = [], [], []
    for mbit, rtt in settings:
        runs = {
            repeat: {**r, **({"dp": dp_runs[repeat]} if repeat in dp_runs else {})}
            for (m, t, repeat), r in results.items()
            if (m, t) == (mbit, rtt)
        }
        every = [res for r in runs.values() for res in r.values()]
        if not every:
            continue
        equal_steps = min(res["steps_per_peer"] for res in every)
        rows: dict[str, list[dict]] = {}
        for repeat, run in sorted(runs.items()):
            solo = run.get("solo")
            context = {
                "mbit": mbit,
                "rtt_ms": rtt,
                "target": report["targets"].get(f"{mbit:g}/{rtt:g}/{repeat}"),
                "solo_steps_per_second": solo["steps_per_second_per_peer"] if solo else None,
                "solo_fast_steps_per_second": solo.get("fast_steps_per_second_per_peer") if solo else None,
                "budget_seconds": solo["train_seconds"] if solo else None,
                "equal_steps": equal_steps,
            }
            for system in (s for s in SYSTEMS if s in run):
                metrics = {"mbit": mbit, "rtt_ms": rtt, "repeat": repeat, "system": system}
                metrics.update(run_metrics(run[system], context), target_loss=context["target"])
                metrics["equal_steps"] = equal_steps
                per_run.append(metrics)
                rows.setdefault(system, []).append(metrics)
        for system, metrics in rows.items():
            entry, extent = {"mbit": mbit, "rtt_ms": rtt, "system": system}, {"mbit": mbit, "rtt_ms": rtt}
            extent.update(system=system, runs=len(metrics))
            for key in METRICS:
                values = [m[key] for m in metrics]
                entry[key] = _median_none_largest(values)
                known = [v for v in values if v is not None]
                extent[key] = [min(known), max(known)] if known else None
            extent["reached"] = sum(m["seconds_to_target"] is not None for m in metrics)
            entry["projected"] = any(m["projected"] for m in metrics)
            summary.append(entry)
            spread.append(extent)
    report.update(per_run=per_run, summary=summary, summary_spread=spread)


KEY = ("mbit", "rtt_ms", "system")


def _median_none_largest(values: list[float | None]) -> float | None:
    """The median, None (never reached, unknown) counting as larger than any number; None if that is the median.
    Not ``harness.median``, which leaves a None out: here a target most runs never reach has no median."""
    ranked = sorted(math.inf if v is None else v for v in values)
    median = statistics.median(ranked) if ranked else math.inf
    return None if math.isinf(median) or math.isnan(median) else median


# --- reporting ---------------------------------------------------------------------------------------------------


def table(report: dict) -> str:
    header = (
        f"{'Mbit/s':>6} {'rtt ms':>6} {'system':<9} {'to target s':>11} {'MB/peer to tgt':>14} {'final loss':>10} "
        f"{'equal-tok loss':>14} {'util':>5} {'reached':>7}"
    )
    rows = [header, "-" * len(header)]
    for entry, extent in zip(report["summary"], report["summary_spread"]):
        to_bytes = entry["bytes_per_peer_to_target"]
        mark = "*" if entry["projected"] else " "
        rows.append(
            f"{entry['mbit']:>6g} {entry['rtt_ms']:>6g} {entry['system']:<9}"
            f"{fmt(entry['seconds_to_target'], '.1f'):>11}{mark} {fmt(to_bytes and to_bytes / 1e6, '.2f'):>14} "
            f"{fmt(entry['final_loss'], '.4f'):>10} {fmt(entry['final_loss_equal_tokens'], '.4f'):>14} "
            f"{fmt(entry['compute_utilization'], '.2f'):>5} {extent['reached']:>3}/{extent['runs']:<3}"
        )
    for entry in report["summary"]:
        if entry.get("slow_pace") is not None:
            rows.append(
                f"  slow peer ({entry['system']}, {entry['mbit']:g} Mbit/s): its pace {entry['slow_pace']:.2f}x the "
                f"others'; the others' utilization {fmt(entry['fast_compute_utilization'], '.1%')}, final loss "
                f"{entry['fast_final_loss']:.4f}"
            )
    targets = ", ".join(f"{k}: {v:.4f}" for k, v in report["targets"].items() if v is not None)
    rows.append(
        f"medians over repeats (min/max in the JSON's summary_spread); target loss per mbit/rtt/repeat: {targets}; "
        "seconds are training seconds (evaluations excluded); MB/peer: through the peer's link, both directions, "
        "until the target; equal-tok: at the step count every system reached; util: steps/s per peer over "
        "solo's; * projected from dp's bytes and compute per step measured on an unshaped link"
    )
    return "\n".join(rows)


def plot(report: dict, results: dict, path: Path) -> None:
    settings = sorted({(mbit, rtt) for mbit, rtt, _ in results}, key=lambda s: (-s[0], s[1]))
    dp_runs = [r["dp"] for r in results.values() if "dp" in r]
    fig, axes = figure(2, len(settings), figsize=(6 * len(settings), 9), squeeze=False)
    colors = dict(zip(SYSTEMS, ("tab:gray", "black", "tab:green", "tab:orange", "tab:blue", "tab:red")))
    for column, (mbit, rtt) in enumerate(settings):
        by_time, by_bytes = axes[0][column], axes[1][column]
        curves = [
            (system, r["curve"], False)
            for (m, t, _), run in results.items()
            if (m, t) == (mbit, rtt)
            for system, r in run.items()
            if system != "dp"
        ]
        curves += [("dp", projected_curve(dp, mbit, rtt), True) for dp in dp_runs]
        labelled = set()
        for system, curve, projected in curves:
            style = {"color": colors[system], "linestyle": "--" if projected else "-", "linewidth": 1.5}
            label = None if system in labelled else system + (" (projected)" if projected else "")
            labelled.add(system)
            by_time.plot([p[0] for p in curve], [p[2] for p in curve], label=label, **style)
            positive = [(p[3], p[2]) for p in curve if p[3] > 0]
            if positive:
                by_bytes.plot(*zip(*positive), label=label, **style)
        targets = [v for k, v in report["targets"].items() if k.startswith(f"{mbit:g}/{rtt:g}/") and v is not None]
        for ax in (by_time, by_bytes):
            if targets:
                ax.axhline(statistics.median(targets), color="gray", linestyle=":", label="target (solo at the end)")
            ax.set_ylim(top=3.1)  # every curve starts at ~5.5 (untrained): cut there, the race is below
            ax.set_ylabel("validation loss (nats/byte; mean over peers)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        measured = [curve[-1][0] for _, curve, projected in curves if not projected]
        if measured:  # dp's projection runs far past the budget at slow links: show the budget
            by_time.set_xlim(0, 1.05 * max(measured))
        latency = f", rtt {rtt:g} ms" if rtt else ""
        by_time.set_title(f"{report['settings']['peers']} peers, {mbit:g} Mbit/s links{latency}")
        by_time.set_xlabel("training seconds (evaluations excluded)")
        by_bytes.set_xscale("log")
        by_bytes.set_xlabel("bytes per peer through its link (log; solo sends none)")
    fig.suptitle(f"char-LM, low communication; {report['date']}", fontsize=9)
    save_figure(fig, path)


def add_training_bytes(report: dict) -> None:
    """Add ``training_bytes_per_peer_to_target`` to ``per_run`` and (medians) ``summary``: the bytes to the target
    less what a peer's link had carried when its training started (the libp2p systems' start-up: DHT join and the
    joiners' state download, which dp and diloco, started from one seed, never pay).  Reads only the JSON's
    ``per_run`` and ``results`` (each peer's first evaluation, at training second 0, holds its link bytes then)."""
    started = {
        (r["mbit"], r["rtt_ms"], r["repeat"], r["system"]): statistics.fmean(
            c[0][3] for c in r["curves_per_peer"].values()
        )
        for r in report["results"]
        if r["system"] != "dp"
    }
    for run in report["per_run"]:
        total = run["bytes_per_peer_to_target"]
        start = started.get((run["mbit"], run["rtt_ms"], run["repeat"], run["system"]), 0.0)
        run["training_bytes_per_peer_to_target"] = None if total is None else total - start
    for entry in report["summary"]:
        runs = [r for r in report["per_run"] if (r["mbit"], r["rtt_ms"], r["system"]) == tuple(entry[k] for k in KEY)]
        entry["training_bytes_per_peer_to_target"] = _median_none_largest(
            [r["training_bytes_per_peer_to_target"] for r in runs]
        )


def write(report: dict, results: dict, out: Path) -> None:
    summarize(report, results)
    report["results"] = [
        {"mbit": m, "rtt_ms": t, "repeat": rep, "system": s, **{k: v for k, v in r.items() if not k.startswith("_")}}
        for (m, t, rep), run in results.items()
        for s, r in run.items()
    ]
    add_training_bytes(report)
    write_report(report, out.with_suffix(".json"))


# --- the benchmark -----------------------------------------------------------------------------------------------


def outer_mode_available() -> bool:
    done = subprocess.run([sys.executable, "-m", "gossiptrain", "peer", "--help"], capture_output=True, text=True)
    return all(flag in done.stdout for flag in ("--outer-lr", "--outer-momentum", "--inner-steps"))


def run_one(system: str, mbit: float, rtt: float, repeat: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One system over fresh links (dp: unshaped); its result, or ``{"error": ...}`` if its swarm failed."""
    work = workdir / f"{system}-{mbit:g}-{rtt:g}-{repeat}"
    work.mkdir()
    unshaped = system == "dp"
    with emulated_links(args, UNSHAPED_MBIT if unshaped else mbit, 0 if unshaped else rtt) as links:
        return system_result(run_swarm(system, links, work, args))


def run_setting(
    mbit: float, rtt: float, repeat: int, first: bool, args: argparse.Namespace, report: dict, results: dict, work: Path
) -> None:
    """Every system of one repeat over links of ``mbit`` and ``rtt``, in order, into ``results``; dp only in the
    ``first`` setting of a repeat (its links are unlimited, its numbers projected for every setting)."""
    key, run = f"{mbit:g}/{rtt:g}/{repeat}", results.setdefault((mbit, rtt, repeat), {})
    report["targets"][key] = args.target_loss
    for system in args.systems:
        if (system in ("dp", "diloco") and repeat >= args.baseline_repeats) or (system == "dp" and not first):
            continue
        solo = run.get("solo")
        args.dp_steps_now = 0
        if system == "dp":
            steps = math.ceil(solo["steps_per_peer"]) if solo else 0
            args.dp_steps_now = report["dp_steps"][repeat] = steps if args.dp_steps is None else args.dp_steps
        where = "unlimited links" if system == "dp" else f"{mbit:g} Mbit/s, rtt {rtt:g} ms"
        length = f"{args.dp_steps_now} steps" if args.dp_steps_now else f"{args.duration:g} s"
        print(f"repeat {repeat}, {where}: {system} for {length}", flush=True)
        if system == "outer" and not args.outer_available:
            report["errors"].append({"run": key, "system": system, "error": "gossiptrain peer has no --outer-lr"})
            print("  skipped: `gossiptrain peer` has no outer mode (--outer-lr) yet", flush=True)
            continue
        if system == "outer":
            steps = solo.get("fast_steps_per_peer", solo["steps_per_peer"]) if solo else None  # not the slow one's
            rate = steps / args.duration if solo else 3.5  # wall clock, evaluations included
            slot = args.outer_average_every or round(args.inner_steps / rate, 1)
            args.outer_average_every_now = report["outer_average_every"][key] = slot
        try:
            run[system] = result = run_one(system, mbit, rtt, repeat, args, work)
        except (RuntimeError, TimeoutError) as e:  # a swarm that fails is a result too
            print(f"  failed: {e}", flush=True)
            report["errors"].append({"run": key, "system": system, "error": str(e)})
            continue
        if system == "solo" and args.target_loss is None:
            report["targets"][key] = result["curve"][-1][2]
        end = result["curve"][-1]
        print(
            f"  loss {end[2]:.4f} after {end[0]:.1f} s, {result['steps_per_peer']:.0f} steps/peer "
            f"({result['steps_per_second_per_peer']:.2f}/s), {result['link_bytes_per_peer'] / 1e6:.1f} MB/peer",
            flush=True,
        )
        write(report, results, args.out)  # so far (solo's target is in it before the others run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def numbers(text: str) -> list[float]:
        return [float(x) for x in text.split(",") if x.strip()]

    def names(text: str) -> list[str]:
        chosen = [x.strip() for x in text.split(",") if x.strip()]
        if unknown := set(chosen) - set(SYSTEMS):
            raise argparse.ArgumentTypeError(f"unknown systems {sorted(unknown)}; choose from {','.join(SYSTEMS)}")
        return [s for s in SYSTEMS if s in chosen]

    parser.add_argument("--systems", type=names, default=list(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    parser.add_argument("--mbit", type=numbers, default=None, help="link bandwidths, comma-separated (10,50)")
    parser.add_argument("--rtt-ms", type=numbers, default=[50.0], help="round-trip times, comma-separated (50)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of wall clock per swarm (90)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (3)")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="repeats of dp and diloco (1)")
    parser.add_argument(
        "--dp-steps",
        type=int,
        default=None,
        help="steps of dp (default: solo's steps per peer, so that its loss per token covers the others'; "
        "0: the budget)",
    )
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="inner Adam learning rate")
    parser.add_argument("--eval-every", type=float, default=None, help="seconds of training between evaluations (5)")
    parser.add_argument("--target-loss", type=float, default=None, help="fixed target (default: solo's final loss)")
    parser.add_argument("--inner-steps", type=int, default=None, help="H of diloco and outer (50)")
    parser.add_argument("--outer-lr", type=float, default=1.0, help="outer SGD learning rate of diloco and outer")
    parser.add_argument("--outer-momentum", type=float, default=0.0, help="outer SGD momentum (Nesterov if > 0)")
    parser.add_argument("--outer-codec", default="int8", help="the outer mode's codec for pseudo-gradients")
    parser.add_argument(
        "--outer-average-every",
        type=float,
        default=None,
        help="the outer mode's slot seconds (default: the wall time solo took for H steps)",
    )
    parser.add_argument(
        "--outer-peer-args", default="", help='more flags for the outer peers, e.g. "--anchor-sync-every 10"'
    )
    parser.add_argument("--gossip-codec", default="int8", help="parameter gossip's codec")
    parser.add_argument("--gossip-average-every", type=float, default=2.0, help="parameter gossip's slot seconds")
    parser.add_argument("--hivemind-epoch-steps", type=int, default=None, help="local steps per epoch (H)")
    parser.add_argument("--matchmaking-time", type=float, default=3.0, help="hivemind's matchmaking_time")
    parser.add_argument("--averaging-timeout", type=float, default=30.0, help="hivemind's averaging_timeout")
    parser.add_argument(
        "--slow-peer-cpu",
        type=float,
        default=None,
        help="cap the last peer at this fraction of a core (a slow machine)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: " + json.dumps(QUICK))
    parser.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.png")
    parser.add_argument(
        "--resummarize", type=Path, metavar="JSON", help="add what newer versions derive to a saved result, print it"
    )
    parser.add_argument("--worker", choices=[*TORCH_ONLY, "hivemind", "store"], help=argparse.SUPPRESS)
    for worker_arg in ("--run-id", "--host-maddr", "--initial-peer", "--master-addr", "--metrics-file", "--go-file"):
        parser.add_argument(worker_arg, help=argparse.SUPPRESS)
    for worker_arg in ("--seed", "--rank", "--target-batch-size"):
        parser.add_argument(worker_arg, type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker == "store":
        return store_worker(args)
    if args.worker == "hivemind":
        return hivemind_worker(args, evaluate_at_end=True)
    if args.worker:
        return torch_worker(args)

    if args.resummarize:
        report = json.loads(args.resummarize.read_text())
        add_training_bytes(report)
        write_report(report, args.resummarize)
        return print(table(report))
    if args.hivemind_epoch_steps is None:
        args.hivemind_epoch_steps = args.inner_steps
    if args.out is None:
        args.out = DEFAULT_OUT.with_name(DEFAULT_OUT.name + ("-quick" if args.quick else ""))
    if "solo" not in args.systems and args.target_loss is None:
        parser.error("without solo there is no target: pass --target-loss")
    if any(rtt > 0 for rtt in args.rtt_ms) and "rtt_ms" not in inspect.signature(EmulatedLinks).parameters:
        parser.error("this EmulatedLinks cannot add latency (no rtt_ms argument yet): run with --rtt-ms 0")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed benchmark still stops its peers

    report = report_header("low_communication", args, WORKER_ONLY)
    report.update(targets={}, outer_average_every={}, dp_steps={})
    results: dict[tuple[float, float, int], dict] = {}
    report["errors"] = []
    args.outer_available = "outer" not in args.systems or outer_mode_available()
    started = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="gossiptrain-lc-") as workdir:
            for repeat in range(args.repeats):
                for index, (mbit, rtt) in enumerate((m, t) for m in args.mbit for t in args.rtt_ms):
                    run_setting(mbit, rtt, repeat, index == 0, args, report, results, Path(workdir))
    except EmulationUnavailable as e:
        print(f"skipped: cannot emulate bandwidth-limited links on this machine: {e}")
        return
    except KeyboardInterrupt:
        report["interrupted"] = True
        write(report, results, args.out)
        print(f"interrupted; wrote what was measured to {args.out.with_suffix('.json')}")
        sys.exit(130)
    report.update(total_seconds=time.monotonic() - started, load_average_at_end=list(os.getloadavg()))
    write(report, results, args.out)
    print(table(report))
    plot(report, results, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
