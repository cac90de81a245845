"""Simulated swarms: live ``Peer`` objects on a modelled network in virtual time (seconds of CPU each)."""

import asyncio
import dataclasses
import math
import statistics

import pytest
import torch

from gossiptrain import simnet
from gossiptrain.allreduce import Defences, GroupPlan
from gossiptrain.codecs import get_codec
from gossiptrain.linkswitch import LinkSpec
from gossiptrain.membership import CELL_PEERS
from gossiptrain.outer import OuterStrategy
from gossiptrain.rounds import Timeouts
from gossiptrain.simulation import Scenario, SimulatedSwarm, simulate
from gossiptrain.state import download_state
from gossiptrain.testing import faulty_exchange
from gossiptrain.virtual_time import run
from gossiptrain.wire import WireState

WAN = LinkSpec(mbit=100, rtt_ms=50)


def _values(names, numel: int = 5000, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(numel, generator=generator) for name in names}


async def _swarm(count: int, **options) -> SimulatedSwarm:
    swarm = SimulatedSwarm(**options)
    for i in range(count):
        await swarm.add(f"peer{i}")
    return swarm


def test_sixteen_peers_in_groups_of_four_reach_the_global_mean_in_one_moshpit_epoch():
    """Sixteen peers share one key of round records (level 0): the leader's groups follow Moshpit's grid, and two
    rounds give every peer the exact mean."""

    async def main():
        swarm = await _swarm(16, link=WAN, defences=Defences.off(), round_interval=2.0)
        values = _values(swarm.peers, numel=256)
        expected = torch.stack(list(values.values())).mean(0)
        first = 2 * math.ceil(max(peer.next_round_id() for peer in swarm.peers.values()) / 2)
        for round_id in range(first, first + 2):  # one Moshpit epoch: the rounds of one grid
            results = await swarm.round(values, round_id=round_id)
            assert {r.status for r in results.values()} == {"averaged"}
            assert {len(r.group) for r in results.values()} == {4}
            values = {name: r.averaged for name, r in results.items()}
        assert {peer.membership.level for peer in swarm.peers.values()} == {0}
        await swarm.close()
        return values, expected

    values, expected = run(main())
    for averaged in values.values():
        assert torch.allclose(averaged, expected, atol=1e-5)


def _mix_in_cells(count: int, rounds: int = 10) -> dict:
    """``count`` peers average for ``rounds`` rounds: what they reached and what their DHT calls cost."""

    async def main():
        swarm = await _swarm(count, link=WAN, defences=Defences.off(), round_interval=2.0)
        values = _values(swarm.peers, numel=256)
        expected = torch.stack(list(values.values())).mean(0)
        start = max((v - expected).abs().max().item() for v in values.values())
        first = max(peer.next_round_id() for peer in swarm.peers.values())
        before = {name: dataclasses.replace(peer.membership.traffic) for name, peer in swarm.peers.items()}
        grouped = 0
        for round_id in range(first, first + rounds):
            results = await swarm.round(values, round_id=round_id)
            grouped += sum(r.status == "averaged" and len(r.group) >= 3 for r in results.values())
            values = {name: r.averaged for name, r in results.items()}
        after = {name: peer.membership.traffic for name, peer in swarm.peers.items()}
        traffic = [(t.requests - before[name].requests, t.bytes - before[name].bytes) for name, t in after.items()]
        levels = {peer.membership.level for peer in swarm.peers.values()}
        await swarm.close()
        end = max((v - expected).abs().max().item() for v in values.values())
        return {
            "fell": start / end,
            "mean_error": (torch.stack(list(values.values())).mean(0) - expected).abs().max().item(),
            "grouped": grouped / (rounds * count),
            "levels": levels,
            "calls": statistics.median(calls for calls, _ in traffic) / rounds,
            "bytes": statistics.median(size for _, size in traffic) / rounds,
        }

    return run(main())


def test_larger_swarms_split_their_records_into_cells_and_still_mix_at_a_cost_per_peer_that_stays_flat():
    """Past one key's worth of peers, records go into cells (``membership``): each peer reads about
    ``CELL_PEERS`` records however large the swarm, groups are random within cells that change every round, and
    the spread still falls geometrically while the mean stays where it was."""
    mixed = {count: _mix_in_cells(count) for count in (64, 256)}
    for count, m in mixed.items():
        assert m["levels"] == {round(math.log2(count / CELL_PEERS))}
        assert m["grouped"] >= 0.95 and m["fell"] >= 100 and m["mean_error"] < 1e-5
    # in its rounds, four times the peers cost a peer about the same calls and bytes, not four times the records
    assert mixed[256]["calls"] <= 1.5 * mixed[64]["calls"]
    assert mixed[256]["bytes"] <= 2 * mixed[64]["bytes"]


