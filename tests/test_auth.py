"""Identities, certificates and signed DHT records, without sockets."""

import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer

from gossiptrain.auth import Admission, AuthorityKey, Certificate, CredentialError, Identity, public_key_of, verify
from gossiptrain.membership import SignedRecords

NOW = 1_800_000_000.0


@pytest.fixture
def authority() -> AuthorityKey:
    return AuthorityKey.generate()


@pytest.fixture
def peer() -> Identity:
    return Identity.generate()


def test_a_certificate_admits_its_peer_to_its_run_until_it_expires(authority, peer):
    certificate = authority.issue(peer.peer_id, "run", NOW + 60)
    certificate.check(peer.peer_id, "run", authority.public_bytes, NOW)
    with pytest.raises(CredentialError, match="expired"):
        certificate.check(peer.peer_id, "run", authority.public_bytes, NOW + 60)


def test_a_certificate_for_another_run_peer_or_authority_is_refused(authority, peer):
    certificate = authority.issue(peer.peer_id, "run", NOW + 60)
    with pytest.raises(CredentialError, match="is for run 'run', not 'other'"):
        certificate.check(peer.peer_id, "other", authority.public_bytes, NOW)
    outsider = Identity.generate()
    with pytest.raises(CredentialError, match=f"issued for peer {peer.peer_id}"):
        certificate.check(outsider.peer_id, "run", authority.public_bytes, NOW)
    with pytest.raises(CredentialError, match="another authority"):
        certificate.check(peer.peer_id, "run", AuthorityKey.generate().public_bytes, NOW)


def test_a_certificate_that_claims_the_authority_but_is_signed_by_another_key_is_refused(authority, peer):
    forged = AuthorityKey.generate().issue(peer.peer_id, "run", NOW + 60)
    forged = Certificate(forged.peer_id, forged.run_id, forged.expires, authority.public_bytes, forged.signature)
    with pytest.raises(CredentialError, match="signature"):
        forged.check(peer.peer_id, "run", authority.public_bytes, NOW)
    genuine = authority.issue(peer.peer_id, "run", NOW + 60)
    extended = Certificate(genuine.peer_id, genuine.run_id, NOW + 10**6, genuine.authority, genuine.signature)
    with pytest.raises(CredentialError, match="signature"):
        extended.check(peer.peer_id, "run", authority.public_bytes, NOW + 100)


def test_keys_identities_and_certificates_survive_their_files(tmp_path, authority, peer):
    authority.save(tmp_path / "run.key")
    peer.save(tmp_path / "id.key")
    assert (tmp_path / "run.key").stat().st_mode & 0o077 == 0, "secret files are readable by their owner only"
    assert AuthorityKey.load(tmp_path / "run.key").public_bytes == authority.public_bytes
    assert Identity.load(tmp_path / "id.key").peer_id == peer.peer_id
    assert Identity.load_or_create(tmp_path / "id.key").peer_id == peer.peer_id
    assert Identity.load_or_create(tmp_path / "new.key").peer_id == Identity.load(tmp_path / "new.key").peer_id
    certificate = authority.issue(peer.peer_id, "run", NOW + 60)
    certificate.save(tmp_path / "peer.cert")
    assert Certificate.load(tmp_path / "peer.cert") == certificate
    assert Certificate.from_bytes(certificate.to_bytes()) == certificate
    with pytest.raises(FileExistsError):
        authority.save(tmp_path / "run.key")


