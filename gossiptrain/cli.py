"""The ``gossiptrain`` command: bootstrap | peer | status | simulate | demo | auth."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time

from gossiptrain.addresses import check_initial_peer
from gossiptrain.dashboard import Column, Dashboard
from gossiptrain.errors import DaemonStartError

DEFAULT_RUN_ID = "gossiptrain-demo"
DEFAULT_HOST = "/ip4/0.0.0.0/tcp/0"  # every interface: other machines of the LAN can dial us


def _print(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def _initial_peer(text: str) -> str:
    """argparse's type for ``--initial-peers``: a bad address is refused before torch and hivemind are imported."""
    try:
        return check_initial_peer(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _number(allowed: str, parse, ok):
    """An argparse type: ``parse(text)`` where ``ok`` holds, else "must be <allowed>, not <text>"."""

    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, not {text}")
        return value

    return check


_SECONDS = _number("a positive number of seconds", float, lambda x: 0 < x < math.inf)
_SECONDS_OR_ZERO = _number("a number of seconds >= 0", float, lambda x: 0 <= x < math.inf)
_POSITIVE = _number("a positive number", float, lambda x: 0 < x < math.inf)
_COUNT = _number("a whole number >= 1", int, lambda n: n >= 1)
_COUNT_OR_ZERO = _number("a whole number >= 0", int, lambda n: n >= 0)
_SHARE = _number("a number in [0, 1)", float, lambda x: 0 <= x < 1)


def _network_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--initial-peers",
        nargs="*",
        default=[],
        type=_initial_peer,
        metavar="MADDR",
        help="multiaddr of any live peer of the swarm",
    )
    parser.add_argument(
        "--host-maddrs",
        nargs="+",
        default=[DEFAULT_HOST],
        metavar="MADDR",
        help="where to listen (default: every interface, a random port; /ip4/127.0.0.1/tcp/0 for this machine only)",
    )
    parser.add_argument(
        "--announce-maddrs",
        nargs="+",
        default=None,
        metavar="MADDR",
        help="addresses to tell other peers, e.g. /ip4/<public ip>/tcp/<forwarded port> behind a NAT",
    )


def _relay_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-relay",
        action="store_true",
        help="relay for no peer behind a NAT (by default a reachable peer relays for those that use it as an "
        "initial peer: at most 16 circuits each, 1 GiB each way per connection, 30 min a connection)",
    )


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _bootstrap(args: argparse.Namespace) -> None:
    from gossiptrain.auth import Identity
    from gossiptrain.network import LibP2PNetwork, dialable_first

    identity = Identity.load_or_create(args.identity) if args.identity else Identity.generate()  # Ed25519, never RSA
    network = LibP2PNetwork(
        args.initial_peers, args.host_maddrs, args.announce_maddrs, client_mode=False, relay=not args.no_relay
    )
    p2p, dht = await network.start(identity, args.identity)
    try:
        maddrs = dialable_first([str(m) for m in await p2p.get_visible_maddrs()])
        _print(*maddrs, f"peers join with: gossiptrain peer --initial-peers {maddrs[0]}")
        await _until_signalled()
    finally:
        await dht.shutdown()
        await p2p.shutdown()


def cmd_bootstrap(args: argparse.Namespace) -> None:
    asyncio.run(_bootstrap(args))


def _outer_options(args: argparse.Namespace) -> dict:
    """GossipOptimizer's outer-mode arguments from ``--outer-lr`` and the flags after it (none without it)."""
    if args.outer_lr is None:
        if args.inner_steps is not None:
            raise ValueError("--inner-steps needs outer mode: pass --outer-lr too")
        return {}
    import torch

    lr, momentum, nesterov = args.outer_lr, args.outer_momentum, args.outer_momentum > 0 and not args.no_nesterov
    options = {
        "outer_optimizer": lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov),
        "inner_steps": args.inner_steps,
    }
    if args.anchor_sync_every is not None:
        options["anchor_sync_every"] = args.anchor_sync_every
    return options


def _trackers(args: argparse.Namespace) -> list:
    """``--tensorboard`` and ``--wandb-project`` as ``attach``'s ``log_to``; ImportError where a package is missing."""
    from gossiptrain.trackers import TensorBoardTracker, WandbTracker

    trackers = [TensorBoardTracker(args.tensorboard)] if args.tensorboard else []
    if args.wandb_project:
        try:
            config = {name: value for name, value in vars(args).items() if name != "func"}
            trackers.append(WandbTracker(args.wandb_project, group=args.run_id, config=config))
        except BaseException:
            for tracker in trackers:
                tracker.close()
            raise
    return trackers