def test_a_group_takes_the_weighted_mean():
    async def main():
        swarm = await _swarm(4, defences=Defences.off())
        values = _values(swarm.peers)
        weights = {name: float(i + 1) for i, name in enumerate(values)}
        results = await swarm.round(values, weights)
        await swarm.close()
        return values, weights, results

    values, weights, results = run(main())
    expected = sum(values[p] * (w / sum(weights.values())) for p, w in weights.items())
    for result in results.values():
        assert result.status == "averaged" and len(result.group) == 4
        assert torch.allclose(result.averaged, expected, atol=1e-5)


def test_a_round_s_bytes_are_every_byte_its_peers_wrote_to_streams_joins_and_plans_included(monkeypatch):
    """``RoundResult.bytes_sent`` counts the JOIN and PLAN of the leader's round trip as well as the exchange."""
    written: dict[str, int] = {}
    send = simnet._Pipe.send

    def counted(pipe, data):
        if data is not None:
            written[pipe.src.name] = written.get(pipe.src.name, 0) + len(data)
        send(pipe, data)

    async def main():
        swarm = await _swarm(3)
        monkeypatch.setattr(simnet._Pipe, "send", counted)
        results = await swarm.round(_values(swarm.peers, numel=64))
        await swarm.close()
        return results

    results = run(main())
    assert {r.status for r in results.values()} == {"averaged"}
    assert {name: r.bytes_sent for name, r in results.items()} == written
    assert sum(r.bytes_received for r in results.values()) == sum(written.values())


def test_a_scenario_is_the_same_bit_for_bit_from_its_seed_and_differs_with_another():
    scenario = dict(peers=12, numel=2000, rounds=4, churn=0.2, leaves=0.1, rtt_ms=80, jitter_ms=10, loss=0.01)
    first, again, other = (simulate(Scenario(**scenario, seed=seed)) for seed in (3, 3, 4))
    assert (
        first.rounds == again.rounds
        and first.summary["bytes_sent_per_peer_round"] == again.summary["bytes_sent_per_peer_round"]
    )
    assert first.summary["crashed"] == 2 and first.summary["left"] == 1 and first.summary["joined"] == 3
    assert first.rounds != other.rounds


def test_a_peer_that_crashes_mid_round_costs_its_group_that_round_only():
    async def main():
        swarm = await _swarm(8, link=LinkSpec(mbit=10, rtt_ms=100), defences=Defences.off())
        values = _values(swarm.peers, numel=100_000)
        loop = asyncio.get_running_loop()
        round_id = max(peer.next_round_id() for peer in swarm.peers.values())
        tasks = {
            name: asyncio.create_task(peer.average(values[name], round_id=round_id))
            for name, peer in swarm.peers.items()
        }
        ids = {name: peer.peer_id for name, peer in swarm.peers.items()}
        await asyncio.sleep(round_id * 1.0 + 0.3 - loop.time())  # uploads under way (0.24 s of data each)
        tasks.pop("peer3").cancel()
        await swarm.crash("peer3")
        crashed_round = {name: await task for name, task in tasks.items()}
        next_round = await swarm.round({name: result.averaged for name, result in crashed_round.items()})
        await swarm.close()
        return values, ids, crashed_round, next_round

    values, ids, crashed_round, next_round = run(main())
    names = {peer_id: name for name, peer_id in ids.items()}
    hit = [name for name, r in crashed_round.items() if ids["peer3"] in r.group]
    spared = [name for name in crashed_round if name not in hit]
    assert len(hit) == 3 and len(spared) == 4
    spared_mean = torch.stack([values[name] for name in spared]).mean(0)
    plan = GroupPlan.build("simulated", crashed_round[hit[0]].round_id, crashed_round[hit[0]].group, 100_000)
    for name in spared:  # the other group's round is whole
        assert crashed_round[name].status == "averaged"
        assert torch.allclose(crashed_round[name].averaged, spared_mean, atol=1e-5)
    for name in hit:  # the survivors combined their own shards and kept their values on the victim's
        assert crashed_round[name].status == "averaged"
        start, end = plan.shards()[ids["peer3"]]
        assert torch.equal(crashed_round[name].averaged[start:end], values[name][start:end])
        for owner in hit:
            start, end = plan.shards()[ids[owner]]
            assert torch.equal(crashed_round[name].averaged[start:end], crashed_round[owner].averaged[start:end])
    for result in next_round.values():  # and the next round is whole again, without the victim
        assert result.status == "averaged" and len(result.combined) == len(result.group)
        assert "peer3" not in {names[peer_id] for peer_id in result.group}


