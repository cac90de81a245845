"""Hostile peers (issue 13): what 1 or 2 hostile peers of 8 do to training, with and without the defences.

For every task, attack, number of hostile peers and defence setting, a swarm of ``--peers`` training
peers on 127.0.0.1 is trained from scratch (one bootstrap node for all runs, a run id of its own per
run): CLI peers (``gossiptrain peer``: the same training loop, ``finish()`` and final evaluation as
the other benchmarks), peer ``i`` drawing its batches from seed ``i``, every peer taking the same
number of local steps and averaging after at least ``every_steps`` of them (``average_every_steps``;
the slot length is short enough that the steps, not the clock, set the pace, so the machine's load
changes the wall time much more than the rounds per step).  The last ``hostile`` peers are hostile:
their round exchange is ``gossiptrain.testing.FaultyExchange`` with one attack:

- ``huge``: uploads its values times 1e4 (a client: it reduces no shard);
- ``heavy``: uploads its values plus 1 with a claimed weight of 1e9 (a client);
- ``shifted_mean``: owns a shard and returns its shard's mean plus 1 to its group;
- ``absent`` (``--simulate`` only): the last ``hostile`` peers are not in the swarm at all.  With ``--non-iid`` their
  data is then missing from the honest mean under any attack that the defences stop: this is what the honest
  peers reach on their own, the reference an attack's cost is measured against where peers' data differ.

Defence settings (``gossiptrain.allreduce.Defences``, the same on every peer of a run):

- ``off``: a plain weighted mean (``Defences.off()``);
- ``default``: ``DEFAULT_DEFENCES`` as the code has it (its fields are in the JSON's settings);
- ``clip``: CenteredClip 2.0 around the owner's values (contributions beyond 20x the median distance dropped,
  parameters over 4x the values' size caught) and the weight cap 10, without the mean check;
- ``trimmed``: a coordinate-wise trimmed mean dropping 1 value at each end, the weight cap 10, no mean check.

No attack runs with each of the four (what robust aggregation costs when nobody attacks: ``--rules``
picks some, ``--repeats`` runs the whole matrix again, interleaved, and the JSON's ``no_attack_cost``
has each rule's median and range against ``off`` of the same repeat); each attack runs with ``off``
and ``default``.

Reported per run, over the honest peers only: the mean final validation loss (and accuracy for digits)
after ``finish()``, the same just before it (``pre-fin``: a peer's own model when training stopped),
the spread between them (``gossiptrain.demo.parameter_spread`` of the saved models, and the range of
their final losses), the share of their rounds that averaged with a group, and the rejections they
counted (``clipped``, ``hostile_mean``, ...).  ``finish()`` runs while the hostile peers still attack;
where they keep the peers from agreeing it ends after ``--finish-timeout`` seconds.

A training peer is made hostile, and given its defences, by this file's ``--worker`` entry: it runs the
CLI peer (``gossiptrain.cli.main``) with ``gossiptrain.optimizer.GossipOptimizer`` replaced, in that
process only, by a subclass that passes ``defences`` and ``average_every_steps`` to the attachment and
sets the peer's ``exchange_class`` to the ``FaultyExchange`` of the attack (as ``FaultyPeer`` does);
the peer gets ``--no-load-state`` (all peers start together from the same seeded model).

False positives on non-IID data (issue 29, ``--simulate`` only): with ``--non-iid`` each peer trains on its own part
of the data (digits: peer ``i`` draws only classes ``3i, 3i+1, 3i+2`` mod 10; charlm: the ``i``-th of ``--peers``
contiguous parts of the training text), while every peer is evaluated on the whole validation set, so honest peers
drift apart between rounds and the defences may take one for hostile. ``--modes`` adds the outer mode (``outer``:
each peer's rounds go through ``gossiptrain.outer.OuterStrategy`` as ``Attachment`` drives it, pseudo-gradients
averaged and an outer ``SGD(lr=1.0)`` step, the CLI's measured best ``--outer-lr``, every 5th round an anchor-sync
round of the parameters) beside today's parameter averaging (``params``), with the same steps (digits: a round every
50, ``non_iid_every_steps``; ``--lr-decay`` lets the final loss tell attacks apart from which peers happened to
average together). ``--non-iid`` makes this matrix the default: both modes, rules ``off`` and ``default``, attacks
``huge`` and ``shifted_mean`` with 1 and 2 hostile peers. Reported per run besides the above, over the honest peers:
their rounds that were ``partial`` (the defences refused a mean or clipped/dropped a contribution: counted as
averaged too), the distinct honest peers that ended in an honest peer's ``caught`` set, the refusals charged to
honest senders (``honest_refused``, by kind), and the loss and the honest peers' mean parameters against ``off`` of
the same setting (``vs_off_pct``; ``drift_vs_off``: the distance between the two means relative to off's;
``drift_vs_none``: the same against the no-attack ``off``). With no hostile peer every rejection is a false
positive; with hostile peers the ``clipped`` and ``dropped`` counts hold both kinds (they name no sender), the
honest ones do not: the JSON's ``false_positives`` has the counts known to be false positives (None where not
known). The data split is IID without ``--non-iid``.

    python benchmarks/adversarial.py             # the whole matrix (~30-40 min on 2 loaded cores)
    python benchmarks/adversarial.py --quick     # a few-minute smoke run (fewer steps and rows)
    python benchmarks/adversarial.py --simulate  # the same matrix in one process: exact, repeatable (~15 min)
    python benchmarks/adversarial.py --simulate --non-iid --lr-decay --rules off,default,off-regrouped \\
        --attacks huge,shifted_mean,absent   # false positives and issue 29's targets, one run (~30 min)
    python benchmarks/adversarial.py --simulate --non-iid --quick --tasks digits   # its smoke run (~1 min)

Writes ``<out>.json`` (machine, date, command, settings, a ``summary`` row per run, every per-peer
number) and ``<out>.png`` (``--out``, default ``benchmarks/results/adversarial``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import figure, inner_steps, load_vector, report_header, save_figure, write_report
from torch.nn.utils import parameters_to_vector

from gossiptrain.allreduce import DEFAULT_DEFENCES, Defences
from gossiptrain.demo import parameter_spread, read_records, spread
from gossiptrain.exchange import RoundExchange
from gossiptrain.outer import ANCHOR_SYNC_EVERY
from gossiptrain.rounds import AVERAGED
from gossiptrain.testing import LOOPBACK, LocalSwarm, faulty_exchange

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "adversarial"
ATTACKS = ("huge", "heavy", "shifted_mean")
ABSENT = "absent"  # --simulate: the last ``hostile`` peers are not there at all (the honest peers' own reference)
DEFENCES = {
    "off": Defences.off(),
    "default": DEFAULT_DEFENCES,
    "clip": Defences(mean_check=None),
    "trimmed": Defences(rule="trimmed", trim=1, mean_check=None),
}
NO_ATTACK_DEFENCES = ("off", "clip", "trimmed", "default")  # which rule costs least when nobody attacks
ATTACK_DEFENCES = ("off", "default")
MODES = ("params", "outer")  # --simulate: what a round averages (parameters, or pseudo-gradients: OuterStrategy)
OUTER_LR = 1.0  # the outer mode's SGD learning rate, no momentum: the CLI's measured best (--outer-lr 1.0)
# --non-iid's defaults: the false-positive matrix (issue 29)
NON_IID_DEFAULTS = {"modes": "params,outer", "rules": "off,default", "attacks": "huge,shifted_mean", "hostile": "1,2"}
# Per task: local steps per peer (full, --quick), batch size, Adam lr, seconds per slot, local steps per round,
# hostile counts of the full matrix (charlm: 1 and 2 did not both fit in the ~30 min of the default run).
TASK_SETTINGS = {
    "digits": {
        "steps": 3000,
        "quick_steps": 600,
        "batch_size": 32,
        "lr": 1e-3,
        "average_every": 0.5,
        "every_steps": 200,
        # on 3 classes a peer drifts so far in 200 steps that the final loss depends on which peers averaged
        # together (``off-regrouped``) by far more than the 3% an attack is judged by
        "non_iid_every_steps": 50,
        "hostile": (1, 2),
    },
    "charlm": {
        "steps": 80,
        "quick_steps": 24,
        "batch_size": 16,
        "lr": 2e-3,
        "average_every": 1.0,
        "every_steps": 8,
        "hostile": (2,),
    },
}
NOISE_FLOOR = "off-jitter"  # --simulate: plain means with weights a few parts in a million off
REGROUPED = "off-regrouped"  # --simulate: plain means, the groups drawn under another run id (the same swarm)
SIMULATED_FINISH_ROUNDS = 6  # --simulate: finish() is at most this many rounds, until the honest peers agree
START_TIMEOUT = 180.0  # seconds a peer waits for all the others to be live (8 peers start on 2 cores)


def peer_worker(defences: str, fault: str | None, every_steps: int, cli_args: list[str]) -> None:
    """The CLI peer (``gossiptrain peer CLI_ARGS``) with ``defences``, rounds every ``every_steps`` local
    steps, and, given ``fault``, the hostile exchange of that attack."""
    from gossiptrain import cli
    from gossiptrain import optimizer as optimizer_module

    class BenchmarkOptimizer(optimizer_module.GossipOptimizer):
        def __init__(self, *args, **kwargs):
            kwargs.update(defences=DEFENCES[defences], average_every_steps=every_steps)
            super().__init__(*args, **kwargs)
            if fault is not None:  # rounds start from the step hooks: none has run yet
                self.peer.exchange_class = faulty_exchange(fault)

        def wait_for_peers(self, count: int, timeout: float = 60.0) -> int:
            return super().wait_for_peers(count, timeout=max(timeout, START_TIMEOUT))

    optimizer_module.GossipOptimizer = BenchmarkOptimizer  # cli.cmd_peer imports it when it runs
    # every peer starts at once from the same seeded initialisation: nothing to download
    cli.main(["peer", "--no-load-state", *cli_args])


def matrix(
    tasks: list[str],
    attacks: list[str],
    hostile_counts: dict[str, tuple[int, ...]],
    rules: tuple[str, ...] = NO_ATTACK_DEFENCES,
    repeats: int = 1,
    modes: tuple[str, ...] = ("params",),
    non_iid: bool = False,
) -> list[dict]:
    """The runs: no attack with each rule for every task and mode first, then each attack x hostile count (0 is
    the no-attack rows) x defences; with ``repeats``, the whole list again, interleaved (repeat 0 of every row,
    then 1, ...).  ``off`` comes first of the rules where they have it (the others are compared with it)."""
    rules = tuple(sorted(rules, key=lambda rule: rule != "off"))
    settings = [{"task": task, "mode": mode, "non_iid": non_iid} for task in tasks for mode in modes]
    runs = [{**setting, "attack": "none", "hostile": 0, "defences": name} for setting in settings for name in rules]
    for setting in settings:
        for attack in attacks:
            for hostile in (h for h in hostile_counts[setting["task"]] if h > 0):
                runs += [
                    {**setting, "attack": attack, "hostile": hostile, "defences": name} for name in ATTACK_DEFENCES
                ]
    return [{**run, "repeat": repeat} for repeat in range(repeats) for run in runs]


def run_name(run: dict) -> str:
    mode = "" if run.get("mode", "params") == "params" else f"/{run['mode']}"
    data = "/non-iid" if run.get("non_iid") else ""
    return f"{run['task']}{mode}{data}/{run['attack']}/x{run['hostile']}/{run['defences']}/r{run.get('repeat', 0)}"


def run_swarm(swarm: LocalSwarm, work: Path, run_id: str, run: dict, steps: int, args: argparse.Namespace) -> dict:
    """Train one swarm to the end; its peers' records, saved models and the wall time."""
    settings = TASK_SETTINGS[run["task"]]
    started = time.monotonic()
    peers = []
    for i in range(args.peers):
        hostile = i >= args.peers - run["hostile"]
        cli_args = [
            *("--host-maddrs", LOOPBACK, "--initial-peers", *swarm.initial_peers, "--run-id", run_id),
            *("--example", run["task"], "--steps", str(steps), "--seed", str(i), "--threads", "1"),
            *("--batch-size", str(settings["batch_size"]), "--lr", str(settings["lr"])),
            *("--wait-for-peers", str(args.peers), "--average-every", str(settings["average_every"])),
            *("--finish-timeout", str(args.finish_timeout)),
            *("--metrics-file", str(work / f"peer{i}.jsonl"), "--save-model", str(work / f"peer{i}.pt")),
            *(("--client-mode",) if hostile and run["attack"] != "shifted_mean" else ()),
        ]
        worker = ["--worker", "--defences", run["defences"], "--every-steps", str(settings["every_steps"])]
        worker += ["--fault", run["attack"]] if hostile else []
        peers.append(swarm.start([sys.executable, __file__, *worker, "--", *cli_args]))
    deadline = started + args.timeout
    while any(process.poll() is None for process, _ in peers) and time.monotonic() < deadline:
        time.sleep(0.5)
    wall = time.monotonic() - started
    for i, (process, output) in enumerate(peers):
        if process.poll() is None:
            LocalSwarm.kill(process.pid)
        if process.returncode != 0:
            tail = "\n".join(output.lines[-10:])
            raise RuntimeError(f"peer {i} of {run_id} exited with {process.returncode} or ran past --timeout:\n{tail}")
    honest = range(args.peers - run["hostile"])
    return {
        "records": {i: read_records(work / f"peer{i}.jsonl") for i in range(args.peers)},
        "models": [torch.load(work / f"peer{i}.pt") for i in honest],
        "wall": wall,
    }


