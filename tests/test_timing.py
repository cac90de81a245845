"""RoundTiming: the registration lead follows the DHT's latency, and rounds longer than a slot span several."""

import logging

from gossiptrain.timing import MAX_STRIDE, MIN_LEAD, RoundTiming


def test_the_lead_follows_the_slowest_recent_registration_within_half_a_slot():
    timing = RoundTiming()
    assert timing.registration_lead(10.0) == MIN_LEAD
    assert timing.registration_lead(0.4) == 0.2, "never more than half a slot"
    timing.record(0.9, 1.0, 10.0)
    timing.record(0.1, 1.0, 10.0)
    assert timing.registration_lead(10.0) == 1.8, "twice the slowest recent registration"
    assert timing.registration_lead(2.0) == 1.0


def test_rounds_that_outgrow_a_slot_span_a_power_of_two_of_slots_reported_once_per_change(caplog):
    timing = RoundTiming()
    with caplog.at_level(logging.INFO, logger="gossiptrain.timing"):
        lines = [timing.record(0.1, 2.5, 2.0) for _ in range(5)]
    assert lines[:2] == [None, None] and timing.stride(2.0) == 2, "no verdict from fewer than 3 rounds"
    assert "multiples of 2" in lines[2] and "at least 3.6s" in lines[2]
    assert lines[3:] == [None, None] and len(caplog.records) == 1, "one line, not one per round"
    assert caplog.records[0].levelno == logging.INFO, "the swarm adapts: nothing for the user to fix"
    for _ in range(8):
        timing.record(0.1, 7.0, 2.0)
    assert timing.stride(2.0) == 4, "7.5 s with the lead: four slots of 2 s hold it"
    for _ in range(8):
        assert timing.record(0.1, 0.5, 2.0) is None or timing.stride(2.0) == 1
    assert timing.stride(2.0) == 1


def test_rounds_longer_than_max_stride_slots_are_a_warning(caplog):
    timing = RoundTiming()
    with caplog.at_level(logging.INFO, logger="gossiptrain.timing"):
        for _ in range(3):
            timing.record(0.1, 40.0, 2.0)
    assert timing.stride(2.0) == MAX_STRIDE
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_a_peer_takes_the_stride_most_of_the_swarm_publishes_not_the_slowest_one():
    joiner = RoundTiming()
    assert joiner.stride(1.0) == 1
    joiner.observe([2, 2, 2, 16])
    assert joiner.stride(1.0) == 2 and joiner.own_stride(1.0) == 1, "it publishes its own, takes the swarm's"
    joiner.observe([])
    assert joiner.stride(1.0) == 2, "a round read alone keeps the last verdict"
    joiner.observe([1, 1, 16, None, 3, "x"])
    assert joiner.stride(1.0) == 1, "one slow peer and malformed strides do not move the rest"
    for _ in range(3):
        joiner.record(0.1, 1.6, 1.0)
    joiner.observe([1, 1])
    assert joiner.stride(1.0) == 4, "its own, when larger"
