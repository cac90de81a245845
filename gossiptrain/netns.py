"""Emulated links for tests and benchmarks: peers in network namespaces, with rate, delay, jitter and loss.

``EmulatedLinks(n, mbit=50, rtt_ms=100, jitter_ms=5, loss=0.01)`` builds, with ``ip`` and ``/dev/net/tun``
(Linux, root or CAP_NET_ADMIN)::

    namespace <prefix>-0  eth0 10.47.0.1/24 (TUN) ─┐
    namespace <prefix>-1  eth0 10.47.0.2/24 (TUN) ─┼─ switch (a child process of the owner): queues, delay, loss
    ...                                            ┘

Each peer's namespace has its loopback up and a TUN device as its ``eth0``, created inside that namespace, so
that nothing is added to the host's (root) namespace.  The owner holds the TUN devices' descriptors and hands
them to a userspace switch (``gossiptrain.linkswitch``) that forwards each IPv4 packet from the sender's device
to the receiver's, through the sender's uplink and the receiver's downlink: each a queue served at ``mbit``
Mbit/s, with drop-tail after ``queue_ms`` of waiting, a quarter of ``rtt_ms`` of delay and a random loss, plus
``jitter_ms`` of jitter per path without reordering (the exact model is in ``gossiptrain.linkswitch``).  Two
peers with the same settings see ``rtt_ms`` of round-trip time, ``loss`` one way, ``mbit`` each way; one peer
can be given other settings (``overrides``).  ``netem``, the usual way, is missing on this project's machines.

The switch is pure Python, in a process of its own: the packets per second it forwards are shared by all peers, so
keep the links' total rate well below what it carries on the machine (``benchmarks/README.md``).  The TUN devices
keep the usual MTU of 1500, so that TCP behaves as over the internet.

Cleanup: leaving the ``with`` block (also by an exception, by Ctrl-C, or by SIGTERM, which inside the block
raises KeyboardInterrupt in the main thread, as ``LocalSwarm`` does) stops the switch, kills any process still
running in the namespaces (SIGKILL: they were started for this emulation), then deletes the namespaces.  If the
owner is SIGKILLed, the switch exits by itself (its control pipe closes) and the TUN devices vanish with their
descriptors; the namespaces remain, and ``remove_stale()`` deletes them: their names hold the creating pid, so
that parallel runs do not collide and a run's leftovers are known to be dead.

Run something in namespace ``i`` with ``subprocess.Popen([*links.exec_prefix(i), "python", ...])``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import struct
import subprocess
import threading
import time
from typing import Any

from gossiptrain.linkswitch import JITTER_DISTRIBUTIONS, LinkCounters, LinkSpec, SwitchProcess

logger = logging.getLogger(__name__)

NAME_PREFIX = "gtnet"
DEFAULT_SUBNET = "10.47.0.0/24"
CLONE_NEWNET = 0x40000000
DEVICE = "eth0"  # each namespace's TUN device
TXQUEUELEN = 10_000  # packets a TUN device holds for the switch: a TCP burst waits there instead of being dropped

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_CLONE_NEWNET = 0x40000000


class EmulationUnavailable(PermissionError):
    """This machine or user cannot create the emulated links (no ``ip``, no ``/dev/net/tun``, no rights)."""


def _run(*argv: str) -> str:
    """Run ``argv``; raise ``EmulationUnavailable`` for a missing right or tool, RuntimeError otherwise."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise EmulationUnavailable(f"{argv[0]!r} is not installed: install iproute2") from None
    if done.returncode != 0:
        message = f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}"
        if re.search(r"permission|not permitted|operation not supported|unknown|no such file", done.stderr, re.I):
            raise EmulationUnavailable(message + " (needs root or CAP_NET_ADMIN)")
        raise RuntimeError(message)
    return done.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def _kill_processes_in(namespace: str) -> None:
    """SIGKILL every process still running in ``namespace`` (so that it and its links really go)."""
    for _ in range(3):
        try:
            pids = [int(p) for p in _run("ip", "netns", "pids", namespace).split()]
        except RuntimeError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def remove_stale() -> list[str]:
    """Delete the namespaces of ``EmulatedLinks`` whose creating process is dead; returns their names."""
    removed = []
    for name in _namespaces():
        match = re.fullmatch(rf"{NAME_PREFIX}-(\d+)-[\w-]+", name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its owner is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_processes_in(name)
        _run("ip", "netns", "delete", name)
        removed.append(name)
    return removed


def _open_tun_in(namespace: str) -> int:
    """Create the TUN device ``eth0`` inside ``namespace``; returns its descriptor (the device lives as long as it).

    The device is created in a short-lived thread that enters the namespace (``setns`` changes only the calling
    thread's namespace), so that it never appears in the host's namespace.
    """
    result: dict[str, Any] = {}

    def create() -> None:
        try:
            namespace_fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)  # where ``ip netns add`` mounts it
            try:
                if ctypes.CDLL(None, use_errno=True).setns(namespace_fd, _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns into {namespace}: {os.strerror(code)}")
            finally:
                os.close(namespace_fd)
            fd = os.open("/dev/net/tun", os.O_RDWR)
            try:
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", DEVICE.encode(), _IFF_TUN | _IFF_NO_PI))
            except BaseException:
                os.close(fd)
                raise
            result["fd"] = fd
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=create, name=f"tun-in-{namespace}")
    thread.start()
    thread.join()
    if "error" in result:
        error = result["error"]
        if isinstance(error, (PermissionError, FileNotFoundError)) or error.errno in (errno.EPERM, errno.ENODEV):
            raise EmulationUnavailable(
                f"cannot create a TUN device in {namespace}: {error} (needs /dev/net/tun and root or CAP_NET_ADMIN)"
            )
        raise RuntimeError(f"cannot create a TUN device in {namespace}: {error}")
    return result["fd"]


