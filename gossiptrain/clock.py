"""The swarm's clock: round slots on the median of the peers' clocks, not on this machine's own.

Rounds are slots of wall-clock time, so a peer whose clock is off by a few hundred milliseconds
registers late, reads the round's participants before the others registered, and fails its
rounds.  Each peer therefore measures its offset to a few live peers as NTP does (a request,
``offset = their_time - (sent + received) / 2``, good to half the round trip; of ``PINGS``
requests it keeps the one with the shortest round trip, as NTP's clock filter does, since a
reply queued behind a transfer or a busy event loop skews the others), shrinks it by half that round
trip toward zero (``bounded_offset``: the true offset lies within it, so peers that share a clock are
never "corrected" apart, however asymmetric their paths) and runs its slots
on ``local clock + offset``, where the offset is the median of the peers' offsets *and its own
zero*: peers that measure each other then agree on the median clock of the swarm (a lone skewed
peer moves to the others' time, the others stay), and one peer with a wild clock cannot move
anyone.  Peers answer with their raw local clocks, so the estimates do not feed on each other.

Failure semantics: a peer that cannot be reached or answers garbage is left out of the median; with
no answer at all the offset stays what it was (zero at start).  An offset larger than
``WARN_OFFSET`` is logged once per estimate, with the advice to run NTP.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import struct
from collections.abc import Callable, Iterable

from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

WARN_OFFSET = 0.1  # seconds: beyond this, say that this machine's clock is off
PINGS = 3  # requests per peer and estimate; the one with the shortest round trip counts
_TIME = struct.Struct("!d")


def clock_protocol(run_id: str) -> str:
    return f"gossiptrain.{run_id}.clock"


def bounded_offset(offset: float, round_trip: float) -> float:
    """The smallest correction consistent with one NTP sample: the true offset lies within
    ``offset +- round_trip / 2``, so 0 if that interval holds it, else its nearer end."""
    return math.copysign(max(0.0, abs(offset) - round_trip / 2), offset)


def swarm_offset(samples: Iterable[float]) -> float:
    """The median of the peers' clock offsets from ours, with our own (zero) counted once."""
    return statistics.median([0.0, *samples])


class SwarmClock:
    """This peer's reading of the swarm's time: ``local() + offset``.

    Args:
        local: this machine's clock in seconds since the epoch (hivemind's DHT time by default;
            tests pass a skewed one).
    """

    def __init__(self, local: Callable[[], float] = get_dht_time):
        self.local, self.offset = local, 0.0
        # peer -> its round trip in seconds, for the peers that answered the latest estimate
        self.round_trips: dict[str, float] = {}

    def now(self) -> float:
        return self.local() + self.offset

    async def serve(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer each request (one byte) with our local clock, until the requester closes the stream
        (it closes first: p2pd resets a stream whose local end closes, dropping a reply in flight)."""
        try:
            for _ in range(PINGS):
                await reader.readexactly(1)
                writer.write(_TIME.pack(self.local()))
                await writer.drain()
            await reader.read(1)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()

    async def sample(self, p2p: P2P, run_id: str, peer: str, timeout: float) -> float | None:
        """The NTP-style offset to ``peer`` from its fastest of ``PINGS`` answers; None if it did not
        answer in time or sent no finite time."""
        writer, pings, loop = None, [], asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                protocol = clock_protocol(run_id)
                _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), protocol)
                for _ in range(PINGS):
                    sent, started = self.local(), loop.time()
                    writer.write(b"?")
                    await writer.drain()
                    (theirs,) = _TIME.unpack(await reader.readexactly(_TIME.size))
                    round_trip = loop.time() - started
                    if math.isfinite(theirs):
                        pings.append((round_trip, theirs - (sent + round_trip / 2)))
        except Exception as e:  # unreachable, gone, or garbage: left out of the median
            logger.debug("no clock sample from %s: %r", peer, e)
        finally:
            if writer is not None:
                writer.close()
        if not pings:
            return None
        round_trip, offset = min(pings)
        self.round_trips[peer] = round_trip
        return bounded_offset(offset, round_trip)

    async def estimate(self, p2p: P2P, run_id: str, peers: Iterable[str], timeout: float = 2.0) -> float:
        """Measure the offset to ``peers`` (concurrently) and adopt their median; returns the offset.

        ``round_trips`` then holds those of the peers that answered (none: the offset stays as it was)."""
        peers = list(peers)
        samples = await asyncio.gather(*(self.sample(p2p, run_id, peer, timeout) for peer in peers))
        self.round_trips = {peer: self.round_trips[peer] for peer, s in zip(peers, samples) if s is not None}
        answered = [s for s in samples if s is not None]
        if not answered:
            return self.offset
        self.offset = swarm_offset(answered)
        if abs(self.offset) > WARN_OFFSET:
            logger.warning(
                "this machine's clock is %.3fs %s the swarm's (median of %d peers): rounds use the swarm's "
                "time; keep clocks in sync with NTP",
                abs(self.offset),
                "behind" if self.offset > 0 else "ahead of",
                len(answered),
            )
        return self.offset
