"""GossipOptimizer: the synchronous facade over Peer for ordinary torch training loops."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gossiptrain import training_state
from gossiptrain.codecs import get_codec
from gossiptrain.exchange import RoundResult
from gossiptrain.loop import LoopThread
from gossiptrain.metrics import RoundRecord
from gossiptrain.outer import ANCHOR_SYNC_EVERY, OuterFactory, OuterStrategy
from gossiptrain.peer import Peer
from gossiptrain.state import NoStateDonors, download_state
from gossiptrain.wire import WireState

logger = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[GossipOptimizer] = weakref.WeakSet()  # not shut down yet, in this process

# Finishing peers agree when their parameter checksums differ by at most this much times the
# parameters' norm: float32 rounding of equal means applied to each peer's own snapshot leaves
# about 1e-7 of it, a spread that matters is far larger.
AGREEMENT = 1e-6


def _in_ipython() -> bool:
    """True inside a Jupyter/IPython session (a notebook kernel, Colab, the IPython shell)."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


@atexit.register
def shutdown_all() -> None:
    """Shut down every GossipOptimizer of this process that is still running (also run at exit)."""
    for optimizer in list(_LIVE):
        optimizer.shutdown()


def model_schema(params: Sequence[torch.Tensor]) -> str:
    """A short name for the shapes and dtypes of a model's parameters."""
    text = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in params)
    numel = sum(p.numel() for p in params)
    return f"{numel}params-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _within(value: Any, target: float, tolerance: float) -> bool:
    """Whether a number read from another peer's record is within ``tolerance`` of ``target``."""
    return isinstance(value, float) and abs(value - target) <= tolerance


