"""Refused and failed inputs: which errors are the network's, what kind each refusal is, and their counts.

A round treats ``EXCHANGE_ERRORS`` as failures of the network or of a peer (a result, never a crash);
``classify`` names the kind of a failed read of a peer's data; ``Rejections`` counts refusals by kind, exactly, and
logs them at a bounded rate, so that a peer sending garbage in a loop cannot flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from hivemind.p2p import P2PDaemonError

from gossiptrain.codecs import CodecError, NonFiniteValues
from gossiptrain.transport import OversizedFrame, ProtocolError

logger = logging.getLogger(__name__)

EXCHANGE_ERRORS = (
    ProtocolError,
    CodecError,
    ConnectionError,
    asyncio.IncompleteReadError,
    TimeoutError,
    OSError,
    P2PDaemonError,  # the daemon could not dial a member (e.g. it died after registering for the round)
)


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
    if isinstance(error, P2PDaemonError):
        return "unreachable"
    if isinstance(error, (asyncio.IncompleteReadError, ConnectionError, OSError)):
        return "truncated"
    return "garbage"


class Rejections(Counter):
    """Counts of refused inputs by kind, exact; and warning lines about them, rate-limited.

    The first refusal of a kind from a sender is a warning line; after it, at most one line per
    ``log_every`` seconds for that kind and sender, which says how many were not logged since the
    last one (those are debug lines).  An outsider who sends garbage in a loop so costs the log one
    line per ``log_every``, while the counts stay exact.  The log keeps track of at most
    ``MAX_SENDERS`` (kind, sender) pairs, the least recently refused forgotten first.

    Args:
        log_every: seconds between warning lines for one kind and sender.
        clock: monotonic seconds (tests pass a fake one).
    """

    LOG_EVERY = 60.0
    MAX_SENDERS = 1024

    def __init__(self, *counts, log_every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic):
        super().__init__(*counts)
        self.log_every, self.clock = log_every, clock
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # -> (last warning line, refusals since)

    def record(self, kind: str, sender: str, round_id: object, detail: str) -> None:
        self[kind] += 1
        key, now = (kind, sender), self.clock()
        last, since = self._logged.pop(key, (float("-inf"), 0))
        if now - last < self.log_every:
            self._logged[key] = (last, since + 1)  # re-inserted: the most recently refused is forgotten last
            logger.debug("rejected %s from %s in round %s: %s", kind, sender, round_id, detail)
            return
        if len(self._logged) >= self.MAX_SENDERS:
            del self._logged[next(iter(self._logged))]
        self._logged[key] = (now, 0)
        more = f" (and {since} more from it since {now - last:.0f}s ago, not logged)" if since else ""
        logger.warning("rejected %s from %s in round %s: %s%s", kind, sender, round_id, detail, more)
