"""Issue 5's measurement: how long a joiner takes to download the training state, on 127.0.0.1.

For each model, a donor ``GossipOptimizer`` (Adam, trained a few steps, so the state holds the
parameters and both Adam moments) serves its state, and ``--repeats`` joiners, one after the other,
each start a fresh ``GossipOptimizer`` that downloads it.  Reported per model: the state's size
(``torch.save`` bytes), the joiners' ``state_download_seconds`` (listing donors in the DHT, the
donor's snapshot and serialization, the transfer, checksum, ``torch.load`` and the copy into the
model; median, min, max) and the whole constructor's time (daemon start and DHT join included).

    python benchmarks/state_download.py                      # digits MLP and a ~40 MB state
    python benchmarks/state_download.py --repeats 10 --out benchmarks/results/state_download.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from harness import machine_info

from gossiptrain.optimizer import GossipOptimizer
from gossiptrain.state import serialize_state
from gossiptrain.tasks import digits_task

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def digits_mlp() -> torch.nn.Module:
    return digits_task().model


def wide_mlp() -> torch.nn.Module:
    """~3.4M parameters: 13.4 MB of float32, ~40 MB with Adam's two moments."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 1800), torch.nn.ReLU(), torch.nn.Linear(1800, 1800))


def measure(name: str, make_model, repeats: int, run_id: str) -> dict:
    donor_model = make_model()
    options = dict(run_id=run_id, host_maddrs=[LOOPBACK], average_every_steps=10**9)
    with GossipOptimizer(torch.optim.Adam(donor_model.parameters(), lr=1e-3), **options) as donor:
        for _ in range(3):
            donor.zero_grad()
            donor_model(torch.randn(8, 64)).square().mean().backward()
            donor.step()
        donor.report()
        state_bytes = len(serialize_state(donor._state_snapshot()))
        downloads, constructors = [], []
        for _ in range(repeats):
            model = make_model()
            started = time.perf_counter()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            with GossipOptimizer(optimizer, initial_peers=donor.maddrs(), **options) as joiner:
                constructors.append(time.perf_counter() - started)
                downloads.append(joiner.state_download_seconds)
                assert joiner.local_step == 3
    result = {
        "model": name,
        "params": sum(p.numel() for p in donor_model.parameters()),
        "state_bytes": state_bytes,
        "download_seconds": {"median": statistics.median(downloads), "min": min(downloads), "max": max(downloads)},
        "constructor_seconds_median": statistics.median(constructors),
        "throughput_MBps_median": state_bytes / 1e6 / statistics.median(downloads),
    }
    print(
        f"{name}: {result['params']} params, state {state_bytes / 1e6:.2f} MB, download median "
        f"{result['download_seconds']['median']:.3f}s (min {min(downloads):.3f}, max {max(downloads):.3f}), "
        f"{result['throughput_MBps_median']:.0f} MB/s; whole constructor {result['constructor_seconds_median']:.2f}s",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = [
        measure("digits-mlp", digits_mlp, args.repeats, "bench-state-digits"),
        measure("wide-mlp-40MB", wide_mlp, args.repeats, "bench-state-wide"),
    ]
    if args.out:
        machine = machine_info()
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "load_average": os.getloadavg(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
