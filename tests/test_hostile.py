"""Hostile but well-formed group members: robust owners bound them, members refuse a shifted mean."""

import asyncio
import contextlib

import pytest
import torch

from gossiptrain.allreduce import DEFAULT_DEFENCES, VECTOR, Defences
from gossiptrain.peer import Peer
from gossiptrain.rounds import AVERAGED, Timeouts
from gossiptrain.testing import LOOPBACK, FaultyPeer, GhostFlood

NUMEL = 40_000


def honest_inputs(count: int = 3, scale: float = 1.0) -> torch.Tensor:
    """Peers near one point, 0.01 apart per value, as after a few local steps from a common state
    (all times ``scale``: the size of a model's parameters)."""
    generator = torch.Generator().manual_seed(3)
    centre = torch.randn(NUMEL, generator=generator)
    return scale * torch.stack([centre + 0.01 * torch.randn(NUMEL, generator=generator) for _ in range(count)])


async def one_round(
    fault: str,
    *,
    hostile_reduces: bool,
    defences: Defences = DEFAULT_DEFENCES,
    rounds: int = 1,
    scale: float = 1.0,
) -> tuple[list, torch.Tensor]:
    """Three honest peers and one hostile one average ``rounds`` rounds in one group, each round from
    the last one's results: the honest peers' last results with their rejections, and the inputs
    (``honest_inputs(scale=scale)``)."""
    options = dict(host_maddrs=[LOOPBACK], round_interval=0.5, timeouts=Timeouts(join=3.0, part=5.0), defences=defences)
    inputs = honest_inputs(scale=scale)
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(Peer("hostile", **options))
        maddrs = await first.maddrs()
        honest = [first] + [
            await stack.enter_async_context(Peer("hostile", initial_peers=maddrs, **options)) for _ in "ab"
        ]
        bad = FaultyPeer("hostile", initial_peers=maddrs, fault=fault, client_mode=not hostile_reduces, **options)
        bad = await stack.enter_async_context(bad)
        await first.wait_for_peers(4, timeout=30)
        values = list(inputs)
        for _ in range(rounds):
            round_id = first.next_round_id(lead=1.0)
            results = await asyncio.gather(
                *(peer.average(own, 1.0, round_id, mode="params") for peer, own in zip(honest, values)),
                bad.average(inputs.mean(dim=0), 1.0, round_id, mode="params"),
            )
            values = [result.averaged for result in results[:3]]
        rejections = [peer.rejections for peer in honest]
    return list(zip(results[:3], rejections)), inputs


def spread(inputs: torch.Tensor) -> float:
    return max(torch.linalg.vector_norm(a - b).item() for a in inputs for b in inputs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["huge", "heavy"])
async def test_a_hostile_member_moves_honest_results_by_at_most_three_times_their_spread(fault):
    """``huge``: its values times 1e4; ``heavy``: its values plus 1 with a claimed weight of 1e9.  Each honest
    owner left its contribution out, and says so: ``partial``."""
    results, inputs = await one_round(fault, hostile_reduces=False)
    honest_mean = inputs.mean(dim=0)
    for result, _ in results:
        assert result.status == "partial" and len(result.combined) == 3, result.errors
        assert (result.refused, result.clipped, result.dropped) == ([], 0, 1), result.errors
        assert result.agreed == result.combined, "every mean combined all four members"
        moved = torch.linalg.vector_norm(result.averaged - honest_mean).item()
        assert moved <= 3 * spread(inputs), f"moved {moved / spread(inputs):.1f}x the honest spread"


@pytest.mark.timeout(120)
async def test_a_member_caught_far_beyond_any_honest_size_counts_nothing_in_later_rounds():
    """Values 1e4 times the parameters' size are dropped and their sender is caught: in the next round
    its slices are refused outright, and the honest peers take exactly the same means."""
    results, inputs = await one_round("huge", hostile_reduces=False, rounds=2)
    for result, rejections in results:
        assert result.status == "partial" and len(result.combined) == 3, result.errors
        assert result.dropped == 1, "the caught member's slice of each honest owner's shard"
        assert rejections["caught"] >= 1 and rejections["dropped"] >= 1, rejections
        assert torch.equal(result.averaged, results[0][0].averaged), "one mean for every honest peer"
    moved = torch.linalg.vector_norm(results[0][0].averaged - inputs.mean(dim=0)).item()
    assert moved <= 3 * spread(inputs), f"moved {moved / spread(inputs):.1f}x the honest spread"


@pytest.mark.timeout(120)
async def test_without_defences_the_same_member_moves_them_far():
    results, inputs = await one_round("huge", hostile_reduces=False, defences=Defences.off())
    for result, _ in results:
        assert torch.linalg.vector_norm(result.averaged - inputs.mean(dim=0)).item() > 100 * spread(inputs)


