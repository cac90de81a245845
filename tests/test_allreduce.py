import pytest
import torch

from gossiptrain.allreduce import (
    DEFAULT_DEFENCES,
    PART,
    Defences,
    GroupPlan,
    ShardReduction,
    check_hello,
    l2_norm,
    outlying_means,
    relative_distance,
    rounding_distance,
    shard_bounds,
)
from gossiptrain.codecs import BLOCK, get_codec


def test_shards_are_contiguous_and_cover_everything():
    for numel, n, align in [(10, 3, 1), (1, 4, 1), (0, 2, 1), (10_000_001, 4, 1), (10, 3, 128), (10_000_001, 3, 128)]:
        bounds = shard_bounds(numel, n, align)
        assert len(bounds) == n and bounds[0][0] == 0 and bounds[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(start % align == 0 for start, _ in bounds)
        assert max(end - start for start, end in bounds) <= numel // n + align


def test_client_mode_members_reduce_no_shard():
    plan = GroupPlan.build("run", 7, ["c", "a", "b"], 100, clients=frozenset({"b"}))
    assert plan.members == ("a", "b", "c")
    assert set(plan.shards()) == {"a", "c"}


def hello(plan, sender, owner, **changes):
    start, end = plan.shards()[owner]
    message = {
        "run_id": plan.run_id,
        "round_id": plan.round_id,
        "sender": sender,
        "digest": plan.digest,
        "codec": "none",
        "mode": "params",
        "start": start,
        "end": end,
        "weight": 2.0,
    }
    return {**message, **changes}


def test_check_hello_accepts_a_good_message_and_names_every_bad_one():
    plan = GroupPlan.build("run", 7, ["a", "b", "c"], 100)
    assert check_hello(hello(plan, "b", "a"), plan, "b", "a", "none") is None
    bad = [
        ("wrong_run", hello(plan, "b", "a", run_id="other"), "b"),
        ("stale_round", hello(plan, "b", "a", round_id=6), "b"),
        ("not_in_group", hello(plan, "b", "a"), "c"),  # spoofed sender
        ("not_in_group", hello(plan, "z", "a"), "z"),
        ("view_mismatch", hello(plan, "b", "a", digest="0" * 16), "b"),
        ("wrong_dtype", hello(plan, "b", "a", codec="fp16"), "b"),
        ("wrong_dtype", hello(plan, "b", "a", mode="delta"), "b"),
        ("wrong_shape", hello(plan, "b", "a", end=99), "b"),
        ("bad_weight", hello(plan, "b", "a", weight=float("nan")), "b"),
        ("bad_weight", hello(plan, "b", "a", weight=-1.0), "b"),
    ]
    for kind, message, sender in bad:
        assert check_hello(message, plan, sender, "a", "none")[0] == kind


def test_shard_reduction_is_the_weighted_mean_of_whole_contributions():
    own, other, third = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([5.0, 10.0])
    reduction = ShardReduction(own, 1.0)
    reduction.add(other, 3.0)
    reduction.add(third, 4.0)
    expected = (own * 1 + other * 3 + third * 4) / 8
    assert torch.allclose(reduction.mean(), expected)
    assert reduction.contributors == 2


def test_shards_follow_the_declared_bandwidths_and_a_far_slower_member_reduces_none():
    numel = 1000 * BLOCK
    plan = GroupPlan.build("run", 1, ["a", "b", "c", "d"], numel, bandwidths={"a": 10.0, "b": 30.0, "d": 2.0})
    shards = plan.shards()
    assert set(shards) == {"a", "b", "c"}, "d (2 of 30 Mbit/s) must reduce nothing"
    sizes = {peer: end - start for peer, (start, end) in shards.items()}
    assert sizes["b"] == pytest.approx(3 * sizes["a"], rel=0.01)
    assert sizes["c"] == pytest.approx(sizes["a"], rel=0.01), "an undeclared member counts as the median (10)"
    assert sum(sizes.values()) == numel and all(start % BLOCK == 0 for start, _ in shards.values())
    same = GroupPlan.build("run", 1, ["a", "b"], numel, bandwidths={"a": 5.0, "b": 5.0})
    assert same.shards() == GroupPlan.build("run", 1, ["a", "b"], numel).shards()


def _honest_and_hostile(n_honest: int = 3, numel: int = 10_000):
    generator = torch.Generator().manual_seed(0)
    centre = torch.randn(numel, generator=generator)
    honest = [centre + 0.01 * torch.randn(numel, generator=generator) for _ in range(n_honest)]
    spread = max(torch.linalg.vector_norm(a - b).item() for a in honest for b in honest)
    return honest, spread


def test_centered_clip_bounds_a_huge_contribution_and_a_huge_weight():
    honest, spread = _honest_and_hostile()
    honest_mean = torch.stack(honest).mean(dim=0)
    for values, weight in ((honest[1] + 1e4 * spread, 1.0), (honest[1] + 10 * spread, 1e9)):
        reduction = ShardReduction(honest[0], 1.0)
        reduction.add(honest[2], 1.0)
        reduction.add(values, weight)
        moved = torch.linalg.vector_norm(reduction.mean() - honest_mean).item()
        assert moved <= 3 * spread, f"a hostile contribution moved the mean by {moved / spread:.1f}x the spread"
        plain = ShardReduction(honest[0], 1.0, Defences.off())
        plain.add(honest[2], 1.0)
        plain.add(values, weight)
        assert torch.linalg.vector_norm(plain.mean() - honest_mean).item() > 5 * spread, "the attack must matter"


def test_a_contribution_far_beyond_the_clip_radius_is_dropped_and_moves_nothing():
    honest, spread = _honest_and_hostile()
    reduction = ShardReduction(honest[0], 1.0)
    reduction.add(honest[2], 2.0)
    reduction.add(honest[1] + 1e4 * spread, 1.0)
    assert torch.allclose(reduction.mean(), (honest[0] + 2.0 * honest[2]) / 3.0, atol=1e-6)
    assert reduction.dropped == 1 and reduction.clipped == 0
    near = ShardReduction(honest[0], 1.0, Defences(drop=None))
    near.add(honest[2], 2.0)
    near.add(honest[1] + 1e4 * spread, 1.0)
    near.mean()
    assert near.dropped == 0 and near.clipped == 1, "without drop it is clipped, and still counts"


def test_a_pseudo_gradient_of_missed_rounds_is_kept_at_the_weight_of_its_steps_and_a_claimed_weight_gains_nothing():
    """A peer back from four missed outer rounds sends a pseudo-gradient of all five rounds' steps, 5x the others':
    weighed as one round it was dropped as oversized (honest outer runs on non-IID char-LM lost 1.9% of their
    contributions so); weighed as the five rounds of samples it holds it is kept.  A hostile peer gains nothing
    by claiming a weight: the same values at the capped weight move the mean by at most the clip radius."""
    generator = torch.Generator().manual_seed(0)
    common = torch.randn(10_000, generator=generator)  # the direction every peer's steps share
    one_round = [common + 0.3 * torch.randn(10_000, generator=generator) for _ in range(2)]
    returning = 5 * common + 0.3 * torch.randn(10_000, generator=generator)

    def reduce(values: torch.Tensor, weight: float) -> tuple[ShardReduction, torch.Tensor]:
        reduction = ShardReduction(one_round[0], 1.0, cell_size=l2_norm(one_round[0]))
        reduction.add(one_round[1], 1.0, "b")
        reduction.add(values, weight, "c")
        return reduction, reduction.mean()

    assert reduce(returning, 1.0)[0].dropped == 1, "5x the cell's size, at one round's weight: oversized"
    kept, mean = reduce(returning, 5.0)
    assert kept.dropped == 0 and kept.clipped == 1
    assert l2_norm(mean, one_round[0]) > l2_norm(one_round[1], one_round[0]) / 7, "its steps are in the mean"
    assert reduce(1e4 * returning, 1e9)[0].dropped == 1, "a huge contribution is dropped at any claimed weight"
    hostile, mean = reduce(30 * common, 1e9)  # within the capped weight's 10x: kept, clipped
    honest = l2_norm(one_round[1], one_round[0])  # the median distance; the radius is clip times it
    assert hostile.dropped == 0 and l2_norm(mean, one_round[0]) <= (honest + 10 * DEFAULT_DEFENCES.clip * honest) / 12


def test_parameters_far_beyond_their_typical_size_are_dropped_in_a_pair_and_as_the_median():
    honest, spread = _honest_and_hostile()
    pair = ShardReduction(honest[0], 1.0, same_scale=True)
    pair.add(honest[1] * 1e4, 1.0)
    assert torch.equal(pair.mean(), honest[0]) and pair.dropped == 1, "the one other contribution sets no radius"
    majority = ShardReduction(honest[0], 1.0, same_scale=True)
    for _ in range(2):
        majority.add(honest[1] * 1e4, 1.0)
    majority.add(honest[2], 1.0)
    assert torch.allclose(majority.mean(), (honest[0] + honest[2]) / 2, atol=1e-6) and majority.dropped == 2
    unscaled = ShardReduction(honest[0], 1.0)  # pseudo-gradients: sizes differ with the steps behind them
    unscaled.add(honest[1] * 1e4, 1.0)
    unscaled.mean()
    assert unscaled.dropped == 0


def test_where_most_contributions_equal_ours_the_spread_of_an_earlier_round_is_the_radius():
    """A group that agreed last round meets a member that trained elsewhere (``finish()``): its
    contributions equal the owner's values, the median distance is 0.  With the spread the owner
    measured in an earlier round the honest newcomer counts; values 1e4x that spread away are still
    dropped; without an earlier spread the newcomer is dropped too (what this replaced)."""
    honest, spread = _honest_and_hostile()
    earlier = ShardReduction(honest[0], 1.0, same_scale=True)
    for values in honest[1:]:
        earlier.add(values, 1.0)
    earlier.mean()
    assert earlier.spread > 0
    newcomer = honest[1]
    agreed = ShardReduction(honest[0], 1.0, same_scale=True, spread=earlier.spread)
    for _ in range(2):
        agreed.add(honest[0].clone(), 1.0)
    agreed.add(newcomer, 1.0)
    assert torch.allclose(agreed.mean(), (3 * honest[0] + newcomer) / 4, atol=1e-6)
    assert agreed.dropped == 0 and agreed.spread == earlier.spread, "a median of 0 keeps the earlier spread"
    hostile = ShardReduction(honest[0], 1.0, same_scale=True, spread=earlier.spread)
    for _ in range(2):
        hostile.add(honest[0].clone(), 1.0)
    hostile.add(honest[1] + 1e4 * spread, 1.0)
    assert torch.equal(hostile.mean(), honest[0]) and hostile.dropped == 1
    outvoted = ShardReduction(honest[0], 1.0, same_scale=True, spread=earlier.spread)
    outvoted.add(honest[1], 1.0)
    for _ in range(2):  # two of three: their distance is the median, their size is caught
        outvoted.add(honest[1] * 1e4, 1.0)
    assert torch.allclose(outvoted.mean(), (honest[0] + honest[1]) / 2, atol=1e-6) and outvoted.dropped == 2
    assert outvoted.spread == earlier.spread, "a round that dropped something must not set the spread"
    forgetful = ShardReduction(honest[0], 1.0, same_scale=True)
    for _ in range(2):
        forgetful.add(honest[0].clone(), 1.0)
    forgetful.add(newcomer, 1.0)
    assert torch.equal(forgetful.mean(), honest[0]) and forgetful.dropped == 1


def _digits_parameters(seed: int) -> torch.Tensor:
    from gossiptrain.tasks.digits import digits_task

    return torch.cat([p.detach().flatten() for p in digits_task(model_seed=seed).model.parameters()])


def test_parameters_plus_one_are_caught_in_a_pair_and_independent_starts_are_not():
    """``heavy`` (values + 1, weight 1e9) on the digits model: 17x its parameters' size, within
    ``drop``'s 20x of the distance, so only the size check catches it, also where it is the only other
    contribution.  Four independent random starts of the model are within 1.1x of one size: none caught."""
    own = _digits_parameters(0)
    pair = ShardReduction(own, 1.0, same_scale=True)
    pair.add(_digits_parameters(1) + 1.0, 1e9, "heavy")
    assert torch.equal(pair.mean(), own) and pair.dropped == 1 and pair.oversized == ["heavy"]
    starts = [_digits_parameters(seed) for seed in range(4)]
    norms = [torch.linalg.vector_norm(values).item() for values in starts]
    assert max(norms) / min(norms) < 1.1, norms
    honest = ShardReduction(starts[0], 1.0, same_scale=True)
    for seed, values in enumerate(starts[1:], 1):
        honest.add(values, 1.0, f"peer{seed}")
    mean = honest.mean()
    assert honest.oversized == [] and honest.dropped == 0
    assert torch.allclose(mean, torch.stack(starts).mean(dim=0), atol=1e-6)
    unchecked = ShardReduction(own, 1.0, Defences(catch=None), same_scale=True)
    unchecked.add(_digits_parameters(1) + 1.0, 1e9, "heavy")
    unchecked.mean()
    assert unchecked.oversized == [] and unchecked.dropped == 0, "without catch, the pair's one contribution counts"


def test_without_an_outlier_the_robust_mean_is_the_weighted_mean():
    honest, _ = _honest_and_hostile(4)
    reduction = ShardReduction(honest[0], 1.0)
    for values, weight in zip(honest[1:], (2.0, 3.0, 4.0)):
        reduction.add(values, weight)
    expected = sum(w * v for w, v in zip((1.0, 2.0, 3.0, 4.0), honest)) / 10.0
    assert reduction.clipped == 0 and torch.allclose(reduction.mean(), expected, atol=1e-6)


def test_a_member_refuses_only_the_mean_far_from_its_values():
    honest, spread = _honest_and_hostile(4)
    own = honest[0]
    means = {shard: torch.stack(honest).mean(dim=0) for shard in ("a", "b", "c")}
    means["d"] = means["a"] + 0.5
    distances = {shard: relative_distance(mean, own) for shard, mean in means.items()}
    checked = Defences(mean_check=5.0)
    assert outlying_means(distances, checked) == {"d"}
    assert outlying_means(distances, Defences.off()) == set()
    assert outlying_means({"a": 0.0, "b": 0.0, "c": 5e-4}, checked) == set(), "within the floor"


def test_the_mean_check_passes_a_shard_where_the_member_held_no_group_mean_last_round():
    """The honest mean that brings a once-failed shard back must pass, or the member never catches up."""
    distances = {(0, 10): 0.01, (10, 20): 0.01, (20, 30): 0.01, (30, 40): 1.0}
    assert outlying_means(distances, DEFAULT_DEFENCES) == {(30, 40)}, "on by default"
    assert outlying_means(distances, DEFAULT_DEFENCES, agreed=[(0, 25), (25, 30)]) == set()
    assert outlying_means(distances, DEFAULT_DEFENCES, agreed=[(0, 5), (5, 40)]) == {(30, 40)}, "intervals merge"
    assert outlying_means(distances, DEFAULT_DEFENCES, agreed=[(0, 35)]) == set(), "only half of it agreed"


def test_a_member_that_differs_from_its_cell_takes_the_cells_spread_as_the_mean_checks_scale():
    """Non-IID: three honest means agree with us closely, a fourth (its owner's peers train elsewhere) lies
    further, within how far our cell's values lie from ours; a shift far beyond that spread is still refused."""
    distances = {(0, 10): 0.01, (10, 20): 0.01, (20, 30): 0.01, (30, 40): 0.3}
    spread = dict.fromkeys(distances, 0.05)
    assert outlying_means(distances, DEFAULT_DEFENCES) == {(30, 40)}, "the median alone takes it for hostile"
    assert outlying_means(distances, DEFAULT_DEFENCES, spread=spread) == set()
    distances[(30, 40)] = 17.0  # shifted_mean's +1 on the digits model
    assert outlying_means(distances, DEFAULT_DEFENCES, spread=spread) == {(30, 40)}


def test_an_honest_quantized_mean_passes_where_the_other_shards_agree_exactly():
    """As in ``finish()`` with int8: our values agree exactly with the group's on three shards, and on the
    fourth the honest mean is our values through the codec, a rounding step away.  A shifted mean still fails."""
    codec = get_codec("int8")
    own = 0.05 * torch.randn(4 * 4096, generator=torch.Generator().manual_seed(0))
    shards = [(i * 4096, (i + 1) * 4096) for i in range(4)]
    means = {bounds: own[bounds[0] : bounds[1]].clone() for bounds in shards[:3]}
    last = shards[3]
    means[last] = codec.decode(codec.encode(own[last[0] : last[1]]), 4096)
    distances = {bounds: relative_distance(mean, own[bounds[0] : bounds[1]]) for bounds, mean in means.items()}
    assert distances[last] > 1e-3, "the rounding alone is beyond the fixed floor"
    rounding = {bounds: rounding_distance(codec, own[bounds[0] : bounds[1]]) for bounds in shards}
    assert outlying_means(distances, DEFAULT_DEFENCES) == {last}, "refused without the codec's rounding"
    assert outlying_means(distances, DEFAULT_DEFENCES, rounding=rounding) == set()
    distances[last] = relative_distance(means[last] + 0.05, own[last[0] : last[1]])
    assert outlying_means(distances, DEFAULT_DEFENCES, rounding=rounding) == {last}, "a shift of the values' size"
    assert rounding_distance(get_codec("none"), own) == 0.0


def _trimmed_reference(rows: list[list[float]], weights: list[float], trim: int) -> list[float]:
    """Per coordinate: sort the (value, weight) pairs, drop ``trim`` at each end, weighted mean of the rest."""
    out = []
    for column in zip(*rows):
        kept = sorted(zip(column, weights))[trim : len(column) - trim]
        out.append(sum(v * w for v, w in kept) / sum(w for _, w in kept))
    return out


def test_the_trimmed_mean_drops_an_outlying_value_and_is_the_plain_mean_elsewhere():
    own = torch.tensor([1.0, 2.0, 3.0])
    others = [torch.tensor([1.5, 1.0, 2.0]), torch.tensor([0.5, 3.0, 4.0]), torch.tensor([1e6, 2.0, 3.0])]
    trimmed = ShardReduction(own, 1.0, Defences(rule="trimmed", trim=1))
    plain = ShardReduction(own, 1.0, Defences.off())
    for values in others:
        trimmed.add(values, 1.0)
        plain.add(values, 1.0)
    # coordinate 0: 1e6 and 0.5 are dropped, (1 + 1.5) / 2 is left; coordinates 1 and 2 are symmetric
    # around the owner's value, so trimming their ends leaves the plain mean
    assert trimmed.mean().tolist() == [1.25, 2.0, 3.0]
    assert plain.mean()[1:].tolist() == [2.0, 3.0] and plain.mean()[0] > 1e5


def test_the_trimmed_mean_weights_what_it_keeps_per_coordinate_and_caps_a_huge_weight():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 64, generator=generator)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    reduction = ShardReduction(rows[0], weights[0], Defences(rule="trimmed", trim=1, weight_cap=None))
    for values, weight in zip(rows[1:], weights[1:]):
        reduction.add(values, weight)
    expected = torch.tensor(_trimmed_reference(rows.tolist(), weights, 1))
    assert torch.allclose(reduction.mean(), expected, atol=1e-6)
    # a contribution with a claimed weight of 1e9 counts as 10x the median weight where it is kept
    heavy = ShardReduction(rows[0], 1.0, Defences(rule="trimmed", trim=1))
    for values, weight in zip(rows[1:], (1.0, 1.0, 1.0, 1e9)):
        heavy.add(values, weight)
    expected = torch.tensor(_trimmed_reference(rows.tolist(), [1.0, 1.0, 1.0, 1.0, 10.0], 1))
    assert torch.allclose(heavy.mean(), expected, atol=1e-6)


