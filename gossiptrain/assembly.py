"""Groups agreed, not assumed: a cell's leader decides its round's groups, and every member uses its list.

Reads of an eventually consistent DHT differ (a record not yet on every replica, a late registration), and groups
that each peer computed from its own read would differ with them. So one peer decides: each peer of a cell sends its
leader (``matchmaking.leader_candidates``) a JOIN with its round record, and the leader answers a PLAN with the
member's group. The leader waits for the JOINs of the peers it read (all of them, or once half of the established
ones have come, as long again as those took since the reads began, at least ``straggler_min``: ``JOIN_GRACE``; at
most ``join``), reads the cell again and waits likewise for the peers that
read missed, then half as long again, up to ``straggler_min``, for peers no read found; it takes in any peer that
joins without being in its reads,
and partitions the peers that joined (``matchmaking.partition``). A peer that registered and never joins (it
crashed, a ghost) is in no group, so no member waits for it.

Failure semantics: a member whose read missed the leader joins another peer, which answers with the leader it knows
(a REJECT naming ``leader``: the member joins that one, once). A candidate that cannot be reached, does not answer
within ``join`` or takes no part in the round is passed over for the next one (for twice ``join`` at most), as every
member of the cell passes it over, so the next candidate leads. A member that joins after the leader decided is told
it is late: its round fails, its values unchanged. A hostile leader can misplace its cell's peers for a round (waste
it), not change what they average: owners judge every contribution as before (``allreduce.Defences``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hivemind.p2p import PeerID

from gossiptrain import matchmaking
from gossiptrain.allreduce import straggler_quorum
from gossiptrain.groups import established
from gossiptrain.rounds import Timeouts
from gossiptrain.transport import ByteCounter, FrameKind, ProtocolError, close_after_peer, read_message, write_message

logger = logging.getLogger(__name__)

MAX_CANDIDATES = 8  # leaders a member tries in one round (within twice ``join``) before it gives up
# once a quorum of the cell JOINed, the others get as long again as the quorum took since the reads began: a JOIN comes
# after a DHT read, whose time varies by round trips (a lost packet at a high RTT costs more than ``straggler_min``)
JOIN_GRACE = 1.0
MIN_GRACE = 0.1  # seconds a leader waits at least for peers its read missed (they JOIN when the others do)
PLAN_FIELDS = ("client", "mbit")  # what a PLAN says of each member: what ``matchmaking.plan_of`` reads


class LateJoin(Exception):
    """The leader had decided the round's groups before our JOIN came."""


