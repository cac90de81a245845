"""Membership in the DHT: heartbeat records of live peers and per-round participation.

Two kinds of records, both dictionaries keyed by peer id (DHT subkeys), so that any peer reads
the whole set with one ``get``:

- ``{run_id}.members``: each live peer's info (addresses, step, loss, last round), with a short
  expiration refreshed by a heartbeat.  A crashed peer vanishes by expiry; a peer that leaves
  cleanly overwrites its record with a tombstone, which readers skip at once.
- ``{run_id}.round.{r}``: the peers that take part in round ``r``; read once at the round's
  start time to form groups.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

LEFT = "left"


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
    """This peer's view of, and presence in, the run's membership records."""

    def __init__(self, dht: DHTNode, run_id: str, peer_id: str, ttl: float = 6.0):
        self.dht, self.run_id, self.peer_id, self.ttl = dht, run_id, peer_id, ttl
        self.members_key = f"{run_id}.members"

    async def publish(self, info: dict[str, Any]) -> bool:
        return await self.dht.store(self.members_key, info, get_dht_time() + self.ttl, subkey=self.peer_id)

    async def heartbeat(self, get_info) -> None:
        """Refresh our record every third of its lifetime until cancelled."""
        while True:
            try:
                await self.publish(get_info())
            except Exception as e:  # a failed refresh must not kill the peer; expiry covers us
                logger.warning("heartbeat store failed: %r", e)
            await asyncio.sleep(self.ttl / 3)

    async def leave(self) -> None:
        await self.dht.store(self.members_key, {LEFT: True}, get_dht_time() + self.ttl, subkey=self.peer_id)

    async def live_peers(self) -> dict[str, dict[str, Any]]:
        return _live_entries(await self.dht.get(self.members_key, latest=True))

    async def join_round(self, round_id: int, info: dict[str, Any], expiration: float) -> bool:
        return await self.dht.store(f"{self.run_id}.round.{round_id}", info, expiration, subkey=self.peer_id)

    async def round_participants(self, round_id: int) -> dict[str, dict[str, Any]]:
        return _live_entries(await self.dht.get(f"{self.run_id}.round.{round_id}", latest=True))
