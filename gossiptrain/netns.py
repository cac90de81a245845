"""Emulated links for tests and benchmarks: peers in network namespaces behind bandwidth-limited veths.

``EmulatedLinks(n, mbit=50)`` builds, with ``ip`` and ``tc`` (Linux, root or CAP_NET_ADMIN)::

    namespace <prefix>-0  eth0 10.47.0.1/24 ──veth── v0 ┐
    namespace <prefix>-1  eth0 10.47.0.2/24 ──veth── v1 ┼─ bridge br0 in namespace <prefix>-hub
    ...                                                  ┘

Each peer's namespace has its loopback up and one veth to a bridge in a hub namespace of its own, so
that nothing is added to the host's (root) namespace.  A ``tbf`` qdisc of ``mbit`` Mbit/s sits on both
ends of each veth: on ``eth0`` it limits what the peer sends (egress), on the hub's ``v<i>`` what the
peer receives (ingress); the bridge itself is unlimited, as an internet backbone between home links.

Latency: none is added.  The ``netem`` qdisc, the usual way, is not available on every kernel (it
is missing on this project's test machines), and the alternatives (an eBPF program that sets
departure times under ``fq``, or a userspace proxy) are not worth their weight here.  The
round-trip time is therefore sub-millisecond, plus the queueing delay that ``tbf`` adds under load
(at most ``queue_ms``).

Cleanup: leaving the ``with`` block (also by an exception) kills any process still running in the
namespaces (SIGKILL: they were started for this emulation), then deletes the namespaces, which
deletes their veths and the bridge.  Names hold the pid of the creating process, so that parallel
runs do not collide and ``remove_stale()`` can delete what a SIGKILLed run left behind.

Run something in namespace ``i`` with ``subprocess.Popen([*links.exec_prefix(i), "python", ...])``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time

logger = logging.getLogger(__name__)

NAME_PREFIX = "gtnet"
DEFAULT_SUBNET = "10.47.0.0/24"


class EmulationUnavailable(PermissionError):
    """This machine or user cannot create the emulated links (no ``ip``/``tc``, no rights, no ``tbf``)."""


def _run(*argv: str) -> str:
    """Run ``argv``; raise ``EmulationUnavailable`` for a missing right or tool, RuntimeError otherwise."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise EmulationUnavailable(f"{argv[0]!r} is not installed: install iproute2 (ip, tc)") from None
    if done.returncode != 0:
        message = f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}"
        if re.search(r"permission|not permitted|operation not supported|unknown|no such file", done.stderr, re.I):
            raise EmulationUnavailable(message + " (needs root or CAP_NET_ADMIN, and the tbf qdisc)")
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
        match = re.fullmatch(rf"{NAME_PREFIX}-(\d+)-\w+-(?:\d+|hub)", name)
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


class EmulatedLinks:
    """``n`` network namespaces, each behind a link limited to ``mbit`` Mbit/s in each direction.

    Args:
        n: number of namespaces (peers); at most 250 in a /24.
        mbit: bandwidth of each peer's link, per direction, in Mbit/s.
        subnet: IPv4 subnet of the peers' addresses (peer ``i`` gets host ``i + 1``).  The namespaces are
            isolated from the host, but a subnet the host already uses is refused, to avoid confusion.
        queue_ms: how long a packet may wait in a ``tbf`` queue before it is dropped (the queue's length).

    Raises ``EmulationUnavailable`` (a ``PermissionError``) from ``__enter__`` if ``ip``/``tc``, the rights
    to use them, or the ``tbf`` qdisc are missing: callers (tests) can skip on it.
    """

    def __init__(self, n: int, mbit: float = 50.0, subnet: str = DEFAULT_SUBNET, queue_ms: float = 100.0):
        self.subnet = ipaddress.ip_network(subnet)
        if n < 1 or n > self.subnet.num_addresses - 3:
            raise ValueError(f"{n} namespaces do not fit in {subnet}")
        self.n, self.mbit, self.queue_ms = n, mbit, queue_ms
        tag = f"{NAME_PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.hub = f"{tag}-hub"
        self.names = [f"{tag}-{i}" for i in range(n)]
        self._created: list[str] = []

    def address(self, i: int) -> str:
        """The IPv4 address of namespace ``i``."""
        return str(self.subnet.network_address + i + 1)

    def maddr(self, i: int, port: int = 0) -> str:
        """A TCP multiaddr on namespace ``i``'s address, e.g. for ``--host-maddrs``."""
        return f"/ip4/{self.address(i)}/tcp/{port}"

    def exec_prefix(self, i: int) -> list[str]:
        """The argv prefix that runs a command inside namespace ``i``."""
        return ["ip", "netns", "exec", self.names[i]]

    def bytes_moved(self, i: int) -> tuple[int, int]:
        """Bytes received and sent so far by namespace ``i`` on its link: everything, headers and DHT included."""
        link = json.loads(_run("ip", "-n", self.names[i], "-json", "-statistics", "link", "show", "eth0"))[0]
        return link["stats64"]["rx"]["bytes"], link["stats64"]["tx"]["bytes"]

    def __enter__(self) -> EmulatedLinks:
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
        missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
        if missing:
            raise EmulationUnavailable(f"{' and '.join(missing)} not found on PATH: install iproute2")
        for host in re.findall(r"inet (\S+)", _run("ip", "-4", "-o", "addr", "show")):
            if ipaddress.ip_interface(host).network.overlaps(self.subnet):
                raise ValueError(f"subnet {self.subnet} overlaps the host's address {host}: pass another subnet")

    def _build(self) -> None:
        rate = f"{self.mbit}mbit"
        burst = max(32 * 1024, int(self.mbit * 1e6 / 8 * 0.005))  # 5 ms of traffic, at least 32 KiB
        tbf = ["tbf", "rate", rate, "burst", str(burst), "latency", f"{self.queue_ms}ms"]
        for name in [self.hub, *self.names]:
            _run("ip", "netns", "add", name)
            self._created.append(name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            port = f"v{i}"
            _run("ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
            _run("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", name, "addr", "add", f"{self.address(i)}/{self.subnet.prefixlen}", "dev", "eth0")
            _run("ip", "-n", name, "link", "set", "eth0", "up")
            _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf)  # peer's egress
            _run("ip", "netns", "exec", self.hub, "tc", "qdisc", "add", "dev", port, "root", *tbf)  # peer's ingress

    def close(self) -> None:
        """Kill what still runs in the namespaces and delete them (their veths and bridge with them); idempotent."""
        for name in reversed(self._created):
            try:
                _kill_processes_in(name)
                _run("ip", "netns", "delete", name)
            except (RuntimeError, EmulationUnavailable) as e:
                logger.warning("could not delete network namespace %s: %s", name, e)
        self._created = []