def enter_namespace(name: str) -> None:
    """Move the calling process into network namespace ``name`` (``setns``): for a ``multiprocessing``
    child that cannot be started with ``EmulatedLinks.exec_prefix``; what it starts afterwards (a
    libp2p daemon) is in the namespace too."""
    with open(f"/run/netns/{name}") as namespace:
        if ctypes.CDLL(None, use_errno=True).setns(namespace.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"cannot enter network namespace {name}")


class EmulatedLinks:
    """``n`` network namespaces, each behind a link with a rate, a round-trip time, jitter and loss.

    Args:
        n: number of namespaces (peers); at most 250 in a /24.
        mbit: rate of each peer's link, per direction, in Mbit/s.
        rtt_ms: round-trip time between two peers (half of it one way), in ms.
        jitter_ms: spread of the one-way delay, in ms: ``jitter`` says how it is distributed.
        loss: share of the packets lost one way between two peers, in [0, 1).
        queue_ms: how long a packet may wait in a link's queue before it is dropped (the queue's length).
        overrides: per peer, other values of ``mbit``, ``rtt_ms``, ``jitter_ms``, ``loss`` or ``queue_ms``,
            e.g. ``{3: {"mbit": 5.0}}`` for one slow peer; a path between two peers gets the mean of their
            RTTs and jitters, a loss between theirs, and the smaller rate.
        jitter: "uniform" (in ``±jitter_ms``) or "normal" (standard deviation ``jitter_ms``).
        subnet: IPv4 subnet of the peers' addresses (peer ``i`` gets host ``i + 1``).  The namespaces are
            isolated from the host, but a subnet the host already uses is refused, to avoid confusion.

    Raises ``EmulationUnavailable`` (a ``PermissionError``) from ``__enter__`` if ``ip``, ``/dev/net/tun`` or
    the rights to use them are missing: callers (tests) can skip on it.
    """

    def __init__(
        self,
        n: int,
        mbit: float = 50.0,
        rtt_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        queue_ms: float = 100.0,
        overrides: dict[int, dict[str, float | bool]] | None = None,
        jitter: str = "uniform",
        subnet: str = DEFAULT_SUBNET,
    ):
        self.subnet = ipaddress.ip_network(subnet)
        if n < 1 or n > self.subnet.num_addresses - 3:
            raise ValueError(f"{n} namespaces do not fit in {subnet}")
        if jitter not in JITTER_DISTRIBUTIONS:
            raise ValueError(f"jitter must be one of {JITTER_DISTRIBUTIONS}, not {jitter!r}")
        default = LinkSpec(mbit=mbit, rtt_ms=rtt_ms, jitter_ms=jitter_ms, loss=loss, queue_ms=queue_ms)
        overrides = overrides or {}
        if unknown := set(overrides) - set(range(n)):
            raise ValueError(f"overrides for peers {sorted(unknown)}, but the peers are 0..{n - 1}")
        fields = {field.name for field in dataclasses.fields(LinkSpec)}
        if unknown := {key for settings in overrides.values() for key in settings} - fields:
            raise ValueError(f"unknown settings {sorted(unknown)} in overrides: each can set {sorted(fields)}")
        self.specs = [dataclasses.replace(default, **overrides.get(i, {})) for i in range(n)]
        self.n, self.jitter = n, jitter
        tag = f"{NAME_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.names = [f"{tag}-{i}" for i in range(n)]
        self._created: list[str] = []
        self._switch: SwitchProcess | None = None
        self._sigterm_handler: Any = None

    def address(self, i: int) -> str:
        """The IPv4 address of namespace ``i``."""
        return str(self.subnet.network_address + i + 1)

    def maddr(self, i: int, port: int = 0) -> str:
        """A TCP multiaddr on namespace ``i``'s address, e.g. for ``--host-maddrs``."""
        return f"/ip4/{self.address(i)}/tcp/{port}"

    def exec_prefix(self, i: int) -> list[str]:
        """The argv prefix that runs a command inside namespace ``i``."""
        return ["ip", "netns", "exec", self.names[i]]

    def counters(self, i: int) -> LinkCounters:
        """Packets and bytes of namespace ``i``'s link so far: sent, received, lost, dropped by a full queue."""
        if self._switch is None:
            raise RuntimeError("the links are not running: use EmulatedLinks inside a with block")
        return self._switch.counters()[i]

    def bytes_moved(self, i: int) -> tuple[int, int]:
        """Bytes received and sent so far by namespace ``i`` on its link: everything, headers and DHT included.

        Sent is what the peer put on its link (also what its queue dropped or was lost), received what reached it.
        """
        counters = self.counters(i)
        return counters.received_bytes, counters.sent_bytes

    def __enter__(self) -> EmulatedLinks:
        if self._created:
            raise RuntimeError("these links are already built: an EmulatedLinks is entered once")
        if threading.current_thread() is threading.main_thread():
            self._sigterm_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            self._check_tools()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_tools(self) -> None:
        if shutil.which("ip") is None:
            raise EmulationUnavailable("ip not found on PATH: install iproute2")
        for host in re.findall(r"inet (\S+)", _run("ip", "-4", "-o", "addr", "show")):
            if ipaddress.ip_interface(host).network.overlaps(self.subnet):
                raise ValueError(f"subnet {self.subnet} overlaps the host's address {host}: pass another subnet")

    def _build(self) -> None:
        tun_fds: list[int] = []
        try:
            for i, name in enumerate(self.names):
                _run("ip", "netns", "add", name)
                self._created.append(name)
                _run("ip", "-n", name, "link", "set", "lo", "up")
                tun_fds.append(_open_tun_in(name))
                _run("ip", "-n", name, "addr", "add", f"{self.address(i)}/{self.subnet.prefixlen}", "dev", DEVICE)
                _run("ip", "-n", name, "link", "set", DEVICE, "txqueuelen", str(TXQUEUELEN), "up")
            addresses = [self.address(i) for i in range(self.n)]
            self._switch = SwitchProcess(tun_fds, addresses, self.specs, self.jitter)
        finally:
            for fd in tun_fds:  # the switch holds its own copies; the devices now live as long as it does
                os.close(fd)

    def close(self) -> None:
        """Stop the switch, kill what still runs in the namespaces and delete them; idempotent."""
        try:
            if self._switch is not None:
                self._switch.close()
                self._switch = None
            for name in reversed(self._created):
                try:
                    _kill_processes_in(name)
                    _run("ip", "netns", "delete", name)
                except (RuntimeError, EmulationUnavailable) as e:
                    logger.warning("could not delete network namespace %s: %s", name, e)
            self._created = []
        finally:
            if self._sigterm_handler is not None:
                signal.signal(signal.SIGTERM, self._sigterm_handler)
                self._sigterm_handler = None
