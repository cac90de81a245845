"""At scale (issue 32): does the outer mode reach data parallel's loss per token with far fewer bytes, 8-64 peers?

``low_communication.py`` compares the systems with 4 live peers for 90 seconds: about three outer rounds.  Here
the same comparisons run over thousands of inner steps per peer and tens of peers, in one process: the round
code runs live in the simulator (``gossiptrain.simulation.SimulatedSwarm``: real ``Peer`` objects on a modelled
network, ``gossiptrain.virtual_time``), each peer's inner steps are computed for real, and they take
``--step-seconds`` of virtual time each (an ``asyncio.sleep``, as ``simulation.py`` does with ``compute_s``).

Every system trains the same task (``--task``; charlm by default, in this file's small configuration, below),
from the same initial parameters, peer ``i`` drawing its batches from seed ``1000 --seed + i`` in every system,
each peer 4 windows a step (digits: 32 samples), with Adam (``fused``; lr 2e-3, digits 1e-3) as the inner optimizer:

1. ``dp``: data parallel, the loss-per-token and bytes reference.  Run through the simulated protocol every step
   it would be far too slow, so it is computed exactly in-process: one model, each step the mean loss of the
   peers' batches (one batch of all of them: equal batches, so the mean of the peers' gradients).  Its bytes are
   counted analytically as a ring all-reduce of float32 gradients, ``2 (N-1)/N x 4 x params`` sent per peer per
   step, and a step takes ``--step-seconds`` (the slowest peer's, with ``--compute-spread``) plus those bytes /
   the link rate plus ``2 (N-1) x rtt/2`` of latency.  Its loss does not depend on the link: trained once per
   peer count.
2. ``diloco``: synchronous DiLoCo, exact in-process (a group of 64 through the round code would be the
   simulator's slowest path and not what DiLoCo does): every H inner steps the peers' pseudo-gradients
   ``anchor - params`` are averaged over all N, one ``OuterStrategy.outer_step`` moves the shared anchor and every
   peer continues from it (the inner Adam keeps its state).  Bytes and time: one ring all-reduce, as ``dp``,
   per outer round; the round waits for the slowest peer.
3. ``outer``: the outer mode on dynamic groups with the library's defaults (``target_group_size=4``) through the
   simulator: each peer's ``OuterStrategy`` makes its round's values (``contribution``) and applies an averaged
   round or one alone (``combine``), as ``gossiptrain.attachment`` does; every ``ANCHOR_SYNC_EVERY``-th slot
   averages the parameters (``--anchor-sync-every``).
4. ``outer-g8``: the same in groups of 8, every round an anchor-sync round (``anchor_sync_every=1``): the best
   measured (results page): groups whose anchors differ move them apart with every pseudo-gradient round, and
   only parameter rounds pull them together.
5. ``noloco``: the outer mode in pairs (``target_group_size=2``), NoLoCo-style.
6. ``gossip``: parameter gossip, ``mode="params"`` rounds in groups of 4 every ``--gossip-every`` steps
   (default H // 4: four times as many rounds as the outer mode).
7. ``solo``: one peer (peer 0) training alone, no communication (its loss is the "alone" target).

Outer optimizer (diloco, outer, noloco): ``SGD(--outer-lr, --outer-momentum, nesterov=momentum > 0)``, by
default lr 1.0 without momentum, the CLI's measured best (``gossiptrain peer --outer-lr 1.0``; DiLoCo's paper
uses 0.7 with Nesterov momentum 0.9: ``--outer-lr 0.7 --outer-momentum 0.9``).  Codec ``--codec`` (none).

In the simulated systems every peer is its own task: H inner steps (instant in virtual time), a sleep of
``H x --step-seconds`` (times its slowness with ``--compute-spread S``: peer ``i``'s steps are
``1 + (S-1) i/(N-1)`` times slower), then ``Peer.average`` in the next slot (``--round-interval``); the round
blocks its inner steps (no overlap, unlike ``GossipOptimizer``: a conservative time for the gossip systems).
A round "averaged" if its status is in ``gossiptrain.rounds.AVERAGED`` (``"partial"`` too).  With ``--churn P``
``round(P N)`` peers crash at evenly spaced steps of the run (each at a different slot of the peer list), and
each is replaced at once by a joiner that downloads a live peer's parameters and outer state
(``gossiptrain.state.download_state``), starts a fresh Adam and a new data seed, and takes the rest of the
crashed peer's steps (the ``dp``/``diloco``/``solo`` rows ignore churn).  Peer defaults otherwise (defences,
timeouts); no ``finish()``: each peer's own model is evaluated.

Reported per system and setting (peers x link), one ``summary`` row each: the final validation loss (mean over
every peer's own model; solo: peer 0) and its ratio to dp's of the same peer count (``vs_dp``: equal tokens, as
every peer takes ``--steps`` steps); bytes sent per peer (the rounds' ``RoundResult.bytes_sent`` summed; dp and
diloco analytic) and ``link_bytes_per_peer`` (everything through the simulated links, DHT and state downloads
included); bytes and virtual seconds per peer to reach dp's final loss and solo's (the first evaluation where
the mean loss is at or below it; None if never); the run's virtual seconds and compute utilization (compute
seconds over virtual seconds, mean over peers); the share of rounds averaged and the group sizes; the real and
CPU seconds the row took.
Evaluations every ``--eval-every`` steps (default H) on the first ``--eval-peers`` peers (each point: their mean
loss, the mean bytes of all peers, the virtual time when the last peer reached that step), and on every peer at
the end.

Task size.  The full matrix (~1.7M peer-steps at 8 and 64 peers: dp and diloco train once per peer count, solo
once, the 3 simulated systems once per link) should fit in about two hours on one core of this 2-core machine, so
at most a few ms per peer-step, rounds included: the default char-LM (1.0M parameters) is several times that, so
this benchmark uses a 135k-parameter char-LM (``d_model`` 64, 4 heads, 2 layers, ``d_ff`` 256, a context of 32
bytes: ``charlm_task``'s options) with batches of 4 windows and fused Adam.  The JSON's ``estimate`` extrapolates
a run's measured CPU time to the whole matrix; the results page has the measured costs.

    python benchmarks/at_scale.py             # the matrix: 8 and 64 peers, 100 and 10 Mbit/s, 100 ms, 3000 steps
    python benchmarks/at_scale.py --churn 0.1 --systems dp,outer --out benchmarks/results/at_scale-churn
    python benchmarks/at_scale.py --compute-spread 4 --systems dp,outer --out benchmarks/results/at_scale-spread
    python benchmarks/at_scale.py --peers 256 --steps 1000 --systems dp,diloco,outer \\
        --out benchmarks/results/at_scale-256
    python benchmarks/at_scale.py --quick     # a smoke run (~1 min): 8 peers, 200 steps, every system
    python benchmarks/at_scale.py --validate  # live low_communication.py outer runs, then the same simulated

(the churn and spread runs' outer rows compare with the matrix's outer rows of the same setting).

Validated against live peers (``--validate``): ``low_communication.py --systems outer`` runs 4 live peers (the
CLI's 1.0M-parameter char-LM, batches of 16, ``int8``, 10 Mbit/s, 50 ms, 90 s, ``--validate-repeats`` repeats;
written to ``<out>-live.json``), then the same 4 peers run here (peer ``i`` draws from seed ``i + 1`` as live peer
``i + 1`` does) for the live runs' median steps per peer, H the steps a live slot held, evaluated as often as the
live peers were (between rounds too; ``--validate-live FILE`` reuses a live result); it reports
whether the simulated loss lies within the live repeats' min-max at each evaluation (``<out>.json``, default
``benchmarks/results/at_scale-validate``).  There the simulated peers run as live ones do (``--slots``): a round
in every slot of the live length, the snapshot at the slot's start, the steps going on during the round at the
live pace and kept; in the matrix a round every H steps blocks them (utilization is then a lower bound).

Writes ``<out>.json`` (machine, date, command, settings, a ``summary`` row per system x setting, the curves) and
``<out>.png`` (loss vs tokens, vs bytes (log), vs virtual time; ``--out``, default
``benchmarks/results/at_scale``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from harness import figure, fmt, inner_steps, load_vector, report_header, save_figure, write_report
from torch.nn.utils import parameters_to_vector

from gossiptrain.codecs import get_codec
from gossiptrain.linkswitch import LinkSpec
from gossiptrain.outer import ANCHOR_SYNC_EVERY, OuterStrategy
from gossiptrain.rounds import AVERAGED
from gossiptrain.simulation import SimulatedSwarm
from gossiptrain.state import StateDownloadError, download_state
from gossiptrain.tasks import TASKS
from gossiptrain.virtual_time import run as run_virtual

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "at_scale"
SYSTEMS = ("dp", "diloco", "outer", "outer-g8", "noloco", "gossip", "solo")
IN_PROCESS = ("dp", "diloco", "solo")  # exact in this process; bytes and time analytic
GROUP_SIZES = {"outer": 4, "outer-g8": 8, "noloco": 2, "gossip": 4}  # the simulated systems' target_group_size
SYNCED = ("outer-g8",)  # outer systems whose every round is an anchor-sync round
FULL = {"peers": "8,64", "steps": 3000, "systems": ",".join(SYSTEMS)}
QUICK = {"peers": "8", "steps": 200, "systems": ",".join(SYSTEMS)}
# Per task: the model's configuration (the task factory's options), batch size, Adam lr, tokens per sample.
TASK_SETTINGS = {
    "charlm": {
        "config": {"context": 32, "d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 256},
        "batch_size": 4,
        "lr": 2e-3,
        "tokens_per_sample": 32,
    },
    "digits": {"config": {}, "batch_size": 32, "lr": 1e-3, "tokens_per_sample": 1},
    # low_communication.py's task: the CLI's default char-LM (1.0M parameters), batches of 16 (--validate)
    "charlm-live": {"config": {}, "batch_size": 16, "lr": 2e-3, "tokens_per_sample": 64},
}
# --validate: low_communication.py's outer mode, live, beside the same peers simulated
VALIDATE = {"peers": 4, "mbit": 10.0, "rtt_ms": 50.0, "codec": "int8", "outer_lr": 1.0, "outer_momentum": 0.0}


def numel_of(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outer_factory(args: argparse.Namespace):
    """The outer optimizer: SGD with ``--outer-lr``, ``--outer-momentum`` (Nesterov's where above 0)."""
    lr, momentum = args.outer_lr, args.outer_momentum
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)


