"""attach(): the user's optimizer with schedulers, checkpoints and resume, bf16 parameters."""

import concurrent.futures
import contextlib
import logging
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from gossiptrain import attach, training_state
from gossiptrain.attachment import CRASHES_BEFORE_RAISING
from gossiptrain.codecs import get_codec
from gossiptrain.errors import RoundCrashError
from gossiptrain.outer import OuterStrategy
from gossiptrain.params import AGREEMENT, agrees, param_digest, param_norm
from gossiptrain.testing import LOOPBACK, LocalSwarm
from gossiptrain.wire import WireState
from tests.attach_workers import (
    bf16_average,
    checkpointing_peer,
    one_cycle,
    restarted_peer,
    scheduled_training,
    steady_peer,
)
from tests.peer_workers import nesterov, release
from tests.test_state import mlp, train


def test_a_checkpoint_restores_the_strategy_state_of_both_modes_and_the_scheduler(tmp_path):
    model = mlp(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    params = list(model.parameters())
    wire, outer = WireState(get_codec("int8"), sync_every=3), OuterStrategy(params, nesterov(), get_codec("int8"))
    train(optimizer, model, 3)
    for _ in range(3):
        scheduler.step()
    flat = torch.cat([p.detach().flatten() for p in params])
    wire.reset(flat)
    wire.params_residual += 0.25
    outer.residual += 0.5
    outer.outer_step(torch.ones_like(flat), [(0, flat.numel())])  # momentum in the outer optimizer's state
    for strategy in (wire, outer):
        path = tmp_path / f"{type(strategy).__name__}.pt"
        training_state.save(path, training_state.capture(params, optimizer, 3, strategy, {}, scheduler, own=True))
        fresh = mlp(1)
        fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-2)
        fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=2)
        fresh_params = list(fresh.parameters())
        if strategy is wire:
            twin = WireState(get_codec("int8"), sync_every=3)
        else:
            twin = OuterStrategy(fresh_params, nesterov(), get_codec("int8"))
        state = training_state.read(path)
        training_state.check(state, fresh_params, fresh_optimizer, twin)
        assert training_state.load(state, fresh_params, fresh_optimizer, twin, fresh_scheduler, own=True) == 3
        assert all(torch.equal(a, b) for a, b in zip(params, fresh_params))  # own: not moved to the anchor
        assert fresh_scheduler.state_dict() == scheduler.state_dict()
        assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        if strategy is wire:
            assert torch.equal(twin.reference, wire.reference)
            assert torch.equal(twin.params_residual, wire.params_residual)
        else:
            assert torch.equal(twin.anchor, outer.anchor) and torch.equal(twin.residual, outer.residual)
            momentum = [s["momentum_buffer"] for s in outer.outer.state.values()]
            assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, twin.outer.state.values()))
    assert "reference" not in wire.state_dict() and "residual" not in outer.state_dict()  # joiners get neither


def test_a_restarted_peer_goes_on_from_the_swarm_only_if_the_swarm_is_ahead():
    assert training_state.resume_source(100, 120) == "swarm"
    assert training_state.resume_source(120, 120) == "checkpoint"
    assert training_state.resume_source(100, None) == "checkpoint"


@pytest.mark.timeout(60)
def test_average_now_times_out_rather_than_start_a_second_round_in_the_slot_of_the_one_in_flight():
    """With slots longer than its timeout (the outer mode's, and ``finish(timeout=10)``), ``average_now``
    started a fresh round in the same slot as the one waiting for it: "already averaging", a crash."""
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with attach(optimizer, run_id="inflight", host_maddrs=[LOOPBACK], average_every=3600) as swarm:
        train(optimizer, model, 1)  # starts the round of the next slot, up to an hour away
        inflight = swarm._inflight
        assert inflight is not None and not inflight.done()
        with pytest.raises(TimeoutError, match="in flight"):
            swarm.average_now(timeout=0.5)
        assert swarm._inflight is inflight and not inflight.done() and swarm.rounds_failed == 0


