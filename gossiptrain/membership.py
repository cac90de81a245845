"""Membership in the DHT: heartbeat records of live peers and per-round participation.

Two kinds of records, both dictionaries keyed by peer id (DHT subkeys):

- members: each live peer's info (addresses, step, loss, last round), with a short expiration refreshed by a
  heartbeat.  A crashed peer vanishes by expiry; a peer that leaves cleanly overwrites its record with a
  tombstone, which readers skip at once.
- round ``r``'s participants: read once at the round's start time to form groups.

Both are sharded so that no key, and no reader, holds more than a few dozen records however large the swarm
(``CELL_PEERS``): at ``level`` k, a peer's member record goes into shard ``hash(peer) mod 2**k`` (and into a
sample of the shards below that hold it, ``census_levels``, where peers left behind find it) and its round
record into cell ``hash(round, peer) mod 2**k`` (cells change every round, so groups keep mixing).
Level 0 is one key of each kind, as a small swarm needs.  A peer learns the swarm's size from what it reads
(the count of a key times ``2**k``, and the sizes the records declare, ``swarm``), and moves to the level
that size calls for (``level_for``).  Peers at different levels do not meet in a key; the declared sizes make
their estimates converge, so a swarm moves between levels within a few rounds.  A joiner finds the level by
reading its shard at level 0 (or 1, ... until one holds records: ``discover``).  So what a peer reads of the
members is a sample, the whole swarm only at level 0.

Records no one can forge (``SignedRecords``, installed in every gossiptrain DHT node): a record is
valid only if its subkey is an Ed25519 libp2p peer id and its value carries that peer's signature
over the record's key, subkey, value and expiration.  The peer id embeds its public key
(``gossiptrain.auth``), so no key directory is needed.  Every honest node refuses to store, and every
honest reader drops, a record that names peer X but is not signed by X, a record moved to another
key (another round) or given a later expiration, and any record without a peer-id subkey (which
would otherwise let a plain value with a later expiration overwrite the whole dictionary).  What it
does not stop: anyone can create fresh identities and register them in their own names (ghosts that
never answer); in a private run (``Admission``) those are refused for want of a certificate, in an
open run nothing here bounds them.  A node that answers a lookup with one forged entry has its
whole answer dropped by the reader (hivemind validates dictionaries whole); the other replicas
still answer.  Each peer checks a given record's signature once (``MAX_VERIFIED_RECORDS``).

Private runs: each record also carries the writer's certificate (``cert``), and a reader with an
``Admission`` keeps only entries whose certificate admits their (signing) peer; the rest are
counted in ``rejections`` as ``uncredentialed_member`` (once per peer) or ``uncredentialed_round``
(once per peer and round).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from gossiptrain.auth import Admission, Identity, public_key_of, verify

if TYPE_CHECKING:
    from gossiptrain.rejections import Rejections

logger = logging.getLogger(__name__)

LEFT = "left"
CERT = "cert"
MAX_REMEMBERED_REFUSALS = 4096  # distinct refused peer ids remembered (so each is logged once), then forgotten
MAX_VERIFIED_RECORDS = 4096  # digests of records whose signature was checked: each replica's copy is checked once
CELL_PEERS = 16  # a key of member or round records holds about this many peers (from 0.57x to 1.74x of it)
MAX_LEVEL = 20  # 2**20 shards: sixteen million peers
# a peer moves to another level once its estimate is this far (in log2) past a boundary: one key, where every peer
# reads every other and groups mix exactly (``groups``), holds a swarm that grew to 27 peers (3**3: one epoch of
# groups of 3 gives every peer the global mean), where 0.15 split it into two cells at 26
LEVEL_MARGIN = 0.3


def shard(text: str, level: int) -> int:
    """Which of the ``2**level`` shards (or cells) ``text`` falls in."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << level) - 1)


def level_for(swarm_size: float, current: int) -> int:
    """The level a swarm of about ``swarm_size`` peers uses: keys of about ``CELL_PEERS`` peers.  A peer at
    ``current`` stays there until its estimate is ``LEVEL_MARGIN`` past a boundary, so that estimates that
    differ a little do not split a swarm between levels."""
    ideal = math.log2(max(swarm_size, 1.0) / CELL_PEERS)
    if abs(ideal - current) <= 0.5 + LEVEL_MARGIN:
        return current
    return min(MAX_LEVEL, max(0, round(ideal)))


def census_levels(peer: str, level: int) -> list[int]:
    """The levels below ``level`` where a peer at ``level`` also stores its member record: the one just below
    always, each further one down with half the chance (fixed per peer), so that a shard at any level holds
    about ``2 * CELL_PEERS`` records of the peers above it, however large the swarm (about two extra stores)."""
    return [j for j in range(level) if shard(f"census|{j}|{peer}", 30) < (1 << 30) >> (level - 1 - j)]


