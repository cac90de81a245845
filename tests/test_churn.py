"""Peers that die in the middle of an exchange: the others finish without them, correctly."""

import asyncio

import pytest
import torch

from gossiptrain.exchange import Timeouts
from gossiptrain.peer import Peer
from gossiptrain.testing import LOOPBACK, FaultyPeer
from tests.peer_workers import run_averaging, weighted_mean


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["die", "die_before"])
def test_survivors_finish_a_round_whose_member_was_killed(fault):
    """Killed mid-exchange (``die``) or as the round starts, after registering (``die_before``)."""
    numel, weights, victim = 4 * 2**20, [1.0, 2.0, 3.0, 4.0], 3
    results, inputs = run_averaging(4, 4, numel, rounds=1, weights=weights, faults={victim: fault})
    survivors = [i for i in range(4) if i != victim]
    expected = weighted_mean(inputs[survivors], [weights[i] for i in survivors])
    limit = Timeouts().join + Timeouts().part + 2.0
    for index, result in results.items():
        round_ = result["history"][0]
        values = result["values"]
        assert round_["status"] == "averaged", round_
        assert round_["seconds"] < limit, round_
        assert torch.isfinite(values).all()
        held = torch.zeros(numel, dtype=torch.bool)
        for start, end in round_["combined"]:
            held[start:end] = True
            assert (values[start:end] - expected[start:end]).abs().max() < 1e-5
        assert held.sum() == 3 * numel // 4, "every survivor holds the means of the survivors' three shards"
        assert torch.equal(values[~held], inputs[index][~held]), "the dead owner's shard keeps the own values"


@pytest.mark.timeout(60)
async def test_an_owner_ends_its_round_only_once_its_contributor_has_read_the_mean():
    """A peer may stop (and its daemon with it) as soon as its round returns: by then the replies it
    sent must have been read, or the others lose them.  The contributor here reads a second late."""
    options = dict(host_maddrs=[LOOPBACK], round_interval=0.5, timeouts=Timeouts(join=3.0, part=5.0, result=5.0))
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    async with Peer("linger", **options) as owner:
        async with FaultyPeer("linger", initial_peers=await owner.maddrs(), fault="slow_reader", **options) as late:
            round_id = owner.next_round_id(lead=0.5)
            reading = asyncio.create_task(late.average(values + 1, 1.0, round_id))
            result = await owner.average(values, 1.0, round_id)
            assert reading.done(), "the owner's round ended before its contributor had read the mean"
            mean, theirs = values + 0.5, await reading
            assert result.status == theirs.status == "averaged", (result, theirs)
            assert torch.allclose(theirs.averaged, mean, atol=1e-6) and torch.allclose(result.averaged, mean, atol=1e-6)
