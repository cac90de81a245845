"""Peer's bookkeeping, driven without a daemon: inbound streams from fake readers and writers, a fake p2p."""

import asyncio
from types import SimpleNamespace

import msgpack
import torch

from gossiptrain.auth import Identity
from gossiptrain.peer import MAX_CAUGHT, Peer, RecentSet
from gossiptrain.rounds import RoundResult, Timeouts
from gossiptrain.transport import FRAME_PREFIX, FrameKind

NOW = 100.0  # the swarm's time in these tests: round 100 of one-second slots


def _id(text: str) -> SimpleNamespace:
    return SimpleNamespace(to_base58=lambda: text)


class FakeWriter:
    def __init__(self):
        self.data, self.closed = bytearray(), False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def frames(self) -> list[tuple[FrameKind, dict]]:
        frames, data = [], bytes(self.data)
        while data:
            kind, length = FRAME_PREFIX.unpack(data[: FRAME_PREFIX.size])
            payload, data = data[FRAME_PREFIX.size : FRAME_PREFIX.size + length], data[FRAME_PREFIX.size + length :]
            frames.append((FrameKind(kind), msgpack.unpackb(payload)))
        return frames


async def _hello_stream(peer: Peer, sender: str, round_id: int) -> FakeWriter:
    """Run ``peer``'s handler on a stream that carries one HELLO for ``round_id`` and then closes."""
    reader, writer = asyncio.StreamReader(), FakeWriter()
    payload = msgpack.packb({"round_id": round_id, "sender": sender})
    reader.feed_data(FRAME_PREFIX.pack(FrameKind.HELLO, len(payload)) + payload)
    reader.feed_eof()
    await peer._handle_stream(SimpleNamespace(peer_id=_id(sender)), reader, writer)
    return writer


async def test_our_own_round_not_starting_in_time_is_answered_as_ours_and_not_charged_to_the_sender():
    now = [NOW]
    peer = Peer("unit", round_interval=1.0, timeouts=Timeouts(join=0.05, part=0.05), clock=lambda: now[0])
    writer = await _hello_stream(peer, "sender", 100)  # we never start round 100
    [(kind, message)] = writer.frames()
    assert kind == FrameKind.REJECT and "not in round 100" in message["reason"], message
    assert not peer.rejections, dict(peer.rejections)  # the sender did nothing wrong
    assert writer.closed


async def test_an_unreadable_hello_is_still_charged_to_its_sender():
    peer = Peer("unit", round_interval=1.0, timeouts=Timeouts(join=0.05, part=0.05), clock=lambda: NOW)
    reader, writer = asyncio.StreamReader(), FakeWriter()
    reader.feed_data(FRAME_PREFIX.pack(FrameKind.HELLO, 3) + b"\xc1\xc1\xc1")  # not msgpack
    reader.feed_eof()
    await peer._handle_stream(SimpleNamespace(peer_id=_id("sender")), reader, writer)
    assert dict(peer.rejections) == {"garbage": 1}


async def test_slots_made_by_hellos_for_rounds_we_never_join_do_not_accumulate():
    now = [NOW]
    peer = Peer("unit", round_interval=1.0, timeouts=Timeouts(join=0.01, part=0.01), clock=lambda: now[0])
    ours = asyncio.get_running_loop().create_future()
    ours.set_result(object())  # an exchange of our own, still running: never dropped by others' HELLOs
    peer._exchanges[95] = ours
    for round_id in range(100, 140):
        now[0] = float(round_id)
        await _hello_stream(peer, "sender", round_id)
    assert set(peer._exchanges) <= {95, 137, 138, 139, 140}, sorted(peer._exchanges)
    assert peer._exchanges[95] is ours
    assert not peer.rejections


def test_caught_peers_are_bounded_and_a_peer_still_sending_stays_caught():
    caught = RecentSet(3)
    caught.update(["a", "b", "c"])
    assert "a" in caught  # a caught peer seen again (its slice, its mean) is kept longest
    caught.add("d")
    assert caught == {"a", "c", "d"}
    peer = Peer("unit")
    peer.caught.update(f"sybil{i}" for i in range(MAX_CAUGHT + 10))
    assert len(peer.caught) == MAX_CAUGHT