def _census_weight(writer_level: Any, read_level: int) -> float:
    """How many peers of its level a record read at ``read_level`` stands for, relative to ``2**read_level``: one,
    or for a writer two or more levels above, the inverse of the chance that it stored its record there."""
    if not isinstance(writer_level, int) or writer_level <= read_level + 1:
        return 1.0
    return float(1 << min(writer_level - read_level - 1, MAX_LEVEL))


def declared_size(record: dict[str, Any]) -> float | None:
    """The swarm size a record declares, if it is a number >= 1."""
    size = record.get("swarm")
    return float(size) if isinstance(size, (int, float)) and math.isfinite(size) and size >= 1 else None


@dataclass
class DHTTraffic:
    """What a peer's records cost it in the DHT, counted as it goes: calls (stores and reads) and the bytes of
    the values it stored and read (serialized; the DHT's own routing messages come on top)."""

    requests: int = 0
    bytes_stored: int = 0
    bytes_read: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_stored + self.bytes_read


class RecordStore(Protocol):
    """Dictionaries of records with expirations (the subset of ``hivemind.dht.node.DHTNode`` used here):
    ``get`` returns None or an object whose ``value`` maps each subkey to an item with ``value``."""

    async def store(
        self, key: str, value: Any, expiration_time: float, *, subkey: str, await_all_replicas: bool = True
    ) -> bool: ...

    async def get(self, key: str, latest: bool = True) -> Any: ...

    async def shutdown(self) -> None: ...


class SignedRecords(RecordValidatorBase):
    """A DHT record validator: every record is signed by the peer its subkey names (see the module docstring).

    Args:
        identity: this node's identity, whose records it signs; None for a node that only reads and relays.
    """

    MARKER = b"\x00gossiptrain-signed-v1"
    DOMAIN = b"gossiptrain record v1\0"
    SIGNATURE_BYTES = 64

    def __init__(self, identity: Identity | None = None):
        self.identity = identity
        self._own_subkey = None if identity is None else MSGPackSerializer.dumps(identity.peer_id)
        self._keys: dict[bytes, Any] = {}  # subkey bytes -> public key (or None), a cache
        self._verified: dict[bytes, None] = {}  # digests of valid signed records, oldest first

    def signed_bytes(self, record: DHTRecord, value: bytes) -> bytes:
        """What the writer signs: the record with ``value`` (unsigned) in place of its value."""
        return self.DOMAIN + MSGPackSerializer.dumps([record.key, record.subkey, value, record.expiration_time])

    def _public_key(self, subkey: bytes):
        if subkey not in self._keys:
            if len(self._keys) >= MAX_REMEMBERED_REFUSALS:
                self._keys.clear()
            try:
                peer_id = MSGPackSerializer.loads(subkey)
            except Exception:
                peer_id = None
            self._keys[subkey] = public_key_of(peer_id) if isinstance(peer_id, str) else None
        return self._keys[subkey]

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.identity is None or record.subkey != self._own_subkey:
            return record.value  # not ours to sign: every honest validator refuses it
        return record.value + self.identity.sign(self.signed_bytes(record, record.value)) + self.MARKER

    def validate(self, record: DHTRecord) -> bool:
        tail = self.SIGNATURE_BYTES + len(self.MARKER)
        if len(record.value) < tail or not record.value.endswith(self.MARKER):
            logger.debug("refused an unsigned DHT record (subkey %r)", record.subkey)
            return False
        digest = hashlib.blake2b(
            MSGPackSerializer.dumps([record.key, record.subkey, record.value, record.expiration_time]), digest_size=16
        ).digest()
        if digest in self._verified:  # the same record from another replica, or read again
            return True
        public_key = self._public_key(record.subkey)
        if public_key is None:
            logger.debug("refused a DHT record whose subkey %r is not an Ed25519 peer id", record.subkey)
            return False
        value, signature = record.value[:-tail], record.value[-tail : -len(self.MARKER)]
        if not verify(public_key, signature, self.signed_bytes(record, value)):
            logger.debug("refused a DHT record not signed by the peer its subkey %r names", record.subkey)
            return False
        if len(self._verified) >= MAX_VERIFIED_RECORDS:
            del self._verified[next(iter(self._verified))]
        self._verified[digest] = None
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        if record.value.endswith(self.MARKER):
            return record.value[: -(self.SIGNATURE_BYTES + len(self.MARKER))]
        return record.value

    @property
    def priority(self) -> int:
        return 10  # validated before (and stripped before) any validator that deserializes values

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SignedRecords)


def _live_entries(found: Any) -> tuple[dict[str, dict[str, Any]], int]:
    """The live records of a dictionary read from the DHT, and the bytes of all its records."""
    if found is None or not isinstance(found.value, dict):
        return {}, 0
    entries, size = {}, 0
    for subkey, item in found.value.items():
        value = getattr(item, "value", None)
        size += len(MSGPackSerializer.dumps(value))
        if isinstance(subkey, str) and isinstance(value, dict) and not value.get(LEFT):
            entries[subkey] = value
    return entries, size


