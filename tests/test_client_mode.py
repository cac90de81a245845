"""Client mode: a peer that cannot be dialed (NAT, Colab) averages by dialing out, and no one dials it."""

import asyncio
import subprocess
import sys

import pytest
import torch

from gossiptrain.peer import Peer
from gossiptrain.rounds import Timeouts
from gossiptrain.testing import LOOPBACK
from tests.peer_workers import weighted_mean

FAST = Timeouts(matchmaking=2.0, join=1.5, part=1.0, result=3.0)
OPTIONS = dict(host_maddrs=[LOOPBACK], round_interval=0.5, timeouts=FAST)


@pytest.mark.timeout(180)
async def test_a_client_mode_peer_averages_with_three_peers_and_is_never_dialed():
    async with Peer("client-ok", **OPTIONS) as first:
        initial_peers = await first.maddrs()
        async with (
            Peer("client-ok", initial_peers=initial_peers, **OPTIONS) as second,
            Peer("client-ok", initial_peers=initial_peers, **OPTIONS) as third,
            Peer("client-ok", initial_peers=initial_peers, client_mode=True, **OPTIONS) as client,
        ):
            assert await client.maddrs() == []  # it listens nowhere: there is nothing to dial
            _, listening = await client.p2p._client.identify()
            assert not listening
            for peer in (first, second, third):  # nor is it a DHT server that others would query
                assert client.p2p.peer_id not in peer.dht.protocol.routing_table
            peers, weights = [first, second, third, client], [1.0, 2.0, 3.0, 10.0]
            await client.wait_for_peers(4, timeout=30)
            inputs = torch.randn(4, 10_000, generator=torch.Generator().manual_seed(0))
            values, history = list(inputs), []
            for _ in range(3):
                round_id = first.next_round_id(lead=0.5)
                results = await asyncio.gather(
                    *(peer.average(v, w, round_id) for peer, v, w in zip(peers, values, weights))
                )
                history.append(results)
                values = [result.averaged for result in results]
    expected = weighted_mean(inputs, weights)
    for results in history:
        for result in results:
            assert result.status == "averaged" and result.group_size == 4, result
            assert (result.averaged - expected).abs().max().item() < 1e-5
        assert len(results[-1].combined) == 3  # the client holds the three reducers' shards, none of its own
    for peer in (first, second, third):
        assert not peer.rejections
        assert peer.inbound_streams >= 3 * 3  # every round, the three others sent it their slices
    assert client.inbound_streams == 0 and not client.rejections


@pytest.mark.timeout(120)
async def test_a_group_of_clients_only_fails_the_round_cleanly():
    async with Peer("clients-only", **OPTIONS) as server:
        options = dict(initial_peers=await server.maddrs(), client_mode=True, **OPTIONS)
        async with Peer("clients-only", **options) as one, Peer("clients-only", **options) as two:
            round_id = one.next_round_id(lead=0.5)
            results = await asyncio.gather(
                one.average(torch.zeros(100), 1.0, round_id), two.average(torch.ones(100), 1.0, round_id)
            )
    for result, own in zip(results, (0.0, 1.0)):
        assert result.status == "failed" and "client mode" in result.errors[0]
        assert torch.equal(result.averaged, torch.full((100,), own))


@pytest.mark.timeout(60)
def test_a_client_mode_peer_needs_initial_peers():
    with pytest.raises(ValueError, match="initial_peers"):
        Peer("lonely", client_mode=True)
    process = subprocess.run(
        [sys.executable, "-m", "gossiptrain", "peer", "--client-mode"], capture_output=True, text=True, timeout=60
    )
    assert process.returncode != 0 and "client-mode peer needs initial_peers" in process.stderr
