"""A round's group and plan from its records: pure, as every peer computes it."""

from gossiptrain.matchmaking import MAX_VOUCHES, plan_group, vouches


def _record(**fields):
    return {"schema": "s", "numel": 100, "mode": "params", "client": False, "answered": [], **fields}


def test_peers_averaging_something_else_are_left_out_and_our_own_record_counts_when_our_read_missed_it():
    records = {f"p{i}": _record() for i in range(3)}
    records["other-model"] = _record(schema="t")
    records["deltas"] = _record(mode="delta")
    plan, seen = plan_group("run", 5, "me", _record(), records, group_size=8)
    assert set(plan.members) == {"me", "p0", "p1", "p2"} and seen == 4


def test_clients_reduce_no_shard_and_declared_speeds_size_the_shards():
    records = {"fast": _record(mbit=100.0), "client": _record(client=True), "bad": _record(mbit=float("nan"))}
    plan, _ = plan_group("run", 5, "me", _record(mbit=100.0), records, group_size=4)
    shards = plan.shards()
    assert "client" not in shards and set(shards) == {"me", "fast", "bad"}


def test_a_record_vouches_for_at_most_max_vouches_named_peers():
    record = _record(answered=[f"p{i}" for i in range(MAX_VOUCHES + 10)] + [3])
    assert vouches(record) == {f"p{i}" for i in range(MAX_VOUCHES)}
    assert vouches(None) == vouches({"answered": "p1"}) == frozenset()
