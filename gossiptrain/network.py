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

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from gossiptrain.auth import Identity
from gossiptrain.errors import DaemonStartError, InitialPeersError
from gossiptrain.membership import RecordStore, SignedRecords

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


class LibP2PTransport(P2P):
    """hivemind's ``P2P`` (a libp2p daemon), with the two calls ``Transport`` adds."""

    async def connected_peers(self) -> set[str]:
        return {info.peer_id.to_base58() for info in await self.list_peers()}

    async def connect(self, peer: str, maddrs: Sequence[str]) -> None:
        await self._client.connect(PeerID.from_base58(peer), [Multiaddr(m) for m in maddrs])


async def start_daemon(
    initial_peers: Sequence[str], host_maddrs: Sequence[str], announce_maddrs: Sequence[str] | None = None, **options
) -> LibP2PTransport:
    """Start a libp2p daemon (hivemind's ``P2P.create`` with ``options``) that dials ``initial_peers``.

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
    records are signed (``membership.SignedRecords``).  See ``Peer`` for the arguments."""

    identity = None

    def __init__(
        self,
        initial_peers: Sequence[str],
        host_maddrs: Sequence[str],
        announce_maddrs: Sequence[str] | None,
        client_mode: bool,
    ):
        self.initial_peers, self.host_maddrs = list(initial_peers), list(host_maddrs)
        self.announce_maddrs, self.client_mode = announce_maddrs, client_mode

    @staticmethod
    def record_time() -> float:
        return get_dht_time()

    async def start(
        self, identity: Identity, identity_path: str | os.PathLike | None
    ) -> tuple[LibP2PTransport, DHTNode]:
        """Start the daemon and the DHT node; on failure nothing is left running."""
        with _identity_file(identity, identity_path) as path:
            p2p = await start_daemon(
                self.initial_peers,
                self.host_maddrs,
                self.announce_maddrs,
                no_listen=self.client_mode,
                identity_path=path,
                check_if_identity_free=False,  # hivemind's check reads RSA identities only
            )
        try:
            dht = await DHTNode.create(
                p2p=p2p,
                initial_peers=self.initial_peers,
                client_mode=self.client_mode,
                record_validator=SignedRecords(identity),
            )
        except BaseException:
            await p2p.shutdown()
            raise
        return p2p, dht