def _eval_scalars(record: dict) -> dict[str, float]:
    """An evaluation's numbers (loss, accuracy, ...) as ``eval/...`` scalars for the trackers."""
    skip = ("time", "step", "train_seconds", "eval_seconds", "rounds_done", "rounds_failed", "startup_seconds")
    skip += ("param_norm",)
    return {
        f"eval/{name}": value
        for name, value in record.items()
        if name not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def cmd_peer(args: argparse.Namespace) -> None:
    import torch

    from gossiptrain.allreduce import DEFAULT_DEFENCES, Defences
    from gossiptrain.metrics import PeriodicEvaluation, RoundRecord, write_jsonl
    from gossiptrain.optimizer import GossipOptimizer
    from gossiptrain.tasks import TASKS, load_task

    torch.set_num_threads(args.threads)
    if args.module:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's package in this directory is importable
    task = load_task(args.module) if args.module else TASKS[args.example]()
    metrics = open(args.metrics_file, "a") if args.metrics_file else None
    try:
        log_to = _trackers(args)
    except ImportError as e:
        sys.exit(f"gossiptrain peer: {e}")

    def on_round(record: RoundRecord) -> None:
        _print(record.line())
        if metrics is not None:
            write_jsonl(record, metrics)

    optimizer = GossipOptimizer(
        torch.optim.Adam(task.model.parameters(), lr=args.lr),
        run_id=args.run_id,
        initial_peers=args.initial_peers,
        average_every=args.average_every,
        samples_per_step=args.batch_size,
        on_round=on_round,
        log_to=log_to,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        target_group_size=args.group_size,
        codec=args.codec,
        sync_every=args.sync_every,
        client_mode=args.client_mode,
        behind_nat=args.behind_nat,
        relay=not args.no_relay,
        identity_path=args.identity,
        credential=args.credential,
        bandwidth_mbit=args.bandwidth_mbit,
        load_state=not args.no_load_state,
        defences=Defences.off() if args.no_defences else DEFAULT_DEFENCES,
        **_outer_options(args),
    )
    with optimizer:
        maddrs = optimizer.maddrs()  # another machine's address first, if there is one
        startup = f"ready in {optimizer.startup_seconds:.2f}s (daemon and DHT {optimizer.peer.startup_seconds:.2f}s)"
        joined = f"peer {optimizer.peer.peer_id} joined run {args.run_id!r}, {startup}"
        if args.behind_nat:
            _print(
                f"{joined} behind a NAT, reached through its initial peers as relays; others join through "
                f"{args.initial_peers[0]}"
            )
        elif maddrs:
            _print(
                *maddrs,
                f"{joined}; to join from another terminal or machine:",
                f"  gossiptrain peer --run-id {args.run_id} --initial-peers {maddrs[0]}",
            )
        else:
            _print(f"{joined} in client mode (not dialable); others join through {args.initial_peers[0]}")
        if args.wait_for_peers > 1:
            optimizer.wait_for_peers(args.wait_for_peers, timeout=args.finish_timeout)
        if metrics is not None:
            joined = {"event": "joined", "time": time.time(), "step": optimizer.local_step}
            metrics.write(json.dumps({**joined, "state_download_seconds": optimizer.state_download_seconds}) + "\n")
            metrics.flush()
        batches = task.batches(args.seed if args.seed is not None else os.getpid(), args.batch_size)
        evaluation = PeriodicEvaluation(lambda: task.evaluate(task.model), args.eval_every, metrics)
        step, deadline = 0, time.monotonic() + args.duration if args.duration else math.inf
        while (args.steps == 0 or step < args.steps) and time.monotonic() < deadline:
            if args.eval_every and (record := evaluation.maybe_evaluate(step)):
                _print(f"eval step {step} loss {record['loss']:.4f} after {record['train_seconds']:.1f}s of training")
                optimizer.trackers.log(optimizer.local_step, _eval_scalars(record))
            optimizer.report(task.train_step(optimizer, next(batches)))
            step += 1
        train_seconds = evaluation.train_seconds()
        before_finish = task.evaluate(task.model)  # this peer's own model, to see what finish() changed
        optimizer.finish(timeout=args.finish_timeout)
        result = {
            "final": True,
            "peer": optimizer.peer.peer_id,
            "step": step,
            **task.evaluate(task.model),
            "loss_before_finish": before_finish["loss"],
            "rounds_done": optimizer.rounds_done,
            "rounds_failed": optimizer.rounds_failed,
            "param_norm": optimizer.last_round.param_norm if optimizer.last_round else None,
            "param_digest": optimizer.last_round.param_digest if optimizer.last_round else None,
            "startup_seconds": optimizer.startup_seconds,
            "train_seconds": train_seconds,
        }
        optimizer.trackers.log(optimizer.local_step, _eval_scalars(result))
        accuracy = f"accuracy {result['accuracy']:.4f} " if "accuracy" in result else ""
        _print(
            f"final: {accuracy}loss {result['loss']:.4f} after {step} steps, "
            f"{optimizer.rounds_done} rounds averaged, {optimizer.rounds_failed} failed"
        )
        if args.save_model:
            torch.save(task.model.state_dict(), args.save_model)
        if metrics is not None:
            metrics.write(json.dumps(result) + "\n")
            metrics.close()


STATUS_COLUMNS = [
    Column("peer", 54, left=True),
    Column("step", 7),
    Column("loss", 8),
    Column("rounds", 7),  # averaging rounds since the peer started
    Column("age", 7),  # of the peer's membership record
    Column("startup", 8),
    Column("client", 6),
]


def _status_rows(peers: list[tuple[str, dict]], now: float) -> list[list[str]]:
    rows = []
    for peer, info in peers:
        loss = "n/a" if info.get("loss") is None else f"{info['loss']:.4f}"
        age = "n/a" if info.get("time") is None else f"{max(0.0, now - info['time']):.1f}s"
        startup = "n/a" if info.get("startup_seconds") is None else f"{info['startup_seconds']:.2f}s"
        client = "yes" if info.get("client") else "no"
        rows.append([peer, str(info.get("step", 0)), loss, str(info.get("rounds", 0)), age, startup, client])
    return rows


async def _status(args: argparse.Namespace) -> None:
    from hivemind.dht.node import DHTNode

    from gossiptrain.auth import Admission, Certificate
    from gossiptrain.membership import Membership, SignedRecords
    from gossiptrain.network import start_daemon
    from gossiptrain.rejections import Rejections

    admission = None if args.credential is None else Admission(args.run_id, Certificate.load(args.credential).authority)
    rejections = Rejections()
    p2p = await start_daemon(args.initial_peers, args.host_maddrs, no_listen=True)
    try:
        dht = await DHTNode.create(
            p2p=p2p, initial_peers=args.initial_peers, client_mode=True, record_validator=SignedRecords()
        )
        try:
            membership = Membership(dht, args.run_id, "status", admission=admission, rejections=rejections)
            found = await membership.discover()  # the first shard that holds records: a sample, and the size
            with Dashboard(STATUS_COLUMNS) as dashboard:
                while True:
                    peers = sorted((found or await membership.live_peers()).items())
                    found = {}
                    title = f"run {args.run_id!r}: {len(peers)} live peers"
                    if membership.level > 0:  # a sample: one shard of the members' records
                        size = round(membership.swarm_size)
                        title = f"run {args.run_id!r}: about {size} live peers ({len(peers)} shown)"
                    if admission is not None:
                        title += f" with a certificate ({rejections['uncredentialed_member']} refused)"
                    dashboard.show(title, _status_rows(peers, time.time()))
                    if args.watch is None:
                        return
                    await asyncio.sleep(args.watch)
        finally:
            await dht.shutdown()
    finally:
        await p2p.shutdown()


def cmd_status(args: argparse.Namespace) -> None:
    asyncio.run(_status(args))


def cmd_simulate(args: argparse.Namespace) -> None:
    from gossiptrain.simulation import Scenario, simulate

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(Scenario)}
    scenario = Scenario(**options)
    if not args.verbose:  # the simulated peers' own warnings and joiners' progress would bury the table
        logging.getLogger("gossiptrain").setLevel(logging.ERROR)
        os.environ.setdefault("GOSSIPTRAIN_PROGRESS", "off")
    report = simulate(scenario)
    _print(report.table())
    if args.json:
        report.save(args.json, args.plot)
        _print(f"wrote {args.json}" + (f" and {args.plot}" if args.plot else ""))


