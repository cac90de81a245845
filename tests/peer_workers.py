"""Functions that run inside spawned peer processes (importable by the children)."""

import asyncio

import torch

from gossiptrain.peer import Peer
from gossiptrain.testing import LOOPBACK


def average_rounds(
    initial_peers, run_id, seed, numel, weight, group_size, interval, num_peers, ready, go, start_round, rounds
):
    """Join, signal ready, wait for the parent's start round, then average ``rounds`` consecutive rounds."""
    torch.set_num_threads(1)

    async def main():
        async with Peer(
            run_id,
            initial_peers=initial_peers,
            host_maddrs=[LOOPBACK],
            target_group_size=group_size,
            round_interval=interval,
        ) as peer:
            await peer.wait_for_peers(num_peers, timeout=60)
            ready.put(peer.peer_id)
            await asyncio.get_running_loop().run_in_executor(None, go.wait, 120)
            values = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
            history = []
            for round_id in range(start_round.value, start_round.value + rounds):
                result = await peer.average(values, weight, round_id)
                values = result.averaged
                history.append({"status": result.status, "group": result.group, "errors": result.errors})
            return {"values": values, "history": history}

    return asyncio.run(main())
