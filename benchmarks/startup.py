"""Start-up benchmark: how long until a new peer is ready to average (the issue's budget: 2 s).

Three cases, each repeated ``--repeats`` times (median, min, max), every peer on 127.0.0.1:

- ``peer``: ``Peer.start()`` joining a bootstrap node (``gossiptrain bootstrap`` in its own process):
  the libp2p daemon's start, the DHT join, the model-schema check and the first membership record;
  ``Peer.startup_seconds``.
- ``optimizer_first``: ``GossipOptimizer(...)`` constructed as the first peer of its run (no state to
  download): the same plus the state server; ``GossipOptimizer.startup_seconds``.
- ``optimizer_join``: ``GossipOptimizer(...)`` joining a run in which a ``gossiptrain peer`` process
  (digits task, training) serves its state: the same plus the state download (parameters and Adam
  state of the digits MLP, 0.2 MB).  Its parts are reported too: ``Peer.startup_seconds`` and
  ``state_download_seconds``.
- ``record_signing``: what each membership record costs a peer (no network): signing and verifying a
  record (``SignedRecords``), and validating one already verified (another replica's copy), in ms per record.

Each repetition starts a fresh peer in this process and shuts it down before the next.  The load
average is recorded: on a shared machine start-up is mostly waiting for a core.

    python benchmarks/startup.py          # writes benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import torch
from harness import run_info, write_report

from gossiptrain.optimizer import GossipOptimizer
from gossiptrain.peer import Peer
from gossiptrain.tasks import digits_task
from gossiptrain.testing import LOOPBACK, LocalSwarm


def summary(values: list[float]) -> dict[str, float | list[float]]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


async def peer_startup(initial_peers: list[str]) -> float:
    peer = Peer("bench-startup-peer", initial_peers=initial_peers, host_maddrs=[LOOPBACK])
    await peer.start()
    try:
        return peer.startup_seconds
    finally:
        await peer.stop()


def optimizer_startup(run_id: str, initial_peers: list[str]) -> dict[str, float | None]:
    task = digits_task()
    started = time.perf_counter()
    with GossipOptimizer(
        torch.optim.Adam(task.model.parameters(), lr=1e-3),
        run_id=run_id,
        initial_peers=initial_peers,
        host_maddrs=[LOOPBACK],
        samples_per_step=32,
    ) as optimizer:
        wall = time.perf_counter() - started
        return {
            "constructor": optimizer.startup_seconds,
            "wall": wall,
            "peer_start": optimizer.peer.startup_seconds,
            "state_download": optimizer.state_download_seconds,
            "local_step": optimizer.local_step,
        }


def record_signing(records: int = 1000) -> dict[str, float]:
    """Milliseconds per record: signed and verified once, then validated again (a cached check)."""
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer

    from gossiptrain.auth import Identity
    from gossiptrain.membership import SignedRecords

    identity = Identity.generate()
    own, reader = SignedRecords(identity), SignedRecords()
    subkey, value = MSGPackSerializer.dumps(identity.peer_id), MSGPackSerializer.dumps({"maddrs": [LOOPBACK]})
    unsigned = [DHTRecord(b"members", subkey, value, time.time() + 60 + i) for i in range(records)]
    started = time.perf_counter()
    signed = [DHTRecord(r.key, r.subkey, own.sign_value(r), r.expiration_time) for r in unsigned]
    assert all(reader.validate(record) for record in signed)
    first = (time.perf_counter() - started) / records
    started = time.perf_counter()
    assert all(reader.validate(record) for record in signed)
    again = (time.perf_counter() - started) / records
    return {"sign_and_verify_ms": first * 1e3, "validate_again_ms": again * 1e3, "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "startup.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        peer = [asyncio.run(peer_startup(swarm.initial_peers)) for _ in range(args.repeats)]
        first = [optimizer_startup("bench-startup-first", swarm.initial_peers) for _ in range(args.repeats)]
        _, donor = swarm.start_peer("--run-id", "bench-startup-join", "--average-every", "1.0", "--seed", "0")
        donor.wait_for(lambda line: "joined run" in line, timeout=60)
        join = [optimizer_startup("bench-startup-join", swarm.initial_peers) for _ in range(args.repeats)]
    assert all(run["state_download"] is not None for run in join), "a joiner found no donor"
    signing = record_signing()
    results = {
        "peer": {"seconds": summary(peer)},
        "optimizer_first": {"seconds": summary([run["constructor"] for run in first])},
        "optimizer_join": {
            "seconds": summary([run["constructor"] for run in join]),
            "peer_start_seconds": summary([run["peer_start"] for run in join]),
            "state_download_seconds": summary([run["state_download"] for run in join]),
            "donor_steps": [run["local_step"] for run in join],
        },
        "record_signing": signing,
    }
    rows = [
        ("Peer.start() joining a bootstrap", results["peer"]["seconds"]),
        ("GossipOptimizer(), first of its run", results["optimizer_first"]["seconds"]),
        ("GossipOptimizer() joining, with state", results["optimizer_join"]["seconds"]),
        ("  of which Peer.start()", results["optimizer_join"]["peer_start_seconds"]),
        ("  of which state download", results["optimizer_join"]["state_download_seconds"]),
    ]
    print(f"start-up, {args.repeats} runs each, seconds")
    print(f"{'':<40} {'median':>7} {'min':>7} {'max':>7}")
    for name, stats in rows:
        print(f"{name:<40} {stats['median']:>7.3f} {stats['min']:>7.3f} {stats['max']:>7.3f}")
    print(
        f"a membership record: signed and verified {signing['sign_and_verify_ms']:.3f} ms, "
        f"validated again {signing['validate_again_ms']:.4f} ms ({signing['records']} records)"
    )
    load_after = os.getloadavg()
    print(f"load average before/after: {load_before[0]:.2f}/{load_after[0]:.2f} on {os.cpu_count()} CPUs")
    report = {
        **run_info(interpreter_path=True),
        "repeats": args.repeats,
        "budget_seconds": 2.0,
        "results": results,
    }
    report["machine"].update(load_average_at_start=load_before, load_average_at_end=load_after)
    write_report(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
