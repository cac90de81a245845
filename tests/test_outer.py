"""Outer mode: DiLoCo's outer step on gossiped pseudo-gradients, over real peers."""

import pytest
import torch

from gossiptrain.codecs import get_codec
from gossiptrain.demo import spread
from gossiptrain.groups import make_groups
from gossiptrain.optimizer import GossipOptimizer
from gossiptrain.outer import OuterStrategy
from gossiptrain.rounds import RoundResult
from gossiptrain.testing import LocalSwarm
from tests.peer_workers import nesterov, outer_training, release, run_averaging, shared_anchor
from tests.test_state import PEER_OPTIONS, mlp, train


def strategy_at(start: torch.Tensor, codec: str = "none") -> OuterStrategy:
    """An outer strategy whose anchor starts at ``start`` (17 values, as two parameters)."""
    return OuterStrategy([start[:12].view(3, 4), start[12:]], nesterov(), get_codec(codec))


def averaged(values: torch.Tensor, combined=None) -> RoundResult:
    combined = [(0, values.numel())] if combined is None else combined
    return RoundResult(0, "averaged", ["a", "b"], values.clone(), combined=combined)


def test_a_zero_pseudo_gradient_changes_nothing_even_with_momentum():
    anchor = torch.randn(17)
    strategy = strategy_at(anchor)
    contribution = strategy.contribution(anchor, round_id=1)
    assert contribution.mode == "outer" and torch.equal(contribution.values, torch.zeros(17))
    after = strategy.combine(averaged(contribution.values), anchor, "outer")
    assert torch.equal(after, anchor) and torch.equal(strategy.anchor, anchor)


def test_an_outer_round_is_torchs_own_outer_step_on_the_mean_and_keeps_local_steps():
    start, mean = torch.randn(17), torch.randn(17)
    strategy = strategy_at(start)
    reference = torch.nn.Parameter(start.clone())
    outer = nesterov()([reference])
    for _ in range(2):  # two rounds: the second one uses the momentum of the first
        snapshot = strategy.anchor - mean  # inner steps moved every member by -mean
        strategy.contribution(snapshot, round_id=1)
        after = strategy.combine(averaged(mean), snapshot, "outer")
        reference.grad = mean.clone()
        outer.step()
        assert torch.equal(strategy.anchor, reference.detach()) and torch.equal(after, strategy.anchor)


def test_a_slice_whose_owner_failed_keeps_the_anchor_momentum_and_parameters_there():
    start = torch.randn(17)
    strategy = strategy_at(start)
    strategy.combine(averaged(torch.ones(17)), start - 1, "outer")  # momentum is 1 everywhere now
    anchor, momentum = (
        strategy.anchor.clone(),
        torch.cat([strategy.outer.state[p]["momentum_buffer"].flatten() for p in strategy.anchor_params]),
    )
    snapshot = anchor - 2
    strategy.contribution(snapshot, round_id=1)
    after = strategy.combine(averaged(torch.full((17,), 2.0), combined=[(0, 12)]), snapshot, "outer")
    momentum_after = torch.cat([strategy.outer.state[p]["momentum_buffer"].flatten() for p in strategy.anchor_params])
    assert torch.equal(strategy.anchor[12:], anchor[12:]) and torch.equal(momentum_after[12:], momentum[12:])
    assert torch.equal(after[12:], snapshot[12:]), "where the round failed the parameters keep their steps"
    assert not torch.equal(strategy.anchor[:12], anchor[:12]) and torch.equal(after[:12], strategy.anchor[:12])