@pytest.mark.timeout(120)
def test_attach_keeps_the_users_optimizer_and_restores_its_own_checkpoint_when_alone(tmp_path, caplog):
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = one_cycle(optimizer)
    path = tmp_path / "peer.pt"
    options = dict(run_id="alone", host_maddrs=[LOOPBACK], model=model, scheduler=scheduler, checkpoint=path)
    with attach(optimizer, checkpoint_every=5, **options) as swarm:
        for _ in range(10):
            train(optimizer, model, 1)
            scheduler.step()
        assert swarm.local_step == 10 and path.exists()  # written by checkpoint_every at steps 5 and 10
        saved = [p.detach().clone() for p in model.parameters()]
    train(optimizer, model, 1)  # closed: the hooks are gone, the optimizer is the plain one again
    assert swarm.local_step == 10
    fresh = mlp(1)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_scheduler = one_cycle(fresh_optimizer)
    options.update(model=fresh, scheduler=fresh_scheduler)
    with caplog.at_level(logging.INFO, logger="gossiptrain.attachment"), attach(fresh_optimizer, **options) as swarm:
        assert swarm.local_step == 10 and swarm.resumed_from == "checkpoint"
        assert all(torch.equal(a, b) for a, b in zip(saved, fresh.parameters()))
        assert fresh_scheduler.state_dict()["last_epoch"] == 10
        assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed run")]
    assert f"from our own checkpoint {path} at step 10 (no other live peer serves its state)" in line


@pytest.mark.timeout(180)
def test_a_one_cycle_schedule_on_the_attached_optimizer_is_the_schedule_alone():
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ready, go = swarm.context.Queue(), swarm.context.Event()
        for seed in range(2):
            swarm.spawn(seed, scheduled_training, swarm.initial_peers, seed, ready, go, 2)
        for _ in range(2):
            ready.get(timeout=60)
        go.set()
        results = swarm.results(2, timeout=150)
    model = mlp(0)
    alone = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = one_cycle(alone)
    longest = max(len(result["lrs"]) for result in results.values())
    expected = []
    for _ in range(longest):
        expected.append(alone.param_groups[0]["lr"])
        alone.step()
        schedule.step()
    for result in results.values():
        assert result["rounds"] >= 2, "both peers averaged while they trained"
        assert result["lrs"] == expected[: len(result["lrs"])]
        assert result["steps"] == len(result["lrs"])
    spread = (results[0]["final"] - results[1]["final"]).abs().max().item()
    assert spread <= 1e-6 * results[0]["final"].norm().item(), "the peers finished with one model"


@pytest.mark.timeout(240)
def test_a_peer_killed_and_restarted_from_its_checkpoint_rejoins_and_its_first_round_averages(tmp_path):
    path = str(tmp_path / "peer.pt")
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        stop, saved = swarm.context.Event(), swarm.context.Queue()
        swarm.spawn("steady", steady_peer, swarm.initial_peers, stop)
        first = swarm.spawn("first life", checkpointing_peer, swarm.initial_peers, path, saved)
        while (checkpoint := saved.get(timeout=90))["rounds"] < 2:
            pass
        swarm.kill(first.pid)
        first.join(timeout=10)
        swarm.spawn("restarted", restarted_peer, swarm.initial_peers, path)
        restarted = swarm.results(1, timeout=120)["restarted"]
        stop.set()
        steady = swarm.results(1, timeout=60)["steady"]
    assert restarted["first_round"] == "averaged", restarted
    assert restarted["resumed_from"] == "swarm" and restarted["step"] > checkpoint["step"], (restarted, checkpoint)
    [line] = restarted["log"]
    assert line.startswith("resumed run 'resume' from the swarm's state at step"), line
    assert f"our checkpoint {path} is behind, at step {checkpoint['step']}" in line
    assert restarted["scheduler"] == checkpoint["scheduler"], "the swarm has no scheduler: ours is the checkpoint's"
    assert steady["rounds"] > 0


@pytest.mark.timeout(120)
def test_bf16_parameters_average_within_bf16_rounding():
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ready, go, start_round = swarm.context.Queue(), swarm.context.Event(), swarm.context.Value("q", 0)
        for seed in range(2):
            swarm.spawn(seed, bf16_average, swarm.initial_peers, seed, ready, go, start_round)
        release(ready, go, start_round, 2, interval=1.0)
        results = swarm.results(2, timeout=90)
    mean = (results[0]["before"].float() + results[1]["before"].float()) / 2
    for result in results.values():
        assert result["status"] == "averaged" and result["after"].dtype == torch.bfloat16
        error = (result["after"].float() - mean).abs()
        assert (error <= 2**-8 * mean.abs()).all(), error.max()  # bf16 keeps 8 significant bits: half an ulp
    assert torch.equal(results[0]["after"], results[1]["after"]), "equal means round to equal bf16 values"


