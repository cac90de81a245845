"""The userspace switch behind ``EmulatedLinks``: IPv4 packets between TUN devices, with delay, jitter, rate and loss.

Each peer's namespace has a TUN device as its ``eth0``; the switch holds the other end (the file descriptor) of
every one of them.  A packet that peer ``a`` sends to peer ``b`` goes through four stages::

    a's uplink queue ── rtt_a/4 ──> b's downlink queue ── rtt_b/4 ± jitter ──> b's eth0

A queue (one per direction of each peer's link) is a FIFO served at ``mbit`` Mbit/s (counted on whole IP
packets): a token bucket that holds one packet, as an access link that serializes its packets.  A packet that
would wait longer than ``queue_ms`` in it is dropped (drop-tail, as a router's bounded queue); a packet that it
serves is then lost at random with the probability that makes a path between two peers of the same setting lose
``loss`` of its packets.  So two peers with the same ``LinkSpec`` see a round-trip time of ``rtt_ms``, a one-way
loss of ``loss``, and ``mbit`` each way; peers with different specs see the mean of their RTTs, a loss between
theirs (the share that gets through is the geometric mean of theirs) and the smaller rate.

A peer whose link has ``nat`` sits behind an emulated NAT's stateful filter, as home routers, cloud notebooks
and firewalls put it: a packet to it is dropped (counted in ``filtered_packets``) unless it sent a TCP or UDP
packet from that port to that address and port within the last ``NAT_TIMEOUT`` seconds (port-restricted
filtering; other protocols never get in).  Nobody can open a connection to it, but it can open connections, and
two peers that send to each other at once (TCP simultaneous open, as libp2p's hole punching does) get through
both filters.  Addresses are not translated: every peer keeps its own, as behind an endpoint-independent NAT,
whose mapped port is the one a peer sends from.  With ``strict_nat`` as well, an inbound TCP SYN without ACK is
dropped even on an open pinhole: simultaneous open, hence hole punching, fails, as behind a symmetric NAT (whose
mapped port changes with the destination) or a firewall that tracks TCP state; replies to its own dials get in.

Jitter is added once per packet, on the last stage: uniform in ``±j`` or normal with standard deviation ``j``,
``j`` the mean of the two ends' ``jitter_ms``.  A packet never overtakes an earlier one of the same path (it
leaves at the later of its own time and the previous packet's), since TCP takes heavy reordering for loss: on a
busy path, jitter therefore adds delay rather than spreading it both ways.

``Switch`` is the pure part (packets and times in, packets and times out), tested without any rights;
``serve`` is its I/O loop (epoll on the TUN descriptors, one thread, pure Python); ``SwitchProcess`` runs that
loop in a child process, so that the owner's GIL does not delay packets.  Its cost per packet (a write also runs
the receiver's TCP input in the switch's time) bounds the packets per second that all links carry together, on a
core shared with the peers: keep the links' total rate well below it (``benchmarks/README.md``).
The epoll timeout has a resolution of 1 ms: a packet leaves within about ±0.5 ms of its time.

Failure semantics: the child exits when its owner closes the control pipe or dies (the pipe then closes too), so
that no switch outlives its owner; the TUN devices vanish with its descriptors.  If the child dies first, the
links stop carrying packets and the owner's next ``counters()`` raises ``RuntimeError``.

This file runs as a script in the child (``python -I linkswitch.py CONFIG``): it imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import logging
import math
import os
import random
import select
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

JITTER_DISTRIBUTIONS = ("uniform", "normal")
READ_BATCH = 256  # packets read from one TUN before the timers are looked at again
MAX_PACKET = 65535
NAT_TIMEOUT = 120.0  # seconds a NAT's pinhole stays open after the last packet its peer sent on that flow
HALF_TICK = 0.0005  # epoll waits whole ms: wake half a ms early and send what is due within it, to center the error


@dataclass(frozen=True)
class LinkSpec:
    """What a peer's link does to packets, in each direction.

    Args:
        mbit: rate of each direction in Mbit/s (of IP packets); ``math.inf`` for no limit.
        rtt_ms: round-trip time between two peers of this spec; each direction of each link adds a quarter.
        jitter_ms: spread of a packet's one-way delay (see the module docstring).
        loss: share of packets lost one way between two peers of this spec, in [0, 1).
        queue_ms: longest time a packet may wait in a queue; longer, it is dropped.
        nat: behind a NAT's stateful filter: nothing gets in but replies to flows it opened (module docstring).
        strict_nat: with ``nat``, that NAT also refuses TCP simultaneous open: hole punching fails.
    """

    mbit: float = 50.0
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    queue_ms: float = 100.0
    nat: bool = False
    strict_nat: bool = False

    def __post_init__(self):
        if not self.mbit > 0:
            raise ValueError(f"mbit must be positive, not {self.mbit}")
        if not (self.rtt_ms >= 0 and self.jitter_ms >= 0 and self.queue_ms > 0):
            raise ValueError(f"rtt_ms and jitter_ms must be >= 0 and queue_ms > 0: {self}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), not {self.loss}")
        if self.strict_nat and not self.nat:
            raise ValueError("strict_nat is a kind of NAT: give nat=True as well")


@dataclass
class LinkCounters:
    """Packets of one peer's link since the switch started.

    ``sent_*`` is what the peer put on its link, ``received_*`` what was delivered to it; ``lost_packets`` and
    ``overflow_packets`` count random loss and drop-tail on either direction of this peer's link (a packet
    from ``a`` to ``b`` lost on ``b``'s downlink counts for ``b``); ``unroutable_packets`` are what the peer
    sent that was not IPv4 to another peer (IPv6 router solicitations, broadcasts): they are dropped;
    ``filtered_packets`` are those that this peer's NAT kept out (``LinkSpec.nat``).
    """

    sent_packets: int = 0
    sent_bytes: int = 0
    received_packets: int = 0
    received_bytes: int = 0
    lost_packets: int = 0
    overflow_packets: int = 0
    unroutable_packets: int = 0
    filtered_packets: int = 0


def _ports(packet: bytes) -> tuple[int, int] | None:
    """A TCP or UDP packet's (source port, destination port); None for other protocols or a truncated header."""
    start = (packet[0] & 0x0F) * 4
    if packet[9] not in (6, 17) or len(packet) < start + 4:
        return None
    return int.from_bytes(packet[start : start + 2], "big"), int.from_bytes(packet[start + 2 : start + 4], "big")


