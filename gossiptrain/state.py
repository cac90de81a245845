"""State download for joiners: a new peer copies a live peer's training state before it averages.

A peer that joins a run late must neither train from scratch nor average its fresh
initialisation (and empty optimizer state) into the swarm: it first downloads the parameters,
the optimizer state and the step counter of a live peer (DESIGN: churn).  Every peer that has its
state serves it on the protocol ``gossiptrain.{run_id}.state`` and says so in its membership
record (``serves_state``); a peer that is still downloading does not, so joiners never copy
each other's initialisation.

One download is one stream.  The joiner sends HELLO ``{"run_id"}``; the donor answers with a
STATE frame ``{"size", "chunk_bytes"}`` (or a REJECT with a reason), then the state's bytes as PART
frames of at most ``chunk_bytes``, then a STATE frame ``{"sha256"}`` of the bytes it sent.  The bytes
(``StateStream``): ``MAGIC``, the length of a skeleton, the skeleton (``torch.save`` of the state
with every tensor of more than ``SMALL_TENSOR_BYTES`` replaced by a ``{TENSOR_KEY: [dtype, shape,
offset]}`` entry), then those tensors' bytes, each at an offset aligned to ``ALIGN``.  The joiner
loads the skeleton with ``torch.load(weights_only=True)`` (tensors and plain containers only, so a
donor cannot make the joiner run code) and views the tensors in the bytes it received.

Memory: the donor serializes nothing whole and copies no tensor whole.  It takes the skeleton under
the state lock (the step counters, hyperparameters and small tensors, such as Adam's step counts,
from one instant) and then reads each large tensor, a chunk at a time, from the live tensor under
the lock, as the chunks are sent: a download costs the donor ``READ_AHEAD`` chunks of memory,
whatever the model's size.  The price: while the donor trains on, the large tensors (parameters,
optimizer moments) arrive as they are when each chunk is read, a few local steps newer than the
counters where the download takes that long, as hivemind's state download does.  A joiner then
averages with the swarm, which evens that out.

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
import contextlib
import hashlib
import io
import itertools
import logging
import random
import struct
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from hivemind.p2p import P2PDaemonError, PeerID

from gossiptrain.progress import ShownProgress, show_progress
from gossiptrain.rejections import classify
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
    from gossiptrain.rejections import Rejections
    from gossiptrain.rounds import Timeouts

logger = logging.getLogger(__name__)

# Each chunk must arrive within ``Timeouts.part`` (3 s): 256 KiB then needs 0.7 Mbit/s per download.
# 1 MiB chunks needed 2.8 Mbit/s, and three joiners of one donor on a 10 Mbit/s link timed out.
STATE_CHUNK_BYTES = 2**18
RETRY_PAUSE, MAX_RETRY_PAUSE = 1.0, 8.0  # seconds between passes over donors that may yet answer
READ_AHEAD = 16  # chunks a download reads from the live state at once (one worker-thread hop, 4 MiB)
SMALL_TENSOR_BYTES = 2**16  # tensors up to this size travel in the skeleton, copied at the snapshot's instant
MAGIC = b"gtstate1"
ALIGN = 64  # each large tensor's bytes start at a multiple of this offset
TENSOR_KEY = "gossiptrain.tensor"
_LENGTH = struct.Struct("<Q")
_DTYPES = {
    str(dtype): dtype
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}

StateProvider = Callable[[], dict[str, Any]]
"""Returns this peer's training state: a dict of tensors and plain containers (ints, floats, strings,
lists, tuples, dicts), e.g. ``{"params": [...], "optimizer": optimizer.state_dict(), "local_step": n}``.
It is called in a worker thread, once per request, under the server's ``lock`` if it has one; its
tensors may be the live ones (not copies): the server reads them under that lock, a chunk at a time."""


class Joiner(Protocol):
    """What a download needs of the joining peer (a started ``peer.Peer``)."""

    run_id: str
    peer_id: str
    p2p: Any  # a ``network.Transport``
    timeouts: Timeouts
    rejections: Rejections

    async def live_peers(self) -> dict[str, dict[str, Any]]: ...


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
    """Load bytes made by ``serialize_state`` or a ``StateStream``; only tensors and plain containers
    are accepted.  A stream's large tensors are views of ``data`` (it must be writable: a bytearray)."""
    view = memoryview(data).cast("B")
    streamed = bytes(view[: len(MAGIC)]) == MAGIC
    if streamed:
        (length,) = _LENGTH.unpack_from(view, len(MAGIC)) if len(view) >= len(MAGIC) + _LENGTH.size else (-1,)
        start = len(MAGIC) + _LENGTH.size
        if not 0 < length <= len(view) - start:
            raise InvalidState(f"the state's skeleton of {length} bytes does not fit in {len(view)} bytes")
        view = view[start : start + length]
    try:
        state = torch.load(io.BytesIO(view), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InvalidState(f"not a loadable state: {e}") from None
    if not isinstance(state, dict):
        raise InvalidState(f"the state is a {type(state).__name__}, not a dict")
    if not streamed:
        return state
    if not isinstance(data, bytearray):  # the tensors are views of it: it must be writable
        data = bytearray(data)
    return _filled(state, data, start + length + -(start + length) % ALIGN)  # the skeleton is padded


def _filled(obj: Any, data: bytes | bytearray | memoryview, body: int) -> Any:
    """``obj`` with each ``{TENSOR_KEY: [dtype, shape, offset]}`` entry replaced by its tensor, a view of
    ``data`` from ``body + offset`` (checked to lie in ``data``)."""
    if isinstance(obj, dict):
        if TENSOR_KEY in obj:
            entry = obj[TENSOR_KEY]
            if not (isinstance(entry, list) and len(entry) == 3 and entry[0] in _DTYPES):
                raise InvalidState(f"malformed tensor entry {entry!r}")
            dtype, shape, offset = _DTYPES[entry[0]], entry[1], entry[2]
            if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
                raise InvalidState(f"malformed tensor shape {shape!r}")
            count = 1
            for n in shape:
                count *= n
            start = body + offset if isinstance(offset, int) and offset >= 0 else -1
            if start < body or start % ALIGN or start + count * dtype.itemsize > len(data):
                raise InvalidState(f"a tensor of {count} {dtype} values at offset {offset} lies outside the state")
            if count == 0:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(data, dtype=dtype, count=count, offset=start).view(shape)
        return {key: _filled(value, data, body) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_filled(value, data, body) for value in obj)
    return obj


class StateStream:
    """The bytes of one download (module docstring), read from the state as they are sent.

    Made in a worker thread under ``lock``: the skeleton is the state at that instant (large tensors
    by their dtype, shape and offset only).  ``chunks`` then reads the large tensors' bytes from the
    live tensors, taking ``lock`` for each piece, and hashes what it yields (``hexdigest`` once done).
    """

    def __init__(self, state: Mapping[str, Any], lock: Any = None):
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.tensors: list[tuple[torch.Tensor, int]] = []  # (live tensor, offset in the body)
        self._body = 0
        skeleton = io.BytesIO()
        torch.save(self._skeleton(dict(state)), skeleton)
        head = MAGIC + _LENGTH.pack(len(skeleton.getbuffer())) + skeleton.getvalue()
        self.head = head + bytes(-len(head) % ALIGN)
        self.size = len(self.head) + self._body
        self._hash = hashlib.sha256()

    def _skeleton(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if obj.numel() * obj.element_size() <= SMALL_TENSOR_BYTES or str(obj.dtype) not in _DTYPES:
                return obj.detach().to("cpu", copy=True)
            offset, self._body = self._body, self._body + obj.numel() * obj.element_size()
            self._body += -self._body % ALIGN
            self.tensors.append((obj.detach(), offset))
            return {TENSOR_KEY: [str(obj.dtype), list(obj.shape), offset]}
        if isinstance(obj, dict):
            return {key: self._skeleton(value) for key, value in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._skeleton(value) for value in obj)
        return obj

    def read(self, start: int, length: int) -> bytes:
        """``length`` bytes of the stream from ``start`` (in a worker thread: it takes the lock)."""
        out = bytearray(length)
        position, end = start, start + length
        if position < len(self.head):
            piece = self.head[position : min(end, len(self.head))]
            out[: len(piece)] = piece
            position += len(piece)
        for tensor, offset in self.tensors:
            low, nbytes = len(self.head) + offset, tensor.numel() * tensor.element_size()
            high = low + nbytes + (-nbytes % ALIGN)
            if position >= end or high <= position:
                continue
            a, b = position - low, min(end, low + nbytes) - low  # bytes of this tensor to copy
            if b > a:
                with self.lock, torch.no_grad():
                    flat = tensor.reshape(-1) if tensor.is_contiguous() else None
                    if flat is None:  # not contiguous: copy it whole (rare: parameters are contiguous)
                        flat = tensor.contiguous().reshape(-1)
                    size = tensor.element_size()
                    first, last = a // size, -(-b // size)
                    values = flat[first:last].to("cpu", copy=True).view(torch.uint8).numpy()
                raw = memoryview(values)[a - first * size : b - first * size]
                out[position - start : position - start + len(raw)] = raw
            position = min(end, high)  # the alignment padding stays zero
        return bytes(out)

    async def chunks(self, chunk_bytes: int) -> AsyncIterator[bytes]:
        """The stream in chunks of ``chunk_bytes``, read ``READ_AHEAD`` at a time in a worker thread."""
        span = chunk_bytes * READ_AHEAD
        for start in range(0, self.size, span):
            block = await asyncio.to_thread(self._read_and_hash, start, min(span, self.size - start))
            view = memoryview(block)
            for a in range(0, len(block), chunk_bytes):
                yield view[a : a + chunk_bytes]

    def _read_and_hash(self, start: int, length: int) -> bytes:
        block = self.read(start, length)
        self._hash.update(block)
        return block

    def hexdigest(self) -> str:
        """The sha256 of the bytes that ``chunks`` yielded."""
        return self._hash.hexdigest()


def encode_state(state: Mapping[str, Any]) -> bytes:
    """The bytes a download of ``state`` sends (for tests and sizes): a ``StateStream`` read whole."""
    stream = StateStream(state)
    return stream.read(0, stream.size)


def _step(record: Mapping[str, Any]) -> int:
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else 0


def state_donors(records: Mapping[str, Mapping[str, Any]], own_id: str) -> list[str]:
    """The peers to ask for the state, best first: every live peer that serves it, except this one and
    client-mode peers (not reachable), those dialed directly before those behind a NAT (a download through a
    relay is slow and costs the relay), then the highest ``step`` first, ties in random order (spreads the load)."""
    donors = [
        peer
        for peer, record in records.items()
        if peer != own_id and record.get("serves_state") and not record.get("client")
    ]
    random.shuffle(donors)
    return sorted(donors, key=lambda peer: (bool(records[peer].get("relayed")), -_step(records[peer])))


class StateServer:
    """Answers joiners' downloads with snapshots of this peer's training state (see the module docstring).

    Args:
        provider: takes the snapshot; see ``StateProvider``.
        run_id: the run whose joiners are served; a HELLO of another run is refused.
        timeouts: ``join`` bounds the wait for a joiner's HELLO, ``part`` the sending of each frame.
        chunk_bytes: payload of one PART frame.
        max_concurrent: joiners served at once; more are refused and try another donor.
        lock: taken to call the provider and to read each chunk of the live tensors (the training lock).
    """

    def __init__(
        self,
        provider: StateProvider,
        run_id: str,
        timeouts: Timeouts,
        *,
        chunk_bytes: int = STATE_CHUNK_BYTES,
        max_concurrent: int = 4,
        lock: Any = None,
    ):
        if not 0 < chunk_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_FRAME_BYTES}], got {chunk_bytes}")
        self.provider, self.run_id, self.timeouts = provider, run_id, timeouts
        self.chunk_bytes, self.max_concurrent = chunk_bytes, max_concurrent
        self.lock = lock if lock is not None else threading.RLock()
        self.served = 0
        self._streams: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._busy = 0
        self.closed = asyncio.Event()

    def snapshot(self) -> StateStream:
        """Take one snapshot of the state's skeleton (in a worker thread, under the lock)."""
        with self.lock:
            return StateStream(self.provider(), self.lock)

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
        started = asyncio.get_running_loop().time()
        try:
            stream = await asyncio.to_thread(self.snapshot)
        except Exception as e:
            logger.warning("could not take a snapshot of the state for %s: %r", joiner, e)
            return await self._reject(writer, counter, f"the donor could not take a snapshot: {e!r}")
        header = {"size": stream.size, "chunk_bytes": self.chunk_bytes}
        async with asyncio.timeout(self.timeouts.part):
            await write_message(writer, FrameKind.STATE, header, counter)
        await self.send_parts(writer, stream, counter)
        async with asyncio.timeout(self.timeouts.part):
            await write_message(writer, FrameKind.STATE, {"sha256": stream.hexdigest()}, counter)
        self.served += 1
        logger.info(
            "served %d bytes of state to %s in %.2fs", stream.size, joiner, asyncio.get_running_loop().time() - started
        )

    async def send_parts(self, writer: asyncio.StreamWriter, stream: StateStream, counter: ByteCounter) -> None:
        """Send ``stream`` as PART frames, each within ``timeouts.part`` (testing overrides this to misbehave)."""
        async for chunk in stream.chunks(self.chunk_bytes):
            async with asyncio.timeout(self.timeouts.part):
                await write_frame(writer, FrameKind.PART, chunk, counter)

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
    """How far one download got: the size the donor announced and the bytes received so far (also
    shown by ``shown``, the download's progress display, if any)."""

    size: int | None = None
    received: int = 0
    shown: ShownProgress | None = None

    def update(self, received: int) -> None:
        self.received = received
        if self.shown is not None:
            self.shown.update(received, total=self.size)


