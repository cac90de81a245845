"""Who averages with whom in round r: a pure function of the round's membership view.

Groups follow Moshpit SGD (Ryabinin et al., NeurIPS 2021): peers are laid out on a virtual
grid with ``depth = ceil(log_g N)`` axes of size ``g`` (the target group size), and round ``r``
groups together the peers that differ only along axis ``r mod depth``.  With ``N = g ** depth``
peers and exact averaging, any ``depth`` consecutive rounds of one epoch give every peer the
global mean.  The order of peers on the grid is reshuffled every epoch (``depth`` rounds) by a
hash of the run id, so groups keep changing and no peer is special.  A partial grid (other ``N``)
leaves some groups of one or two: they are pooled into groups of at least ``MIN_GROUP`` (a pair gives
no robust majority, ``allreduce.ShardReduction``; a peer alone averages nothing).

Every peer computes the same partition from the same view, so no leader or coordinator is
needed.  Views that differ are reconciled in the exchange: a group is identified by the digest
of its member list, and members whose digest differs are refused (see ``allreduce``).

Ghosts (``guarded_groups``): in an open run anyone can register fresh identities that never answer.
Each peer's round record names the peers that answered it in its last rounds (``vouches``).  Two
participants that name each other are *established*; only an established peer can vouch for
another one usefully, since a vouch counts only when it is returned.  Established peers are grouped
among themselves, and each of their groups takes in only a few *newcomers* (peers with no returned
vouch: honest joiners and ghosts alike), so that ghosts, however many, fill only those seats.  The
rule reads nothing but the round's records, so equal views still give equal groups.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence

MIN_GROUP = 3  # smaller groups are pooled: in a pair, a robust owner has no majority to clip the other by


def grid_depth(num_peers: int, group_size: int) -> int:
    """Number of grid axes: rounds per epoch needed to mix ``num_peers`` exactly."""
    if group_size < 2 or num_peers <= group_size:
        return 1
    return math.ceil(math.log(num_peers) / math.log(group_size) - 1e-9)


def _order_key(salt: str, epoch: int, peer: str) -> bytes:
    return hashlib.sha256(f"{salt}|{epoch}|{peer}".encode()).digest()


def make_groups(peers: Iterable[str], round_id: int, group_size: int, salt: str = "") -> list[list[str]]:
    """Partition ``peers`` into the groups of round ``round_id``; each group is sorted."""
    members = sorted(set(peers))
    if not members:
        return []
    depth = grid_depth(len(members), group_size)
    epoch, axis = divmod(round_id, depth)
    ordered = sorted(members, key=lambda peer: _order_key(salt, epoch, peer))
    stride = group_size**axis
    groups: dict[int, list[str]] = {}
    for index, peer in enumerate(ordered):
        digit = (index // stride) % group_size
        groups.setdefault(index - digit * stride, []).append(peer)
    return [sorted(group) for group in _without_small_groups([g for _, g in sorted(groups.items())], group_size)]


def _without_small_groups(groups: list[list[str]], group_size: int) -> list[list[str]]:
    """``groups`` with those smaller than ``MIN_GROUP`` (a partial grid leaves pairs and peers alone)
    pooled and cut again into groups of ``group_size``, a remainder too small joining the group before it."""
    smallest = min(MIN_GROUP, group_size)
    kept = [group for group in groups if len(group) >= smallest]
    pool = [peer for group in groups if len(group) < smallest for peer in group]
    for start in range(0, len(pool), group_size):
        chunk = pool[start : start + group_size]
        if len(chunk) < smallest and kept:
            kept[-1] = kept[-1] + chunk
        else:
            kept.append(chunk)
    return kept


def established(vouches: Mapping[str, Collection[str]]) -> set[str]:
    """The peers of ``vouches`` (peer -> the peers that answered it lately) that share a returned vouch
    with another peer of it."""
    return {
        peer
        for peer, answered in vouches.items()
        if any(other != peer and peer in vouches.get(other, ()) for other in answered)
    }


def guarded_groups(
    vouches: Mapping[str, Collection[str]], round_id: int, group_size: int, salt: str = ""
) -> list[list[str]]:
    """Partition the peers of ``vouches`` for round ``round_id``, bounding what newcomers can take.

    Established peers (``established``) form Moshpit groups among themselves; each group then takes in
    newcomers up to ``group_size`` members, at least one, in an order reshuffled every round; newcomers
    left over form groups of their own.  Without any established peer (a run's first round), every
    peer is grouped as by ``make_groups``.  Each group is sorted.
    """
    settled = established(vouches)
    if not settled:
        return make_groups(vouches, round_id, group_size, salt)
    groups = make_groups(settled, round_id, group_size, salt)
    newcomers = sorted(set(vouches) - settled, key=lambda peer: _order_key(salt, -1 - round_id, peer))
    for group in groups:
        seats = max(1, group_size - len(group))
        group.extend(newcomers[:seats])
        del newcomers[:seats]
    return [sorted(group) for group in groups] + make_groups(newcomers, round_id, group_size, salt)


def group_of(
    peer: str, peers: Iterable[str] | Mapping[str, Collection[str]], round_id: int, group_size: int, salt: str = ""
) -> list[str]:
    """The group that ``peer`` belongs to in round ``round_id`` (``[peer]`` if it is not in the view).

    ``peers`` is the round's view: peer ids, or a mapping of peer id -> vouches for ``guarded_groups``.
    """
    if isinstance(peers, Mapping):
        partition = guarded_groups(peers, round_id, group_size, salt)
    else:
        partition = make_groups(peers, round_id, group_size, salt)
    for group in partition:
        if peer in group:
            return group
    return [peer]


def group_digest(run_id: str, round_id: int, members: Sequence[str]) -> str:
    """A short name for one group of one round; members with different views get different digests."""
    text = "|".join([run_id, str(round_id), *sorted(members)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