def cmd_demo(args: argparse.Namespace) -> None:
    from gossiptrain.demo import run_demo

    run_demo(num_peers=args.peers, steps=args.steps, codec=args.codec)


def _guarded_io(function):
    """Run ``function``; an unreadable or unwritable file is a CredentialError (one line, no traceback)."""
    from gossiptrain.auth import CredentialError

    try:
        return function()
    except FileExistsError as e:
        raise CredentialError(f"{e.filename} exists already: keys and identities are never overwritten") from None
    except OSError as e:
        raise CredentialError(f"{e.filename}: {e.strerror}") from None


def cmd_auth_keygen(args: argparse.Namespace) -> None:
    import base64

    from gossiptrain.auth import AuthorityKey

    key = AuthorityKey.generate()
    _guarded_io(lambda: key.save(args.out))
    _print(
        f"run authority key written to {args.out} (keep it secret, off the peers' machines)",
        f"public key: {base64.b64encode(key.public_bytes).decode()}",
    )


def cmd_auth_identity(args: argparse.Namespace) -> None:
    from gossiptrain.auth import Identity

    _print(_guarded_io(lambda: Identity.load_or_create(args.out)).peer_id)


def cmd_auth_issue(args: argparse.Namespace) -> None:
    from gossiptrain.auth import AuthorityKey

    key = _guarded_io(lambda: AuthorityKey.load(args.key))
    certificate = key.issue(args.peer_id, args.run_id, time.time() + args.days * 86400)
    _guarded_io(lambda: certificate.save(args.out))
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(certificate.expires))
    _print(f"certificate for peer {args.peer_id} in run {args.run_id!r} until {expires} written to {args.out}")