def test_a_straggler_on_a_slow_link_is_left_out_by_the_deadline_and_still_receives_the_mean():
    async def main():
        swarm = SimulatedSwarm(link=LinkSpec(mbit=100, rtt_ms=20), defences=Defences.off(), round_interval=10.0)
        for i in range(3):
            await swarm.add(f"fast{i}")
        await swarm.add("slow", link=LinkSpec(mbit=1, rtt_ms=20))
        values = _values(swarm.peers, numel=100_000)  # 300 kB to send: 0.024 s fast, 2.4 s slow
        results = await swarm.round(values)
        ids = {name: peer.peer_id for name, peer in swarm.peers.items()}
        await swarm.close()
        return values, results, ids

    values, results, ids = run(main())
    plan = GroupPlan.build("simulated", results["slow"].round_id, list(results["slow"].group), 100_000)
    fast = [f"fast{i}" for i in range(3)]
    fast_mean = torch.stack([values[name] for name in fast]).mean(0)
    received = 0
    for name in fast:
        assert results[name].status == "averaged"
        assert results[name].seconds < 2.0, results[name].seconds  # did not wait for the slow upload
        start, end = plan.shards()[ids[name]]
        for holder in fast:  # the fast owners' means leave out the straggler
            assert torch.allclose(results[holder].averaged[start:end], fast_mean[start:end], atol=1e-5)
        # and it receives them, but for those its own deadline left out (keeping its values there)
        if torch.allclose(results["slow"].averaged[start:end], fast_mean[start:end], atol=1e-5):
            received += 1
        else:
            assert torch.equal(results["slow"].averaged[start:end], values["slow"][start:end])
    assert received >= 2 and results["slow"].status == "averaged"


def test_a_joiner_downloads_the_state_and_contributes_from_its_next_round():
    async def main():
        swarm = await _swarm(4, link=WAN, defences=Defences.off())
        values = _values(swarm.peers)
        values = {name: r.averaged for name, r in (await swarm.round(values)).items()}  # one model
        for name, peer in swarm.peers.items():
            await peer.serve_state(lambda name=name: {"values": values[name]})
        joiner = await swarm.add("joiner")
        state = await download_state(joiner, timeout=30)
        downloaded = state["values"].clone()
        values["joiner"] = downloaded + 1.0  # it trained on since: its change reaches its group
        results = await swarm.round(values)
        ids = {peer.peer_id: name for name, peer in swarm.peers.items()}
        await swarm.close()
        return values, downloaded, results, ids

    values, downloaded, results, ids = run(main())
    assert torch.equal(downloaded, values["peer0"])
    group = [ids[peer_id] for peer_id in results["joiner"].group]
    assert len(group) >= 2 and results["joiner"].status == "averaged"
    mean = torch.stack([values[name] for name in group]).mean(0)
    for name in group:
        assert torch.allclose(results[name].averaged, mean, atol=1e-5)


def test_rounds_still_average_when_the_dht_views_of_a_round_differ():
    """Each read misses 10% of the records: members use their leader's groups (``assembly``), so a view that
    missed peers costs no one (a member that missed the leader is sent on to it)."""
    report = simulate(Scenario(peers=32, numel=1000, rounds=8, dht_miss=0.1, seed=1))
    assert report.summary["averaged_share"] >= 0.9, report.table()
    assert report.summary["spread_after"] < 0.01, report.table()


