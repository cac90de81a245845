"""Experiment trackers: per-round scalars to TensorBoard (read back from the event files) and W&B (offline)."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from gossiptrain import attach
from gossiptrain.codecs import get_codec
from gossiptrain.metrics import RoundRecord
from gossiptrain.outer import OuterStrategy
from gossiptrain.testing import LOOPBACK, LocalSwarm
from gossiptrain.trackers import TensorBoardTracker, Tracker, open_trackers, round_scalars
from tests.test_cli import run_two_tiny_peers
from tests.test_state import mlp, train

REPO = Path(__file__).resolve().parents[1]
ROUND_TAGS = {  # what every peer logs from its second round on (loss once the loop reported one)
    "train/loss",
    "train/steps_per_second",
    "rounds/averaged",
    "rounds/failed",
    "rounds/crashed",
    "round/group_size",
    "round/participants",
    "round/seconds",
    "round/bytes_sent",
    "round/bytes_received",
    "round/param_norm",
    "bytes/sent_total",
    "bytes/received_total",
    "rejected/total",
}


class Recorder(Tracker):
    def __init__(self):
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed = 0

    def log(self, step, scalars):
        self.logged.append((step, dict(scalars)))

    def close(self):
        self.closed += 1


class Broken(Tracker):
    def log(self, step, scalars):
        raise OSError("disk full")

    def close(self):
        raise OSError("disk still full")


def record(step: int, when: float, **fields) -> RoundRecord:
    values = dict(peer="p", round=1, status="averaged", step=step, group_size=2, participants=2, mode="params")
    values |= dict(loss=0.5, bytes_sent=100, bytes_received=90, round_seconds=0.2, param_norm=3.0, time=when)
    return RoundRecord(**(values | fields))


def test_round_scalars_hold_the_record_the_counters_and_rejections_by_kind():
    scalars = round_scalars(
        record(7, 1.0, loss=None, rejected={"nan": 2, "view_mismatch": 1}, status="partial", refused=1, dropped=2),
        {"rounds/averaged": 4, "outer/step_norm": None},
    )
    assert "train/loss" not in scalars and "outer/step_norm" not in scalars  # unknown values are left out
    assert scalars["rounds/averaged"] == 4 and scalars["round/bytes_received"] == 90
    assert (scalars["round/refused"], scalars["round/clipped"], scalars["round/dropped"]) == (1, 0, 2)
    assert scalars["rejected/total"] == 3 and scalars["rejected/nan"] == 2 and scalars["rejected/view_mismatch"] == 1


def test_a_tracker_that_raises_loses_its_scalars_only_and_the_others_get_theirs(caplog):
    recorder = Recorder()
    trackers = open_trackers([Broken(), recorder])
    trackers.log_round(record(10, 100.0), {"rounds/averaged": 1})
    trackers.log_round(record(30, 102.0), {"rounds/averaged": 2})
    assert trackers.errors == 2 and "Broken.log raised OSError('disk full')" in caplog.text
    assert [step for step, _ in recorder.logged] == [10, 30]
    assert recorder.logged[1][1]["train/steps_per_second"] == pytest.approx(10.0)
    assert "train/steps_per_second" not in recorder.logged[0][1]  # no earlier record to measure from
    trackers.close()
    trackers.close()
    assert recorder.closed == 1 and "could not close Broken" in caplog.text


def test_log_to_takes_a_tracker_a_directory_or_a_list_and_refuses_anything_else(tmp_path):
    assert not open_trackers(None)
    recorder = Recorder()
    assert open_trackers(recorder).trackers == [recorder]
    both = open_trackers([recorder, tmp_path / "tb"])
    assert isinstance(both.trackers[1], TensorBoardTracker)
    both.close()
    with pytest.raises(TypeError, match="log_to takes Trackers and TensorBoard directories, got int"):
        open_trackers([tmp_path / "tb2", 3])


def test_the_outer_step_norm_is_how_far_the_anchor_moved():
    params = [torch.nn.Parameter(torch.arange(12.0).view(3, 4))]
    strategy = OuterStrategy(params, lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), get_codec("none"))
    for _ in range(2):  # the second step moves by momentum too: 0.5 * (1 + 0.9) * mean
        before = strategy.anchor.clone()
        mean = torch.full((12,), 2.0)
        strategy.outer_step(mean, [(0, 8)], scratch=mean)
        assert strategy.step_norm == pytest.approx(float((strategy.anchor - before).norm()))
        assert torch.equal(strategy.anchor[8:], before[8:])
    strategy.outer_step(torch.ones(12), [(0, 12)])
    assert strategy.step_norm is None


def scalars_in(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``log_dir``, as (step, value) by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.timeout(150)
def test_two_cli_peers_write_their_rounds_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is in the dev extra: pip install -e '.[dev]'")
    run_two_tiny_peers(
        "tensorboard", lambda i: ("--eval-every", "2", "--tensorboard", str(tmp_path / f"peer{i}")), duration="4"
    )
    for i in range(2):
        scalars = scalars_in(tmp_path / f"peer{i}")
        assert ROUND_TAGS | {"eval/loss"} <= set(scalars), sorted(scalars)
        steps = [step for step, _ in scalars["rounds/averaged"]]
        assert steps == sorted(steps) and steps[-1] > 0, "at the peer's local step"
        assert scalars["rounds/averaged"][-1][1] > 0
        assert max(value for _, value in scalars["round/group_size"]) == 2
        assert scalars["bytes/sent_total"][-1][1] > 0 and scalars["bytes/received_total"][-1][1] > 0
        assert max(value for _, value in scalars["round/bytes_sent"]) > 0
        assert all(0 < value < 5 for _, value in scalars["round/seconds"])
        assert all(value >= 0 and value == value for _, value in scalars["train/loss"])  # not NaN
        rates = [value for _, value in scalars["train/steps_per_second"]]
        assert min(rates) >= 0 and max(rates) > 0, "0 only in finish()'s rounds, which take no local steps"
        shares = [value for _, value in scalars["train/utilization"]]
        assert all(0 <= share <= 1 for share in shares) and max(shares) > 0.5, shares  # the hooks cost little


@pytest.mark.timeout(60)
def test_an_outer_peer_logs_its_outer_steps_norm_and_closes_its_trackers():
    model, recorder = mlp(0), Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = dict(host_maddrs=[LOOPBACK], average_every=0.3, inner_steps=2, anchor_sync_every=1000, log_to=recorder)
    outer = lambda params: torch.optim.SGD(params, lr=0.7)  # noqa: E731
    with attach(optimizer, run_id="tracked-outer", outer_optimizer=outer, **options) as swarm:
        deadline = time.monotonic() + 40
        while not any("outer/step_norm" in scalars for _, scalars in recorder.logged):
            assert time.monotonic() < deadline, recorder.logged
            train(optimizer, model, 1)
            time.sleep(0.01)  # a training loop's pace, not a synchronization
        assert swarm.trackers.trackers == [recorder]
    assert recorder.closed == 1
    [norm] = [scalars["outer/step_norm"] for _, scalars in recorder.logged if "outer/step_norm" in scalars][:1]
    assert norm > 0, "alone, an outer round steps on this peer's own pseudo-gradient"


@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_a_cli_peer_writes_an_offline_wandb_run(tmp_path):
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
    }
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        process, output = swarm.run_cli(
            *("peer", "--host-maddrs", LOOPBACK, "--initial-peers", *swarm.initial_peers),
            *("--module", "tests.test_cli:tiny_task", "--run-id", "wandb", "--duration", "3"),
            *("--average-every", "0.5", "--batch-size", "16", "--wandb-project", "gossiptrain-test"),
            env=env,
        )
        output.wait_for(lambda line: line.startswith("final: loss"), timeout=90)
        assert process.wait(timeout=60) == 0
    [run_file] = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    history = wandb_history(run_file)
    assert len(history) >= 2, history
    steps = [step for step, _ in history]
    assert steps == sorted(steps) and steps[-1] > 0, "at the peer's local step"
    assert ROUND_TAGS - {"train/steps_per_second"} <= set(history[0][1]), history[0]
    assert history[-1][1]["round/group_size"] == 1 and history[-1][1]["eval/loss"] >= 0


def wandb_history(path: Path) -> list[tuple[int, dict]]:
    """The history rows (step, values) of an offline W&B run file: records of ``wandb_internal.proto`` in
    LevelDB's log format (after a 7-byte header, 32 KiB blocks of chunks with a 7-byte header: CRC, length,
    type 1 whole, 2 first, 3 middle, 4 last), as wandb's own ``datastore`` read them before wandb-core."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, position, records, parts = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B", f"not a W&B run file: {data[:7]!r}"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        parts += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(parts))
            parts = b""
    return [
        (r.history.step.num, {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
