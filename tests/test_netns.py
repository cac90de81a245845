"""EmulatedLinks really limits bandwidth, leaves nothing behind, and carries a gossiptrain swarm."""

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from gossiptrain.netns import NAME_PREFIX, EmulatedLinks, EmulationUnavailable, remove_stale
from gossiptrain.testing import LocalSwarm, ProcessOutput

RECEIVER = """
import socket, sys, threading, time
server = socket.create_server((sys.argv[1], 5000))
print("listening", flush=True)
received, threads = [], []

def drain(conn):
    while data := conn.recv(1 << 16):
        received.append(len(data))

for _ in range(int(sys.argv[2])):
    conn = server.accept()[0]
    started = started if threads else time.monotonic()  # we wait in accept(): data flows from here on
    threads.append(threading.Thread(target=drain, args=(conn,)))
    threads[-1].start()
for thread in threads:
    thread.join()
print(sum(received), time.monotonic() - started, flush=True)
"""

SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], 5000)) as conn:
    conn.sendall(b"x" * int(sys.argv[2]))
"""


@contextlib.contextmanager
def emulated_links(n: int, **kwargs) -> Iterator[EmulatedLinks]:
    """``EmulatedLinks(n, ...)``, or skip the test if this machine cannot create them."""
    try:
        links = EmulatedLinks(n, **kwargs).__enter__()
    except EmulationUnavailable as e:
        pytest.skip(f"cannot emulate links here: {e}")
    try:
        yield links
    finally:
        links.close()


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def root_links() -> set[str]:
    lines = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.splitlines()
    return {line.split(":")[1].strip() for line in lines}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("senders", [1, 2], ids=["one-sender", "two-senders-share-the-receivers-ingress"])
def test_a_transfer_takes_at_least_the_time_the_bandwidth_limit_implies(senders):
    """5 MB at 20 Mbit/s takes >= 2 s; with two senders, the receiver's own ingress limit is what binds."""
    mbit, total = 20, 5_000_000
    with emulated_links(1 + senders, mbit=mbit) as links, LocalSwarm() as swarm:
        receiver = subprocess.Popen(
            [*links.exec_prefix(0), sys.executable, "-c", RECEIVER, links.address(0), str(senders)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        swarm.track(receiver)
        output = ProcessOutput(receiver)
        output.wait_for(lambda line: line == "listening", timeout=20)
        for i in range(1, 1 + senders):
            swarm.track(
                subprocess.Popen(
                    [*links.exec_prefix(i), sys.executable, "-c", SENDER, links.address(0), str(total // senders)],
                    start_new_session=True,
                )
            )
        received, seconds = map(float, output.wait_for(lambda line: line[0].isdigit(), timeout=40).split())
    assert received == total
    implied = total * 8 / (mbit * 1e6)
    assert seconds >= 0.8 * implied, f"{total} bytes took {seconds:.2f}s; {mbit} Mbit/s implies {implied:.2f}s"


@pytest.mark.timeout(60)
def test_nothing_remains_after_the_context_exits_even_when_the_body_raises():
    before = root_links()
    with pytest.raises(KeyError):
        with emulated_links(3, mbit=10) as links:
            names = [links.hub, *links.names]
            assert all(name in namespaces() for name in names)
            sleeper = subprocess.Popen([*links.exec_prefix(1), "sleep", "600"], start_new_session=True)
            raise KeyError("the body failed")
    assert not any(name in namespaces() for name in names)
    assert root_links() == before  # nothing was ever created in the root namespace
    assert sleeper.wait(timeout=10) != 0  # what still ran inside was killed, so the namespace really went


@pytest.mark.timeout(60)
def test_no_namespace_remains_when_setup_fails_half_way():
    links = EmulatedLinks(2, mbit=10)
    build = links._build

    def build_then_fail() -> None:
        build()
        raise ZeroDivisionError("setup failed after the links were made")

    links._build = build_then_fail
    try:
        links.__enter__()
    except EmulationUnavailable as e:
        pytest.skip(f"cannot emulate links here: {e}")
    except ZeroDivisionError:
        pass
    assert not any(name in namespaces() for name in [links.hub, *links.names])


@pytest.mark.timeout(60)
def test_remove_stale_deletes_only_namespaces_of_dead_runs():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{NAME_PREFIX}-{dead.pid}-abcdef-hub"
    try:
        subprocess.run(["ip", "netns", "add", stale], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot create a network namespace here: {e}")
    try:
        with emulated_links(1) as links:
            assert remove_stale() == [stale]
            assert links.names[0] in namespaces()  # its creator (this process) is alive
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)


@pytest.mark.timeout(180)
def test_peers_in_separate_namespaces_average_over_limited_links():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(links: EmulatedLinks, i: int, *args: str) -> ProcessOutput:
        process = subprocess.Popen(
            [*links.exec_prefix(i), sys.executable, "-m", "gossiptrain", *args, "--host-maddrs", links.maddr(i)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
        )
        swarm.track(process)
        return ProcessOutput(process)

    with emulated_links(3, mbit=20) as links, LocalSwarm() as swarm:
        bootstrap = start(links, 0, "bootstrap").wait_for(lambda line: line.startswith("/ip4/"), timeout=60)
        assert bootstrap.startswith(f"/ip4/{links.address(0)}/")
        peers = [
            start(links, i, "peer", "--initial-peers", bootstrap, "--seed", str(i), "--average-every", "1")
            for i in (1, 2)
        ]
        started = time.monotonic()
        for output in peers:
            output.wait_for(lambda line: "averaged" in line and "group 2" in line, timeout=150)
        assert time.monotonic() - started < 150