def allreduce_bytes(peers: int, numel: int) -> float:
    """Bytes a peer sends in a ring all-reduce of ``numel`` float32 values among ``peers``."""
    return 2 * (peers - 1) / peers * 4 * numel


def allreduce_seconds(peers: int, numel: int, link: LinkSpec) -> float:
    """A ring all-reduce's time: its bytes over the link, plus ``2 (N-1)`` one-way hops of ``rtt/2``."""
    return allreduce_bytes(peers, numel) * 8 / (link.mbit * 1e6) + 2 * (peers - 1) * link.rtt_ms / 2000


class Setup:
    """What every system of a run shares: the task, its settings, the peers' seeds and the evaluation."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.settings = args, TASK_SETTINGS[args.task]
        self.task = TASKS[args.task.removesuffix("-live")](model_seed=args.seed, **self.settings["config"])
        self.numel = numel_of(self.task.model)
        self.tokens_per_step = self.settings["batch_size"] * self.settings["tokens_per_sample"]

    def peer(self, i: int, seed: int | None = None):
        """Peer ``i``'s model (the shared initialisation), Adam and batches (seed ``1000 --seed + i``; with
        ``--validate`` ``i + 1``, as low_communication.py's peer ``i + 1``)."""
        model = copy.deepcopy(self.task.model)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.settings["lr"], fused=True)
        seed = self.args.first_data_seed + i if seed is None else seed
        batches = self.task.batches(seed, self.settings["batch_size"])
        return model, optimizer, batches

    def loss(self, model: torch.nn.Module) -> float:
        return self.task.evaluate(model)["loss"]

    def evaluates(self, step: int) -> bool:
        return step % self.args.eval_every == 0 or step == self.args.steps


