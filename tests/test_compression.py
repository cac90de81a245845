"""Compressed averaging over real peers: a sparse round's bookkeeping, consensus and accuracy with int8 and top-k."""

import asyncio
import math
import statistics
import time
from contextlib import asynccontextmanager

import pytest
import torch

from gossiptrain.codecs import get_codec
from gossiptrain.demo import spread
from gossiptrain.peer import Peer
from gossiptrain.rounds import Timeouts
from gossiptrain.testing import LOOPBACK, LocalSwarm
from gossiptrain.wire import WireState
from tests.peer_workers import consensus_rounds, finish_only, train_digits

IN_PROCESS = dict(host_maddrs=[LOOPBACK], round_interval=0.5, timeouts=Timeouts(join=1.5, part=1.0, result=3.0))


@asynccontextmanager
async def three_peers(run_id: str):
    """Three in-process peers of ``run_id`` that see each other."""
    async with Peer(run_id, **IN_PROCESS) as first:
        initial_peers = await first.maddrs()
        async with (
            Peer(run_id, initial_peers=initial_peers, **IN_PROCESS) as second,
            Peer(run_id, initial_peers=initial_peers, **IN_PROCESS) as third,
        ):
            await first.wait_for_peers(3, timeout=30)
            yield [first, second, third]


async def average_together(peers, values, weights, residuals, round_id=None, **options):
    """One round of ``peers`` (the next one unless ``round_id``), each averaging its values with its residual."""
    round_id = peers[0].next_round_id(lead=0.5) if round_id is None else round_id
    return await asyncio.gather(
        *(
            peer.average(x, w, round_id, residual=r, **options)
            for peer, x, w, r in zip(peers, values, weights, residuals)
        )
    )


@pytest.mark.timeout(120)
async def test_a_sparse_round_returns_a_mean_as_sparse_as_one_contribution_and_loses_no_mass():
    """gTop-k: the owners send back the top 1% of each shard's mean, not the up to 3% that three
    members' top 1% cover; where the mean is zero, each member keeps what it sent in its residual."""
    codec, numel, weights = get_codec("topk:0.01"), 30_000, [1.0, 2.0, 3.0]
    deltas = list(torch.randn(3, numel, generator=torch.Generator().manual_seed(0)))
    residuals = [torch.zeros(numel) for _ in weights]
    async with three_peers("gtopk") as peers:
        results = await average_together(peers, deltas, weights, residuals, mode="delta", codec=codec)
    assert [r.status for r in results] == ["averaged"] * 3 and all(len(r.combined) == 3 for r in results), results
    mean = results[0].averaged
    assert all(torch.equal(r.averaged, mean) for r in results), "the members must end with the same mean"
    assert 0 < int(torch.count_nonzero(mean)) <= 0.01 * numel + 3, int(torch.count_nonzero(mean))
    kept = mean == 0
    for x, r in zip(deltas, residuals):
        assert torch.equal(r[kept], x[kept]), "where no mean came back, the member keeps all it had"
    before = sum(w * x for w, x in zip(weights, deltas))
    after = sum(w * (mean + r) for w, r in zip(weights, residuals))
    assert torch.allclose(after, before, atol=1e-4), (after - before).abs().max()


@pytest.mark.timeout(120)
async def test_int8_rounds_keep_the_groups_weighted_sum_of_parameters_and_residuals():
    """What the int8 mean rounds off is kept by the shard's owner (its residual): over rounds with
    local changes in between, the group's weighted sum of parameters plus residuals is the sum of
    its inputs, to float precision.  Without it each round loses up to half a quantization step."""
    codec, numel, weights = get_codec("int8"), 30_000, [1.0, 2.0, 3.0]
    generator = torch.Generator().manual_seed(0)
    params = list(torch.randn(3, numel, generator=generator))
    residuals = [torch.zeros(numel) for _ in weights]
    expected = sum(w * x for w, x in zip(weights, params))
    async with three_peers("owner-ef") as peers:
        for _ in range(4):
            results = await average_together(peers, params, weights, residuals, codec=codec, mode="params")
            assert [r.status for r in results] == ["averaged"] * 3, results
            held = sum(w * (r.averaged + residual) for w, r, residual in zip(weights, results, residuals))
            assert (held - expected).abs().max() < 1e-4, (held - expected).abs().max()
            steps = list(1e-3 * torch.randn(3, numel, generator=generator))  # smaller than int8's step
            params = [r.averaged + step for r, step in zip(results, steps)]
            expected = expected + sum(w * step for w, step in zip(weights, steps))


