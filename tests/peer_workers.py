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
from gossiptrain.exchange import Timeouts
from gossiptrain.peer import Peer
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


def average_rounds(initial_peers, averaging, seed, weight, fault, ready, go, start_round):
    """Join, signal ready, wait for the parent's start round, then average ``rounds`` consecutive rounds.

    With a ``fault``, this peer is a ``FaultyPeer`` that owns a shard like any other member.
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
            ready.put(peer.peer_id)
            await asyncio.get_running_loop().run_in_executor(None, go.wait, 120)
            values = torch.randn(averaging.numel, generator=torch.Generator().manual_seed(seed))
            history = []
            for round_id in range(start_round.value, start_round.value + averaging.rounds):
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
            return {"values": values, "history": history}

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


def finish_only(initial_peers, seed, num_peers, ready, options):
    """A peer that only finishes, with ``GossipOptimizer`` ``options``.
    Returns its parameters before and after, and how many rounds it averaged."""
    with averaging_only(initial_peers, seed, "finish", num_peers, **options) as (optimizer, flat):
        ready.put(seed)
        before = flat()
        optimizer.finish(timeout=90)
        return before, flat(), optimizer.rounds_done


def run_averaging(num_peers, group_size, numel, rounds, weights, faults=None, interval=2.0, timeouts=None):
    """Spawn peers that average seeded random tensors; returns the healthy ones' results and the
    exact weighted mean of all inputs (``faults``: peer index -> FaultyPeer fault; ``timeouts``: the
    peers' ``Timeouts``, None for the defaults)."""
    faults = faults or {}
    averaging = Averaging(numel, group_size, interval, num_peers, rounds, timeouts)
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ready, go, start_round = swarm.context.Queue(), swarm.context.Event(), swarm.context.Value("q", 0)
        for i in range(num_peers):
            signals = (ready, go, start_round)
            swarm.spawn(i, average_rounds, swarm.initial_peers, averaging, i, weights[i], faults.get(i), *signals)
        for _ in range(num_peers):
            ready.get(timeout=120)
        next_slot = math.ceil((time.time() + 5.0) / interval)  # every peer registers before the slot, even if starved
        start_round.value = next_slot + next_slot % 2  # an even round: the first of a Moshpit epoch
        go.set()
        results = swarm.results(num_peers - len(faults), timeout=120)
    return results, seeded_inputs(num_peers, numel)


def seeded_inputs(num_peers, numel):
    return torch.stack([torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(num_peers)])


def weighted_mean(inputs, weights):
    weights = torch.tensor(weights, dtype=torch.float64)
    return ((inputs.double() * weights[:, None]).sum(0) / weights.sum()).float()
