"""One group's butterfly all-reduce, as plain data: shard plan, weighting, message checks.

Each reducing member owns one contiguous shard of the flat parameter vector.  Every member
sends its slice of shard ``j`` to the owner of ``j``; the owner combines the slices that arrived
*whole* into a weighted mean (weights are the members' sample counts) and sends the mean back.
A contribution that fails half-way is dropped, and the mean is renormalised over the rest; a
shard whose owner failed keeps the member's own values.  Nothing here touches the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gossiptrain.codecs import BLOCK
from gossiptrain.groups import group_digest


def shard_bounds(numel: int, num_shards: int, align: int = 1) -> list[tuple[int, int]]:
    """Split ``range(numel)`` into ``num_shards`` contiguous, nearly equal slices that start at
    multiples of ``align``."""
    edges = [numel * i // num_shards // align * align for i in range(num_shards)] + [numel]
    return list(zip(edges[:-1], edges[1:]))


@dataclass(frozen=True)
class GroupPlan:
    """Who is in the group, who reduces which shard, and the digest that names the group."""

    run_id: str
    round_id: int
    members: tuple[str, ...]
    reducers: tuple[str, ...]
    numel: int

    @classmethod
    def build(
        cls, run_id: str, round_id: int, members: list[str], numel: int, clients: frozenset[str] = frozenset()
    ) -> GroupPlan:
        members = sorted(members)
        reducers = [peer for peer in members if peer not in clients]
        return cls(run_id, round_id, tuple(members), tuple(reducers), numel)

    @property
    def digest(self) -> str:
        return group_digest(self.run_id, self.round_id, self.members)

    def shards(self) -> dict[str, tuple[int, int]]:
        """Shards start at a codec block, so a value falls in the same block whatever the group:
        a quantizer then gives back what agreeing peers hold (``codecs._Blockwise``)."""
        return dict(zip(self.reducers, shard_bounds(self.numel, len(self.reducers), align=BLOCK)))


def check_hello(
    hello: dict[str, Any], plan: GroupPlan, sender: str, owner: str, codec: str, mode: str = "params"
) -> tuple[str, str] | None:
    """``(kind, detail)`` saying why ``owner`` must refuse a HELLO from ``sender``, or None to accept it."""
    if hello.get("run_id") != plan.run_id:
        return "wrong_run", f"message for run {hello.get('run_id')!r}, this is run {plan.run_id!r}"
    if hello.get("round_id") != plan.round_id:
        return "stale_round", f"round {hello.get('round_id')!r}, expected {plan.round_id}"
    if hello.get("sender") != sender:
        return "not_in_group", f"sender claims to be {hello.get('sender')!r} but the stream comes from {sender}"
    if sender not in plan.members:
        return "not_in_group", f"sender {sender} is not in this round's group"
    if hello.get("digest") != plan.digest:
        return "view_mismatch", "sender computed a different group (membership views differ)"
    if hello.get("codec") != codec or hello.get("mode") != mode:
        sent = f"{hello.get('mode')!r} as {hello.get('codec')!r}"
        return "wrong_dtype", f"values sent are {sent}, this round uses {mode!r} as {codec!r}"
    start, end = plan.shards().get(owner, (0, 0))
    if hello.get("start") != start or hello.get("end") != end:
        return "wrong_shape", f"shard [{hello.get('start')}, {hello.get('end')}) does not match [{start}, {end})"
    weight = hello.get("weight")
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return "bad_weight", f"invalid weight {weight!r}"
    return None


class ShardReduction:
    """Weighted mean of one shard over the contributions that arrived whole.

    Sums in float32, in place: a group's few contributions lose ~1e-7 relative to a float64 sum,
    and the shard is never copied to a wider dtype (tens of MB per round for a large model).
    """

    def __init__(self, own_values: torch.Tensor, own_weight: float):
        self._sum = own_values.float() * own_weight
        self.total_weight = own_weight
        self.contributors = 0

    def add(self, values: torch.Tensor, weight: float) -> None:
        self._sum.add_(values, alpha=weight)
        self.total_weight += weight
        self.contributors += 1

    def mean(self) -> torch.Tensor:
        return self._sum / self.total_weight
