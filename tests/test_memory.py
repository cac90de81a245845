"""Peak host memory of a round, measured: a 25M-parameter peer averaging with a partner, and serving its state.

Each case runs a measured peer and its partner as processes (``tests/memory_workers.py``): the measured
peer's extra peak RSS over its baseline (taken after its first step, before its first round) while it
averages two rounds with its partner, or while a joiner downloads its state and then averages with it.
DESIGN's target is 1x the model's fp32 size; the bounds below are what the round machinery reaches
today (``benchmarks/README.md``, "Memory": where the rest goes), with a margin for the allocator.
"""

from __future__ import annotations

import pytest

from gossiptrain.rounds import AVERAGED
from tests.memory_workers import measure

NUMEL = 25_000_000
# Extra peak / fp32 model size, measured here with ``benchmarks/memory.py`` (2 cores, shared, loaded), a
# training step's temporaries included (0.2-1x), in two runs since the owner's mean is formed a part at a
# time into the round's result: none 3.23-3.25x, int8 3.64-3.66x, topk:0.01+int8 5.26-5.42x, none while
# serving state 3.25x (before: 4.5-5.3x, 4.0-4.4x, 5.9x, 5.1x; at commit fea7eb8: 11.5x, 10.9x, 11.7x,
# 11.6x).  Bounds: the worst seen plus about 1x for the spread between runs (up to 0.8x seen).  DESIGN's
# target, 1x, is not reached yet.
BOUNDS = {"none": 4.3, "int8": 4.6, "topk:0.01+int8": 6.4, "serve": 4.3}


@pytest.mark.timeout(420)
@pytest.mark.parametrize("case", list(BOUNDS))
def test_a_rounds_extra_peak_host_memory_is_bounded(case):
    serve = case == "serve"
    rounds = 1 if serve else 2  # serving: the download, then a round with the joiner
    result = measure(NUMEL, "none" if serve else case, serve=serve, rounds=rounds, average_every=6.0, timeout=240.0)
    assert sum(status in AVERAGED for status in result["statuses"]) >= rounds, result["statuses"]
    if serve:
        assert result["served"] == 1, "the joiner downloaded the measured peer's state"
    extra = result["extra_bytes"] / result["model_bytes"]
    assert extra <= BOUNDS[case], (
        f"{case}: extra peak {extra:.2f}x the fp32 model ({result['extra_bytes'] / 2**20:.0f} MiB over a "
        f"baseline of {result['baseline_bytes'] / 2**20:.0f} MiB), the bound is {BOUNDS[case]}x"
    )
