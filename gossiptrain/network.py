"""Where a peer's bytes move and its records live: two small interfaces, and the live implementation of both.

A ``Peer`` needs a ``Transport`` (binary streams to other peers, by peer id and protocol) and a
``membership.RecordStore`` (the DHT's dictionaries of records with expirations).  Live peers get them from
``LibP2PNetwork``: hivemind's libp2p daemon (``P2P``) and DHT node (``DHTNode``).  The simulator
(``gossiptrain.simnet``) gives them from an in-memory network in virtual time.  Everything above these two
interfaces (membership, matchmaking, the exchange, state download, the clock) is the same code in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol

import varint
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from gossiptrain.auth import Identity
from gossiptrain.errors import DaemonStartError, InitialPeersError
from gossiptrain.membership import RecordStore, SignedRecords

# What a relaying peer gives the peers behind a NAT that reserve a slot on it (p2pd's flags): circuits per peer,
# bytes each way per relayed connection (then it is reset, and dialed again), a connection's lifetime.
RELAY_LIMITS = {"relayMaxCircuits": 16, "relayDataLimit": 1 << 30, "relayTimeLimit": "30m"}
DHT_SERVER_MIN_MBIT = 10.0  # a peer that declares a slower link is a DHT client (``LibP2PNetwork``)
# Kademlia's k, the nodes a lookup keeps at each step and a routing bucket holds: with hivemind's 20, every store and
# every read of a swarm of tens of peers visits 20 nodes, each answering with 20 peer ids, and those lookups were half
# of a live peer's busy CPU (py-spy on one of ``benchmarks/scale.py``'s 32 peers); records still go to 5 replicas
DHT_BUCKET = 8
DAEMON_EXIT_WAIT = 2.0  # seconds a daemon that gave up at start gets to exit by itself before it is terminated

StreamHandler = Callable[[Any, asyncio.StreamReader, Any], Awaitable[None]]


class Transport(Protocol):
    """Binary streams between peers (the subset of ``hivemind.p2p.P2P`` that gossiptrain uses, plus dialing).

    ``call_binary_stream_handler`` raises ``P2PDaemonError`` (or ``OSError``) when the peer cannot be reached.
    """

    peer_id: PeerID

    async def add_binary_stream_handler(self, protocol: str, handler: StreamHandler) -> None: ...

    async def remove_binary_stream_handler(self, protocol: str) -> None: ...

    async def call_binary_stream_handler(self, peer_id: PeerID, protocol: str) -> tuple[Any, Any, Any]: ...

    async def get_visible_maddrs(self) -> list[Multiaddr]: ...

    async def connected_peers(self) -> set[str]:
        """The peers this transport holds a connection to."""

    async def connect(self, peer: str, maddrs: Sequence[str]) -> None:
        """Open a connection to ``peer`` at ``maddrs`` (client mode dials the peers it sends to)."""

    async def shutdown(self) -> None: ...


class Network(Protocol):
    """What a ``Peer`` starts on: its identity (None: the peer loads or makes one), the clock that record
    expirations are in, and ``start`` giving the transport and record store of that identity."""

    identity: Identity | None

    def record_time(self) -> float: ...

    async def start(
        self, identity: Identity, identity_path: str | os.PathLike | None
    ) -> tuple[Transport, RecordStore]: ...


def _is_loopback(maddr: str) -> bool:
    return maddr.startswith(("/ip4/127.", "/ip6/::1/", "/dns4/localhost/", "/dns/localhost/"))


def dialable_first(maddrs: Sequence[str]) -> list[str]:
    """``maddrs`` with the addresses another machine can dial (not loopback) first, order otherwise kept."""
    return sorted(maddrs, key=_is_loopback)


def circuit_maddrs(relays: Sequence[str]) -> list[str]:
    """The addresses at which a peer behind a NAT is reached through ``relays`` (multiaddrs ending in
    ``/p2p/<relay id>``): libp2p circuit relay v2, ``<relay>/p2p-circuit``; relays given without an id are skipped."""
    return [f"{relay}/p2p-circuit" for relay in relays if "/p2p/" in relay]


def daemon_maddr(maddr: str) -> Multiaddr:
    """``maddr`` encoded as the libp2p daemon reads it.

    hivemind's multiaddr writes a ``/p2p/<id>`` part as a CID, which the daemon's Go multiaddr reads as a
    multihash and refuses ("length greater than remaining number of bytes"): a relay's circuit address
    (``.../p2p/<relay id>/p2p-circuit``) needs its id as the bare multihash.
    """
    encoded = b""
    for protocol, value in Multiaddr(maddr).items():
        if protocol.name == "p2p":
            multihash = PeerID.from_base58(value).to_bytes()
            encoded += varint.encode(protocol.code) + varint.encode(len(multihash)) + multihash
        else:
            encoded += Multiaddr(f"/{protocol.name}" + ("" if value is None else f"/{value}")).to_bytes()
    return Multiaddr(encoded)


class LibP2PTransport(P2P):
    """hivemind's ``P2P`` (a libp2p daemon), with the two calls ``Transport`` adds."""

    async def connected_peers(self) -> set[str]:
        return {info.peer_id.to_base58() for info in await self.list_peers()}

    async def connect(self, peer: str, maddrs: Sequence[str]) -> None:
        await self._client.connect(PeerID.from_base58(peer), [daemon_maddr(m) for m in maddrs])


