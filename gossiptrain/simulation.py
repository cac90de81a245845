"""Averaging rounds of many peers in one process, over in-memory streams: the real round code, no sockets.

``RoundExchange`` (framing, codecs, robust combining, mean checks, error feedback) runs unchanged; only
the libp2p streams are replaced by pairs of ``asyncio.StreamReader`` fed in memory, and the DHT by the
peers the caller names for each round (all registered, with one view).  Slices are waited for without a
straggler deadline, so a round's outcome depends on the values alone, not on the machine's load: the
same inputs give the same results, bit for bit, run after run.  That makes paired comparisons exact
(``benchmarks/adversarial.py --simulate``: training with and without the defences from the same seeds),
where over real sockets the timing of rounds drowns them in noise.

Failure semantics: an exception in any simulated peer's exchange propagates out of ``simulate_round``
(a hostile but well-formed ``FaultyExchange`` raises none).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from hivemind.p2p import PeerID

from gossiptrain.allreduce import DEFAULT_DEFENCES, Defences, GroupPlan
from gossiptrain.codecs import Codec, get_codec
from gossiptrain.exchange import Rejections, RoundExchange, RoundResult, Timeouts
from gossiptrain.groups import make_groups
from gossiptrain.transport import ByteCounter, FrameKind, close_after_peer, read_message

PROTOCOL = "/gossiptrain/simulated/1"
# no straggler deadline: every slice is waited for, so a round's outcome never depends on timing
SIMULATED_TIMEOUTS = Timeouts(straggler_grace=None)


class _MemoryWriter:
    """The writing end of an in-memory stream: what is written is fed to the other side's reader."""

    def __init__(self, remote: asyncio.StreamReader):
        self._remote, self._closed = remote, False

    def write(self, data: bytes | memoryview) -> None:
        if not self._closed:
            self._remote.feed_data(bytes(data))

    async def drain(self) -> None:
        await asyncio.sleep(0)  # let the reader run, as a socket's buffer would

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._remote.feed_eof()


@dataclass(frozen=True)
class _StreamInfo:
    peer_id: PeerID


class InMemoryNetwork:
    """Stream handlers by peer id, and the tasks serving the streams opened to them (awaited by
    whoever runs the round: nothing is left running)."""

    def __init__(self):
        self.handlers: dict[str, Callable[..., Awaitable[None]]] = {}
        self.serving: list[asyncio.Task] = []


class InMemoryP2P:
    """What ``RoundExchange`` needs of ``hivemind.p2p.P2P``: opening a stream to a peer's handler."""

    def __init__(self, network: InMemoryNetwork, peer_id: str):
        self._network, self.peer_id = network, peer_id

    async def call_binary_stream_handler(self, peer_id: PeerID, protocol: str):
        handler = self._network.handlers[peer_id.to_base58()]
        ours, theirs = asyncio.StreamReader(), asyncio.StreamReader()
        info = _StreamInfo(PeerID.from_base58(self.peer_id))
        self._network.serving.append(asyncio.create_task(handler(info, theirs, _MemoryWriter(ours))))
        return _StreamInfo(peer_id), ours, _MemoryWriter(theirs)


def simulated_peer_id(name: str) -> str:
    """A well-formed peer id (a sha2-256 multihash) for a simulated peer called ``name``."""
    return PeerID(b"\x12\x20" + hashlib.sha256(name.encode()).digest()).to_base58()


@dataclass
class SimulatedPeer:
    """What a ``Peer`` keeps between rounds that changes how it averages: the shards where its last
    round left a mean of the whole group, the spread its shard last measured, the peers it caught.
    ``client`` peers reduce no shard; ``exchange_class`` may be a misbehaving exchange
    (``gossiptrain.testing.faulty_exchange("huge")``)."""

    peer_id: str
    client: bool = False
    exchange_class: type[RoundExchange] = RoundExchange
    rejections: Rejections = field(default_factory=Rejections)
    caught: set[str] = field(default_factory=set)
    agreed: list[tuple[int, int]] | None = None
    spread: float = 0.0
    state_lock: AbstractContextManager | None = None  # held while its residual changes (an Attachment's lock)


async def simulate_round(
    peers: list[SimulatedPeer],
    values: dict[str, torch.Tensor],
    weights: dict[str, float],
    round_id: int,
    *,
    group_size: int = 4,
    defences: Defences = DEFAULT_DEFENCES,
    codec: Codec | str = "none",
    mode: str = "params",
    residuals: dict[str, torch.Tensor] | None = None,
    run_id: str = "simulated",
) -> dict[str, RoundResult]:
    """One round of ``peers`` (all registered), in their Moshpit groups.

    ``values`` maps a peer id to its flat float32 values (not modified); returns each peer's result.
    ``mode`` names what the values are (``"params"``, or ``"outer"`` for pseudo-gradients), ``codec``
    how they are sent, and ``residuals`` (peer id -> tensor, updated in place) the error feedback of a
    lossy codec (none: what it drops is lost).  Each peer's between-rounds state is updated as
    ``Peer.average`` does.
    """
    codec = get_codec(codec) if isinstance(codec, str) else codec
    numel = next(iter(values.values())).numel()
    network = InMemoryNetwork()
    exchanges: dict[str, RoundExchange] = {}

    def handler_of(owner: str):
        async def handle(info, reader: asyncio.StreamReader, writer: _MemoryWriter) -> None:
            counter = ByteCounter()
            try:
                timeout = SIMULATED_TIMEOUTS.join
                _, hello = await read_message(reader, counter, timeout=timeout, expect=(FrameKind.HELLO,))
                await exchanges[owner].handle_contribution(info.peer_id.to_base58(), hello, reader, writer)
            finally:
                await close_after_peer(reader, writer, SIMULATED_TIMEOUTS.part)

        return handle

    by_id = {peer.peer_id: peer for peer in peers}
    for group in make_groups(by_id, round_id, group_size, salt=run_id):
        clients = frozenset(me for me in group if by_id[me].client)
        plan = GroupPlan.build(run_id, round_id, group, numel, clients)
        for me in group:
            peer = by_id[me]
            network.handlers[me] = handler_of(me)
            exchanges[me] = peer.exchange_class(
                InMemoryP2P(network, me),
                protocol=PROTOCOL,
                plan=plan,
                me=me,
                values=values[me],
                weight=weights[me],
                codec=codec,
                timeouts=SIMULATED_TIMEOUTS,
                rejections=peer.rejections,
                residual=(residuals or {}).get(me),
                mode=mode,
                defences=defences,
                agreed=peer.agreed,
                caught=peer.caught,
                spread=peer.spread,
                state_lock=peer.state_lock,
            )
    ids = list(exchanges)
    await asyncio.gather(*(exchange.prepare() for exchange in exchanges.values()))  # before any stream reaches one
    outcomes = await asyncio.gather(*(exchanges[me].run() for me in ids))
    await asyncio.gather(*network.serving)
    results = dict(zip(ids, outcomes))
    for me, result in results.items():
        by_id[me].agreed, by_id[me].spread = result.agreed, result.spread
    return results
