"""RoundTiming: the registration lead follows the DHT's latency, and a too-short average_every is reported."""

import logging

from gossiptrain.timing import MIN_LEAD, RoundTiming


def test_the_lead_follows_the_slowest_recent_registration_within_half_a_slot():
    timing = RoundTiming()
    assert timing.registration_lead(10.0) == MIN_LEAD
    assert timing.registration_lead(0.4) == 0.2, "never more than half a slot"
    timing.record(0.9, 1.0, 10.0)
    timing.record(0.1, 1.0, 10.0)
    assert timing.registration_lead(10.0) == 1.8, "twice the slowest recent registration"
    assert timing.registration_lead(2.0) == 1.0


def test_a_warning_once_when_rounds_outgrow_average_every_and_again_after_they_fit(caplog):
    timing = RoundTiming()
    with caplog.at_level(logging.WARNING, logger="gossiptrain.timing"):
        warnings = [timing.record(0.1, 2.5, 2.0) for _ in range(5)]
    assert warnings[:2] == [None, None], "no verdict from fewer than 3 rounds"
    assert "average_every is 2s" in warnings[2] and "at least 3.6s" in warnings[2]
    assert warnings[3:] == [None, None] and len(caplog.records) == 1, "one line, not one per round"
    for _ in range(8):
        assert timing.record(0.1, 0.5, 2.0) is None
    assert timing.record(0.1, 3.0, 2.0) is None, "the median of recent rounds still fits"
