"""RoundExchange over in-memory streams: what a round sends, when, from which thread, and what it changes."""

import asyncio
import threading

import pytest
import torch

from gossiptrain.allreduce import GroupPlan, ShardReduction
from gossiptrain.codecs import Codec, get_codec
from gossiptrain.exchange import RoundExchange
from gossiptrain.rejections import Rejections
from gossiptrain.rounds import Timeouts
from gossiptrain.simnet import SimulatedNetwork
from gossiptrain.simulation import IDEAL_LINK
from gossiptrain.transport import ByteCounter, FrameKind, close_after_peer, read_message

TIMEOUTS = Timeouts(join=5.0, straggler_grace=0.0, straggler_min=0.1)


async def _group(names, numel, *, clients=(), exchange_classes=None, residuals=None, state_locks=None, codec="none"):
    """Exchanges of one group over simulated streams of ideal links, prepared (as ``Peer.average`` does)."""
    network, transports = SimulatedNetwork(), {}
    for name in names:
        port = network.port(name, IDEAL_LINK, client=name in clients)
        transports[name], _ = await port.start(port.identity, None)
    ids = {name: transport.peer_id.to_base58() for name, transport in transports.items()}
    plan = GroupPlan.build("exchange-test", 7, list(ids.values()), numel, frozenset(ids[c] for c in clients))
    exchanges = {}

    def handler_of(owner):
        async def handle(info, reader, writer):
            try:
                _, hello = await read_message(reader, ByteCounter(), timeout=5.0, expect=(FrameKind.HELLO,))
                await exchanges[owner].handle_contribution(info.peer_id.to_base58(), hello, reader, writer)
            finally:
                await close_after_peer(reader, writer, 1.0)

        return handle

    values = {}
    for i, name in enumerate(names):
        await transports[name].add_binary_stream_handler("/test", handler_of(name))
        values[name] = torch.randn(numel, generator=torch.Generator().manual_seed(i))
        exchange_class = (exchange_classes or {}).get(name, RoundExchange)
        exchanges[name] = exchange_class(
            transports[name],
            protocol="/test",
            plan=plan,
            me=ids[name],
            values=values[name],
            weight=1.0,
            codec=get_codec(codec),
            timeouts=TIMEOUTS,
            rejections=Rejections(),
            residual=(residuals or {}).get(name),
            state_lock=(state_locks or {}).get(name),
        )
    return exchanges, values, network


async def _served(network: SimulatedNetwork) -> None:
    """Wait for the handlers of every stream opened in ``network``."""
    await asyncio.gather(*(task for transport in network.transports.values() for task in list(transport.serving)))


class HeldBack(RoundExchange):
    """A member whose upload waits for ``release``: a straggler on a slow link."""

    release: asyncio.Event

    async def upload(self, writer, start, end):
        await self.release.wait()
        await super().upload(writer, start, end)


@pytest.mark.timeout(30)
async def test_a_late_sender_receives_the_mean_of_its_own_round_after_the_owner_moved_on():
    """A straggler's reply was encoded lazily from the owner's result, which the caller rewrites in place
    (the outer step): the late sender received the next round's values as its mean."""
    HeldBack.release = asyncio.Event()
    exchanges, values, network = await _group(
        ["owner", "member", "straggler"],
        1000,
        clients=["member", "straggler"],
        exchange_classes={"straggler": HeldBack},
    )
    owner_round = asyncio.create_task(exchanges["owner"].run())
    member_round = asyncio.create_task(exchanges["member"].run())
    straggler_round = asyncio.create_task(exchanges["straggler"].run())
    owner, member = await owner_round, await member_round
    mean = owner.averaged.clone()  # the group's (robust) mean of the owner's and the member's values
    assert owner.status == member.status == "averaged" and torch.equal(member.averaged, mean)
    assert not torch.equal(mean, values["owner"])
    owner.averaged.fill_(999.0)  # what the caller does next: the outer step, formed in place in the result
    HeldBack.release.set()
    straggler = await straggler_round
    await _served(network)
    assert straggler.status == "averaged" and any("late" in error for error in straggler.errors), straggler.errors
    assert torch.equal(straggler.averaged, mean), "the late sender got its own round's mean"


@pytest.mark.timeout(60)
async def test_the_heavy_tensor_work_of_a_round_never_runs_on_the_event_loop_thread(monkeypatch):
    """Encoding, decoding and the robust mean of a large shard stalled the loop that also answers
    heartbeats, clock pings and other streams."""
    loop_thread, threads = threading.current_thread(), set()

    def on_thread(method):
        def recorded(*args, **kwargs):
            threads.add(threading.current_thread())
            return method(*args, **kwargs)

        return recorded

    for cls, name in [(Codec, "encode"), (Codec, "decode"), (ShardReduction, "mean")]:
        monkeypatch.setattr(cls, name, on_thread(getattr(cls, name)))
    residuals = {name: torch.zeros(2**19) for name in ("a", "b", "c")}
    exchanges, values, network = await _group(["a", "b", "c"], 2**19, residuals=residuals, codec="int8")
    results = await asyncio.gather(*(exchange.run() for exchange in exchanges.values()))
    await _served(network)
    assert all(result.status == "averaged" for result in results)
    assert threads and loop_thread not in threads


