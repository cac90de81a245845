"""Peer: the asyncio core.  Owns its transport and DHT records (``network``: a libp2p daemon and a hivemind DHT
node, or the simulator's), its membership, and the rounds.

Rounds are time slots: round ``r`` starts at ``r * round_interval`` seconds of DHT time (wall
clock).  A peer that wants to average registers for the next slot in the DHT, reads the slot's
participants when it starts, computes its group (``matchmaking``) and runs the exchange
(``exchange``).  No peer leads; every wait is bounded by ``Timeouts``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, MutableSet, Sequence
from typing import Any

import torch
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from gossiptrain import matchmaking, sketches
from gossiptrain.addresses import malformed_initial_peer
from gossiptrain.allreduce import DEFAULT_DEFENCES, VECTOR, Defences
from gossiptrain.assembly import (
    MAX_CANDIDATES,
    CellAssembly,
    LateJoin,
    Redirect,
    Role,
    join_leader,
    parse_plan,
    serve_join,
)
from gossiptrain.auth import Admission, Certificate, CredentialError, Identity
from gossiptrain.clock import SwarmClock, clock_protocol
from gossiptrain.codecs import Codec, get_codec
from gossiptrain.errors import ModelMismatchError
from gossiptrain.exchange import RoundExchange
from gossiptrain.gate import CredentialGate
from gossiptrain.membership import Membership, RecordStore
from gossiptrain.network import (
    DHT_SERVER_MIN_MBIT,
    LibP2PNetwork,
    Network,
    Transport,
    circuit_maddrs,
    dialable_first,
)
from gossiptrain.progress import show_progress
from gossiptrain.rejections import EXCHANGE_ERRORS, Rejections, classify
from gossiptrain.rounds import RoundResult, Timeouts
from gossiptrain.state import StateProvider, StateServer, state_protocol
from gossiptrain.timing import RoundTiming
from gossiptrain.transport import (
    ByteCounter,
    FrameKind,
    ProtocolError,
    close_after_peer,
    read_message,
    write_message,
)

logger = logging.getLogger(__name__)


ALL_INTERFACES = "/ip4/0.0.0.0/tcp/0"
# seconds a membership record lives without refresh, at least (``Peer``'s heartbeat_ttl): the refreshes, every third of
# it, are most of an idle peer's CPU and DHT traffic (its own stores and the others' it serves), so tens of peers on a
# few cores need it long; rounds do not read these records (they register per round)
MIN_HEARTBEAT_TTL = 30.0
WAIT_POLL = 0.2, 2.0  # seconds between reads of ``wait_for_peers``: the first, doubling to the last
CLOCK_REFRESH = 30.0  # seconds between estimates of the swarm's clock
CLOCK_PEERS = 5  # live peers asked for their time per estimate
VOUCH_ROUNDS = 8  # a round record vouches for the peers that answered us in our last this many rounds
MAX_CAUGHT = 1024  # peers caught beyond any honest values that a peer remembers (``RecentSet``)


def _checked_maddr(text: str) -> str:
    """``text`` if hivemind parses it as a multiaddr naming its peer; else ``malformed_initial_peer``'s ValueError."""
    try:
        complete = "p2p" in Multiaddr(text)
    except Exception:
        complete = False
    if not complete:
        raise malformed_initial_peer(text)
    return text


def _load_credential(credential: Certificate | str | os.PathLike | None) -> Certificate | None:
    if credential is None or isinstance(credential, Certificate):
        return credential
    try:
        return Certificate.load(credential)
    except OSError as e:
        raise CredentialError(f"cannot read the certificate file {os.fspath(credential)!r}: {e.strerror}") from None


class RecentSet(MutableSet[str]):
    """A set of at most ``capacity`` members: adding one more forgets the one least recently added or found.

    For ``Peer.caught``: a caught peer that goes on sending, or whose mean we go on reading, is found in
    it at each try and so stays; only one that has not been in our groups for longest is forgotten, and
    caught again at its first oversized contribution if it ever comes back.  Pushing a caught peer out
    takes ``capacity`` other peers each caught in a group with us.
    """

    def __init__(self, capacity: int, members: Iterable[str] = ()):
        self.capacity, self._members = capacity, collections.OrderedDict[str, None]()
        self.update(members)

    def __contains__(self, member: object) -> bool:
        if member not in self._members:
            return False
        self._members.move_to_end(member)
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._members))

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        return f"RecentSet({self.capacity}, {list(self._members)!r})"

    def add(self, member: str) -> None:
        self._members[member] = None
        self._members.move_to_end(member)
        while len(self._members) > self.capacity:
            self._members.popitem(last=False)

    def discard(self, member: str) -> None:
        self._members.pop(member, None)

    def update(self, members: Iterable[str]) -> None:
        for member in members:
            self.add(member)


