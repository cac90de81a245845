"""State download for joiners: a new peer copies a live peer's training state before it averages.

A peer that joins a run late must neither train from scratch nor average its fresh
initialisation (and empty optimizer state) into the swarm: it first downloads the parameters,
the optimizer state and the step counter of a live peer (DESIGN: churn).  Every peer that has its
state serves it on the protocol ``gossiptrain.{run_id}.state`` and says so in its membership
record (``serves_state``); a peer that is still downloading does not, so joiners never copy
each other's initialisation.

One download is one stream.  The joiner sends HELLO ``{"run_id"}``; the donor takes a snapshot
(``StateProvider``), serializes it once for this request with ``torch.save``, and answers with a
STATE frame ``{"size", "sha256", "chunk_bytes"}`` (or a REJECT with a reason), then the bytes as
PART frames of at most ``chunk_bytes``.  The joiner loads them with ``torch.load(weights_only=True)``:
tensors and plain containers only, so a donor cannot make the joiner run code.

Failure semantics: a donor that cannot be reached, refuses, dies or stalls mid-stream (each
frame is bounded by ``Timeouts.part``), sends more or other bytes than it announced, or a state
that fails the joiner's validation costs one warning line and a counter (``state_<kind>`` in
``Peer.rejections``), and the joiner tries the next donor, highest step first.  A donor that sent
wrong bytes is not asked again; one that could not be dialed (libp2p's dial backoff after a
failed dial, a restarting daemon), was busy, stalled or closed is asked again in the next pass
over the live donors, after a pause that doubles from ``RETRY_PAUSE`` up to ``MAX_RETRY_PAUSE``.
Nothing is returned until a whole state has arrived, matched its checksum and passed validation;
when no donor works within the total timeout, ``download_state`` raises ``StateDownloadError``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from hivemind.p2p import P2PDaemonError, PeerID

from gossiptrain.exchange import classify
from gossiptrain.transport import (
    MAX_FRAME_BYTES,
    ByteCounter,
    FrameKind,
    OversizedFrame,
    ProtocolError,
    close_after_peer,
    read_frame,
    read_message,
    write_frame,
    write_message,
)

if TYPE_CHECKING:
    from gossiptrain.exchange import Timeouts
    from gossiptrain.peer import Peer

logger = logging.getLogger(__name__)

# Each chunk must arrive within ``Timeouts.part`` (3 s): 256 KiB then needs 0.7 Mbit/s per download.
# 1 MiB chunks needed 2.8 Mbit/s, and three joiners of one donor on a 10 Mbit/s link timed out.
STATE_CHUNK_BYTES = 2**18
RETRY_PAUSE, MAX_RETRY_PAUSE = 1.0, 8.0  # seconds between passes over donors that may yet answer

StateProvider = Callable[[], dict[str, Any]]
"""Returns this peer's training state: a dict of tensors and plain containers (ints, floats, strings,
lists, tuples, dicts), e.g. ``{"params": [...], "optimizer": optimizer.state_dict(), "local_step": n}``.
It is called in a worker thread, once per request, and must return a consistent snapshot that does not
change afterwards (copies of the live tensors, taken under the lock that guards training)."""


class StateDownloadError(ConnectionError):
    """No live peer could give this peer the run's training state."""


class NoStateDonors(StateDownloadError):
    """No live peer of the run serves its state: this peer is the first, or all others are still joining."""


class DonorRefused(Exception):
    """The donor answered with a REJECT (busy, another run, or its snapshot failed)."""


class ChecksumMismatch(ProtocolError):
    """The bytes that arrived do not have the sha256 digest that the donor announced."""


class InvalidState(ProtocolError):
    """The state arrived whole but is not one that this peer can load (format, shapes, values)."""


DOWNLOAD_ERRORS = (
    ProtocolError,
    DonorRefused,
    P2PDaemonError,
    ConnectionError,
    asyncio.IncompleteReadError,
    TimeoutError,
    OSError,
)


def state_protocol(run_id: str) -> str:
    """The name of the stream protocol on which the peers of ``run_id`` serve their state."""
    return f"gossiptrain.{run_id}.state"


def serialize_state(state: Mapping[str, Any]) -> memoryview:
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getbuffer()


