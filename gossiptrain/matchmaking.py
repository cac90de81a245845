"""A round's group and plan, decided from the round's records: pure, so live peers and the simulator share it.

Each peer registers a record for round ``r`` (``membership.Membership.join_round``): its model schema, the
number of values and what they are (``mode``), whether it is a client, the peers that answered it lately
(``answered``, its vouches: ``groups.guarded_groups``) and its declared link speed (``mbit``).  At the round's
start it reads every record of ``r`` and ``plan_group`` turns them into its group (``groups.group_of``) and
the group's plan (``allreduce.GroupPlan``: who owns which shard).  Peers whose views agree compute the same
plan; one whose view differs computes another, and the exchange refuses its slices (``allreduce.check_hello``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gossiptrain.allreduce import GroupPlan
from gossiptrain.groups import group_of

MAX_VOUCHES = 64  # a record names at most this many peers that answered it (a reader reads no more of anyone's)


def vouches(record: Mapping[str, Any] | None) -> frozenset[str]:
    """The peers a round record says answered its writer lately (``groups.guarded_groups``)."""
    answered = (record or {}).get("answered")
    if not isinstance(answered, list):
        return frozenset()
    return frozenset(peer for peer in answered[:MAX_VOUCHES] if isinstance(peer, str))


def declared_mbit(record: Mapping[str, Any] | None) -> float | None:
    """A record's declared link speed, if it is a positive finite number."""
    mbit = (record or {}).get("mbit")
    return mbit if isinstance(mbit, (int, float)) and math.isfinite(mbit) and mbit > 0 else None


def plan_group(
    run_id: str,
    round_id: int,
    me: str,
    own: Mapping[str, Any],
    records: Mapping[str, Mapping[str, Any]],
    group_size: int,
) -> tuple[GroupPlan, int]:
    """Our group's plan for ``round_id``, and how many compatible peers the view held (us included).

    ``own`` is the record we registered and ``records`` the round's records as read (ours may be missing
    from them: what we registered counts).  Peers whose schema, number of values or mode differ from ours
    are left out: they average something else.
    """
    kind = (own.get("schema"), own.get("numel"), own.get("mode"))
    compatible = [
        peer
        for peer, record in records.items()
        if (record.get("schema"), record.get("numel"), record.get("mode")) == kind
    ]
    seen = {peer: vouches(records[peer]) for peer in compatible}
    seen[me] = vouches(own)
    members = group_of(me, seen, round_id, group_size, salt=run_id)
    views = {**records, me: own}
    clients = frozenset(peer for peer in members if views.get(peer, {}).get("client"))
    bandwidths = {peer: mbit for peer in members if (mbit := declared_mbit(views.get(peer))) is not None}
    return GroupPlan.build(run_id, round_id, members, own["numel"], clients, bandwidths), len(seen)