class FakeP2P:
    """The daemon as a client sees it: who it is connected to, and the dials asked of it."""

    def __init__(self, me: str, connected: set[str]):
        self.peer_id, self.connected, self.dialed = _id(me), connected, []

    async def connected_peers(self) -> set[str]:
        return set(self.connected)

    async def connect(self, peer: str, maddrs) -> None:
        self.dialed.append(peer)
        self.connected.add(peer)


class FakeMembership:
    def __init__(self, records: dict[str, dict]):
        self.records = records

    async def live_peers(self) -> dict[str, dict]:
        return self.records

    async def join_round(self, round_id: int, info: dict, expiration: float) -> bool:
        return True

    async def round_participants(self, round_id: int) -> dict[str, dict]:
        return self.records


def _client_with_reducer(connected: set[str]) -> tuple[Peer, FakeP2P, str]:
    me, reducer = Identity.generate().peer_id, Identity.generate().peer_id
    peer = Peer("unit", initial_peers=[f"/ip4/127.0.0.1/tcp/1/p2p/{reducer}"], client_mode=True, clock=lambda: NOW)
    peer.p2p = FakeP2P(me, connected)
    record = {"schema": None, "numel": 8, "mode": "params", "maddrs": ["/ip4/127.0.0.1/tcp/1"]}
    records = {me: {**record, "client": True}, reducer: {**record, "client": False}}
    peer.membership = FakeMembership(records)

    async def assemble(round_id, own, view, role, read_started):  # the reducer leads the cell and puts us with it
        return sorted(records), records

    peer._assemble = assemble
    return peer, peer.p2p, reducer


async def test_a_client_re_dials_a_reducer_whose_connection_dropped():
    peer, p2p, reducer = _client_with_reducer(connected=set())
    peer._connected.add(reducer)  # dialed once; the daemon has since lost the connection (a restart)
    await peer.live_peers()
    assert p2p.dialed == [reducer]


async def test_a_client_re_dials_a_reducer_that_did_not_answer_its_round():
    peer, p2p, reducer = _client_with_reducer(connected=set())
    answers = [set(), {reducer}]  # the first round's stream to it fails (a restart the daemon did not notice)

    class Exchange:  # RoundExchange's interface to Peer.average, as a stub
        def __init__(self, p2p, *, values, **options):
            self.values = values

        async def prepare(self) -> None:
            pass

        async def run(self) -> RoundResult:
            answered = answers.pop(0)
            return RoundResult(100, "averaged" if answered else "failed", [], self.values.clone(), answered=answered)

    peer.exchange_class = Exchange
    first = await peer.average(torch.zeros(8), round_id=100)
    assert first.status == "failed" and p2p.dialed == [reducer]
    second = await peer.average(torch.zeros(8), round_id=100)  # the daemon still lists the dead connection
    assert second.status == "averaged" and p2p.dialed == [reducer, reducer]


def test_a_peer_whose_rounds_span_two_slots_takes_even_slots_where_every_peer_meets_it():
    slow, fast = (Peer("unit", round_interval=2.0, clock=lambda: 100.0) for _ in range(2))
    for _ in range(3):
        slow.timing.record(0.1, 3.0, 2.0)  # 3.5 s with the lead: two slots
    assert fast.next_round_id() == 51, "the first slot starting after the lead"
    assert slow.next_round_id() == 52, "the first multiple of its stride"
    assert slow.next_round_id(lead=0.0) == 50, "an explicit lead asks for a slot, whatever the stride"


async def test_a_joiner_takes_the_stride_the_swarm_publishes_before_it_measures_its_own():
    """A joiner whose cycle spans two slots would otherwise land in odd slots while the swarm averages in even ones."""
    me = Identity.generate().peer_id
    joiner = Peer("unit", round_interval=1.0, clock=lambda: 100.2)
    joiner.p2p = FakeP2P(me, connected=set())
    joiner.membership = FakeMembership({**{f"peer{i}": {"stride": 2} for i in range(3)}, me: {"stride": 1}})
    assert joiner.next_round_id() == 101
    await joiner.live_peers()
    assert joiner.next_round_id() == 102, "the first even slot, where the swarm meets"
