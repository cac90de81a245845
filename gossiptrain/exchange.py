"""One round's exchange at one peer: send slices to shard owners, reduce the own shard.

The stream from contributor ``i`` to owner ``j`` carries, in order: HELLO, ``i``'s slice of shard
``j`` as PART frames, then from ``j`` back to ``i``: RESULT and the averaged shard as PART frames
(or a REJECT).  Failure semantics: a slice that does not arrive whole within the timeouts is left
out of the owner's mean (weights renormalised); an averaged shard that does not arrive whole is
replaced by the peer's own values.  A round in which no shard was combined with another peer's
data reports ``status="alone"`` or ``"failed"``, never ``"averaged"``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, PeerID

from gossiptrain.allreduce import GroupPlan, ShardReduction, check_hello
from gossiptrain.codecs import Codec, CodecError
from gossiptrain.transport import (
    ByteCounter,
    FrameKind,
    ProtocolError,
    read_frame,
    read_message,
    write_frame,
    write_message,
)

logger = logging.getLogger(__name__)

PART_NUMEL = 2**18
EXCHANGE_ERRORS = (ProtocolError, CodecError, ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError)


@dataclass(frozen=True)
class Timeouts:
    """Every network wait of a round, in seconds.

    Args:
        matchmaking: reading the round's participants from the DHT.
        join: opening a stream to a group member / waiting for an expected member's first frame.
        part: the next frame of a stream that has started.
        result: an owner's averaged shard, counted from the end of our upload.
    """

    matchmaking: float = 2.0
    join: float = 3.0
    part: float = 3.0
    result: float = 10.0


@dataclass
class RoundResult:
    """What one averaging round did at this peer."""

    round_id: int
    status: str  # "averaged" | "alone" | "failed"
    group: list[str]
    averaged: torch.Tensor
    shards_averaged: int = 0
    shards_total: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        return len(self.group)


async def _send_tensor(writer: asyncio.StreamWriter, values: torch.Tensor, codec: Codec, counter: ByteCounter) -> None:
    for start in range(0, max(values.numel(), 1), PART_NUMEL):
        await write_frame(writer, FrameKind.PART, codec.encode(values[start : start + PART_NUMEL]), counter)


async def _receive_tensor(
    reader: asyncio.StreamReader, numel: int, codec: Codec, counter: ByteCounter, timeout: float
) -> torch.Tensor:
    """Read a whole tensor of ``numel`` values sent by ``_send_tensor`` (never a partial one)."""
    out = torch.empty(numel)
    for start in range(0, max(numel, 1), PART_NUMEL):
        kind, payload = await read_frame(reader, counter, timeout=timeout)
        if kind != FrameKind.PART:
            raise ProtocolError(f"expected a PART frame, got {kind.name}")
        end = min(start + PART_NUMEL, numel)
        out[start:end] = codec.decode(payload, end - start)
    return out


class RoundExchange:
    """The state of one round at one peer: its plan, its snapshot, its own shard's reduction."""

    def __init__(
        self,
        p2p: P2P,
        protocol: str,
        plan: GroupPlan,
        me: str,
        snapshot: torch.Tensor,
        weight: float,
        codec: Codec,
        timeouts: Timeouts,
    ):
        self.p2p, self.protocol, self.plan, self.me = p2p, protocol, plan, me
        self.snapshot, self.weight, self.codec, self.timeouts = snapshot, weight, codec, timeouts
        self.counter = ByteCounter()
        self.errors: list[str] = []
        self._shards = plan.shards()
        self._own_shard = self._shards.get(me)
        self._reduction = ShardReduction(snapshot[slice(*self._own_shard)], weight) if self._own_shard else None
        self._expected = {peer: asyncio.get_running_loop().create_future() for peer in plan.members if peer != me}
        self._mean: asyncio.Future[torch.Tensor | None] = asyncio.get_running_loop().create_future()
        self._joined: set[str] = set()
        self._replies: list[asyncio.Future[None]] = []

    async def run(self) -> RoundResult:
        started = time.perf_counter()
        averaged = self.snapshot.clone()
        uploads = [self._contribute(owner, bounds) for owner, bounds in self._shards.items() if owner != self.me]
        outcomes = await asyncio.gather(self._reduce_own_shard(), *uploads)
        combined = 0
        for outcome in outcomes:
            if outcome is not None:
                (start, end), values = outcome
                averaged[start:end] = values
                combined += 1
        if self._replies:
            await asyncio.wait(self._replies, timeout=self.timeouts.result)
        status = "alone" if len(self.plan.members) == 1 else "averaged" if combined else "failed"
        return RoundResult(
            self.plan.round_id,
            status,
            list(self.plan.members),
            averaged,
            combined,
            len(self._shards),
            self.counter.sent,
            self.counter.received,
            time.perf_counter() - started,
            self.errors,
        )

    async def _reduce_own_shard(self) -> tuple[tuple[int, int], torch.Tensor] | None:
        """Wait for the other members' slices of our shard, then publish the weighted mean."""
        if self._reduction is None:
            return None
        waiting = list(self._expected.values())
        if waiting:
            _, not_joined = await asyncio.wait(waiting, timeout=self.timeouts.join)
            for peer, future in self._expected.items():
                if future in not_joined and peer not in self._joined:
                    future.set_result(False)
                    self.errors.append(f"{peer} did not send its slice of our shard within join={self.timeouts.join}s")
            await asyncio.wait(waiting)
        mean = self._reduction.mean() if self._reduction.contributors else None
        self._mean.set_result(mean)
        return (self._own_shard, mean) if mean is not None else None

    async def handle_contribution(
        self, sender: str, hello: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one member's stream to us: validate, receive its slice whole, reply with the mean."""
        future = self._expected.get(sender)
        reason = check_hello(hello, self.plan, sender, self.me)
        if reason is None and (self._reduction is None or future is None or future.done()):
            reason = (
                "late: this shard was already reduced"
                if future is not None and future.done()
                else "not a reducer of this round"
            )
        if reason is not None:
            logger.warning("rejected round %s contribution from %s: %s", self.plan.round_id, sender, reason)
            await write_message(writer, FrameKind.REJECT, {"reason": reason}, self.counter)
            return
        self._joined.add(sender)
        start, end = self._own_shard
        try:
            values = await _receive_tensor(reader, end - start, self.codec, self.counter, self.timeouts.part)
        except EXCHANGE_ERRORS as e:
            self.errors.append(f"slice from {sender} failed: {e!r}")
            future.set_result(False)
            return
        if not torch.isfinite(values).all():
            self.errors.append(f"slice from {sender} has NaN/Inf: dropped")
            future.set_result(False)
            await write_message(writer, FrameKind.REJECT, {"reason": "non-finite values"}, self.counter)
            return
        self._reduction.add(values, float(hello["weight"]))
        future.set_result(True)
        replied = asyncio.get_running_loop().create_future()
        self._replies.append(replied)
        try:
            mean = await self._mean
            if mean is not None:
                await write_message(writer, FrameKind.RESULT, {"round_id": self.plan.round_id}, self.counter)
                await _send_tensor(writer, mean, self.codec, self.counter)
        except EXCHANGE_ERRORS as e:
            self.errors.append(f"reply to {sender} failed: {e!r}")
        finally:
            replied.set_result(None)

    async def _contribute(self, owner: str, bounds: tuple[int, int]) -> tuple[tuple[int, int], torch.Tensor] | None:
        """Send our slice of ``owner``'s shard and receive the mean back; None if anything failed."""
        start, end = bounds
        writer = None
        try:
            async with asyncio.timeout(self.timeouts.join):
                _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(owner), self.protocol)
            hello = {
                "run_id": self.plan.run_id,
                "round_id": self.plan.round_id,
                "sender": self.me,
                "digest": self.plan.digest,
                "start": start,
                "end": end,
                "weight": self.weight,
            }
            await write_message(writer, FrameKind.HELLO, hello, self.counter)
            await _send_tensor(writer, self.snapshot[start:end], self.codec, self.counter)
            kind, message = await read_message(
                reader, self.counter, timeout=self.timeouts.result, expect=(FrameKind.RESULT, FrameKind.REJECT)
            )
            if kind == FrameKind.REJECT:
                self.errors.append(f"{owner} refused our slice: {message.get('reason')}")
                return None
            values = await _receive_tensor(reader, end - start, self.codec, self.counter, self.timeouts.part)
            if not torch.isfinite(values).all():
                raise ProtocolError("averaged shard has NaN/Inf")
            return bounds, values
        except EXCHANGE_ERRORS as e:
            self.errors.append(f"shard of {owner} failed: {e!r}")
            return None
        finally:
            if writer is not None:
                writer.close()