@pytest.mark.timeout(120)
async def test_peers_that_agree_after_a_final_round_stay_together_however_they_split():
    """``finish()``'s rounds are "final" (``gossiptrain.wire``): after one whole round the peers
    hold the same values, and one that leaves then is not left behind by the others' next round.
    With error feedback that round would move them by the mean of their residuals."""
    numel, weights = 30_000, [1.0, 2.0, 3.0]
    states = [WireState(get_codec("int8")) for _ in weights]
    params = list(torch.randn(3, numel, generator=torch.Generator().manual_seed(0)))

    async def round_of(peers, members, mode):
        round_id = peers[0].next_round_id(lead=0.5)
        wires = [states[i].contribution(params[i], round_id, mode) for i in members]
        results = await average_together(
            [peers[i] for i in members],
            [wire.values for wire in wires],
            [weights[i] for i in members],
            [wire.residual for wire in wires],
            round_id=round_id,
            mode=wires[0].mode,
            codec=wires[0].codec,
        )
        assert [r.status for r in results] == ["averaged"] * len(members), results
        for i, wire, result in zip(members, wires, results):
            params[i] = states[i].combine(result, params[i], wire.mode)

    async with three_peers("final") as peers:
        await round_of(peers, [0, 1, 2], mode=None)  # a training round leaves rounding in the residuals
        assert all(state.params_residual.abs().max() > 1e-4 for state in states)
        await round_of(peers, [0, 1, 2], mode="final")
        assert all(torch.equal(x, params[2]) for x in params), "a whole final round ends in agreement"
        await round_of(peers, [0, 1], mode="final")  # peer 2 has left
        assert all(torch.equal(x, params[2]) for x in params), max((x - params[2]).abs().max() for x in params)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("codec", ["int8", "topk:0.01+int8"])
def test_compressed_peers_reach_consensus_without_local_steps(codec):
    """Peers that only average (groups of 2 out of 4) pull together round over round.

    A group ends each round in exact agreement; what is left between groups shrinks at every
    round that mixes them, down to the codec's resolution (the int8 step of a value, about 0.4% of
    its block's largest value), where error feedback keeps each peer's rounding in its residual.
    For the sparse chain only the dense rounds (every second one here) average the parameters.
    """
    num_peers, rounds = 4, 12
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ready, go, start_round = swarm.context.Queue(), swarm.context.Event(), swarm.context.Value("q", 0)
        for seed in range(num_peers):
            swarm.spawn(
                seed, consensus_rounds, swarm.initial_peers, seed, codec, num_peers, ready, go, start_round, rounds
            )
        for _ in range(num_peers):
            ready.get(timeout=120)
        start_round.value = math.ceil((time.time() + 2.0) / 1.0)
        go.set()
        histories = swarm.results(num_peers, timeout=240)
    per_round = [spread([histories[p][i][2] for p in range(num_peers)]) for i in range(rounds)]
    statuses = [histories[p][i][1] for p in range(num_peers) for i in range(rounds)]
    assert statuses.count("averaged") >= 0.9 * len(statuses), statuses
    resolution = 1e-2 * per_round[0]
    assert per_round[-1] < resolution, per_round
    dense_rounds = [s for i, s in enumerate(per_round) if (histories[0][i][0] % 2 == 0 or codec == "int8")]
    assert all(b <= max(a * 1.01, resolution) for a, b in zip(dense_rounds, dense_rounds[1:])), per_round


@pytest.mark.timeout(300)
def test_peers_with_a_sparse_codec_finish_in_agreement_whatever_the_round_ids():
    """``finish()`` averages the parameters at once, not at the next round id of a dense round
    (here never): finishing peers group together and leave with the same parameters."""
    num_peers = 3
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ready = swarm.context.Queue()
        options = dict(sync_every=10**9, codec="topk:0.01+int8")  # round ids never call for a params round
        for seed in range(num_peers):
            swarm.spawn(seed, finish_only, swarm.initial_peers, seed, num_peers, ready, options)
        results = swarm.results(num_peers, timeout=240)
    before, after, rounds_done = zip(*results.values())
    assert all(done >= 1 for done in rounds_done), rounds_done  # the last may be alone: the others left
    assert spread(list(after)) < 1e-2 * spread(list(before)), (spread(list(before)), spread(list(after)))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("codec", ["int8", "topk:0.01+int8"])
def test_compressed_training_on_digits_is_as_accurate_as_uncompressed(codec, uncompressed_digits_runs):
    """Mean accuracy over repeated runs: a single run's accuracy varies by about a point."""
    runs = train_digits(codec)
    baseline = statistics.mean(min(run["accuracy"]) for run in uncompressed_digits_runs)
    assert statistics.mean(min(run["accuracy"]) for run in runs) >= baseline - 0.02, (runs, baseline)
    assert all(run["spread"] < 1e-6 for run in runs), runs  # finish() ends in agreement, whatever the codec
