"""The door of a private run: stream handlers that answer only peers with a certificate of the run's authority.

In a private run (``Peer``'s ``credential``) every inbound stream (averaging, state download, clock) goes
through ``CredentialGate.guard``.  The remote peer id of a stream is the one libp2p authenticated; it is
admitted if a certificate for it, issued by the run's authority, was seen in its DHT records
(``auth.Admission``).  A peer not seen yet (a joiner) is looked up in the members' records of its shard: one read
at a time, at most one per ``LOOKUP_INTERVAL`` for all, shared by the streams that wait for it (within ``join``;
a stream whose peer the read did not find is refused, and may try again).

Failure semantics: a refused stream is answered with a REJECT frame (unless the protocol has none), closed,
and counted in ``rejections`` as ``uncredentialed_<kind>``; a lookup that fails refuses the streams that
waited for it, and their peers may try again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from gossiptrain.auth import Admission
from gossiptrain.rejections import Rejections
from gossiptrain.rounds import Timeouts
from gossiptrain.transport import ByteCounter, FrameKind, close_after_peer, write_message

logger = logging.getLogger(__name__)

LOOKUP_INTERVAL = 1.0  # at most one DHT read per second for the credentials of unknown stream openers


class CredentialGate:
    """Guards stream handlers of a private run (see the module docstring).

    Args:
        admission: the run's admission rule; it caches the certificates the lookups find.
        run_id: the run, named in refusals.
        rejections: where refusals are counted.
        timeouts: ``join`` bounds a stream's wait for a lookup, ``part`` the close of a refused stream.
        read_members: reads the members' records of a peer's shard (``membership.Membership.shard_of``).
    """

    def __init__(
        self,
        admission: Admission,
        run_id: str,
        rejections: Rejections,
        timeouts: Timeouts,
        read_members: Callable[[str], Awaitable[Any]],
    ):
        self.admission, self.run_id, self.rejections, self.timeouts = admission, run_id, rejections, timeouts
        self._read_members = read_members
        self._lookup: asyncio.Task | None = None
        self._lookup_at = -math.inf

    def guard(self, kind: str, handler: Callable, *, reject: bool = True) -> Callable:
        """``handler`` for admitted peers; others are refused (with a REJECT frame if ``reject``)."""

        async def handler_if_admitted(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sender = info.peer_id.to_base58()
            if await self.admitted(sender):
                return await handler(info, reader, writer)
            detail = f"{kind} stream refused: no valid certificate of run {self.run_id!r} in its DHT records"
            self.admission.count_refusal(self.rejections, f"uncredentialed_{kind}", sender, "?", detail)
            if not reject:
                return writer.close()
            reason = f"run {self.run_id!r} is private: join with a certificate of its authority (--credential)"
            try:
                await write_message(writer, FrameKind.REJECT, {"reason": reason}, ByteCounter())
            except (ConnectionError, OSError):
                pass
            finally:
                await close_after_peer(reader, writer, self.timeouts.part)

        return handler_if_admitted

    async def admitted(self, peer: str) -> bool:
        """Whether ``peer`` has shown a valid certificate in its DHT records (looked up if not seen yet)."""
        if self.admission.admitted(peer):
            return True
        loop = asyncio.get_running_loop()
        if self._lookup is None or self._lookup.done():
            delay = max(0.0, self._lookup_at + LOOKUP_INTERVAL - loop.time())
            self._lookup_at = loop.time() + delay
            self._lookup = asyncio.create_task(self._read_credentials(peer, delay))
        try:
            async with asyncio.timeout(self.timeouts.join):
                await asyncio.shield(self._lookup)
        except Exception as e:  # the peer stays unknown and is refused; it may try again
            logger.debug("could not read the members' credentials: %r", e)
        return self.admission.admitted(peer)

    async def _read_credentials(self, peer: str, delay: float) -> None:
        """Read the records of ``peer``'s shard after ``delay`` seconds: ``Admission`` caches the certificates."""
        await asyncio.sleep(delay)
        try:
            await self._read_members(peer)
        except Exception as e:  # the peers waiting for it are refused; they may try again
            logger.debug("could not read the members' credentials: %r", e)

    async def close(self) -> None:
        """Stop a lookup in progress."""
        if self._lookup is not None:
            self._lookup.cancel()
            await asyncio.gather(self._lookup, return_exceptions=True)
            self._lookup = None
