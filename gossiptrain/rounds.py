"""What bounds a round (``Timeouts``) and what it returns (``RoundResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Timeouts:
    """Every network wait of a round, in seconds.

    Args:
        matchmaking: reading the round's participants from the DHT.
        join: opening a stream to a group member / waiting for an expected member's first frame.
        part: the next frame of a stream that has started.
        result: an owner's averaged shard, counted from the end of our upload.
        straggler_grace: once half the transfers a peer waits for in a round are done, the others get
            this fraction of the time that took (at least ``straggler_min`` seconds) before they are
            left out; None waits for every transfer until its own timeout.
    """

    matchmaking: float = 2.0
    join: float = 3.0
    part: float = 3.0
    result: float = 10.0
    straggler_grace: float | None = 0.5
    straggler_min: float = 0.5

    def __post_init__(self):
        for name in ("matchmaking", "join", "part", "result", "straggler_min"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"Timeouts.{name} must be a positive number of seconds, not {value!r}")
        grace = self.straggler_grace
        if grace is not None and not (isinstance(grace, (int, float)) and 0 <= grace < float("inf")):
            raise ValueError(
                f"Timeouts.straggler_grace must be None (wait for every transfer) or a number >= 0, not {grace!r}"
            )

    def straggler_deadline(self, started: float, now: float, grace: float | None = None) -> float | None:
        """When the transfers still pending at ``now`` are left out (loop time), or None for never: ``grace`` (by
        default ``straggler_grace``) times the time since ``started``, at least ``straggler_min``."""
        if self.straggler_grace is None:
            return None
        return now + max((self.straggler_grace if grace is None else grace) * (now - started), self.straggler_min)


AVERAGED = ("averaged", "partial")  # the statuses of a round that took at least one of its group's means


@dataclass
class RoundResult:
    """What one averaging round did at this peer.

    ``status`` is one of:

    - ``"averaged"``: at least one shard holds its group's mean (``combined``) and the defences did
      nothing at this peer;
    - ``"partial"``: likewise, but the defences acted: a mean was refused (``refused``; our own values
      stay there, as though its owner had failed), or contributions to our own shard were clipped or
      dropped (``clipped``, ``dropped``).  Apply it as an averaged round: ``averaged`` holds the means
      that were taken and our own values elsewhere;
    - ``"alone"``: a group of one, nothing exchanged (``averaged`` is our own values);
    - ``"failed"``: no shard was combined with another member's data (``averaged`` is our own values).

    ``AVERAGED`` holds the statuses of a round that took means.  Shards that failed or were left out
    at the straggler deadline keep our own values as well, in any status.
    """

    round_id: int
    status: str  # "averaged" | "partial" | "alone" | "failed"
    group: list[str]
    averaged: torch.Tensor
    combined: list[tuple[int, int]] = field(default_factory=list)  # slices that hold a group mean
    shards_total: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    participants: int = 0  # peers this one saw registered for the round: views that differ explain odd groups
    answered: set[str] = field(default_factory=set)  # members whose slice or mean reached us whole
    # of those, the slices whose mean combined every member: there the group's values now agree, and
    # next round's means are checked (``Defences.mean_check``)
    agreed: list[tuple[int, int]] = field(default_factory=list)
    # the median distance of our shard's contributions from our values, relative to their size, from
    # this round or, where none was measured, the one given (``ShardReduction.spread``)
    spread: float = 0.0
    # what the defences did in this round at this peer (any of it makes a round that took means "partial"):
    # the shards whose owner's mean we refused (``Defences.mean_check``, ``Defences.catch``), and how many
    # contributions to our own shard were clipped (CenteredClip) or left out (beyond ``Defences.drop``, or
    # from a peer caught before)
    refused: list[tuple[int, int]] = field(default_factory=list)
    clipped: int = 0
    dropped: int = 0

    @property
    def group_size(self) -> int:
        return len(self.group)
