"""The swarm clock's arithmetic: which offset a peer adopts from its samples."""

import pytest

from gossiptrain.clock import SwarmClock, bounded_offset, swarm_offset


@pytest.mark.parametrize(
    ("offset", "round_trip", "adopted"),
    [(0.12, 0.3, 0.0), (-0.14, 0.3, 0.0), (0.5, 0.3, 0.35), (-0.5, 0.1, -0.45), (0.0, 0.0, 0.0)],
)
def test_a_sample_corrects_only_what_its_round_trip_cannot_explain(offset, round_trip, adopted):
    assert bounded_offset(offset, round_trip) == pytest.approx(adopted)


def test_the_swarm_offset_is_the_median_with_the_own_zero_counted():
    assert swarm_offset([]) == 0.0
    assert swarm_offset([-0.5, -0.5, -0.5]) == -0.5, "a lone skewed peer moves to the others' time"
    assert swarm_offset([0.0, 0.0, 0.5]) == 0.0, "one wild clock moves no one"
    assert swarm_offset([0.4]) == pytest.approx(0.2), "two peers meet half-way"


async def test_round_trips_are_kept_only_for_the_peers_that_answered_the_latest_estimate():
    clock = SwarmClock(lambda: 0.0)

    async def sample(p2p, run_id, peer, timeout):  # what SwarmClock.sample does, without a network
        if peer == "silent":
            return None
        clock.round_trips[peer] = 0.01
        return 0.0

    clock.sample = sample
    for estimate in range(100):  # the live peers change: each estimate asks others
        await clock.estimate(None, "run", [f"peer{estimate}-{i}" for i in range(5)])
    await clock.estimate(None, "run", ["peer99-0", "silent"])
    assert set(clock.round_trips) == {"peer99-0"}
    await clock.estimate(None, "run", ["silent"])
    assert not clock.round_trips, "no peer answered: the clock is estimated again soon (Peer._refresh_clock)"