def _is_bare_syn(packet: bytes) -> bool:
    """Whether a packet is a TCP SYN without ACK: a connection's first packet, not a reply to one."""
    flags_at = (packet[0] & 0x0F) * 4 + 13
    return packet[9] == 6 and len(packet) > flags_at and packet[flags_at] & 0x12 == 0x02


class _Queue:
    """One direction of a link: a FIFO served at a rate, bounded in waiting time, then a random loss."""

    __slots__ = ("seconds_per_byte", "limit", "loss", "free_at", "lost", "overflowed", "_random")

    def __init__(self, spec: LinkSpec, rng: random.Random):
        self.seconds_per_byte = 8 / (spec.mbit * 1e6)
        self.limit = spec.queue_ms / 1e3
        self.loss = 1 - math.sqrt(1 - spec.loss)  # two such queues on a path lose ``spec.loss``
        self.free_at = 0.0
        self.lost = self.overflowed = 0
        self._random = rng.random

    def admit(self, t: float, size: int) -> float | None:
        """When a packet of ``size`` bytes arriving at ``t`` has been sent on, or None if it is dropped."""
        start = self.free_at if self.free_at > t else t
        if start - t > self.limit:
            self.overflowed += 1
            return None
        self.free_at = start + size * self.seconds_per_byte
        if self.loss and self._random() < self.loss:
            self.lost += 1
            return None
        return self.free_at


