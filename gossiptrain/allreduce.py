"""One group's butterfly all-reduce, as plain data: shard plan, weighting, message checks.

Each reducing member owns one contiguous shard of the flat parameter vector.  Every member
sends its slice of shard ``j`` to the owner of ``j``; the owner combines the slices that arrived
*whole* into a weighted mean (weights are the members' sample counts) and sends the mean back.
A contribution that fails half-way is dropped, and the mean is renormalised over the rest; a
shard whose owner failed keeps the member's own values.  Nothing here touches the network.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gossiptrain.codecs import BLOCK, Codec
from gossiptrain.groups import group_digest


def shard_bounds(
    numel: int, num_shards: int, align: int = 1, sizes: Sequence[float] | None = None
) -> list[tuple[int, int]]:
    """Split ``range(numel)`` into ``num_shards`` contiguous slices that start at multiples of
    ``align``: nearly equal, or in proportion to ``sizes`` (one positive number per shard)."""
    shares = [1.0] * num_shards if sizes is None else [float(x) for x in sizes]
    if len(shares) != num_shards or not all(math.isfinite(x) and x > 0 for x in shares):
        raise ValueError(f"sizes must be {num_shards} positive numbers, got {sizes!r}")
    cumulative = [sum(shares[:i]) / sum(shares) for i in range(num_shards)]
    edges = [0] + [round(numel * c) // align * align for c in cumulative[1:]] + [numel]
    return list(zip(edges[:-1], edges[1:]))


PARAMETERS = "params"  # the mode of rounds whose values are the model's parameters themselves
VECTOR = "vector"  # ``Peer.average``'s default: values of any kind, judged against each other only


def averages_parameters(mode: str) -> bool:
    """Whether a round of ``mode`` averages the model's parameters themselves.  Their values then have about one
    size on every peer and lie near each other, so owners judge a contribution's size against their own values
    (``ShardReduction``'s ``same_scale``), members catch an owner whose mean lies far beyond any honest one, and an
    owner keeps what its quantized mean rounds off.  Other modes (deltas, pseudo-gradients, any vector given to
    ``Peer.average``) are judged against each other only."""
    return mode == PARAMETERS


def straggler_quorum(expected: int) -> int:
    """How many of ``expected`` transfers must be done before the rest get a straggler deadline: half,
    rounded up (at least one)."""
    return max(1, (expected + 1) // 2)


SLOW_REDUCER = 0.25  # a member below this share of its group's fastest bandwidth reduces no shard


@dataclass(frozen=True)
class GroupPlan:
    """Who is in the group, who reduces which shard, and the digest that names the group.

    ``bandwidths`` (Mbit/s, for the members that declared one) sizes the shards as hivemind's load
    balancing does: a reducer's shard is in proportion to its bandwidth (members that declared none
    count as the median of those that did), and a member below ``SLOW_REDUCER`` of the fastest
    reduces nothing, so that a slow link carries only its own slices.  Every member computes the
    plan from the same round records, so all agree on it.
    """

    run_id: str
    round_id: int
    members: tuple[str, ...]
    reducers: tuple[str, ...]
    numel: int
    shard_sizes: tuple[float, ...] | None = None

    @classmethod
    def build(
        cls,
        run_id: str,
        round_id: int,
        members: list[str],
        numel: int,
        clients: frozenset[str] = frozenset(),
        bandwidths: dict[str, float] | None = None,
    ) -> GroupPlan:
        members = sorted(members)
        reducers = [peer for peer in members if peer not in clients]
        known = {peer: bw for peer, bw in (bandwidths or {}).items() if peer in reducers and bw > 0}
        if not known or len(set(known.values())) == 1:
            return cls(run_id, round_id, tuple(members), tuple(reducers), numel)
        typical = statistics.median(known.values())
        speed = {peer: known.get(peer, typical) for peer in reducers}
        reducers = [peer for peer in reducers if speed[peer] >= SLOW_REDUCER * max(speed.values())]
        sizes = tuple(speed[peer] for peer in reducers)
        return cls(run_id, round_id, tuple(members), tuple(reducers), numel, sizes)

    @property
    def digest(self) -> str:
        return group_digest(self.run_id, self.round_id, self.members)

    def shards(self) -> dict[str, tuple[int, int]]:
        """Shards start at a codec block, so a value falls in the same block whatever the group:
        a quantizer then gives back what agreeing peers hold (``codecs._Blockwise``)."""
        return dict(zip(self.reducers, shard_bounds(self.numel, len(self.reducers), BLOCK, self.shard_sizes)))


def check_hello(
    hello: dict[str, Any], plan: GroupPlan, sender: str, owner: str, codec: str, mode: str = PARAMETERS
) -> tuple[str, str] | None:
    """``(kind, detail)`` saying why ``owner`` must refuse a HELLO from ``sender``, or None to accept it."""
    if hello.get("run_id") != plan.run_id:
        return "wrong_run", f"message for run {hello.get('run_id')!r}, this is run {plan.run_id!r}"
    if hello.get("round_id") != plan.round_id:
        return "stale_round", f"round {hello.get('round_id')!r}, expected {plan.round_id}"
    if hello.get("sender") != sender:
        return "not_in_group", f"sender claims to be {hello.get('sender')!r} but the stream comes from {sender}"
    if sender not in plan.members:
        return "not_in_group", f"sender {sender} is not in this round's group"
    if hello.get("digest") != plan.digest:
        return "view_mismatch", "sender computed a different group (membership views differ)"
    if hello.get("codec") != codec or hello.get("mode") != mode:
        sent = f"{hello.get('mode')!r} as {hello.get('codec')!r}"
        return "wrong_dtype", f"values sent are {sent}, this round uses {mode!r} as {codec!r}"
    start, end = plan.shards().get(owner, (0, 0))
    if hello.get("start") != start or hello.get("end") != end:
        return "wrong_shape", f"shard [{hello.get('start')}, {hello.get('end')}) does not match [{start}, {end})"
    weight = hello.get("weight")
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return "bad_weight", f"invalid weight {weight!r}"
    return None


RULES = ("clip", "trimmed")  # Defences.rule: CenteredClip or a coordinate-wise trimmed mean


@dataclass(frozen=True)
class Defences:
    """How owners and members bound what a hostile group member can do in one round (on by default).

    Args:
        clip: CenteredClip (Karimireddy et al., 2021; BTARD, Gorbunov et al., 2022) around the owner's
            own values: a contribution farther from them than ``clip`` times the median distance of the
            contributions counts only up to that radius.  Unclipped, the result is the weighted mean.  The
            distance is at least how far apart the cell's values lie (``sketches``: a few values of every peer
            in its round record), so that honest peers far apart (other data, a vector that is not parameters)
            are not clipped in a small group whose other members happen to be close.
            Where most contributions equal the owner's (a group that agreed last round), the median
            is the spread the owner measured in an earlier round
            (``ShardReduction.spread``), not 0.
        drop: with ``clip``, a contribution farther than ``drop`` times that median distance is left
            out of the mean altogether (counted as ``dropped``): values far beyond any honest spread
            then move nothing, where clipped they would still pull the mean by the radius every round,
            always the same way, and the honest peers' spread, and with it the radius, would grow
            round after round (``benchmarks/adversarial.py``, ``huge``).  Where the values are
            parameters (``ShardReduction(same_scale=True)``), farther than ``drop`` times the size of
            the owner's own values is dropped too: then also in a pair, or where hostile contributions
            are the median.  Where they are not, ``drop``'s and ``catch``'s thresholds grow with the typical
            rounds a contribution's weight spans (a pseudo-gradient of missed rounds: ``ShardReduction._spans``).
        catch: where the values are parameters, a contribution whose norm exceeds ``catch`` times
            the owner's own values' norm (the low median of all where the owner's are 0) is dropped and
            its sender caught (``RoundExchange.caught``; a peer remembers the ``peer.MAX_CAUGHT`` it
            met most recently, so one that keeps sending stays caught), also in a pair or where hostile
            contributions are the majority.  Parameters
            of one model at one stage of training have about one size, and a weighted mean of them,
            clipped or not, is never larger than the largest: an honest contribution 4x the others'
            size does not arise (peers from independent random starts: within 1.1x,
            ``tests/test_allreduce.py``), while values plus 1 everywhere (``heavy``) are 17x the size
            of the digits model's parameters, within ``drop``'s 20x.  Where the values are not parameters
            (pseudo-gradients, any vector), the size is the cell's (``sketches.typical_size``): a contribution or
            a mean over ``catch`` times it is left out or refused, on every shard, and its sender not caught.
        catch_mean: where the values are parameters, a member refuses an owner's mean whose norm exceeds
            ``catch_mean`` times its own values' there and catches the owner, whatever its previous round did.
            Tighter than ``catch``: a weighted mean of honest parameters is no larger than the largest of them, and
            where peers' data differ their parameters still have about one size (``benchmarks/adversarial.py
            --non-iid`` reports the largest honest mean over a member's values, ``honest_mean_size``), while an
            owner that shifts its mean by less than ``catch`` times the values passed every other check where
            honest peers lie far apart (their spread, and with it ``mean_check``'s floor, is large).
        weight_cap: a claimed weight counts at most ``weight_cap`` times the group's (low) median weight.
        mean_check: a member refuses an owner's mean whose distance from its own values, relative to
            their size, exceeds ``mean_check`` times the round's median over its shards (plus
            ``MEAN_CHECK_FLOOR`` and the codec's rounding, ``rounding_distance``): it keeps its own
            values there and counts the owner as hostile.  Only
            shards where the member's previous round left a group mean are checked: elsewhere its values
            may lie apart from the group's (a shard that failed or was refused, a round alone), and the
            honest mean that brings them back must pass.  Another member far from the group on one shard
            moves the honest mean there too, so too small a factor refuses honest means (``benchmarks/wan.py``
            over lossy links; ``--mean-check 0`` compares without).
        rule: how an owner combines the contributions: ``"clip"`` (CenteredClip, above) or ``"trimmed"``, a
            coordinate-wise trimmed mean (Yin et al., 2018): per value, the ``trim`` largest and ``trim``
            smallest of the contributions (the owner's own included) are dropped and the rest averaged
            with their (capped) weights; ``clip`` is then not used.  With fewer than ``2 * trim + 1``
            contributions it trims as many as leave one (a group of two: the plain mean).
        trim: values dropped at each end, per coordinate, by the ``"trimmed"`` rule.
        cell_spread: the floor of ``clip``'s and ``drop``'s distance: this quantile of the distances from the
            owner's values to its cell's (``sketches.typical_distance``), never the farthest; None: no floor
            (the contributions' median distance alone, as in a group that is the whole swarm).

    None for any of clip, weight_cap and mean_check turns that defence off; ``Defences.off()``
    turns all off (a plain mean).

    What they guarantee: while fewer than half of the *other* contributions to a shard are hostile, a
    hostile contribution moves that shard's mean by at most ``weight_cap * clip`` times the median
    distance (for values that mostly agree with the owner's, the spread of its last round where
    they did not and nothing was dropped), over the group's total weight, and not at all from beyond
    ``drop`` times it; with
    ``mean_check``, while fewer than half of a member's shards have hostile owners, a shifted mean
    larger than ``mean_check`` times the typical one is refused where the member's values agreed with
    its whole group last round, and again in the rounds after (a hostile owner of a shard the member
    did not hold such a mean of is bounded only by the next rounds' honest means).  The trimmed rule
    instead bounds each value of the mean by the honest contributions' range there while at most
    ``trim`` contributions to a shard are hostile.  With ``catch``, in parameter rounds, a contribution
    over ``catch`` times the values' size (a mean: over ``catch_mean`` times) is refused, and its sender caught,
    whatever the group's size or make-up, hostile majorities included.  Not
    covered: groups of two below that size, where the one other contribution sets its own radius
    (they occur in swarms of two, with a target group size of two, and where peers' views differ:
    ``groups.MIN_GROUP``), a majority of hostile members, a push below the bounds repeated round after
    round (it adds up), and a shifted mean on a shard the member's last round did not leave whole that stays
    within ``catch_mean`` times the member's values' size (parameters) or ``catch`` times the cell's (other values).
    """

    clip: float | None = 2.0
    drop: float | None = 20.0
    catch: float | None = 4.0
    catch_mean: float | None = 2.0
    weight_cap: float | None = 10.0
    mean_check: float | None = 10.0
    rule: str = "clip"
    trim: int = 1
    cell_spread: float | None = 0.9

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {RULES}")
        if self.trim < 0:
            raise ValueError(f"trim must be 0 or more values, got {self.trim!r}")
        if self.cell_spread is not None and not 0 <= self.cell_spread < 1:
            raise ValueError(f"cell_spread must be a quantile in [0, 1) or None, got {self.cell_spread!r}")

    @classmethod
    def off(cls) -> Defences:
        return cls(
            clip=None, drop=None, catch=None, catch_mean=None, weight_cap=None, mean_check=None, cell_spread=None
        )


DEFAULT_DEFENCES = Defences()
PART = 2**18  # values per part where a shard is scanned a part at a time (a multiple of the codec's block)
MEAN_CHECK_FLOOR = 1e-3  # relative distance a mean may always have from a member's values (quantization, drift)


def l2_norm(values: torch.Tensor, reference: torch.Tensor | None = None) -> float:
    """``|values|``, or ``|values - reference|`` (L2), a part at a time: float32 kernels per part, the
    parts' squares summed in float64.  Within ~1e-5 relative of float64 throughout, far below any
    threshold it is compared with (the defences' factors of 2-20, ``MEAN_CHECK_FLOOR``), in less than
    half the time on a round's critical path (``benchmarks/README.md``); no whole difference is held."""
    squares = 0.0
    for a in range(0, values.numel(), PART):
        part = values[a : a + PART].float()
        norm = torch.linalg.vector_norm(part) if reference is None else torch.dist(part, reference[a : a + PART])
        squares += norm.item() ** 2
    return math.sqrt(squares)


def relative_distance(mean: torch.Tensor, own: torch.Tensor, scale: float | None = None) -> float:
    """``|mean - own| / |own|`` (L2; 0/0 counts as 0); ``scale`` is ``|own|`` where already known."""
    scale = l2_norm(own) if scale is None else scale
    distance = l2_norm(mean, own)
    return distance / scale if scale > 0 else (0.0 if distance == 0 else math.inf)


def rounding_distance(codec: Codec, own: torch.Tensor) -> float:
    """How far, relative to ``|own|``, an honest mean may lie from a member's values ``own`` through
    the codec's rounding alone: twice its dense stage's bound (``Codec.bound``), as the member's
    contribution and the mean are each rounded once.  0 for ``none``.  Without it, members whose
    values agreed exactly elsewhere (median distance 0, as in ``finish()``) refused an honest int8
    mean 0.2% away, its rounding, round after round, and never agreed (``tests/test_compression.py``)."""
    dense = codec.dense_stage
    if dense.lossless:
        return 0.0
    scale = l2_norm(own)
    if scale == 0:
        return 0.0
    squares = 0.0
    for start in range(0, own.numel(), PART):  # parts that start at a multiple of the codec's block
        part = dense.bound(own[start : start + PART])
        squares += torch.linalg.vector_norm(part, dtype=torch.float64).item() ** 2
    return 2 * math.sqrt(squares) / scale


def outlying_means(
    distances: dict[tuple[int, int], float],
    defences: Defences,
    agreed: Sequence[tuple[int, int]] | None = None,
    rounding: dict[tuple[int, int], float] | None = None,
    spread: dict[tuple[int, int], float] | None = None,
) -> set[tuple[int, int]]:
    """The shards (bounds) whose mean is too far from a member's values for ``defences.mean_check``:
    beyond ``mean_check`` times the median distance (or the shard's ``spread``, where larger: how far
    the member's cell lies from its values there, ``Defences.cell_spread``), plus ``MEAN_CHECK_FLOOR``,
    plus the shard's ``rounding`` (``rounding_distance``; none if not given).  A group whose honest
    means all lie far from a member that differs from it is then that member's case, not theirs.

    Only shards inside ``agreed`` (where the member's values held a mean of its whole group after its
    previous round, by the owners' counts; None: everywhere) are checked.  Elsewhere its values, or
    another member's, may lie apart from the group's (a shard that failed, was refused, or left a
    member out), and the honest mean that brings them back must not look hostile.
    """
    if defences.mean_check is None or len(distances) < 2:
        return set()
    median = statistics.median_low(distances.values())
    rounding, spread = rounding or {}, spread or {}
    checked = distances if agreed is None else [bounds for bounds in distances if _inside(bounds, agreed)]
    return {
        bounds
        for bounds in checked
        if distances[bounds]
        > defences.mean_check * max(median, spread.get(bounds, 0.0)) + MEAN_CHECK_FLOOR + rounding.get(bounds, 0.0)
    }


def _inside(bounds: tuple[int, int], intervals: Sequence[tuple[int, int]]) -> bool:
    """Whether ``[start, end)`` lies within the union of ``intervals``."""
    start, end = bounds
    for a, b in sorted(intervals):
        if a > start:
            break
        start = max(start, b)
    return start >= end


def _sender_key(sender: str | None) -> tuple[bool, str]:
    return sender is None, sender or ""


class ShardReduction:
    """Robust weighted mean of one shard over the contributions that arrived whole (``Defences``).

    Keeps the contributions until the mean is taken (the clip radius depends on all of them), in
    float32; the result is the owner's values plus the clipped, weighted mean of the differences, or
    with ``rule="trimmed"`` the weighted mean of what is left per value after trimming.
    """

    def __init__(
        self,
        own_values: torch.Tensor,
        own_weight: float,
        defences: Defences = DEFAULT_DEFENCES,
        same_scale: bool = False,
        spread: float = 0.0,
        reference: float = 0.0,
        cell_size: float = 0.0,
    ):
        self._own, self._own_weight, self.defences = own_values.float(), own_weight, defences
        # how far apart the cell's values lie on this shard (``sketches``): the radius's floor, so that an honest
        # peer far from a small group's other members is not clipped as if hostile
        self.reference = reference
        # how large the cell's values are on this shard (``sketches.typical_size``): where the values are not
        # parameters, a contribution over ``catch`` times it is left out (not caught: values of other kinds differ)
        self.cell_size = cell_size
        self._own_norm: float | None = None  # |own values|, once needed
        self._same_scale = same_scale  # honest values have about one size (parameters, not pseudo-gradients)
        # the contributions' median distance from our values, relative to their size: the one given
        # (an earlier round's) until ``mean`` measures it, and kept where everyone agreed with us
        self.spread = spread
        self._contributions: list[tuple[torch.Tensor, float]] = []
        self._senders: list[str | None] = []
        self.clipped = self.dropped = 0
        self.oversized: list[str] = []  # senders dropped for values far beyond the values' typical size

    @property
    def contributors(self) -> int:
        return len(self._contributions)

    def add(self, values: torch.Tensor, weight: float, sender: str | None = None) -> None:
        """Keep a contribution, in the order of the senders' ids, not of arrival: the mean's float sums then
        take the same order, and give the same bits, however the transfers interleaved."""
        at = bisect.bisect([_sender_key(s) for s in self._senders], _sender_key(sender))
        self._contributions.insert(at, (values, weight))
        self._senders.insert(at, sender)

    def _weights(self) -> list[float]:
        claimed = [self._own_weight] + [weight for _, weight in self._contributions]
        if self.defences.weight_cap is None:
            return claimed
        cap = self.defences.weight_cap * statistics.median_low(claimed)
        return [min(weight, cap) for weight in claimed]

    @property
    def total_weight(self) -> float:
        return sum(self._weights())

    def mean(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The robust mean, written into ``out`` (a new tensor if None) a part at a time: no whole
        difference of a contribution from the owner's values is ever held (issue 14)."""
        weights = self._weights()
        if self.defences.rule == "trimmed":
            mean = self._trimmed_mean(weights)
            return mean if out is None else out.copy_(mean)
        contributions = [values for values, _ in self._contributions]
        scales = [1.0] * len(contributions)
        if self.defences.clip is not None and contributions:
            norms = [l2_norm(values, self._own) for values in contributions]
            median = self._median_distance(norms)
            typical = max(median, self.reference)
            radius = self.defences.clip * typical
            scales = [min(1.0, radius / norm) if norm > 0 else 1.0 for norm in norms]
            if self.defences.drop is not None or self.defences.catch is not None:
                drop = math.inf if self.defences.drop is None else self.defences.drop
                catch = math.inf if self.defences.catch is None else self.defences.catch
                sizes = self._sizes(contributions) if self._same_scale else [math.inf] * (len(norms) + 1)
                # the values' size is our own (honest) values', which no hostile majority of the contributions
                # can set (the low median of all sizes let two ``huge`` peers in a group of three through)
                size = sizes[0] if sizes[0] > 0 else statistics.median_low(sizes)
                # caught: larger than any honest parameters, or farther from ours than ``drop`` times their size
                caught = [big > catch * size or norm > drop * size for big, norm in zip(sizes[1:], norms)]
                spans = [1.0] * len(norms) if self._same_scale else self._spans(weights)
                larger = [False] * len(norms)
                if not self._same_scale and self.cell_size > 0:
                    larger = [l2_norm(v) > catch * self.cell_size * n for v, n in zip(contributions, spans)]
                scales = [
                    0.0 if c or big or norm > drop * typical * n else scale
                    for scale, c, big, norm, n in zip(scales, caught, larger, norms, spans)
                ]
                self.oversized = [s for s, c in zip(self._senders, caught) if c and s is not None]
                weights = [weights[0]] + [w for w, scale in zip(weights[1:], scales) if scale > 0]
                contributions = [v for v, scale in zip(contributions, scales) if scale > 0]
                self.dropped = len(scales) - len(contributions)
                scales = [scale for scale in scales if scale > 0]
            self._remember_spread(median, self.dropped == 0)
            self.clipped = sum(scale < 1.0 for scale in scales)
        total = sum(weights)
        out = torch.empty_like(self._own) if out is None else out
        for a in range(0, self._own.numel(), PART):
            own = self._own[a : a + PART]
            part = out[a : a + PART].copy_(own)
            for values, weight, scale in zip(contributions, weights[1:], scales):
                part.add_(values[a : a + PART].float() - own, alpha=weight * scale / total)
        return out

    @staticmethod
    def _spans(weights: list[float]) -> list[float]:
        """How many of the group's typical rounds each contribution's (capped) weight covers, at least 1.  Values
        that are not parameters may hold the steps of rounds their sender missed (pseudo-gradients,
        ``holds_unapplied_steps``): they lie that many times farther and are that much larger, and are dropped only
        beyond ``drop`` and ``catch`` times it.  The clip radius does not grow with it, so a hostile weight moves a
        mean no more than before."""
        median = statistics.median_low(weights)
        return [max(1.0, weight / median) if median > 0 else 1.0 for weight in weights[1:]]

    def _median_distance(self, norms: list[float]) -> float:
        """The contributions' median distance from our values.  Where most contributions equal ours (their
        members averaged with us last round: distance exactly 0), it
        is the ``spread`` of an earlier round instead (``_remember_spread``): with a median of 0, one
        member that trained elsewhere, honest, was dropped by every owner, and refused every mean that
        held it (``Defences.mean_check``), so the group that agreed first decided the final model
        alone (``benchmarks/adversarial.py``, digits, with no attacker)."""
        median = statistics.median_low(norms)
        if median > 0:
            return median
        return self.spread * self.own_norm

    def _remember_spread(self, median: float, clean: bool) -> None:
        """Keep this round's median distance, relative to our values' size, as the ``spread`` of later
        rounds, only where nothing was dropped or caught: a median that hostile contributions set
        (two of three in a group, dropped as oversized) kept as the spread let the next rounds pass
        what they should have dropped (``huge``, 2 of 8: 3 honest peers diverged)."""
        if clean and median > 0 and self.own_norm > 0:
            self.spread = median / self.own_norm

    @property
    def own_norm(self) -> float:
        if self._own_norm is None:
            self._own_norm = l2_norm(self._own)
        return self._own_norm

    def _sizes(self, contributions: list[torch.Tensor]) -> list[float]:
        """The norms of our values, then of each contribution's."""
        return [self.own_norm, *(l2_norm(values) for values in contributions)]

    def _trimmed_mean(self, weights: list[float]) -> torch.Tensor:
        """Per value: drop the ``trim`` smallest and largest contributions, weighted mean of the rest."""
        values = torch.stack([self._own] + [values.float() for values, _ in self._contributions])
        trim = min(self.defences.trim, (len(values) - 1) // 2)
        if trim == 0:
            kept, kept_weights = values, torch.tensor(weights, dtype=torch.float32)[:, None].expand_as(values)
        else:
            values, order = values.sort(dim=0)
            kept = values[trim : len(values) - trim]
            kept_weights = torch.tensor(weights, dtype=torch.float32)[order[trim : len(order) - trim]]
        return (kept * kept_weights).sum(dim=0) / kept_weights.sum(dim=0)
