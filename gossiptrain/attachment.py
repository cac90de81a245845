"""attach(): makes the user's own torch optimizer a peer of a swarm, through its step hooks."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
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
from gossiptrain.errors import RoundCrashError
from gossiptrain.loop import LoopThread
from gossiptrain.metrics import RoundRecord
from gossiptrain.outer import ANCHOR_SYNC_EVERY, OuterFactory, OuterStrategy
from gossiptrain.params import AGREEMENT, agrees, apply_delta, host_copy, model_schema, param_digest, param_norm, unwrap
from gossiptrain.peer import Peer
from gossiptrain.progress import show_progress
from gossiptrain.rejections import EXCHANGE_ERRORS
from gossiptrain.rounds import AVERAGED, RoundResult
from gossiptrain.state import NoStateDonors, download_state
from gossiptrain.strategy import Contribution, RoundStrategy
from gossiptrain.trackers import LogTo, open_trackers
from gossiptrain.wire import WireState

logger = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[Attachment] = weakref.WeakSet()  # not closed yet, in this process


# A round that raises one of these failed for a reason of the network (a peer gone, a timeout) or was
# cancelled by close(); anything else is a bug, counted as a crash.
EXPECTED_ROUND_FAILURES = (concurrent.futures.CancelledError, *EXCHANGE_ERRORS)
CRASHES_BEFORE_RAISING = 3  # crashed rounds in a row before a step raises RoundCrashError


def _in_ipython() -> bool:
    """True inside a Jupyter/IPython session (a notebook kernel, Colab, the IPython shell)."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


@atexit.register
def shutdown_all() -> None:
    """Close every attachment of this process that is still running (also run at exit)."""
    for attachment in list(_LIVE):
        attachment.close()


