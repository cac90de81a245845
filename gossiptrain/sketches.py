"""How far apart the cell's values lie: a few of each peer's values, published with its round record.

An owner judges a contribution by its distance from its own values, relative to the other contributions' (the
CenteredClip radius, ``allreduce.Defences``).  In a group of three or four that cannot tell an honest peer far away
(other data, a different point of training, a vector that is not parameters) from a hostile one.  The cell can: every
peer of a round samples the same ``SKETCH_VALUES`` positions of its vector (drawn from the run and the round) and
publishes their values with its round registration, and an owner's radius is at least ``clip`` times the distance
from its own values to the cell's at a quantile (``Defences.cell_spread``), scaled to its shard (``typical_distance``).

Failure semantics: a record without a sketch, or with one that does not decode, is left out, and so is one whose
values are over ``Defences.catch`` times the cell's median size (``of_honest_size``).  Any other hostile record moves
the quantile by one place, so while fewer than a tenth of the cell's records are hostile (by default's 0.9: one in a
cell of up to eleven), the floor stays within the distances between honest peers: the bound on a hostile
contribution becomes the honest cell's spread rather than the group's.  An honest peer farther than ``clip`` times
that floor (one alone for rounds, far from all the others) is still clipped, and its round reports ``partial``.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

SKETCH_VALUES = 64  # positions sampled per round (float16: 128 bytes in each round record)
FLOAT16_MAX = 65504.0


def positions(run_id: str, round_id: int, numel: int) -> torch.Tensor:
    """The positions every peer of ``round_id`` samples: the same for all, new every round."""
    seed = int.from_bytes(hashlib.sha256(f"{run_id}|{round_id}|sketch".encode()).digest()[:8], "little")
    return torch.randint(numel, (min(SKETCH_VALUES, numel),), generator=torch.Generator().manual_seed(seed))


def sketch(values: torch.Tensor, run_id: str, round_id: int) -> bytes:
    """Our values at the round's ``positions``, as float16 (clamped to its range; NaN as 0)."""
    sampled = values[positions(run_id, round_id, values.numel())].float()
    sampled = torch.nan_to_num(sampled, nan=0.0).clamp(-FLOAT16_MAX, FLOAT16_MAX)
    return sampled.to(torch.float16).numpy().tobytes()


def _decode(data: Any, count: int) -> np.ndarray | None:
    if not isinstance(data, bytes) or len(data) != 2 * count:
        return None
    return np.frombuffer(data, dtype=np.float16).astype(np.float64)


def typical_distance(own: bytes, sketches: Iterable[Any], quantile: float) -> float:
    """The root-mean-square distance per value from our sketch ``own`` to the others' (``sketches``, one per other
    peer of our cell), at ``quantile`` (in [0, 1)) and never the farthest (one liar among three sets nothing);
    0 where fewer than two decode.  Times ``sqrt(n)``, it is the distance expected between our values and a peer's
    on ``n`` values."""
    mine = _decode(own, len(own) // 2)
    if mine is None or not len(mine):
        return 0.0
    distances = sorted(
        math.sqrt(float(np.mean((theirs - mine) ** 2)))
        for theirs in (_decode(data, len(mine)) for data in sketches)
        if theirs is not None
    )
    return _below_the_largest(distances, quantile)


def typical_size(sketches: Iterable[Any], quantile: float) -> float:
    """The root-mean-square value of the cell's sketches (ours among them) at ``quantile`` and never the largest:
    how large this round's honest values are, per value, whatever they are (parameters, pseudo-gradients, any
    vector).  A mean of honest values is no larger than the largest of them.  0 where fewer than two decode."""
    return _below_the_largest(sorted(size for data in sketches if (size := _size(data)) is not None), quantile)


def _size(data: Any) -> float | None:
    """The root-mean-square of a sketch's values; None where it does not decode."""
    values = _decode(data, len(data) // 2) if isinstance(data, bytes) else None
    return math.sqrt(float(np.mean(values**2))) if values is not None and len(values) else None


def of_honest_size(sketches: list[Any], factor: float | None) -> list[Any]:
    """``sketches`` without those whose values are over ``factor`` times the cell's median size (root-mean-square,
    of all that decode): values that large are no honest peer's (``Defences.catch``), and counted, a few of them set
    the upper quantiles of ``typical_distance`` and ``typical_size`` (a quarter of a round's peers, hostile, set the
    0.9 quantile, and with it the floor of every honest member's mean check).  All of them where ``factor`` is None
    or fewer than three decode."""
    sizes = [_size(data) for data in sketches]
    known = [size for size in sizes if size is not None]
    if factor is None or len(known) < 3:
        return list(sketches)
    limit = factor * statistics.median_low(known)
    return [data for data, size in zip(sketches, sizes) if size is None or size <= limit]


def _below_the_largest(ordered: list[float], quantile: float) -> float:
    """``ordered``'s value at ``quantile`` (in [0, 1)) of all but the largest; 0 for fewer than two values."""
    return ordered[math.floor(quantile * (len(ordered) - 1))] if len(ordered) >= 2 else 0.0
