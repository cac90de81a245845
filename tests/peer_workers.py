"""Swarms for the tests, and the functions that run inside their spawned peer processes."""

import asyncio
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from gossiptrain.codecs import get_codec
from gossiptrain.demo import run_demo
from gossiptrain.optimizer import GossipOptimizer
from gossiptrain.outer import OuterStrategy
from gossiptrain.peer import Peer
from gossiptrain.rounds import AVERAGED, Timeouts
from gossiptrain.testing import LOOPBACK, FaultyPeer, LocalSwarm

DIGITS_STEPS = 2000
DIGITS_REPEATS = 3  # one run's test accuracy varies by about a point: 0.953-0.972 seen for the same settings


def train_digits(codec: str = "none") -> list[dict]:
    """``DIGITS_REPEATS`` runs of the 4-peer digits demo with ``codec``: each run's accuracies and spread."""
    return [run_demo(num_peers=4, steps=DIGITS_STEPS, timeout=240, codec=codec) for _ in range(DIGITS_REPEATS)]


@dataclass(frozen=True)
class Averaging:
    """What every peer of ``run_averaging`` does: ``rounds`` consecutive rounds over ``numel`` values."""

    numel: int
    group_size: int
    interval: float
    num_peers: int
    rounds: int
    timeouts: Timeouts | None
    outer: bool = False  # outer mode: average pseudo-gradients from ``shared_anchor`` (Nesterov 0.7/0.9)


def shared_anchor(numel: int) -> torch.Tensor:
    """The anchor every outer-mode peer of ``run_averaging`` starts from."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000))


def nesterov(lr: float = 0.7, momentum: float = 0.9):
    """DiLoCo's outer optimizer."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True)


def average_rounds(initial_peers, averaging, seed, weight, fault, ready, go, start_round):
    """Join, signal ready, wait for the parent's start round, then average ``rounds`` consecutive rounds.

    With a ``fault``, this peer is a ``FaultyPeer`` that owns a shard like any other member.  In
    outer mode, its seeded values are its parameters after inner steps from ``shared_anchor``.
    """
    torch.set_num_threads(1)
    options = dict(
        initial_peers=initial_peers,
        host_maddrs=[LOOPBACK],
        target_group_size=averaging.group_size,
        round_interval=averaging.interval,
        timeouts=averaging.timeouts,
    )

    async def main():
        peer_class = Peer if fault is None else partial(FaultyPeer, fault=fault, client_mode=False)
        async with peer_class("avg", **options) as peer:
            await peer.wait_for_peers(averaging.num_peers, timeout=60)
            # built before we say we are ready: an optimizer's first construction imports for seconds, and 16 of
            # them at once on 2 cores would start the rounds late
            values = torch.randn(averaging.numel, generator=torch.Generator().manual_seed(seed))
            outer = OuterStrategy([shared_anchor(averaging.numel)], nesterov(), get_codec("none"), 2**62)
            ready.put(peer.peer_id)
            await asyncio.get_running_loop().run_in_executor(None, go.wait, 120)
            history = []
            for round_id in range(start_round.value, start_round.value + averaging.rounds):
                if averaging.outer:
                    wire = outer.contribution(values, round_id)
                    wire_options = dict(residual=wire.residual, mode=wire.mode, codec=wire.codec)
                    result = await peer.average(wire.values, weight, round_id, **wire_options)
                    values = outer.combine(result, values, wire.mode) if result.status in AVERAGED else values
                else:
                    result = await peer.average(values, weight, round_id)
                    values = result.averaged
                history.append(
                    {
                        "status": result.status,
                        "group": result.group,
                        "errors": result.errors,
                        "seconds": result.seconds,
                        "combined": result.combined,
                        "participants": result.participants,
                        "peer": peer.peer_id,
                    }
                )
            return {"values": values, "history": history, "anchor": outer.anchor}

    return asyncio.run(main())


@contextmanager
def averaging_only(initial_peers, seed, run_id, num_peers, **options):
    """A GossipOptimizer over a small MLP that takes no local steps (lr 0), once ``num_peers`` are
    live; yields it and a function that returns the model's parameters as one flat tensor."""
    from gossiptrain.optimizer import GossipOptimizer

    torch.set_num_threads(1)
    torch.manual_seed(seed)  # every peer starts from different parameters
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with GossipOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        run_id=run_id,
        initial_peers=initial_peers,
        load_state=False,
        average_every=1.0,
        host_maddrs=[LOOPBACK],
        **options,
    ) as optimizer:
        optimizer.wait_for_peers(num_peers, timeout=60)
        yield optimizer, lambda: torch.cat([p.detach().flatten() for p in model.parameters()])