class Attachment:
    """A peer of a swarm that averages the parameters of the user's own ``torch.optim.Optimizer``.

    ``attach(optimizer, run_id=...)`` registers a step pre-hook and a step post-hook on the
    optimizer (``register_step_pre_hook``/``register_step_post_hook``) and changes nothing else:
    schedulers, ``state_dict()``, gradient scalers and frameworks (Hugging Face ``Trainer``,
    Lightning: ``gossiptrain.integrations``) keep seeing the user's optimizer, and the training
    loop does not change.  ``close()`` (or the end of a ``with`` block) removes the hooks and
    leaves the swarm; the optimizer is then an ordinary optimizer again.  (torchft's ``LocalSGD``
    attaches the same way.)

    Two round strategies: parameter gossip (the default: rounds average the parameters, or
    deltas of them, ``gossiptrain.wire``) and outer mode (given ``outer_optimizer``: rounds
    average pseudo-gradients and the outer optimizer steps an anchor, ``gossiptrain.outer``).
    All peers of a run must use the same strategy (it is part of the model schema they check).

    A step never waits for the network.  When it is time to average, the peer's background loop
    takes a snapshot of the parameters; when that round completes, the next step's post-hook adds
    ``average - snapshot`` to the live parameters, so local steps taken meanwhile are kept (DESIGN:
    asynchronous).  Where no step was taken since the snapshot (``finish``), the parameters become
    the round's result itself.  The sum is formed in float32 and rounded once to the parameter's
    dtype, so bf16/fp16 parameters average within their own rounding.  A round that failed or found
    no partner changes nothing; a peer that dies mid-round costs its group that round only.  A step
    skipped by a gradient scaler (inf/NaN gradients) runs no hook and is not counted.

    Joining: before ``attach`` returns (so before any round), the peer downloads the training
    state of a live peer of the run (``gossiptrain.state``): parameters, the optimizer's state
    dict (its hyperparameters too, e.g. a scheduled learning rate), the scheduler's state if one
    is given here and by the donor, and ``local_step``.  If no live peer serves its state, this
    peer is the first of its run (or starts together with the others) and keeps its own
    initialisation.  A donor that fails mid-download is replaced by the next one; if none works,
    ``attach`` raises ``StateDownloadError`` and leaves the swarm.  Only the optimizer's
    parameters travel, not module buffers (e.g. BatchNorm statistics).  Once ready, every peer
    serves its own state to later joiners, under a lock that the optimizer's step holds (from the
    pre-hook to the post-hook) while it updates the parameters: the counters and small tensors are
    taken at one instant, the large tensors are streamed from the live ones a chunk at a time, each
    chunk under the lock (``gossiptrain.state``: no copy of the state, so they may be a few steps newer).

    Memory: a round holds the snapshot and one result vector (each the model's size in float32) and
    what the exchange and the codec need on top (``gossiptrain.exchange``, ``benchmarks/README.md``);
    the codec's own state (``gossiptrain.wire``) is made here, once.

    Checkpoints: ``save_checkpoint()`` writes this peer's whole training state to ``checkpoint``
    (parameters, the model's buffers if ``model`` is given, the optimizer, the scheduler, the
    round strategy's state with this peer's own residuals and reference, the step and round
    counters); ``checkpoint_every`` does so every that many steps, when the next step begins (the
    loop's ``scheduler.step()`` has run by then) or on ``close()``.  ``attach`` with an existing
    ``checkpoint`` restores it first, then compares its step with a live peer's state (downloaded, as a
    joiner does): if the swarm is ahead it loads that state on top, otherwise it keeps its own, and it
    says which in one log line.  A round in flight when the checkpoint is written is not in it.

    Args:
        optimizer: the local optimizer; its parameters are the ones averaged (framework wrappers
            are unwrapped: ``unwrap``).
        run_id: name of the training run.
        initial_peers: multiaddrs of any live peers (empty for the first peer of a run).
        average_every: seconds between averaging rounds (the round slot length).
        average_every_steps: if set, also wait for this many local steps between rounds.
        samples_per_step: samples in one local step; a peer's weight is its samples since the last round (in
            outer mode since the last round applied: a failed round's steps are in the next pseudo-gradient).
        startup_timeout: seconds allowed to start the daemon and join the DHT.
        on_round: called with each ``RoundRecord`` (from the training thread).
        log_to: experiment trackers for each round's scalars, at the local step (``gossiptrain.trackers``):
            a ``TensorBoardTracker`` or ``WandbTracker``, a directory (TensorBoard), or a list of them;
            closed on ``close()``.  A tracker that raises loses that round's scalars only (logged).
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
            False keeps this peer's own initialisation (or checkpoint) even when others are training.
        state_timeout: seconds allowed for the whole state download, over all donors tried.
        model: the module, for its buffers in checkpoints (optional).
        scheduler: the learning-rate scheduler, for checkpoints and joiners (optional).
        checkpoint: path of this peer's checkpoint file: restored at start if it exists (see Checkpoints).
        checkpoint_every: write the checkpoint every this many local steps (None: only on ``save_checkpoint()``).
        peer_options: passed to ``Peer`` (target_group_size, host_maddrs, announce_maddrs, client_mode,
            behind_nat, timeouts, ...); for a peer that cannot be dialed (NAT, Colab), ``behind_nat=True`` (a full
            peer, reached through a relay) or ``client_mode=True`` (dials out only).

    Notebooks and Ctrl-C: nothing here calls ``asyncio.run`` or forks, so it works where the main
    thread already runs an event loop (Jupyter, Colab).  A ``KeyboardInterrupt`` in the training
    loop ends a ``with attach(...)`` block like any exception: the peer leaves the swarm and its
    daemon and loop thread stop.  (A terminal's Ctrl-C and a notebook's "interrupt" reach the libp2p
    daemon too, so the peer cannot keep training after one anyway.)  Re-running a notebook cell does
    not leak a peer: attaching closes a live attachment of this process with the same ``run_id`` if
    it holds the same parameters or if this is an IPython/Jupyter session (a notebook is one peer of
    a run).  Any still running at interpreter exit are closed then.  ``startup_seconds`` is the time
    ``attach`` took (daemon, DHT, checkpoint, state download).
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
        log_to: LogTo = None,
        codec: str = "none",
        sync_every: int | None = None,
        outer_optimizer: OuterFactory | None = None,
        inner_steps: int | None = None,
        anchor_sync_every: int = ANCHOR_SYNC_EVERY,
        load_state: bool = True,
        state_timeout: float = 300.0,
        model: torch.nn.Module | None = None,
        scheduler: Any | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        **peer_options: Any,
    ):
        started = time.perf_counter()
        self.optimizer = unwrap(optimizer)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.model, self.scheduler = model, scheduler
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self._loop: LoopThread | None = None
        self._hooks: list[Any] = []
        self._replace_older(run_id)
        if inner_steps is not None and average_every_steps is not None:
            raise ValueError("inner_steps and average_every_steps are the same setting: pass one of them")
        for name, seconds in (
            ("average_every", average_every),
            ("startup_timeout", startup_timeout),
            ("state_timeout", state_timeout),
        ):
            if not (isinstance(seconds, (int, float)) and 0 < seconds < float("inf")):
                raise ValueError(f"{name} must be a positive number of seconds, got {seconds!r}")
        for name, steps in (("inner_steps", inner_steps), ("average_every_steps", average_every_steps)):
            if steps is not None and not (isinstance(steps, int) and steps >= 1):
                raise ValueError(f"{name} must be a whole number >= 1 (or None), got {steps!r}")
        if checkpoint_every is not None and (checkpoint is None or checkpoint_every < 1):
            raise ValueError("checkpoint_every needs a checkpoint path and a positive number of steps")
        self.average_every_steps = inner_steps if inner_steps is not None else average_every_steps
        self.samples_per_step, self.on_round = samples_per_step, on_round
        self.strategy: RoundStrategy
        if outer_optimizer is None:
            self.strategy = WireState(get_codec(codec), sync_every)
            self.strategy.allocate(sum(p.numel() for p in self.params))  # the codec's state, made once
        else:
            self.strategy = OuterStrategy(self.params, outer_optimizer, get_codec(codec), anchor_sync_every)
        schema = model_schema(self.params) + ("-outer" if outer_optimizer is not None else "")
        self.peer = Peer(
            run_id, initial_peers=initial_peers, round_interval=average_every, model_schema=schema, **peer_options
        )
        self.local_step = 0
        self.loss: float | None = None
        self.rounds_done = self.rounds_failed = 0
        self.rounds_crashed = 0  # rounds that raised something other than a network failure (a bug)
        self.on_round_errors = 0  # calls of on_round that raised
        self._crashes = 0  # crashed rounds in a row
        self._last_crash: BaseException | None = None
        self.bytes_sent = self.bytes_received = 0
        self.last_round: RoundRecord | None = None
        self.resumed_from: str | None = None  # "checkpoint" or "swarm" after a restart from a checkpoint
        self._samples_since_round = 0
        self._samples_unapplied = 0  # up to the last snapshot, not yet in a round applied (outer mode's weight)
        self._steps_since_round = 0
        self._inflight: concurrent.futures.Future | None = None
        self._snapshot: torch.Tensor | None = None
        self._snapshot_step = -1
        self._mode = "params"
        # guards params, optimizer state and local_step against snapshots; held from a step's pre-hook to
        # its post-hook (reentrant: a closure that runs inside the step may report or average)
        self._state_lock = threading.RLock()
        self._stepping = False
        self._checkpoint_due = False  # checkpoint_every: written when the next step begins, or on close
        # compute utilization: seconds the training thread spent in this attachment's hooks, the hook in progress
        # since when, and (time, seconds in hooks) at the last tracked record
        self._hook_seconds, self._hook_since = 0.0, None
        self._utilization_mark: tuple[float, float] | None = None
        self.state_download_seconds: float | None = None
        self.startup_seconds: float | None = None
        own = self._restore_checkpoint() if checkpoint is not None and os.path.exists(checkpoint) else None
        self.trackers = open_trackers(log_to)  # before the daemon starts: a missing package fails fast
        self._loop = LoopThread()
        try:
            self._loop.run(self.peer.start(), timeout=startup_timeout)
        except BaseException:
            self._loop.close()
            self._loop = None
            self._kill_daemon()
            self.trackers.close()
            raise
        try:
            if load_state:
                self._join(state_timeout, own)
            elif own is not None:
                self._say_resumed("checkpoint", own, "state download is off")
            if not self.peer.client_mode:  # no one could dial a client to download from it
                serving = self.peer.serve_state(self._state_snapshot, lock=self._state_lock)
                self._loop.run(serving, timeout=startup_timeout)
        except BaseException:
            self.close()
            raise
        self._hooks = [
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
        ]
        _LIVE.add(self)
        self.startup_seconds = time.perf_counter() - started
        self.peer.info = {**self.peer.info, "startup_seconds": round(self.startup_seconds, 3)}
        self.report()
        self._loop.run(self.peer.publish_info(), timeout=startup_timeout)
        logger.info(
            "peer %s of run %r ready in %.2fs; others join with initial_peers=%s",
            self.peer.peer_id,
            run_id,
            self.startup_seconds,
            self.maddrs()[:1],
        )

    def _replace_older(self, run_id: str) -> None:
        """Close a live attachment of ``run_id`` that this one replaces (see Notebooks)."""
        ours = {id(p) for p in self.params}
        for older in list(_LIVE):
            if older.peer.run_id == run_id and (_in_ipython() or any(id(p) in ours for p in older.params)):
                logger.warning(
                    "a peer of run %r (%s) still ran in this process: closing it first", run_id, older.peer.peer_id
                )
                older.close()

    @property
    def closed(self) -> bool:
        return self._loop is None

    # -- the optimizer's hooks (the training thread) --

    @contextlib.contextmanager
    def _in_hook(self):
        """Count the time inside as the training thread's time in this attachment (``train/utilization``)."""
        self._hook_since = time.perf_counter()
        try:
            yield
        finally:
            self._hook_seconds += time.perf_counter() - self._hook_since
            self._hook_since = None

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with self._in_hook():
            if self._checkpoint_due:  # the previous iteration's scheduler step is taken by now
                self.save_checkpoint()
            if not self._stepping:  # a step that raised left the lock held: its next step releases it
                self._state_lock.acquire()
                self._stepping = True

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with self._in_hook():
            self.local_step += 1
            self._steps_since_round += 1
            self._samples_since_round += self.samples_per_step
            if self._stepping:
                self._stepping = False
                self._state_lock.release()
            self._poll_round()
            if self.checkpoint_every is not None and self.local_step % self.checkpoint_every == 0:
                self._checkpoint_due = True

    # -- what the training loop calls --

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
        """Membership records of the run's live peers (this one included), by peer id: all of them in a swarm small
        enough for one key of records, else those of this peer's shard (``membership``)."""
        return self._loop.run(self.peer.live_peers(), timeout=timeout)

    def wait_for_peers(self, count: int, timeout: float = 60.0) -> int:
        """Block until ``count`` live peers (this one included) are in the run; returns how many (``swarm_size``)."""
        self._loop.run(self.peer.wait_for_peers(count, timeout), timeout=timeout + 5)
        return self.peer.swarm_size

    def average_now(self, timeout: float = 60.0, params: bool = False, round_id: int | None = None) -> RoundRecord:
        """Block until the round in flight (if any) and one fresh round are applied; for a final sync.

        With ``params=True`` the fresh round averages the parameters themselves, not deltas, even
        where a sparse codec's round would send deltas, and without error feedback (a "final"
        round of ``gossiptrain.wire``): it is what brings peers to agreement and keeps them there,
        and it groups this peer with the others doing the same.
        ``round_id`` picks the round explicitly (peers that agree on it average together).
        Raises ``TimeoutError`` if the round in flight does not end within ``timeout`` (it may wait for
        a slot that starts later: a fresh round then would take the same slot, and crash).
        """
        if self.closed:
            raise RuntimeError("this peer was closed: attach again to rejoin the swarm")
        if self._inflight is not None:
            concurrent.futures.wait([self._inflight], timeout=timeout)
            if not self._inflight.done():
                raise TimeoutError(f"the averaging round in flight did not end within {timeout}s")
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

        After each of its rounds a finishing peer publishes a digest of its parameters (``param_digest``:
        random projections, which differ when any parameter differs), and it leaves once every other live
        peer is done and published the same digest (within float32 rounding: ``AGREEMENT``).  Counting whole
        rounds instead is not enough: two rounds of pairs
        mix only four peers, and pairs that split the swarm the same way twice end it in two camps.
        Final rounds leave values that the peers agree on where they are (``gossiptrain.wire``), so
        a peer that leaves first is not left behind by the others' later rounds.  Returns the last
        round's record (with its ``param_digest``), also when ``timeout`` runs out first.  How many live
        peers agree so far is shown as it goes (``gossiptrain.progress``).
        """
        self.peer.info = {**self.peer.info, "done": True}
        self._loop.run(self.peer.publish_info(), timeout=10)
        deadline, record = time.monotonic() + timeout, None
        with show_progress("finishing: peers done with the same parameters", unit="peers") as shown:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    record = self.average_now(timeout=remaining, params=True)
                except TimeoutError:
                    break
                with self._state_lock:
                    record.param_digest = param_digest(self.params)
                self.peer.info = {**self.peer.info, "digest": record.param_digest}
                self._loop.run(self.peer.publish_info(), timeout=10)
                others = [
                    info
                    for peer, info in self._loop.run(self.peer.live_peers(), timeout=10).items()
                    if peer != self.peer.peer_id
                ]
                tolerance = AGREEMENT * record.param_norm
                agreeing = sum(
                    bool(info.get("done") and agrees(info.get("digest"), record.param_digest, tolerance))
                    for info in others
                )
                shown.update(1 + agreeing, total=1 + len(others))
                if agreeing == len(others):
                    break
        return record

    # -- rounds --

    def _poll_round(self, start_next: bool = True) -> RoundRecord | None:
        record = None
        if self._inflight is not None and self._inflight.done():
            done, self._inflight = self._inflight, None  # processed once, whatever happens in _finish_round
            record = self._finish_round(done)
        if (
            start_next
            and self._inflight is None
            and (self.average_every_steps is None or self._steps_since_round >= self.average_every_steps)
        ):
            self._start_round()
        if self._crashes >= CRASHES_BEFORE_RAISING:
            crashes, self._crashes = self._crashes, 0
            raise RoundCrashError(
                f"{crashes} averaging rounds in a row crashed (a bug, not a network failure: its traceback is in "
                f"the log); this peer trains alone until it is fixed.  The last one: {self._last_crash!r}"
            ) from self._last_crash
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
        wire = await asyncio.to_thread(self._contribution, round_id, mode)
        self._mode = wire.mode
        return await self.peer.average(
            wire.values,
            weight,
            round_id,
            residual=wire.residual,
            mode=wire.mode,
            codec=wire.codec,
            state_lock=self._state_lock,
        )

    def _contribution(self, round_id: int, mode: str | None) -> Contribution:
        """The strategy's values for this round, under the state lock (it may reset the strategy's state)."""
        with self._state_lock:
            return self.strategy.contribution(self._snapshot, round_id, mode)

    def _take_snapshot(self) -> tuple[torch.Tensor, float]:
        """The flat parameters and the round's weight: the samples seen since the last snapshot, or where the
        strategy's values hold them (``holds_unapplied_steps``) since the last round applied.

        Waits for the state lock one slot at most (at least 5 s): by then the round it is for has begun
        without us.  Raises TimeoutError (the round fails) if the training thread holds it longer: a step,
        a checkpoint write, or a step that raised and was not followed by another (it keeps the lock).
        """
        wait = max(5.0, self.peer.round_interval)
        if not self._state_lock.acquire(timeout=wait):
            raise TimeoutError(
                f"the training thread held the state lock for over {wait:.0f}s (a step or a checkpoint write in "
                f"progress, or a step that raised and was not followed by another): this round is skipped"
            )
        try:
            with torch.no_grad():
                snapshot, self._snapshot_step = host_copy(self.params), self.local_step
                samples, self._samples_since_round = self._samples_since_round, 0
                if self.strategy.holds_unapplied_steps:
                    self._samples_unapplied += samples
                    samples = self._samples_unapplied
        finally:
            self._state_lock.release()
        return snapshot, float(max(samples, 1))

    def _finish_round(self, future: concurrent.futures.Future) -> RoundRecord:
        """Apply a finished round and make its record.  A network failure (``EXPECTED_ROUND_FAILURES``) is a
        ``failed`` round; any other exception is a crash: logged with its traceback, counted, and after
        ``CRASHES_BEFORE_RAISING`` in a row raised from the step (``_poll_round``).  An ``on_round`` that
        raises loses its own record only (logged)."""
        try:
            try:
                result: RoundResult = future.result()
            except EXPECTED_ROUND_FAILURES as e:
                logger.warning("averaging round failed: %r", e)
                result = RoundResult(-1, "failed", [], self._snapshot, errors=[repr(e)])
            except Exception as e:
                self._crashes, self._last_crash = self._crashes + 1, e
                self.rounds_crashed += 1
                logger.error("averaging round crashed (%d in a row)", self._crashes, exc_info=e)
                result = RoundResult(-1, "failed", [], self._snapshot, errors=[repr(e)])
            else:
                self._crashes = 0
            if result.status in AVERAGED or (result.status == "alone" and self.strategy.steps_alone):
                self._apply_round(result)
                self._samples_unapplied = 0
                self.rounds_done += result.status in AVERAGED
            elif result.status == "failed":
                self.rounds_failed += 1
        finally:
            self._snapshot = None  # applied or not, the round is over: the next snapshot must not meet this one
        self.bytes_sent += result.bytes_sent
        self.bytes_received += result.bytes_received
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
            param_norm=param_norm(self.params),
            errors=result.errors,
            rejected=dict(self.peer.rejections),
            refused=len(result.refused),
            clipped=result.clipped,
            dropped=result.dropped,
        )
        self.last_round = record
        self.report()
        if self.on_round is not None:
            try:
                self.on_round(record)
            except Exception as e:
                self.on_round_errors += 1
                logger.warning(
                    "on_round raised %r (%d times so far); training and averaging go on",
                    e,
                    self.on_round_errors,
                    exc_info=e if self.on_round_errors == 1 else None,
                )
        if self.trackers:
            self.trackers.log_round(record, self._counters(record))
        return record

    def _counters(self, record: RoundRecord) -> dict[str, float]:
        """The cumulative counters the trackers log beside ``record``, and the outer step's norm of its round."""
        counters = {
            "rounds/averaged": self.rounds_done,
            "rounds/failed": self.rounds_failed,
            "rounds/crashed": self.rounds_crashed,
            "bytes/sent_total": self.bytes_sent,
            "bytes/received_total": self.bytes_received,
        }
        now = time.perf_counter()
        spent = self._hook_seconds + (now - self._hook_since if self._hook_since is not None else 0.0)
        mark = self._utilization_mark
        if self._hook_since is not None and mark is not None and now > mark[0]:
            # the share of the training thread's time since the last record not spent in this attachment's
            # hooks (a record made in finish() has none: the training thread is not stepping then)
            counters["train/utilization"] = 1.0 - (spent - mark[1]) / (now - mark[0])
        self._utilization_mark = (now, spent)
        step_norm = getattr(self.strategy, "step_norm", None)
        if record.mode == "outer" and record.status != "failed" and step_norm is not None:  # this round's step
            counters["outer/step_norm"] = step_norm
        return counters

    def _apply_round(self, result: RoundResult) -> None:
        """Move the strategy's state (reference, anchor, outer optimizer) and the live parameters by
        ``after - snapshot``, together under the state lock: a joiner's snapshot sees both or neither
        (``params.apply_delta``: where no step was taken since the snapshot, they become ``after``)."""
        with self._state_lock, torch.no_grad():
            after = self.strategy.combine(result, self._snapshot, self._mode)
            apply_delta(self.params, after, self._snapshot, becomes=self.local_step == self._snapshot_step)

    # -- state: joiners, checkpoints --

    def _join(self, timeout: float, own: dict[str, Any] | None) -> None:
        """Load a live peer's training state, unless this peer is the first of its run (see Joining), or,
        after a restart from a checkpoint (``own``), unless the swarm's state is not ahead of it (see Checkpoints).
        That is judged on the state downloaded, not on the steps of the membership records, which are only as
        recent as their last refresh (``Peer``'s heartbeat_ttl)."""
        started = time.perf_counter()
        try:
            state = self._loop.run(
                download_state(self.peer, timeout=timeout, validate=self._check_state), timeout=timeout + 10
            )
        except NoStateDonors:
            if own is not None:
                return self._say_resumed("checkpoint", own, "no other live peer serves its state")
            logger.info("no live peer of run %r serves its state: keeping our own initialisation", self.peer.run_id)
            return
        if own is not None and training_state.resume_source(own["local_step"], state["local_step"]) == "checkpoint":
            return self._say_resumed("checkpoint", own, f"the swarm is at step {state['local_step']}")
        with self._state_lock:
            self.local_step = training_state.load(state, self.params, self.optimizer, self.strategy, self.scheduler)
        self.state_download_seconds = time.perf_counter() - started
        self.report()
        if own is not None:
            return self._say_resumed("swarm", own, f"the swarm is at step {self.local_step}")
        logger.info(
            "joined run %r at step %d with a downloaded state in %.2fs",
            self.peer.run_id,
            self.local_step,
            self.state_download_seconds,
        )

    def _say_resumed(self, source: str, own: dict[str, Any], why: str) -> None:
        """The one log line of a restart from a checkpoint: which state this peer goes on from, and why."""
        self.resumed_from = source
        if source == "swarm":
            logger.info(
                "resumed run %r from the swarm's state at step %d: our checkpoint %s is behind, at step %d",
                self.peer.run_id,
                self.local_step,
                self.checkpoint,
                own["local_step"],
            )
        else:
            logger.info(
                "resumed run %r from our own checkpoint %s at step %d (%s)",
                self.peer.run_id,
                self.checkpoint,
                own["local_step"],
                why,
            )

    def _check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError if a downloaded state cannot be loaded here (called before anything is loaded)."""
        training_state.check(state, self.params, self.optimizer, self.strategy)

    def _state_snapshot(self) -> dict[str, Any]:
        """What a joiner needs, under the state lock (the state server calls it from a worker thread): the
        live tensors, which the server reads a chunk at a time under that lock, not copies of them."""
        extra = {"schema": self.peer.model_schema, "rounds_done": self.rounds_done}
        with self._state_lock:
            return training_state.capture(
                self.params, self.optimizer, self.local_step, self.strategy, extra, self.scheduler, copy=False
            )

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        """Write this peer's whole training state to ``path`` (by default the ``checkpoint`` given to attach),
        atomically: a peer killed while writing leaves the previous checkpoint whole."""
        path = path if path is not None else self.checkpoint
        if path is None:
            raise ValueError("no checkpoint path: pass one here or as attach(checkpoint=...)")
        self._checkpoint_due = False
        counters = {"rounds_done": self.rounds_done, "rounds_failed": self.rounds_failed}
        extra = {"schema": self.peer.model_schema, "counters": counters}
        with self._state_lock:
            state = training_state.capture(
                self.params, self.optimizer, self.local_step, self.strategy, extra, self.scheduler, own=True
            )
            if self.model is not None:
                state["buffers"] = {name: b.detach().to("cpu", copy=True) for name, b in self.model.named_buffers()}
        training_state.save(path, state)

    def _restore_checkpoint(self) -> dict[str, Any]:
        """Load this peer's own checkpoint (before it joins); returns it."""
        state = training_state.read(self.checkpoint)
        schema = state.get("extra", {}).get("schema")
        if schema != self.peer.model_schema:
            raise ValueError(
                f"checkpoint {self.checkpoint} was saved for model schema {schema!r}, this peer's is "
                f"{self.peer.model_schema!r}: is it the same model (and the same outer mode setting)?"
            )
        try:
            training_state.check(state, self.params, self.optimizer, self.strategy)
        except ValueError as e:
            raise ValueError(f"checkpoint {self.checkpoint} does not fit this model and optimizer: {e}") from None
        with self._state_lock:
            self.local_step = training_state.load(
                state, self.params, self.optimizer, self.strategy, self.scheduler, own=True
            )
            if self.model is not None and "buffers" in state:
                buffers = dict(self.model.named_buffers())
                for name, value in state["buffers"].items():
                    if name in buffers:
                        buffers[name].copy_(value)
        counters = state["extra"].get("counters", {})
        self.rounds_done, self.rounds_failed = counters.get("rounds_done", 0), counters.get("rounds_failed", 0)
        return state

    # -- leaving --

    def close(self) -> None:
        """Remove the hooks, leave the swarm and stop the background loop and the daemon; safe to call twice.

        Bounded in time, also when the daemon is already dead (a notebook's interrupt reaches it too)
        and when a second Ctrl-C interrupts it: the daemon is then killed rather than left behind.
        """
        if self._loop is None:
            return
        _LIVE.discard(self)
        if self._checkpoint_due:
            try:
                self.save_checkpoint()
            except Exception as e:
                logger.warning("could not write the checkpoint %s on leaving: %r", self.checkpoint, e)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._stepping:  # a step raised between the hooks
            self._stepping = False
            with contextlib.suppress(RuntimeError):
                self._state_lock.release()
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
                self.trackers.close()

    shutdown = close

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

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_loop", None) is not None:
            logger.warning("a gossiptrain peer was not closed; call close() or use it as a context manager")


def attach(optimizer: torch.optim.Optimizer, *, run_id: str, **options: Any) -> Attachment:
    """Make ``optimizer`` a peer of run ``run_id``: its steps now average with the swarm in the background.

    The user's optimizer stays the optimizer (schedulers, ``state_dict()``, gradient scalers and
    frameworks see it unchanged); returns the ``Attachment``, a context manager with ``finish()``,
    ``close()``, ``save_checkpoint()``, the peer and its metrics.  Options: see ``Attachment``.

    Examples:
        >>> with gossiptrain.attach(optimizer, run_id="my-run", initial_peers=[...]) as swarm:
        ...     for batch in data: ...  # the loop as it was: loss.backward(); optimizer.step(); scheduler.step()
        ...     swarm.finish()
    """
    return Attachment(optimizer, run_id=run_id, **options)
