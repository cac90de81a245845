"""The simulator's network: links with rate, delay, jitter and loss between in-memory peers, and a DHT whose
stores and reads take time and whose replicas can miss a record.  It runs on a ``virtual_time`` loop.

``SimulatedNetwork.port(name, link)`` gives what a ``Peer`` starts on (``network.Network``): a
``SimulatedTransport`` (binary streams, as ``hivemind.p2p.P2P``) and a ``SimulatedRecords`` view of the
swarm's DHT (as ``hivemind.dht.node.DHTNode``).  Nothing above them knows it is simulated.

Links: ``linkswitch.LinkSpec``, the model of ``gossiptrain.netns``, taken per message (one ``write``) rather
than per packet.  A message from a to b waits for a's uplink (a FIFO at a's rate, shared by all of a's
streams and DHT traffic), travels ``rtt_a/4``, passes b's downlink (at b's rate, in the free time it finds:
``Downlink``), and travels ``rtt_b/4`` plus jitter (uniform in ±j, j the mean of the two ends').  The two
queues overlap as a packet stream does.  A message never overtakes an earlier one of its stream.  Loss ``p``
on a path (the share that gets through is the geometric mean of the two ends', as in ``linkswitch``) loses
packets by a Poisson draw: a short message (at most ``SHORT_PACKETS`` packets, too few for fast retransmit)
that loses one waits a retransmission timeout, a longer one ``MAX_RECOVERIES`` round trip (SACK recovers a
window's losses at once).
Each pair of peers has one TCP connection (``TcpWindow``): a window that shrinks while idle, grows in slow start
and is cut by losses, so a message larger than the window waits round trips for it.  Not modelled: drop-tail
overflow, and the CPU time of the exchange's tensor work and of the daemon (``virtual_time`` runs it in zero
virtual time).

Streams: opening one takes a round trip (the handler at the other end starts after one way); a sender's
``drain`` waits while more than ``SEND_BUFFER`` bytes of its stream wait in its uplink.  A peer that crashes or
stops resets its streams: the other ends read ``ConnectionResetError`` one way later.  Opening a stream to a peer
that is gone, is a client (not dialable), or has no handler for the protocol raises ``P2PDaemonError``
after a round trip.

DHT: one store of records for the swarm (what hivemind's DHT converges to), with hivemind's rules (a
subkey's record with the later expiration wins; expired records are not returned).  A store or a get takes
``dht_hops()`` sequential round trips of the caller's link (a lookup, then the request) and moves its bytes
(the request, or the whole dictionary read) through the caller's queues; a store sends ``DHT_REPLICAS``
copies.  A record stored at ``t`` is seen from ``t + dht_lag``, and each read misses each record with
probability ``dht_miss`` (a replica without it): views of a round's participants can differ.  Draws come
from the network's seed, so a run is repeatable.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import P2PDaemonError, PeerID
from hivemind.utils import ValueWithExpiration
from hivemind.utils.multiaddr import Multiaddr

from gossiptrain.auth import Identity
from gossiptrain.linkswitch import LinkSpec
from gossiptrain.network import StreamHandler

MSS = 1448  # bytes of payload per TCP packet
SHORT_PACKETS = 3  # a message of at most this many packets that loses one waits for a retransmission timeout
MIN_RTO = 0.2  # seconds: Linux's minimum retransmission timeout
INITIAL_WINDOW = 10 * 1448  # bytes: TCP's initial congestion window (10 segments)
LOSS_CUT = 0.7  # what a loss leaves of the congestion window (CUBIC)
MAX_RECOVERIES = 1  # round trips that losses add to one message (SACK recovers a window's losses in one)
SEND_BUFFER = 2**18  # bytes a stream may have waiting in its uplink before ``drain`` waits
OPEN_BYTES = 128  # bytes that opening a stream sends (multistream-select, the protocol name)
DHT_BUCKET = 20  # nodes a Kademlia node knows per distance (hivemind's bucket size): a swarm this small is one hop
DHT_BITS_PER_HOP = 3  # bits of distance to the key that each round trip of a lookup gains (alpha = 3 in parallel)
DHT_REPLICAS = 5  # copies of a record that a store sends
RECORD_OVERHEAD = 96  # bytes of a DHT record besides its value (key, subkey, expiration, signature)


class Downlink:
    """When a link's downlink is busy: intervals, each message filling the free time from its first byte on.

    Messages reach a downlink in an order other than the one they were queued in (a slow sender's message is
    queued now and trickles in for seconds), so the downlink is not one "free from" time, which would make a
    fast message wait behind a slow one not yet there; a message takes the free time it finds."""

    def __init__(self):
        self.busy: list[tuple[float, float]] = []  # sorted, disjoint

    def take(self, start: float, seconds: float, now: float) -> float:
        """Take ``seconds`` of free time from ``start`` on; returns when the last of it ends."""
        self.busy = [interval for interval in self.busy if interval[1] > now]
        merged, t, left = [], start, seconds
        for begin, end in self.busy:
            if left > 0 and begin > t:
                used = min(left, begin - t)
                merged.append((t, t + used))
                left -= used
                t += used
            merged.append((begin, end))
            if left > 0:
                t = max(t, end)
        if left > 0:
            merged.append((t, t + left))
            t += left
        merged.sort()
        self.busy = []
        for begin, end in merged:  # adjacent intervals are joined, so the list stays short
            if self.busy and begin <= self.busy[-1][1] + 1e-12:
                self.busy[-1] = (self.busy[-1][0], max(end, self.busy[-1][1]))
            else:
                self.busy.append((begin, end))
        return t


@dataclass
class LinkUse:
    """One peer's link: when its uplink is next free, its downlink's busy time, and the bytes it carried."""

    spec: LinkSpec
    up_free: float = 0.0
    down: Downlink = field(default_factory=Downlink)
    sent_bytes: int = 0
    received_bytes: int = 0

    @property
    def seconds_per_byte(self) -> float:
        return 8 / (self.spec.mbit * 1e6)

    @property
    def one_way(self) -> float:
        return self.spec.rtt_ms / 4e3  # each direction of each link adds a quarter of its RTT


class TcpWindow:
    """The congestion window of the connection from one peer to another (libp2p multiplexes every stream
    between two peers on one TCP connection).

    After an idle spell the window is halved for each retransmission timeout it lasted, down to
    ``INITIAL_WINDOW`` (Linux's ``tcp_slow_start_after_idle``); it doubles every round trip (slow start) up to
    the path's bandwidth-delay product, where the link's rate takes over; a message that loses packets cuts it
    to ``LOSS_CUT`` of itself (CUBIC's reduction).
    """

    __slots__ = ("window", "idle_from")

    def __init__(self):
        self.window, self.idle_from = float(INITIAL_WINDOW), 0.0

    def send(self, size: int, now: float, rtt: float, rate: float, lost: int) -> int:
        """Round trips that ``size`` bytes sent at ``now`` wait for the window, beyond the first."""
        rto = max(MIN_RTO, 2 * rtt)
        idle = now - self.idle_from
        if idle > rto:  # Linux halves the window for each timeout the connection sat idle
            self.window = max(float(INITIAL_WINDOW), self.window / 2 ** min(64, idle // rto))
        full, rounds, sent = rate * rtt, 0, self.window
        while sent < size and self.window < full:
            self.window = min(2 * self.window, full)
            sent += self.window
            rounds += 1
        if lost:  # one reduction per loss episode (the losses of one message)
            self.window = max(float(INITIAL_WINDOW), self.window * LOSS_CUT)
        self.idle_from = now + rounds * rtt + size / rate
        return rounds


@dataclass(frozen=True)
class StreamInfo:
    peer_id: PeerID


class _Pipe:
    """One direction of a stream: bytes from ``src`` delivered to ``reader`` at their modelled arrival."""

    def __init__(self, network: SimulatedNetwork, src: SimulatedTransport, dst: SimulatedTransport):
        self.network, self.src, self.dst = network, src, dst
        self.reader = asyncio.StreamReader()
        self.pending: collections.deque[bytes | None] = collections.deque()  # delivered in order, one per call
        self.last_arrival = 0.0
        self.left_uplink = 0.0  # when the last byte written leaves the sender's uplink
        self.closed = self.broken = False

    def send(self, data: bytes | None) -> None:
        """Queue ``data`` (None: the end of the stream) for delivery."""
        if self.closed or self.broken:
            return
        size = OPEN_BYTES if data is None else len(data)
        left, arrival = self.network.transfer(self.src.name, self.dst.name, size)
        self.left_uplink = max(self.left_uplink, left)
        self.last_arrival = max(arrival, self.last_arrival)
        self.pending.append(data)
        asyncio.get_running_loop().call_at(self.last_arrival, self._deliver)
        if data is None:
            self.closed = True

    def _deliver(self) -> None:
        """Deliver the oldest message: one call per message, at its time, so that messages due at the same
        instant (whose callbacks the loop may run in any order) still arrive in the order sent."""
        if not self.pending or self.broken:
            return
        data = self.pending.popleft()
        if data is None:
            self.reader.feed_eof()
        else:
            self.reader.feed_data(data)

    def break_at(self, when: float) -> None:
        """The sender crashed: what it had not delivered is lost, and the reader sees a reset at ``when``."""
        self.pending.clear()
        self.closed = True

        def reset() -> None:
            self.broken = True
            if not self.reader.at_eof():
                self.reader.set_exception(ConnectionResetError("the peer's connection was reset"))

        asyncio.get_running_loop().call_at(when, reset)


class SimulatedWriter:
    """The writing end of a simulated stream (what ``transport`` and the exchange use of ``StreamWriter``)."""

    def __init__(self, pipe: _Pipe):
        self._pipe = pipe

    def write(self, data: bytes | memoryview) -> None:
        if self._pipe.broken or self._pipe.src.crashed:
            raise ConnectionResetError("the stream was reset")
        self._pipe.send(bytes(data))

    async def drain(self) -> None:
        pipe = self._pipe
        if pipe.broken:
            raise ConnectionResetError("the stream was reset")
        spare = SEND_BUFFER * self._pipe.network.links[pipe.src.name].seconds_per_byte
        await asyncio.sleep(max(0.0, pipe.left_uplink - spare - asyncio.get_running_loop().time()))

    def close(self) -> None:
        self._pipe.send(None)

    def is_closing(self) -> bool:
        return self._pipe.closed

    async def wait_closed(self) -> None:
        pass


class SimulatedTransport:
    """A peer's streams on the simulated network (``network.Transport``)."""

    def __init__(self, network: SimulatedNetwork, name: str, identity: Identity, client: bool):
        self.network, self.name, self.client = network, name, client
        self.peer_id = PeerID.from_base58(identity.peer_id)
        self.handlers: dict[str, StreamHandler] = {}
        self.pipes: set[_Pipe] = set()  # open pipes from and to this peer
        self.serving: set[asyncio.Task] = set()  # handler tasks of streams opened to this peer
        self.crashed = False

    async def add_binary_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self.handlers[protocol] = handler

    async def remove_binary_stream_handler(self, protocol: str) -> None:
        self.handlers.pop(protocol, None)

    async def call_binary_stream_handler(
        self, peer_id: PeerID, protocol: str
    ) -> tuple[StreamInfo, asyncio.StreamReader, SimulatedWriter]:
        return await self.network.open_stream(self, peer_id.to_base58(), protocol)

    async def get_visible_maddrs(self) -> list[Multiaddr]:
        if self.client:
            raise ValueError("No multiaddrs found")  # as hivemind says for a daemon that listens nowhere
        return [Multiaddr(f"{self.network.address(self.name)}/p2p/{self.peer_id.to_base58()}")]

    async def connected_peers(self) -> set[str]:
        return {t.peer_id.to_base58() for t in self.network.transports.values() if not t.crashed and t is not self}

    async def connect(self, peer: str, maddrs: Sequence[str]) -> None:
        await asyncio.sleep(4 * self.network.links[self.name].one_way)  # a round trip
        if peer not in self.network.transports:
            raise P2PDaemonError(f"failed to dial {peer}: no route")

    async def shutdown(self) -> None:
        """Stop, as a daemon does: this peer leaves the network and its streams are reset."""
        self.network.transports.pop(self.peer_id.to_base58(), None)
        self._reset_streams()
        await asyncio.gather(*self.serving, return_exceptions=True)

    def crash(self) -> None:
        """Vanish at once: streams reset, handlers stop, nothing more is sent or received."""
        self.crashed = True
        self.network.transports.pop(self.peer_id.to_base58(), None)
        self._reset_streams()

    def _reset_streams(self) -> None:
        """The other ends of this peer's streams read a reset one way later; its handlers are cancelled."""
        now = asyncio.get_running_loop().time()
        for pipe in list(self.pipes):
            other = pipe.dst if pipe.src is self else pipe.src
            one_way = self.network.links[self.name].one_way + self.network.links[other.name].one_way
            if pipe.src is self:
                pipe.break_at(now + one_way)
            else:
                pipe.broken = True
        for task in self.serving:
            task.cancel()


class SimulatedRecords:
    """One peer's access to the swarm's DHT (``membership.RecordStore``): its operations take that peer's link."""

    def __init__(self, network: SimulatedNetwork, name: str):
        self.network, self.name = network, name

    async def store(
        self, key: str, value: Any, expiration_time: float, *, subkey: str, await_all_replicas: bool = True
    ) -> bool:
        """Store a record: the time of sending it to every replica (waiting for the first or the last
        acknowledgement takes the same round trips here)."""
        size = (len(msgpack.packb(value)) + RECORD_OVERHEAD) * DHT_REPLICAS
        await self.network.dht_round_trips(self.name, size, RECORD_OVERHEAD)
        return self.network.dht.store(key, subkey, value, expiration_time)

    async def get(self, key: str, latest: bool = True) -> ValueWithExpiration | None:
        found = self.network.dht.read(key, self.network.dht_miss, self.network.rng)
        size = sum(len(msgpack.packb(item.value)) + RECORD_OVERHEAD for item in found.values())
        await self.network.dht_round_trips(self.name, RECORD_OVERHEAD, size)
        if not found:
            return None
        return ValueWithExpiration(found, max(item.expiration_time for item in found.values()))

    async def shutdown(self) -> None:
        pass


class SimulatedDHT:
    """The swarm's records: key -> subkey -> (value, expiration, visible from)."""

    def __init__(self, lag: float):
        self.lag = lag
        self.records: dict[str, dict[str, tuple[Any, float, float]]] = {}

    def store(self, key: str, subkey: str, value: Any, expiration_time: float) -> bool:
        now = asyncio.get_running_loop().time()
        if expiration_time <= now:
            return False
        entries = self.records.setdefault(key, {})
        old = entries.get(subkey)
        if old is not None and old[1] > expiration_time:
            return False
        entries[subkey] = (msgpack.unpackb(msgpack.packb(value)), expiration_time, now + self.lag)
        return True

    def read(self, key: str, miss: float, rng: random.Random) -> dict[str, ValueWithExpiration]:
        now = asyncio.get_running_loop().time()
        entries = self.records.get(key, {})
        for subkey in [s for s, (_, expiration, _) in entries.items() if expiration <= now]:
            del entries[subkey]
        return {
            subkey: ValueWithExpiration(value, expiration)
            for subkey, (value, expiration, visible) in entries.items()
            if visible <= now and not (miss and rng.random() < miss)
        }


class SimulatedPort:
    """What one simulated peer starts on (``network.Network``): its identity and its place on the network."""

    def __init__(self, network: SimulatedNetwork, name: str, client: bool):
        self.network, self.name, self.client = network, name, client
        seed = hashlib.sha256(f"{network.seed}/{name}".encode()).digest()
        self.identity = Identity(Ed25519PrivateKey.from_private_bytes(seed))
        self.transport: SimulatedTransport | None = None

    def record_time(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(
        self, identity: Identity, identity_path: str | os.PathLike | None
    ) -> tuple[SimulatedTransport, SimulatedRecords]:
        self.transport = SimulatedTransport(self.network, self.name, identity, self.client)
        self.network.transports[identity.peer_id] = self.transport
        return self.transport, SimulatedRecords(self.network, self.name)


class SimulatedNetwork:
    """Peers' links, their streams and the swarm's DHT (see the module docstring).

    Args:
        seed: seeds identities, jitter, losses and the DHT's misses.
        dht_miss: probability that a read misses a given record.
        dht_lag: seconds before a stored record is seen by readers.
    """

    def __init__(self, seed: int = 0, *, dht_miss: float = 0.0, dht_lag: float = 0.0):
        if not 0 <= dht_miss < 1 or dht_lag < 0:
            raise ValueError(f"dht_miss must be in [0, 1) and dht_lag >= 0, got {dht_miss}, {dht_lag}")
        self.seed, self.dht_miss, self.rng = seed, dht_miss, random.Random(seed)
        self.links: dict[str, LinkUse] = {}
        self.transports: dict[str, SimulatedTransport] = {}  # live ones, by peer id
        self.dht = SimulatedDHT(dht_lag)
        self._addresses: dict[str, int] = {}
        self._connections: dict[tuple[str, str], TcpWindow] = {}

    def port(self, name: str, link: LinkSpec, *, client: bool = False) -> SimulatedPort:
        """A new peer ``name`` behind ``link``: pass it to ``Peer(network=...)``.  A name is one machine: a
        peer started again under the same name keeps its identity and link.  Raises ValueError for a link
        behind NAT (``LinkSpec.nat``), which only ``gossiptrain.netns`` emulates: here such a peer is a client."""
        if link.nat:
            raise ValueError(f"{name}: the simulator does not model NAT; give it client=True instead of nat=True")
        self.links.setdefault(name, LinkUse(link))
        self._addresses.setdefault(name, len(self._addresses))
        return SimulatedPort(self, name, client)

    def address(self, name: str) -> str:
        index = self._addresses[name] + 2
        return f"/ip4/10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}/tcp/4001"

    def transfer(self, src: str, dst: str | None, size: int) -> tuple[float, float]:
        """Queue ``size`` bytes from ``src`` to ``dst`` (None: a DHT node, an ideal link as far as ``src``);
        returns when they have left ``src``'s uplink and when they arrive."""
        now = asyncio.get_running_loop().time()
        a = self.links[src]
        b = self.links[dst] if dst is not None else LinkUse(LinkSpec(mbit=math.inf, rtt_ms=a.spec.rtt_ms))
        a.sent_bytes += size
        b.received_bytes += size
        up_start = max(now, a.up_free)
        a.up_free = up_start + size * a.seconds_per_byte
        left = a.up_free
        rtt = (a.spec.rtt_ms + b.spec.rtt_ms) / 2e3
        loss = 1 - math.sqrt((1 - a.spec.loss) * (1 - b.spec.loss))
        packets = -(-size // MSS)
        lost = self._losses(packets, loss)
        window_rounds = 0
        if dst is not None and rtt:  # TCP's congestion window between the two: slow start, loss recovery
            rate = min(a.spec.mbit, b.spec.mbit) * 1e6 / 8
            window_rounds = self._connections.setdefault((src, dst), TcpWindow()).send(size, now, rtt, rate, lost)
            left = max(left, up_start + window_rounds * rtt)
        through = b.down.take(up_start + a.one_way, size * b.seconds_per_byte, now) if dst is not None else 0.0
        arrival = max(through, left + a.one_way + min(size, MSS) * b.seconds_per_byte) + b.one_way
        jitter = (a.spec.jitter_ms + b.spec.jitter_ms) / 2e3
        if jitter:
            arrival += self.rng.uniform(-jitter, jitter)
        if lost:  # a short message waits a retransmission timeout; a longer one a round trip per loss (SACK)
            arrival += max(MIN_RTO, 2 * rtt) if packets <= SHORT_PACKETS else rtt * min(lost, MAX_RECOVERIES)
        return left, max(arrival, now)

    def _losses(self, packets: int, loss: float) -> int:
        """How many of ``packets`` are lost (a Poisson draw of mean ``packets * loss``, from the seed)."""
        if not loss:
            return 0
        mean, lost, level = packets * loss, 0, self.rng.random()
        term = total = math.exp(-mean)
        while level > total and lost < packets:
            lost += 1
            term *= mean / lost
            total += term
        return lost

    def dht_hops(self) -> int:
        """Round trips of a DHT store or get: one to the nodes nearest to the key, after a lookup of them that
        takes more the larger the swarm (a node of a swarm within one bucket knows them all)."""
        peers = max(1, len(self.transports))
        return 1 + max(0, math.ceil(math.log2(peers / DHT_BUCKET) / DHT_BITS_PER_HOP))

    async def dht_round_trips(self, name: str, request_bytes: int, reply_bytes: int) -> None:
        """A DHT operation of peer ``name``: ``dht_hops()`` round trips, the last carrying the bytes."""
        hops = self.dht_hops()
        for hop in range(hops):
            last = hop == hops - 1
            _, there = self.transfer(name, None, request_bytes if last else RECORD_OVERHEAD)
            await asyncio.sleep(there - asyncio.get_running_loop().time())
            a, now = self.links[name], asyncio.get_running_loop().time()
            size = reply_bytes if last else RECORD_OVERHEAD * 4
            a.received_bytes += size
            through = a.down.take(now + a.one_way, size * a.seconds_per_byte, now)
            await asyncio.sleep(through + a.one_way - now)

    async def open_stream(
        self, src: SimulatedTransport, peer_id: str, protocol: str
    ) -> tuple[StreamInfo, asyncio.StreamReader, SimulatedWriter]:
        if src.crashed:
            raise P2PDaemonError("this peer's daemon is gone")
        dst = self.transports.get(peer_id)
        a = self.links[src.name]
        if dst is None or dst.client or protocol not in dst.handlers:
            await asyncio.sleep(4 * a.one_way)  # a round trip
            reason = "no route" if dst is None or dst.client else f"protocol {protocol} not supported"
            raise P2PDaemonError(f"failed to open a stream to {peer_id}: {reason}")
        forward, backward = _Pipe(self, src, dst), _Pipe(self, dst, src)
        for pipe in (forward, backward):
            src.pipes.add(pipe)
            dst.pipes.add(pipe)
        _, arrival = self.transfer(src.name, dst.name, OPEN_BYTES)
        forward.last_arrival = arrival  # its data arrives after the stream opened
        handler = dst.handlers[protocol]

        def serve() -> None:
            if dst.crashed or forward.broken:
                return
            task = asyncio.get_running_loop().create_task(
                handler(StreamInfo(src.peer_id), forward.reader, SimulatedWriter(backward))
            )
            dst.serving.add(task)
            task.add_done_callback(lambda done: self._closed(done, dst, forward, backward))

        loop = asyncio.get_running_loop()
        loop.call_at(arrival, serve)
        await asyncio.sleep(arrival - loop.time())
        _, back = self.transfer(dst.name, src.name, OPEN_BYTES)  # the acknowledgement
        await asyncio.sleep(back - loop.time())
        return StreamInfo(dst.peer_id), backward.reader, SimulatedWriter(forward)

    @staticmethod
    def _closed(task: asyncio.Task, dst: SimulatedTransport, *pipes: _Pipe) -> None:
        dst.serving.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a handler's error is its own to log, as p2pd's handlers' are
        for pipe in pipes:
            pipe.src.pipes.discard(pipe)
            pipe.dst.pipes.discard(pipe)

    def bytes_of(self, name: str) -> tuple[int, int]:
        """Bytes that peer ``name``'s link sent and received so far (streams and DHT)."""
        link = self.links[name]
        return link.sent_bytes, link.received_bytes