def test_the_finish_digest_tells_apart_models_whose_parameter_sums_are_equal():
    """finish() compared a parameter sum: two models with the same values in another order "agreed"."""
    ours = [torch.randn(1000, generator=torch.Generator().manual_seed(0)), torch.ones(10, 10)]
    swapped = [ours[0].flip(0), ours[1].clone()]
    assert float(sum(p.sum() for p in swapped)) == pytest.approx(float(sum(p.sum() for p in ours)), rel=1e-6)
    tolerance = AGREEMENT * param_norm(ours)
    assert not agrees(param_digest(swapped), param_digest(ours), tolerance)
    rounded = [p * (1 + 1e-7) for p in ours]  # what applying equal means to different snapshots leaves apart
    assert agrees(param_digest(rounded), param_digest(ours), tolerance)


def _two_attached_peers(run_id: str, **options):
    """Two peers of ``run_id`` in this process with different parameters that local steps do not change
    (lr 0), so that every round's mean is the mean of their initial parameters."""
    models = [mlp(0), mlp(1)]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.0) for model in models]
    common = dict(run_id=run_id, host_maddrs=[LOOPBACK], average_every=0.5, load_state=False, **options)
    first = attach(optimizers[0], **common)
    try:
        second = attach(optimizers[1], initial_peers=first.maddrs(), **common)
    except BaseException:
        first.close()
        raise
    return models, optimizers, first, second


@pytest.mark.timeout(150)
def test_a_slow_machine_is_never_waited_for_and_still_contributes():
    """A peer in the middle of a long step (a machine 4x slower, or far slower) registers for no round until it
    steps: the fast peers go on averaging with each other meanwhile; once it steps, at a quarter of their pace, its
    rounds average with them again."""
    models = [mlp(i) for i in range(3)]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.0) for model in models]
    common = dict(run_id="slow-machine", host_maddrs=[LOOPBACK], average_every=0.5, load_state=False)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(attach(optimizers[0], **common))
        peers = [
            first,
            *(stack.enter_context(attach(o, initial_peers=first.maddrs(), **common)) for o in optimizers[1:]),
        ]
        *fast, slow = peers
        slow.wait_for_peers(3, timeout=30)

        def step(indices: list[int]) -> None:
            for i in indices:
                train(optimizers[i], models[i], 1)
            time.sleep(0.05)  # a training loop's pace, not a synchronization

        deadline = time.monotonic() + 60
        while slow.rounds_done < 1:  # all three averaging
            assert time.monotonic() < deadline, [p.rounds_done for p in peers]
            step([0, 1, 2])
        stalled_at, fast_before = slow.rounds_done, [p.rounds_done for p in fast]
        while min(p.rounds_done - before for p, before in zip(fast, fast_before)) < 3:  # the slow one mid-step
            assert time.monotonic() < deadline + 30, [p.rounds_done for p in peers]
            step([0, 1])
        assert slow.rounds_done == stalled_at, "a peer that does not step starts no round"
        steps = 0
        while slow.rounds_done < stalled_at + 3:  # stepping again, at a quarter of the others' pace
            assert time.monotonic() < deadline + 90, [p.rounds_done for p in peers]
            steps += 1
            step([0, 1, 2] if steps % 4 == 0 else [0, 1])


