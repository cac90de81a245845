"""A round's groups and plans, decided from the round's records: pure, so live peers and the simulator share it.

Each peer registers a record for round ``r`` in its cell (``membership.Membership.join_round``): its model
schema, the number of values and what they are (``mode``), whether it is a client, where it listens
(``maddrs``), the peers that answered it lately (``answered``, its vouches: ``groups.guarded_groups``) and its
declared link speed (``mbit``).  At the round's start it reads its cell's records; the cell's leader
(``leader_candidates``: the first in the round's hash order that can be dialed) partitions the peers that
joined it into groups (``partition``, ``assembly``), and every member builds its group's plan from the
leader's list (``plan_of``: who owns which shard).  Peers compute nothing from views that may differ.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from gossiptrain.allreduce import GroupPlan
from gossiptrain.groups import established, guarded_groups

MAX_VOUCHES = 16  # a record names at most this many peers that answered it, the latest first (a reader reads no more)
MAX_ACCUSED = 8  # a record names at most this many peers its writer caught, the latest first (a reader reads no more)


def vouches(record: Mapping[str, Any] | None) -> frozenset[str]:
    """The peers a round record says answered its writer lately (``groups.guarded_groups``)."""
    answered = (record or {}).get("answered")
    if not isinstance(answered, list):
        return frozenset()
    return frozenset(peer for peer in answered[:MAX_VOUCHES] if isinstance(peer, str))


def accused(records: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """The peers of ``records`` that at least a third of the others (and two at least) caught beyond any honest
    values (``Peer.caught``, named in their records' ``caught``), counting only accusers not accused themselves.

    A leader demotes them to clients in its plans (``assembly``): they still send their values and receive the
    means, and own no shard.  An owner that shifts its shard's mean is refused by every member that checks it,
    but while it keeps its seat those members never average that shard (two such owners of eight left the
    honest peers' models apart: ``benchmarks/adversarial.py``, outer mode).  Bound: fewer than a third of a
    cell's peers cannot demote an honest one, and a demoted honest peer loses its seat, not its round."""
    named = {}
    for peer, record in records.items():
        caught = (record or {}).get("caught")
        if isinstance(caught, list):
            named[peer] = {other for other in caught[:MAX_ACCUSED] if isinstance(other, str) and other != peer}
    needed = max(2, math.ceil((len(records) - 1) / 3))

    def counted(excluded: frozenset[str]) -> frozenset[str]:
        return frozenset(
            peer
            for peer in records
            if sum(peer in named.get(other, ()) for other in records if other not in excluded) >= needed
        )

    return counted(counted(frozenset()))


def declared_mbit(record: Mapping[str, Any] | None) -> float | None:
    """A record's declared link speed, if it is a positive finite number."""
    mbit = (record or {}).get("mbit")
    return mbit if isinstance(mbit, (int, float)) and math.isfinite(mbit) and mbit > 0 else None


def kind(record: Mapping[str, Any]) -> tuple:
    """What a record's writer averages: peers of one kind only average together."""
    return record.get("schema"), record.get("numel"), record.get("mode")


def compatible(own: Mapping[str, Any], me: str, records: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping]:
    """The records of peers that average what we do, ours included (what we registered counts, whether or not
    our read found it)."""
    return {peer: record for peer, record in {**records, me: own}.items() if kind(record) == kind(own)}


def leader_candidates(run_id: str, round_id: int, records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Who may lead a cell's round, best first: peers that can be dialed (not clients), established ones
    (``groups.established``: ghosts that never answer are not) before the others, then those dialed directly
    before those behind a NAT (``relayed``: every JOIN would cross a relay), each part in the round's hash
    order, so that every peer that read the same records names the same leader."""
    dialable = [peer for peer, record in records.items() if not record.get("client")]
    settled = established({peer: vouches(records[peer]) for peer in dialable})

    def order(peer: str) -> tuple[bool, bool, bytes]:
        digest = hashlib.sha256(f"{run_id}|{round_id}|lead|{peer}".encode()).digest()
        return peer not in settled, bool(records[peer].get("relayed")), digest

    return sorted(dialable, key=order)


def partition(run_id: str, round_id: int, records: Mapping[str, Mapping[str, Any]], group_size: int) -> list[list[str]]:
    """The groups of the peers of ``records`` in ``round_id`` (``groups.guarded_groups`` by their vouches)."""
    return guarded_groups({peer: vouches(record) for peer, record in records.items()}, round_id, group_size, run_id)


def plan_of(
    run_id: str, round_id: int, members: list[str], numel: int, records: Mapping[str, Mapping[str, Any]]
) -> GroupPlan:
    """The plan of a group, from its members' records: clients reduce nothing, declared speeds size shards."""
    clients = frozenset(peer for peer in members if records.get(peer, {}).get("client"))
    bandwidths = {peer: mbit for peer in members if (mbit := declared_mbit(records.get(peer))) is not None}
    return GroupPlan.build(run_id, round_id, members, numel, clients, bandwidths)
