"""Framing of averaging messages over hivemind P2P binary streams, with bounded waits.

A libp2p stream has no half-close, so every message is a frame: a 5-byte prefix
(kind: uint8, length: uint32 big-endian) and a payload.  Control frames carry a msgpack dict;
data frames carry codec bytes.  Every read has a named timeout and a size cap, so a stalled or
malicious sender costs at most one timeout and never an unbounded buffer.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

FRAME_PREFIX = struct.Struct(">BI")
MAX_FRAME_BYTES = 64 * 2**20


class FrameKind(IntEnum):
    HELLO = 1  # contributor -> owner: who I am, which round, group digest, weight, shard size
    PART = 2  # a slice of tensor data, codec-encoded
    RESULT = 3  # owner -> contributor: the averaged shard follows as PART frames
    REJECT = 4  # owner -> contributor: refused, with a reason
    STATE = 5  # state donor -> joiner: size, sha256 and chunk size of the state; PART frames follow
    JOIN = 6  # member -> its cell's leader: its round record (``assembly``)
    PLAN = 7  # leader -> member: the member's group for the round


class ProtocolError(Exception):
    """The remote side sent something that does not follow the protocol."""


class OversizedFrame(ProtocolError):
    """A frame announced more bytes than the cap allows."""


@dataclass
class ByteCounter:
    """Bytes that crossed the wire (payload and framing) in each direction."""

    sent: int = 0
    received: int = 0


async def write_frame(
    writer: asyncio.StreamWriter, kind: FrameKind, payload: bytes | memoryview, counter: ByteCounter
) -> None:
    writer.write(FRAME_PREFIX.pack(kind, len(payload)))
    writer.write(payload)
    counter.sent += FRAME_PREFIX.size + len(payload)
    await writer.drain()


async def write_message(
    writer: asyncio.StreamWriter, kind: FrameKind, message: dict[str, Any], counter: ByteCounter
) -> None:
    await write_frame(writer, kind, msgpack.packb(message), counter)


async def read_frame(
    reader: asyncio.StreamReader, counter: ByteCounter, *, timeout: float, max_bytes: int = MAX_FRAME_BYTES
) -> tuple[FrameKind, bytes]:
    """Read one whole frame within ``timeout`` seconds; raise ProtocolError on bad framing."""
    async with asyncio.timeout(timeout):
        prefix = await reader.readexactly(FRAME_PREFIX.size)
        kind, length = FRAME_PREFIX.unpack(prefix)
        if length > max_bytes:
            raise OversizedFrame(f"frame of {length} bytes exceeds the cap of {max_bytes} bytes")
        try:
            kind = FrameKind(kind)
        except ValueError:
            raise ProtocolError(f"unknown frame kind {kind}") from None
        payload = await reader.readexactly(length)
    counter.received += FRAME_PREFIX.size + length
    return kind, payload


async def read_message(
    reader: asyncio.StreamReader, counter: ByteCounter, *, timeout: float, expect: tuple[FrameKind, ...]
) -> tuple[FrameKind, dict[str, Any]]:
    """Read a control frame of one of the ``expect`` kinds and decode its msgpack dict."""
    kind, payload = await read_frame(reader, counter, timeout=timeout, max_bytes=2**16)
    if kind not in expect:
        raise ProtocolError(f"expected a {'/'.join(k.name for k in expect)} frame, got {kind.name}")
    try:
        message = msgpack.unpackb(payload)
    except Exception as e:
        raise ProtocolError(f"undecodable {kind.name} frame: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"{kind.name} frame is not a mapping")
    return kind, message


async def close_after_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> bool:
    """Close our end of a stream once the other side has closed its own; returns whether it did in time.

    The side that writes last must not close first: p2pd resets a libp2p stream whose local socket
    closes, and a reset makes the other daemon drop the frames it has not yet handed over (seen under
    load as a reply that never arrived, with nothing amiss at the sender).  The other side closes once
    it has read everything, so its EOF is the acknowledgement that our last frames were delivered.
    """
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(2**16):
                pass  # the protocol expects nothing more: whatever comes is discarded
        return True
    except (TimeoutError, ConnectionError, OSError):
        return False
    finally:
        writer.close()