def consensus_rounds(initial_peers, seed, codec, num_peers, ready, go, start_round, rounds):
    """Only averaging, in groups of 2 (a sparse codec: a params round every other round): the
    parameters per round."""
    sync_every = None if get_codec(codec).is_dense else 2
    with averaging_only(
        initial_peers, seed, "consensus", num_peers, target_group_size=2, sync_every=sync_every, codec=codec
    ) as (optimizer, flat):
        ready.put(seed)
        go.wait(120)
        history = []
        for round_id in range(start_round.value, start_round.value + rounds):
            record = optimizer.average_now(timeout=30, round_id=round_id)
            history.append((round_id, record.status, flat().clone()))
        return history


def skewed_rounds(initial_peers, seed, num_peers, skew, ready, go, rounds):
    """A peer whose clock runs ``skew`` seconds ahead of the machine's: the statuses of ``rounds``
    consecutive ``average_now()`` rounds, each picked by the peer itself (registration lead and all)."""
    clock = lambda: time.time() + skew  # noqa: E731
    with averaging_only(initial_peers, seed, "clock", num_peers, clock=clock) as (optimizer, _):
        ready.put(seed)
        go.wait(120)
        return [optimizer.average_now(timeout=30).status for _ in range(rounds)]


def finish_only(initial_peers, seed, num_peers, ready, options):
    """A peer that only finishes, with ``GossipOptimizer`` ``options``.
    Returns its parameters before and after, and how many rounds it averaged."""
    with averaging_only(initial_peers, seed, "finish", num_peers, **options) as (optimizer, flat):
        ready.put(seed)
        before = flat()
        optimizer.finish(timeout=90)
        return before, flat(), optimizer.rounds_done


def run_averaging(num_peers, group_size, numel, rounds, weights, faults=None, interval=2.0, timeouts=None, outer=False):
    """Spawn peers that average seeded random tensors; returns the healthy ones' results and the
    exact weighted mean of all inputs (``faults``: peer index -> FaultyPeer fault; ``timeouts``: the
    peers' ``Timeouts``, None for the defaults; ``outer``: see ``Averaging``)."""
    faults = faults or {}
    averaging = Averaging(numel, group_size, interval, num_peers, rounds, timeouts, outer)
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ready, go, start_round = swarm.context.Queue(), swarm.context.Event(), swarm.context.Value("q", 0)
        for i in range(num_peers):
            signals = (ready, go, start_round)
            swarm.spawn(i, average_rounds, swarm.initial_peers, averaging, i, weights[i], faults.get(i), *signals)
        release(ready, go, start_round, num_peers, interval)
        results = swarm.results(num_peers - len(faults), timeout=120)
    return results, seeded_inputs(num_peers, numel)


def release(ready, go, start_round, count, interval, odd=False):
    """Once ``count`` peers are ready, set ``start_round`` to a round that every one of them can still
    register for, even if starved, and let them go.  The round is even (the first of a Moshpit epoch)
    unless ``odd`` (outer mode: not an anchor-sync round)."""
    for _ in range(count):
        ready.get(timeout=120)
    next_slot = math.ceil((time.time() + 5.0) / interval)
    start_round.value = next_slot + (next_slot + odd) % 2
    go.set()


def outer_training(initial_peers, seed, num_peers, ready, go, start_round, options=None):
    """An MLP in outer mode (Nesterov 0.7/0.9, no compression), every peer from the same initialisation.

    By default: ``seed + 1`` inner steps on data of seed ``seed``, then one outer round in the start
    round (no automatic rounds, no anchor sync).  With ``options`` ``rounds=R, finish=True``: trains
    with automatic rounds every slot until ``R`` outer rounds averaged, then ``finish()``.
    """
    from tests.test_state import mlp, train

    options = options or {}
    torch.set_num_threads(1)
    model = mlp(0)
    automatic = "rounds" in options
    with GossipOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        run_id="outer",
        initial_peers=initial_peers,
        load_state=False,
        average_every=1.0,
        outer_optimizer=nesterov(),
        inner_steps=None if automatic else 2**62,
        anchor_sync_every=5 if automatic else 2**62,
        host_maddrs=[LOOPBACK],
    ) as optimizer:
        flat = lambda: torch.cat([p.detach().flatten() for p in model.parameters()]).clone()  # noqa: E731
        start = flat()
        optimizer.wait_for_peers(num_peers, timeout=60)
        ready.put(seed)
        go.wait(120)
        if not automatic:
            train(optimizer, model, seed + 1, seed)
            trained = flat()
            record = optimizer.average_now(timeout=60, round_id=start_round.value)
            return {"start": start, "trained": trained, "after": flat(), "steps": seed + 1, "status": record.status}
        deadline = time.monotonic() + 120
        while optimizer.rounds_done < options["rounds"] and time.monotonic() < deadline:
            train(optimizer, model, 1, seed + optimizer.local_step)
        trained = flat()
        optimizer.finish(timeout=60)
        return {"start": start, "trained": trained, "final": flat(), "outer_rounds": optimizer.rounds_done}


def seeded_inputs(num_peers, numel):
    return torch.stack([torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(num_peers)])


def weighted_mean(inputs, weights):
    weights = torch.tensor(weights, dtype=torch.float64)
    return ((inputs.double() * weights[:, None]).sum(0) / weights.sum()).float()