class Membership:
    """This peer's view of, and presence in, the run's membership records (sharded: see the module docstring).

    Args:
        clock: the time that record expirations are in (the DHT's: hivemind's ``get_dht_time`` live, virtual
            time in the simulator).
        credential: this peer's certificate (``Certificate.to_bytes()``), added to every record it writes.
        admission: in a private run, which entries to keep (see the module docstring).
        rejections: where refused entries are counted.
    """

    def __init__(
        self,
        dht: RecordStore,
        run_id: str,
        peer_id: str,
        ttl: float = 6.0,
        *,
        clock: Callable[[], float] = get_dht_time,
        credential: bytes | None = None,
        admission: Admission | None = None,
        rejections: Rejections | None = None,
    ):
        self.dht, self.run_id, self.peer_id, self.ttl, self.clock = dht, run_id, peer_id, ttl, clock
        self.credential, self.admission, self.rejections = credential, admission, rejections
        self.level = 0
        self.swarm_size = 1.0  # our estimate of the number of live peers (``observe``)
        self.traffic = DHTTraffic()
        self._round_keys: dict[int, tuple[str, int]] = {}  # where (key, level) we registered for a round: read there
        self._refused_members: set[str] = set()
        self._refused_rounds: set[tuple[int, str]] = set()

    def members_key(self, level: int | None = None, peer: str | None = None) -> str:
        """The key of the member records of ``peer``'s shard (ours by default) at ``level`` (ours by default)."""
        level = self.level if level is None else level
        if level == 0:
            return f"{self.run_id}.members"
        return f"{self.run_id}.members.{level}.{shard(peer or self.peer_id, level)}"

    def round_key(self, round_id: int, level: int | None = None) -> str:
        """The key of our cell of round ``round_id`` at ``level`` (ours by default)."""
        level = self.level if level is None else level
        if level == 0:
            return f"{self.run_id}.round.{round_id}"
        return f"{self.run_id}.round.{round_id}.{level}.{shard(f'{round_id}|{self.peer_id}', level)}"

    def _signed(self, info: dict[str, Any]) -> dict[str, Any]:
        info = {**info, "level": self.level, "swarm": round(self.swarm_size, 1)}
        return info if self.credential is None else {**info, CERT: self.credential}

    def _admitted(self, entries: dict[str, dict[str, Any]], round_id: int | None) -> dict[str, dict[str, Any]]:
        if self.admission is None:
            return entries
        kept = {}
        for peer, record in entries.items():
            reason = self.admission.refusal(peer, record.get(CERT))
            if reason is None:
                kept[peer] = record
            elif round_id is None:
                self._refuse(self._refused_members, peer, "uncredentialed_member", "-", reason)
            else:
                self._refuse(self._refused_rounds, (round_id, peer), "uncredentialed_round", round_id, reason)
        return kept

    def _refuse(self, seen: set, key: Any, kind: str, round_id: object, reason: str) -> None:
        if key in seen:
            return
        if len(seen) >= MAX_REMEMBERED_REFUSALS:
            seen.clear()
        seen.add(key)
        peer = key[1] if isinstance(key, tuple) else key
        if self.rejections is not None:
            detail = f"record left out of our view: {reason}"
            self.admission.count_refusal(self.rejections, kind, peer, round_id, detail)

    async def _store(self, key: str, value: dict[str, Any], expiration: float) -> bool:
        """Store our record under ``key``; returns once one replica holds it (the others get it in the background:
        a reader finds it on any), so that a loaded or slow replica does not hold up a registration."""
        self.traffic.requests += 1
        self.traffic.bytes_stored += len(MSGPackSerializer.dumps(value))
        return await self.dht.store(key, value, expiration, subkey=self.peer_id, await_all_replicas=False)

    async def _store_all(self, keys: list[str], value: dict[str, Any], expiration: float) -> bool:
        """Store our record under each of ``keys`` at once; whether the first of them succeeded."""
        stored = await asyncio.gather(*(self._store(key, value, expiration) for key in keys))
        return stored[0]

    async def _read(self, key: str) -> dict[str, dict[str, Any]]:
        self.traffic.requests += 1
        entries, size = _live_entries(await self.dht.get(key, latest=True))
        self.traffic.bytes_read += size
        return entries

    def observe(self, entries: dict[str, dict[str, Any]], level: int) -> None:
        """Update our estimate of the swarm's size from the records of one key read at ``level``, and our level.

        What the key counts: each record stands for ``2**level`` peers, or more for a record of a peer above that
        level stored there by chance (``census_levels``: it stands for as many as that chance is rare).  At level 0
        with every record written there, that is the swarm's exact size; otherwise the estimate is the mean of the
        count and the median of the sizes the records declare: estimates then converge across peers (each pulls
        towards the others') and to the count (a record that declares an absurd size moves the median by one
        place).  A read that holds no one else halves the estimate at most: a shard that happens to be empty (or a
        read that missed) must not send a peer down to level 0."""
        others = {peer: record for peer, record in entries.items() if peer != self.peer_id}
        weights = [_census_weight(record.get("level"), level) for record in others.values()]
        counted = float((1 + sum(weights)) * (1 << level))
        declared = [size for record in others.values() if (size := declared_size(record)) is not None]
        if not others:
            self.swarm_size = max(counted, self.swarm_size / 2)
        elif level == 0 and all(record.get("level") == 0 for record in others.values()):
            self.swarm_size = counted
        else:
            self.swarm_size = (counted + statistics.median(declared or [counted])) / 2
        self.level = level_for(self.swarm_size, self.level)

    async def discover(self) -> dict[str, dict[str, Any]]:
        """A joiner's first read: our shard at level 0, 1, ... until one holds records, which set our level (and
        estimate); returns the live peers it found."""
        for level in range(MAX_LEVEL + 1):
            entries = self._admitted(await self._read(self.members_key(level)), None)
            if entries.keys() - {self.peer_id}:
                self.level = level
                self.observe(entries, level)
                return entries
        return {}

    async def publish(self, info: dict[str, Any]) -> bool:
        """Store our record in our shard and in a sample of the shards below that hold it (``census_levels``):
        peers left behind at a lower level, and joiners, read the swarm's size and level there (``observe``)."""
        keys = [self.members_key(level) for level in [self.level, *census_levels(self.peer_id, self.level)]]
        return await self._store_all(keys, self._signed(info), self.clock() + self.ttl)

    async def heartbeat(self, get_info) -> None:
        """Refresh our record every third of its lifetime until cancelled; once per lifetime also read our shard,
        so that a peer that does not average still follows the swarm's size and level."""
        beats = 0
        while True:
            try:
                await self.publish(get_info())
                if beats % 3 == 2:
                    await self.live_peers()
            except Exception as e:  # a failed refresh must not kill the peer; expiry covers us
                logger.warning("heartbeat store failed: %r", e)
            beats += 1
            await asyncio.sleep(self.ttl / 3)

    async def leave(self) -> None:
        keys = [self.members_key(level) for level in [self.level, *census_levels(self.peer_id, self.level)]]
        await self._store_all(keys, {LEFT: True}, self.clock() + self.ttl)

    async def live_peers(self) -> dict[str, dict[str, Any]]:
        """The live peers of our shard (the whole swarm at level 0), by peer id."""
        level = self.level
        entries = self._admitted(await self._read(self.members_key(level)), None)
        self.observe(entries, level)
        return entries

    async def shard_of(self, peer: str) -> dict[str, dict[str, Any]]:
        """The live peers of ``peer``'s shard at our level (where its record is, if it is at our level)."""
        return self._admitted(await self._read(self.members_key(peer=peer)), None)

    async def join_round(self, round_id: int, info: dict[str, Any], expiration: float) -> bool:
        """Register in our cell of ``round_id``, and above level 0 in its parent (as ``publish``): a peer left a
        level behind counts us there, and follows."""
        key = self.round_key(round_id)
        self._round_keys[round_id] = key, self.level
        for stale in [r for r in self._round_keys if r < round_id - 2]:
            del self._round_keys[stale]
        keys = [key] + ([self.round_key(round_id, self.level - 1)] if self.level > 0 else [])
        return await self._store_all(keys, self._signed(info), expiration)

    async def round_participants(self, round_id: int) -> dict[str, dict[str, Any]]:
        """The records of our cell of round ``round_id`` (where we registered for it) written at our level: those
        of peers a level above (their parent registrations) count towards our estimate of the swarm's size only,
        as those peers form their groups in their own cells."""
        key, level = self._round_keys.get(round_id) or (self.round_key(round_id), self.level)
        entries = await self._read(key)
        self._refused_rounds = {key for key in self._refused_rounds if key[0] >= round_id - 2}
        entries = self._admitted(entries, round_id)
        before = self.level
        self.observe(entries, level)
        if self.level < before:
            # a cell that holds few may be one the swarm has left (we fell behind by more than the parent
            # registrations reach), and two peers left behind pull each other down to level 0: our shard of member
            # records, where the peers above keep a census (``census_levels``), decides whether we go down
            self.level = before
            try:
                await self.live_peers()
            except Exception as e:  # this round's read stands; we stay where we were until a read decides
                logger.debug("could not read our member shard before leaving level %s: %r", before, e)
        return {peer: record for peer, record in entries.items() if record.get("level", level) == level}