class CellAssembly:
    """The leader's side of one round: collects JOINs, decides the groups once, answers every member.

    Args:
        own: the leader's round record; JOINs of another kind (``matchmaking.kind``) are refused.
        records: the compatible records the leader read, its own included: whose JOINs it waits for.
    """

    def __init__(
        self,
        run_id: str,
        round_id: int,
        me: str,
        own: Mapping[str, Any],
        records: Mapping[str, Mapping[str, Any]],
        group_size: int,
        timeouts: Timeouts,
    ):
        self.run_id, self.round_id, self.me, self.own = run_id, round_id, me, own
        self.group_size, self.timeouts = group_size, timeouts
        self.expected = set(records)
        # those whose JOINs count towards the quorum: established peers (``groups.established``) where there are
        # any, so that ghosts that never join (however many) cost the straggler deadline, not ``join``
        vouches = {peer: matchmaking.vouches(record) for peer, record in records.items()}
        self.settled = established(vouches) or self.expected
        self.records: dict[str, Mapping[str, Any]] = {me: own}
        self._changed = asyncio.Event()
        self.groups: dict[str, list[str]] | None = None  # member -> its group, once decided
        self.demoted: frozenset[str] = frozenset()  # members that own no shard (``matchmaking.accused``)
        self._decided = asyncio.get_running_loop().create_future()

    def join(self, peer: str, record: Mapping[str, Any]) -> None:
        """Take ``peer`` into the round; ``LateJoin`` once the groups are decided, ``ValueError`` for another kind."""
        if self.groups is not None:
            raise LateJoin(f"the groups of round {self.round_id} were decided before {peer} joined")
        if matchmaking.kind(record) != matchmaking.kind(self.own):
            raise ValueError(f"{peer} averages {matchmaking.kind(record)}, this cell {matchmaking.kind(self.own)}")
        self.records[peer] = record
        self._changed.set()

    async def decide(
        self,
        reread: Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]] | None = None,
        read_started: float | None = None,
    ) -> dict[str, list[str]]:
        """Wait for the JOINs (see the module docstring), then partition the peers that joined.  ``reread`` reads
        the cell's compatible records again once the expected peers are in: registrations our first read missed
        (one replica had them, or they came late) are then waited for too.  ``read_started``: when our read of the
        cell began (loop time; now if None), as every member's did: a member JOINs once its own read is done, so
        the wait for the JOINs after a quorum (``JOIN_GRACE``) counts the quorum's time from there."""
        loop = asyncio.get_running_loop()
        started, deadline = loop.time() if read_started is None else read_started, loop.time() + self.timeouts.join
        deadline = await self._await_joins(started, deadline)
        if reread is not None and loop.time() < deadline:
            try:
                async with asyncio.timeout_at(deadline):
                    missed = set(await reread()) - self.expected
            except Exception as e:  # a read that fails or times out finds no one: the round goes on without it
                logger.debug("round %s: re-reading the cell failed: %r", self.round_id, e)
                missed = set()
            if missed:
                self.expected |= missed
                deadline = await self._await_joins(started, deadline)
        # peers no read of ours found join at about the time the others did: give them half the time the others took
        grace = min(self.timeouts.straggler_min, max(MIN_GRACE, (loop.time() - started) / 2))
        await asyncio.sleep(max(0.0, min(deadline, loop.time() + grace) - loop.time()))
        groups = matchmaking.partition(self.run_id, self.round_id, self.records, self.group_size)
        self.demoted = matchmaking.accused(self.records)
        self.groups = {peer: group for group in groups for peer in group}
        self._decided.set_result(self.groups)
        return self.groups

    async def _await_joins(self, started: float, deadline: float) -> float:
        """Wait until every expected peer joined, or the deadline (the straggler deadline once a quorum of the
        established ones is in); returns the deadline."""
        loop = asyncio.get_running_loop()
        quorum = straggler_quorum(len(self.settled))
        while not self.expected <= self.records.keys():
            if len(self.settled & self.records.keys()) >= quorum:
                cutoff = self.timeouts.straggler_deadline(started, loop.time(), grace=JOIN_GRACE)
                deadline = min(deadline, cutoff or deadline)
            self._changed.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._changed.wait()
            except TimeoutError:
                break
        return deadline

    async def group_of(self, peer: str) -> list[str]:
        return (await asyncio.shield(self._decided))[peer]

    def plan_message(self, group: list[str]) -> dict[str, Any]:
        """The PLAN of ``group``: its members and what ``matchmaking.plan_of`` needs of their records."""
        fields = {peer: {f: self.records[peer].get(f) for f in PLAN_FIELDS} for peer in group}
        for peer in self.demoted & set(group):  # caught by enough of the cell: it reduces no shard
            fields[peer]["client"] = True
        return {"round_id": self.round_id, "members": group, "records": fields}


def parse_plan(message: Mapping[str, Any], me: str, round_id: int, group_size: int) -> tuple[list[str], dict]:
    """The members and records of a PLAN; ``ProtocolError`` if it is not a plan of this round that holds us."""
    members, records = message.get("members"), message.get("records")
    if (
        message.get("round_id") != round_id
        or not isinstance(members, list)
        or not all(isinstance(peer, str) for peer in members)
        or me not in members
        or len(members) > 2 * group_size + 2  # ``groups`` never forms larger groups
        or not isinstance(records, dict)
    ):
        raise ProtocolError(f"the leader's plan for round {round_id} is malformed or leaves us out")
    return members, {peer: records.get(peer) if isinstance(records.get(peer), dict) else {} for peer in members}


