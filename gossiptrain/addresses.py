"""A light syntactic check of multiaddrs (standard library only), so that the CLI refuses a bad address at once.

hivemind's ``Multiaddr`` would do the same, but importing it imports torch (seconds).  This check knows
the text form only: every component is a known protocol name, followed by its value where the protocol
has one, and an initial peer names its peer (``/p2p/<id>``).  ``Peer`` still parses every address with
hivemind's ``Multiaddr`` before dialing, with the same message.
"""

from __future__ import annotations

import ipaddress
import re

_PORT = "port"
_VALUES = {  # protocols followed by a value, and the kind of value
    "ip4": "ip4",
    "ip6": "ip6",
    "ip6zone": "text",
    "tcp": _PORT,
    "udp": _PORT,
    "dccp": _PORT,
    "sctp": _PORT,
    "dns": "text",
    "dns4": "text",
    "dns6": "text",
    "dnsaddr": "text",
    "p2p": "id",
    "ipfs": "id",
    "onion": "text",
    "onion3": "text",
}
_FLAGS = {  # protocols without a value
    "udt",
    "utp",
    "quic",
    "quic-v1",
    "http",
    "https",
    "tls",
    "ws",
    "wss",
    "p2p-websocket-star",
    "p2p-webrtc-star",
    "p2p-webrtc-direct",
    "p2p-circuit",
}
_PEER_ID = re.compile(r"[A-Za-z0-9]+")  # base58 (12D3KooW..., Qm...) or a multibase CID


def _valid_value(kind: str, value: str) -> bool:
    if kind == _PORT:
        return value.isdigit() and int(value) < 2**16
    if kind in ("ip4", "ip6"):
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return False
        return address.version == int(kind[-1])
    if kind == "id":
        return _PEER_ID.fullmatch(value) is not None
    return bool(value)


def protocols(text: str) -> list[str] | None:
    """The protocol names of the multiaddr ``text`` (``/<protocol>[/<value>]...``), or None if it is not one."""
    if not text.startswith("/") or text.endswith("/"):
        return None
    parts, names, index = text[1:].split("/"), [], 0
    while index < len(parts):
        name = parts[index]
        names.append(name)
        if name == "unix":  # a path: the rest of the address
            return names if index + 1 < len(parts) else None
        if name in _FLAGS:
            index += 1
        elif name in _VALUES and index + 1 < len(parts) and _valid_value(_VALUES[name], parts[index + 1]):
            index += 2
        else:
            return None
    return names


def malformed_initial_peer(text: str) -> ValueError:
    """The error for an initial peer that is not a full multiaddr (what to copy instead)."""
    return ValueError(
        f"initial peer {text!r} is not a full multiaddr such as /ip4/192.0.2.1/tcp/31337/p2p/12D3KooW...: "
        f"copy the address that the peer or `gossiptrain bootstrap` printed"
    )


def check_initial_peer(text: str) -> str:
    """``text`` if it reads as a multiaddr that names its peer (``/p2p/<id>``).

    Raises:
        ValueError: ``malformed_initial_peer(text)``, which says what to copy instead.
    """
    if not {"p2p", "ipfs"} & set(protocols(text) or ()):
        raise malformed_initial_peer(text)
    return text