def test_malformed_files_are_refused_with_a_message(tmp_path):
    (tmp_path / "bad.cert").write_text("{}")
    with pytest.raises(CredentialError, match="not a gossiptrain certificate"):
        Certificate.load(tmp_path / "bad.cert")
    rsa = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=b"\x30" * 100).SerializeToString()
    (tmp_path / "rsa.key").write_bytes(rsa)
    with pytest.raises(CredentialError, match="needs Ed25519"):
        Identity.load(tmp_path / "rsa.key")
    with pytest.raises(CredentialError, match="not an Ed25519 libp2p peer id"):
        AuthorityKey.generate().issue("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "run", NOW)
    with pytest.raises(CredentialError, match="malformed"):
        Certificate.from_bytes(b"\x01\x02")


def test_a_peer_id_embeds_its_public_key(peer):
    assert peer.peer_id.startswith("12D3KooW")
    assert public_key_of(peer.peer_id).public_bytes_raw() == peer.public_key.public_bytes_raw()
    assert public_key_of("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N") is None  # RSA: a hash of the key
    assert public_key_of("not base58 0OIl") is None


def test_admission_caches_valid_certificates_until_they_expire(authority, peer):
    now = [NOW]
    admission = Admission("run", authority.public_bytes, clock=lambda: now[0])
    certificate = authority.issue(peer.peer_id, "run", NOW + 60).to_bytes()
    assert not admission.admitted(peer.peer_id)
    assert "presents no certificate" in admission.refusal(peer.peer_id, None)
    assert admission.refusal(peer.peer_id, certificate) is None
    assert admission.admitted(peer.peer_id)
    outsider = Identity.generate()
    assert "issued for peer" in admission.refusal(outsider.peer_id, certificate), "a copied certificate is useless"
    assert not admission.admitted(outsider.peer_id)
    now[0] = NOW + 61
    assert not admission.admitted(peer.peer_id)
    assert "expired" in admission.refusal(peer.peer_id, certificate)


def _record(writer: Identity, value=None, key=b"members", expiration=NOW) -> DHTRecord:
    value = MSGPackSerializer.dumps(value if value is not None else {"maddrs": ["/ip4/127.0.0.1/tcp/1"]})
    return DHTRecord(key, MSGPackSerializer.dumps(writer.peer_id), value, expiration)


def test_a_record_validates_only_if_signed_by_the_peer_its_subkey_names(peer):
    own = SignedRecords(peer)
    record = _record(peer)
    signed = DHTRecord(record.key, record.subkey, own.sign_value(record), record.expiration_time)
    reader = SignedRecords()  # a node without an identity validates the same
    assert reader.validate(signed)
    assert reader.strip_value(signed) == record.value
    assert not reader.validate(record), "unsigned"
    victim = Identity.generate()
    in_victims_name = _record(victim)
    assert own.sign_value(in_victims_name) == in_victims_name.value, "a peer signs only its own records"
    assert not reader.validate(in_victims_name)
    signature = signed.value[len(record.value) :]
    assert not reader.validate(DHTRecord(record.key, in_victims_name.subkey, signed.value, NOW)), "moved subkey"
    assert not reader.validate(DHTRecord(b"round.7", record.subkey, signed.value, NOW)), "moved to another key"
    assert not reader.validate(DHTRecord(record.key, record.subkey, signed.value, NOW + 3600)), "later expiration"
    tampered = MSGPackSerializer.dumps({"maddrs": ["/ip4/6.6.6.6/tcp/1"]}) + signature
    assert not reader.validate(DHTRecord(record.key, record.subkey, tampered, NOW)), "another value"
    forged = victim_signed_by(peer, in_victims_name)
    assert not reader.validate(forged), "signed, but by another key than the one the subkey names"


def victim_signed_by(signer: Identity, record: DHTRecord) -> DHTRecord:
    validator = SignedRecords(signer)
    signature = signer.sign(validator.signed_bytes(record, record.value))
    return DHTRecord(record.key, record.subkey, record.value + signature + SignedRecords.MARKER, NOW)


def test_records_without_a_peer_id_subkey_are_refused(peer):
    reader = SignedRecords()
    regular = DHTRecord(b"members", MSGPackSerializer.dumps(None), MSGPackSerializer.dumps("x"), NOW + 10**6)
    assert not reader.validate(regular), "a plain value with a later expiration would replace the whole dictionary"
    made_up = MSGPackSerializer.dumps("12D3KooWghost")  # not a peer id: no key to check a signature with
    assert not reader.validate(DHTRecord(b"members", made_up, b"\xc0" + b"s" * 64 + SignedRecords.MARKER, NOW))


def test_a_record_read_again_or_from_another_replica_is_not_verified_again(peer, monkeypatch):
    """Each distinct record's signature is checked once (what that costs per record: benchmarks/startup.py)."""
    from gossiptrain import membership

    checked = []
    monkeypatch.setattr(membership, "verify", lambda *args: checked.append(args) or verify(*args))
    own, reader = SignedRecords(peer), SignedRecords()
    records = [_record(peer, expiration=NOW + i) for i in range(100)]
    signed = [DHTRecord(r.key, r.subkey, own.sign_value(r), r.expiration_time) for r in records]
    assert all(reader.validate(record) for record in signed)
    assert len(checked) == len(signed)
    assert all(reader.validate(record) for record in signed * 10), "the same records from other replicas"
    assert len(checked) == len(signed), "a record already checked is not checked again"
