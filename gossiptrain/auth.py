"""Identities and admission: libp2p identities, a run authority, and the certificates it issues.

A peer's **identity** is an Ed25519 key pair in libp2p's format; its peer id (``12D3KooW...``) embeds the
public key itself, so anyone who knows a peer id can check that peer's signatures (``public_key_of``),
and the libp2p transport proves on every connection that the remote end holds the key of the peer id it
claims.  An identity file keeps a peer id across restarts.

A **private run** is closed to peers that hold a certificate.  The run's **authority** is an Ed25519 key
whose holder issues certificates; a certificate binds one peer id to one run id until an expiry time,
and names the authority's public key.  Every peer of a private run trusts the authority that issued its
own certificate, and admits another peer only if that peer presents a certificate of the same authority,
for its own peer id and this run, that has not expired (``Admission``).  Nothing here touches a socket.

What it guarantees: a peer without a certificate of the run's authority cannot be admitted, however it
learnt the run id; a certificate copied from another peer is useless (it names the other peer id, and the
transport authenticates peer ids); an expired one is refused.  What it does not: there is no revocation
list, so a certificate stays valid until it expires (issue short ones); an admitted peer is trusted to
take part, not to send honest values (robust averaging bounds that); and whoever holds the authority key
can admit anyone, so keep it off the peers' machines.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import base58
import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.proto import crypto_pb2

logger = logging.getLogger(__name__)

CERTIFICATE_FORMAT = "gossiptrain-certificate-v1"
MAX_LOGGED_REFUSALS = 4096  # (kind, peer) pairs whose first refusal was logged, remembered so it is logged once
_CERT_DOMAIN = b"gossiptrain certificate v1\0"  # signed before the fields: a signature means nothing elsewhere
_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


class CredentialError(ValueError):
    """A certificate, key or identity is malformed, or does not admit this peer to this run."""


def _write_private(path: str | os.PathLike, data: bytes) -> None:
    """Write a secret file readable by its owner only (refuses to overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(**_RAW)


def peer_id_of(public_key: Ed25519PublicKey) -> str:
    """The libp2p peer id of an Ed25519 public key: the identity multihash of its protobuf encoding."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=_raw_public(public_key))
    data = encoded.SerializeToString()
    return base58.b58encode(bytes([0x00, len(data)]) + data).decode()


def public_key_of(peer_id: str) -> Ed25519PublicKey | None:
    """The Ed25519 public key embedded in ``peer_id``; None if it is not an Ed25519 peer id."""
    try:
        multihash = base58.b58decode(peer_id)
        if len(multihash) < 2 or multihash[0] != 0x00 or multihash[1] != len(multihash) - 2:
            return None  # not an identity multihash (e.g. an RSA peer id, a sha256 of its key)
        encoded = crypto_pb2.PublicKey.FromString(multihash[2:])
        if encoded.key_type != crypto_pb2.KeyType.Ed25519 or len(encoded.data) != 32:
            return None
        return Ed25519PublicKey.from_public_bytes(encoded.data)
    except Exception:
        return None


def verify(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data)
        return True
    except InvalidSignature:
        return False


class Identity:
    """A libp2p identity: the Ed25519 private key behind a peer id.

    Saved in libp2p's protobuf format (what ``p2pd -id`` reads), so the same file gives the daemon and
    this process the same key: the daemon proves the peer id on connections, this process signs records.
    """

    def __init__(self, private_key: Ed25519PrivateKey):
        self.private_key = private_key
        self.public_key = private_key.public_key()
        self.peer_id = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    def to_bytes(self) -> bytes:
        seed = self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        # libp2p's Ed25519 private key: the 32-byte seed followed by the 32-byte public key
        encoded = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=seed + _raw_public(self.public_key))
        return encoded.SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> Identity:
        try:
            encoded = crypto_pb2.PrivateKey.FromString(data)
        except Exception:
            raise CredentialError("not a libp2p identity (a protobuf PrivateKey)") from None
        if encoded.key_type != crypto_pb2.KeyType.Ed25519 or len(encoded.data) not in (32, 64):
            raise CredentialError(
                f"the identity is a {crypto_pb2.KeyType.Name(encoded.key_type)} key; gossiptrain needs Ed25519 "
                f"(its peer id embeds the key, which makes records verifiable): create one with "
                f"`gossiptrain auth identity --out FILE`"
            )
        return cls(Ed25519PrivateKey.from_private_bytes(encoded.data[:32]))

    def save(self, path: str | os.PathLike) -> None:
        _write_private(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Identity:
        with open(path, "rb") as file:
            data = file.read()
        try:
            return cls.from_bytes(data)
        except CredentialError as e:
            raise CredentialError(f"identity file {os.fspath(path)!r}: {e}") from None

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> Identity:
        """The identity saved at ``path``; a new one, saved there, if the file does not exist."""
        if os.path.exists(path):
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


@dataclass(frozen=True)
class Certificate:
    """The authority's statement that ``peer_id`` may take part in run ``run_id`` until ``expires``.

    Args:
        peer_id: the libp2p peer id of the admitted peer (its identity file's).
        run_id: the run it is admitted to.
        expires: seconds since the epoch after which the certificate admits no one.
        authority: the raw 32-byte Ed25519 public key of the run authority that signed it.
        signature: the authority's signature over the four fields above.
    """

    peer_id: str
    run_id: str
    expires: float
    authority: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        return _CERT_DOMAIN + msgpack.packb([self.peer_id, self.run_id, float(self.expires), self.authority])

    def check(self, peer_id: str, run_id: str, authority: bytes, now: float) -> None:
        """Raise ``CredentialError`` with the reason unless this admits ``peer_id`` to ``run_id`` at ``now``."""
        if self.authority != authority:
            raise CredentialError("the certificate was issued by another authority than this run's")
        if self.peer_id != peer_id:
            raise CredentialError(f"the certificate was issued for peer {self.peer_id}, not {peer_id}")
        if self.run_id != run_id:
            raise CredentialError(f"the certificate is for run {self.run_id!r}, not {run_id!r}")
        if not now < self.expires:
            expired = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires))
            raise CredentialError(f"the certificate expired at {expired}")
        if not verify(Ed25519PublicKey.from_public_bytes(authority), self.signature, self.signed_bytes()):
            raise CredentialError("the certificate's signature is not the authority's")

    def to_bytes(self) -> bytes:
        """The compact form that peers put in their DHT records."""
        return msgpack.packb([self.peer_id, self.run_id, float(self.expires), self.authority, self.signature])

    @classmethod
    def from_bytes(cls, data: Any) -> Certificate:
        try:
            peer_id, run_id, expires, authority, signature = msgpack.unpackb(data)
            fields = cls(peer_id, run_id, float(expires), bytes(authority), bytes(signature))
        except Exception:
            raise CredentialError("malformed certificate") from None
        if not (isinstance(peer_id, str) and isinstance(run_id, str) and len(authority) == 32):
            raise CredentialError("malformed certificate")
        return fields

    def to_json(self) -> str:
        """The file form: readable (who, which run, until when), the keys and signature in base64."""
        expires_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires))
        return json.dumps(
            {
                "format": CERTIFICATE_FORMAT,
                "peer_id": self.peer_id,
                "run_id": self.run_id,
                "expires": self.expires,
                "expires_utc": expires_utc,
                "authority": base64.b64encode(self.authority).decode(),
                "signature": base64.b64encode(self.signature).decode(),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Certificate:
        try:
            fields = json.loads(text)
            if fields.get("format") != CERTIFICATE_FORMAT:
                raise ValueError(f"format {fields.get('format')!r}")
            authority, signature = base64.b64decode(fields["authority"]), base64.b64decode(fields["signature"])
            certificate = cls(fields["peer_id"], fields["run_id"], float(fields["expires"]), authority, signature)
        except Exception as e:
            raise CredentialError(f"not a gossiptrain certificate ({e!r})") from None
        if len(certificate.authority) != 32:
            raise CredentialError("not a gossiptrain certificate (the authority key is not 32 bytes)")
        return certificate

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as file:
            file.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Certificate:
        with open(path) as file:
            text = file.read()
        try:
            return cls.from_json(text)
        except CredentialError as e:
            raise CredentialError(f"certificate file {os.fspath(path)!r}: {e}") from None


class AuthorityKey:
    """A run authority: the Ed25519 key that signs the certificates of a private run."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self.private_key = private_key
        self.public_bytes = _raw_public(private_key.public_key())

    @classmethod
    def generate(cls) -> AuthorityKey:
        return cls(Ed25519PrivateKey.generate())

    def save(self, path: str | os.PathLike) -> None:
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_private(path, pem)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AuthorityKey:
        with open(path, "rb") as file:
            data = file.read()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except Exception as e:
            raise CredentialError(f"authority key file {os.fspath(path)!r} is not a PEM private key: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise CredentialError(f"authority key file {os.fspath(path)!r} is not an Ed25519 key")
        return cls(key)

    def issue(self, peer_id: str, run_id: str, expires: float) -> Certificate:
        """A certificate admitting ``peer_id`` (an Ed25519 libp2p peer id) to ``run_id`` until ``expires``."""
        if public_key_of(peer_id) is None:
            raise CredentialError(
                f"{peer_id!r} is not an Ed25519 libp2p peer id (12D3KooW...): print one with "
                f"`gossiptrain auth identity --out FILE`"
            )
        if not run_id or "." in run_id:
            raise CredentialError(f"run_id must be a non-empty name without dots, got {run_id!r}")
        unsigned = Certificate(peer_id, run_id, float(expires), self.public_bytes, b"")
        signature = self.private_key.sign(unsigned.signed_bytes())
        return Certificate(peer_id, run_id, float(expires), self.public_bytes, signature)


class Admission:
    """Who may take part in a private run: peers that present a valid certificate of its authority.

    Pure bookkeeping, no I/O: the peer hands it the certificate bytes found in a DHT record (whose
    signature proves who wrote it) and asks, for a stream, whether the remote peer id (authenticated by
    the transport) has shown a valid certificate before.  Valid certificates are cached by peer id until
    they expire, so a certificate is verified once per peer and not once per record.

    Args:
        run_id: the run.
        authority: the raw public key of the run's authority.
        clock: seconds since the epoch (expiry is checked against it).
    """

    def __init__(self, run_id: str, authority: bytes, clock: Callable[[], float] = time.time):
        self.run_id, self.authority, self.clock = run_id, authority, clock
        self._valid: dict[str, tuple[bytes, float]] = {}  # peer id -> (certificate bytes, expiry)
        self._logged: set[tuple[str, str]] = set()

    def refusal(self, peer_id: str, certificate: Any) -> str | None:
        """Why the certificate bytes ``certificate`` do not admit ``peer_id``; None if they do."""
        now = self.clock()
        cached = self._valid.get(peer_id)
        if cached is not None and cached[0] == certificate and now < cached[1]:
            return None
        if not isinstance(certificate, bytes):
            return f"it presents no certificate, and run {self.run_id!r} is private"
        try:
            parsed = Certificate.from_bytes(certificate)
            parsed.check(peer_id, self.run_id, self.authority, now)
        except CredentialError as e:
            return str(e)
        self._valid[peer_id] = (certificate, parsed.expires)
        return None

    def admitted(self, peer_id: str) -> bool:
        """Whether ``peer_id`` has shown a certificate that is still valid."""
        cached = self._valid.get(peer_id)
        if cached is not None and self.clock() >= cached[1]:
            del self._valid[peer_id]
            return False
        return cached is not None

    def count_refusal(self, rejections: Any, kind: str, peer_id: str, round_id: object, detail: str) -> None:
        """Count one refusal of ``kind`` in ``rejections`` (``rejections.Rejections``).  The first per kind and
        peer is also its one warning line, the rest are debug lines: an outsider cannot flood the log."""
        if (kind, peer_id) in self._logged:
            rejections[kind] += 1
            logger.debug("rejected %s from %s in round %s again: %s", kind, peer_id, round_id, detail)
            return
        if len(self._logged) >= MAX_LOGGED_REFUSALS:
            self._logged.clear()
        self._logged.add((kind, peer_id))
        rejections.record(kind, peer_id, round_id, f"{detail} (further refusals of it are counted, not logged)")