@pytest.mark.timeout(120)
def test_an_on_round_that_raises_every_time_costs_only_its_records():
    """A raising on_round left the finished round in flight: every later step raised TypeError."""

    def broken(record):
        raise ValueError("the user's callback is broken")

    models, optimizers, first, second = _two_attached_peers("raising-callback", on_round=broken)
    starts = [torch.cat([p.detach().flatten() for p in model.parameters()]) for model in models]
    with first, second:
        second.wait_for_peers(2, timeout=30)
        deadline = time.monotonic() + 90
        while min(first.rounds_done, second.rounds_done) < 3:
            assert time.monotonic() < deadline, (first.rounds_done, second.rounds_done)
            for optimizer, model in zip(optimizers, models):
                train(optimizer, model, 1)
            time.sleep(0.01)  # a training loop's pace, not a synchronization
        assert first.on_round_errors >= 3 and second.on_round_errors >= 3
        assert first.rounds_crashed == second.rounds_crashed == 0
    ends = [torch.cat([p.detach().flatten() for p in model.parameters()]) for model in models]
    assert torch.allclose(ends[0], ends[1], atol=1e-6), "the peers hold one model"
    # a weighted mean of the two starts (weights: each one's steps since its last round), each round applied once
    apart = starts[1] - starts[0]
    share = float(torch.dot(ends[0] - starts[0], apart) / torch.dot(apart, apart))
    assert 0 < share < 1 and torch.allclose(ends[0], starts[0] + share * apart, atol=1e-5), share


@pytest.mark.timeout(60)
def test_a_bug_inside_the_round_surfaces_from_the_step_after_a_few_crashes():
    """A programming error in a round was one warning and a failed round: the run trained alone silently."""
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with attach(optimizer, run_id="crashing", host_maddrs=[LOOPBACK], average_every=0.2) as swarm:

        def bug(*args, **kwargs):
            raise ZeroDivisionError("a bug in the round")

        swarm.strategy.contribution = bug
        deadline = time.monotonic() + 40
        with pytest.raises(RoundCrashError, match="3 averaging rounds in a row crashed") as raised:
            while time.monotonic() < deadline:
                train(optimizer, model, 1)
                time.sleep(0.01)  # a training loop's pace, not a synchronization
        assert isinstance(raised.value.__cause__, ZeroDivisionError)
        assert swarm.rounds_crashed == CRASHES_BEFORE_RAISING
        train(optimizer, model, 1)  # the peer itself still works: the user may go on (or fix it)


def test_a_round_snapshot_gives_up_with_a_clear_error_while_the_training_thread_holds_the_state_lock():
    """A step that raised keeps the state lock until the next step: a round's snapshot waited for it forever."""
    from gossiptrain.attachment import Attachment

    swarm = Attachment.__new__(Attachment)  # only what _take_snapshot reads
    swarm.params, swarm.local_step, swarm._samples_since_round = [torch.ones(3)], 5, 2
    swarm._state_lock, swarm.peer = threading.RLock(), SimpleNamespace(round_interval=0.0)
    swarm.strategy = SimpleNamespace(holds_unapplied_steps=False)
    holding, done = threading.Event(), threading.Event()

    def training_thread() -> None:
        with swarm._state_lock:
            holding.set()
            done.wait(30)

    threading.Thread(target=training_thread, daemon=True).start()
    assert holding.wait(5)
    outcome = concurrent.futures.ThreadPoolExecutor(1).submit(swarm._take_snapshot)
    try:
        error = outcome.exception(timeout=20)
    finally:
        done.set()
    assert isinstance(error, TimeoutError) and "state lock" in str(error), error
    snapshot, weight = swarm._take_snapshot()  # once the step is over, the next round's snapshot is taken
    assert torch.equal(snapshot, torch.ones(3)) and weight == 2.0 and swarm._snapshot_step == 5


def test_an_outer_round_weighs_the_samples_of_rounds_that_failed_before_it():
    """A failed outer round leaves the anchor where it was: the next pseudo-gradient holds both rounds' steps, and
    weighed as one round's samples it looked oversized to owners; parameter gossip weighs one round's samples."""
    from gossiptrain.attachment import Attachment

    for holds, weights in ((True, [2.0, 5.0]), (False, [2.0, 3.0])):
        swarm = Attachment.__new__(Attachment)  # only what _take_snapshot reads
        swarm.params, swarm.local_step, swarm._samples_since_round, swarm._samples_unapplied = [torch.ones(3)], 5, 2, 0
        swarm._state_lock, swarm.peer = threading.RLock(), SimpleNamespace(round_interval=0.0)
        swarm.strategy = SimpleNamespace(holds_unapplied_steps=holds)
        assert swarm._take_snapshot()[1] == weights[0]
        swarm._samples_since_round = 3  # the round failed: nothing applied, three more samples since
        assert swarm._take_snapshot()[1] == weights[1]
