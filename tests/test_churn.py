"""Peers that die in the middle of an exchange: the others finish without them, correctly."""

import pytest
import torch

from gossiptrain.exchange import Timeouts
from tests.peer_workers import run_averaging, weighted_mean


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["die", "die_before"])
def test_survivors_finish_a_round_whose_member_was_killed(fault):
    """Killed mid-exchange (``die``) or as the round starts, after registering (``die_before``)."""
    numel, weights, victim = 4 * 2**20, [1.0, 2.0, 3.0, 4.0], 3
    results, inputs = run_averaging(4, 4, numel, rounds=1, weights=weights, faults={victim: fault})
    survivors = [i for i in range(4) if i != victim]
    expected = weighted_mean(inputs[survivors], [weights[i] for i in survivors])
    limit = Timeouts().join + Timeouts().part + 2.0
    for index, result in results.items():
        round_ = result["history"][0]
        values = result["values"]
        assert round_["status"] == "averaged", round_
        assert round_["seconds"] < limit, round_
        assert torch.isfinite(values).all()
        held = torch.zeros(numel, dtype=torch.bool)
        for start, end in round_["combined"]:
            held[start:end] = True
            assert (values[start:end] - expected[start:end]).abs().max() < 1e-5
        assert held.sum() == 3 * numel // 4, "every survivor holds the means of the survivors' three shards"
        assert torch.equal(values[~held], inputs[index][~held]), "the dead owner's shard keeps the own values"