def _auth_parser(commands) -> None:
    auth = commands.add_parser(
        "auth",
        help="keys and certificates of a private run",
        description="A private run admits only peers with a certificate of its authority: create the authority "
        "key once (keygen), an identity per peer (identity), and a certificate per peer id (issue); then start "
        "each peer with --identity and --credential.",
    )
    actions = auth.add_subparsers(dest="action", required=True)
    keygen = actions.add_parser("keygen", help="create a run authority key (Ed25519)")
    keygen.add_argument("--out", required=True, metavar="FILE", help="where to write the key (never overwritten)")
    keygen.set_defaults(func=cmd_auth_keygen)
    identity = actions.add_parser(
        "identity", help="create a peer identity file (if missing) and print its peer id, for `auth issue`"
    )
    identity.add_argument("--out", required=True, metavar="FILE", help="the identity file (pass it to --identity)")
    identity.set_defaults(func=cmd_auth_identity)
    issue = actions.add_parser("issue", help="issue a certificate admitting one peer id to one run")
    issue.add_argument("--key", required=True, metavar="FILE", help="the run authority key (from `auth keygen`)")
    issue.add_argument("--peer-id", required=True, help="the peer id that `auth identity` printed (12D3KooW...)")
    issue.add_argument("--run-id", required=True)
    issue.add_argument("--days", type=_POSITIVE, default=30.0, help="days until the certificate expires (default: 30)")
    issue.add_argument("--out", required=True, metavar="FILE", help="the certificate file (pass it to --credential)")
    issue.set_defaults(func=cmd_auth_issue)


