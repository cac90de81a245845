"""How a peer's rounds fit its slots: a registration lead from the measured DHT latency, and a warning
when ``round_interval`` (``average_every``) is shorter than a round takes on this network.

Pure bookkeeping: ``Peer`` feeds it the time each DHT registration and each round took.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

logger = logging.getLogger(__name__)

MIN_LEAD = 0.5  # seconds: a registration lead never below this (what a loopback DHT store needs, with margin)
LEAD_MARGIN = 2.0  # the lead is this many times the slowest recent registration
WINDOW = 8  # recent rounds remembered


class RoundTiming:
    """Recent registration and round times of one peer."""

    def __init__(self) -> None:
        self.registrations: deque[float] = deque(maxlen=WINDOW)
        self.rounds: deque[float] = deque(maxlen=WINDOW)
        self._warned = False

    def registration_lead(self, round_interval: float) -> float:
        """How long before a slot a peer registers for it: twice the slowest recent DHT registration,
        at least ``MIN_LEAD``, and at most half a slot (a longer lead would skip every other slot)."""
        measured = LEAD_MARGIN * max(self.registrations, default=0.0)
        return min(max(MIN_LEAD, measured), round_interval / 2)

    def record(self, registration_s: float, round_s: float, round_interval: float) -> str | None:
        """Note one round; returns (and logs, once until it fits again) a warning if the rounds no longer
        fit their slots: registration plus exchange take longer than ``round_interval``."""
        self.registrations.append(registration_s)
        self.rounds.append(round_s)
        typical = statistics.median(self.rounds) + self.registration_lead(round_interval)
        if len(self.rounds) < 3 or typical <= round_interval:
            self._warned = False
            return None
        if self._warned:
            return None
        self._warned = True
        message = (
            f"rounds take {typical:.2f}s here (registration lead plus exchange, median of the last "
            f"{len(self.rounds)}) but average_every is {round_interval:g}s: a peer then averages only every "
            f"other slot or later; set average_every to at least {typical * 1.2:.1f}s"
        )
        logger.warning(message)
        return message
