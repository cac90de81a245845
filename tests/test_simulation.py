"""Rounds of simulated peers in one process: the real round code over in-memory streams."""

import pytest
import torch

from gossiptrain.allreduce import Defences, GroupPlan
from gossiptrain.simulation import SimulatedPeer, simulate_round, simulated_peer_id
from gossiptrain.testing import faulty_exchange


def _swarm(count: int, numel: int = 5000, seed: int = 0) -> tuple[list[SimulatedPeer], dict[str, torch.Tensor]]:
    peers = [SimulatedPeer(simulated_peer_id(f"peer{i}")) for i in range(count)]
    generator = torch.Generator().manual_seed(seed)
    return peers, {peer.peer_id: torch.randn(numel, generator=generator) for peer in peers}


async def test_a_group_takes_the_weighted_mean_and_8_or_16_peers_in_groups_of_four_the_global_mean_in_two_rounds():
    peers, values = _swarm(4)
    weights = {peer.peer_id: float(i + 1) for i, peer in enumerate(peers)}
    expected = sum(values[p] * (w / sum(weights.values())) for p, w in weights.items())
    results = await simulate_round(peers, values, weights, 0, defences=Defences.off())
    for result in results.values():
        assert result.status == "averaged" and len(result.group) == 4
        assert torch.allclose(result.averaged, expected, atol=1e-5)

    for count in (8, 16):  # 16 = 4 ** 2: two rounds of groups of 4 mix everyone (the live test is slow in CI)
        peers, values = _swarm(count)
        expected = torch.stack(list(values.values())).mean(0)
        for round_id in range(2):
            weights = dict.fromkeys(values, 1.0)
            results = await simulate_round(peers, values, weights, round_id, defences=Defences.off())
            assert {len(result.group) for result in results.values()} == {4}
            values = {peer: result.averaged for peer, result in results.items()}
        for result in values.values():
            assert torch.allclose(result, expected, atol=1e-5)


async def test_the_same_inputs_give_the_same_results_bit_for_bit():
    outcomes = []
    for _ in range(2):
        peers, values = _swarm(6, seed=3)
        weights = {peer.peer_id: 1.0 + i for i, peer in enumerate(peers)}
        for round_id in range(3):
            results = await simulate_round(peers, values, weights, round_id)
            values = {peer: result.averaged for peer, result in results.items()}
        outcomes.append(torch.stack([values[peer.peer_id] for peer in peers]))
    assert torch.equal(outcomes[0], outcomes[1])


async def test_a_hostile_owner_s_shifted_mean_is_refused_and_counted_and_changes_no_honest_values():
    peers, values = _swarm(4)
    weights = dict.fromkeys(values, 1.0)
    results = await simulate_round(peers, values, weights, 0)  # the group agrees: next round's means are checked
    values = {peer.peer_id: results[peer.peer_id].averaged + 0.01 * (i + 1) for i, peer in enumerate(peers)}
    hostile = peers[-1]
    hostile.exchange_class = faulty_exchange("shifted_mean")
    results = await simulate_round(peers, values, weights, 1)
    start, end = GroupPlan.build("simulated", 1, list(values), 5000).shards()[hostile.peer_id]
    for peer in peers[:-1]:
        assert peer.rejections["hostile_mean"] == 1
        assert torch.equal(results[peer.peer_id].averaged[start:end], values[peer.peer_id][start:end])
        assert len(results[peer.peer_id].combined) == 3  # the honest owners' means were taken


@pytest.mark.parametrize("fault", ["huge", "heavy"])
@pytest.mark.parametrize(("codec", "mode"), [("int8", "params"), ("none", "outer"), ("int8", "outer")])
async def test_a_hostile_member_is_bounded_with_a_lossy_codec_and_on_pseudo_gradients(fault, codec, mode):
    """As ``tests/test_hostile.py`` over sockets, with error feedback and in the outer mode's rounds:
    honest results move by at most 3x the honest peers' own spread."""
    peers, _ = _swarm(4)
    generator = torch.Generator().manual_seed(5)
    scale = 1.0 if mode == "params" else 0.01  # parameters, or a pseudo-gradient: what H steps moved them
    centre = scale * torch.randn(5000, generator=generator)
    values = {peer.peer_id: centre + scale * 0.01 * torch.randn(5000, generator=generator) for peer in peers}
    residuals = {peer.peer_id: torch.zeros(5000) for peer in peers}
    peers[-1].client = True
    peers[-1].exchange_class = faulty_exchange(fault)
    results = await simulate_round(
        peers, values, dict.fromkeys(values, 1.0), 0, codec=codec, mode=mode, residuals=residuals
    )
    honest = torch.stack([values[peer.peer_id] for peer in peers[:-1]])
    spread = max(torch.linalg.vector_norm(a - b).item() for a in honest for b in honest)
    for peer in peers[:-1]:
        assert results[peer.peer_id].status == "averaged"
        moved = torch.linalg.vector_norm(results[peer.peer_id].averaged - values[peer.peer_id]).item()
        assert moved <= 3 * spread, (moved, spread)


async def test_two_huge_members_in_a_group_of_three_are_caught_by_the_owner_s_own_size():
    """A hostile majority at an owner: the clip's median distance is theirs, but their size is judged
    against the owner's own values, so both are caught and the owner keeps its values."""
    peers, values = _swarm(3)
    for peer in peers[1:]:
        peer.client = True
        peer.exchange_class = faulty_exchange("huge")
    owner = peers[0].peer_id
    results = await simulate_round(peers, values, dict.fromkeys(values, 1.0), 0)
    assert torch.equal(results[owner].averaged, values[owner])
    assert peers[0].rejections["dropped"] == 2
    assert peers[0].caught == {peer.peer_id for peer in peers[1:]}