class RecordingLock:
    """A state lock that copies the residual whenever it is released: what a checkpoint taken then holds."""

    def __init__(self, residual: torch.Tensor):
        self.lock, self.residual, self.seen = threading.Lock(), residual, []

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc_info):
        self.seen.append(self.residual.clone())
        self.lock.release()


@pytest.mark.timeout(60)
async def test_a_checkpoint_sees_the_residual_as_before_or_after_the_round_never_half_updated():
    """The exchange changed the error-feedback residual slice by slice on the loop thread, without the state
    lock that ``save_checkpoint`` copies it under: a checkpoint could hold a half-updated residual."""
    numel = 2**19
    residuals = {name: torch.full((numel,), 0.001) for name in ("a", "b", "c", "d")}
    before = residuals["a"].clone()
    lock = RecordingLock(residuals["a"])
    exchanges, values, network = await _group(
        ["a", "b", "c", "d"], numel, residuals=residuals, state_locks={"a": lock}, codec="int8"
    )
    stop, checkpoints = threading.Event(), []

    def checkpointer():  # save_checkpoint in the training thread, as often as it can
        while not stop.is_set():
            with lock.lock:
                if not checkpoints or not torch.equal(checkpoints[-1], residuals["a"]):
                    checkpoints.append(residuals["a"].clone())  # each state it saw, once

    thread = threading.Thread(target=checkpointer)
    thread.start()
    try:
        results = await asyncio.gather(*(exchange.run() for exchange in exchanges.values()))
        await _served(network)
    finally:
        stop.set()
        thread.join()
    after = residuals["a"]
    assert all(result.status == "averaged" for result in results) and not torch.equal(before, after)
    assert lock.seen and torch.equal(lock.seen[-1], after), "the round changed the residual under the lock"
    half = [c for c in checkpoints if not (torch.equal(c, before) or torch.equal(c, after))]
    assert not half, f"{len(half)} of {len(checkpoints)} checkpoints held a half-updated residual"


@pytest.mark.timeout(120)
async def test_the_event_loop_answers_within_half_a_second_while_a_25m_parameter_round_is_reduced():
    """Two live peers in this loop average 25M values with int8: the loop that serves their heartbeats,
    clock pings and streams stays responsive (it stalled for about a second per round before the tensor work
    moved to worker threads).  The bound is far above the stalls measured now (~10 ms)."""
    from gossiptrain.peer import Peer
    from gossiptrain.testing import LOOPBACK

    timeouts = Timeouts(join=10.0, part=10.0, result=60.0, matchmaking=10.0)
    options = dict(host_maddrs=[LOOPBACK], round_interval=3.0, codec="int8", timeouts=timeouts, target_group_size=2)
    async with Peer("stall", **options) as first:
        async with Peer("stall", initial_peers=await first.maddrs(), **options) as second:
            await second.wait_for_peers(2, timeout=30)
            loop, stalls, averaging = asyncio.get_running_loop(), [], True

            async def ticker():  # what a heartbeat or a clock ping waits for: its turn on the loop
                while averaging:
                    started = loop.time()
                    await asyncio.sleep(0.01)
                    stalls.append(loop.time() - started - 0.01)

            ticking = asyncio.create_task(ticker())
            round_id = first.next_round_id()
            values = [torch.randn(25_000_000, generator=torch.Generator().manual_seed(i)) for i in range(2)]
            results = await asyncio.gather(
                first.average(values[0], round_id=round_id), second.average(values[1], round_id=round_id)
            )
            averaging = False
            await ticking
    assert [result.status for result in results] == ["averaged", "averaged"], [r.errors for r in results]
    assert torch.equal(results[0].averaged, results[1].averaged)
    assert max(stalls) < 0.5, f"the loop stalled for {max(stalls):.3f}s"


class SlowToPrepare(RoundExchange):
    """An owner whose own shard's encoding ends only once ``go`` is set: a busy machine."""

    go: asyncio.Event

    async def _start_reduction(self):
        await self.go.wait()
        await super()._start_reduction()


class Uploaded(RoundExchange):
    """A member that says when its slice is sent."""

    uploaded: asyncio.Event

    async def upload(self, writer, start, end):
        await super().upload(writer, start, end)
        self.uploaded.set()


@pytest.mark.timeout(30)
async def test_a_slice_that_arrives_before_the_owner_is_prepared_is_reduced_not_taken_for_late():
    """A contribution that reached an owner still encoding its own shard was taken for a late one and its
    future never set: the owner waited for it with no deadline (the round hung)."""
    SlowToPrepare.go, Uploaded.uploaded = asyncio.Event(), asyncio.Event()
    exchanges, values, network = await _group(
        ["owner", "member"],
        1000,
        clients=["member"],
        codec="int8",
        exchange_classes={"owner": SlowToPrepare, "member": Uploaded},
    )
    rounds = [asyncio.create_task(exchanges[name].run()) for name in ("owner", "member")]
    await Uploaded.uploaded.wait()
    SlowToPrepare.go.set()
    async with asyncio.timeout(20):
        owner, member = await asyncio.gather(*rounds)
        await _served(network)
    assert owner.status == member.status == "averaged" and not any("late" in e for e in member.errors), member.errors
    assert torch.equal(owner.averaged, member.averaged)