def simulate_swarm(run: dict, steps: int, args: argparse.Namespace) -> dict:
    """One run of the matrix in this process (``--simulate``): the same peers, attacks and defences, with
    rounds every ``every_steps`` steps of every peer through the real round code over in-memory streams
    (``gossiptrain.simulation``: live peers on ideal links, in virtual time), and ``finish()`` as rounds until
    the honest peers agree.  A run is the same bit for bit when repeated, and two rules of one repeat differ
    only by what the rules did.  Repeat ``r`` starts every peer from model seed ``r`` (as ``--no-load-state``),
    peer ``i`` draws from seed ``1000 r + i``, and every contribution weighs one round's samples
    (in outer mode: of every round since its sender's last one applied, as ``Attachment`` weighs it).
    ``off-jitter`` is ``off`` with each peer's weight changed by a few parts in a million: what a final
    loss moves by from a perturbation alone (the noise floor of a comparison); ``off-regrouped`` is ``off`` with
    the run's groups drawn anew (another run id): what it moves by from which peers happened to average together.
    With ``--miss P`` each honest peer sits out each training round with probability P (drawn from the
    repeat, the round and the peer, so the same in every rule), as live peers miss rounds (54-93% of
    their rounds averaged in the live runs): a peer that missed one comes back apart from its group,
    which is where the defences' rules engage when nobody attacks.
    With ``non_iid`` in ``run`` each peer draws from its own part of the data (``peer_batches``), and averages
    every ``non_iid_every_steps`` where the task sets it; with mode
    ``outer`` each peer (the hostile ones too) makes its round's values and applies its result through its own
    ``OuterStrategy`` as ``Attachment`` does (``contribution`` before the round, ``combine`` after an averaged
    round or one alone), and ``finish()``'s rounds are its ``final`` rounds (the parameters)."""
    from gossiptrain.codecs import get_codec
    from gossiptrain.outer import OuterStrategy
    from gossiptrain.simulation import SimulatedSwarm
    from gossiptrain.tasks import TASKS
    from gossiptrain.virtual_time import run as run_virtual

    settings, repeat, started = TASK_SETTINGS[run["task"]], run.get("repeat", 0), time.monotonic()
    every = (
        settings.get("non_iid_every_steps", settings["every_steps"]) if run.get("non_iid") else settings["every_steps"]
    )
    task = TASKS[run["task"]](model_seed=repeat)
    honest = range(args.peers - run["hostile"])
    present = honest if run["attack"] == ABSENT else range(args.peers)
    models = [copy.deepcopy(task.model) for _ in range(args.peers)]
    optimizers = [torch.optim.Adam(model.parameters(), lr=settings["lr"]) for model in models]
    decays = [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in optimizers] if args.lr_decay else []
    batches = [peer_batches(task, run, 1000 * repeat + i, i, args.peers) for i in range(args.peers)]
    strategies = None
    if run.get("mode", "params") == "outer":
        outer = lambda params: torch.optim.SGD(params, lr=OUTER_LR)  # noqa: E731
        strategies = [OuterStrategy(list(model.parameters()), outer, get_codec("none")) for model in models]
    jitter = 1e-6 if run["defences"] == NOISE_FLOOR else 0.0
    defences = DEFENCES["off" if run["defences"] in (NOISE_FLOOR, REGROUPED) else run["defences"]]
    regrouped = {"run_id": "regrouped"} if run["defences"] == REGROUPED else {}  # groups drawn under another run id
    swarm = SimulatedSwarm(defences=defences, **regrouped)
    records: dict[int, list[dict]] = {i: [] for i in honest}  # as the live peers' metrics files have them
    honest_ids: set[str] = set()
    honest_refused: dict[str, int] = {}  # refusals (Rejections.record) that honest peers charged to honest ones
    honest_caught: set[str] = set()
    mean_sizes = [0.0]  # the largest honest owner's mean over a member's parameters (``measuring_exchange``)
    reduced = [0]  # the contributions honest owners reduced (``measuring_exchange``)
    unapplied = [0] * args.peers  # rounds of steps since each peer's last round applied (outer mode's weight)

    def charging(record):
        """``Rejections.record`` that also counts the refusals of honest senders in ``honest_refused``."""

        def recording(kind: str, sender: str, *rest) -> None:
            if str(sender) in honest_ids:
                honest_refused[kind] = honest_refused.get(kind, 0) + 1
            record(kind, sender, *rest)

        return recording

    async def average(round_id: int, miss: float, final: bool = False) -> None:
        seed = 10**6 * repeat + 10**3 * round_id
        taking_part = [i for i in present if i not in honest or random.Random(seed + i).random() >= miss]
        slot = max(swarm.peers[f"peer{i}"].next_round_id() for i in taking_part)
        snapshots = {i: parameters_to_vector(models[i].parameters()).detach() for i in taking_part}
        for i in present:
            unapplied[i] += 0 if final else 1
        weight = every * settings["batch_size"]
        spans = {i: max(unapplied[i], 1) if strategies is not None else 1 for i in taking_part}
        weights = {f"peer{i}": weight * spans[i] * (1 + jitter * i) for i in taking_part}
        if strategies is None:
            values = {f"peer{i}": snapshots[i] for i in taking_part}
            results = await swarm.round(values, weights, round_id=slot, mode="params")
        else:  # as Attachment: the strategy's contribution, then its combine of an averaged round or one alone
            made = {i: strategies[i].contribution(snapshots[i], slot, "final" if final else None) for i in taking_part}
            first = made[taking_part[0]]
            results = await swarm.round(
                {f"peer{i}": c.values for i, c in made.items()},
                weights,
                round_id=slot,
                residuals={f"peer{i}": c.residual for i, c in made.items()},
                mode=first.mode,
                codec=first.codec,
            )
        for i in taking_part:
            result = results[f"peer{i}"]
            after = result.averaged
            if strategies is not None:
                applied = result.status in AVERAGED or (result.status == "alone" and strategies[i].steps_alone)
                after = strategies[i].combine(result, snapshots[i], made[i].mode) if applied else snapshots[i]
                unapplied[i] = 0 if applied else unapplied[i]
            load_vector(models[i], after)
            if i in honest:
                status, rejected = result.status, dict(swarm.peers[f"peer{i}"].rejections)
                records[i].append({"round": round_id, "status": status, "rejected": rejected})

    async def train() -> None:
        for i in present:
            hostile = i not in honest
            peer = await swarm.add(f"peer{i}", client=hostile and run["attack"] != "shifted_mean")
            measuring = measuring_exchange(mean_sizes, honest_ids, reduced)
            peer.exchange_class = faulty_exchange(run["attack"]) if hostile else measuring
        honest_ids.update(str(swarm.peers[f"peer{i}"].peer_id) for i in honest)
        for i in honest:
            rejections = swarm.peers[f"peer{i}"].rejections
            rejections.record = charging(rejections.record)
        round_id = 0
        for step in range(1, steps + 1):
            for model, optimizer, batch in zip(models[: len(present)], optimizers, batches):
                inner_steps(task, model, optimizer, batch, 1)
            for decay in decays:
                decay.step()
            if step % every == 0:
                await average(round_id, args.miss)
                round_id += 1
        for i in honest:
            records[i].append({"loss_before_finish": task.evaluate(models[i])["loss"], "rounds_done": round_id})
        for finishing in range(round_id, round_id + SIMULATED_FINISH_ROUNDS):
            await average(finishing, 0.0, final=True)
            if spread([parameters_to_vector(models[i].parameters()).double() for i in honest]) < 1e-6:
                break
        honest_caught.update(m for i in honest for m in swarm.peers[f"peer{i}"].caught if str(m) in honest_ids)
        await swarm.close()

    run_virtual(train())
    for i in honest:
        before = next(r for r in records[i] if "loss_before_finish" in r)
        records[i].append({"final": True, "step": steps, "rounds_failed": 0, **before, **task.evaluate(models[i])})
    mean = torch.stack([parameters_to_vector(models[i].parameters()).detach().double() for i in honest]).mean(0)
    models = [model.state_dict() for model in models[: len(honest)]]
    swarm_numbers = {"records": records, "models": models, "wall": time.monotonic() - started}
    swarm_numbers.update(honest_refused=honest_refused, honest_caught=len(honest_caught))
    swarm_numbers["honest_mean_size"] = mean_sizes[0] or None
    swarm_numbers["contributions"] = reduced[0]
    return {**summarize(run, swarm_numbers, args.peers), "honest_mean": mean}


