import torch

from gossiptrain.groups import grid_depth, group_digest, group_of, make_groups


def peers(n):
    return [f"peer{i:02d}" for i in range(n)]


def test_partition_covers_every_peer_once():
    for n in (1, 2, 5, 7, 16, 23):
        for round_id in range(6):
            groups = make_groups(peers(n), round_id, group_size=4, salt="run")
            flat = [p for g in groups for p in g]
            assert sorted(flat) == peers(n)
            assert all(1 <= len(g) <= 4 for g in groups)


def test_every_peer_computes_the_same_partition_regardless_of_input_order():
    view = peers(16)
    expected = make_groups(view, 10, 4, "run")
    assert make_groups(list(reversed(view)), 10, 4, "run") == expected
    for peer in view:
        assert peer in group_of(peer, view, 10, 4, "run")


def test_groups_change_from_round_to_round():
    view = peers(16)
    partitions = [make_groups(view, r, 4, "run") for r in range(6)]
    assert all(a != b for a, b in zip(partitions, partitions[1:]))


def test_two_rounds_of_exact_averaging_give_the_global_mean_for_16_peers_in_groups_of_4():
    view = peers(16)
    assert grid_depth(16, 4) == 2
    values = {p: torch.randn(5, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(view)}
    target = torch.stack(list(values.values())).mean(0)
    for round_id in (8, 9):  # one epoch: rounds 2e and 2e+1
        for group in make_groups(view, round_id, 4, "run"):
            mean = torch.stack([values[p] for p in group]).mean(0)
            values.update({p: mean for p in group})
    assert max((v - target).abs().max().item() for v in values.values()) < 1e-6


def test_a_peer_outside_the_view_is_alone_and_digests_differ_for_different_views():
    assert group_of("stranger", peers(4), 0, 4) == ["stranger"]
    assert group_digest("run", 3, ["a", "b"]) == group_digest("run", 3, ["b", "a"])
    assert group_digest("run", 3, ["a", "b"]) != group_digest("run", 3, ["a", "b", "c"])
    assert group_digest("run", 3, ["a", "b"]) != group_digest("run", 4, ["a", "b"])