async def start_daemon(
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] | None = None,
    daemon_flags: dict[str, Any] | None = None,
    **options,
) -> LibP2PTransport:
    """Start a libp2p daemon (hivemind's ``P2P.create`` with ``options``) that dials ``initial_peers``;
    ``daemon_flags`` are more of p2pd's command-line flags (``{"relayService": False}``), which ``P2P.create``
    does not take.

    Raises:
        InitialPeersError: none of ``initial_peers`` answered (the message names them and what to check).
        DaemonStartError: the daemon failed otherwise, e.g. on an address in ``host_maddrs`` it cannot bind.

    A start that fails (or is cancelled) stops its daemon and waits for it to exit before it raises: p2pd closes
    its output a moment before it exits, and hivemind raises at the end of the output, so the daemon would
    otherwise exit after a short-lived caller's event loop closed (asyncio then warns ``Loop ... that handles
    pid ... is closed`` after the caller's answer).
    """
    building: list[P2P] = []

    class OwnedP2P(LibP2PTransport):  # hivemind's P2P.create builds it; we keep it, to stop its daemon if create raises
        def __init__(self):
            super().__init__()
            building.append(self)

        def _make_process_args(self, *args, **kwargs) -> list[str]:
            return super()._make_process_args(*args, **kwargs, **(daemon_flags or {}))

    try:
        try:
            return await OwnedP2P.create(
                initial_peers=list(initial_peers),
                host_maddrs=list(host_maddrs),
                announce_maddrs=announce_maddrs,
                **options,
            )
        except BaseException as e:
            for p2p in building:
                child = p2p._child
                if isinstance(e, P2PDaemonError) and child is not None:  # it gave up: let it exit by itself, as
                    # terminating a child that just exited reaps it behind asyncio's back ("Unknown child process")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(child.wait()), DAEMON_EXIT_WAIT)
                await asyncio.shield(p2p.shutdown())
            raise
    except P2PDaemonError as e:
        if initial_peers and "bootstrap" in str(e):
            raise InitialPeersError(
                f"no peer answered at {', '.join(initial_peers)}: is the address right "
                f"(it ends with /p2p/<peer id>) and is that peer running and reachable from here?"
            ) from None
        raise DaemonStartError(
            f"the libp2p daemon (p2pd) failed to start: {e}; check that host_maddrs {list(host_maddrs)} "
            f"are addresses of this machine with free ports (or port 0), and announce_maddrs "
            f"{announce_maddrs} name explicit ports"
        ) from e


@contextlib.contextmanager
def _identity_file(identity: Identity, path: str | os.PathLike | None) -> Iterator[str]:
    """A file holding ``identity`` for the daemon to read at start: ``path`` itself, or a private temporary one."""
    if path is not None:
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="gossiptrain-identity-") as folder:
        identity.save(os.path.join(folder, "identity.key"))
        yield os.path.join(folder, "identity.key")


