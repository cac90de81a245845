"""A round's groups and plans from its records: as every leader and member computes them, and as a leader decides."""

import asyncio

from gossiptrain.assembly import MIN_GRACE, CellAssembly
from gossiptrain.matchmaking import (
    MAX_VOUCHES,
    accused,
    compatible,
    leader_candidates,
    partition,
    plan_of,
    vouches,
)
from gossiptrain.rounds import Timeouts
from gossiptrain.virtual_time import run


def _record(**fields):
    return {"schema": "s", "numel": 100, "mode": "params", "client": False, "answered": [], **fields}


def test_peers_averaging_something_else_are_left_out_and_our_own_record_counts_when_our_read_missed_it():
    records = {f"p{i}": _record() for i in range(3)}
    records["other-model"] = _record(schema="t")
    records["deltas"] = _record(mode="delta")
    assert set(compatible(_record(), "me", records)) == {"me", "p0", "p1", "p2"}


def test_clients_reduce_no_shard_and_declared_speeds_size_the_shards():
    records = {"me": _record(mbit=100.0), "fast": _record(mbit=100.0), "client": _record(client=True)}
    records["bad"] = _record(mbit=float("nan"))
    shards = plan_of("run", 5, sorted(records), 100, records).shards()
    assert "client" not in shards and set(shards) == {"me", "fast", "bad"}


def test_a_peer_caught_by_a_third_of_the_cell_is_demoted_and_two_accusers_of_nine_demote_no_one():
    """``accused``: a third of the others (two at least) must name a peer; accusers that are themselves accused do
    not count, so two hostile peers of nine cannot demote an honest one, however often they name it."""
    records = {f"p{i}": _record() for i in range(7)} | {"bad0": _record(), "bad1": _record()}
    for i in range(3):
        records[f"p{i}"]["caught"] = ["bad0", "bad1"]
    records["bad0"]["caught"] = records["bad1"]["caught"] = ["p5", "p6", "bad0"]  # naming itself counts nothing
    assert accused(records) == {"bad0", "bad1"}
    records["p3"]["caught"] = ["p5"]  # a third accuser, but the two others are demoted: still no one honest
    assert accused(records) == {"bad0", "bad1"}
    records["p0"]["caught"] = ["bad0"]  # two of the eight others name bad1 now: fewer than a third
    assert accused(records) == {"bad0"}
    for record in records.values():
        record["caught"] = "not a list"
    assert accused(records) == set()
    records = {f"p{i}": _record() for i in range(7)} | {"bad0": _record(), "bad1": _record()}
    records["bad0"]["caught"] = records["bad1"]["caught"] = records["p3"]["caught"] = ["p5"]
    assert accused(records) == {"p5"}, "three of the eight others: a third of them"


def test_the_leader_is_one_that_can_be_dialed_established_before_newcomers_the_same_for_every_reader():
    records = {f"p{i}": _record() for i in range(6)}
    records["client"] = _record(client=True)
    records["p4"] = _record(answered=["p5"])  # p4 and p5 vouch for each other: established
    records["p5"] = _record(answered=["p4"])
    order = leader_candidates("run", 7, records)
    assert "client" not in order and set(order[:2]) == {"p4", "p5"}
    assert leader_candidates("run", 7, dict(reversed(records.items()))) == order
    assert {tuple(leader_candidates("run", r, records)[:1]) for r in range(20)} == {("p4",), ("p5",)}


def test_a_peer_behind_nat_leads_only_when_no_direct_peer_of_its_standing_can():
    records = {f"p{i}": _record() for i in range(4)}
    records["nated"] = _record(relayed=True)
    assert all(leader_candidates("run", r, records)[-1] == "nated" for r in range(20))
    records["nated"] = _record(relayed=True, answered=["p0"])  # established: before every newcomer
    records["p0"] = _record(answered=["nated"])
    assert {tuple(leader_candidates("run", r, records)[:2]) for r in range(20)} == {("p0", "nated")}


def test_a_partition_covers_every_peer_once_in_groups_of_at_least_three():
    records = {f"p{i}": _record() for i in range(14)}
    groups = partition("run", 3, records, group_size=4)
    assert sorted(peer for group in groups for peer in group) == sorted(records)
    assert all(3 <= len(group) <= 5 for group in groups)


def test_a_record_vouches_for_at_most_max_vouches_named_peers():
    record = _record(answered=[f"p{i}" for i in range(MAX_VOUCHES + 10)] + [3])
    assert vouches(record) == {f"p{i}" for i in range(MAX_VOUCHES)}
    assert vouches(None) == vouches({"answered": "p1"}) == frozenset()


def test_a_leader_waits_for_a_registration_its_first_read_missed_once_a_second_read_finds_it():
    """A registration stored on one replica is missing from the leader's first read; the member JOINs when its own
    slower read is done, after the others.  The leader's second read, once the expected peers are in, finds it, and
    it is waited for rather than told it came late."""

    async def main(reread):
        records = {"me": _record(), "early": _record()}
        assembly = CellAssembly("run", 7, "me", records["me"], records, 4, Timeouts(join=3.0))
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, assembly.join, "early", _record())
        loop.call_later(0.05 + 3 * MIN_GRACE, assembly.join, "late", _record())  # before the straggler deadline

        async def second_read():
            return {**records, "late": _record()}

        return await assembly.decide(second_read if reread else None)

    assert set(run(main(reread=True))) == {"me", "early", "late"}
    assert set(run(main(reread=False))) == {"me", "early"}  # without it the late member is refused


def test_a_leader_waits_for_a_read_member_as_long_again_as_the_quorum_took_since_the_reads_began():
    """Eight peers at a high RTT: the reads began 1 s before the leader decides, half the cell JOINs 0.2 s later, and
    one member whose read lost a packet JOINs 0.8 s after them.  Counted from the reads' start, the quorum took 1.2 s,
    so the member is in; counted from the leader's decision (0.2 s), ``straggler_min`` alone had refused it."""

    async def main(read_started_ago: float | None):
        records = {"me": _record()} | {f"p{i}": _record() for i in range(7)}
        assembly = CellAssembly("run", 7, "me", records["me"], records, 4, Timeouts(join=3.0, straggler_min=0.5))
        loop = asyncio.get_running_loop()
        for i in range(6):
            loop.call_later(0.2, assembly.join, f"p{i}", _record())
        loop.call_later(1.0, assembly.join, "p6", _record())
        read_started = None if read_started_ago is None else loop.time() - read_started_ago
        return await assembly.decide(None, read_started)

    assert "p6" in run(main(1.0))
    assert "p6" not in run(main(None))