async def join_leader(
    p2p, protocol: str, leader: str, round_id: int, record: Mapping[str, Any], timeouts: Timeouts, counter: ByteCounter
) -> dict[str, Any]:
    """Send ``leader`` our JOIN and return its PLAN.  Raises ``LateJoin``, ``Redirect``, ``ProtocolError`` (it
    leads no cell of ours), or a network error."""
    reader = writer = None
    try:
        async with asyncio.timeout(timeouts.join):
            _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(leader), protocol)
        await write_message(writer, FrameKind.JOIN, {"round_id": round_id, "record": dict(record)}, counter)
        # the leader answers once it decided: its wait for the cell's JOINs is bounded by ``join``
        kind, message = await read_message(
            reader, counter, timeout=2 * timeouts.join, expect=(FrameKind.PLAN, FrameKind.REJECT)
        )
        if kind == FrameKind.REJECT:
            if isinstance(message.get("leader"), str):
                raise Redirect(message["leader"])
            if message.get("late"):
                raise LateJoin(str(message.get("reason")))
            raise ProtocolError(f"{leader} does not lead our cell: {message.get('reason')}")
        return message
    finally:
        if writer is not None:
            writer.close()


class Redirect(Exception):
    """The peer we joined is not the cell's leader; it names the one it knows."""

    def __init__(self, leader: str):
        super().__init__(f"the cell's leader is {leader}")
        self.leader = leader


@dataclass
class Role:
    """What this peer is in one round, for the JOINs that reach it: the cell's leader (``assembly``), a member
    of another leader's cell (``leader``), or nothing yet (``ready`` not set).  ``counter`` holds the bytes of its
    JOINs and PLANs, sent and served; the round's exchange goes on counting in it."""

    assembly: CellAssembly | None = None
    leader: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    counter: ByteCounter = field(default_factory=ByteCounter)

    def lead(self, assembly: CellAssembly) -> None:
        self.assembly, self.leader = assembly, None
        self.ready.set()

    def follow(self, leader: str) -> None:
        self.assembly, self.leader = None, leader
        self.ready.set()

    def close(self) -> None:
        """Our round is over without our leading it: JOINs are refused at once (the joiner tries its next
        candidate) rather than waiting ``join`` for a role that will not come."""
        if not self.ready.is_set():
            self.ready.set()


async def serve_join(
    role_of: Callable[[Any], Role | None],
    sender: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    timeouts: Timeouts,
) -> None:
    """Answer a JOIN: with the sender's group if we lead its round, else with the leader we know (or a refusal).
    ``role_of(round_id)`` is our role in a round (None: a round that is not current).  Each wait is bounded by
    ``join``."""
    counter = ByteCounter()
    try:
        _, message = await read_message(reader, counter, timeout=timeouts.join, expect=(FrameKind.JOIN,))
        round_id, record = message.get("round_id"), message.get("record")
        role = role_of(round_id) if isinstance(round_id, int) else None
        if role is not None:  # from here on, what this JOIN costs is our round's
            role.counter.received += counter.received
            counter = role.counter
        if role is None or not isinstance(record, dict):
            reply = FrameKind.REJECT, {"reason": f"round {round_id!r} is not current here"}
        else:
            await asyncio.wait_for(role.ready.wait(), timeouts.join)
            if role.assembly is not None:
                try:
                    role.assembly.join(sender, record)
                    reply = FrameKind.PLAN, role.assembly.plan_message(await role.assembly.group_of(sender))
                except LateJoin as e:
                    reply = FrameKind.REJECT, {"reason": str(e), "late": True}
                except ValueError as e:
                    reply = FrameKind.REJECT, {"reason": str(e)}
            elif role.leader is not None and role.leader != sender:
                reply = FrameKind.REJECT, {"reason": "not the leader", "leader": role.leader}
            else:
                reply = FrameKind.REJECT, {"reason": f"this peer leads no cell of round {round_id}"}
        await write_message(writer, *reply, counter)
    except (TimeoutError, ConnectionError, OSError, ProtocolError, asyncio.IncompleteReadError) as e:
        logger.debug("JOIN from %s not answered: %r", sender, e)
    finally:
        await close_after_peer(reader, writer, timeouts.part)