def test_what_a_codec_drops_from_a_pseudo_gradient_stays_in_the_parameters_for_the_next_round():
    anchor = torch.zeros(17)
    strategy = strategy_at(anchor, "topk:0.2")
    snapshot = anchor - torch.arange(17.0)  # inner steps moved the parameters by -0..-16
    contribution = strategy.contribution(snapshot, round_id=1)
    assert contribution.residual is strategy.residual, "the exchange writes what the codec dropped there"
    sent = torch.where(torch.arange(17) >= 13, contribution.values, torch.zeros(17))  # the top 4 went out
    strategy.residual.copy_(contribution.values - sent)
    after = strategy.combine(averaged(sent), snapshot, "outer")
    assert torch.allclose(strategy.anchor, -1.9 * 0.7 * sent), "the anchor moves by the outer step on what was sent"
    assert torch.equal(after, strategy.anchor - (contribution.values - sent)), "the rest stays in the parameters"
    assert torch.equal(strategy.residual, torch.zeros(17))
    assert torch.equal(strategy.contribution(after, round_id=1).values[:13], torch.arange(13.0)), "sent next round"


@pytest.mark.timeout(180)
def test_a_joiner_copies_the_anchor_the_outer_momentum_and_the_inner_state():
    options = dict(outer_optimizer=nesterov(), run_id="outer-join", average_every=0.5, **PEER_OPTIONS)
    donor_model, joiner_model = mlp(0), mlp(1)
    with GossipOptimizer(torch.optim.Adam(donor_model.parameters(), lr=1e-2), **options) as donor:
        while donor.last_round is None or (donor.last_round.status, donor.last_round.mode) != ("alone", "outer"):
            # an outer step alone gives the outer optimizer momentum (an anchor-sync round would not)
            train(donor, donor_model, 1)
        train(donor, donor_model, 3)  # and inner steps since that anchor
        joiner_inner = torch.optim.Adam(joiner_model.parameters(), lr=1e-3)
        with GossipOptimizer(joiner_inner, initial_peers=donor.maddrs(), load_state=True, **options) as joiner:
            theirs, ours = donor.strategy, joiner.strategy
            assert torch.equal(ours.anchor, theirs.anchor)
            for mine, donors in zip(ours.anchor_params, theirs.anchor_params):
                assert torch.equal(
                    ours.outer.state[mine]["momentum_buffer"], theirs.outer.state[donors]["momentum_buffer"]
                )
            assert torch.equal(torch.cat([p.detach().flatten() for p in joiner_model.parameters()]), theirs.anchor)
            for mine, donors in zip(joiner_inner.state.values(), donor.optimizer.state.values()):
                assert torch.equal(mine["exp_avg"], donors["exp_avg"]) and torch.equal(mine["step"], donors["step"])
            assert joiner.local_step == donor.local_step and joiner_inner.param_groups[0]["lr"] == 1e-2


@pytest.mark.timeout(240)
def test_one_outer_round_of_four_processes_is_dilocos_update_in_one_process():
    """Every peer in one group, no compression: the weighted mean of the pseudo-gradients, then one
    Nesterov step, exactly as a single process computes it (peer ``i`` took ``i + 1`` inner steps)."""
    num_peers = 4
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ready, go, start_round = swarm.context.Queue(), swarm.context.Event(), swarm.context.Value("q", 0)
        for seed in range(num_peers):
            swarm.spawn(seed, outer_training, swarm.initial_peers, seed, num_peers, ready, go, start_round)
        release(ready, go, start_round, num_peers, interval=1.0, odd=True)
        results = swarm.results(num_peers, timeout=180)
    start = results[0]["start"]
    steps = [results[i]["steps"] for i in range(num_peers)]
    pseudo = torch.stack([start - results[i]["trained"] for i in range(num_peers)])
    weights = torch.tensor(steps, dtype=torch.float32)
    mean = (pseudo * weights[:, None]).sum(0) / weights.sum()
    anchor = torch.nn.Parameter(start.clone())
    anchor.grad = mean
    nesterov()([anchor]).step()
    for result in results.values():
        assert torch.equal(result["start"], start) and result["status"] == "averaged", result["status"]
        error = (result["after"] - anchor.detach()).abs().max().item()
        assert error < 1e-6, error