class LibP2PNetwork:
    """The live network: a libp2p daemon listening on ``host_maddrs`` and a hivemind DHT node on it, whose
    records are signed (``membership.SignedRecords``).  See ``Peer`` for the arguments.

    A peer that declares a link slower than ``DHT_SERVER_MIN_MBIT`` (``slow_link``) and has initial peers is a DHT
    client: as a DHT node it would hold the round records the others store and read, and its late answers would hold
    their registrations and reads (rounds failed with "could not read the round's participants").

    Reaching peers behind a NAT (libp2p circuit relay v2, p2pd's own): a peer ``behind_nat`` reserves a slot on
    its initial peers' relays (they are its trusted relays; reachability forced private, so that it does not wait
    for AutoNAT) and is a DHT client (DHT requests through a relay would load it for everyone).  A reachable peer
    with ``relay`` serves as a relay within p2pd's bounds (``RELAY_LIMITS``) and declares itself public, since
    p2pd runs the relay service only for a public peer and AutoNAT needs several peers to decide.  Connections a
    peer behind a NAT opens itself are direct; p2pd (AutoNAT on) also tries hole punching (DCUtR) on relayed ones,
    and where that fails their traffic stays relayed.
    """

    identity = None

    def __init__(
        self,
        initial_peers: Sequence[str],
        host_maddrs: Sequence[str],
        announce_maddrs: Sequence[str] | None,
        client_mode: bool,
        behind_nat: bool = False,
        relay: bool = True,
        slow_link: bool = False,
    ):
        if behind_nat and client_mode:
            raise ValueError("a peer is in client mode (it dials out only) or behind_nat (reached through a relay)")
        if behind_nat and not circuit_maddrs(initial_peers):
            raise ValueError(
                "a peer behind a NAT is reached through its initial peers' relays: give initial_peers with their "
                "/p2p/<peer id>"
            )
        self.initial_peers, self.host_maddrs = list(initial_peers), list(host_maddrs)
        self.announce_maddrs, self.client_mode = announce_maddrs, client_mode
        self.behind_nat, self.relay = behind_nat, relay
        # who serves the DHT: not a client, not a peer reached through a relay (DHT requests through it would load
        # it for everyone), not a slow link that has initial peers to serve the DHT instead
        self.dht_client = client_mode or behind_nat or (slow_link and bool(self.initial_peers))

    @staticmethod
    def record_time() -> float:
        return get_dht_time()

    def daemon_options(self) -> dict[str, Any]:
        """What ``start_daemon`` gets besides the addresses: how this peer is reached and whether it relays."""
        if self.behind_nat:
            options = {"use_auto_relay": True, "force_reachability": "private", "trusted_relays": self.initial_peers}
        elif self.relay and not self.client_mode:
            options = {"force_reachability": "public"}
        else:
            options = {}
        relaying = self.relay and not (self.client_mode or self.behind_nat)
        flags = {"relayService": relaying, **(RELAY_LIMITS if relaying else {})}
        if self.behind_nat:  # with discovery (p2pd's default) the daemon ignores -trustedRelays and reserved nothing
            flags["relayDiscovery"] = False
        return {**options, "no_listen": self.client_mode, "daemon_flags": flags}

    async def start(
        self, identity: Identity, identity_path: str | os.PathLike | None
    ) -> tuple[LibP2PTransport, DHTNode]:
        """Start the daemon and the DHT node; on failure nothing is left running."""
        with _identity_file(identity, identity_path) as path:
            p2p = await start_daemon(
                self.initial_peers,
                self.host_maddrs,
                self.announce_maddrs,
                identity_path=path,
                check_if_identity_free=False,  # hivemind's check reads RSA identities only
                **self.daemon_options(),
            )
        try:
            dht = await DHTNode.create(
                p2p=p2p,
                initial_peers=self.initial_peers,
                bucket_size=DHT_BUCKET,
                client_mode=self.dht_client,
                record_validator=SignedRecords(identity),
            )
        except BaseException:
            await p2p.shutdown()
            raise
        return p2p, dht