def train_dp(setup: Setup, peers: int) -> dict:
    """Data parallel, exact: one model, each step one batch of every peer's next batch (the mean gradient)."""
    model, optimizer, _ = setup.peer(0)
    batches = [setup.peer(i)[2] for i in range(peers)]
    curve = [(0, setup.loss(model))]
    for step in range(1, setup.args.steps + 1):
        batch = tuple(torch.cat(parts) for parts in zip(*(next(b) for b in batches)))
        inner_steps(setup.task, model, optimizer, iter([batch]), 1)
        if setup.evaluates(step):
            curve.append((step, setup.loss(model)))
    return {"curve": curve, "final_loss": curve[-1][1]}


def train_solo(setup: Setup) -> dict:
    """Peer 0 alone."""
    model, optimizer, batches = setup.peer(0)
    curve = [(0, setup.loss(model))]
    for step in range(1, setup.args.steps + 1):
        inner_steps(setup.task, model, optimizer, batches, 1)
        if setup.evaluates(step):
            curve.append((step, setup.loss(model)))
    return {"curve": curve, "final_loss": curve[-1][1]}


def train_diloco(setup: Setup, peers: int) -> dict:
    """Synchronous DiLoCo, exact: every H steps the mean pseudo-gradient of all peers, one outer step."""
    args = setup.args
    trainers = [setup.peer(i) for i in range(peers)]
    strategy = OuterStrategy(list(trainers[0][0].parameters()), outer_factory(args), get_codec("none"))
    everything = [(0, setup.numel)]
    curve = [(0, setup.loss(trainers[0][0]))]
    for step in range(1, args.steps + 1):
        for model, optimizer, batches in trainers:
            inner_steps(setup.task, model, optimizer, batches, 1)
        synced = step % args.inner_steps == 0 or step == args.steps
        if synced:
            params = torch.stack([parameters_to_vector(m.parameters()).detach() for m, _, _ in trainers]).mean(0)
            strategy.outer_step(strategy.anchor - params, everything)
            for model, _, _ in trainers:
                load_vector(model, strategy.anchor)
        if setup.evaluates(step):
            models = [m for m, _, _ in trainers[: 1 if synced else args.eval_peers]]
            curve.append((step, statistics.fmean(setup.loss(m) for m in models)))
    return {"curve": curve, "final_loss": curve[-1][1]}


def analytic_points(system: str, trained: dict, setup: Setup, peers: int, link: LinkSpec) -> list[dict]:
    """An in-process system's curve with bytes and virtual seconds per peer (see the module docstring)."""
    args, numel = setup.args, setup.numel
    slowest = args.step_seconds * (args.compute_spread if system != "solo" else 1.0)
    points = []
    for step, loss in trained["curve"]:
        if system == "dp":
            count = step
        elif system == "diloco":
            count = step // args.inner_steps + (step == args.steps and step % args.inner_steps != 0)
        else:
            count = 0
        bytes_sent = count * allreduce_bytes(peers, numel) if peers > 1 else 0.0
        seconds = step * slowest + (count * allreduce_seconds(peers, numel, link) if peers > 1 else 0.0)
        points.append({"step": step, "loss": loss, "bytes": bytes_sent, "seconds": seconds})
    return points


