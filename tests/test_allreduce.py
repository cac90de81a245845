import torch

from gossiptrain.allreduce import GroupPlan, ShardReduction, check_hello, shard_bounds


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
