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
from collections import Counter
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, PeerID

from gossiptrain.allreduce import GroupPlan, ShardReduction, check_hello
from gossiptrain.codecs import Codec, CodecError, NonFiniteValues
from gossiptrain.transport import (
    ByteCounter,
    FrameKind,
    OversizedFrame,
    ProtocolError,
    read_frame,
    read_message,
    write_frame,
    write_message,
)

logger = logging.getLogger(__name__)

PART_NUMEL = 2**18
EXCHANGE_ERRORS = (ProtocolError, CodecError, ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError)


def classify(error: BaseException) -> str:
    """The rejection kind counted for a failed read of a peer's data."""
    if isinstance(error, NonFiniteValues):
        return "non_finite"
    if isinstance(error, OversizedFrame):
        return "oversized"
    if isinstance(error, CodecError):
        return "wrong_shape"
    if isinstance(error, TimeoutError):  # before OSError, its base class
        return "timeout"
    if isinstance(error, (asyncio.IncompleteReadError, ConnectionError, OSError)):
        return "truncated"
    return "garbage"


class Rejections(Counter):
    """Counts of refused inputs by kind; each refusal is also one warning line."""

    def record(self, kind: str, sender: str, round_id: object, detail: str) -> None:
        self[kind] += 1
        logger.warning("rejected %s from %s in round %s: %s", kind, sender, round_id, detail)


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
        rejections: Rejections,
    ):
        self.p2p, self.protocol, self.plan, self.me = p2p, protocol, plan, me
        self.rejections = rejections
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
        refusal = check_hello(hello, self.plan, sender, self.me, self.codec.name)
        if refusal is None and future is not None and future.done():
            refusal = "late", "this shard was already reduced"
        if refusal is None and self._reduction is None:
            refusal = "not_in_group", "we reduce no shard in this round"
        if refusal is not None:
            await self._refuse(writer, sender, *refusal)
            return
        self._joined.add(sender)
        start, end = self._own_shard
        try:
            values = await _receive_tensor(reader, end - start, self.codec, self.counter, self.timeouts.part)
        except EXCHANGE_ERRORS as e:
            future.set_result(False)
            await self._refuse(writer, sender, classify(e), f"slice dropped: {e!r}")
            return
        self._reduction.add(values, float(hello["weight"]))
        replied = asyncio.get_running_loop().create_future()
        self._replies.append(replied)
        future.set_result(True)
        try:
            mean = await self._mean
            if mean is not None:
                async with asyncio.timeout(self._sending_time(mean.numel())):
                    await write_message(writer, FrameKind.RESULT, {"round_id": self.plan.round_id}, self.counter)
                    await _send_tensor(writer, mean, self.codec, self.counter)
        except EXCHANGE_ERRORS as e:
            self.errors.append(f"reply to {sender} failed: {e!r}")
        finally:
            replied.set_result(None)

    async def _refuse(self, writer: asyncio.StreamWriter, sender: str, kind: str, detail: str) -> None:
        self.rejections.record(kind, sender, self.plan.round_id, detail)
        self.errors.append(f"refused {sender}: {kind}: {detail}")
        try:
            await write_message(writer, FrameKind.REJECT, {"reason": f"{kind}: {detail}"}, self.counter)
        except EXCHANGE_ERRORS:
            pass

    def _sending_time(self, numel: int) -> float:
        """A receiver that stops reading blocks our writes: allow one ``part`` timeout per part."""
        return self.timeouts.part * (2 + numel // PART_NUMEL)

    def hello(self, start: int, end: int) -> dict:
        """The HELLO this peer sends to the owner of ``[start, end)``."""
        return {
            "run_id": self.plan.run_id,
            "round_id": self.plan.round_id,
            "sender": self.me,
            "digest": self.plan.digest,
            "codec": self.codec.name,
            "start": start,
            "end": end,
            "weight": self.weight,
        }

    async def upload(self, writer: asyncio.StreamWriter, start: int, end: int) -> None:
        """Send our slice of one owner's shard (testing.FaultyExchange overrides this to misbehave)."""
        await write_message(writer, FrameKind.HELLO, self.hello(start, end), self.counter)
        await _send_tensor(writer, self.snapshot[start:end], self.codec, self.counter)

    async def _contribute(self, owner: str, bounds: tuple[int, int]) -> tuple[tuple[int, int], torch.Tensor] | None:
        """Send our slice of ``owner``'s shard and receive the mean back; None if anything failed."""
        start, end = bounds
        writer = None
        try:
            async with asyncio.timeout(self.timeouts.join):
                _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(owner), self.protocol)
            async with asyncio.timeout(self._sending_time(end - start)):
                await self.upload(writer, start, end)
            kind, message = await read_message(
                reader, self.counter, timeout=self.timeouts.result, expect=(FrameKind.RESULT, FrameKind.REJECT)
            )
            if kind == FrameKind.REJECT:
                self.errors.append(f"{owner} refused our slice: {message.get('reason')}")
                return None
            return bounds, await self._receive_mean(owner, reader, end - start)
        except EXCHANGE_ERRORS as e:
            self.errors.append(f"shard of {owner} failed: {e!r}")
        finally:
            if writer is not None:
                writer.close()
        return None

    async def _receive_mean(self, owner: str, reader: asyncio.StreamReader, numel: int) -> torch.Tensor:
        """The owner's averaged shard; malformed data is counted as a rejection of that owner."""
        try:
            values = await _receive_tensor(reader, numel, self.codec, self.counter, self.timeouts.part)
        except (ProtocolError, CodecError) as e:
            self.rejections.record(classify(e), owner, self.plan.round_id, f"averaged shard dropped: {e!r}")
            raise
        return values