def deserialize_state(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Load bytes made by ``serialize_state``; only tensors and plain containers are accepted."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InvalidState(f"not a loadable state: {e}") from None
    if not isinstance(state, dict):
        raise InvalidState(f"the state is a {type(state).__name__}, not a dict")
    return state


def _step(record: Mapping[str, Any]) -> int:
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else 0


def state_donors(records: Mapping[str, Mapping[str, Any]], own_id: str) -> list[str]:
    """The peers to ask for the state, best first: every live peer that serves it, except this one and
    client-mode peers (not reachable), the highest ``step`` first, ties in random order (spreads the load)."""
    donors = [
        peer
        for peer, record in records.items()
        if peer != own_id and record.get("serves_state") and not record.get("client")
    ]
    random.shuffle(donors)
    return sorted(donors, key=lambda peer: -_step(records[peer]))


class StateServer:
    """Answers joiners' downloads with snapshots of this peer's training state (see the module docstring).

    Args:
        provider: takes the snapshot; see ``StateProvider``.
        run_id: the run whose joiners are served; a HELLO of another run is refused.
        timeouts: ``join`` bounds the wait for a joiner's HELLO, ``part`` the sending of each frame.
        chunk_bytes: payload of one PART frame.
        max_concurrent: joiners served at once; more are refused and try another donor, which bounds the
            memory taken by serialized copies.
    """

    def __init__(
        self,
        provider: StateProvider,
        run_id: str,
        timeouts: Timeouts,
        *,
        chunk_bytes: int = STATE_CHUNK_BYTES,
        max_concurrent: int = 4,
    ):
        if not 0 < chunk_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_FRAME_BYTES}], got {chunk_bytes}")
        self.provider, self.run_id, self.timeouts = provider, run_id, timeouts
        self.chunk_bytes, self.max_concurrent = chunk_bytes, max_concurrent
        self.served = 0
        self._streams: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._busy = 0
        self.closed = asyncio.Event()

    def snapshot(self) -> tuple[memoryview, str]:
        """Take and serialize one snapshot (in a worker thread); returns the bytes and their sha256."""
        data = serialize_state(self.provider())
        return data, hashlib.sha256(data).hexdigest()

    async def handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The stream handler registered on the peer's P2P."""
        task, counter, joiner = asyncio.current_task(), ByteCounter(), info.peer_id.to_base58()
        self._streams[task] = writer
        try:
            _, hello = await read_message(reader, counter, timeout=self.timeouts.join, expect=(FrameKind.HELLO,))
            if hello.get("run_id") != self.run_id:
                return await self._reject(writer, counter, f"this peer trains run {self.run_id!r}")
            if self.closed.is_set():
                return await self._reject(writer, counter, "this peer is leaving the run")
            if self._busy >= self.max_concurrent:
                return await self._reject(writer, counter, f"busy: serving {self._busy} joiners already")
            self._busy += 1
            try:
                await self._serve(writer, counter, joiner)
            finally:
                self._busy -= 1
        except DOWNLOAD_ERRORS as e:
            logger.info("state download by %s ended early: %r", joiner, e)
        finally:
            self._streams.pop(task, None)
            await close_after_peer(reader, writer, self.timeouts.part)

    async def _serve(self, writer: asyncio.StreamWriter, counter: ByteCounter, joiner: str) -> None:
        started = time.perf_counter()
        try:
            data, digest = await asyncio.to_thread(self.snapshot)
        except Exception as e:
            logger.warning("could not take a snapshot of the state for %s: %r", joiner, e)
            return await self._reject(writer, counter, f"the donor could not take a snapshot: {e!r}")
        header = {"size": len(data), "sha256": digest, "chunk_bytes": self.chunk_bytes}
        async with asyncio.timeout(self.timeouts.part):
            await write_message(writer, FrameKind.STATE, header, counter)
        await self.send_parts(writer, data, counter)
        self.served += 1
        logger.info("served %d bytes of state to %s in %.2fs", len(data), joiner, time.perf_counter() - started)

    async def send_parts(self, writer: asyncio.StreamWriter, data: memoryview, counter: ByteCounter) -> None:
        """Send ``data`` as PART frames, each within ``timeouts.part`` (testing overrides this to misbehave)."""
        for start in range(0, len(data), self.chunk_bytes):
            async with asyncio.timeout(self.timeouts.part):
                await write_frame(writer, FrameKind.PART, data[start : start + self.chunk_bytes], counter)

    async def _reject(self, writer: asyncio.StreamWriter, counter: ByteCounter, reason: str) -> None:
        async with asyncio.timeout(self.timeouts.part):
            await write_message(writer, FrameKind.REJECT, {"reason": reason}, counter)

    async def close(self) -> None:
        """Refuse new requests and end the downloads in progress (their joiners try another donor)."""
        self.closed.set()
        for writer in self._streams.values():
            writer.close()
        if self._streams:
            await asyncio.wait(list(self._streams), timeout=self.timeouts.part)


@dataclass
class Progress:
    """How far one download got: the size the donor announced and the bytes received so far."""

    size: int | None = None
    received: int = 0