async def fetch_state(
    peer: Joiner, donor: str, *, header_timeout: float, max_bytes: int, progress: Progress | None = None
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
        size, chunk_bytes = header.get("size"), header.get("chunk_bytes")
        if not isinstance(size, int) or not 0 < size <= max_bytes:
            raise OversizedFrame(f"the donor announced a state of {size!r} bytes; at most {max_bytes} are accepted")
        if not isinstance(chunk_bytes, int) or not 0 < chunk_bytes <= MAX_FRAME_BYTES:
            raise ProtocolError(f"the donor announced chunks of {chunk_bytes!r} bytes")
        data, hasher, progress.size = bytearray(), hashlib.sha256(), size
        progress.update(0)
        while len(data) < size:
            kind, part = await read_frame(
                reader, counter, timeout=peer.timeouts.part, max_bytes=min(chunk_bytes, size - len(data))
            )
            if kind != FrameKind.PART or not part:
                raise ProtocolError(f"expected a non-empty PART frame, got {kind.name} of {len(part)} bytes")
            hasher.update(part)
            data += part
            progress.update(len(data))
        _, trailer = await read_message(reader, counter, timeout=peer.timeouts.part, expect=(FrameKind.STATE,))
        digest = trailer.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ProtocolError(f"the donor sent a malformed sha256 digest {digest!r}")
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


def _count_failure(peer: Joiner, donor: str, error: BaseException, progress: Progress, last: bool) -> None:
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
    peer: Joiner,
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
    started = asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout(timeout):
            donors = state_donors(await peer.live_peers(), peer.peer_id)
            if not donors:
                raise NoStateDonors(f"no live peer of run {peer.run_id!r} serves its training state")
            with show_progress("downloading the training state", unit="bytes") as shown:
                for attempt in itertools.count():
                    if attempt:
                        await asyncio.sleep(min(RETRY_PAUSE * 2 ** (attempt - 1), MAX_RETRY_PAUSE))
                        donors = [d for d in state_donors(await peer.live_peers(), peer.peer_id) if d not in dropped]
                    if not donors:
                        break
                    for donor in donors:
                        progress = Progress(shown=shown)
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
                        seconds = asyncio.get_running_loop().time() - started
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