def test_a_hostile_owner_s_shifted_mean_is_refused_and_counted_and_changes_no_honest_values():
    """The honest members' round says so: ``partial``, with the refused shard, where the clean round
    before it (the defences on, nothing for them to do) is ``averaged``."""

    async def main():
        swarm = await _swarm(4)
        values = _values(swarm.peers)
        clean = await swarm.round(values)  # the group agrees: next round's means are checked
        values = {name: clean[name].averaged + 0.01 * (i + 1) for i, name in enumerate(values)}
        swarm.peers["peer3"].exchange_class = faulty_exchange("shifted_mean")
        results = await swarm.round(values)
        ids = {name: peer.peer_id for name, peer in swarm.peers.items()}
        rejections = {name: dict(peer.rejections) for name, peer in swarm.peers.items()}
        await swarm.close()
        return clean, values, results, ids, rejections

    clean, values, results, ids, rejections = run(main())
    for result in clean.values():
        assert result.status == "averaged" and (result.refused, result.clipped, result.dropped) == ([], 0, 0)
    round_id = results["peer0"].round_id
    start, end = GroupPlan.build("simulated", round_id, list(results["peer0"].group), 5000).shards()[ids["peer3"]]
    for name in ("peer0", "peer1", "peer2"):
        assert rejections[name]["hostile_mean"] == 1
        assert torch.equal(results[name].averaged[start:end], values[name][start:end])
        assert len(results[name].combined) == 3  # the honest owners' means were taken
        assert results[name].status == "partial" and results[name].refused == [(start, end)]


@pytest.mark.parametrize("fault", ["huge", "heavy"])
@pytest.mark.parametrize(("codec", "mode"), [("int8", "params"), ("none", "outer"), ("int8", "outer")])
def test_a_hostile_member_is_bounded_with_a_lossy_codec_and_on_pseudo_gradients(fault, codec, mode):
    """As ``tests/test_hostile.py`` over sockets, with error feedback and in the outer mode's rounds:
    honest results move by at most 3x the honest peers' own spread, and each honest owner's round is
    ``partial``: the hostile contribution to its shard was clipped or dropped."""

    async def main():
        swarm = await _swarm(3)
        hostile = await swarm.add("hostile", client=True)
        hostile.exchange_class = faulty_exchange(fault)
        generator = torch.Generator().manual_seed(5)
        scale = 1.0 if mode == "params" else 0.01  # parameters, or a pseudo-gradient: what H steps moved them
        centre = scale * torch.randn(5000, generator=generator)
        values = {name: centre + scale * 0.01 * torch.randn(5000, generator=generator) for name in swarm.peers}
        residuals = {name: torch.zeros(5000) for name in swarm.peers}
        results = await swarm.round(values, residuals=residuals, codec=get_codec(codec), mode=mode)
        await swarm.close()
        return values, results

    values, results = run(main())
    honest = torch.stack([values[f"peer{i}"] for i in range(3)])
    spread = max(torch.linalg.vector_norm(a - b).item() for a in honest for b in honest)
    for i in range(3):
        result = results[f"peer{i}"]
        assert result.status == "partial" and result.clipped + result.dropped == 1 and not result.refused
        moved = torch.linalg.vector_norm(result.averaged - values[f"peer{i}"]).item()
        assert moved <= 3 * spread, (moved, spread)


def test_two_huge_members_in_a_group_of_three_are_caught_by_the_owner_s_own_size():
    """A hostile majority at an owner: the clip's median distance is theirs, but their size is judged
    against the owner's own values, so both are caught and the owner keeps its values."""

    async def main():
        swarm = await _swarm(1)
        for i in range(2):
            hostile = await swarm.add(f"hostile{i}", client=True)
            hostile.exchange_class = faulty_exchange("huge")
        values = _values(swarm.peers)
        results = await swarm.round(values, mode="params")
        owner = swarm.peers["peer0"]
        caught = set(owner.caught) == {swarm.peers[f"hostile{i}"].peer_id for i in range(2)}
        dropped = owner.rejections["dropped"]
        await swarm.close()
        return values, results, caught, dropped

    values, results, caught, dropped = run(main())
    assert torch.equal(results["peer0"].averaged, values["peer0"])
    assert dropped == 2 and caught


