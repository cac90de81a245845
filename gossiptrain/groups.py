"""Who averages with whom in round r: a pure function of the round's membership view.

Groups follow Moshpit SGD (Ryabinin et al., NeurIPS 2021): peers are laid out on a virtual
grid with ``depth = ceil(log_g N)`` axes of size ``g`` (the target group size), and round ``r``
groups together the peers that differ only along axis ``r mod depth``.  With ``N = g ** depth``
peers and exact averaging, any ``depth`` consecutive rounds of one epoch give every peer the
global mean.  The order of peers on the grid is reshuffled every epoch (``depth`` rounds) by a
hash of the run id, so groups keep changing and no peer is special.

Every peer computes the same partition from the same view, so no leader or coordinator is
needed.  Views that differ are reconciled in the exchange: a group is identified by the digest
of its member list, and members whose digest differs are refused (see ``allreduce``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence


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
    return [sorted(group) for _, group in sorted(groups.items())]


def group_of(peer: str, peers: Iterable[str], round_id: int, group_size: int, salt: str = "") -> list[str]:
    """The group that ``peer`` belongs to in round ``round_id`` (``[peer]`` if it is not in the view)."""
    for group in make_groups(peers, round_id, group_size, salt):
        if peer in group:
            return group
    return [peer]


def group_digest(run_id: str, round_id: int, members: Sequence[str]) -> str:
    """A short name for one group of one round; members with different views get different digests."""
    text = "|".join([run_id, str(round_id), *sorted(members)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
