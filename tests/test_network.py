"""How a live peer starts its libp2p daemon: reached through relays behind a NAT, relaying for others otherwise."""

import pytest
from hivemind.p2p import PeerID

from gossiptrain.network import RELAY_LIMITS, LibP2PNetwork, circuit_maddrs, daemon_maddr
from gossiptrain.peer import Peer

RELAY_ID = "12D3KooWRfJDxRgWEy5qgkgZ6DfgjjmfRuxf1knxVE9pP5a3tqiC"
RELAY = f"/ip4/203.0.113.7/tcp/31337/p2p/{RELAY_ID}"


def test_a_circuit_address_reaches_the_daemon_with_the_relay_s_id_as_a_bare_multihash():
    [circuit] = circuit_maddrs([RELAY, "/ip4/203.0.113.8/tcp/1"])  # an address without an id names no relay
    encoded = daemon_maddr(circuit).to_bytes()
    multihash = PeerID.from_base58(RELAY_ID).to_bytes()
    # /ip4 (04) 203.0.113.7, /tcp (06) 31337, /p2p (a5 03) <length> <multihash>, /p2p-circuit (a2 02)
    prefix = bytes.fromhex("04cb00710706" + "7a69" + "a503")
    assert encoded == prefix + bytes([len(multihash)]) + multihash + b"\xa2\x02"
    assert daemon_maddr("/ip4/10.0.0.1/tcp/5").to_bytes() == bytes.fromhex("040a00000106" + "0005")


def test_a_peer_behind_nat_reserves_on_its_initial_peers_and_only_reachable_peers_relay():
    nated = LibP2PNetwork([RELAY], [], None, client_mode=False, behind_nat=True).daemon_options()
    assert nated["use_auto_relay"] and nated["force_reachability"] == "private"
    assert nated["trusted_relays"] == [RELAY]
    assert nated["daemon_flags"] == {"relayService": False, "relayDiscovery": False}, "static relays: no 3 min wait"
    reachable = LibP2PNetwork([], [], None, client_mode=False).daemon_options()
    assert reachable["force_reachability"] == "public"  # p2pd runs its relay service only for a public peer
    assert reachable["daemon_flags"] == {"relayService": True, **RELAY_LIMITS}
    client = LibP2PNetwork([RELAY], [], None, client_mode=True)
    for network in (client, LibP2PNetwork([], [], None, client_mode=False, relay=False)):
        assert network.daemon_options()["daemon_flags"] == {"relayService": False}


def test_a_peer_behind_nat_needs_initial_peers_with_ids_and_is_not_also_a_client():
    with pytest.raises(ValueError, match="initial peers' relays"):
        Peer("run", behind_nat=True)  # no initial peer: no relay
    with pytest.raises(ValueError, match="client mode"):
        Peer("run", initial_peers=[RELAY], behind_nat=True, client_mode=True)


def test_a_peer_that_declares_a_slow_link_serves_no_dht_records_when_others_can():
    """Its late answers would hold every peer's registrations and reads of the round records it stores."""
    assert Peer("run", initial_peers=[RELAY], bandwidth_mbit=1.0).network.dht_client
    assert not Peer("run", initial_peers=[RELAY], bandwidth_mbit=50.0).network.dht_client
    assert not Peer("run", initial_peers=[RELAY]).network.dht_client, "undeclared: a DHT server"
    assert not Peer("run", bandwidth_mbit=1.0).network.dht_client, "the first peer serves the DHT, slow or not"
    assert Peer("run", initial_peers=[RELAY], behind_nat=True).network.dht_client