def test_the_trimmed_mean_of_a_group_of_two_is_the_weighted_mean():
    reduction = ShardReduction(torch.tensor([1.0, 4.0]), 1.0, Defences(rule="trimmed", trim=1))
    reduction.add(torch.tensor([3.0, 0.0]), 3.0)
    assert reduction.mean().tolist() == [2.5, 1.0]
    with pytest.raises(ValueError, match="unknown rule"):
        Defences(rule="median")


def test_a_mean_over_several_parts_is_written_into_the_given_buffer_and_equals_the_weighted_mean():
    """The mean is formed a part at a time (``allreduce.PART``): across part boundaries it must still be
    the weighted mean, and written into ``out`` rather than a copy."""
    torch.manual_seed(0)
    numel = 2 * PART + 1000
    own, others = torch.randn(numel), [torch.randn(numel) for _ in range(3)]
    reduction = ShardReduction(own, 1.0, Defences.off())
    for i, values in enumerate(others):
        reduction.add(values, float(i + 2))
    out = torch.full((numel,), float("nan"))
    mean = reduction.mean(out=out)
    expected = (own * 1.0 + sum(v * float(i + 2) for i, v in enumerate(others))) / 10.0
    assert mean.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_l2_norm_in_float32_parts_agrees_with_float64_and_is_exactly_zero_for_equal_values():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3 * PART + 123, generator=generator) * 50
    reference = values + 1e-3 * torch.randn(values.numel(), generator=generator)
    exact = torch.linalg.vector_norm(values.double()).item()
    exact_difference = torch.linalg.vector_norm(values.double() - reference.double()).item()
    assert l2_norm(values) == pytest.approx(exact, rel=1e-5)
    # the difference of two float32 values is rounded to float32 (as before l2_norm): 1e-4 for differences
    assert l2_norm(values, reference) == pytest.approx(exact_difference, rel=1e-4)
    assert l2_norm(values, values.clone()) == 0.0
    assert relative_distance(reference, values) == pytest.approx(exact_difference / exact, rel=1e-4)