def measuring_exchange(largest: list[float], honest_ids: set[str], reduced: list[int]) -> type[RoundExchange]:
    """An honest peer's ``RoundExchange`` that keeps in ``largest[0]`` the largest norm of an honest owner's mean
    over the member's own parameters there (rounds of parameters, where ``Defences.catch_mean`` is on): how close
    honest means come to that check (``honest_mean_size``); and counts in ``reduced[0]`` the contributions it
    reduced as an owner (what a share of ``dropped`` is of)."""

    class MeasuringExchange(RoundExchange):
        @staticmethod
        def _mean_and_fraction(reduction, out):
            reduced[0] += reduction.contributors
            return RoundExchange._mean_and_fraction(reduction, out)

        def _refuse_outlying_means(self, means, measured):
            owners = {bounds: owner for owner, bounds in self._shards.items()}
            if self.parameters:
                for bounds, norm in measured["norms"].items():
                    if measured["sizes"][bounds] > 0 and str(owners[bounds]) in honest_ids:
                        largest[0] = max(largest[0], norm / measured["sizes"][bounds])
            return super()._refuse_outlying_means(means, measured)

    return MeasuringExchange


def peer_batches(task, run: dict, seed: int, i: int, peers: int):
    """Peer ``i``'s batches from ``seed``: of all the training data, or with ``non_iid`` in ``run`` of its own
    part (digits: classes ``3i, 3i+1, 3i+2`` mod 10; charlm: the ``i``-th of ``peers`` parts of the text)."""
    batch_size = TASK_SETTINGS[run["task"]]["batch_size"]
    if not run.get("non_iid"):
        return task.batches(seed, batch_size)
    if run["task"] == "digits":
        return task.batches(seed, batch_size, classes=[(3 * i + k) % 10 for k in range(3)])
    return task.batches(seed, batch_size, part=(i, peers))


