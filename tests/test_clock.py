"""The swarm clock's arithmetic: which offset a peer adopts from its samples."""

import pytest

from gossiptrain.clock import bounded_offset, swarm_offset


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
