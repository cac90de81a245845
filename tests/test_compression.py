"""Compressed averaging over real peer processes: consensus and accuracy with int8 and top-k."""

import math
import statistics
import time

import pytest
import torch

from gossiptrain.testing import LocalSwarm
from tests.peer_workers import consensus_rounds, finish_sparse, train_digits


def spread(flats: list[torch.Tensor]) -> float:
    stacked = torch.stack(flats).double()
    mean = stacked.mean(0)
    return ((stacked - mean).norm(dim=1).max() / mean.norm()).item()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("codec", ["int8", "topk:0.01+int8"])
def test_compressed_peers_reach_consensus_without_local_steps(codec):
    """Peers that only average (groups of 2 out of 4) pull together round over round.

    A group ends each round in exact agreement; what is left between groups shrinks at every
    round that mixes them, down to the codec's resolution (the int8 step of a value, about 0.4% of
    its block's largest value), where error feedback keeps each peer's rounding in its residual.
    For the sparse chain only the dense rounds (every second one here) average the parameters.
    """
    num_peers, rounds = 4, 12
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ready, go, start_round = swarm.context.Queue(), swarm.context.Event(), swarm.context.Value("q", 0)
        for seed in range(num_peers):
            swarm.spawn(
                seed, consensus_rounds, swarm.initial_peers, seed, codec, num_peers, ready, go, start_round, rounds
            )
        for _ in range(num_peers):
            ready.get(timeout=120)
        start_round.value = math.ceil((time.time() + 2.0) / 1.0)
        go.set()
        histories = swarm.results(num_peers, timeout=240)
    per_round = [spread([histories[p][i][2] for p in range(num_peers)]) for i in range(rounds)]
    statuses = [histories[p][i][1] for p in range(num_peers) for i in range(rounds)]
    assert statuses.count("averaged") >= 0.9 * len(statuses), statuses
    resolution = 1e-2 * per_round[0]
    assert per_round[-1] < resolution, per_round
    dense_rounds = [s for i, s in enumerate(per_round) if (histories[0][i][0] % 2 == 0 or codec == "int8")]
    assert all(b <= max(a * 1.01, resolution) for a, b in zip(dense_rounds, dense_rounds[1:])), per_round


@pytest.mark.timeout(300)
def test_peers_with_a_sparse_codec_finish_in_agreement_whatever_the_round_ids():
    """``finish()`` averages the parameters at once, not at the next round id of a dense round
    (here never): finishing peers group together and leave with the same parameters."""
    num_peers = 3
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ready = swarm.context.Queue()
        for seed in range(num_peers):
            swarm.spawn(seed, finish_sparse, swarm.initial_peers, seed, num_peers, ready)
        results = swarm.results(num_peers, timeout=240)
    before, after, statuses = zip(*results.values())
    assert statuses == ("averaged",) * num_peers, statuses
    assert spread(list(after)) < 1e-2 * spread(list(before)), (spread(list(before)), spread(list(after)))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("codec", ["int8", "topk:0.01+int8"])
def test_compressed_training_on_digits_is_as_accurate_as_uncompressed(codec, uncompressed_digits_runs):
    """Mean accuracy over repeated runs: a single run's accuracy varies by about a point."""
    runs = train_digits(codec)
    baseline = statistics.mean(min(run["accuracy"]) for run in uncompressed_digits_runs)
    assert statistics.mean(min(run["accuracy"]) for run in runs) >= baseline - 0.02, (runs, baseline)
    assert all(run["spread"] < 1e-2 for run in runs), runs  # within the codec's resolution, see above
