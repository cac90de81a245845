"""The simulator's network and clock, driven directly: link timing, ordering, crashes, and virtual time."""

import asyncio

import pytest
from hivemind.p2p import P2PDaemonError

from gossiptrain.linkswitch import LinkSpec
from gossiptrain.simnet import INITIAL_WINDOW, Downlink, SimulatedNetwork, TcpWindow
from gossiptrain.virtual_time import VirtualDeadlock, run


async def _pair(link: LinkSpec, seed: int = 0):
    """Two started transports on ``link``, the second serving ``/echo`` (it reads to the end, then answers)."""
    network = SimulatedNetwork(seed)
    ports = [network.port(name, link) for name in ("a", "b")]
    a, _ = await ports[0].start(ports[0].identity, None)
    b, _ = await ports[1].start(ports[1].identity, None)
    received = []

    async def echo(info, reader, writer):
        received.append(await reader.read())
        writer.write(b"done")
        writer.close()

    await b.add_binary_stream_handler("/echo", echo)
    return network, a, b, received


def test_a_message_takes_its_serialization_the_window_s_round_trips_and_the_one_way_delay():
    """8 Mbit/s (1 MB/s), 100 ms RTT: 100 kB from a fresh connection needs two round trips of slow start
    (windows of 14.5, 29 and 58 kB) and 0.1 s on the wire; it arrives about 0.25 s after it was written."""

    async def main():
        network, a, b, received = await _pair(LinkSpec(mbit=8, rtt_ms=100))
        loop = asyncio.get_running_loop()
        _, reader, writer = await a.call_binary_stream_handler(b.peer_id, "/echo")
        sent = loop.time()
        writer.write(bytes(100_000))
        writer.close()
        await reader.read()
        return loop.time() - sent, received

    elapsed, received = run(main())
    assert received == [bytes(100_000)]
    assert 0.25 < elapsed < 0.40, elapsed  # there, plus the answer's way back (0.05 s)


def test_a_window_grows_in_slow_start_is_halved_by_idle_timeouts_and_cut_by_a_loss():
    window = TcpWindow()
    rounds = window.send(100_000, now=0.0, rtt=0.1, rate=1e6, lost=0)
    assert rounds == 2 and window.window == 4 * INITIAL_WINDOW
    assert window.send(50_000, now=0.35, rtt=0.1, rate=1e6, lost=0) == 0  # soon after: the window holds it
    window.send(1000, now=10.0, rtt=0.1, rate=1e6, lost=0)  # idle for many timeouts: back to the start
    assert window.window == INITIAL_WINDOW
    window.window = 100_000
    window.send(1000, now=window.idle_from, rtt=0.1, rate=1e6, lost=2)
    assert window.window == pytest.approx(70_000)


def test_a_downlink_gives_a_message_the_free_time_before_one_queued_earlier_for_later():
    downlink = Downlink()
    assert downlink.take(10.0, 1.0, now=0.0) == 11.0  # a slow sender's message, due at t = 10
    assert downlink.take(1.0, 0.5, now=0.0) == 1.5  # a later write that arrives first does not wait for it
    assert downlink.take(10.5, 1.0, now=0.0) == 12.0  # one that overlaps waits for the busy time
    assert downlink.take(0.0, 2.0, now=0.0) == 2.5  # one that does not fit in [0, 1] goes on after [1, 1.5]


def test_jittered_messages_of_one_stream_arrive_in_the_order_written():
    async def main():
        network, a, b, received = await _pair(LinkSpec(mbit=100, rtt_ms=40, jitter_ms=30), seed=3)
        _, reader, writer = await a.call_binary_stream_handler(b.peer_id, "/echo")
        for i in range(200):
            writer.write(i.to_bytes(2, "big"))
        writer.close()
        await reader.read()
        return received

    [data] = run(main())
    assert [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)] == list(range(200))


def test_a_crashed_peer_resets_its_streams_and_cannot_be_dialed():
    async def main():
        network = SimulatedNetwork()
        ports = [network.port(name, LinkSpec(mbit=100, rtt_ms=20)) for name in ("a", "b")]
        a, _ = await ports[0].start(ports[0].identity, None)
        b, _ = await ports[1].start(ports[1].identity, None)
        opened = asyncio.Event()

        async def wait_forever(info, reader, writer):
            opened.set()
            await asyncio.Event().wait()

        await b.add_binary_stream_handler("/wait", wait_forever)
        _, reader, _ = await a.call_binary_stream_handler(b.peer_id, "/wait")
        await opened.wait()
        b.crash()
        with pytest.raises(ConnectionResetError):
            await reader.read()
        with pytest.raises(P2PDaemonError, match="no route"):
            await a.call_binary_stream_handler(b.peer_id, "/wait")
        return not b.serving

    assert run(main())


def test_virtual_time_jumps_to_timers_runs_executor_work_inline_and_names_a_hang():
    async def main():
        loop = asyncio.get_running_loop()
        await asyncio.sleep(3600)
        value = await asyncio.to_thread(lambda: 42)
        return loop.time(), value

    assert run(main(), start=5.0) == (3605.0, 42)

    async def hang():
        await asyncio.Event().wait()

    with pytest.raises(VirtualDeadlock):
        run(hang())


def test_a_link_behind_nat_is_refused_by_the_simulator_which_does_not_model_it():
    with pytest.raises(ValueError, match="client=True"):
        SimulatedNetwork().port("peer", LinkSpec(nat=True))
