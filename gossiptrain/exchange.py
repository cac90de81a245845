"""One round's exchange at one peer: send slices to shard owners, reduce the own shard.

The stream from contributor ``i`` to owner ``j`` carries, in order: HELLO, ``i``'s slice of shard
``j`` as PART frames, then from ``j`` back to ``i``: RESULT and the averaged shard as PART frames
(or a REJECT).  Failure semantics: a slice that does not arrive whole within the timeouts is left
out of the owner's mean (weights renormalised); an averaged shard that does not arrive whole is
replaced by the peer's own values.  Stragglers: once half the transfers a peer waits for are done,
the rest get ``Timeouts.straggler_grace`` of the time that took: an owner then reduces without the
late slices (their senders still receive the mean, marked late: their data is left out of this
round, their values stay in step with the group), and a member gives up on the late means (keeping
its own values there).  One slow link so costs its group a bounded share of its round time, not its
pace.  A round in which no shard was combined with another peer's
data reports ``status="alone"`` or ``"failed"``, never ``"averaged"``; one that took means while the
defences acted (a mean refused, a contribution to our shard clipped or left out) reports ``"partial"``.

Compression: contributors encode their slices with the round's codec and error feedback (what
the codec dropped stays in a residual and is added to the next round's values; a slice whose
owner failed puts everything back).  The owner encodes the mean once (``Codec.for_mean``), sends
the same bytes to every contributor and keeps their decoded values itself, so all members of a
group end the round with identical values.  A sparse mean is re-sparsified to the codec's
fraction (gTop-k); where it is zero nothing was exchanged, and every member, the owner included,
puts what it sent there back into its residual.  What a quantized mean of parameters rounds off
goes to the owner's residual (owner-side error feedback).  Either way the group's weighted sum of
what it holds (values plus residuals) is what it was before the round.

Threads: the tensor work of a round (encoding, decoding, the robust mean, norms, error feedback) runs in
worker threads (``asyncio.to_thread``), so that a large shard does not stall the event loop that also
serves heartbeats, clock pings and other streams; its order stays the round's, since each step is awaited
where it ran before.  A decoded part is copied into the round's result on the loop, so a transfer that was
cancelled (left out at the straggler deadline) never writes into the result afterwards.

Error feedback is applied once, when the round ends, in one critical section under the caller's
``state_lock`` (``Attachment``'s state lock): a checkpoint or a joiner's snapshot sees the residual as it
was before the round or after it, never half-updated.  Until then the round reads the residual as it was.

Memory: a round holds one result vector the size of the values (``RoundResult.averaged``), into
which the owners' means are received and the own shard's mean is written; slices are encoded part
by part as they are sent, and the residual is moved only once a slice came back averaged, from the
(compressed) payloads kept until then, so that no copy of what was sent is needed to undo it.  The
own shard's contributions are released once their mean is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import zlib
from collections.abc import Iterable, Iterator

import torch
from hivemind.p2p import P2P, PeerID

from gossiptrain.allreduce import (
    DEFAULT_DEFENCES,
    PARAMETERS,
    Defences,
    GroupPlan,
    ShardReduction,
    averages_parameters,
    check_hello,
    l2_norm,
    outlying_means,
    relative_distance,
    rounding_distance,
    straggler_quorum,
)
from gossiptrain.codecs import Codec, CodecError, get_codec
from gossiptrain.rejections import EXCHANGE_ERRORS, Rejections, classify
from gossiptrain.rounds import RoundResult, Timeouts
from gossiptrain.transport import (
    ByteCounter,
    FrameKind,
    ProtocolError,
    close_after_peer,
    read_frame,
    read_message,
    write_frame,
    write_message,
)

logger = logging.getLogger(__name__)

PART_NUMEL = 2**18
# a mean refused by the mean check that lies this far from our parameters (relative to their size) is
# no honest group's mean: its owner is caught for the rest of the run (``RoundExchange.caught``)
CAUGHT_MEAN_DISTANCE = 2.0


async def _send_payloads(writer: asyncio.StreamWriter, payloads: Iterable[bytes], counter: ByteCounter) -> None:
    """Send ``payloads`` as PART frames.  A generator encodes each part as it is sent (one part's bytes at a
    time), in a worker thread."""
    if isinstance(payloads, Iterator):
        while (payload := await asyncio.to_thread(next, payloads, None)) is not None:
            await write_frame(writer, FrameKind.PART, payload, counter)
        return
    for payload in payloads:
        await write_frame(writer, FrameKind.PART, payload, counter)


def _parts(start: int, end: int) -> list[tuple[int, int]]:
    return [(a, min(a + PART_NUMEL, end)) for a in range(start, max(end, start + 1), PART_NUMEL)]


async def _receive_tensor(
    reader: asyncio.StreamReader,
    numel: int,
    codec: Codec,
    counter: ByteCounter,
    timeout: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Read a whole tensor of ``numel`` values sent as codec parts, into ``out`` if given.  On an error
    ``out`` holds a partial tensor: the caller must not use it (``RoundExchange.run`` overwrites it)."""
    out = torch.empty(numel) if out is None else out
    for start, end in _parts(0, numel):
        kind, payload = await read_frame(reader, counter, timeout=timeout)
        if kind != FrameKind.PART:
            raise ProtocolError(f"expected a PART frame, got {kind.name}")
        # decoded in a worker thread, copied here: a cancelled read never writes into ``out`` afterwards
        out[start:end] = await asyncio.to_thread(codec.decode, payload, end - start)
    return out