class Peer:
    """A member of a gossiptrain swarm, used as ``async with Peer(...) as peer``.

    Args:
        run_id: name of the training run; peers of different runs never average together.
        initial_peers: multiaddrs of any live peers of the swarm (empty for the first peer).
        host_maddrs: where to listen for other peers; by default every interface (a random TCP port),
            so that other machines on the LAN can dial this peer.  Tests pass ``/ip4/127.0.0.1/tcp/0``.
        announce_maddrs: addresses to tell others, if they differ from what this peer sees of itself:
            behind a NAT with a forwarded port, announce ``/ip4/<public ip>/tcp/<forwarded port>``
            (with ``host_maddrs`` ``/ip4/0.0.0.0/tcp/<that port>``; port 0 cannot be announced).
        target_group_size: peers per averaging group.
        round_interval: seconds between round slots.
        codec: name of the codec used on the wire.
        timeouts: bounds on every network wait of a round.
        client_mode: for a peer that cannot accept inbound connections (behind a NAT or firewall, in
            Colab): it listens on no address at all (libp2p ``no_listen``), is a DHT client only, reduces
            no shard and serves no state, and takes part in averaging by dialing out: it sends its
            slices to the group's reducers and receives their means on the same streams.  No relay is
            needed for that; what is needed is that the *other* peers are reachable from it (a public
            address, a forwarded port, or the same LAN).  A relay (libp2p circuit relay, hivemind's
            ``use_auto_relay``) would only be needed to make a NATed peer *dialable*, which client mode
            avoids.  A group whose members are all clients cannot average (no one reduces): it reports
            ``failed``; a swarm needs at least one reachable peer per group, in practice a few.
        behind_nat: for a peer that cannot be dialed but should take a full part (reduce shards, lead, serve
            state): it is reached through its initial peers, as libp2p circuit relays (``network.LibP2PNetwork``),
            whose circuit addresses its records publish; peers dial it there before a round's streams.  What does
            not go over connections it opened itself (or that hole punching made direct) crosses the relay; direct
            peers are preferred as leaders and state donors.  It becomes reachable once its relay reservation is
            made (seconds after start): rounds before that leave its shard out at the straggler deadline.
        relay: a reachable peer relays for peers behind a NAT that use it as an initial peer (within
            ``network.RELAY_LIMITS``); False refuses.
        model_schema: a string that names the model's shapes; peers whose schemas differ are refused.
        heartbeat_ttl: seconds a membership record lives without refresh (it is refreshed every third of
            that); None: the longer of ``MIN_HEARTBEAT_TTL`` and one slot.  What reads the records (state
            donors, the clock, credentials) needs them once a slot at most, so with long slots (outer mode)
            a longer ttl saves the traffic of refreshes nobody reads.  A crashed
            peer's record outlives it by up to this long: a joiner that picks it as a donor drops it.
        clock: this machine's clock (seconds since the epoch); slots run on the swarm's median clock,
            estimated against live peers at start and every ``CLOCK_REFRESH`` seconds (``gossiptrain.clock``).
        bandwidth_mbit: this peer's link speed, if known: groups then give it a shard in proportion to it,
            and none at all if it is far slower than the others (``allreduce.GroupPlan``); below
            ``network.DHT_SERVER_MIN_MBIT`` it is a DHT client, off the path of the others' registrations and reads.
            Without it, a slow peer is still bounded by the straggler deadline (``Timeouts.straggler_grace``).
        defences: robust averaging against hostile group members (``allreduce.Defences``, on by default);
            ``Defences.off()`` takes plain weighted means.
        identity_path: this peer's libp2p identity file (``gossiptrain.auth.Identity``; created there if missing),
            so that its peer id persists across restarts; None for a new identity every start.
        network: where this peer's streams and records go: None for the live network (a libp2p daemon and a
            hivemind DHT node, ``network.LibP2PNetwork``, built from the addresses above); the simulator passes
            one port of its ``simnet.SimulatedNetwork``.
        credential: for a private run, this peer's certificate (a ``gossiptrain.auth.Certificate`` or the path of
            its file), issued by the run's authority for the peer id of ``identity_path``.  The peer then admits
            only peers with a certificate of the same authority: it leaves every other peer's membership and
            round records out of its view and refuses their streams (averaging, state download, clock), each
            refusal counted in ``rejections`` (``uncredentialed_<kind>``), the first per peer and kind logged.
            None for an open run.
    """

    exchange_class = RoundExchange  # gossiptrain.testing swaps in a misbehaving one
    state_server_class = StateServer  # likewise

    def __init__(
        self,
        run_id: str,
        *,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = (ALL_INTERFACES,),
        announce_maddrs: Sequence[str] | None = None,
        target_group_size: int = 4,
        round_interval: float = 1.0,
        codec: str = "none",
        timeouts: Timeouts | None = None,
        client_mode: bool = False,
        behind_nat: bool = False,
        relay: bool = True,
        model_schema: str | None = None,
        heartbeat_ttl: float | None = None,
        clock: Callable[[], float] = get_dht_time,
        bandwidth_mbit: float | None = None,
        identity_path: str | os.PathLike | None = None,
        credential: Certificate | str | os.PathLike | None = None,
        defences: Defences = DEFAULT_DEFENCES,
        network: Network | None = None,
    ):
        if bandwidth_mbit is not None and not (math.isfinite(bandwidth_mbit) and bandwidth_mbit > 0):
            raise ValueError(f"bandwidth_mbit must be a positive number of Mbit/s, got {bandwidth_mbit!r}")
        if not (isinstance(round_interval, (int, float)) and 0 < round_interval < math.inf):
            raise ValueError(f"round_interval must be a positive number of seconds, got {round_interval!r}")
        if not (isinstance(target_group_size, int) and target_group_size >= 1):
            raise ValueError(f"target_group_size must be a whole number >= 1, got {target_group_size!r}")
        if heartbeat_ttl is not None and not (isinstance(heartbeat_ttl, (int, float)) and 0 < heartbeat_ttl < math.inf):
            raise ValueError(f"heartbeat_ttl must be a positive number of seconds or None, got {heartbeat_ttl!r}")
        if not run_id or "." in run_id:
            raise ValueError(f"run_id must be a non-empty name without dots, got {run_id!r}")
        self.run_id, self.initial_peers = run_id, [_checked_maddr(str(m)) for m in initial_peers]
        if client_mode and not self.initial_peers:
            raise ValueError("a client-mode peer needs initial_peers: no one can dial it, so it can only join others")
        self.host_maddrs, self.announce_maddrs = list(host_maddrs), announce_maddrs
        slow_link = bandwidth_mbit is not None and bandwidth_mbit < DHT_SERVER_MIN_MBIT
        self.network = network or LibP2PNetwork(
            self.initial_peers, self.host_maddrs, announce_maddrs, client_mode, behind_nat, relay, slow_link
        )
        self.behind_nat = behind_nat
        self.target_group_size, self.round_interval = target_group_size, round_interval
        self.codec, self.timeouts, self.client_mode = get_codec(codec), timeouts or Timeouts(), client_mode
        self.model_schema, self.bandwidth_mbit = model_schema, bandwidth_mbit
        self.heartbeat_ttl = heartbeat_ttl if heartbeat_ttl is not None else max(MIN_HEARTBEAT_TTL, round_interval)
        self.clock = SwarmClock(clock)
        self.defences = defences
        self.timing = RoundTiming()
        self.identity_path, self.credential = identity_path, _load_credential(credential)
        if self.credential is not None and identity_path is None:
            raise CredentialError(
                f"a credential admits one peer id ({self.credential.peer_id}): pass identity_path (--identity), the "
                f"identity file it was issued for"
            )
        self.identity: Identity | None = None  # loaded or created by start()
        self.admission = None if self.credential is None else Admission(run_id, self.credential.authority)
        self.protocol = f"gossiptrain.{run_id}.allreduce"
        self.assembly_protocol = f"gossiptrain.{run_id}.assemble"
        self.info: dict[str, Any] = {}
        self.p2p: Transport | None = None
        self.dht: RecordStore | None = None
        self.membership: Membership | None = None
        self._heartbeat: asyncio.Task | None = None
        self._clock_refresh: asyncio.Task | None = None
        self._exchanges: dict[int, asyncio.Future[RoundExchange | None]] = {}
        self._roles: dict[int, Role] = {}  # what we are in the cells of current rounds (``assembly``)
        self.rejections = Rejections()
        self.gate = None
        if self.admission is not None:  # its lookups read the members' records, where the certificates are
            read = lambda peer: self.membership.shard_of(peer)  # noqa: E731
            self.gate = CredentialGate(self.admission, run_id, self.rejections, self.timeouts, read)
        self.state_server: StateServer | None = None
        self.startup_seconds: float | None = None  # from start() to ready to average
        self.inbound_streams = 0  # allreduce streams opened to us by other peers
        self._listen_maddrs: list[str] = []  # ours, without /p2p/, published in our record
        self._connected: set[str] = set()  # peers a client has dialed with the addresses of their records (``_dial``)
        self._answered: collections.deque[set[str]] = collections.deque(maxlen=VOUCH_ROUNDS)  # per recent round
        # peers caught far beyond any honest values (``RoundExchange.caught``): left out while they are
        # in our groups, the ``MAX_CAUGHT`` latest seen kept (``RecentSet``)
        self.caught = RecentSet(MAX_CAUGHT)
        self._agreed: dict[str, list[tuple[int, int]]] = {}  # per mode: where our last round left a whole-group mean
        self._spread: dict[str, float] = {}  # per mode: the last spread measured at our shard (RoundResult.spread)

    async def __aenter__(self) -> Peer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    async def maddrs(self) -> list[str]:
        """Where other peers can dial us, addresses of other machines first; empty in client mode."""
        try:
            return dialable_first([str(m) for m in await self.p2p.get_visible_maddrs()])
        except ValueError:  # hivemind: "No multiaddrs found" (client mode listens nowhere)
            return []

    async def start(self) -> None:
        """Start the transport (the libp2p daemon), join the DHT and the run; sets ``startup_seconds``."""
        started = asyncio.get_running_loop().time()
        self.identity = self.network.identity
        if self.identity is None:
            self.identity = Identity.load_or_create(self.identity_path) if self.identity_path else Identity.generate()
        if self.credential is not None:
            try:
                self.credential.check(self.identity.peer_id, self.run_id, self.credential.authority, time.time())
            except CredentialError as e:
                raise CredentialError(
                    f"this peer's own credential does not admit it ({e}): ask the run's authority for a certificate "
                    f"for peer {self.identity.peer_id} (`gossiptrain auth issue --peer-id {self.identity.peer_id} "
                    f"--run-id {self.run_id} ...`)"
                ) from None
        self.p2p, self.dht = await self.network.start(self.identity, self.identity_path)
        try:
            suffix = Multiaddr(f"/p2p/{self.peer_id}")
            self._listen_maddrs = (
                circuit_maddrs(self.initial_peers)
                if self.behind_nat
                else [str(Multiaddr(m).decapsulate(suffix)) for m in await self.maddrs()]
            )
            self.membership = Membership(
                self.dht,
                self.run_id,
                self.peer_id,
                self.heartbeat_ttl,
                clock=self.network.record_time,
                credential=None if self.credential is None else self.credential.to_bytes(),
                admission=self.admission,
                rejections=self.rejections,
            )
            if self.initial_peers:
                await self.membership.discover()
            if not self.client_mode:  # no one can dial a client, and no one is meant to
                handle_stream = self._admitted_only("allreduce", self._handle_stream)
                await self.p2p.add_binary_stream_handler(self.protocol, handle_stream)
                handle_join = self._admitted_only("assemble", self._handle_join)
                await self.p2p.add_binary_stream_handler(self.assembly_protocol, handle_join)
                serve_clock = self._admitted_only("clock", self.clock.serve, reject=False)
                await self.p2p.add_binary_stream_handler(clock_protocol(self.run_id), serve_clock)
            if self.admission is not None:  # others check our certificate in it before they answer our streams
                await self.membership.publish(self._record())
            await self._check_model_schema()
            await self.estimate_clock()
            self._heartbeat = asyncio.create_task(self.membership.heartbeat(self._record))
            self._clock_refresh = asyncio.create_task(self._refresh_clock())
        except BaseException:
            await self._shutdown_transport()
            raise
        self.startup_seconds = asyncio.get_running_loop().time() - started
        self.info = {**self.info, "startup_seconds": round(self.startup_seconds, 3)}

    async def stop(self, *, announce: bool = True) -> None:
        """Leave the swarm at once (with ``announce``, a tombstone in the DHT) and stop the transport.

        ``announce=False`` leaves as a crash looks to the others: the record lives until it expires."""
        await self._stop_serving_state()
        if self._clock_refresh is not None:
            self._clock_refresh.cancel()
            await asyncio.gather(self._clock_refresh, return_exceptions=True)
            self._clock_refresh = None
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        if heartbeat is not None and announce:
            try:
                async with asyncio.timeout(self.timeouts.matchmaking):
                    await self.membership.leave()
            except Exception as e:
                logger.warning("could not announce leaving (peers will see us expire): %r", e)
        await self._shutdown_transport()

    def _admitted_only(self, kind: str, handler: Callable, *, reject: bool = True) -> Callable:
        """``handler`` in an open run; in a private run, guarded by ``gate.CredentialGate``."""
        return handler if self.gate is None else self.gate.guard(kind, handler, reject=reject)

    async def _shutdown_transport(self) -> None:
        if self.gate is not None:
            await self.gate.close()
        if self.dht is not None:
            await self.dht.shutdown()
            self.dht = None
        if self.p2p is not None:
            await self.p2p.shutdown()

    def _record(self) -> dict[str, Any]:
        return {
            **self.info,
            "schema": self.model_schema,
            "client": self.client_mode,
            "relayed": self.behind_nat,
            "maddrs": self._listen_maddrs,
            "serves_state": self.state_server is not None,
            "stride": self.timing.own_stride(self.round_interval),
            "time": self.now(),
        }

    async def serve_state(self, provider: StateProvider, **options: Any) -> None:
        """Serve this peer's training state to joiners (``gossiptrain.state``) and say so in our record.

        Call it once this peer's state is worth copying (after its own download, if any).  ``options`` go
        to ``StateServer`` (chunk_bytes, max_concurrent).  ``stop()`` unregisters it.
        """
        if self.state_server is not None:
            raise RuntimeError("this peer already serves its state")
        server = self.state_server_class(provider, self.run_id, self.timeouts, **options)
        handle = self._admitted_only("state", server.handle)
        await self.p2p.add_binary_stream_handler(state_protocol(self.run_id), handle)
        self.state_server = server
        await self.publish_info()

    async def _stop_serving_state(self) -> None:
        server, self.state_server = self.state_server, None
        if server is None:
            return
        try:
            async with asyncio.timeout(self.timeouts.join):
                await self.p2p.remove_binary_stream_handler(state_protocol(self.run_id))
        except Exception as e:  # the daemon stops next anyway, which drops the handler too
            logger.warning("could not unregister the state handler: %r", e)
        await server.close()

    async def estimate_clock(self) -> float:
        """Measure this peer's offset to the swarm's median clock against a few live peers (not clients,
        which answer no one) and run the slots on it; returns the offset in seconds."""
        try:
            async with asyncio.timeout(self.timeouts.matchmaking):
                peers = await self.live_peers()
        except TimeoutError:
            return self.clock.offset
        others = [p for p, info in peers.items() if p != self.peer_id and not info.get("client")]
        others = sorted(others, key=lambda p: zlib.crc32(f"{p}/{self.peer_id}".encode()))[:CLOCK_PEERS]
        return await self.clock.estimate(self.p2p, self.run_id, others, timeout=self.timeouts.join)

    async def _refresh_clock(self) -> None:
        """Estimate the swarm's clock again every ``CLOCK_REFRESH`` seconds, sooner while no peer answered
        the last estimate (alone, or the peers it asked were gone)."""
        while True:
            await asyncio.sleep(CLOCK_REFRESH if self.clock.round_trips else self.heartbeat_ttl / 3)
            try:
                await self.estimate_clock()
            except Exception as e:  # a failed estimate keeps the last offset
                logger.warning("could not estimate the swarm's clock: %r", e)

    async def _check_model_schema(self) -> None:
        if self.model_schema is None or not self.initial_peers:
            return
        for peer, record in (await self.membership.live_peers()).items():
            theirs = record.get("schema")
            if theirs is not None and theirs != self.model_schema:
                raise ModelMismatchError(
                    f"peer {peer} of run {self.run_id!r} trains a model with schema {theirs}, ours is "
                    f"{self.model_schema}: every peer of a run must build the same model (or use another --run-id)"
                )

    async def publish_info(self) -> None:
        """Publish ``self.info`` now instead of at the next heartbeat."""
        await self.membership.publish(self._record())

    async def live_peers(self) -> dict[str, dict[str, Any]]:
        """Membership records of the live peers (including this one), by peer id."""
        peers = await self.membership.live_peers()
        self._observe_strides(peers)
        if to_dial := self._to_dial(peers):
            await self._dial(to_dial)
        return peers

    async def _follow_strides(self) -> None:
        """Read the members' records for the strides they publish (``timing``): a peer whose round failed while the
        others found their stride keeps its own of 1 and would take every next slot alone, until it had measured
        three rounds of its own.  A read that fails changes nothing."""
        try:
            async with asyncio.timeout(self.timeouts.matchmaking):
                self._observe_strides(await self.membership.live_peers())
        except Exception as e:  # the next round's read tries again
            logger.debug("could not read the members' strides: %r", e)

    def _observe_strides(self, records: dict[str, dict[str, Any]]) -> None:
        self.timing.observe([record.get("stride") for peer, record in records.items() if peer != self.peer_id])

    def _to_dial(self, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The records of the other peers we dial ourselves: all in client mode, else those behind a NAT."""
        return {
            peer: record
            for peer, record in records.items()
            if peer != self.peer_id and (self.client_mode or record.get("relayed"))
        }

    async def _dial(self, records: dict[str, dict[str, Any]]) -> None:
        """Connect to the peers of ``records`` at the addresses they publish (``_to_dial``).

        A client is in no one's routing table and libp2p's own DHT may not find a peer's addresses for
        it (``routing: not found``), so it dials them itself before it opens streams to them (state
        download, its group's reducers); a peer behind a NAT is reached only at its relays' circuit
        addresses, which only its records hold.  Failures are left to the stream that follows to report.  A peer
        dialed before is dialed again once the daemon has lost the connection (the peer restarted, the
        link dropped) or a round's stream to it failed (``average``); one whose record is gone is forgotten.
        """
        try:
            async with asyncio.timeout(self.timeouts.join):
                live = await self.p2p.connected_peers()
            self._connected &= live & records.keys()
        except Exception as e:  # the dials below are what matters; without the list, the known stay known
            logger.debug("could not list the daemon's connections: %r", e)
            self._connected &= records.keys()
        todo = {
            peer: record["maddrs"]
            for peer, record in records.items()
            if peer != self.peer_id and peer not in self._connected and record.get("maddrs")
        }

        async def dial(peer: str, maddrs: list[str]) -> None:
            try:
                async with asyncio.timeout(self.timeouts.join):
                    await self.p2p.connect(peer, maddrs)
                self._connected.add(peer)
            except Exception as e:
                logger.debug("could not dial %s at %s: %r", peer, maddrs, e)

        await asyncio.gather(*(dial(peer, maddrs) for peer, maddrs in todo.items()))

    @property
    def swarm_size(self) -> int:
        """The number of live peers: counted in a swarm small enough for one key of records, else estimated from
        this peer's shard (``membership``)."""
        return round(self.membership.swarm_size)

    async def wait_for_peers(self, count: int, timeout: float) -> dict[str, dict[str, Any]]:
        """Wait until the swarm holds at least ``count`` live peers (``swarm_size``, polling the DHT at growing
        intervals, ``WAIT_POLL``; our record stored again when a read misses it), then estimate the swarm's clock
        against them: the estimate at start saw only the peers up by then (none, or one whose median with our own
        clock is half its skew), and it would otherwise hold until the next refresh, ``CLOCK_REFRESH`` later.
        Returns the live peers of our shard."""

        def enough() -> bool:  # in one key (level 0), the peers themselves; above, the estimate
            return len(peers) >= count if self.membership.level == 0 else self.swarm_size >= count

        async with asyncio.timeout(timeout):
            peers = await self.live_peers()
            if not enough():  # progress shown only when there is a wait
                with show_progress(f"waiting for {count} live peers", count, unit="peers") as shown:
                    pause, longest = WAIT_POLL
                    while not enough():
                        shown.update(self.swarm_size)
                        if self.peer_id not in peers:  # a store that reached too few replicas, or an expired record
                            await self.membership.publish(self._record())
                        await asyncio.sleep(pause)
                        pause = min(2 * pause, longest)
                        peers = await self.live_peers()
                    shown.update(self.swarm_size)
            if count > 1:
                await self.estimate_clock()
        return peers

    def now(self) -> float:
        """The swarm's time, in which round slots are defined (``gossiptrain.clock``)."""
        return self.clock.now()

    def round_start(self, round_id: int) -> float:
        return round_id * self.round_interval

    def next_round_id(self, lead: float | None = None) -> int:
        """The first round slot that starts at least ``lead`` seconds from now.

        The default lead (``registration_lead``, the time to register in the DHT) is at most half a
        slot: a round that ends in the first half of slot ``r`` then takes part in slot ``r + 1``.  A lead of a
        whole slot or more would make every peer skip every other slot, and peers that started in
        slots of different parity would never meet.  With the default lead, a peer whose rounds span several
        slots (``timing.RoundTiming.stride``) takes the first multiple of its stride, where peers of smaller
        strides (multiples of the larger ones) meet it.
        """
        if lead is not None:
            return math.ceil((self.now() + lead) / self.round_interval)
        first = math.ceil((self.now() + self.registration_lead) / self.round_interval)
        stride = self.timing.stride(self.round_interval)
        return -(-first // stride) * stride

    @property
    def registration_lead(self) -> float:
        """How long before a slot starts a peer registers for it: twice its slowest recent DHT
        registration, at least 0.5 s, at most half a slot (``timing.RoundTiming``)."""
        return self.timing.registration_lead(self.round_interval)

    async def average(
        self,
        tensor: torch.Tensor,
        weight: float = 1.0,
        round_id: int | None = None,
        *,
        residual: torch.Tensor | None = None,
        mode: str = VECTOR,
        codec: Codec | None = None,
        state_lock: contextlib.AbstractContextManager | None = None,
    ) -> RoundResult:
        """Average a flat float32 tensor with this round's group; returns the averaged copy.

        The input is not modified.  If ``round_id`` is None, the next round slot is used.
        ``residual`` is the error-feedback state of what is averaged (updated in place), and
        ``mode`` names what the tensor is: ``"params"`` for a model's parameters (the defences then also judge
        a contribution by its size: ``allreduce.averages_parameters``), ``"vector"`` (the default) or any other
        label for anything else (gradients, deltas, statistics), judged against the others only; ``codec``
        overrides the peer's codec for this round: all members of a round must agree on both.  Peers group only with
        peers of the same mode, so a round's peers that average different things (training peers
        sending deltas, finishing peers their parameters) form separate groups.  ``state_lock`` is held
        while ``residual`` changes, once, at the end of the round (``exchange``).
        """
        if tensor.dim() != 1 or tensor.dtype != torch.float32:
            raise ValueError(f"average() takes a flat float32 tensor, got {tuple(tensor.shape)} {tensor.dtype}")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight must be positive and finite, got {weight}")
        snapshot = tensor.detach().cpu()
        round_id = self.next_round_id() if round_id is None else round_id
        record = {"schema": self.model_schema, "client": self.client_mode, "numel": snapshot.numel(), "mode": mode}
        record["answered"] = self._recent_vouches()  # ``matchmaking.vouches``
        record["maddrs"] = self._listen_maddrs  # clients in our group dial us there (everyone, if we are relayed)
        record["relayed"] = self.behind_nat
        if self.bandwidth_mbit is not None:
            record["mbit"] = self.bandwidth_mbit
        record["sketch"] = sketches.sketch(snapshot, self.run_id, round_id)
        record["caught"] = list(self.caught)[-matchmaking.MAX_ACCUSED :][::-1]  # ``matchmaking.accused``
        record["stride"] = self.timing.own_stride(self.round_interval)
        loop = asyncio.get_running_loop()
        role = self._take_role(round_id)
        try:
            assembled = await self._register_and_assemble(round_id, record, role)
        finally:
            role.close()
        if isinstance(assembled, str):
            return self._failed(round_id, snapshot, assembled)
        started, registration_s, view, (members, records) = assembled
        seen = len(view)
        plan = matchmaking.plan_of(self.run_id, round_id, members, snapshot.numel(), records)
        if not plan.reducers or len(members) == 1:
            if len(members) == 1:
                result = self._alone(round_id, snapshot, mode, seen)
                if seen == 1:  # no one else took this slot: learn the stride the others keep before choosing ours
                    await self._follow_strides()
                result.seconds = loop.time() - started
                return result
            return self._failed(round_id, snapshot, f"every member of group {sorted(members)} is in client mode")
        reference = cell_size = 0.0  # per value: how far apart the cell's values lie, and how large they are
        if self.defences.cell_spread is not None:
            others = [r.get("sketch") for peer, r in view.items() if peer != self.peer_id]
            others = sketches.of_honest_size(others, self.defences.catch)
            reference = sketches.typical_distance(record["sketch"], others, self.defences.cell_spread)
            cell_size = sketches.typical_size([record["sketch"], *others], self.defences.cell_spread)
        exchange = self.exchange_class(
            self.p2p,
            protocol=self.protocol,
            plan=plan,
            me=self.peer_id,
            values=snapshot,
            weight=weight,
            codec=codec or self.codec,
            timeouts=self.timeouts,
            rejections=self.rejections,
            residual=residual,
            mode=mode,
            defences=self.defences,
            agreed=self._agreed.get(mode),
            caught=self.caught,
            spread=self._spread.get(mode, 0.0),
            reference=reference,
            cell_size=cell_size,
            state_lock=state_lock,
            counter=role.counter,
        )
        await exchange.prepare()  # before members' streams can reach it
        slot = self._exchanges.setdefault(round_id, asyncio.get_running_loop().create_future())
        if slot.done():
            raise RuntimeError(f"this peer is already averaging in round {round_id}")
        slot.set_result(exchange)
        try:
            result = await exchange.run()
        finally:
            self._exchanges.pop(round_id, None)
            self._forget_old_rounds(round_id)
        result.seconds, result.participants = loop.time() - started, seen
        self._answered.append(result.answered)
        # a peer we dial ourselves (``_to_dial``) whose answer did not reach us is dialed again before our next round
        self._connected -= set(plan.members) - result.answered
        self._agreed[mode], self._spread[mode] = result.agreed, result.spread
        stride = self.timing.own_stride(self.round_interval)
        self.timing.record(registration_s, result.seconds, self.round_interval)
        if self.timing.own_stride(self.round_interval) != stride:  # a peer left alone reads it there at once
            try:
                async with asyncio.timeout(self.timeouts.matchmaking):
                    await self.publish_info()
            except Exception as e:  # the heartbeat publishes it within a third of the record's lifetime
                logger.debug("could not publish our stride: %r", e)
        return result

    async def _register_and_assemble(
        self, round_id: int, record: dict[str, Any], role: Role
    ) -> tuple[float, float, dict[str, Any], tuple[list[str], dict[str, Any]]] | str:
        """Register for ``round_id``, read our cell at its start and learn our group from its leader: when the
        round started (loop time), how long the registration took, the records of the compatible peers we read
        (ours included), and the group (``_assemble``); or why not, as a string."""
        loop = asyncio.get_running_loop()
        start = self.round_start(round_id)
        registering = loop.time()
        expiration = start + self.round_interval + self.timeouts.result
        registration = asyncio.ensure_future(self.membership.join_round(round_id, record, expiration))
        registration.add_done_callback(lambda task: task.cancelled() or task.exception())  # logged below, if at all
        try:  # a registration still under way goes on: our leader takes us in from our JOIN all the same
            async with asyncio.timeout(self.timeouts.matchmaking):
                await asyncio.shield(registration)
        except TimeoutError:
            logger.info("round %s: our registration took over %ss; going on", round_id, self.timeouts.matchmaking)
        except Exception as e:
            logger.info("round %s: our registration failed (%r); going on", round_id, e)
        registration_s = loop.time() - registering
        if self.now() > start:  # others may have seen us already: take part, late, rather than let them wait
            logger.info("registered for round %s %.3fs after it started", round_id, self.now() - start)
        await asyncio.sleep(max(0.0, start - self.now()))
        started = loop.time()
        try:
            async with asyncio.timeout(self.timeouts.matchmaking):
                participants = await self.membership.round_participants(round_id)
        except TimeoutError:
            return "could not read the round's participants from the DHT"
        self._observe_strides(participants)
        view = matchmaking.compatible(record, self.peer_id, participants)
        if to_dial := self._to_dial(participants):
            if set(to_dial) - self._connected:
                await self._dial(to_dial)
        assembled = await self._assemble(round_id, record, view, role, started)
        return assembled if isinstance(assembled, str) else (started, registration_s, view, assembled)

    def _alone(self, round_id: int, snapshot: torch.Tensor, mode: str, seen: int) -> RoundResult:
        self._answered.append(set())
        self._agreed[mode] = []
        return RoundResult(round_id, "alone", [self.peer_id], snapshot.clone(), participants=seen)

    async def _assemble(
        self, round_id: int, record: dict[str, Any], view: dict[str, Any], role: Role, read_started: float
    ) -> tuple[list[str], dict[str, Any]] | str:
        """Our group of ``round_id`` and its members' records, as our cell's leader decided it (``assembly``); we
        lead (``role``) if we come first among the candidates of ``view`` that answer.  A string says why there is
        none."""
        candidates = matchmaking.leader_candidates(self.run_id, round_id, view)
        if not candidates:
            return f"every peer of our cell ({len(view)}) is in client mode: none can lead it or reduce a shard"
        tried: set[str] = set()
        redirected = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.timeouts.join  # a candidate that does not answer costs ``join`` or less
        while candidates and len(tried) < MAX_CANDIDATES and loop.time() < deadline:
            leader = candidates[0]
            if leader == self.peer_id:
                return await self._lead(
                    round_id, record, {peer: r for peer, r in view.items() if peer not in tried}, role, read_started
                )
            role.follow(leader)
            tried.add(leader)
            try:
                message = await join_leader(
                    self.p2p, self.assembly_protocol, leader, round_id, record, self.timeouts, role.counter
                )
                return parse_plan(message, self.peer_id, round_id, self.target_group_size)
            except Redirect as e:
                if not redirected and e.leader not in tried:
                    redirected = True
                    candidates = [e.leader] + [c for c in candidates if c not in tried and c != e.leader]
                    continue
                logger.debug("round %s: redirected by %s to %s, tried before", round_id, leader, e.leader)
            except LateJoin as e:
                return f"joined the cell's leader {leader} after it decided the groups: {e}"
            except (*EXCHANGE_ERRORS, ProtocolError) as e:
                logger.debug("round %s: leader candidate %s did not answer: %r", round_id, leader, e)
            candidates = [c for c in candidates if c not in tried]
        if not self.client_mode:  # the candidates before us left or failed: we lead whoever still joins us
            return await self._lead(round_id, record, {self.peer_id: record}, role, read_started)
        return f"no leader of our cell answered (tried {len(tried)}: {sorted(tried)})"

    async def _lead(
        self, round_id: int, record: dict[str, Any], expected: dict[str, Any], role: Role, read_started: float
    ) -> tuple[list[str], dict[str, Any]]:
        """Lead our cell of ``round_id``: wait for the JOINs of ``expected`` (``assembly.CellAssembly``), decide the
        groups, and return ours with its members' records."""
        assembly = CellAssembly(
            self.run_id, round_id, self.peer_id, record, expected, self.target_group_size, self.timeouts
        )
        role.lead(assembly)

        async def reread() -> dict[str, Any]:
            return matchmaking.compatible(record, self.peer_id, await self.membership.round_participants(round_id))

        members = (await assembly.decide(reread, read_started))[self.peer_id]
        return members, assembly.plan_message(members)["records"]  # what every member's plan is built from

    def _take_role(self, round_id: int) -> Role:
        """Our role in ``round_id``'s cell, made as we register for it (a JOIN may come before we read the cell);
        roles of rounds no longer current are dropped."""
        current = self.next_round_id(lead=0.0)
        for stale in [r for r in self._roles if r < min(current, round_id) - 2]:
            del self._roles[stale]
        return self._roles.setdefault(round_id, Role())

    async def _handle_join(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer a cell member's JOIN (``assembly.serve_join``)."""
        await serve_join(self._roles.get, info.peer_id.to_base58(), reader, writer, self.timeouts)

    def _recent_vouches(self) -> list[str]:
        """Who answered us in our last ``VOUCH_ROUNDS`` rounds, the latest first (at most ``MAX_VOUCHES``)."""
        recent = dict.fromkeys(peer for answered in reversed(self._answered) for peer in sorted(answered))
        return list(recent)[: matchmaking.MAX_VOUCHES]

    def _failed(self, round_id: int, snapshot: torch.Tensor, reason: str) -> RoundResult:
        logger.warning("round %s failed: %s", round_id, reason)
        return RoundResult(round_id, "failed", [self.peer_id], snapshot.clone(), errors=[reason])

    def _forget_old_rounds(self, round_id: int) -> None:
        for stale in [r for r in self._exchanges if r < round_id]:
            future = self._exchanges.pop(stale)
            if not future.done():
                future.set_result(None)

    def _running(self, round_id: int) -> bool:
        """Whether our own exchange of ``round_id`` is running (its slot holds it)."""
        slot = self._exchanges.get(round_id)
        return slot is not None and slot.done() and slot.result() is not None

    def _forget_unjoined_rounds(self) -> None:
        """Drop the slots that inbound HELLOs made for rounds that we never joined and for which no
        stream waits any more; our own running rounds stay.  A HELLO for round ``r`` is accepted until
        round ``r + 2`` is current (later only while our own exchange of ``r`` runs) and waits ``join`` at
        most: after that, its slot serves no one."""
        before = self.next_round_id(lead=-self.timeouts.join) - 2
        for stale in [r for r, slot in self._exchanges.items() if r < before and not slot.done()]:
            self._exchanges.pop(stale).set_result(None)

    async def _handle_stream(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve a group member's upload of its slice of our shard.

        Charged to the sender (``rejections``): a HELLO that is not readable within ``join``, or that names
        a round outside the current ones or one that is over here without us.  Not charged: our own
        exchange of that round not starting within ``join`` of the HELLO (we registered late, or not at
        all); the sender is told that we are not in that round.  A HELLO's wait makes a slot in
        ``_exchanges``; those of rounds we never joined are dropped once no stream can wait on them.
        """
        counter = ByteCounter()
        sender = info.peer_id.to_base58()
        self.inbound_streams += 1
        try:
            try:
                _, hello = await read_message(reader, counter, timeout=self.timeouts.join, expect=(FrameKind.HELLO,))
            except EXCHANGE_ERRORS as e:
                self.rejections.record(classify(e), sender, "?", f"unreadable HELLO: {e!r}")
                return
            round_id = hello.get("round_id")
            current = self.next_round_id(lead=0.0)
            self._forget_unjoined_rounds()
            # a round of ours that still runs is current however many slots it spans (a first round dialing at 300 ms)
            running = isinstance(round_id, int) and self._running(round_id)
            if not isinstance(round_id, int) or not (running or current - 2 <= round_id <= current + 1):
                self.rejections.record("stale_round", sender, round_id, f"the current round is {current}")
                await write_message(writer, FrameKind.REJECT, {"reason": f"round {round_id!r} is not current"}, counter)
                return
            slot = self._exchanges.setdefault(round_id, asyncio.get_running_loop().create_future())
            try:
                async with asyncio.timeout(self.timeouts.join):
                    exchange = await asyncio.shield(slot)
            except TimeoutError:  # ours, not the sender's: we did not start that round in time
                logger.debug("%s sent its slice of round %s, which we have not started within join", sender, round_id)
                reason = f"this peer is not in round {round_id} (it did not start it within {self.timeouts.join}s)"
                await write_message(writer, FrameKind.REJECT, {"reason": reason}, counter)
                return
            if exchange is None:  # that round is over here and we never took part in it
                self.rejections.record("stale_round", sender, round_id, "this peer did not take part in that round")
                await write_message(writer, FrameKind.REJECT, {"reason": f"round {round_id} is over"}, counter)
                return
            exchange.counter.received += counter.received
            await exchange.handle_contribution(sender, hello, reader, writer)
        except EXCHANGE_ERRORS as e:  # a REJECT that did not reach the sender: it left, nothing to charge
            logger.debug("stream from %s ended early: %r", sender, e)
        finally:
            await close_after_peer(reader, writer, self.timeouts.part)
