"""The command line: addresses refused at once, clear errors, the dashboard, and your own model (--module)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gossiptrain import cli
from gossiptrain.addresses import check_initial_peer
from gossiptrain.allreduce import DEFAULT_DEFENCES, Defences
from gossiptrain.dashboard import Column, Dashboard
from gossiptrain.demo import _rows, parameter_spread
from gossiptrain.tasks import TASKS, Task, load_task
from gossiptrain.testing import LocalSwarm

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWSqd4duRd8f1jqvBmiRi3HwxkBADhXgdSvSRjdUPBZ2hY"
PRINTED = [  # addresses as peers and `gossiptrain bootstrap` print them, and other well-formed ones
    UNREACHABLE,
    "/ip4/192.168.1.20/tcp/40935/p2p/12D3KooWSqd4duRd8f1jqvBmiRi3HwxkBADhXgdSvSRjdUPBZ2hY",
    "/ip6/::1/tcp/31337/p2p/12D3KooWSqd4duRd8f1jqvBmiRi3HwxkBADhXgdSvSRjdUPBZ2hY",
    "/dns4/example.org/tcp/31337/p2p/12D3KooWSqd4duRd8f1jqvBmiRi3HwxkBADhXgdSvSRjdUPBZ2hY",
    "/ip4/203.0.113.7/udp/31337/quic-v1/p2p/12D3KooWSqd4duRd8f1jqvBmiRi3HwxkBADhXgdSvSRjdUPBZ2hY",
]
MALFORMED = [
    "127.0.0.1:4000",
    "garbage",
    "/ip4/1.2.3/tcp/31337/p2p/12D3KooWSqd4duRd8f1jqvBmiRi3HwxkBADhXgdSvSRjdUPBZ2hY",
    "/ip4/192.0.2.1/tcp/70000/p2p/12D3KooWSqd4duRd8f1jqvBmiRi3HwxkBADhXgdSvSRjdUPBZ2hY",
    "/ip4/192.0.2.1/tcpx/1/p2p/12D3KooWSqd4duRd8f1jqvBmiRi3HwxkBADhXgdSvSRjdUPBZ2hY",
    "/ip4/192.0.2.1/tcp/31337",  # no /p2p/<peer id>
    "/ip4/192.0.2.1/tcp/31337/p2p/",
]


def tiny_task() -> Task:
    """A user's own task, for `gossiptrain peer --module tests.test_cli:tiny_task`: linear regression of 8 inputs."""
    truth = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))
    x_valid = torch.randn(256, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = nn.Linear(8, 1)

    def batches(seed: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(batch_size, 8, generator=generator)
            yield x, x @ truth

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"loss": F.mse_loss(model(x_valid), x_valid @ truth).item()}

    return Task("tiny", model, batches, loss, evaluate)


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gossiptrain", *args], capture_output=True, text=True, timeout=timeout)


def test_the_addresses_peers_print_pass_the_light_check_and_hivemind_parses_them_too():
    from hivemind.utils.multiaddr import Multiaddr

    for address in PRINTED:
        assert check_initial_peer(address) == address
        assert "p2p" in Multiaddr(address)


@pytest.mark.parametrize("address", MALFORMED)
def test_a_malformed_address_fails_the_light_check_with_what_to_copy_instead(address):
    with pytest.raises(ValueError, match="is not a full multiaddr.*copy the address"):
        check_initial_peer(address)


@pytest.mark.parametrize("command", ["peer", "status", "bootstrap"])
def test_a_malformed_initial_peer_is_refused_at_once_with_a_clear_message(command):
    process = _cli(command, "--initial-peers", "127.0.0.1:4000", timeout=5)  # importing torch alone takes ~2 s
    assert process.returncode != 0
    assert "'127.0.0.1:4000' is not a full multiaddr" in process.stderr, process.stderr
    assert "Traceback" not in process.stderr


def test_a_malformed_initial_peer_is_refused_before_torch_or_hivemind_is_imported():
    code = (
        "import sys\n"
        "from gossiptrain.cli import main\n"
        "try:\n"
        "    main(['peer', '--initial-peers', 'garbage'])\n"
        "except SystemExit as e:\n"
        "    assert e.code != 0\n"
        "print(sorted(m for m in ('torch', 'hivemind') if m in sys.modules))\n"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=5)
    assert process.stdout.strip() == "[]", process.stdout + process.stderr


def test_load_task_builds_the_examples_and_explains_a_bad_spec():
    assert isinstance(load_task("gossiptrain.tasks.digits:digits_task"), Task)
    assert load_task("tests.test_cli:tiny_task").name == "tiny"
    with pytest.raises(ValueError, match="package.module:factory"):
        load_task("tests.test_cli")
    with pytest.raises(ValueError, match="cannot import 'no_such_package_xyz'"):
        load_task("no_such_package_xyz:build")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        load_task("tests.test_cli:missing")
    with pytest.raises(ValueError, match="returned a str, not a gossiptrain.Task"):
        load_task("os:getcwd")
    assert set(TASKS) == {"digits", "charlm"}


@pytest.mark.parametrize(("flags", "expected"), [((), DEFAULT_DEFENCES), (("--no-defences",), Defences.off())])
def test_peer_has_the_defences_on_unless_told_no_defences(monkeypatch, flags, expected):
    built = {}

    class Stop(Exception):
        pass

    def record(*args, **kwargs):
        built.update(kwargs)
        raise Stop

    monkeypatch.setattr("gossiptrain.optimizer.GossipOptimizer", record)
    with pytest.raises(Stop):
        cli.main(["peer", "--initial-peers", UNREACHABLE, "--steps", "1", *flags])
    assert built["defences"] == expected


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_dashboard_prints_plain_lines_off_a_terminal_and_redraws_one_table_on_one():
    columns = [Column("peer", 6, left=True), Column("rounds", 6)]
    plain = io.StringIO()
    with Dashboard(columns, plain) as dashboard:
        dashboard.show("2 live peers", [["a", "1"], ["b"]])
        dashboard.show("2 live peers", [["a", "2"], ["b", "1"]])
    assert plain.getvalue().splitlines() == [
        "2 live peers",
        "peer   rounds",
        "a           1",
        "b",
        "",
        "2 live peers",
        "peer   rounds",
        "a           2",
        "b           1",
    ]
    terminal = _Terminal()
    with Dashboard(columns, terminal) as dashboard:
        dashboard.show("2 live peers", [["a", "1"]])
        dashboard.show("2 live peers", [["a", "7"]])
    first, *redrawn = terminal.getvalue().split("\x1b[1A\x1b[2K\x1b[3m2 live peers")  # cursor up over the table
    assert "│ a    │      1 │" in first and redrawn and all("│ a    │      7 │" in table for table in redrawn)
    assert terminal.getvalue().count("┏") == len(redrawn) + 1  # no other copy of the table on the screen


def test_the_demo_table_counts_rounds_since_the_peer_started_not_slot_ids():
    def record(round_id: int, status: str) -> dict:
        return {"round": round_id, "status": status, "step": 10, "group_size": 2, "loss": 0.5, "bytes_sent": 2**20}

    rounds = [record(3592323882, "averaged"), record(3592323883, "partial"), record(3592323884, "failed")]
    rows = _rows({0: rounds, 1: []})  # a partial round took means: it counts as averaged
    assert rows == [["0", "10", "3", "2", "failed", "2", "0.5000", "3.00"], ["1", "starting"]]


@pytest.mark.timeout(60)
def test_status_with_an_unreachable_initial_peer_says_so_without_a_traceback():
    process = _cli("status", "--initial-peers", UNREACHABLE, timeout=50)
    assert process.returncode != 0
    assert f"gossiptrain status: no peer answered at {UNREACHABLE}" in process.stderr, process.stderr
    assert "is the address right" in process.stderr and "Traceback" not in process.stderr


def run_two_tiny_peers(run_id: str, flags_of: Callable[[int], tuple[str, ...]], duration: str = "5") -> None:
    """Two ``gossiptrain peer --module tests.test_cli:tiny_task`` processes of ``run_id`` (peer ``i`` with
    ``flags_of(i)`` too), until both have finished and exited cleanly."""
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        peers = [
            swarm.run_cli(
                *("peer", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--initial-peers", *swarm.initial_peers),
                *("--module", "tests.test_cli:tiny_task", "--run-id", run_id, "--seed", str(i)),
                *("--duration", duration, "--average-every", "0.5", "--wait-for-peers", "2", "--batch-size", "16"),
                *flags_of(i),
                env=env,
            )
            for i in range(2)
        ]
        for process, output in peers:
            output.wait_for(lambda line: line.startswith("final: loss"), timeout=120)
            assert process.wait(timeout=30) == 0


@pytest.mark.timeout(180)
def test_peer_module_trains_a_model_defined_in_this_test_with_a_second_peer(tmp_path):
    run_two_tiny_peers(
        "module",
        lambda i: (
            ("--lr", "0.01", "--metrics-file", str(tmp_path / f"peer{i}.jsonl"))
            + ("--save-model", str(tmp_path / f"peer{i}.pt"))
        ),
    )
    initial = tiny_task()
    before = initial.evaluate(initial.model)["loss"]
    for i in range(2):
        [final] = [r for r in map(json.loads, (tmp_path / f"peer{i}.jsonl").read_text().splitlines()) if r.get("final")]
        assert final["rounds_done"] > 0, final
        assert final["loss"] < 0.1 * before, (final, before)
    models = [torch.load(tmp_path / f"peer{i}.pt") for i in range(2)]
    assert set(models[0]) == {"weight", "bias"}  # the test's nn.Linear(8, 1), not an example task
    assert parameter_spread(models) < 1e-2


NOT_ALLOWED = [  # a flag, a value it must refuse, and what the error says is allowed
    ("--average-every", "-1", "a positive number of seconds"),
    ("--average-every", "0", "a positive number of seconds"),
    ("--average-every", "nan", "a positive number of seconds"),
    ("--group-size", "0", "a whole number >= 1"),
    ("--inner-steps", "0", "a whole number >= 1"),
    ("--inner-steps", "-3", "a whole number >= 1"),
    ("--sync-every", "0", "a whole number >= 1"),
    ("--anchor-sync-every", "0", "a whole number >= 1"),
    ("--wait-for-peers", "0", "a whole number >= 1"),
    ("--batch-size", "0", "a whole number >= 1"),
    ("--threads", "0", "a whole number >= 1"),
    ("--finish-timeout", "0", "a positive number of seconds"),
    ("--finish-timeout", "-5", "a positive number of seconds"),
    ("--bandwidth-mbit", "0", "a positive number"),
    ("--steps", "-1", "a whole number >= 0"),
    ("--duration", "-1", "a number of seconds >= 0"),
    ("--eval-every", "-1", "a number of seconds >= 0"),
]


@pytest.mark.parametrize("flag, value, allowed", NOT_ALLOWED, ids=[f"{f}={v}" for f, v, _ in NOT_ALLOWED])
def test_peer_refuses_a_slot_step_count_group_size_or_timeout_out_of_range_saying_what_is_allowed(
    capsys, flag, value, allowed
):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["peer", f"{flag}={value}"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"error: argument {flag}: must be {allowed}, not {value}" in error, error


def test_status_refuses_a_watch_interval_that_is_not_positive(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["status", "--watch", "0"])
    assert "error: argument --watch: must be a positive number of seconds, not 0" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_peer_with_a_negative_slot_exits_at_once_with_an_error_and_starts_nothing():
    process = _cli("peer", "--average-every", "-1", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", timeout=30)
    assert process.returncode == 2, process.stdout + process.stderr
    assert "error: argument --average-every: must be a positive number of seconds, not -1" in process.stderr
    assert process.stdout == "" and "Traceback" not in process.stderr


@pytest.mark.timeout(60)
def test_status_against_an_unreachable_peer_prints_nothing_after_its_answer():
    """The answer is the last line of stderr: no asyncio warning about a closed loop's child watcher follows it."""
    process = _cli("status", "--initial-peers", UNREACHABLE, timeout=50)
    assert process.returncode != 0
    lines = process.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"gossiptrain status: no peer answered at {UNREACHABLE}"), process.stderr
    assert len(lines) == 1, process.stderr


def _children() -> list[int]:
    """This process's child processes, running or not yet reaped."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid():
            children.append(int(entry))
    return children


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads child processes from /proc")
@pytest.mark.timeout(60)
async def test_a_daemon_that_could_not_reach_its_initial_peers_is_gone_when_start_daemon_raises(monkeypatch):
    """p2pd closes its output when it gives up, a moment before it exits; a start that raised at the end of the
    output left the daemon to exit after `gossiptrain status`'s event loop had closed, and asyncio then warned
    (`Loop ... that handles pid ... is closed`) after the answer, some of the time.  Here the daemon lingers a
    second after its output ends, so that the moment cannot be missed."""
    from gossiptrain.errors import InitialPeersError
    from gossiptrain.network import start_daemon

    create = asyncio.subprocess.create_subprocess_exec

    async def lingering(*argv, **kwargs):
        return await create("sh", "-c", '"$@"; exec >&- 2>&-; sleep 1', "p2pd", *argv, **kwargs)

    monkeypatch.setattr(asyncio.subprocess, "create_subprocess_exec", lingering)
    before = _children()
    with pytest.raises(InitialPeersError):
        await start_daemon([UNREACHABLE], ["/ip4/127.0.0.1/tcp/0"], no_listen=True)
    assert _children() == before


@pytest.mark.timeout(240)
def test_the_demo_prints_its_table_and_two_closing_lines_and_no_warning():
    """``make demo``'s own settings fit this machine: no warning from a peer (their stderr is the demo's)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gossiptrain", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # SIGTERM to the demo's group: its LocalSwarm then stops its peers
    )
    try:
        output, _ = process.communicate(timeout=220)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
    lines = output.splitlines()
    assert process.returncode == 0, output
    assert not [line for line in lines if "WARN" in line or "ERROR" in line or "Traceback" in line], output
    assert lines[-2].startswith("test accuracy per peer:")
    assert lines[-1].startswith("relative spread between peers' parameters:")
    table = re.compile(r"(\d+ peers training digits, \d+s|\s*peer\s+step\s+rounds.*|\s*\d+\s+(starting|\d+ .*)|)$")
    assert all(table.fullmatch(line) for line in lines[:-2]), output  # the rest is the table, shown again and again


def test_simulate_prints_a_table_per_slot_and_writes_the_report(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run.json"
    argv = ["simulate", "--peers", "8", "--numel", "500", "--rounds", "3", "--churn", "0.25", "--json", str(out)]
    monkeypatch.setenv("GOSSIPTRAIN_PROGRESS", "off")
    logger = logging.getLogger("gossiptrain")
    level = logger.level
    try:
        cli.main([*argv, "--plot", str(tmp_path / "run.png")])
    finally:  # the command quiets the simulated peers' logs: the other tests read them
        logger.setLevel(level)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["slot", "peers", "averaged", "round", "p50", "s", "spread"]
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 3 and report["summary"]["crashed"] == report["summary"]["joined"] == 2
    assert report["summary"]["averaged_share"] > 0.5 and (tmp_path / "run.png").stat().st_size > 0


def test_two_processes_simulate_the_same_run_from_the_same_seed(tmp_path):
    """Repeatable across processes (where Python's string hashing differs), not only within one."""
    reports = []
    for i in range(2):
        out = tmp_path / f"run{i}.json"
        argv = ["simulate", "--peers", "10", "--numel", "500", "--rounds", "3", "--churn", "0.2", "--loss", "0.01"]
        subprocess.run(
            [sys.executable, "-m", "gossiptrain", *argv, "--seed", "5", "--json", str(out)],
            check=True,
            capture_output=True,
            timeout=120,
            env={**os.environ, "PYTHONHASHSEED": str(i + 1)},
        )
        reports.append(json.loads(out.read_text()))
    for report in reports:
        for key in ("wall_s", "wall_s_per_round", "peak_rss_mb"):
            del report["summary"][key]
    assert reports[0]["rounds"] == reports[1]["rounds"] and reports[0]["summary"] == reports[1]["summary"]