def simulate_system(setup: Setup, system: str, peers: int, link: LinkSpec) -> dict:
    """The outer mode, NoLoCo pairs or parameter gossip through the simulator (see the module docstring)."""
    return run_virtual(_simulate(setup, system, peers, link))


async def _simulate(setup: Setup, system: str, peers: int, link: LinkSpec) -> dict:
    args, task = setup.args, setup.task
    outer = system != "gossip"
    every = args.inner_steps if outer else args.gossip_every
    swarm = SimulatedSwarm(
        f"at-scale-{system}",
        seed=args.seed,
        link=link,
        target_group_size=args.group_size.get(system, GROUP_SIZES[system]),
        round_interval=args.round_interval,
    )
    loop = asyncio.get_running_loop()
    trainers = [list(setup.peer(i)) for i in range(peers)]
    sync_every = 1 if system in SYNCED else args.anchor_sync_every
    make_strategy = lambda model: OuterStrategy(  # noqa: E731
        list(model.parameters()), outer_factory(args), get_codec(args.codec), sync_every
    )
    strategies = [make_strategy(model) for model, _, _ in trainers] if outer else None
    names = [f"peer{i}" for i in range(peers)]
    slowness = [1 + (args.compute_spread - 1) * i / max(1, peers - 1) for i in range(peers)]
    rng = random.Random(args.seed)
    crashes = round(args.churn * peers)
    replace_at = {
        slot: (k + 1) * args.steps // (crashes + 1) for k, slot in enumerate(rng.sample(range(peers), crashes))
    }
    sent, statuses, sizes, failed_joins = [0] * peers, Counter(), Counter(), [0]
    records: dict[int, list[tuple[int, float | None, int, float]]] = {}  # step: (peer, loss, bytes, seconds)
    ends = [0.0] * peers

    def state_of(i: int):
        def provide() -> dict:
            state = {"params": parameters_to_vector(trainers[i][0].parameters()).detach().clone()}
            return {**state, "outer": strategies[i].state_dict()} if outer else state

        return provide

    async def replace(i: int, joins: int) -> None:
        """Peer ``i`` crashes; a joiner takes its place, its parameters (and outer state) downloaded."""
        await swarm.crash(names[i])
        names[i] = f"peer{i}.{joins}"
        peer = await swarm.add(names[i])
        model, optimizer, batches = setup.peer(i, seed=10**6 * (joins + 1) + 1000 * args.seed + i)
        try:
            state = await download_state(peer, timeout=30.0)
            if outer:
                strategy = make_strategy(model)
                strategy.load_state_dict(state["outer"])
                load_vector(model, strategy.start_params())
                strategies[i] = strategy
            else:
                load_vector(model, state["params"])
        except StateDownloadError:  # it starts from the initial model, as a joiner with no donor would
            failed_joins[0] += 1
            if outer:
                strategies[i] = make_strategy(model)
        trainers[i] = [model, optimizer, batches]
        await peer.serve_state(state_of(i))

    def record(i: int, done: int) -> None:
        evaluated = i < args.eval_peers or done == args.steps
        loss = setup.loss(trainers[i][0]) if evaluated else None
        records.setdefault(done, []).append((i, loss, sent[i], loop.time() - start))

    def contribution(i: int, snapshot: torch.Tensor, round_id: int) -> tuple:
        """As Attachment: the strategy's contribution (values, residual, mode, codec), or the parameters."""
        if outer:
            made = strategies[i].contribution(snapshot, round_id)
            return made.values, made.residual, made.mode, made.codec
        return snapshot, None, "params", None

    def after_round(i: int, result, snapshot: torch.Tensor, mode: str) -> torch.Tensor:
        """The parameters after a round (as Attachment: the strategy's combine of an averaged round or one alone)."""
        sent[i] += result.bytes_sent
        statuses[result.status] += 1
        sizes[len(result.group) if result.status in AVERAGED else 1] += 1
        if not outer:
            return result.averaged
        applied = result.status in AVERAGED or (result.status == "alone" and strategies[i].steps_alone)
        return strategies[i].combine(result, snapshot, mode) if applied else snapshot

    async def train(i: int, done: int, end: int) -> int:
        """Peer ``i``'s steps from ``done`` to ``end`` in virtual time; evaluations that fall before ``end`` are
        of its own model there.  Returns ``end``."""
        while done < end:
            chunk = min(end, (done // args.eval_every + 1) * args.eval_every) - done
            model, optimizer, batches = trainers[i]
            inner_steps(task, model, optimizer, batches, chunk)
            await asyncio.sleep(chunk * args.step_seconds * slowness[i])
            done += chunk
            if done < end and done % args.eval_every == 0:
                record(i, done)
        return done

    async def take_part(i: int) -> None:
        """Every ``every`` steps a round, which the steps wait for."""
        done, joins = 0, 0
        while done < args.steps:
            done = await train(i, done, min(done + every, args.steps))
            peer, model = swarm.peers[names[i]], trainers[i][0]
            snapshot = parameters_to_vector(model.parameters()).detach()
            round_id = peer.next_round_id()
            values, residual, mode, codec = contribution(i, snapshot, round_id)
            result = await peer.average(values, 1.0, round_id, residual=residual, mode=mode, codec=codec)
            load_vector(model, after_round(i, result, snapshot, mode))
            if done == args.steps or done % args.eval_every == 0:
                record(i, done)
            if i in replace_at and done >= replace_at[i] and done < args.steps:
                del replace_at[i]
                joins += 1
                await replace(i, joins)
        ends[i] = loop.time() - start

    async def take_part_in_slots(i: int) -> None:
        """``--slots``: as a live peer, a round in every slot while the steps go on (snapshot at the slot's
        start less the registration lead; the steps taken during the round are kept)."""
        done = 0

        async def step() -> int:
            after = await train(i, done, done + 1)
            if after < args.steps and after % args.eval_every == 0:
                record(i, after)
            return after

        while done < args.steps:
            peer = swarm.peers[names[i]]
            round_id = peer.next_round_id()
            wake = peer.round_start(round_id) - peer.registration_lead
            while done < args.steps and peer.now() < wake:
                done = await step()
            if done == args.steps:  # the budget ended before the slot: no round
                record(i, done)
                break
            model = trainers[i][0]
            snapshot = parameters_to_vector(model.parameters()).detach().clone()
            values, residual, mode, codec = contribution(i, snapshot, round_id)
            averaging = asyncio.ensure_future(
                peer.average(values, 1.0, round_id, residual=residual, mode=mode, codec=codec)
            )
            while done < args.steps and not averaging.done():
                done = await step()
            moved = parameters_to_vector(model.parameters()).detach() - snapshot
            load_vector(model, after_round(i, await averaging, snapshot, mode) + moved)
            if done == args.steps:
                record(i, done)
        ends[i] = loop.time() - start

    for name in names:
        await swarm.add(name)
    if crashes:
        for i in range(peers):
            await swarm.peers[names[i]].serve_state(state_of(i))
    initial = setup.loss(setup.task.model)
    start = loop.time()
    await asyncio.gather(*((take_part_in_slots if args.slots else take_part)(i) for i in range(peers)))
    link_bytes = sum(swarm.network.bytes_of(name)[0] for name in swarm.network.links)
    await swarm.close()
    points = [{"step": 0, "loss": initial, "bytes": 0.0, "seconds": 0.0}]
    for step in sorted(records):
        rows = records[step]
        losses = [loss for _, loss, _, _ in rows if loss is not None]
        points.append(
            {
                "step": step,
                "loss": statistics.fmean(losses) if losses else math.nan,
                "bytes": statistics.fmean(b for _, _, b, _ in rows),
                "seconds": max(s for _, _, _, s in rows),
            }
        )
    finals = [loss for _, loss, _, _ in records[args.steps]]
    rounds = sum(statuses.values())
    compute = [args.steps * args.step_seconds * s for s in slowness]
    return {
        "points": points,
        "final_loss": statistics.fmean(finals),
        "bytes_per_peer": statistics.fmean(sent),
        "link_bytes_per_peer": link_bytes / peers,
        "virtual_seconds": max(ends),
        "utilization": statistics.fmean(c / e for c, e in zip(compute, ends)),
        "averaged_share": sum(n for s, n in statuses.items() if s in AVERAGED) / max(1, rounds),
        "statuses": dict(statuses),
        "group_sizes": dict(sorted(sizes.items())),
        "rounds_per_peer": rounds / peers,
        "crashed": crashes,
        "joins_failed": failed_joins[0],
    }


def reach(points: list[dict], target: float | None) -> tuple[float | None, float | None]:
    """Bytes and virtual seconds at the first point whose loss is at or below ``target``; None if never."""
    if target is None:
        return None, None
    for point in points:
        if point["loss"] <= target:
            return point["bytes"], point["seconds"]
    return None, None


def summarize(rows: list[dict], setup: Setup) -> None:
    """Fill each row's comparisons with dp and solo of the same setting (peers, link)."""
    for row in rows:
        same = {r["system"]: r for r in rows if (r["peers"], r["mbit"]) == (row["peers"], row["mbit"])}
        dp, solo = same.get("dp"), same.get("solo")
        row["vs_dp"] = row["final_loss"] / dp["final_loss"] if dp else None
        row["bytes_fewer_than_dp"] = (
            dp["bytes_per_peer"] / row["bytes_per_peer"] if dp and row["bytes_per_peer"] else None
        )
        for name, base in (("dp", dp), ("solo", solo)):
            row[f"bytes_to_{name}_loss"], row[f"seconds_to_{name}_loss"] = reach(
                row["points"], base["final_loss"] if base else None
            )
        row["tokens_per_peer"] = setup.args.steps * setup.tokens_per_step


def estimate(rows: list[dict], args: argparse.Namespace) -> dict:
    """CPU seconds per peer-step measured here, per kind of system, and what the full matrix would take (one
    process on one core: CPU seconds are its real seconds on an idle machine)."""
    per = {}
    for kind, systems in (("simulated", tuple(GROUP_SIZES)), ("diloco", ("diloco",)), ("dp", ("dp",))):
        measured = [r["cpu_seconds"] / (r["peers"] * args.steps) for r in rows if r["system"] in systems]
        per[kind] = statistics.fmean(measured) if measured else None
    full_steps = 3000
    peer_steps = {"simulated": len(GROUP_SIZES) * 2 * (8 + 64) * full_steps, "diloco": (8 + 64) * full_steps}
    peer_steps["dp"] = (8 + 64) * full_steps
    known = {k: per[k] * peer_steps[k] for k in peer_steps if per[k] is not None}
    return {
        "seconds_per_peer_step": per,
        "full_matrix_peer_steps": peer_steps,
        "full_matrix_seconds": sum(known.values()) if len(known) == len(peer_steps) else None,
        "note": f"simulated: {', '.join(GROUP_SIZES)} x 2 links; dp, diloco once per peer count; 8 and 64 peers, 3000 "
        "steps; dp batches all peers in one step (cheaper per peer-step than measured where it ran alone)",
    }


def table(rows: list[dict]) -> str:
    lines = [
        f"{'system':<8} {'peers':>5} {'Mbit':>5} {'loss':>7} {'vs dp':>6} {'MB/peer':>9} {'x fewer':>8} "
        f"{'MB to dp':>9} {'s to dp':>8} {'MB to solo':>10} {'s to solo':>9} {'virt s':>8} {'util':>5} "
        f"{'avg':>5} {'real s':>6}"
    ]
    for r in rows:
        mb = lambda v: None if v is None else v / 1e6  # noqa: E731
        lines.append(
            f"{r['system']:<8} {r['peers']:>5} {r['mbit']:>5g} {r['final_loss']:>7.4f} {fmt(r['vs_dp'], '.3f'):>6} "
            f"{mb(r['bytes_per_peer']):>9.2f} {fmt(r['bytes_fewer_than_dp'], '.0f'):>8} "
            f"{fmt(mb(r['bytes_to_dp_loss']), '.2f'):>9} {fmt(r['seconds_to_dp_loss'], '.0f'):>8} "
            f"{fmt(mb(r['bytes_to_solo_loss']), '.2f'):>10} {fmt(r['seconds_to_solo_loss'], '.0f'):>9} "
            f"{r['virtual_seconds']:>8.0f} {fmt(r['utilization'], '.2f'):>5} {fmt(r['averaged_share'], '.2f'):>5} "
            f"{r['wall_seconds']:>6.0f}"
        )
    lines.append(
        "loss: final validation loss, mean over peers (equal tokens); vs dp: its ratio to dp's; MB/peer: bytes sent "
        "per peer; x fewer: dp's bytes over the row's; MB/s to dp, solo: bytes and virtual seconds per peer to reach "
        "their final loss (- never); virt s: virtual wall time; util: compute/virtual time; avg: rounds averaged"
    )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    rows = report["summary"]
    settings = list(dict.fromkeys((r["peers"], r["mbit"]) for r in rows))
    fig, axes = figure(len(settings), 3, figsize=(16, 4 * len(settings)), squeeze=False)
    tokens = report["settings"]["tokens_per_step"]
    for ax_row, (peers, mbit) in zip(axes, settings):
        for r in (r for r in rows if (r["peers"], r["mbit"]) == (peers, mbit)):
            losses = [p["loss"] for p in r["points"]]
            ax_row[0].plot([p["step"] * tokens for p in r["points"]], losses, marker=".", label=r["system"])
            with_bytes = [(p["bytes"], p["loss"]) for p in r["points"] if p["bytes"] > 0]
            if with_bytes:
                ax_row[1].plot(*zip(*with_bytes), marker=".", label=r["system"])
            ax_row[2].plot([p["seconds"] for p in r["points"]], losses, marker=".", label=r["system"])
        for ax, xlabel in zip(ax_row, ("tokens per peer", "bytes sent per peer", "virtual seconds")):
            ax.set(xlabel=xlabel, ylabel="validation loss", title=f"{peers} peers, {mbit:g} Mbit/s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        ax_row[1].set_xscale("log")
    fig.suptitle(
        f"{report['date']}; {report['settings']['task']}, {report['settings']['numel']} parameters", fontsize=9
    )
    save_figure(fig, path)


def interpolate(curve: list[tuple[float, float]], step: float) -> float | None:
    """The loss of a (steps, loss) curve at ``step``, linear between its points; None beyond its ends."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return l0 if s1 == s0 else l0 + (l1 - l0) * (step - s0) / (s1 - s0)
    return None


def validate(args: argparse.Namespace) -> dict:
    """``--validate``: ``low_communication.py``'s outer mode, live (``--validate-repeats`` repeats), then the same
    peers simulated for the live runs' median steps per peer, H the steps a live slot held: is the
    simulated loss curve within the live repeats' spread at each evaluation?"""
    live_out = args.out.with_name(args.out.name + "-live")
    command = [sys.executable, str(Path(__file__).with_name("low_communication.py")), "--systems", "outer"]
    command += ["--peers", str(VALIDATE["peers"]), "--mbit", f"{VALIDATE['mbit']:g}"]
    command += ["--rtt-ms", f"{VALIDATE['rtt_ms']:g}"]
    command += ["--repeats", str(args.validate_repeats), "--outer-codec", VALIDATE["codec"], "--target-loss", "0"]
    command += ["--outer-lr", f"{VALIDATE['outer_lr']:g}", "--outer-momentum", f"{VALIDATE['outer_momentum']:g}"]
    if args.validate_live is None:
        print("live:", shlex.join(command), flush=True)
        subprocess.run([*command, "--out", str(live_out)], check=True)
    else:
        live_out = args.validate_live
    live = json.loads(live_out.with_suffix(".json").read_text())
    runs = [r for r in live["results"] if r.get("system") == "outer" and r.get("curve")]
    if not runs:
        raise SystemExit(f"no live outer run finished: {live.get('errors')}")
    args.steps = round(statistics.median(r["steps_per_peer"] for r in runs))
    # H: the steps a slot held (the peers train --duration seconds in slots); evaluations as often as the live ones
    slots = [live["outer_average_every"][f"{r['mbit']:g}/{r['rtt_ms']:g}/{r['repeat']}"] for r in runs]
    duration = live["settings"]["duration"]
    args.inner_steps = round(statistics.median(r["steps_per_peer"] * s / duration for r, s in zip(runs, slots)))
    spacing = [statistics.median(b[1] - a[1] for a, b in zip(r["curve"], r["curve"][1:])) for r in runs]
    args.eval_every = max(1, round(statistics.median(spacing)))
    args.codec, args.outer_lr, args.outer_momentum = VALIDATE["codec"], VALIDATE["outer_lr"], VALIDATE["outer_momentum"]
    # as live: a round every slot of the live length while the steps go on, steps at the live pace (wall clock)
    args.slots, args.round_interval = True, statistics.median(slots)
    args.step_seconds = duration / args.steps
    setup = Setup(args)
    link = LinkSpec(mbit=VALIDATE["mbit"], rtt_ms=VALIDATE["rtt_ms"])
    print(f"simulated: {VALIDATE['peers']} peers, {args.steps} steps, H = {args.inner_steps}", flush=True)
    simulated = simulate_system(setup, "outer", VALIDATE["peers"], link)
    curves = [[(point[1], point[2]) for point in r["curve"]] for r in runs]  # (steps, loss) of each repeat
    rows = []
    for point in simulated["points"][1:]:
        losses = [loss for loss in (interpolate(curve, point["step"]) for curve in curves) if loss is not None]
        if len(losses) == len(curves):
            low, high = min(losses), max(losses)
            rows.append({"step": point["step"], "simulated": point["loss"], "live_min": low, "live_max": high})
    within = sum(row["live_min"] <= row["simulated"] <= row["live_max"] for row in rows)
    report = report_header("at_scale", args)
    report["settings"].update(validate=VALIDATE, live_command=command, live_result=str(live_out.with_suffix(".json")))
    report["summary"] = {
        "steps": args.steps,
        "inner_steps": args.inner_steps,
        "points": len(rows),
        "within_live_spread": within,
        "simulated_final_loss": simulated["final_loss"],
        "live_final_losses": [curve[-1][1] for curve in curves],
        "live_steps_per_peer": [r["steps_per_peer"] for r in runs],
        "simulated_averaged_share": simulated["averaged_share"],
    }
    report["comparison"], report["simulated"] = rows, simulated
    write_report(report, args.out.with_suffix(".json"))
    print(f"{'step':>5} {'live min':>9} {'live max':>9} {'simulated':>9}  within")
    for row in rows:
        inside = row["live_min"] <= row["simulated"] <= row["live_max"]
        print(f"{row['step']:>5} {row['live_min']:>9.4f} {row['live_max']:>9.4f} {row['simulated']:>9.4f}  {inside}")
    print(
        f"within the live repeats' spread at {within} of {len(rows)} evaluations; final loss simulated "
        f"{simulated['final_loss']:.4f}, live {', '.join(f'{c[-1][1]:.4f}' for c in curves)}"
    )
    fig, ax = figure(figsize=(7, 4.5))
    for k, curve in enumerate(curves):
        ax.plot(*zip(*curve), color="gray", alpha=0.6, label="live repeats" if k == 0 else None)
    ax.plot(
        [p["step"] for p in simulated["points"]],
        [p["loss"] for p in simulated["points"]],
        marker=".",
        label="simulated",
    )
    ax.set(xlabel="inner steps per peer", ylabel="validation loss", title="outer mode, 4 peers, 10 Mbit/s, 50 ms")
    ax.legend()
    save_figure(fig, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASK_SETTINGS), default="charlm")
    parser.add_argument("--systems", default=None, help=f"comma-separated, of {SYSTEMS} (default: all)")
    parser.add_argument("--peers", default=None, help="comma-separated peer counts (default: 8,64)")
    parser.add_argument("--mbit", default="100,10", help="comma-separated link rates, Mbit/s each way")
    parser.add_argument("--rtt-ms", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=None, help="inner steps per peer (default: 3000)")
    parser.add_argument("--inner-steps", type=int, default=50, metavar="H", help="inner steps per outer round")
    parser.add_argument("--gossip-every", type=int, default=None, help="steps per gossip round (default H // 4)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default H)")
    parser.add_argument("--eval-peers", type=int, default=8, help="peers evaluated for the curves (all at the end)")
    parser.add_argument("--step-seconds", type=float, default=0.05, help="virtual seconds of one inner step")
    parser.add_argument("--round-interval", type=float, default=2.0, help="seconds between round slots")
    parser.add_argument("--outer-lr", type=float, default=1.0)
    parser.add_argument("--outer-momentum", type=float, default=0.0, help="Nesterov's where above 0")
    parser.add_argument("--anchor-sync-every", type=int, default=ANCHOR_SYNC_EVERY)
    parser.add_argument(
        "--group-size", default="", help="target group sizes of simulated systems, e.g. outer=8,gossip=8"
    )
    parser.add_argument("--codec", default="none", help="the outer mode's codec for pseudo-gradients")
    parser.add_argument("--slots", action="store_true", help="a round every slot while the steps go on, as live")
    parser.add_argument("--churn", type=float, default=0.0, help="share of peers replaced over the run")
    parser.add_argument("--compute-spread", type=float, default=1.0, help="the slowest peer's steps take S times")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    parser.add_argument(
        "--validate", action="store_true", help=f"live low_communication.py beside the simulator: {VALIDATE}"
    )
    parser.add_argument("--validate-repeats", type=int, default=3, help="live repeats of --validate")
    parser.add_argument(
        "--validate-live", type=Path, default=None, help="--validate against this low_communication.py result"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"write OUT.json and OUT.png (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.gossip_every = args.gossip_every or max(1, args.inner_steps // 4)
    args.group_size = {k: int(v) for k, v in (item.split("=") for item in args.group_size.split(",") if item)}
    args.eval_every = args.eval_every or args.inner_steps
    if args.out is None:
        args.out = DEFAULT_OUT.with_name(DEFAULT_OUT.name + "-quick" * args.quick + "-validate" * args.validate)
    args.first_data_seed = 1 if args.validate else 1000 * args.seed
    systems = [s for s in args.systems.split(",") if s]
    if unknown := [s for s in systems if s not in SYSTEMS]:
        parser.error(f"unknown system(s) {unknown}: choose from {SYSTEMS}")
    if not 0 <= args.churn < 1 or args.compute_spread < 1 or args.steps < 1 or args.inner_steps < 1:
        parser.error("--churn must be in [0, 1), --compute-spread at least 1, --steps and --inner-steps at least 1")
    torch.set_num_threads(args.threads)
    if args.validate:
        args.task = "charlm-live"
        return validate(args)
    setup = Setup(args)
    report = report_header("at_scale", args)
    report["settings"].update(
        numel=setup.numel,
        tokens_per_step=setup.tokens_per_step,
        task_settings=setup.settings,
        group_sizes={**GROUP_SIZES, **args.group_size},
        outer_optimizer=f"SGD(lr={args.outer_lr}, momentum={args.outer_momentum}, nesterov={args.outer_momentum > 0})",
    )
    report["summary"] = []
    started = time.monotonic()
    trained: dict[tuple[str, int], dict] = {}  # the in-process systems, by system and peers
    for peers in (int(p) for p in args.peers.split(",")):
        for mbit in (float(m) for m in args.mbit.split(",")):
            link = LinkSpec(mbit=mbit, rtt_ms=args.rtt_ms)
            for system in systems:
                print(f"[{time.monotonic() - started:6.0f}s] {system}, {peers} peers, {mbit:g} Mbit/s", flush=True)
                began, cpu = time.monotonic(), time.process_time()
                row = {"system": system, "peers": peers, "mbit": mbit, "rtt_ms": args.rtt_ms}
                if system in IN_PROCESS:
                    key = (system, 1 if system == "solo" else peers)
                    fresh = key not in trained
                    if fresh:
                        trainer = {"dp": train_dp, "diloco": train_diloco}.get(system)
                        trained[key] = trainer(setup, peers) if trainer else train_solo(setup)
                    points = analytic_points(system, trained[key], setup, peers, link)
                    compute = args.steps * args.step_seconds * (args.compute_spread if system != "solo" else 1.0)
                    row.update(
                        points=points,
                        final_loss=trained[key]["final_loss"],
                        bytes_per_peer=points[-1]["bytes"],
                        link_bytes_per_peer=None,
                        virtual_seconds=points[-1]["seconds"],
                        utilization=compute / points[-1]["seconds"],
                        averaged_share=None,
                        trained_here=fresh,
                    )
                else:
                    row.update(simulate_system(setup, system, peers, link))
                row["wall_seconds"], row["cpu_seconds"] = time.monotonic() - began, time.process_time() - cpu
                report["summary"].append(row)
                summarize(report["summary"], setup)
                print(f"  final loss {row['final_loss']:.4f}, {row['wall_seconds']:.0f} s", flush=True)
                write_report(report, args.out.with_suffix(".json"))  # so far
    report["estimate"] = estimate([r for r in report["summary"] if r.get("trained_here", True)], args)
    report["total_seconds"] = time.monotonic() - started
    write_report(report, args.out.with_suffix(".json"))
    print()
    print(table(report["summary"]))
    full, per_step = report["estimate"]["full_matrix_seconds"], report["estimate"]["seconds_per_peer_step"]
    print(f"\nCPU seconds per peer-step: {per_step}; full matrix ~{fmt(full, '.0f')} s")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
