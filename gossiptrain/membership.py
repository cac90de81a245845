"""Membership in the DHT: heartbeat records of live peers and per-round participation.

Two kinds of records, both dictionaries keyed by peer id (DHT subkeys), so that any peer reads
the whole set with one ``get``:

- ``{run_id}.members``: each live peer's info (addresses, step, loss, last round), with a short
  expiration refreshed by a heartbeat.  A crashed peer vanishes by expiry; a peer that leaves
  cleanly overwrites its record with a tombstone, which readers skip at once.
- ``{run_id}.round.{r}``: the peers that take part in round ``r``; read once at the round's
  start time to form groups.

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
from collections.abc import Callable
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


class RecordStore(Protocol):
    """Dictionaries of records with expirations (the subset of ``hivemind.dht.node.DHTNode`` used here):
    ``get`` returns None or an object whose ``value`` maps each subkey to an item with ``value``."""

    async def store(self, key: str, value: Any, expiration_time: float, *, subkey: str) -> bool: ...

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


def _live_entries(found: Any) -> dict[str, dict[str, Any]]:
    if found is None or not isinstance(found.value, dict):
        return {}
    entries = {}
    for subkey, item in found.value.items():
        value = getattr(item, "value", None)
        if isinstance(subkey, str) and isinstance(value, dict) and not value.get(LEFT):
            entries[subkey] = value
    return entries


class Membership:
    """This peer's view of, and presence in, the run's membership records.

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
        self.members_key = f"{run_id}.members"
        self.credential, self.admission, self.rejections = credential, admission, rejections
        self._refused_members: set[str] = set()
        self._refused_rounds: set[tuple[int, str]] = set()

    def _signed(self, info: dict[str, Any]) -> dict[str, Any]:
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

    async def publish(self, info: dict[str, Any]) -> bool:
        return await self.dht.store(self.members_key, self._signed(info), self.clock() + self.ttl, subkey=self.peer_id)

    async def heartbeat(self, get_info) -> None:
        """Refresh our record every third of its lifetime until cancelled."""
        while True:
            try:
                await self.publish(get_info())
            except Exception as e:  # a failed refresh must not kill the peer; expiry covers us
                logger.warning("heartbeat store failed: %r", e)
            await asyncio.sleep(self.ttl / 3)

    async def leave(self) -> None:
        await self.dht.store(self.members_key, {LEFT: True}, self.clock() + self.ttl, subkey=self.peer_id)

    async def live_peers(self) -> dict[str, dict[str, Any]]:
        return self._admitted(_live_entries(await self.dht.get(self.members_key, latest=True)), None)

    async def join_round(self, round_id: int, info: dict[str, Any], expiration: float) -> bool:
        key = f"{self.run_id}.round.{round_id}"
        return await self.dht.store(key, self._signed(info), expiration, subkey=self.peer_id)

    async def round_participants(self, round_id: int) -> dict[str, dict[str, Any]]:
        found = await self.dht.get(f"{self.run_id}.round.{round_id}", latest=True)
        self._refused_rounds = {key for key in self._refused_rounds if key[0] >= round_id - 2}
        return self._admitted(_live_entries(found), round_id)