def run_live(swarm: LocalSwarm, n: int, run: dict, steps: int, args: argparse.Namespace) -> dict:
    """Run ``n`` of the matrix as a swarm of processes; its summary, or the error that stopped it."""
    run_id = re.sub(r"[^A-Za-z0-9-]+", "-", f"adv-{os.getpid()}-{n}-{run['task']}-{run['attack']}")
    with tempfile.TemporaryDirectory(prefix="gossiptrain-adv-") as workdir:
        work = Path(workdir) if args.keep is None else args.keep / run_id
        work.mkdir(parents=True, exist_ok=True)
        try:
            return summarize(run, run_swarm(swarm, work, run_id, run, steps, args), args.peers)
        except (RuntimeError, OSError) as e:
            print(f"  failed: {e}", flush=True)
            return {**run, "error": str(e).splitlines()[0]}


def _finite_mean(values: list[float]) -> float | None:
    """The mean, or None when a value is NaN or infinite (a diverged peer): JSON has no NaN."""
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else None


def summarize(run: dict, swarm: dict, peers: int) -> dict:
    """The honest peers' numbers of one run (see the module docstring)."""
    honest = range(peers - run["hostile"])
    records = swarm["records"]
    finals = [next((r for r in records[i] if r.get("final")), None) for i in honest]
    if any(f is None for f in finals):
        raise RuntimeError("an honest peer wrote no final record; see its output above")
    rounds = [r for i in honest for r in records[i] if "round" in r]
    rejected: dict[str, int] = {}
    for i in honest:
        last = next((r for r in reversed(records[i]) if "round" in r), None)
        for kind, count in (last or {}).get("rejected", {}).items():
            rejected[kind] = rejected.get(kind, 0) + count
    losses = [f["loss"] for f in finals]
    spread = parameter_spread(swarm["models"])
    return {
        **run,
        "final_loss": _finite_mean(losses),
        "final_accuracy": _finite_mean([f["accuracy"] for f in finals]) if run["task"] == "digits" else None,
        "honest_spread": spread if math.isfinite(spread) else None,
        "honest_loss_range": max(losses) - min(losses) if all(math.isfinite(v) for v in losses) else None,
        "rounds_averaged_share": sum(r["status"] in AVERAGED for r in rounds) / len(rounds) if rounds else 0.0,
        "rounds_partial_share": sum(r["status"] == "partial" for r in rounds) / len(rounds) if rounds else 0.0,
        "loss_before_finish": _finite_mean([f["loss_before_finish"] for f in finals]),
        "diverged_peers": sum(not math.isfinite(v) for v in losses),
        "honest_peers": len(finals),
        "rounds_per_peer": len(rounds) / len(finals),
        "steps": [f["step"] for f in finals],
        "rejected": rejected,
        "honest_refused": swarm.get("honest_refused"),
        "honest_caught": swarm.get("honest_caught"),
        "honest_mean_size": swarm.get("honest_mean_size"),
        "false_positives": false_positives(run["hostile"], rejected, swarm),
        "wall_seconds": swarm["wall"],
        "per_peer": [
            {k: f.get(k) for k in ("loss", "accuracy", "loss_before_finish", "rounds_done", "rounds_failed")}
            for f in finals
        ],
    }


