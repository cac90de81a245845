"""How a peer's rounds fit its slots: a registration lead from the measured DHT latency, and a stride of slots
when ``round_interval`` (``average_every``) is shorter than a round takes on this network.

A peer whose rounds outgrow one slot takes part only in the slots that are multiples of its stride, a power of
two: peers whose strides differ (a slower link, a longer RTT) still meet, in the multiples of the larger, instead
of landing in slots of different parity and averaging alone.  A peer that has not measured its own rounds yet (a
joiner) or whose rounds are shorter takes the stride most of the swarm publishes, if larger: a joiner among peers of
stride 2 whose cycle (a round plus the training step that starts the next) spans two slots would otherwise land in odd
slots, round after round, alone.  Pure bookkeeping: ``Peer`` feeds it the time each DHT registration and each round
took, and the strides the other peers' records publish.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

logger = logging.getLogger(__name__)

MIN_LEAD = 0.5  # seconds: a registration lead never below this (what a loopback DHT store needs, with margin)
LEAD_MARGIN = 2.0  # the lead is this many times the slowest recent registration
WINDOW = 8  # recent rounds remembered
MAX_STRIDE = 16  # slots a round may span; rounds longer than that are reported as a warning


class RoundTiming:
    """Recent registration and round times of one peer."""

    def __init__(self) -> None:
        self.registrations: deque[float] = deque(maxlen=WINDOW)
        self.rounds: deque[float] = deque(maxlen=WINDOW)
        self._reported: int | None = None  # the stride last reported (None: rounds fit their slot)
        self.swarm_stride = 1  # the median of the strides other peers published, when last seen

    def registration_lead(self, round_interval: float) -> float:
        """How long before a slot a peer registers for it: twice the slowest recent DHT registration,
        at least ``MIN_LEAD``, and at most half a slot (a longer lead would skip every other slot)."""
        measured = LEAD_MARGIN * max(self.registrations, default=0.0)
        return min(max(MIN_LEAD, measured), round_interval / 2)

    def typical(self, round_interval: float) -> float | None:
        """A typical round here, from registration to result: the median of the recent rounds plus the
        registration lead; None until 3 rounds are measured."""
        if len(self.rounds) < 3:
            return None
        return statistics.median(self.rounds) + self.registration_lead(round_interval)

    def own_stride(self, round_interval: float) -> int:
        """How many slots one round spans here: the smallest power of two whose slots hold a ``typical`` round,
        at most ``MAX_STRIDE``; 1 until 3 rounds are measured.  What a peer publishes."""
        typical = self.typical(round_interval)
        stride = 1
        while typical is not None and stride * round_interval < typical and stride < MAX_STRIDE:
            stride *= 2
        return stride

    def stride(self, round_interval: float) -> int:
        """The stride a peer takes: its own, or the swarm's (``observe``) where that is larger.  A median, not the
        largest: one slow peer keeps its own stride and does not slow the rest."""
        return max(self.own_stride(round_interval), self.swarm_stride)

    def observe(self, strides: list[int]) -> None:
        """Note the strides the other peers of a record read published; nothing seen keeps the last verdict."""
        valid = [s for s in strides if isinstance(s, int) and 1 <= s <= MAX_STRIDE and s & (s - 1) == 0]
        if valid:
            self.swarm_stride = int(statistics.median_low(valid))

    def record(self, registration_s: float, round_s: float, round_interval: float) -> str | None:
        """Note one round; returns (and logs, once per change) what this peer does when its rounds no longer fit
        one slot: the stride it takes (info), or a warning when even ``MAX_STRIDE`` slots do not hold a round."""
        self.registrations.append(registration_s)
        self.rounds.append(round_s)
        stride, typical = self.own_stride(round_interval), self.typical(round_interval)
        if typical is None:
            return None
        if stride == 1:
            self._reported = None
            return None
        if stride == self._reported:
            return None
        self._reported = stride
        advice = f"set average_every to at least {typical * 1.2:.1f}s for a round in every slot"
        if typical > stride * round_interval:
            message = (
                f"rounds take {typical:.2f}s here (registration lead plus exchange, median of the last "
                f"{len(self.rounds)}), longer than {MAX_STRIDE} slots of average_every {round_interval:g}s: {advice}"
            )
            logger.warning(message)
        else:
            message = (
                f"rounds take {typical:.2f}s here (registration lead plus exchange, median of the last "
                f"{len(self.rounds)}) but average_every is {round_interval:g}s: averaging in the slots that are "
                f"multiples of {stride}, where peers whose rounds span fewer slots meet it; {advice}"
            )
            logger.info(message)
        return message
