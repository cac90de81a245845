"""LocalSwarm: peers as real processes on localhost, for tests, benchmarks and the demo.

Every process is started in a session of its own, so that killing it also kills its libp2p
daemon (as when a machine dies), and ``close()`` (or leaving the ``with`` block) kills whatever
is still running, even when a test fails or the parent is stopped with SIGTERM (``timeout``, CI):
inside the ``with`` block SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P
from hivemind.utils import MSGPackSerializer, get_dht_time

from gossiptrain.auth import Identity
from gossiptrain.exchange import PART_NUMEL, RoundExchange
from gossiptrain.membership import Membership, SignedRecords
from gossiptrain.peer import Peer
from gossiptrain.rounds import RoundResult
from gossiptrain.state import StateServer, StateStream
from gossiptrain.transport import FRAME_PREFIX, ByteCounter, FrameKind, write_frame, write_message

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class ProcessOutput:
    """Collects a child's stdout lines in a thread, so they can be awaited with a timeout."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines = process, []
        self._new: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line.rstrip("\n"))

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first line (seen from now on) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.process.poll() is not None and self._new.empty():
                    break
                continue
            if predicate(line):
                return line
        tail = "\n".join(self.lines[-20:])
        raise TimeoutError(
            f"process {self.process.args} printed no expected line within {timeout}s; last lines:\n{tail}"
        )


def _run_in_own_session(target: Callable[..., Any], results: multiprocessing.Queue, key: Any, args: tuple) -> None:
    os.setsid()
    try:
        results.put((key, "ok", target(*args)))
    except BaseException:
        results.put((key, "error", traceback.format_exc()))