def _identity_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--identity",
        default=None,
        metavar="FILE",
        help="libp2p identity file, created if missing: the peer id (and address) then persists across restarts",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gossiptrain", description="Decentralized training of PyTorch models over a DHT."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    bootstrap = commands.add_parser("bootstrap", help="run a DHT-only node that peers can join through")
    _network_args(bootstrap)
    _relay_arg(bootstrap)
    _identity_arg(bootstrap)
    bootstrap.set_defaults(func=cmd_bootstrap)

    peer = commands.add_parser("peer", help="run a training peer on an example task or your own (--module)")
    _network_args(peer)
    _relay_arg(peer)
    peer.add_argument("--run-id", default=DEFAULT_RUN_ID)
    _identity_arg(peer)
    peer.add_argument(
        "--credential",
        default=None,
        metavar="FILE",
        help="certificate of a private run for this peer's --identity (from `gossiptrain auth issue`): the peer "
        "then admits only peers with a certificate of the same authority",
    )
    task = peer.add_mutually_exclusive_group()
    task.add_argument("--example", default="digits", choices=["digits", "charlm"], help="an example task")
    task.add_argument(
        "--module",
        default=None,
        metavar="PKG.MOD:FACTORY",
        help="train your own model: FACTORY() returns a gossiptrain.Task (model, batches, loss, evaluate); "
        "PKG.MOD is imported from this directory or the Python path",
    )
    peer.add_argument(
        "--steps", type=_COUNT_OR_ZERO, default=0, help="local steps before finishing (0: train until interrupted)"
    )
    peer.add_argument(
        "--duration", type=_SECONDS_OR_ZERO, default=0, help="seconds of training before finishing (0: no limit)"
    )
    peer.add_argument("--batch-size", type=_COUNT, default=32)
    peer.add_argument("--lr", type=float, default=1e-3)
    peer.add_argument("--average-every", type=_SECONDS, default=1.0, help="seconds between averaging rounds")
    peer.add_argument("--group-size", type=_COUNT, default=4, help="target averaging group size")
    peer.add_argument(
        "--codec", default="none", help="e.g. none, fp16, int8, int4, int2, topk:0.01+int8, randomk:0.01+int8"
    )
    peer.add_argument(
        "--bandwidth-mbit",
        type=_POSITIVE,
        default=None,
        help="this peer's link speed: groups size its shard by it (a far slower peer reduces none)",
    )
    peer.add_argument(
        "--sync-every",
        type=_COUNT,
        default=None,
        help="average parameters 1 round in N, send deltas in the others (default: 10 for sparse codecs, 1 for dense)",
    )
    outer = peer.add_argument_group("outer mode (DiLoCo-style: average pseudo-gradients, then an outer SGD step)")
    outer.add_argument(
        "--outer-lr", type=float, default=None, help="outer learning rate (1.0 measured best); turns outer mode on"
    )
    outer.add_argument(
        "--outer-momentum",
        type=float,
        default=0.0,
        help="outer SGD momentum, Nesterov's (DiLoCo's paper: lr 0.7, momentum 0.9; at 1M params and short runs "
        "momentum measured worse, benchmarks/README.md)",
    )
    outer.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov's")
    outer.add_argument("--inner-steps", type=_COUNT, default=None, metavar="H", help="at least H inner steps per round")
    outer.add_argument(
        "--anchor-sync-every",
        type=_COUNT,
        default=None,
        metavar="K",
        help="one outer round in K averages the parameters and resets the anchor to their mean (default: 5)",
    )
    peer.add_argument("--seed", type=int, default=None, help="seed of this peer's data order (default: pid)")
    peer.add_argument("--threads", type=_COUNT, default=1, help="torch threads of this peer")
    peer.add_argument("--metrics-file", default=None, help="append one JSON object per round to this file")
    peer.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="write each round's scalars (loss, rounds, bytes, ...) as TensorBoard events in DIR "
        "(pip install 'gossiptrain[tensorboard]')",
    )
    peer.add_argument(
        "--wandb-project",
        default=None,
        metavar="NAME",
        help="log each round's scalars to this Weights & Biases project, one run per peer grouped by --run-id "
        "(pip install wandb; WANDB_MODE=offline works without a network)",
    )
    peer.add_argument(
        "--eval-every",
        type=_SECONDS_OR_ZERO,
        default=0,
        metavar="S",
        help="evaluate on the validation set every S seconds of training (0: only at the end); "
        "printed, and an 'eval' record in the metrics file",
    )
    peer.add_argument("--finish-timeout", type=_SECONDS, default=30.0, help="seconds to wait for the others at the end")
    peer.add_argument(
        "--wait-for-peers", type=_COUNT, default=1, metavar="N", help="start training once N peers are live"
    )
    peer.add_argument(
        "--no-load-state",
        action="store_true",
        help="start from the model as built, without downloading a live peer's state: for peers started "
        "together from the same initialisation (the examples build theirs from a fixed seed)",
    )
    peer.add_argument("--save-model", default=None, metavar="PATH", help="save the model's state_dict here at the end")
    reach = peer.add_mutually_exclusive_group()
    reach.add_argument(
        "--client-mode",
        action="store_true",
        help="for a peer that cannot be dialed (NAT, firewall): listen nowhere, average by dialing out",
    )
    reach.add_argument(
        "--behind-nat",
        action="store_true",
        help="for a peer that cannot be dialed but should take a full part (reduce shards, serve state): "
        "it is reached through its --initial-peers, as relays",
    )
    peer.add_argument(
        "--no-defences",
        action="store_true",
        help="plain weighted means: no clipping, weight cap, mean check or catching of hostile peers "
        "(on by default; what they guard against: README, 'Hostile peers')",
    )
    peer.set_defaults(func=cmd_peer)

    status = commands.add_parser("status", help="show the live peers of a run")
    _network_args(status)
    status.add_argument("--run-id", default=DEFAULT_RUN_ID)
    status.add_argument(
        "--credential",
        default=None,
        metavar="FILE",
        help="a certificate of a private run (any peer's): list only the peers with a certificate of its authority",
    )
    status.add_argument(
        "--watch",
        nargs="?",
        type=_SECONDS,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="show the table again every SECONDS (default: 2) until interrupted; redrawn in place in a terminal",
    )
    status.set_defaults(func=cmd_status)

    simulate = commands.add_parser(
        "simulate",
        help="what will my swarm do? simulated peers (the live round code, in virtual time) average a vector "
        "every slot over modelled links",
    )
    simulate.add_argument("--peers", type=_COUNT, default=100, help="peers at every moment")
    simulate.add_argument("--numel", type=_COUNT, default=100_000, help="values each peer averages")
    simulate.add_argument("--rounds", type=_COUNT, default=20, help="round slots simulated")
    simulate.add_argument("--mbit", type=_POSITIVE, default=100.0, help="each peer's link, Mbit/s each way")
    simulate.add_argument("--rtt-ms", type=_SECONDS_OR_ZERO, default=50.0, help="round-trip time between two peers")
    simulate.add_argument("--jitter-ms", type=_SECONDS_OR_ZERO, default=0.0, help="spread of the one-way delay")
    simulate.add_argument("--loss", type=_SHARE, default=0.0, help="share of packets lost one way")
    simulate.add_argument("--slow-peers", type=_COUNT_OR_ZERO, default=0, help="this many peers have --slow-mbit")
    simulate.add_argument("--slow-mbit", type=_POSITIVE, default=5.0)
    simulate.add_argument(
        "--compute-s", type=_SECONDS_OR_ZERO, default=0.0, help="seconds of local work each peer does before a round"
    )
    simulate.add_argument(
        "--compute-spread", type=_POSITIVE, default=1.0, help="the slowest peer's work takes this many times longer"
    )
    simulate.add_argument(
        "--churn", type=_SHARE, default=0.0, help="share of the peers that crash over the run, each replaced at once"
    )
    simulate.add_argument(
        "--task",
        choices=("vector", "regression"),
        default="vector",
        help="average random values, or train a linear model of --numel weights (adds the test loss per slot)",
    )
    simulate.add_argument("--local-steps", type=_COUNT, default=10, help="regression: SGD steps before each round")
    simulate.add_argument(
        "--leaves", type=_SHARE, default=0.0, help="share of the peers that leave cleanly over the run, each replaced"
    )
    simulate.add_argument("--group-size", type=_COUNT, default=4)
    simulate.add_argument("--round-interval", type=_SECONDS, default=2.0, help="seconds between round slots")
    simulate.add_argument("--codec", default="none")
    simulate.add_argument("--dht-miss", type=_SHARE, default=0.0, help="chance that a DHT read misses a record")
    simulate.add_argument("--dht-lag", type=_SECONDS_OR_ZERO, default=0.0, help="seconds before a record is seen")
    simulate.add_argument("--seed", type=int, default=0, help="the same seed gives the same run, bit for bit")
    simulate.add_argument("--json", default=None, metavar="FILE", help="write the report (per slot, summary) here")
    simulate.add_argument("--plot", default=None, metavar="FILE", help="with --json: plot the run here (PNG)")
    simulate.set_defaults(func=cmd_simulate)

    demo = commands.add_parser("demo", help="train digits with a local swarm of peers")
    demo.add_argument("--peers", type=_COUNT, default=4)
    demo.add_argument("--steps", type=_COUNT, default=3000)
    demo.add_argument("--codec", default="none")
    demo.set_defaults(func=cmd_demo)

    _auth_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # leave the swarm cleanly on SIGTERM too
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("gossiptrain.progress").setLevel(logging.INFO)  # long waits' lines when stderr is no terminal
    try:
        args.func(args)
    except KeyboardInterrupt:
        pass
    except (ConnectionError, ValueError, DaemonStartError) as e:
        sys.exit(f"gossiptrain {args.command}: {e}")
