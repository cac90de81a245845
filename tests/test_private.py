"""Private runs and records no one can forge, with peers as processes over real sockets."""

import asyncio
import json
import os
import subprocess
import sys

import pytest
import torch
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from gossiptrain.auth import Identity
from gossiptrain.membership import SignedRecords
from gossiptrain.peer import Peer
from gossiptrain.rounds import AVERAGED, Timeouts
from gossiptrain.state import StateDownloadError, download_state
from gossiptrain.tasks import TASKS
from gossiptrain.testing import LOOPBACK, LocalSwarm, ProcessOutput

FAST = Timeouts(matchmaking=2.0, join=1.5, part=1.0, result=3.0)
REFUSED_KINDS = ("member", "round", "assemble", "state", "clock")


def gossiptrain(*args: str) -> str:
    """Run a short ``gossiptrain`` command; its stdout."""
    done = subprocess.run([sys.executable, "-m", "gossiptrain", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def start_logged(swarm: LocalSwarm, *args: str) -> ProcessOutput:
    """``gossiptrain <args>`` owned by ``swarm``, with its log (stderr) in the same captured lines as stdout."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gossiptrain", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    swarm.track(process)
    return ProcessOutput(process)


def wait_for_all(output: ProcessOutput, needles: list[str], timeout: float) -> None:
    """Wait until every one of ``needles`` has appeared in a line of ``output`` (in any order)."""
    missing = {needle for needle in needles if not any(needle in line for line in output.lines)}

    def seen(line: str) -> bool:
        missing.difference_update({needle for needle in missing if needle in line})
        return not missing

    if missing:
        output.wait_for(seen, timeout)


def bootstrap_with_identity(swarm: LocalSwarm, identity: str) -> str:
    """Start a bootstrap node with a persistent identity; its address, which ends with that identity's peer id."""
    peer_id = gossiptrain("auth", "identity", "--out", identity).strip()
    _, output = swarm.run_cli("bootstrap", "--host-maddrs", LOOPBACK, "--identity", identity)
    address = output.wait_for(lambda line: line.startswith("/ip4/"), timeout=30)
    assert address.endswith(f"/p2p/{peer_id}"), (address, peer_id)
    swarm.initial_peers = [address]
    return address


@pytest.mark.timeout(240)
async def test_an_outsider_that_knows_the_run_id_is_refused_everywhere_and_counted(tmp_path):
    gossiptrain("auth", "keygen", "--out", str(tmp_path / "run.key"))
    with LocalSwarm() as swarm:
        bootstrap_with_identity(swarm, str(tmp_path / "bootstrap.key"))
        honest, outputs = [], []
        for name in ("a", "b"):
            identity, certificate = str(tmp_path / f"{name}.key"), str(tmp_path / f"{name}.cert")
            honest.append(gossiptrain("auth", "identity", "--out", identity).strip())
            issue = ("--key", str(tmp_path / "run.key"), "--peer-id", honest[-1], "--run-id", "private")
            gossiptrain("auth", "issue", *issue, "--days", "1", "--out", certificate)
            options = ("--identity", identity, "--credential", certificate, "--metrics-file", str(tmp_path / name))
            peer_args = ("--host-maddrs", LOOPBACK, "--initial-peers", *swarm.initial_peers, "--run-id", "private")
            outputs.append(start_logged(swarm, "peer", *peer_args, *options, "--average-every", "0.5"))
        for output in outputs:
            await asyncio.to_thread(output.wait_for, lambda line: "averaged" in line and "group 2" in line, 90)

        # the outsider knows the run id and a live peer, builds the same model, but holds no certificate
        numel = sum(p.numel() for p in TASKS["digits"]().model.parameters())
        options = dict(initial_peers=swarm.initial_peers, host_maddrs=[LOOPBACK], round_interval=0.5, timeouts=FAST)
        async with Peer("private", **options) as outsider:
            records = await outsider.wait_for_peers(3, timeout=30)  # it sees the honest peers' records...
            assert set(honest) <= set(records)
            outsider.model_schema = records[honest[0]]["schema"]
            status = ("status", "--initial-peers", *swarm.initial_peers, "--run-id", "private")
            listed = await asyncio.to_thread(gossiptrain, *status, "--credential", str(tmp_path / "a.cert"))
            assert "2 live peers with a certificate (1 refused)" in listed and outsider.peer_id not in listed, listed
            statuses = [(await outsider.average(torch.zeros(numel), 1.0, mode="params")).status for _ in range(3)]
            assert not set(statuses) & set(AVERAGED), statuses  # ...but no honest peer takes it into a group
            with pytest.raises(StateDownloadError):
                await download_state(outsider, timeout=5.0)
            needles = [f"rejected uncredentialed_{kind} from {outsider.peer_id}" for kind in REFUSED_KINDS]
            for output in outputs:
                await asyncio.to_thread(wait_for_all, output, needles, 30)
            for output in outputs:  # the rounds that follow report the counts
                for _ in range(2):
                    await asyncio.to_thread(output.wait_for, lambda line: line.startswith("round "), 30)

    for name, output in zip("ab", outputs):
        assert not [line for line in output.lines if "group 3" in line], "the outsider was never in a group"
        refused = [line for line in output.lines if "rejected uncredentialed_" in line]
        assert not [line for line in refused if any(peer in line for peer in honest)], "honest peers are admitted"
        rounds = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        counted = [record["rejected"] for record in rounds if "rejected" in record][-1]
        for kind in REFUSED_KINDS:
            assert counted.get(f"uncredentialed_{kind}", 0) >= 1, (kind, counted)


def forged_value(value: dict) -> bytes:
    return MSGPackSerializer.dumps(value)


@pytest.mark.timeout(180)
async def test_a_record_written_in_another_peers_name_is_rejected_by_the_dht_validator(tmp_path):
    with LocalSwarm() as swarm:
        bootstrap = bootstrap_with_identity(swarm, str(tmp_path / "bootstrap.key"))
        victim = gossiptrain("auth", "identity", "--out", str(tmp_path / "victim.key")).strip()
        network = ("--host-maddrs", LOOPBACK, "--initial-peers", bootstrap)
        output = start_logged(swarm, "peer", *network, "--identity", str(tmp_path / "victim.key"))
        await asyncio.to_thread(output.wait_for, lambda line: f"peer {victim} joined" in line, 60)

        # the forger runs a DHT node that validates nothing, and talks to the honest nodes' DHT RPCs directly
        p2p = await P2P.create(initial_peers=[bootstrap], host_maddrs=[LOOPBACK])
        forger = await DHTNode.create(p2p=p2p, initial_peers=[bootstrap])
        reader = None
        try:
            key, expiration = DHTID.generate(source="gossiptrain-demo.members"), get_dht_time() + 600
            fake = {"maddrs": ["/ip4/203.0.113.6/tcp/6666"], "serves_state": True, "time": get_dht_time()}
            ghost, forger_identity = Identity.generate(), Identity.generate()

            def signed_by(signer: Identity, subkey: str, value: dict) -> bytes:
                record = DHTRecord(key.to_bytes(), MSGPackSerializer.dumps(subkey), forged_value(value), expiration)
                signature = signer.sign(SignedRecords().signed_bytes(record, record.value))
                return record.value + signature + SignedRecords.MARKER

            attempts = {
                "unsigned, in the victim's name": (victim, forged_value(fake)),
                "signed by the forger, in the victim's name": (victim, signed_by(forger_identity, victim, fake)),
                "unsigned, for a made-up peer": (ghost.peer_id, forged_value(fake)),
                "a plain value over the whole dictionary": (None, forged_value(fake)),
            }
            honest_nodes = [PeerID.from_base58(bootstrap.rsplit("/", 1)[1]), PeerID.from_base58(victim)]
            for node in honest_nodes:
                for attempt, (subkey, value) in attempts.items():
                    stored = await forger.protocol.call_store(node, [key], [value], expiration, [subkey])
                    assert stored == [False], (attempt, node, stored)
                    if subkey == victim:  # and it answers lookups with the forgery
                        forger.protocol.storage.store_subkey(key, subkey, value, expiration)
                own = signed_by(forger_identity, forger_identity.peer_id, {"maddrs": [], "time": get_dht_time()})
                stored = await forger.protocol.call_store(node, [key], [own], expiration, [forger_identity.peer_id])
                assert stored == [True], (
                    "a record signed by the peer it names is accepted: the refusals are the validator's"
                )

            reader = Peer("gossiptrain-demo", initial_peers=[bootstrap], host_maddrs=[LOOPBACK])
            await reader.start()
            live = await reader.live_peers()
            assert victim in live and live[victim]["maddrs"] != fake["maddrs"], live.get(victim)
            assert ghost.peer_id not in live
        finally:
            if reader is not None:
                await reader.stop()
            await forger.shutdown()
            await p2p.shutdown()