class LocalSwarm:
    """Starts and owns a bootstrap node and any number of peer processes on 127.0.0.1."""

    def __init__(self):
        self._popen: list[subprocess.Popen] = []
        self._processes: list[multiprocessing.Process] = []
        self._context = multiprocessing.get_context("spawn")
        self._results = self._context.Queue()
        self.initial_peers: list[str] = []
        self._sigterm_handler: Any = None

    def __enter__(self) -> LocalSwarm:
        if threading.current_thread() is threading.main_thread():
            self._sigterm_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.close()
        finally:
            if self._sigterm_handler is not None:
                signal.signal(signal.SIGTERM, self._sigterm_handler)

    @property
    def context(self) -> multiprocessing.context.SpawnContext:
        """The multiprocessing context of spawned peers (for queues and events shared with them)."""
        return self._context

    def track(self, process: subprocess.Popen) -> None:
        """Make the swarm own a process started elsewhere (it is killed on close)."""
        self._popen.append(process)

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, ProcessOutput]:
        """Start ``argv`` in its own session, its stdout captured line by line (e.g. in a network namespace)."""
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.track(process)
        return process, ProcessOutput(process)

    def run_cli(self, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, ProcessOutput]:
        """Start ``gossiptrain <args>`` in its own session, its stdout captured line by line."""
        return self.start([sys.executable, "-m", "gossiptrain", *args], env)

    def start_bootstrap(self, timeout: float = 30.0) -> list[str]:
        """Start a DHT-only node; its multiaddrs become ``initial_peers`` for the peers."""
        _, output = self.run_cli("bootstrap", "--host-maddrs", LOOPBACK)
        self.initial_peers = [output.wait_for(lambda line: line.startswith("/ip4/"), timeout)]
        return self.initial_peers

    def start_peer(self, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, ProcessOutput]:
        """Start ``gossiptrain peer`` joined to this swarm's bootstrap node (``env``: variables added to ours)."""
        return self.run_cli("peer", "--host-maddrs", LOOPBACK, "--initial-peers", *self.initial_peers, *args, env=env)

    def spawn(self, key: Any, target: Callable[..., Any], *args: Any) -> multiprocessing.Process:
        """Run ``target(*args)`` in a fresh process; its return value arrives through ``results``."""
        process = self._context.Process(
            target=_run_in_own_session, args=(target, self._results, key, args), daemon=True
        )
        process.start()
        self._processes.append(process)
        return process

    def results(self, count: int, timeout: float) -> dict[Any, Any]:
        """Wait for ``count`` spawned targets to return; raise if one failed or time ran out."""
        deadline, collected = time.monotonic() + timeout, {}
        while len(collected) < count:
            try:
                key, status, value = self._results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"only {len(collected)} of {count} peer processes finished within {timeout}s"
                ) from None
            if status == "error":
                raise RuntimeError(f"peer process {key!r} failed:\n{value}")
            collected[key] = value
        return collected

    @staticmethod
    def kill(pid: int) -> None:
        """SIGKILL a process and its whole session (its libp2p daemon too)."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        for process in self._popen:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self._popen:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.kill(process.pid)
        for process in self._processes:
            if process.pid is not None:
                self.kill(process.pid)  # its session: its daemons too
                process.kill()  # itself, even if it was killed before it made its session
                # reaped at once: a join with a timeout waits on a pipe that a grandchild may still hold open
                process.join()
        self._results.close()


def _with_nan(payload: bytes) -> bytes:
    """A ``none``-codec payload whose first value is NaN, re-sealed with a valid checksum."""
    body = bytearray(payload[:-4])
    body[12:16] = struct.pack("<f", float("nan"))
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


class FaultyExchange(RoundExchange):
    """A round exchange that uploads bad data of one kind (``fault``), to test that peers refuse it.

    ``die`` sends half of its slice and then SIGKILLs its own process session (the daemon too),
    as a machine that dies in the middle of an exchange; ``die_before`` does so as the round starts,
    after registering for it, so that the others fail to dial it.  Use both only in a
    ``LocalSwarm.spawn`` child.  ``slow_reader`` uploads correctly and reads the reply a second
    late, as a starved process does; ``slow_uploader`` sends its HELLO at once and its values
    ``SLOW_UPLOAD_SECONDS`` later, as a peer on a slow link does.  Hostile but well-formed: ``huge``
    sends its values times 1e4, ``heavy`` its values plus 1 with a weight of 1e9, and
    ``shifted_mean`` (an owner: use it with ``client_mode=False``) returns its shard's mean plus 1.
    """

    fault = "nan"
    FAULTS = (
        "nan",
        "wrong_shape",
        "wrong_dtype",
        "truncated",
        "oversized",
        "garbage",
        "stale_round",
        "wrong_run",
        "not_in_group",
        "stall",
        "die",
        "die_before",
        "slow_reader",
        "slow_uploader",
        "huge",
        "heavy",
        "shifted_mean",
    )
    SLOW_UPLOAD_SECONDS = 2.0

    async def _start_reduction(self) -> None:
        await super()._start_reduction()
        if self.fault == "shifted_mean" and self._reduction is not None:
            honest_mean = self._reduction.mean
            self._reduction.mean = lambda out=None: honest_mean(out=out).add_(1.0)

    async def run(self) -> RoundResult:
        if self.fault == "die_before":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        return await super().run()

    async def upload(self, writer: asyncio.StreamWriter, start: int, end: int) -> None:
        hello, values = self.hello(start, end), self.values[start:end].clone()
        if self.fault == "garbage":
            writer.write(FRAME_PREFIX.pack(FrameKind.HELLO, 16) + b"\xc1" * 16)  # 0xc1 is never valid msgpack
            return await writer.drain()
        hello.update(
            {
                "wrong_dtype": {"codec": "fp16"},
                "stale_round": {"round_id": hello["round_id"] - 5},
                "wrong_run": {"run_id": "another-run"},
                "not_in_group": {"sender": "12D3KooWNotAMemberOfThisGroupxxxxxxxxxxxxxxxxxxxxx"},
                "heavy": {"weight": 1e9},
            }.get(self.fault, {})
        )
        await write_message(writer, FrameKind.HELLO, hello, self.counter)
        if self.fault == "nan":
            payload = _with_nan(self.codec.encode(values))
            return await write_frame(writer, FrameKind.PART, payload, self.counter)
        if self.fault == "wrong_shape":
            values = values[:-1]
        elif self.fault == "truncated":  # the frame announces the whole payload, the stream ends half-way
            payload = self.codec.encode(values)
            writer.write(FRAME_PREFIX.pack(FrameKind.PART, len(payload)) + payload[: len(payload) // 2])
            await writer.drain()
            return writer.close()
        elif self.fault == "oversized":
            writer.write(FRAME_PREFIX.pack(FrameKind.PART, 2**31))
            return await writer.drain()
        elif self.fault == "stall":
            return await asyncio.sleep(3600)
        elif self.fault == "huge":
            values = values * 1e4
        elif self.fault == "heavy":
            values = values + 1.0
        elif self.fault == "slow_uploader":
            await asyncio.sleep(self.SLOW_UPLOAD_SECONDS)
        elif self.fault == "die":
            payloads = self.payloads(start, end)
            for payload in payloads[: max(1, len(payloads) // 2)]:
                await write_frame(writer, FrameKind.PART, payload, self.counter)
            os.killpg(os.getpgrp(), signal.SIGKILL)
        for a in range(0, max(len(values), 1), PART_NUMEL):  # in parts, as RoundExchange.upload sends them
            await write_frame(writer, FrameKind.PART, self.codec.encode(values[a : a + PART_NUMEL]), self.counter)
        if self.fault == "slow_reader":
            await asyncio.sleep(1.0)


class FaultyPeer(Peer):
    """A peer whose uploads are bad in one way; in client mode (the default) it reduces nothing."""

    def __init__(self, *args: Any, fault: str, client_mode: bool = True, **kwargs: Any):
        super().__init__(*args, client_mode=client_mode, **kwargs)
        self.exchange_class = faulty_exchange(fault)


def faulty_exchange(fault: str) -> type[FaultyExchange]:
    """A ``FaultyExchange`` class with ``fault`` (one of ``FaultyExchange.FAULTS``)."""
    if fault not in FaultyExchange.FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose one of {FaultyExchange.FAULTS}")
    return type(f"FaultyExchange[{fault}]", (FaultyExchange,), {"fault": fault})


class FaultyStateServer(StateServer):
    """A state donor that fails in one way (``fault``) half-way through the state, to test that joiners
    drop it and download from the next donor.  Use it as ``peer.state_server_class = faulty_state_server(...)``
    before ``peer.serve_state``.

    ``corrupt`` flips one byte (the checksum fails), ``stall`` stops sending but keeps the stream open,
    ``close`` closes the stream, ``die`` SIGKILLs its own process session (the daemon too), as a machine
    that dies mid-download: use ``die`` only in a ``LocalSwarm.spawn`` child.
    """

    fault = "corrupt"
    FAULTS = ("corrupt", "stall", "close", "die")

    async def send_parts(self, writer: asyncio.StreamWriter, stream: StateStream, counter: ByteCounter) -> None:
        count, index = -(-stream.size // self.chunk_bytes), -1
        async for chunk in stream.chunks(self.chunk_bytes):
            index += 1
            if index == count // 2:
                if self.fault == "corrupt":
                    chunk = bytes([chunk[0] ^ 0xFF]) + bytes(chunk[1:])
                elif self.fault == "stall":
                    await self.closed.wait()
                    raise ConnectionAbortedError("stalled on purpose until the server was closed")
                elif self.fault == "close":
                    writer.close()
                    raise ConnectionAbortedError("closed the stream on purpose")
                elif self.fault == "die":
                    os.killpg(os.getpgrp(), signal.SIGKILL)
            async with asyncio.timeout(self.timeouts.part):
                await write_frame(writer, FrameKind.PART, chunk, counter)


def faulty_state_server(fault: str) -> type[StateServer]:
    """A ``FaultyStateServer`` class with ``fault`` (one of ``FaultyStateServer.FAULTS``)."""
    if fault not in FaultyStateServer.FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose one of {FaultyStateServer.FAULTS}")
    return type(f"FaultyStateServer[{fault}]", (FaultyStateServer,), {"fault": fault})


class _GhostSigner(SignedRecords):
    """Signs each record in the name of whichever of its ghosts the record's subkey names."""

    def __init__(self):
        super().__init__(None)
        self.ghosts: dict[bytes, Identity] = {}

    def sign_value(self, record: DHTRecord) -> bytes:
        ghost = self.ghosts.get(record.subkey)
        if ghost is None:
            return record.value
        return record.value + ghost.sign(self.signed_bytes(record, record.value)) + self.MARKER