class Switch:
    """Forwards IPv4 packets between peers; pure: the caller reads and writes the devices and tells the time.

    Args:
        specs: each peer's link.
        addresses: each peer's IPv4 address, as 4 bytes.
        jitter: "uniform" or "normal" (see the module docstring).
        rng: the source of loss and jitter.
    """

    def __init__(
        self,
        specs: Sequence[LinkSpec],
        addresses: Sequence[bytes],
        jitter: str = "uniform",
        rng: random.Random | None = None,
    ):
        if jitter not in JITTER_DISTRIBUTIONS:
            raise ValueError(f"jitter must be one of {JITTER_DISTRIBUTIONS}, not {jitter!r}")
        rng = rng or random.Random()
        n = len(specs)
        self._peer_of = {address: i for i, address in enumerate(addresses)}
        self._up = [_Queue(spec, rng) for spec in specs]
        self._down = [_Queue(spec, rng) for spec in specs]
        self._delay = [spec.rtt_ms / 4e3 for spec in specs]
        self._jitter = [[(a.jitter_ms + b.jitter_ms) / 2e3 for b in specs] for a in specs]
        if jitter == "uniform":
            self._sample = lambda scale: rng.uniform(-scale, scale)
        else:
            self._sample = lambda scale: rng.gauss(0.0, scale)
        self._last = [[0.0] * n for _ in range(n)]  # the latest delivery time on each path, for FIFO
        self._sent = [[0, 0] for _ in range(n)]
        self._received = [[0, 0] for _ in range(n)]
        self._unroutable = [0] * n
        self._nat = [spec.nat for spec in specs]
        self._strict = [spec.strict_nat for spec in specs]
        # per peer behind NAT: (remote address, remote port, own port) -> when it last sent on that flow
        self._pinholes: list[dict[tuple[bytes, int, int], float]] = [{} for _ in range(n)]
        self._filtered = [0] * n
        self._pending: list[tuple[float, int, bool, int, int, bytes]] = []  # (time, seq, delivered, src, dst, pkt)
        self._seq = itertools.count()

    def receive(self, now: float, src: int, packet: bytes) -> None:
        """Take a packet that peer ``src`` sent at ``now``."""
        dst = self._peer_of.get(packet[16:20]) if len(packet) >= 20 and packet[0] >> 4 == 4 else None
        if dst is None:
            self._unroutable[src] += 1
            return
        sent = self._sent[src]
        sent[0] += 1
        sent[1] += len(packet)
        if (self._nat[src] or self._nat[dst]) and not self._through_nat(now, src, dst, packet):
            self._filtered[dst] += 1
            return
        done = self._up[src].admit(now, len(packet))
        if done is not None:
            heapq.heappush(self._pending, (done + self._delay[src], next(self._seq), False, src, dst, packet))

    def _through_nat(self, now: float, src: int, dst: int, packet: bytes) -> bool:
        """Open ``src``'s pinhole for this flow if it is behind NAT; whether ``dst``'s NAT, if any, lets it in."""
        ports = _ports(packet)
        if self._nat[src] and ports is not None:
            pinholes = self._pinholes[src]
            if len(pinholes) > 4096:  # forget flows that timed out, now and then
                self._pinholes[src] = pinholes = {k: t for k, t in pinholes.items() if now - t <= NAT_TIMEOUT}
            pinholes[(packet[16:20], ports[1], ports[0])] = now
        if not self._nat[dst]:
            return True
        if self._strict[dst] and _is_bare_syn(packet):
            return False
        opened = None if ports is None else self._pinholes[dst].get((packet[12:16], ports[0], ports[1]))
        return opened is not None and now - opened <= NAT_TIMEOUT

    def next_time(self) -> float | None:
        """When ``due`` will next have something to do; None while nothing is in flight."""
        return self._pending[0][0] if self._pending else None

    def due(self, now: float) -> Iterator[tuple[int, bytes]]:
        """The packets to deliver by ``now``, in order, as (peer, packet)."""
        pending = self._pending
        while pending and pending[0][0] <= now:
            t, _, delivered, src, dst, packet = heapq.heappop(pending)
            if delivered:
                received = self._received[dst]
                received[0] += 1
                received[1] += len(packet)
                yield dst, packet
                continue
            done = self._down[dst].admit(t, len(packet))
            if done is None:
                continue
            t = done + self._delay[dst]
            if jitter := self._jitter[src][dst]:
                t = max(done, t + self._sample(jitter))
            last = self._last[src]
            if last[dst] > t:
                t = last[dst]
            last[dst] = t
            heapq.heappush(pending, (t, next(self._seq), True, src, dst, packet))

    def counters(self) -> list[LinkCounters]:
        """Each peer's counters, a snapshot."""
        return [
            LinkCounters(
                sent_packets=self._sent[i][0],
                sent_bytes=self._sent[i][1],
                received_packets=self._received[i][0],
                received_bytes=self._received[i][1],
                lost_packets=self._up[i].lost + self._down[i].lost,
                overflow_packets=self._up[i].overflowed + self._down[i].overflowed,
                unroutable_packets=self._unroutable[i],
                filtered_packets=self._filtered[i],
            )
            for i in range(len(self._up))
        ]