def false_positives(hostile: int, rejected: dict[str, int], swarm: dict) -> dict[str, int | None]:
    """What the honest peers' defences did to honest peers: contributions ``clipped`` and ``dropped`` (known only
    with no hostile peer: the counts name no sender), ``hostile_mean`` and ``caught`` refusals of honest senders,
    the distinct honest peers some honest peer caught (``honest_caught_peers``), and the contributions honest owners
    reduced (``--simulate``: what ``dropped`` is a share of); None where not known (live
    runs with hostile peers)."""
    charged = swarm.get("honest_refused")
    if charged is None and hostile == 0:
        charged = rejected
    return {
        "clipped": rejected.get("clipped", 0) if hostile == 0 else None,
        "dropped": rejected.get("dropped", 0) if hostile == 0 else None,
        "hostile_mean": None if charged is None else charged.get("hostile_mean", 0),
        "caught": None if charged is None else charged.get("caught", 0),
        "honest_caught_peers": swarm.get("honest_caught"),
        "contributions": swarm.get("contributions"),  # reduced by honest owners (--simulate)
    }


def _number(value: float | None, fmt: str) -> str:
    """``value`` in ``fmt``, or in 3 significant digits once it is too large for it (a diverged run)."""
    if value is None:
        return "n/a"
    return format(value, ".3g" if abs(value) >= 1e4 else fmt)


def _setting(run: dict) -> str:
    """The defences of a run, and its repeat where there are several."""
    return run["defences"] + (f" r{run['repeat']}" if run.get("repeat") else "")


def _data(run: dict) -> str:
    return "non-iid" if run.get("non_iid") else "iid"