async def fetch_state(
    peer: Peer, donor: str, *, header_timeout: float, max_bytes: int, progress: Progress | None = None
) -> bytearray:
    """Download the serialized state from one donor and check its size and sha256; raise on any failure."""
    counter, progress = ByteCounter(), progress or Progress()
    async with asyncio.timeout(peer.timeouts.join):
        _, reader, writer = await peer.p2p.call_binary_stream_handler(
            PeerID.from_base58(donor), state_protocol(peer.run_id)
        )
    try:
        await write_message(writer, FrameKind.HELLO, {"run_id": peer.run_id}, counter)
        kind, header = await read_message(
            reader, counter, timeout=header_timeout, expect=(FrameKind.STATE, FrameKind.REJECT)
        )
        if kind == FrameKind.REJECT:
            raise DonorRefused(f"refused: {header.get('reason')}")
        size, digest, chunk_bytes = header.get("size"), header.get("sha256"), header.get("chunk_bytes")
        if not isinstance(size, int) or not 0 < size <= max_bytes:
            raise OversizedFrame(f"the donor announced a state of {size!r} bytes; at most {max_bytes} are accepted")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ProtocolError(f"the donor announced a malformed sha256 digest {digest!r}")
        if not isinstance(chunk_bytes, int) or not 0 < chunk_bytes <= MAX_FRAME_BYTES:
            raise ProtocolError(f"the donor announced chunks of {chunk_bytes!r} bytes")
        data, hasher, progress.size = bytearray(), hashlib.sha256(), size
        while len(data) < size:
            kind, part = await read_frame(
                reader, counter, timeout=peer.timeouts.part, max_bytes=min(chunk_bytes, size - len(data))
            )
            if kind != FrameKind.PART or not part:
                raise ProtocolError(f"expected a non-empty PART frame, got {kind.name} of {len(part)} bytes")
            hasher.update(part)
            data += part
            progress.received = len(data)
        if hasher.hexdigest() != digest:
            raise ChecksumMismatch(f"sha256 of the {size} bytes received is {hasher.hexdigest()}, not {digest}")
        return data
    finally:
        writer.close()


def _loaded(data: bytearray, validate: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    state = deserialize_state(data)
    if validate is not None:
        try:
            validate(state)
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidState(str(e)) from None
    return state


def _count_failure(peer: Peer, donor: str, error: BaseException, progress: Progress, last: bool) -> None:
    kind = _rejection_kind(error)
    peer.rejections[kind] += 1
    logger.warning(
        "could not download the state from %s after %d of %s bytes (%s: %r); %s",
        donor,
        progress.received,
        progress.size,
        kind,
        error,
        "no donor left in this pass" if last else "trying the next donor",
    )


def _rejection_kind(error: BaseException) -> str:
    if isinstance(error, ChecksumMismatch):
        return "state_bad_checksum"
    if isinstance(error, InvalidState):
        return "state_invalid"
    if isinstance(error, DonorRefused):
        return "state_refused"
    return f"state_{classify(error)}"


async def download_state(
    peer: Peer,
    *,
    timeout: float = 300.0,
    header_timeout: float = 30.0,
    validate: Callable[[dict[str, Any]], None] | None = None,
    max_bytes: int = 2**36,
) -> dict[str, Any]:
    """Download the training state from a live peer of ``peer``'s run (see the module docstring).

    Args:
        peer: a started peer; donors are found in its membership view (``state_donors``).
        timeout: bound on the whole download, over all donors tried.
        header_timeout: bound on a donor's snapshot and serialization, until its STATE frame arrives.
            Each later frame is bounded by ``peer.timeouts.part``.
        validate: raises ``ValueError`` if a state cannot be loaded here (e.g. other shapes); that donor
            is then skipped like one that sent garbage.
        max_bytes: the largest state accepted.

    Returns the deserialized state. Raises ``NoStateDonors`` if no live peer serves its state, and
    ``StateDownloadError`` if none of those that do could give it within ``timeout``.
    """
    failures: list[str] = []
    dropped: set[str] = set()  # donors that sent wrong bytes
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            donors = state_donors(await peer.live_peers(), peer.peer_id)
            if not donors:
                raise NoStateDonors(f"no live peer of run {peer.run_id!r} serves its training state")
            for attempt in itertools.count():
                if attempt:
                    await asyncio.sleep(min(RETRY_PAUSE * 2 ** (attempt - 1), MAX_RETRY_PAUSE))
                    donors = [d for d in state_donors(await peer.live_peers(), peer.peer_id) if d not in dropped]
                if not donors:
                    break
                for donor in donors:
                    progress = Progress()
                    try:
                        data = await fetch_state(
                            peer, donor, header_timeout=header_timeout, max_bytes=max_bytes, progress=progress
                        )
                        state = await asyncio.to_thread(_loaded, data, validate)
                    except DOWNLOAD_ERRORS as e:
                        failures.append(f"{donor}: {e!r}")
                        if isinstance(e, ProtocolError):
                            dropped.add(donor)
                        _count_failure(peer, donor, e, progress, last=donor == donors[-1])
                        continue
                    seconds = time.perf_counter() - started
                    logger.info(
                        "downloaded %d bytes of state from %s in %.2fs (%.1f MB/s)",
                        len(data),
                        donor,
                        seconds,
                        len(data) / 1e6 / max(seconds, 1e-9),
                    )
                    return state
    except TimeoutError:
        failures.append(f"the download did not finish within {timeout}s")
    raise StateDownloadError(
        f"could not download the training state of run {peer.run_id!r}: {'; '.join(failures)}. "
        f"Check that the peers are reachable and retry, or start without it (load_state=False) "
        f"to train from this peer's own initialisation"
    )