@pytest.mark.timeout(120)
async def test_a_mean_that_left_a_member_out_is_not_checked_next_round():
    """The owners refuse the fourth member's slices: their means combine three of four members, whose
    values therefore still differ there, so next round's honest mean may lie far from ours."""
    results, _ = await one_round("wrong_run", hostile_reduces=False)
    for result, rejections in results:
        assert result.status == "averaged" and len(result.combined) == 3, result.errors
        assert result.agreed == [], "no shard's mean combined the whole group"
        assert rejections["wrong_run"] >= 1, rejections


@pytest.mark.timeout(120)
async def test_a_shifted_mean_is_refused_counted_and_changes_no_honest_values():
    results, inputs = await one_round("shifted_mean", hostile_reduces=True)
    for index, (result, rejections) in enumerate(results):
        assert rejections["hostile_mean"] == 1, rejections
        held = torch.zeros(NUMEL, dtype=torch.bool)
        for start, end in result.combined:
            held[start:end] = True
        assert len(result.combined) == 3, "the three honest owners' means are taken"
        assert result.status == "partial" and len(result.refused) == 1, (result.status, result.refused)
        assert torch.equal(result.averaged[~held], inputs[index][~held]), "the refused shard keeps the own values"
        assert (result.averaged[held] - inputs[index][held]).abs().max() < 0.1, "the honest means are near"
        assert len(result.agreed) == 4, "the refused shard still agrees with the group: checked next round"


@pytest.mark.timeout(120)
async def test_a_hostile_owner_is_refused_again_in_the_next_round_with_the_same_group():
    """As in ``finish()``: the same owner, the same shard; its second shifted mean is checked too."""
    results, inputs = await one_round("shifted_mean", hostile_reduces=True, rounds=2)
    for index, (result, rejections) in enumerate(results):
        assert rejections["hostile_mean"] == 2, rejections
        held = torch.zeros(NUMEL, dtype=torch.bool)
        for start, end in result.combined:
            held[start:end] = True
        assert torch.equal(result.averaged[~held], inputs[index][~held]), "twice refused: still the own values"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scale", [0.05, 0.4])
async def test_a_mean_larger_than_any_honest_parameters_is_refused_and_its_owner_caught_by_size_alone(scale):
    """Parameters of the digits model's size (0.05 per value): the hostile owner's +1 makes its mean 20x
    their size; at 0.4 per value 2.7x, under ``catch``'s 4x and over ``catch_mean``'s 2x.  With the mean check
    off, as on shards that a member's last round did not leave whole (or where honest peers lie so far apart
    that its floor is large), the size check refuses it and catches the owner.  Next round the three honest
    members name it caught in their records, so the leader gives it no shard (``matchmaking.accused``): its
    slices are refused, and the honest peers average every value among themselves."""
    results, inputs = await one_round(
        "shifted_mean", hostile_reduces=True, defences=Defences(mean_check=None), rounds=2, scale=scale
    )
    for result, rejections in results:
        assert rejections["hostile_mean"] == 1 and rejections["caught"] >= 1, rejections
        assert len(result.combined) == 3 and result.dropped == 1, result.errors
        assert torch.allclose(result.averaged, results[0][0].averaged, atol=1e-6), "they agree on every value"


@pytest.mark.timeout(240)
async def test_twenty_ghosts_per_round_leave_honest_peers_averaging_with_one_another():
    """An open run: once four honest peers have averaged together, 20 fresh never-answering identities
    registered for every round take only newcomer seats (``groups.guarded_groups``)."""
    numel, rounds = 20_000, 8
    options = dict(host_maddrs=[LOOPBACK], round_interval=1.0, timeouts=Timeouts(join=2.0, part=5.0))
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(Peer("ghosts", **options))
        maddrs = await first.maddrs()
        honest = [first] + [
            await stack.enter_async_context(Peer("ghosts", initial_peers=maddrs, **options)) for _ in "abc"
        ]
        await first.wait_for_peers(4, timeout=30)
        names = {peer.peer_id for peer in honest}
        values = [torch.full((numel,), float(i)) for i in range(4)]

        async def average(peer, value, round_id=None):
            return await peer.average(value, 1.0, round_id)

        warm_up = first.next_round_id(lead=1.0)
        before = await asyncio.gather(*(average(peer, value, warm_up) for peer, value in zip(honest, values)))
        assert all(result.answered for result in before), [result.errors for result in before]
        record = {"schema": None, "numel": numel, "mode": VECTOR}  # what Peer.average registers by default
        flood = await stack.enter_async_context(GhostFlood("ghosts", maddrs, record=record, count=20))

        async def rounds_of(peer, value):
            return [await average(peer, value) for _ in range(rounds)]

        results = await asyncio.gather(*(rounds_of(peer, value) for peer, value in zip(honest, values)))
    outcomes = [result for per_peer in results for result in per_peer]
    assert flood.registered >= 20 * rounds
    assert sum(result.participants >= 20 for result in outcomes) >= len(outcomes) // 2, "the ghosts were seen"
    share = sum(result.status in AVERAGED and bool(result.answered & names) for result in outcomes) / len(outcomes)
    assert share >= 0.75, (share, [(r.status, len(r.group), r.errors[:2]) for r in outcomes])