def _counts(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "n/a"
    return ",".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"


def table(summary: list[dict]) -> str:
    header = (
        f"{'task':<7} {'mode':<6} {'data':<7} {'attack':<13} {'hostile':>7} {'defences':<16} {'final loss':>10} "
        f"{'vs none':>9} {'vs off':>8} {'drift off':>9} {'drift none':>10} {'pre-fin':>8} {'accuracy':>8} "
        f"{'spread':>8} {'averaged':>8} {'partial':>7} {'rejected':<40} {'to honest':<24} {'caught':>6} "
        f"{'mean/own':>8} {'wall s':>6}"
    )
    rows = [header, "-" * len(header)]
    for s in summary:
        start = f"{s['task']:<7} {s.get('mode', 'params'):<6} {_data(s):<7} {s['attack']:<13} {s['hostile']:>7} "
        if "error" in s:
            rows.append(f"{start}{_setting(s):<16} failed: {s['error']}")
            continue
        rows.append(
            f"{start}{_setting(s):<16} "
            f"{_number(s['final_loss'], '.4f'):>10} {_number(s.get('vs_no_attack_off_pct'), '+.1f'):>8}% "
            f"{_number(s.get('vs_off_pct'), '+.1f'):>7}% {_number(s.get('drift_vs_off'), '.1e'):>9} "
            f"{_number(s.get('drift_vs_none'), '.1e'):>10} "
            f"{_number(s['loss_before_finish'], '.4f'):>8} {_number(s['final_accuracy'], '.4f'):>8} "
            f"{_number(s['honest_spread'], '.1e'):>8} {s['rounds_averaged_share']:>8.2f} "
            f"{s.get('rounds_partial_share', 0.0):>7.2f} {_counts(s['rejected'])[:40]:<40} "
            f"{_counts(s.get('honest_refused'))[:24]:<24} {_number(s.get('honest_caught'), 'd'):>6} "
            f"{_number(s.get('honest_mean_size'), '.2f'):>8} {s['wall_seconds']:>6.0f}"
        )
    rows.append(
        "honest peers only: final loss/accuracy after finish(), mean over them; vs none: against the same task's "
        "and mode's no-attack run with defences off; vs off: against defences off of the same setting (attack, "
        "hostile peers); drift off/none: distance of their mean parameters from that off's/the no-attack off's, "
        "relative to its size; pre-fin: "
        "before finish(); spread: relative spread of their parameters; averaged: share of their rounds that "
        "averaged (partial ones too); partial: share where the defences refused a mean or clipped/dropped a "
        "contribution; rejected: their counts summed (clipped: contributions clipped); to honest: refusals of "
        "honest senders; caught: distinct honest peers some honest peer caught (--simulate only); mean/own: the "
        "largest honest mean of parameters over a member's own there (--simulate, Defences.catch_mean refuses "
        "one over 2x)"
    )
    return "\n".join(rows)


def add_baselines(summary: list[dict], means: dict[str, torch.Tensor] | None = None) -> None:
    """Each run's final loss, in %, against its task's and mode's no-attack run with defences off of the same
    repeat (``vs_no_attack_off_pct``) and against ``off`` of its own setting (``vs_off_pct``); with ``means``
    (the honest peers' mean parameters by run name), ``drift_vs_off`` and ``drift_vs_none``: the distance of its
    mean from that ``off``'s and from the no-attack ``off``'s, relative to the latter's norm (None where either is
    not finite)."""
    by_name = {run_name(s): s for s in summary if s.get("final_loss") is not None}

    def drift(name: str, base: str) -> float | None:
        value = float((means[name] - means[base]).norm() / means[base].norm())
        return value if math.isfinite(value) else None

    for s in summary:
        if s.get("final_loss") is None and run_name(s) not in (means or {}):
            continue
        name, none_name = run_name(s), run_name({**s, "attack": "none", "hostile": 0, "defences": "off"})
        if s.get("final_loss") is not None and none_name in by_name:
            s["vs_no_attack_off_pct"] = 100 * (s["final_loss"] / by_name[none_name]["final_loss"] - 1)
        if means and name != none_name and name in means and none_name in means:
            s["drift_vs_none"] = drift(name, none_name)
        if s["defences"] == "off":
            continue
        off_name = run_name({**s, "defences": "off"})
        if s.get("final_loss") is not None and off_name in by_name:
            s["vs_off_pct"] = 100 * (s["final_loss"] / by_name[off_name]["final_loss"] - 1)
        if means and name in means and off_name in means:
            s["drift_vs_off"] = drift(name, off_name)


def no_attack_cost(summary: list[dict]) -> list[dict]:
    """Per task, mode, data and rule, what robust aggregation costs when nobody attacks: the final loss against
    ``off`` of the same repeat, in %, over the repeats (median, lowest, highest)."""
    costs: dict[tuple[str, str, bool, str], list[float]] = {}
    for s in summary:
        if s["attack"] == "none" and s["defences"] != "off" and s.get("vs_no_attack_off_pct") is not None:
            key = (s["task"], s.get("mode", "params"), bool(s.get("non_iid")), s["defences"])
            costs.setdefault(key, []).append(s["vs_no_attack_off_pct"])
    return [
        {
            "task": task,
            "mode": mode,
            "non_iid": non_iid,
            "defences": rule,
            "repeats": len(pcts),
            "median_pct": statistics.median(pcts),
            "min_pct": min(pcts),
            "max_pct": max(pcts),
            "pcts": pcts,
        }
        for (task, mode, non_iid, rule), pcts in costs.items()
    ]


def false_positive_targets(summary: list[dict]) -> list[dict]:
    """Per task and mode of a ``--non-iid`` run, issue 29's targets from its runs (every repeat): with no attacker,
    ``default`` against ``off`` (within 1%), the share of honest contributions dropped (at most 1%) and honest peers
    caught (none); under attack, ``default``'s final loss against the worse of no attack and ``absent`` (the hostile
    peers and their data not there) of the same repeat and hostile count (within 3%)."""
    rows = []
    for task, mode in dict.fromkeys((r["task"], r.get("mode", "params")) for r in summary if r.get("non_iid")):
        mine = [r for r in summary if (r["task"], r.get("mode", "params")) == (task, mode) and "error" not in r]

        default = {
            (r["attack"], r["hostile"], r.get("repeat", 0)): r["final_loss"] for r in mine if r["defences"] == "default"
        }
        quiet = [r for r in mine if r["attack"] == "none" and r["defences"] == "default"]
        vs_off = [r["vs_no_attack_off_pct"] for r in quiet if r.get("vs_no_attack_off_pct") is not None]
        contributions = sum(r["false_positives"].get("contributions") or 0 for r in quiet)
        dropped = sum(r["false_positives"]["dropped"] or 0 for r in quiet)
        attacked = []
        for r in mine:
            if r["defences"] != "default" or r["attack"] in ("none", ABSENT):
                continue
            references = [
                default.get(("none", 0, r.get("repeat", 0))),
                default.get((ABSENT, r["hostile"], r.get("repeat", 0))),
            ]
            if None not in references:
                attacked.append(100 * (r["final_loss"] / max(references) - 1))
        rows.append(
            {
                "task": task,
                "mode": mode,
                "no_attack_vs_off_pct": [min(vs_off), max(vs_off)] if vs_off else None,
                "no_attack_dropped_share": dropped / contributions if contributions else None,
                "no_attack_honest_caught": sum(r["honest_caught"] for r in quiet),
                "attacked_vs_reference_pct": attacked,
                "attacked_within_3pct": sum(p <= 3.0 for p in attacked),
            }
        )
    return rows


def plot(report: dict, path: Path) -> None:
    tasks = list(dict.fromkeys(s["task"] for s in report["summary"]))
    fig, axes = figure(1, len(tasks), figsize=(7 * len(tasks), 4.8), squeeze=False)
    colors = {"off": "tab:red", "clip": "tab:blue", "trimmed": "tab:green", "default": "tab:purple"}
    several_modes = len({s.get("mode", "params") for s in report["summary"]}) > 1

    def label_of(s: dict) -> str:
        return f"{s['attack']}\nx{s['hostile']}" + (f"\n{s.get('mode', 'params')}" if several_modes else "")

    for ax, task in zip(axes[0], tasks):
        rows = [s for s in report["summary"] if s["task"] == task and "error" not in s]
        labels = list(dict.fromkeys(label_of(s) for s in rows))
        width, seen = 0.8 / len(colors), set()
        for k, name in enumerate(colors):
            for label in labels:  # a bar at the median over the repeats, a dot per repeat
                finals = [s["final_loss"] for s in rows if s["defences"] == name and label == label_of(s)]
                if not finals:
                    continue
                x = labels.index(label) + (k - (len(colors) - 1) / 2) * width
                finite = [v for v in finals if v is not None]
                value = statistics.median(finite) if len(finite) == len(finals) else math.nan
                ax.bar([x], [value], width, color=colors[name], label=None if name in seen else name)
                if len(finals) > 1:
                    ax.scatter([x] * len(finite), finite, s=8, color="black", zorder=3)
                seen.add(name)
                if len(finite) < len(finals):
                    ax.annotate("NaN", (x, 0.01), xycoords=("data", "axes fraction"), ha="center", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("honest peers' final validation loss (mean, log scale)")
        data = ", non-IID data" if report["settings"].get("non_iid") else ""
        ax.set_title(f"{task}: {report['settings']['peers']} peers{data}, attack x hostile peers")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['date']}; {report['machine']['cpu_count']} CPUs", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="digits,charlm", help="comma-separated example tasks")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="fewer steps, 2 hostile peers only (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="local steps per peer for every task")
    parser.add_argument("--hostile", default=None, help="comma-separated hostile counts for every task")
    parser.add_argument(
        "--attacks",
        default=None,
        help=f"comma-separated attacks (default: all; with --non-iid {NON_IID_DEFAULTS['attacks']})",
    )
    parser.add_argument("--finish-timeout", type=float, default=10.0, help="seconds finish() waits for agreement")
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds allowed for one swarm's run")
    parser.add_argument("--out", type=Path, default=None, help=f"write OUT.json and OUT.png (default: {DEFAULT_OUT})")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR", help="keep metrics files and models here")
    parser.add_argument("--only", default=None, help="run only the matrix rows whose name contains this")
    parser.add_argument(
        "--rules",
        default=None,
        help=f"comma-separated defence settings of the no-attack rows (default: {','.join(NO_ATTACK_DEFENCES)}; "
        f"with --non-iid {NON_IID_DEFAULTS['rules']})",
    )
    parser.add_argument("--repeats", type=int, default=1, help="run the whole matrix this many times, interleaved")
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="run every swarm in this process over in-memory streams: exact, repeatable "
        f"(rules may add {NOISE_FLOOR}, {REGROUPED})",
    )
    parser.add_argument(
        "--lr-decay",
        action="store_true",
        help="--simulate: the inner lr decays to 0 over the run (cosine), so that the final model is where the "
        "swarm converged rather than where its last groups happened to leave it",
    )
    parser.add_argument(
        "--miss", type=float, default=0.25, help="--simulate: chance that an honest peer sits out a training round"
    )
    parser.add_argument(
        "--non-iid",
        action="store_true",
        help="--simulate: each peer trains on its own part of the data (see above); makes the false-positive "
        "matrix the default (--modes, --rules, --attacks, --hostile)",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help=f"--simulate: comma-separated round modes of {MODES} (default: params; with --non-iid "
        f"{NON_IID_DEFAULTS['modes']})",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--defences", choices=sorted(DEFENCES), default="default", help=argparse.SUPPRESS)
    parser.add_argument("--fault", choices=ATTACKS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--every-steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("cli_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return peer_worker(args.defences, args.fault, args.every_steps, args.cli_args)
    if args.out is None:
        suffix = "-simulated" * args.simulate + "-non-iid" * args.non_iid + "-quick" * args.quick
        args.out = DEFAULT_OUT.with_name(DEFAULT_OUT.name + suffix)
    defaults = NON_IID_DEFAULTS if args.non_iid else {"modes": "params", "rules": ",".join(NO_ATTACK_DEFENCES)}
    args.modes = args.modes or defaults["modes"]
    args.rules = args.rules or defaults["rules"]
    args.attacks = args.attacks or defaults.get("attacks", ",".join(ATTACKS))
    tasks = [t for t in args.tasks.split(",") if t]
    attacks = [a for a in args.attacks.split(",") if a]
    modes = tuple(m for m in args.modes.split(",") if m)
    known = (*ATTACKS, ABSENT) if args.simulate else ATTACKS
    if unknown := [a for a in attacks if a not in known] + [t for t in tasks if t not in TASK_SETTINGS]:
        parser.error(f"unknown attack(s) or task(s) {unknown}: choose from {known} and {sorted(TASK_SETTINGS)}")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"unknown mode(s) {unknown}: choose from {MODES}")
    if not args.simulate and (args.non_iid or args.lr_decay or modes != ("params",)):
        parser.error("--non-iid, --lr-decay and --modes outer need --simulate")
    if args.hostile:
        counts = {task: tuple(int(h) for h in args.hostile.split(",")) for task in tasks}
    elif args.non_iid:
        counts = {task: (2,) if args.quick else tuple(int(h) for h in defaults["hostile"].split(",")) for task in tasks}
    else:
        counts = {task: (2,) if args.quick else TASK_SETTINGS[task]["hostile"] for task in tasks}
    steps = {task: args.steps or TASK_SETTINGS[task]["quick_steps" if args.quick else "steps"] for task in tasks}
    report = report_header("adversarial", args, ("worker", "defences", "fault", "every_steps", "cli_args"))
    report["settings"].update(
        steps=steps,
        hostile_counts=counts,
        task_settings={task: TASK_SETTINGS[task] for task in tasks},
        defences={name: dataclasses.asdict(d) for name, d in DEFENCES.items()},
        reduced=(
            "charlm: 2 hostile peers only, 80 steps per peer (the whole matrix did not fit in ~30 min)"
            if not args.hostile and "charlm" in tasks and not args.quick and not args.non_iid
            else None
        ),
        outer={"optimizer": f"SGD(lr={OUTER_LR})", "anchor_sync_every": ANCHOR_SYNC_EVERY, "codec": "none"},
        non_iid_parts=(
            {"digits": "peer i: classes 3i, 3i+1, 3i+2 mod 10", "charlm": "peer i: part i of --peers of the text"}
            if args.non_iid
            else None
        ),
    )
    report["summary"] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rules = tuple(r for r in args.rules.split(",") if r)
    known = [*DEFENCES, NOISE_FLOOR, REGROUPED] if args.simulate else list(DEFENCES)
    if unknown := [r for r in rules if r not in known]:
        parser.error(f"unknown defence setting(s) {unknown}: choose from {sorted(known)}")
    runs = matrix(tasks, attacks, counts, rules, args.repeats, modes, args.non_iid)
    if args.only:
        runs = [run for run in runs if args.only in run_name(run)]
    means: dict[str, torch.Tensor] = {}  # the honest peers' mean parameters by run name (--simulate): drift_vs_off
    with contextlib.nullcontext() if args.simulate else LocalSwarm() as swarm:
        if swarm is not None:
            swarm.start_bootstrap()
        for n, run in enumerate(runs):
            print(f"[{time.monotonic() - started:5.0f}s] run {n + 1}/{len(runs)}: {run_name(run)}", flush=True)
            if swarm is None:
                result = simulate_swarm(run, steps[run["task"]], args)
                means[run_name(run)] = result.pop("honest_mean")
            else:
                result = run_live(swarm, n, run, steps[run["task"]], args)
            report["summary"].append(result)
            add_baselines(report["summary"], means)
            if "error" not in result:
                print(
                    f"  final loss {_number(result['final_loss'], '.4f')}, accuracy "
                    f"{_number(result['final_accuracy'], '.4f')}, before finish "
                    f"{_number(result['loss_before_finish'], '.4f')}, rejected {result['rejected']}, "
                    f"partial {result['rounds_partial_share']:.2f}, false positives {result['false_positives']}, "
                    f"{result['wall_seconds']:.0f} s",
                    flush=True,
                )
            write_report(report, args.out.with_suffix(".json"))  # so far
    report["no_attack_cost"] = no_attack_cost(report["summary"])
    if args.non_iid:
        report["targets"] = false_positive_targets(report["summary"])
    report["total_seconds"] = time.monotonic() - started
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    write_report(report, args.out.with_suffix(".json"))
    print()
    print(table(report["summary"]))
    for cost in report["no_attack_cost"]:
        print(
            f"no attack, {cost['task']} {cost['mode']}{' non-iid' * cost['non_iid']}, {cost['defences']} vs off: "
            f"median {cost['median_pct']:+.1f}% "
            f"(range {cost['min_pct']:+.1f}% to {cost['max_pct']:+.1f}%, {cost['repeats']} repeats)"
        )
    for t in report.get("targets", []):
        print(
            f"targets, {t['task']} {t['mode']}: no attack vs off {t['no_attack_vs_off_pct']}%, dropped "
            f"{t['no_attack_dropped_share']}, caught {t['no_attack_honest_caught']}; attacked within 3% of the "
            f"worse reference: {t['attacked_within_3pct']} of {len(t['attacked_vs_reference_pct'])}"
        )
    plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