class GhostFlood:
    """Registers ``count`` fresh identities for every round slot of an open run, ghosts that never answer.

    Their round records are validly signed (each by its own new key) and look like an honest peer's:
    ``record`` gives the fields (numel, mode, schema), and each ghost claims that the honest participants
    of the previous round answered it.  Use as ``async with GhostFlood(run_id, maddrs, record=...)``.
    """

    def __init__(
        self, run_id: str, initial_peers: list[str], *, record: dict, count: int = 20, round_interval: float = 1.0
    ):
        self.run_id, self.initial_peers, self.record = run_id, initial_peers, record
        self.count, self.round_interval = count, round_interval
        self.registered = 0  # ghost round records stored
        self._signer = _GhostSigner()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> GhostFlood:
        self.p2p = await P2P.create(initial_peers=self.initial_peers, host_maddrs=[LOOPBACK])
        self.dht = await DHTNode.create(
            p2p=self.p2p, initial_peers=self.initial_peers, client_mode=True, record_validator=self._signer
        )
        self._task = asyncio.create_task(self._flood())
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.dht.shutdown()
        await self.p2p.shutdown()

    async def _flood(self) -> None:
        honest: list[str] = []
        while True:
            round_id = int(get_dht_time() / self.round_interval) + 1
            ghosts = [Identity.generate() for _ in range(self.count)]
            self._signer.ghosts = {MSGPackSerializer.dumps(ghost.peer_id): ghost for ghost in ghosts}
            info = {**self.record, "client": False, "answered": honest}
            expiration = (round_id + 2) * self.round_interval
            stored = await asyncio.gather(
                *(
                    Membership(self.dht, self.run_id, ghost.peer_id).join_round(round_id, info, expiration)
                    for ghost in ghosts
                )
            )
            self.registered += sum(map(bool, stored))
            await asyncio.sleep(max(0.0, round_id * self.round_interval - get_dht_time()))
            seen = await Membership(self.dht, self.run_id, "").round_participants(round_id)
            names = {ghost.peer_id for ghost in ghosts}
            honest = sorted(peer for peer in seen if peer not in names)[:32]
