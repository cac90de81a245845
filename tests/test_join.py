"""Joining: reachable on the LAN by default, a dialable join command, start-up time, daemon failures."""

import ipaddress
import subprocess
import sys

import psutil
import pytest
import torch

from gossiptrain.errors import DaemonStartError
from gossiptrain.network import dialable_first
from gossiptrain.optimizer import GossipOptimizer
from gossiptrain.peer import Peer
from gossiptrain.testing import LOOPBACK, LocalSwarm

UNBINDABLE = "/ip4/203.0.113.1/tcp/0"  # TEST-NET-3: an address of no interface of this machine


def startup_budget() -> float:
    """A bound that only a hang breaks: start-up takes about 2 s (how long exactly: benchmarks/startup.py), and
    on a loaded machine the daemon's process start and handshakes queue for a core."""
    return 60.0


def lan_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses."""
    return [
        a.address
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback
    ]


needs_lan = pytest.mark.skipif(not lan_addresses(), reason="this machine has no non-loopback IPv4 address")


def test_dialable_addresses_come_first():
    loopback, lan = "/ip4/127.0.0.1/tcp/1/p2p/Qm", "/ip4/192.0.2.2/tcp/1/p2p/Qm"
    assert dialable_first([loopback, lan]) == [lan, loopback]
    assert dialable_first(["/ip6/::1/tcp/1", lan]) == [lan, "/ip6/::1/tcp/1"]


@needs_lan
@pytest.mark.timeout(120)
async def test_a_peer_listens_on_every_interface_by_default_and_is_joined_through_its_lan_address():
    async with Peer("lan") as first:
        maddrs = await first.maddrs()
        assert any(address in maddrs[0] for address in lan_addresses()), maddrs
        assert any("/ip4/127.0.0.1/" in m for m in maddrs)  # this machine can still use loopback
        async with Peer("lan", initial_peers=maddrs[:1], host_maddrs=[LOOPBACK]) as second:
            assert len(await second.wait_for_peers(2, timeout=30)) == 2
            assert second.startup_seconds < startup_budget(), second.startup_seconds
            assert first.startup_seconds < startup_budget(), first.startup_seconds


@needs_lan
@pytest.mark.timeout(180)
def test_the_cli_prints_a_join_command_another_machine_can_dial_and_status_shows_start_up():
    with LocalSwarm() as swarm:
        _, bootstrap = swarm.run_cli("bootstrap")  # default --host-maddrs: every interface
        line = bootstrap.wait_for(lambda text: text.startswith("peers join with:"), timeout=60)
        address = line.split("--initial-peers ")[1]
        assert any(f"/ip4/{ip}/" in address for ip in lan_addresses()), line
        _, peer = swarm.run_cli("peer", "--run-id", "lan-cli", "--initial-peers", address)
        joined = peer.wait_for(lambda text: "joined run" in text, timeout=60)
        assert "ready in" in joined
        command = peer.wait_for(lambda text: "gossiptrain peer --run-id lan-cli --initial-peers" in text, timeout=10)
        assert any(f"/ip4/{ip}/" in command for ip in lan_addresses()), command
        status = subprocess.run(
            [sys.executable, "-m", "gossiptrain", "status", "--run-id", "lan-cli", "--initial-peers", address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "1 live peers" in status.stdout and "startup" in status.stdout, status.stdout + status.stderr
        [row] = [text for text in status.stdout.splitlines() if text.startswith("12D3KooW")]
        assert row.split()[-2].endswith("s") and float(row.split()[-2][:-1]) < 10


@pytest.mark.timeout(120)
def test_a_gossip_optimizer_is_ready_within_two_seconds_and_says_so():
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        model = torch.nn.Linear(64, 10)
        with GossipOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            run_id="startup",
            initial_peers=swarm.initial_peers,
            host_maddrs=[LOOPBACK],
        ) as optimizer:
            assert optimizer.peer.startup_seconds <= optimizer.startup_seconds < startup_budget()
            [record] = optimizer.live_peers().values()
            assert record["startup_seconds"] == round(optimizer.startup_seconds, 3)


@pytest.mark.timeout(60)
async def test_an_address_that_cannot_be_bound_fails_with_a_message_saying_what_to_check():
    with pytest.raises(DaemonStartError, match="cannot assign requested address.*check that host_maddrs"):
        await Peer("bad-host", host_maddrs=[UNBINDABLE]).start()
    process = subprocess.run(
        [sys.executable, "-m", "gossiptrain", "peer", "--host-maddrs", UNBINDABLE],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert process.returncode != 0
    assert UNBINDABLE in process.stderr and "failed to start" in process.stderr and "Traceback" not in process.stderr
