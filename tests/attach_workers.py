"""The functions that run inside the spawned peer processes of ``tests/test_attach.py``."""

import logging
import time

import torch

from gossiptrain.attachment import attach
from gossiptrain.testing import LOOPBACK
from tests.test_state import mlp, train

PACE = 0.005  # seconds between a background peer's steps: it trains on, without taking a whole core


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def one_cycle(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.OneCycleLR:
    """The schedule of the scheduler test: long enough that no peer reaches its end."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=10**6, pct_start=0.001)


def scheduled_training(initial_peers, seed, ready, go, rounds):
    """A plain loop with OneCycleLR on the attached SGD: trains until ``rounds`` rounds averaged, then
    finishes.  Returns the learning rate of every step, the rounds averaged and the final parameters."""
    torch.set_num_threads(1)
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = one_cycle(optimizer)
    options = dict(initial_peers=initial_peers, average_every=0.5, host_maddrs=[LOOPBACK], scheduler=scheduler)
    with attach(optimizer, run_id="schedule", load_state=False, samples_per_step=16, **options) as swarm:
        swarm.wait_for_peers(2, timeout=60)
        ready.put(seed)
        go.wait(60)
        lrs, deadline = [], time.monotonic() + 60
        while swarm.rounds_done < rounds and time.monotonic() < deadline:
            lrs.append(optimizer.param_groups[0]["lr"])
            train(optimizer, model, 1, seed * 10**6 + len(lrs))
            scheduler.step()
        trained_rounds = swarm.rounds_done
        swarm.finish(timeout=60)
        return {"lrs": lrs, "rounds": trained_rounds, "steps": swarm.local_step, "final": flat(model)}


def steady_peer(initial_peers, stop):
    """A peer that trains, one step every ``PACE`` s with a round every slot, until ``stop`` is set."""
    torch.set_num_threads(1)
    model = mlp(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    options = dict(initial_peers=initial_peers, average_every=0.5, host_maddrs=[LOOPBACK])
    with attach(optimizer, run_id="resume", **options) as swarm:
        while not stop.wait(PACE):
            train(optimizer, model, 1, swarm.local_step)
        return {"step": swarm.local_step, "rounds": swarm.rounds_done}


def checkpointing_peer(initial_peers, path, saved):
    """Trains and saves its checkpoint after every round it averaged (reports each on ``saved``), until killed."""
    torch.set_num_threads(1)
    model = mlp(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.9)
    options = dict(initial_peers=initial_peers, average_every=0.5, host_maddrs=[LOOPBACK])
    with attach(optimizer, run_id="resume", model=model, scheduler=scheduler, checkpoint=path, **options) as swarm:
        averaged = 0
        while True:
            train(optimizer, model, 1, swarm.local_step)
            scheduler.step()
            if swarm.rounds_done > averaged:
                averaged = swarm.rounds_done
                swarm.save_checkpoint()
                saved.put({"rounds": averaged, "step": swarm.local_step, "scheduler": scheduler.state_dict()})
            time.sleep(PACE)  # pacing, as steady_peer: not a synchronization


def restarted_peer(initial_peers, path):
    """Restarts from the checkpoint of ``checkpointing_peer``: returns its resume log line, where it went on
    from, its step and scheduler right after the restart, and its first round's status."""
    torch.set_num_threads(1)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("gossiptrain.attachment").addHandler(handler)
    logging.getLogger("gossiptrain.attachment").setLevel(logging.INFO)
    model = mlp(2)  # another initialisation: the checkpoint or the swarm replaces it
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.9)
    records = []
    options = dict(initial_peers=initial_peers, average_every=0.5, host_maddrs=[LOOPBACK], on_round=records.append)
    with attach(optimizer, run_id="resume", model=model, scheduler=scheduler, checkpoint=path, **options) as swarm:
        started = {"step": swarm.local_step, "scheduler": scheduler.state_dict(), "resumed_from": swarm.resumed_from}
        deadline = time.monotonic() + 60
        while not records and time.monotonic() < deadline:
            train(optimizer, model, 1, swarm.local_step)
            time.sleep(PACE)  # pacing
        return {
            **started,
            "log": [line for line in lines if line.startswith("resumed run")],
            "first_round": records[0].status if records else None,
        }


def bf16_average(initial_peers, seed, ready, go, start_round):
    """bf16 parameters, no local steps: one params round in the parent's start round.  Returns the
    parameters before and after."""
    torch.set_num_threads(1)
    model = mlp(seed).to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    options = dict(initial_peers=initial_peers, average_every=1.0, host_maddrs=[LOOPBACK], load_state=False)
    with attach(optimizer, run_id="bf16", **options) as swarm:
        before = flat(model)
        swarm.wait_for_peers(2, timeout=60)
        ready.put(seed)
        go.wait(60)
        record = swarm.average_now(timeout=30, params=True, round_id=start_round.value)
        return {"before": before, "after": flat(model), "status": record.status}