def uncovered(intervals: list[tuple[int, int]], numel: int) -> list[tuple[int, int]]:
    """The parts of ``[0, numel)`` that no interval of ``intervals`` (sorted, disjoint) covers."""
    gaps, position = [], 0
    for start, end in intervals:
        if start > position:
            gaps.append((position, start))
        position = max(position, end)
    return gaps + [(position, numel)] if position < numel else gaps


def _returned_something(task: asyncio.Task) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None and task.result() is not None


def _union_fraction(values: torch.Tensor) -> float:
    """The largest share of non-zeros in any part, plus one value of slack for rounding."""
    return max((int(torch.count_nonzero(values[a:b])) + 1) / max(b - a, 1) for a, b in _parts(0, values.numel()))


class RoundExchange:
    """The state of one round at one peer: its plan, its snapshot, its own shard's reduction."""

    def __init__(
        self,
        p2p: P2P,
        *,
        protocol: str,
        plan: GroupPlan,
        me: str,
        values: torch.Tensor,
        weight: float,
        codec: Codec,
        timeouts: Timeouts,
        rejections: Rejections,
        residual: torch.Tensor | None = None,
        mode: str = PARAMETERS,
        defences: Defences = DEFAULT_DEFENCES,
        agreed: list[tuple[int, int]] | None = None,
        caught: set[str] | None = None,
        spread: float = 0.0,
        reference: float = 0.0,
        cell_size: float = 0.0,
        state_lock: contextlib.AbstractContextManager | None = None,
        counter: ByteCounter | None = None,
    ):
        self.p2p, self.protocol, self.plan, self.me = p2p, protocol, plan, me
        # held while the residual is changed, once at the end of the round (see the module)
        self.state_lock = contextlib.nullcontext() if state_lock is None else state_lock
        self.rejections, self.mode, self.defences, self.agreed = rejections, mode, defences, agreed
        self.parameters = averages_parameters(mode)  # what the defences may assume of the values
        # peers caught sending parameters (or means) far beyond any honest size, in this round or an
        # earlier one: their slices count nothing and their means are refused (the caller's set, kept)
        self.caught = set() if caught is None else caught
        self.spread = spread
        self.reference = reference  # per value: how far apart the cell's values lie (``sketches.typical_distance``)
        self.cell_size = cell_size  # per value: how large the cell's values are (``sketches.typical_size``)
        self.residual = None if codec.lossless else residual
        self.values, self.weight, self.codec, self.timeouts = values, weight, codec, timeouts
        self.counter = ByteCounter() if counter is None else counter  # the round's (its JOIN's too)
        self.errors: list[str] = []
        self._shards = plan.shards()
        self._own_shard = self._shards.get(me)
        # error feedback is committed only where a slice came back averaged: until then, what was sent
        self._sent: dict[tuple[int, int], list[bytes]] = {}
        self._feedback: list[tuple[tuple[int, int], torch.Tensor]] = []  # slices to commit at the end (bounds, mean)
        self._rounded_off: list[tuple[int, torch.Tensor]] = []  # the owner's, likewise (start, what to add)
        # the round's result, filled in place: means as they arrive, our own values where none did
        self._averaged = torch.empty_like(values)
        self._reduction: ShardReduction | None = None  # made by ``prepare``
        self._preparing: asyncio.Future[None] | None = None  # ``prepare``'s work, done once
        self._expected = {peer: asyncio.get_running_loop().create_future() for peer in plan.members if peer != me}
        self._mean: asyncio.Future[tuple[str, list[bytes] | None] | None] = asyncio.get_running_loop().create_future()
        self._joined: set[str] = set()
        self._whole: set[tuple[int, int]] = set()  # shards whose mean, by its owner's count, combined every member
        self._contributors = 0  # how many members our own shard's mean combined (ours included)
        # contributions to our shard the defences clipped, and left out (beyond ``Defences.drop``, caught senders')
        self._clipped = self._dropped = 0
        self._mean_values: torch.Tensor | None = None  # a lossless mean: a view of the round's result
        self._served: set[str] = set()  # members whose stream to our shard has ended (replied, refused or failed)
        self._replies: list[asyncio.Future[None]] = []
        self._loop_started = asyncio.get_running_loop().time()

    async def prepare(self) -> None:
        """Encode our values for our own shard (in a worker thread) and start its reduction, once.  ``run``
        and ``handle_contribution`` wait for it (a contribution that arrives earlier is not late), so a
        driver may call it before it publishes the exchange (``Peer.average`` does) or not at all."""
        if self._preparing is None:
            self._preparing = asyncio.ensure_future(self._start_reduction())
        await asyncio.shield(self._preparing)  # a cancelled waiter does not cancel it for the others

    async def _start_reduction(self) -> None:
        if self._own_shard is not None:
            own = await asyncio.to_thread(self._own_contribution)
            start, end = self._own_shard
            self._reduction = ShardReduction(
                own,
                self.weight,
                self.defences,
                same_scale=self.parameters,
                spread=self.spread,
                reference=self.reference * math.sqrt(end - start),
                cell_size=self.cell_size * math.sqrt(end - start),
            )

    async def run(self) -> RoundResult:
        started = asyncio.get_running_loop().time()
        await self.prepare()
        averaged = self._averaged
        own = asyncio.create_task(self._reduce_own_shard())
        uploads = {
            asyncio.create_task(self._contribute(owner, bounds)): owner
            for owner, bounds in self._shards.items()
            if owner != self.me
        }
        try:
            await self._wait_or_leave_out(uploads)
            outcomes = await asyncio.gather(own, *uploads, return_exceptions=True)
        finally:
            for task in (own, *uploads):
                task.cancel()
        means, owners = {}, {bounds: owner for owner, bounds in self._shards.items()}
        for outcome in outcomes:
            if isinstance(outcome, asyncio.CancelledError):
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is not None:
                bounds, values = outcome
                means[bounds] = values
        answered = {owners[bounds] for bounds in means} - {self.me}
        answered |= {peer for peer, future in self._expected.items() if future.done() and future.result()}
        refused = self._refuse_outlying_means(means, await asyncio.to_thread(self._measure_means, means))
        combined = sorted(means)
        for bounds in combined:
            self._commit_error_feedback(bounds, means[bounds])
        if not combined:  # nothing averaged: the values themselves, not a copy of them
            averaged = self._averaged = self.values
        await asyncio.to_thread(self._assemble, averaged, means)
        if self._replies:
            await asyncio.wait(self._replies, timeout=self.timeouts.result)
        if self._mean_values is not None and set(self._expected) - self._served:
            # a member not served yet (a straggler whose slice is still on its way) is sent the mean after we
            # return, and the caller may change the result in place: it reads a copy of this round's mean
            self._mean_values = self._mean_values.clone()
        if len(self.plan.members) == 1:
            status = "alone"
        elif not combined:
            status = "failed"
        else:  # "partial" where the defences acted: a mean refused, a contribution to ours clipped or left out
            status = "partial" if refused or self._clipped or self._dropped else "averaged"
        return RoundResult(
            self.plan.round_id,
            status,
            list(self.plan.members),
            averaged,
            combined,
            len(self._shards),
            self.counter.sent,
            self.counter.received,
            asyncio.get_running_loop().time() - started,
            self.errors,
            answered=answered,
            agreed=sorted([bounds for bounds in combined if bounds in self._whole] + refused),
            spread=self.spread,
            refused=sorted(refused),
            clipped=self._clipped,
            dropped=self._dropped,
        )

    def _assemble(self, averaged: torch.Tensor, means: dict[tuple[int, int], torch.Tensor]) -> None:
        """The round's result (our own values where no mean was combined), then the error feedback of the
        whole round, applied at once under the state lock (a worker thread)."""
        if averaged is not self.values:
            for bounds, mean in means.items():
                if mean.data_ptr() != averaged[bounds[0] : bounds[1]].data_ptr():
                    averaged[bounds[0] : bounds[1]] = mean
            for start, end in uncovered(sorted(means), averaged.numel()):  # partial or refused means, failed shards
                averaged[start:end] = self.values[start:end]
        with self.state_lock:
            self._apply_error_feedback()

    async def _reduce_own_shard(self) -> tuple[tuple[int, int], torch.Tensor] | None:
        """Wait for the other members' slices of our shard, then publish the weighted mean."""
        if self._reduction is None:
            return None
        await self._await_contributions()
        if not self._reduction.contributors:
            self._mean.set_result(None)
            self._undo_error_feedback(self._own_shard)
            return None
        reduction, start, end = self._reduction, *self._own_shard
        # the mean goes straight into the round's result
        mean, fraction = await asyncio.to_thread(self._mean_and_fraction, reduction, self._averaged[start:end])
        self._contributors = reduction.contributors + 1
        if self._contributors == len(self.plan.members):
            self._whole.add(self._own_shard)
        # the contributions are not needed any more (later ones are late): their memory goes now
        self._reduction, total_weight, self.spread = None, reduction.total_weight, reduction.spread
        self._clipped, self._dropped = reduction.clipped, self._dropped + reduction.dropped
        if reduction.clipped:
            self.rejections["clipped"] += reduction.clipped
            self.errors.append(f"clipped {reduction.clipped} contribution(s) to our shard (CenteredClip)")
        self.caught.update(reduction.oversized)
        if reduction.dropped:
            self.rejections["dropped"] += reduction.dropped
            self.errors.append(f"dropped {reduction.dropped} contribution(s) to our shard: beyond Defences.drop")
        codec = self.codec.for_mean(reduction.contributors + 1, fraction)
        del reduction
        if codec.lossless:  # kept once, in the round's result; encoded anew for each reply
            self._mean_values = mean
            self._mean.set_result((codec.name, None))
            return self._own_shard, mean
        payloads = await asyncio.to_thread(self._encode_mean, codec, mean, total_weight)
        self._mean.set_result((codec.name, payloads))
        self._commit_error_feedback(self._own_shard, mean)
        return self._own_shard, mean

    @staticmethod
    def _mean_and_fraction(reduction: ShardReduction, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        mean = reduction.mean(out=out)
        return mean, _union_fraction(mean)

    def _encode_mean(self, codec: Codec, mean: torch.Tensor, total_weight: float) -> list[bytes]:
        """The mean's payloads; ``mean`` becomes what members decode of them (a worker thread)."""
        start, _ = self._own_shard
        payloads = [codec.encode(mean[a:b]) for a, b in _parts(0, mean.numel())]
        for payload, (a, b) in zip(payloads, _parts(0, mean.numel())):
            decoded = codec.decode(payload, b - a)
            self._keep_what_the_mean_rounded_off(start + a, mean[a:b], decoded, total_weight)
            mean[a:b] = decoded
        return payloads

    def _measure_means(self, means: dict[tuple[int, int], torch.Tensor]) -> dict[str, dict]:
        """The norms and distances that ``_refuse_outlying_means`` judges the means by (a worker thread)."""
        sizes = {bounds: l2_norm(self.values[bounds[0] : bounds[1]]) for bounds in means}  # our values' there
        # an empty shard (a vector shorter than a codec block per reducer) has no mean to judge: its distance of 0
        # would be the median, and every other mean an outlier
        distances = {
            bounds: relative_distance(mean, self.values[bounds[0] : bounds[1]], sizes[bounds])
            for bounds, mean in means.items()
            if bounds[1] > bounds[0]
        }
        rounding = {}
        if self.defences.mean_check is not None:
            rounding = {
                bounds: rounding_distance(self.codec, self.values[bounds[0] : bounds[1]]) for bounds in distances
            }
        norms = {}
        if self._mean_size_limit() is not None:
            norms = {bounds: l2_norm(mean) for bounds, mean in means.items()}
        return {"sizes": sizes, "distances": distances, "rounding": rounding, "norms": norms}

    def _mean_size_limit(self) -> float | None:
        """How many times the values' size an owner's mean may be: ``Defences.catch_mean`` of our own values where
        they are parameters, ``Defences.catch`` of the cell's otherwise (where its size is known); None: unchecked."""
        if self.parameters:
            return self.defences.catch_mean
        return self.defences.catch if self.cell_size > 0 else None

    def _refuse_outlying_means(
        self, means: dict[tuple[int, int], torch.Tensor], measured: dict[str, dict]
    ) -> list[tuple[int, int]]:
        """Drop (and count) the owners' means that lie too far from our values (``Defences.mean_check``):
        those shards keep our own values, as though their owner had failed.  Only where our values held
        a mean of the whole group after our previous round (``agreed``) are means checked.  Returns the
        refused shards: our values there agree with the group's as before, so they stay checked next
        round (a hostile owner cannot slip every second shifted mean through).

        Everywhere, where the values are parameters, a mean larger than ``Defences.catch_mean`` times our
        values there is refused and its owner caught: a mean of honest parameters is no larger than the
        largest of them, whatever our previous round did (``shifted_mean``'s +1 is 17x the digits
        model's size)."""
        sizes, distances, rounding = measured["sizes"], measured["distances"], measured["rounding"]
        owners = {bounds: owner for owner, bounds in self._shards.items()}
        refused = []
        # the cell's spread there, relative to our values' size (``reference`` is per value)
        spread = {b: self.reference * math.sqrt(b[1] - b[0]) / sizes[b] for b in distances if sizes[b] > 0}
        outlying = outlying_means(distances, self.defences, self.agreed, rounding, spread)
        outlying |= {bounds for bounds in distances if owners[bounds] in self.caught}
        oversized, larger = set(), set()  # caught by our own values' size; over the cell's values' size
        factor = self._mean_size_limit()
        if factor is not None and self.parameters:  # over ``factor`` times our values' norm (never where ours are 0)
            oversized = {bounds for bounds in means if 0 < sizes[bounds] * factor < measured["norms"][bounds]}
        elif factor is not None:  # other values: the cell's size, not ours
            limit = factor * self.cell_size
            larger = {b for b in means if measured["norms"][b] > limit * math.sqrt(b[1] - b[0])}
        outlying |= oversized | larger
        for bounds in outlying - {self._own_shard}:
            detail = f"its mean of [{bounds[0]}, {bounds[1]}) is {distances[bounds]:.3g} of our values away, an outlier"
            if owners[bounds] in self.caught:
                detail = f"caught before; {detail}"
            elif bounds in oversized:
                detail = f"{detail} and over {self.defences.catch_mean:g}x their size"
                self.caught.add(owners[bounds])
            elif bounds in larger:
                detail = f"{detail} and over {self.defences.catch:g}x the size of our cell's values"
            elif self.parameters and distances[bounds] > CAUGHT_MEAN_DISTANCE:
                self.caught.add(owners[bounds])
            self.rejections.record("hostile_mean", owners[bounds], self.plan.round_id, detail)
            self.errors.append(f"refused {owners[bounds]}'s mean: {detail}")
            self._undo_error_feedback(bounds)
            del means[bounds]
            refused.append(bounds)
        return refused

    async def _wait_or_leave_out(self, uploads: dict[asyncio.Task, str]) -> None:
        """Wait for our uploads' means; once half of them are back (failed ones do not count), the rest
        get the straggler deadline, after which they are cancelled (``_contribute`` then keeps our own
        values there).  Our own shard is not among them: an owner's mean comes one transfer after its
        slices, ours before."""
        loop = asyncio.get_running_loop()
        pending, cutoff = set(uploads), None
        quorum = straggler_quorum(len(uploads))
        while pending:
            timeout = None if cutoff is None else max(0.0, cutoff - loop.time())
            _, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            back = sum(_returned_something(task) for task in uploads)
            if cutoff is None and back >= quorum:
                cutoff = self.timeouts.straggler_deadline(self._loop_started, loop.time())
            if pending and cutoff is not None and loop.time() >= cutoff:
                for task in pending:
                    self.errors.append(
                        f"left out {uploads[task]}'s shard: its mean was not back by the straggler deadline"
                    )
                    task.cancel()
                return

    async def _await_contributions(self) -> None:
        """Wait for the other members' slices of our shard.  A member that has not sent its HELLO
        within ``join`` is left out; once half are in, the rest are left out at the straggler deadline
        (``handle_contribution`` still reads them and replies with the mean, marked late)."""
        loop = asyncio.get_running_loop()
        join_by, cutoff = loop.time() + self.timeouts.join, None
        quorum = straggler_quorum(len(self._expected))
        while pending := [future for future in self._expected.values() if not future.done()]:
            deadlines = [t for t in (cutoff, join_by if set(self._expected) - self._joined else None) if t is not None]
            timeout = max(0.0, min(deadlines) - loop.time()) if deadlines else None
            await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            now = loop.time()
            if cutoff is None and sum(f.done() and f.result() for f in self._expected.values()) >= quorum:
                cutoff = self.timeouts.straggler_deadline(self._loop_started, now)
            for peer, future in self._expected.items():
                if future.done():
                    continue
                if peer not in self._joined and now >= join_by:
                    future.set_result(False)
                    self.errors.append(f"{peer} did not send its slice of our shard within join={self.timeouts.join}s")
                elif cutoff is not None and now >= cutoff:
                    future.set_result(False)
                    self.errors.append(f"left out {peer}'s slice of our shard: not in by the straggler deadline")

    def _own_contribution(self) -> torch.Tensor:
        """Our values for our own shard, through the codec like everyone else's: a mean of sparse
        contributions stays sparse, and what the codec drops goes to our residual too."""
        start, end = self._own_shard
        if self.codec.lossless:
            return self.values[start:end]
        out = torch.empty(end - start)
        for payload, (a, b) in zip(self.encoded(start, end), _parts(start, end)):
            out[a - start : b - start] = self.codec.decode(payload, b - a)
        return out

    async def handle_contribution(
        self, sender: str, hello: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one member's stream to us: validate, receive its slice whole, reply with the mean."""
        try:
            await self.prepare()
            await self._serve_contribution(sender, hello, reader, writer)
        finally:
            self._served.add(sender)

    async def _serve_contribution(
        self, sender: str, hello: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        future = self._expected.get(sender)
        refusal = check_hello(hello, self.plan, sender, self.me, self.codec.name, self.mode)
        if refusal is None and self._own_shard is None:
            refusal = "not_in_group", "we reduce no shard in this round"
        if refusal is not None:
            await self._refuse(writer, sender, *refusal)
            return
        self._joined.add(sender)
        start, end = self._own_shard
        try:
            values = await _receive_tensor(reader, end - start, self.codec, self.counter, self.timeouts.part)
        except EXCHANGE_ERRORS as e:
            if not future.done():
                future.set_result(False)
            await self._refuse(writer, sender, classify(e), f"slice dropped: {e!r}")
            return
        if sender in self.caught and not future.done():  # it still gets the mean, marked late
            self.rejections.record("caught", sender, self.plan.round_id, "caught before: its slice counts nothing")
            self._dropped += 1
            future.set_result(False)
        late = future.done() or self._reduction is None  # left out at the straggler (or join) deadline
        replied = asyncio.get_running_loop().create_future()
        if not late:
            self._reduction.add(values, float(hello["weight"]), sender)
            self._replies.append(replied)  # the round waits for these replies, not for late ones
            future.set_result(True)
        del values  # the reduction holds it until the mean is taken, this reply need not
        try:
            mean = await self._mean
            if mean is not None:
                spec, payloads = mean
                if payloads is None:  # a lossless mean: encoded part by part as it is sent
                    payloads = self._mean_parts(get_codec(spec), end - start)
                async with asyncio.timeout(self._sending_time(end - start)):
                    message = {
                        "round_id": self.plan.round_id,
                        "codec": spec,
                        "late": late,
                        "contributors": self._contributors,
                    }
                    await write_message(writer, FrameKind.RESULT, message, self.counter)
                    await _send_payloads(writer, payloads, self.counter)
                if not await close_after_peer(reader, writer, self.timeouts.part):
                    self.errors.append(
                        f"{sender} did not close the stream within part={self.timeouts.part}s of our reply"
                    )
        except EXCHANGE_ERRORS as e:
            self.errors.append(f"reply to {sender} failed: {e!r}")
        finally:
            replied.set_result(None)

    async def _refuse(self, writer: asyncio.StreamWriter, sender: str, kind: str, detail: str) -> None:
        self.rejections.record(kind, sender, self.plan.round_id, detail)
        self.errors.append(f"refused {sender}: {kind}: {detail}")
        try:
            await write_message(writer, FrameKind.REJECT, {"reason": f"{kind}: {detail}"}, self.counter)
        except EXCHANGE_ERRORS:
            pass

    def _mean_parts(self, codec: Codec, numel: int) -> Iterator[bytes]:
        """A lossless mean's parts, encoded from ``_mean_values`` as they are sent (that may be swapped
        for a copy meanwhile: ``run`` hands the result over while late replies are still being sent)."""
        for a, b in _parts(0, numel):
            yield codec.encode(self._mean_values[a:b])

    def _mean_codec(self, spec: object) -> Codec:
        try:
            codec = get_codec(spec) if isinstance(spec, str) else None
        except ValueError:
            codec = None
        if codec is None or not self.codec.accepts_mean_codec(codec):
            raise CodecError(f"the mean is encoded as {spec!r}, which {self.codec.name!r} never produces")
        return codec

    def _sending_time(self, numel: int) -> float:
        """A receiver that stops reading blocks our writes: allow one ``part`` timeout per part."""
        return self.timeouts.part * (2 + numel // PART_NUMEL)

    def hello(self, start: int, end: int) -> dict:
        """The HELLO this peer sends to the owner of ``[start, end)``."""
        return {
            "run_id": self.plan.run_id,
            "round_id": self.plan.round_id,
            "sender": self.me,
            "digest": self.plan.digest,
            "codec": self.codec.name,
            "mode": self.mode,
            "start": start,
            "end": end,
            "weight": self.weight,
        }

    async def upload(self, writer: asyncio.StreamWriter, start: int, end: int) -> None:
        """Send our slice of one owner's shard (testing.FaultyExchange overrides this to misbehave)."""
        await write_message(writer, FrameKind.HELLO, self.hello(start, end), self.counter)
        await _send_payloads(writer, self.encoded(start, end), self.counter)

    def payloads(self, start: int, end: int) -> list[bytes]:
        """Our slice ``[start, end)`` encoded, all parts at once (``encoded`` yields them one by one)."""
        return list(self.encoded(start, end))

    def encoded(self, start: int, end: int) -> Iterator[bytes]:
        """Encode our slice ``[start, end)`` part by part, as it is sent: ``values + residual`` (error
        feedback).  The residual is not changed yet: ``_commit_error_feedback`` moves it once the slice
        has come back averaged, from the payloads kept here (compressed, a fraction of the slice); a
        slice that never does leaves it as it was.

        Parts share a seed across the group (round and offset), so randomk picks the same indices
        at every member and the owner's mean stays as sparse as one contribution.
        """
        sent = self._sent.setdefault((start, end), []) if self.residual is not None else None
        for a, b in _parts(start, end):
            target = self.values[a:b] if self.residual is None else self.values[a:b] + self.residual[a:b]
            payload = self.codec.encode(target, seed=zlib.crc32(f"{self.plan.round_id}:{a}".encode()))
            if sent is not None:
                sent.append(payload)
            yield payload

    def _commit_error_feedback(self, bounds: tuple[int, int], mean: torch.Tensor) -> None:
        """Our slice ``bounds`` came back averaged (``mean``): its residual is to become what the codec did not
        send, when the round ends (``_apply_error_feedback``)."""
        if self.residual is not None:
            self._feedback.append((bounds, mean))

    def _apply_error_feedback(self) -> None:
        """Each slice that came back averaged: its residual becomes what the codec did not send, plus, where a
        sparse mean is zero (the group exchanged nothing there), all we sent, to be sent again (the members'
        sum there is unchanged, so no mass is lost); then what the owner's mean rounded off.  The caller holds
        the state lock."""
        if self.residual is None:
            return
        for bounds, mean in self._feedback:
            start, _ = bounds
            for payload, (a, b) in zip(self._sent.pop(bounds, []), _parts(*bounds)):
                sent = self.codec.decode(payload, b - a)
                if not self.codec.is_dense:
                    sent[mean[a - start : b - start] == 0] = 0.0
                self.residual[a:b] = self.values[a:b] + self.residual[a:b] - sent
        for start, rounded_off in self._rounded_off:
            self.residual[start : start + rounded_off.numel()].add_(rounded_off)
        self._feedback, self._rounded_off = [], []

    def _undo_error_feedback(self, bounds: tuple[int, int]) -> None:
        """A slice that never came back averaged: the round did not happen for it, so its residual
        stays what it was (its values are sent afresh next round)."""
        self._sent.pop(bounds, None)

    def _keep_what_the_mean_rounded_off(
        self, start: int, mean: torch.Tensor, decoded: torch.Tensor, total_weight: float
    ) -> None:
        """Owner-side error feedback (DoubleSqueeze, Tang et al., ICML 2019) for quantized parameters:
        every member takes the decoded mean, so the group's weighted sum loses ``W * (mean - decoded)``;
        the owner adds that to its residual, scaled by ``W / own weight``, so that its next
        contribution puts it back.  Without it, a group's mean change smaller than half a
        quantization step is rounded away every round, however often it is sent.  The scale is
        capped at 4x the group size: an owner with a tiny weight would otherwise carry a residual
        far larger than its values (the mass above the cap is lost, as before this feedback).
        ``mean`` and ``decoded`` are one part of the own shard, starting at ``start`` of the values."""
        if self.residual is None or not self.parameters:
            return
        scale = min(total_weight / self.weight, 4.0 * len(self.plan.members))
        self._rounded_off.append((start, torch.sub(mean, decoded).mul_(scale)))  # added at the round's end

    async def _contribute(self, owner: str, bounds: tuple[int, int]) -> tuple[tuple[int, int], torch.Tensor] | None:
        """Send our slice of ``owner``'s shard and receive the mean back; None if anything failed."""
        start, end = bounds
        writer = None
        try:
            async with asyncio.timeout(self.timeouts.join):
                _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(owner), self.protocol)
            async with asyncio.timeout(self._sending_time(end - start)):
                await self.upload(writer, start, end)
            kind, message = await read_message(
                reader, self.counter, timeout=self.timeouts.result, expect=(FrameKind.RESULT, FrameKind.REJECT)
            )
            if kind == FrameKind.REJECT:
                self.errors.append(f"{owner} refused our slice: {message.get('reason')}")
            else:
                mean = await self._receive_mean(owner, message, reader, end - start, self._averaged[start:end])
                if message.get("late"):
                    self.errors.append(f"{owner} left our slice out (late): we take the group's mean without it")
                elif message.get("contributors") == len(self.plan.members):
                    self._whole.add(bounds)
                return bounds, mean
        except EXCHANGE_ERRORS as e:
            self.errors.append(f"shard of {owner} failed: {e!r}")
        except asyncio.CancelledError:
            self._undo_error_feedback(bounds)
            raise
        finally:
            if writer is not None:
                writer.close()
        self._undo_error_feedback(bounds)
        return None

    async def _receive_mean(
        self, owner: str, result: dict, reader: asyncio.StreamReader, numel: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The owner's averaged shard (into ``out``); malformed data is counted as a rejection of that owner."""
        try:
            codec = self._mean_codec(result.get("codec"))
            values = await _receive_tensor(reader, numel, codec, self.counter, self.timeouts.part, out)
        except (ProtocolError, CodecError) as e:
            self.rejections.record(classify(e), owner, self.plan.round_id, f"averaged shard dropped: {e!r}")
            raise
        return values
