"""Honest but far apart is not hostile: the defences bound attackers without clipping honest peers that differ."""

import math

import torch

from gossiptrain import sketches
from gossiptrain.allreduce import Defences
from gossiptrain.linkswitch import LinkSpec
from gossiptrain.simulation import SimulatedSwarm
from gossiptrain.testing import faulty_exchange
from gossiptrain.virtual_time import run

WAN = LinkSpec(mbit=100, rtt_ms=50)


def _far_apart(names, numel: int = 512) -> dict[str, torch.Tensor]:
    """``randn + i`` for peer i: honest values as far apart as peers that trained on different data."""
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(numel, generator=generator) + i for i, name in enumerate(names)}


async def _epoch(
    defences: Defences, hostile: str | None = None, group: int = 4, depth: int = 2
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """``group ** depth`` peers (one cell) average far-apart vectors for one Moshpit epoch (``depth`` rounds of groups
    of ``group``), the last one ``hostile`` where given: their values and the statuses of their rounds."""
    swarm = SimulatedSwarm(link=WAN, defences=defences, round_interval=2.0, target_group_size=group)
    count = group**depth
    for i in range(count):
        await swarm.add(f"peer{i}", client=hostile is not None and i == count - 1)
    if hostile is not None:
        swarm.peers[f"peer{count - 1}"].exchange_class = faulty_exchange(hostile)
    values = _far_apart(swarm.peers)
    first = depth * math.ceil(max(peer.next_round_id() for peer in swarm.peers.values()) / depth)
    statuses = set()
    for round_id in range(first, first + depth):
        results = await swarm.round(values, round_id=round_id)
        statuses.update(r.status for r in results.values())
        values = {name: r.averaged for name, r in results.items()}
    await swarm.close()
    return values, statuses


def test_far_apart_honest_vectors_reach_the_exact_mean_with_the_default_defences():
    """``Peer.average``'s default mode judges vectors against the cell's spread (``sketches``): 27 honest peers 26
    apart, in groups of 3, are not clipped, no mean is refused, and they stay one cell (``membership.LEVEL_MARGIN``),
    so one epoch of three rounds gives every peer the global mean."""
    expected = torch.stack(list(_far_apart([f"peer{i}" for i in range(27)]).values())).mean(0)
    values, statuses = run(_epoch(Defences(), group=3, depth=3))
    assert statuses == {"averaged"}
    for averaged in values.values():
        assert torch.allclose(averaged, expected, atol=1e-4)
    _, statuses = run(_epoch(Defences(cell_spread=None)))  # the group's own median alone clips them
    assert "partial" in statuses


def test_a_huge_member_among_far_apart_honest_peers_moves_them_by_no_more_than_their_own_spread():
    honest = [f"peer{i}" for i in range(15)]
    inputs = _far_apart([*honest, "peer15"])
    expected = torch.stack([inputs[name] for name in honest]).mean(0)
    spread = max(torch.linalg.vector_norm(inputs[a] - inputs[b]).item() for a in honest for b in honest)
    defended, _ = run(_epoch(Defences(), hostile="huge"))
    undefended, _ = run(_epoch(Defences.off(), hostile="huge"))
    for name in honest:
        assert torch.linalg.vector_norm(defended[name] - expected).item() <= spread
        assert torch.linalg.vector_norm(undefended[name] - expected).item() > 100 * spread


def _sketch(values: torch.Tensor) -> bytes:
    return sketches.sketch(values, "run", 7)


def test_the_cell_s_typical_distance_ignores_a_liar_and_what_does_not_decode():
    generator = torch.Generator().manual_seed(1)
    own = torch.randn(10_000, generator=generator)
    honest = [_sketch(own + 0.1 * k * torch.randn(10_000, generator=generator)) for k in range(1, 11)]
    typical = sketches.typical_distance(_sketch(own), honest, 0.9)
    assert 0.5 < typical < 1.0  # near the 90th percentile of 0.1 ... 1.0
    liar = _sketch(own * 1e4)
    assert sketches.typical_distance(_sketch(own), [*honest, liar], 0.9) <= 1.0
    assert sketches.typical_distance(_sketch(own), [*honest, b"short", None, 3], 0.9) == typical
    assert sketches.typical_distance(_sketch(own), honest[:1], 0.9) == 0.0  # one other: no floor a liar could set
    assert sketches.sketch(own, "run", 7) == sketches.sketch(own, "run", 7) != sketches.sketch(own, "run", 8)


def test_values_far_larger_than_the_cell_s_move_neither_its_spread_nor_its_size():
    """Two of six peers whose values are 10x the others' (hostile, or corrupted by a hostile mean) would set the
    upper quantiles: ``of_honest_size`` leaves them out before the cell's distance and size are taken."""
    generator = torch.Generator().manual_seed(3)
    own = torch.randn(10_000, generator=generator)
    honest = [_sketch(own + 0.1 * torch.randn(10_000, generator=generator)) for _ in range(3)]
    large = [_sketch(10 * torch.randn(10_000, generator=generator)) for _ in range(2)]
    kept = sketches.of_honest_size([*honest, *large], 4.0)
    assert kept == honest
    assert (
        sketches.typical_distance(_sketch(own), kept, 0.9)
        < 0.2
        < sketches.typical_distance(_sketch(own), [*honest, *large], 0.9)
    )
    assert sketches.of_honest_size([*honest, *large], None) == [*honest, *large]
    assert sketches.of_honest_size(large, 4.0) == large, "fewer than three: no median to judge by"


def test_two_halves_that_trained_apart_while_the_dht_was_split_merge_into_one_model_with_no_peer_caught():
    """Two groups of three averaged only among themselves (a DHT split): each agrees inside, the two lie apart
    by half the parameters' size.  Healed, their parameter rounds (``mode="params"``, every defence on) bring
    all six to one model, and no peer is caught or refused."""

    async def main():
        swarm = SimulatedSwarm(link=WAN, round_interval=2.0, target_group_size=3)
        for i in range(6):
            await swarm.add(f"peer{i}")
        generator = torch.Generator().manual_seed(2)
        model = 0.05 * torch.randn(4096, generator=generator)
        halves = [model + 0.025 * torch.randn(4096, generator=generator) for _ in range(2)]
        values = {name: halves[i // 3].clone() for i, name in enumerate(swarm.peers)}
        expected = (halves[0] + halves[1]) / 2
        first = max(peer.next_round_id() for peer in swarm.peers.values())
        statuses = []
        for round_id in range(first, first + 8):
            results = await swarm.round(values, round_id=round_id, mode="params")
            statuses += [r.status for r in results.values()]
            values = {name: r.averaged for name, r in results.items()}
        caught = [peer.caught for peer in swarm.peers.values()]
        refused = sum(peer.rejections["hostile_mean"] for peer in swarm.peers.values())
        await swarm.close()
        return values, expected, statuses, caught, refused

    values, expected, statuses, caught, refused = run(main())
    assert set(statuses) == {"averaged"} and refused == 0
    assert not any(caught)
    assert torch.allclose(torch.stack(list(values.values())).mean(0), expected, atol=1e-6)  # nothing clipped
    for averaged in values.values():  # the halves began ~1.1 apart from their mean
        assert torch.linalg.vector_norm(averaged - expected).item() < 1e-3


def test_a_shifted_pseudo_gradient_mean_is_refused_by_the_cell_s_size_where_the_mean_check_does_not_look():
    """Pseudo-gradients (``mode="outer"``) are checked by their mean's distance only where the last round left a
    whole-group mean; elsewhere a hostile owner's mean + 1, 100x the cell's pseudo-gradients, is refused all the
    same (``Defences.catch`` against ``sketches.typical_size``), and nobody is caught for it."""

    async def main():
        swarm = SimulatedSwarm(link=WAN, round_interval=2.0)
        for i in range(4):
            await swarm.add(f"peer{i}")
        swarm.peers["peer3"].exchange_class = faulty_exchange("shifted_mean")
        generator = torch.Generator().manual_seed(3)
        values = {name: 0.01 * torch.randn(5000, generator=generator) for name in swarm.peers}
        for peer in swarm.peers.values():
            peer._agreed["outer"] = []  # as after a round whose shards were not whole: no mean is distance-checked
        results = await swarm.round(values, mode="outer")
        owner = swarm.peers["peer3"].peer_id
        caught = [peer.caught for peer in swarm.peers.values()]
        await swarm.close()
        return values, results, owner, caught

    values, results, owner, caught = run(main())
    for name in ("peer0", "peer1", "peer2"):
        result = results[name]
        assert result.status == "partial" and len(result.refused) == 1, result.errors
        (start, end) = result.refused[0]
        assert torch.equal(result.averaged[start:end], values[name][start:end])
        assert (result.averaged - values[name]).abs().max() < 0.1  # the honest means: near
    assert not any(caught)


def test_a_non_iid_swarm_whose_peers_sit_in_two_clusters_is_neither_clipped_nor_refused():
    """Eight peers, six trained on one part of the data and two on another: parameters in two clusters a cluster's
    own spread x10 apart.  A group of four holds three of one cluster and one of the other, whose distance is 10x the
    group's median; the cell's spread covers both, so nothing is clipped, dropped or refused, round after round."""

    async def main(defences: Defences) -> list:
        swarm = SimulatedSwarm(link=WAN, round_interval=2.0, seed=4, defences=defences)  # seed 4: groups of 3 + 1
        for i in range(8):
            await swarm.add(f"peer{i}")
        generator = torch.Generator().manual_seed(4)
        centres = [0.05 * torch.randn(4096, generator=generator) for _ in range(2)]
        values = {
            name: centres[i < 2] + 0.005 * torch.randn(4096, generator=generator) for i, name in enumerate(swarm.peers)
        }
        first = max(peer.next_round_id() for peer in swarm.peers.values())
        results = []
        for round_id in range(first, first + 4):
            values = {name: v + 0.001 * torch.randn(4096, generator=generator) for name, v in values.items()}  # steps
            round_results = await swarm.round(values, round_id=round_id, mode="params")
            results += round_results.values()
            values = {name: r.averaged for name, r in round_results.items()}
        await swarm.close()
        return results

    results = run(main(Defences()))
    assert [r.status for r in results] == ["averaged"] * len(results)
    assert sum(r.clipped + r.dropped + len(r.refused) for r in results) == 0
    without_floor = run(main(Defences(cell_spread=None)))  # the group's own median: the lone far peer is clipped
    assert sum(r.clipped + r.dropped for r in without_floor) > 0