def serve(switch: Switch, tun_fds: Sequence[int], control_in: int, control_out: int) -> None:
    """Move packets between the TUN devices through ``switch`` until ``control_in`` reaches its end.

    Each line read on ``control_in`` is answered with one JSON line on ``control_out``: the counters.
    """
    selector = selectors.DefaultSelector()
    for i, fd in enumerate(tun_fds):
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ, i)
    selector.register(control_in, selectors.EVENT_READ, None)
    os.write(control_out, b"ready\n")
    while True:
        next_time = switch.next_time()
        timeout = None if next_time is None else max(0.0, next_time - time.monotonic() - HALF_TICK)
        for key, _ in selector.select(timeout):
            if key.data is None:
                requests = os.read(control_in, 4096)
                if not requests:
                    return
                for _ in range(requests.count(b"\n")):
                    answer = [dataclasses.asdict(c) for c in switch.counters()]
                    os.write(control_out, json.dumps(answer).encode() + b"\n")
                continue
            now = time.monotonic()
            for _ in range(READ_BATCH):
                try:
                    packet = os.read(key.fd, MAX_PACKET)
                except BlockingIOError:
                    break
                switch.receive(now, key.data, packet)
        for dst, packet in switch.due(time.monotonic() + HALF_TICK):
            try:
                os.write(tun_fds[dst], packet)
            except OSError as e:  # the peer's device is going away (its namespace is being deleted)
                logger.debug("could not deliver a packet to peer %d: %s", dst, e)


class SwitchProcess:
    """A ``Switch`` serving TUN devices in a child process, for as long as this object (and its process) lives.

    Args:
        tun_fds: the open TUN devices, one per peer; the child gets copies, the caller may close its own.
        addresses: each peer's IPv4 address (dotted).
        specs: each peer's link.
        jitter: "uniform" or "normal".
        timeout: how long to wait for the child to start.

    Raises RuntimeError if the child does not start.
    """

    def __init__(
        self,
        tun_fds: Sequence[int],
        addresses: Sequence[str],
        specs: Sequence[LinkSpec],
        jitter: str = "uniform",
        timeout: float = 20.0,
    ):
        config = {
            "fds": list(tun_fds),
            "addresses": list(addresses),
            "specs": [dataclasses.asdict(spec) for spec in specs],
            "jitter": jitter,
        }
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=tuple(tun_fds),
            start_new_session=True,  # Ctrl-C in a terminal reaches the owner, which stops it in order
        )
        try:
            if self._read_line(timeout) != b"ready":
                raise RuntimeError("the link switch answered something else than 'ready'")
        except BaseException:
            self.close()
            raise

    def _read_line(self, timeout: float) -> bytes:
        deadline, line = time.monotonic() + timeout, b""
        fd = self.process.stdout.fileno()
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise RuntimeError(f"the link switch (pid {self.process.pid}) did not answer within {timeout}s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(
                    f"the link switch (pid {self.process.pid}) exited (code {self.process.wait(timeout=5)}): "
                    "the links carry no packets any more; its error, if any, is on stderr"
                )
            line += chunk
        return line[:-1]

    def counters(self, timeout: float = 10.0) -> list[LinkCounters]:
        """Each peer's counters; raises RuntimeError if the switch died."""
        with self._lock:
            try:
                self.process.stdin.write(b"\n")
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError):
                raise RuntimeError(f"the link switch (pid {self.process.pid}) is not running") from None
            return [LinkCounters(**c) for c in json.loads(self._read_line(timeout))]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the switch (its TUN devices vanish with it unless someone else holds them); idempotent."""
        with self._lock:
            if self.process.stdin and not self.process.stdin.closed:
                try:
                    self.process.stdin.close()
                except BrokenPipeError:
                    pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("link switch (pid %d) did not stop within %ss: killing it", self.process.pid, timeout)
                self.process.kill()
                self.process.wait()
            else:
                if self.process.returncode != 0:
                    logger.warning("the link switch exited with code %d: see stderr", self.process.returncode)
            if self.process.stdout:
                self.process.stdout.close()


def main(config_json: str) -> None:
    """The child's entry point: serve the TUN descriptors it inherited, as ``config_json`` describes."""
    logging.basicConfig(level=logging.WARNING, format="linkswitch: %(levelname)s %(message)s")
    config = json.loads(config_json)
    switch = Switch(
        [LinkSpec(**spec) for spec in config["specs"]],
        [bytes(map(int, address.split("."))) for address in config["addresses"]],
        config["jitter"],
    )
    serve(switch, config["fds"], sys.stdin.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    main(sys.argv[1])