def test_a_member_that_registered_and_never_came_costs_the_others_virtual_time_not_their_round():
    async def main():
        swarm = await _swarm(4, timeouts=Timeouts(join=30.0), defences=Defences.off())
        loop = asyncio.get_running_loop()
        round_id = max(peer.next_round_id() for peer in swarm.peers.values())
        values = _values(swarm.peers)
        record = {"schema": None, "numel": 5000, "mode": "params", "client": False}
        await swarm.peers["peer3"].membership.join_round(round_id, record, round_id + 60.0)
        others = {name: peer for name, peer in swarm.peers.items() if name != "peer3"}
        results = await asyncio.gather(
            *(peer.average(values[name], round_id=round_id) for name, peer in others.items())
        )
        elapsed = loop.time() - round_id
        await swarm.close()
        return results, elapsed

    results, elapsed = run(main())
    assert all(r.status == "averaged" and len(r.group) == 3 for r in results)  # it never joined its leader
    assert all(len(r.combined) == 3 for r in results)
    assert elapsed < 30.0  # the straggler deadline, not the join timeout, ended the wait


def test_a_regression_task_reports_its_test_loss_per_slot_and_the_swarm_learns():
    report = simulate(Scenario(peers=8, numel=100, rounds=6, task="regression", local_steps=20, compute_s=0.5))
    losses = [row["loss"] for row in report.rounds]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], report.table()  # seeded: 0.021 -> 0.012
    assert report.summary["loss_after"] == round(losses[-1], 5) and report.summary["averaged_share"] == 1.0


@pytest.mark.parametrize("strategy", ["gossip-int8", "outer"])
def test_the_round_strategies_drive_simulated_rounds_as_attach_does(strategy):
    """Each peer's strategy makes its contribution and combines the round's result (``Attachment``'s calls):
    parameter gossip with ``int8`` and error feedback, and the outer mode's pseudo-gradients with an outer
    SGD step (lr 1: the anchor moves to the mean of the peers' parameters)."""

    async def main():
        swarm = await _swarm(4, defences=Defences.off())
        start = torch.randn(2000, generator=torch.Generator().manual_seed(9))
        moved = {name: start + 0.1 * step for name, step in _values(swarm.peers, numel=2000, seed=4).items()}
        if strategy == "outer":
            made = {
                name: OuterStrategy([start.clone()], lambda p: torch.optim.SGD(p, lr=1.0), get_codec("none"))
                for name in swarm.peers
            }
        else:
            made = {name: WireState(get_codec("int8"), sync_every=1) for name in swarm.peers}
        round_id = max(peer.next_round_id() for peer in swarm.peers.values())
        round_id += round_id % 5 == 0  # not an anchor-sync round of the outer mode
        contributions = {name: made[name].contribution(moved[name], round_id) for name in swarm.peers}
        first = next(iter(contributions.values()))
        results = await swarm.round(
            {name: c.values for name, c in contributions.items()},
            round_id=round_id,
            residuals={name: c.residual for name, c in contributions.items()},
            mode=first.mode,
            codec=first.codec,
        )
        after = {name: made[name].combine(results[name], moved[name], first.mode) for name in swarm.peers}
        await swarm.close()
        return moved, after, first.mode

    moved, after, mode = run(main())
    assert mode == ("outer" if strategy == "outer" else "params")
    mean = torch.stack(list(moved.values())).mean(0)
    tolerance = 1e-5 if strategy == "outer" else 0.05  # int8 rounds twice (slices, mean): peers differ by 0.3 before
    for values in after.values():
        assert (values - mean).abs().max() < tolerance


def test_an_owner_takes_the_slices_of_its_running_round_however_many_slots_later_they_arrive():
    """Slots of 0.2 s over 300 ms RTT links: registering, reading the cell and joining the leader take several
    slots, so the members' slices reach their owners when a slot three or more after the round's is current (as
    live at 300 ms RTT, where a first round that still dials spans 3-4 slots of 2 s).  Owners running that round
    take them, and every member ends with the exact mean of all four."""

    async def main():
        swarm = SimulatedSwarm(link=LinkSpec(mbit=100, rtt_ms=300), defences=Defences.off(), round_interval=0.2)
        for i in range(4):
            await swarm.add(f"peer{i}")
        values = _values(swarm.peers, numel=4096)
        results = await swarm.round(values)
        await swarm.close()
        return values, results

    values, results = run(main())
    mean = torch.stack(list(values.values())).mean(0)
    for name, result in results.items():
        assert result.status == "averaged" and len(result.group) == 4, (name, result.errors)
        assert result.seconds > 3 * 0.2, "the round spans more than the three slots a HELLO was accepted in"
        assert torch.allclose(result.averaged, mean, atol=1e-6), (name, result.errors)