class GossipOptimizer:
    """Wraps any ``torch.optim.Optimizer``; averages with the swarm in the background.

    Two round strategies: parameter gossip (the default: rounds average the parameters, or
    deltas of them, ``gossiptrain.wire``) and outer mode (given ``outer_optimizer``: rounds
    average pseudo-gradients and the outer optimizer steps an anchor, ``gossiptrain.outer``).
    All peers of a run must use the same strategy (it is part of the model schema they check).

    ``step()`` runs the wrapped optimizer's step and never waits for the network.  When it is
    time to average, it hands a snapshot of the parameters to the peer's background loop; when
    that round completes, the next ``step()`` adds ``average - snapshot`` to the live parameters,
    so local steps taken meanwhile are kept (DESIGN: asynchronous).  A round that failed or found
    no partner changes nothing.

    Joining: before the constructor returns (so before any round), the peer downloads the training
    state of a live peer of the run (``gossiptrain.state``): parameters, the wrapped optimizer's
    state dict (its hyperparameters too, e.g. a scheduled learning rate) and ``local_step``.  If no
    live peer serves its state, this peer is the first of its run (or starts together with the
    others) and keeps its own initialisation.  A donor that fails mid-download is replaced by the
    next one; if none works, the constructor raises ``StateDownloadError`` and leaves the swarm.
    Only the optimizer's parameters travel, not module buffers (e.g. BatchNorm statistics).  Once
    ready, every GossipOptimizer serves its own state to later joiners; the snapshot is taken
    under a lock that ``step()`` holds while it updates the parameters.

    Args:
        optimizer: the local optimizer; its parameters are the ones averaged.
        run_id: name of the training run.
        initial_peers: multiaddrs of any live peers (empty for the first peer of a run).
        average_every: seconds between averaging rounds (the round slot length).
        average_every_steps: if set, also wait for this many local steps between rounds.
        samples_per_step: samples in one local step; a peer's weight is its samples since the last round.
        startup_timeout: seconds allowed to start the daemon and join the DHT.
        on_round: called with each ``RoundRecord`` (from the training thread).
        codec: codec spec for the wire, e.g. ``"int8"`` or ``"topk:0.01+int8"`` (see ``gossiptrain.codecs``).
        sync_every: one round in this many averages the parameters with the codec's dense stage,
            the others send deltas (``gossiptrain.wire``): 10 by default for sparse and low-rank
            codecs, every round by default for dense ones.
        outer_optimizer: outer mode: builds the outer optimizer over the anchor's parameters, e.g.
            ``lambda params: torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)``; rounds then
            average pseudo-gradients (``anchor - params``) and the inner optimizer is ``optimizer``.
        inner_steps: outer mode's spelling of ``average_every_steps``: at least this many inner steps
            between outer rounds (a peer joins the first slot after them; peers meet in slots, so set
            ``average_every`` to about the time H steps take).
        anchor_sync_every: outer mode: one round in this many averages the parameters and resets the
            anchor to their mean, pulling apart anchors together (``gossiptrain.outer``).
        load_state: download the training state from a live peer before taking part (see Joining);
            False keeps this peer's own initialisation even when others are training.
        state_timeout: seconds allowed for the whole state download, over all donors tried.
        peer_options: passed to ``Peer`` (target_group_size, host_maddrs, announce_maddrs, client_mode,
            timeouts, ...); ``client_mode=True`` for a peer that cannot be dialed (NAT, Colab).

    Notebooks and Ctrl-C: nothing here calls ``asyncio.run`` or forks, so it works where the main
    thread already runs an event loop (Jupyter, Colab).  A ``KeyboardInterrupt`` in the training
    loop ends a ``with GossipOptimizer(...)`` block like any exception: the peer leaves the swarm and
    its daemon and loop thread stop.  (A terminal's Ctrl-C and a notebook's "interrupt" reach the
    libp2p daemon too, so the peer cannot keep training after one anyway.)  Re-running a notebook cell
    does not leak a peer: constructing a GossipOptimizer shuts down a live one of this process with
    the same ``run_id`` if it wraps the same parameters or if this is an IPython/Jupyter session (a
    notebook is one peer of a run).  Any still running at interpreter exit are shut down then.
    ``startup_seconds`` is the time this constructor took (daemon, DHT, state download).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        run_id: str,
        initial_peers: Sequence[str] = (),
        average_every: float = 1.0,
        average_every_steps: int | None = None,
        samples_per_step: int = 1,
        startup_timeout: float = 30.0,
        on_round: Callable[[RoundRecord], None] | None = None,
        codec: str = "none",
        sync_every: int | None = None,
        outer_optimizer: OuterFactory | None = None,
        inner_steps: int | None = None,
        anchor_sync_every: int = ANCHOR_SYNC_EVERY,
        load_state: bool = True,
        state_timeout: float = 300.0,
        **peer_options: Any,
    ):
        started = time.perf_counter()
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._loop: LoopThread | None = None
        self._replace_older(run_id)
        if inner_steps is not None and average_every_steps is not None:
            raise ValueError("inner_steps and average_every_steps are the same setting: pass one of them")
        self.average_every_steps = inner_steps if inner_steps is not None else average_every_steps
        self.samples_per_step, self.on_round = samples_per_step, on_round
        if outer_optimizer is None:
            self.strategy = WireState(get_codec(codec), sync_every)
        else:
            self.strategy = OuterStrategy(self.params, outer_optimizer, get_codec(codec), anchor_sync_every)
        schema = model_schema(self.params) + ("-outer" if outer_optimizer is not None else "")
        self.peer = Peer(
            run_id, initial_peers=initial_peers, round_interval=average_every, model_schema=schema, **peer_options
        )
        self.local_step = 0
        self.loss: float | None = None
        self.rounds_done = self.rounds_failed = 0
        self.bytes_sent = self.bytes_received = 0
        self.last_round: RoundRecord | None = None
        self._samples_since_round = 0
        self._steps_since_round = 0
        self._inflight: concurrent.futures.Future | None = None
        self._snapshot: torch.Tensor | None = None
        self._mode = "params"
        self._state_lock = threading.Lock()  # guards params, optimizer state and local_step against snapshots
        self.state_download_seconds: float | None = None
        self.startup_seconds: float | None = None
        self._loop = LoopThread()
        try:
            self._loop.run(self.peer.start(), timeout=startup_timeout)
        except BaseException:
            self._loop.close()
            self._loop = None
            self._kill_daemon()
            raise
        try:
            if load_state:
                self._download_state(state_timeout)
            if not self.peer.client_mode:  # no one could dial a client to download from it
                self._loop.run(self.peer.serve_state(self._state_snapshot), timeout=startup_timeout)
        except BaseException:
            self.shutdown()
            raise
        _LIVE.add(self)
        self.startup_seconds = time.perf_counter() - started
        self.peer.info = {**self.peer.info, "startup_seconds": round(self.startup_seconds, 3)}
        self._loop.run(self.peer.publish_info(), timeout=startup_timeout)

    def _replace_older(self, run_id: str) -> None:
        """Shut down a live GossipOptimizer of ``run_id`` that this one replaces (see Notebooks)."""
        ours = {id(p) for p in self.params}
        for older in list(_LIVE):
            if older.peer.run_id == run_id and (_in_ipython() or any(id(p) in ours for p in older.params)):
                logger.warning(
                    "a GossipOptimizer of run %r (peer %s) still ran in this process: shutting it down first",
                    run_id,
                    older.peer.peer_id,
                )
                older.shutdown()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self._state_lock:
            self.optimizer.load_state_dict(state_dict)

    def maddrs(self) -> list[str]:
        return self._loop.run(self.peer.maddrs(), timeout=10)

    def report(self, loss: float | None = None) -> None:
        """Record the latest training loss (shown in the swarm status and the round records)."""
        if loss is not None:
            self.loss = float(loss)
        self.peer.info = {
            **self.peer.info,
            "step": self.local_step,
            "loss": self.loss,
            "rounds": self.rounds_done,
            "last_round": self.last_round.round if self.last_round else None,
        }

    def live_peers(self, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        """Membership records of the run's live peers (this one included), by peer id."""
        return self._loop.run(self.peer.live_peers(), timeout=timeout)

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        if self._loop is None:
            raise RuntimeError(
                "this GossipOptimizer was shut down (end of its `with` block, shutdown() or an interrupt): "
                "create a new one to rejoin the swarm"
            )
        with self._state_lock:
            result = self.optimizer.step(closure)
            self.local_step += 1
            self._steps_since_round += 1
            self._samples_since_round += self.samples_per_step
        self._poll_round()
        return result

    def average_now(self, timeout: float = 60.0, params: bool = False, round_id: int | None = None) -> RoundRecord:
        """Block until the round in flight (if any) and one fresh round are applied; for a final sync.

        With ``params=True`` the fresh round averages the parameters themselves, not deltas, even
        where a sparse codec's round would send deltas, and without error feedback (a "final"
        round of ``gossiptrain.wire``): it is what brings peers to agreement and keeps them there,
        and it groups this peer with the others doing the same.
        ``round_id`` picks the round explicitly (peers that agree on it average together).
        """
        if self._inflight is not None:
            concurrent.futures.wait([self._inflight], timeout=timeout)
            self._poll_round(start_next=False)
        self._start_round(round_id, mode="final" if params else None)
        concurrent.futures.wait([self._inflight], timeout=timeout)
        record = self._poll_round(start_next=False)
        if record is None:
            raise TimeoutError(f"no averaging round finished within {timeout}s")
        return record

    def finish(self, timeout: float = 60.0) -> RoundRecord | None:
        """End of training: keep averaging, without local steps, until every live peer has finished
        and holds the same parameters as this one, so that the peers leave with one model.

        After each of its rounds a finishing peer publishes the checksum of its parameters, and it
        leaves once every other live peer is done and published the same checksum (within float32
        rounding: ``AGREEMENT``).  Counting whole rounds instead is not enough: two rounds of pairs
        mix only four peers, and pairs that split the swarm the same way twice end it in two camps.
        Final rounds leave values that the peers agree on where they are (``gossiptrain.wire``), so
        a peer that leaves first is not left behind by the others' later rounds.  Returns the last
        round's record, also when ``timeout`` runs out first.
        """
        self.peer.info = {**self.peer.info, "done": True}
        self._loop.run(self.peer.publish_info(), timeout=10)
        deadline, record = time.monotonic() + timeout, None
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                record = self.average_now(timeout=remaining, params=True)
            except TimeoutError:
                break
            self.peer.info = {**self.peer.info, "checksum": record.param_checksum}
            self._loop.run(self.peer.publish_info(), timeout=10)
            others = [
                info
                for peer, info in self._loop.run(self.peer.live_peers(), timeout=10).items()
                if peer != self.peer.peer_id
            ]
            tolerance = AGREEMENT * record.param_norm
            if all(
                info.get("done") and _within(info.get("checksum"), record.param_checksum, tolerance) for info in others
            ):
                break
        return record

    def wait_for_peers(self, count: int, timeout: float = 60.0) -> int:
        """Block until ``count`` live peers (this one included) are in the run; returns how many."""
        return len(self._loop.run(self.peer.wait_for_peers(count, timeout), timeout=timeout + 5))

    def _poll_round(self, start_next: bool = True) -> RoundRecord | None:
        record = None
        if self._inflight is not None and self._inflight.done():
            record = self._finish_round(self._inflight)
            self._inflight = None
        if (
            start_next
            and self._inflight is None
            and (self.average_every_steps is None or self._steps_since_round >= self.average_every_steps)
        ):
            self._start_round()
        return record

    def _start_round(self, round_id: int | None = None, mode: str | None = None) -> None:
        round_id = self.peer.next_round_id() if round_id is None else round_id
        with self._state_lock:
            self._steps_since_round = 0
        self._inflight = self._loop.submit(self._averaging_round(round_id, mode))

    async def _averaging_round(self, round_id: int, mode: str | None) -> RoundResult:
        """Snapshot the parameters just before the slot starts, then average them.

        A round's result is applied as ``average - snapshot``, so the group mixes the parameters as
        they were at the snapshot: taking it when the slot starts (less the registration lead), not
        when the previous round ended, keeps what is averaged at most that lead old instead of up to
        a whole slot.  Local steps go on meanwhile.
        """
        wake = self.peer.round_start(round_id) - self.peer.registration_lead
        await asyncio.sleep(max(0.0, wake - self.peer.now()))
        self._snapshot, weight = await asyncio.to_thread(self._take_snapshot)
        wire = self.strategy.contribution(self._snapshot, round_id, mode)
        self._mode = wire.mode
        return await self.peer.average(
            wire.values, weight, round_id, residual=wire.residual, mode=wire.mode, codec=wire.codec
        )

    def _take_snapshot(self) -> tuple[torch.Tensor, float]:
        """The flat parameters and the samples seen since the last snapshot (the round's weight)."""
        with self._state_lock, torch.no_grad():
            snapshot = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in self.params])
            weight, self._samples_since_round = float(max(self._samples_since_round, 1)), 0
        return snapshot, weight

    def _finish_round(self, future: concurrent.futures.Future) -> RoundRecord:
        try:
            result: RoundResult = future.result()
        except Exception as e:
            logger.warning("averaging round crashed: %r", e)
            result = RoundResult(-1, "failed", [], self._snapshot, errors=[repr(e)])
        if result.status == "averaged" or (result.status == "alone" and self.strategy.steps_alone):
            self._apply_round(result)
            self.rounds_done += result.status == "averaged"
        elif result.status == "failed":
            self.rounds_failed += 1
        self.bytes_sent += result.bytes_sent
        self.bytes_received += result.bytes_received
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in self.params])
        record = RoundRecord(
            peer=self.peer.peer_id,
            round=result.round_id,
            status=result.status,
            step=self.local_step,
            group_size=result.group_size,
            participants=result.participants,
            mode=self._mode,
            loss=self.loss,
            bytes_sent=result.bytes_sent,
            bytes_received=result.bytes_received,
            round_seconds=result.seconds,
            param_norm=flat.norm().item(),
            param_checksum=flat.sum().item(),
            errors=result.errors,
            rejected=dict(self.peer.rejections),
        )
        self.last_round = record
        self.report()
        if self.on_round is not None:
            self.on_round(record)
        return record

    def _apply_round(self, result: RoundResult) -> None:
        """Move the strategy's state (reference, anchor, outer optimizer) and add ``after - snapshot`` to
        the live parameters, together under the state lock: a joiner's snapshot sees both or neither."""
        offset = 0
        with self._state_lock, torch.no_grad():
            delta = self.strategy.combine(result, self._snapshot, self._mode) - self._snapshot
            for p in self.params:
                n = p.numel()
                p.add_(delta[offset : offset + n].view_as(p).to(p.device, p.dtype))
                offset += n

    def _download_state(self, timeout: float) -> None:
        """Load a live peer's training state, unless this peer is the first of its run (see Joining)."""
        started = time.perf_counter()
        try:
            state = self._loop.run(
                download_state(self.peer, timeout=timeout, validate=self._check_state), timeout=timeout + 10
            )
        except NoStateDonors:
            logger.info("no live peer of run %r serves its state: keeping our own initialisation", self.peer.run_id)
            return
        with self._state_lock:
            self.local_step = training_state.load(state, self.params, self.optimizer, self.strategy)
        self.state_download_seconds = time.perf_counter() - started
        self.report()
        logger.info(
            "joined run %r at step %d with a downloaded state in %.2fs",
            self.peer.run_id,
            self.local_step,
            self.state_download_seconds,
        )

    def _check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError if a downloaded state cannot be loaded here (called before anything is loaded)."""
        training_state.check(state, self.params, self.optimizer, self.strategy)

    def _state_snapshot(self) -> dict[str, Any]:
        """What a joiner needs, copied under the state lock (the state server calls it from a worker thread)."""
        extra = {"schema": self.peer.model_schema, "rounds_done": self.rounds_done}
        with self._state_lock:
            return training_state.capture(self.params, self.optimizer, self.local_step, self.strategy, extra)

    def shutdown(self) -> None:
        """Leave the swarm and stop the background loop and the daemon; safe to call twice.

        Bounded in time, also when the daemon is already dead (a notebook's interrupt reaches it too)
        and when a second Ctrl-C interrupts it: the daemon is then killed rather than left behind.
        """
        if self._loop is None:
            return
        _LIVE.discard(self)
        if self._inflight is not None:
            self._inflight.cancel()
        try:
            self._loop.run(self.peer.stop(), timeout=15)
        except Exception as e:
            logger.warning("could not leave the swarm cleanly: %r", e)
        finally:
            try:
                self._loop.close()
            finally:
                self._loop = None
                self._kill_daemon()

    def _kill_daemon(self) -> None:
        """Kill and reap the p2pd child if an interrupted ``stop()`` left it running."""
        child = getattr(self.peer.p2p, "_child", None)  # hivemind.P2P's asyncio.subprocess.Process
        if child is None or child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # asyncio's child watcher thread may reap it first
            try:
                if os.waitpid(child.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.01)

    def __enter__(self) -> GossipOptimizer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def __del__(self):
        if getattr(self, "_loop", None) is not None:
            logger.warning("GossipOptimizer was not shut down; call shutdown() or use it as a context manager")