@pytest.mark.timeout(240)
def test_a_member_killed_mid_round_leaves_the_survivors_anchors_at_their_mean():
    # 4 parts per shard: the victim dies after sending half of its slice, never a whole one
    numel, weights, victim = 4 * 2**20, [1.0, 2.0, 3.0, 4.0], 3
    results, inputs = run_averaging(4, 4, numel, rounds=1, weights=weights, faults={victim: "die"}, outer=True)
    anchor = shared_anchor(numel)
    survivors = [i for i in range(4) if i != victim]
    pseudo = torch.stack([anchor - inputs[i] for i in survivors])
    w = torch.tensor([weights[i] for i in survivors])
    expected = anchor - 0.7 * 1.9 * (pseudo * w[:, None]).sum(0) / w.sum()  # Nesterov's first step: (1 + m) g
    for result in results.values():
        assert result["history"][0]["status"] == "averaged"
        assert torch.isfinite(result["anchor"]).all()
        held = torch.zeros(numel, dtype=torch.bool)
        for start, end in result["history"][0]["combined"]:
            held[start:end] = True
        assert held.sum() == 3 * numel // 4, "every survivor holds the survivors' three shards"
        assert torch.allclose(result["anchor"][held], expected[held], rtol=0, atol=1e-5)
        assert torch.equal(result["anchor"][~held], anchor[~held]), "the dead owner's shard: as if no round"


@pytest.mark.timeout(300)
def test_four_processes_in_outer_mode_train_and_finish_with_one_model():
    num_peers = 4
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ready, go, start_round = swarm.context.Queue(), swarm.context.Event(), swarm.context.Value("q", 0)
        for seed in range(num_peers):
            args = (swarm.initial_peers, seed, num_peers, ready, go, start_round)
            swarm.spawn(seed, outer_training, *args, dict(rounds=4, finish=True))
        release(ready, go, start_round, num_peers, interval=1.0)
        results = swarm.results(num_peers, timeout=240)
    finals = [result["final"] for result in results.values()]
    assert spread([result["start"] for result in results.values()]) == 0, "one initialisation"
    assert spread([result["trained"] for result in results.values()]) > 1e-3, "the peers trained apart"
    assert spread(finals) < 1e-6, spread(finals)
    assert all(result["outer_rounds"] >= 2 for result in results.values()), [
        r["outer_rounds"] for r in results.values()
    ]


def anchor_drift(anchor_sync_every: int, rounds: int = 40, num_peers: int = 8, numel: int = 1000) -> float:
    """Outer rounds of ``num_peers`` strategies in Moshpit pairs, with exact means in memory; every
    round each peer's inner steps move it by its own noise plus a common drift.  Returns the largest
    distance of an anchor from the anchors' mean at the end."""
    generator, peers = torch.Generator().manual_seed(0), [f"peer{i}" for i in range(num_peers)]
    strategies = {
        p: OuterStrategy([torch.zeros(numel)], nesterov(), get_codec("none"), anchor_sync_every) for p in peers
    }
    for round_id in range(1, rounds + 1):
        snapshots = {p: s.anchor - 0.1 * torch.randn(numel, generator=generator) - 0.01 for p, s in strategies.items()}
        wires = {p: strategies[p].contribution(snapshots[p], round_id) for p in peers}
        for group in make_groups(peers, round_id, group_size=2, salt="drift"):
            mean = torch.stack([wires[p].values for p in group]).mean(0)
            for p in group:
                strategies[p].combine(averaged(mean), snapshots[p], wires[p].mode)
    anchors = torch.stack([s.anchor for s in strategies.values()])
    return (anchors - anchors.mean(0)).norm(dim=1).max().item()


def test_anchor_sync_rounds_keep_the_anchors_of_peers_in_pairs_together():
    """Members of a group apply the same mean, but groups of different means (and their momentum)
    move their anchors apart for ever; anchor-sync rounds pull them back."""
    apart, synced = anchor_drift(anchor_sync_every=2**62), anchor_drift(anchor_sync_every=5)
    assert anchor_drift(anchor_sync_every=2**62, rounds=20) < 0.6 * apart, "without syncs the drift keeps growing"
    assert synced < 0.35 * apart, (synced, apart)
