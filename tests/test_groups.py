import torch

from gossiptrain.groups import established, grid_depth, group_digest, group_of, guarded_groups, make_groups


def peers(n):
    return [f"peer{i:02d}" for i in range(n)]


def test_partition_covers_every_peer_once():
    for n in (1, 2, 5, 7, 16, 23):
        for round_id in range(6):
            groups = make_groups(peers(n), round_id, group_size=4, salt="run")
            flat = [p for g in groups for p in g]
            assert sorted(flat) == peers(n)
            assert all(min(3, n) <= len(g) <= 4 + 2 for g in groups), "pairs and lone peers are pooled"


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


def mutual(peer_ids):
    """Vouches of peers that all answered one another."""
    return {peer: set(peer_ids) - {peer} for peer in peer_ids}


def test_guarded_groups_are_moshpit_groups_when_everyone_is_established_or_no_one_is():
    view = peers(16)
    for round_id in range(4):
        expected = make_groups(view, round_id, 4, "run")
        assert guarded_groups(mutual(view), round_id, 4, "run") == expected
        assert guarded_groups({peer: set() for peer in view}, round_id, 4, "run") == expected


def test_ghosts_take_only_the_newcomer_seats_and_honest_peers_keep_each_other():
    """Half the ghosts claim that every peer answered them, half claim none did: no vouch of theirs is returned."""
    honest, ghosts = peers(6), [f"ghost{i:02d}" for i in range(20)]
    vouches = {
        **mutual(honest),
        **{ghost: set(honest) for ghost in ghosts[:10]},
        **{ghost: set() for ghost in ghosts[10:]},
    }
    assert established(vouches) == set(honest)
    for round_id in range(8):
        groups = guarded_groups(vouches, round_id, 4, "run")
        moshpit = [set(group) for group in make_groups(honest, round_id, 4, "run")]
        assert sorted(p for g in groups for p in g) == sorted(honest + ghosts), "everyone is placed, once"
        for group in groups:
            members = set(group) & set(honest)
            if members:
                assert members in moshpit, f"ghosts changed which honest peers average together: {group}"
                assert len(set(group) - members) <= max(1, 4 - len(members)), f"too many newcomers: {group}"
                assert group_of(group[0], vouches, round_id, 4, "run") == group


def test_an_honest_newcomer_gets_a_seat_with_established_peers_within_a_few_rounds():
    honest, joiner = peers(4), "joiner"
    vouches = {**mutual(honest), joiner: set(), **{f"ghost{i:02d}": set() for i in range(7)}}
    seated = [r for r in range(32) if set(group_of(joiner, vouches, r, 4, "run")) & set(honest)]
    assert len(seated) >= 2, "the joiner hardly ever sat with an established peer"


def test_guarded_groups_do_not_depend_on_the_order_of_the_view():
    view = {**mutual(peers(5)), "new1": set(), "new2": {"peer00"}}
    reordered = dict(reversed(list(view.items())))
    assert guarded_groups(view, 7, 4, "run") == guarded_groups(reordered, 7, 4, "run")
