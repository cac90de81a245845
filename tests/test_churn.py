"""Peers that die in the middle of an exchange: the others finish without them, correctly."""

import asyncio

import pytest
import torch

from gossiptrain.peer import Peer
from gossiptrain.rounds import Timeouts
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
    sent must have been read, or the others lose them.  The contributor here reads a second late, and the
    owner stops the moment its round returns."""
    options = dict(host_maddrs=[LOOPBACK], round_interval=0.5, timeouts=Timeouts(join=3.0, part=5.0, result=5.0))
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    owner = Peer("linger", **options)
    await owner.start()
    owner_running = True
    try:
        async with FaultyPeer("linger", initial_peers=await owner.maddrs(), fault="slow_reader", **options) as late:
            round_id = owner.next_round_id(lead=0.5)
            reading = asyncio.create_task(late.average(values + 1, 1.0, round_id))
            result = await owner.average(values, 1.0, round_id)
            owner_running = False
            await owner.stop()  # its daemon goes with it: a reply not yet read would be lost now
            mean, theirs = values + 0.5, await reading
            assert result.status == theirs.status == "averaged", (result, theirs)
            assert torch.allclose(theirs.averaged, mean, atol=1e-6) and torch.allclose(result.averaged, mean, atol=1e-6)
    finally:
        if owner_running:
            await owner.stop()


async def _round_with_a_slow_uploader(timeouts: Timeouts) -> tuple[list, object, torch.Tensor, bool]:
    """Two peers and a client on a slow link average one round: the two fast results, the slow one's,
    the fast peers' mean, and whether the slow upload was still on its way when the fast rounds ended."""
    options = dict(host_maddrs=[LOOPBACK], round_interval=0.5, timeouts=timeouts)
    inputs = torch.randn(3, 50_000, generator=torch.Generator().manual_seed(1))
    async with Peer("straggler", **options) as first:
        maddrs = await first.maddrs()
        async with (
            Peer("straggler", initial_peers=maddrs, **options) as second,
            FaultyPeer("straggler", initial_peers=maddrs, fault="slow_uploader", **options) as slow,
        ):
            await first.wait_for_peers(3, timeout=30)
            round_id = first.next_round_id(lead=1.0)
            slow_round = asyncio.create_task(slow.average(inputs[2], 1.0, round_id))
            fast = await asyncio.gather(
                first.average(inputs[0], 1.0, round_id), second.average(inputs[1], 1.0, round_id)
            )
            slow_was_pending = not slow_round.done()
            return list(fast), await slow_round, inputs, slow_was_pending


@pytest.mark.timeout(90)
async def test_a_straggler_is_left_out_of_the_mean_and_still_receives_it():
    """The owners reduce without the slice that is late by the straggler deadline and end their round
    before it arrives; the straggler gets the fast peers' mean (marked late), so all three agree."""
    fast, slow, inputs, slow_was_pending = await _round_with_a_slow_uploader(Timeouts(join=3.0, part=5.0))
    fast_mean = inputs[:2].mean(dim=0)
    assert slow_was_pending, "the fast peers waited for the straggler's upload"
    for result in fast:
        assert result.status == "averaged", result.errors
        assert torch.allclose(result.averaged, fast_mean, atol=1e-6), "the late slice was averaged in"
        assert any("straggler deadline" in error for error in result.errors), result.errors
    assert slow.status == "averaged", slow.errors
    assert torch.allclose(slow.averaged, fast_mean, atol=1e-6), "the straggler did not take the group's mean"
    assert any("late" in error for error in slow.errors), slow.errors


@pytest.mark.timeout(90)
async def test_without_a_straggler_deadline_every_slice_is_waited_for():
    fast, slow, inputs, _ = await _round_with_a_slow_uploader(Timeouts(join=3.0, part=5.0, straggler_grace=None))
    mean = inputs.mean(dim=0)
    for result in [*fast, slow]:
        assert result.status == "averaged", result.errors
        assert torch.allclose(result.averaged, mean, atol=1e-6)
