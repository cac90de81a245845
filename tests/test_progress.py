"""Progress of long waits: a bar on a terminal, log lines when piped or in a notebook, one helper for all."""

import asyncio
import logging
import os
import pty
import subprocess
import sys
import types

import pytest
import torch

from gossiptrain import progress
from gossiptrain.peer import Peer
from gossiptrain.progress import progress_mode, show_progress
from gossiptrain.rounds import Timeouts
from gossiptrain.testing import LOOPBACK

RUN = "progress"
FAST = Timeouts(matchmaking=2.0, join=2.0, part=1.0, result=3.0)
STATE_FLOATS = 4 * 10**6  # 16 MB: 64 chunks, a second or two here (the 100M case was run by hand)

JOINER = """
import asyncio, logging, sys
from gossiptrain.rounds import Timeouts
from gossiptrain.peer import Peer
from gossiptrain.state import download_state, state_donors

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("gossiptrain.progress").setLevel(logging.INFO)  # as the CLI does


async def main():
    timeouts = Timeouts(matchmaking=2.0, join=2.0, part=float(sys.argv[2]), result=3.0)
    async with Peer(sys.argv[3], initial_peers=[sys.argv[1]], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    timeouts=timeouts) as joiner:
        async with asyncio.timeout(30):
            while not state_donors(await joiner.live_peers(), joiner.peer_id):
                await asyncio.sleep(0.1)
        state = await download_state(joiner, timeout=120)
        print("received", state["params"][0].numel(), "floats", flush=True)


asyncio.run(main())
"""


def read_until_closed(fd: int) -> bytes:
    """Everything written to a pty's other end until it is closed (Linux then raises EIO)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def download_from_a_donor(floats: int, terminal: bool, part_timeout: float = 3.0) -> tuple[str, str]:
    """A joiner process downloads a state of ``floats`` parameters from a donor in this process; returns the
    joiner's stdout and its stderr, which is a pty if ``terminal`` else a pipe."""
    state = {"params": [torch.arange(floats, dtype=torch.float32)], "local_step": 1}
    async with Peer(RUN, host_maddrs=[LOOPBACK], timeouts=FAST) as donor:
        donor.info = {"step": 1}
        await donor.serve_state(lambda: state)
        argv = [sys.executable, "-c", JOINER, (await donor.maddrs())[0], str(part_timeout), RUN]
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
        env.pop(progress.ENV, None)
        if terminal:
            main, other = pty.openpty()
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=other, stdin=subprocess.DEVNULL, env=env)
            os.close(other)
            try:
                err = await asyncio.to_thread(read_until_closed, main)
            finally:
                os.close(main)
            out = await asyncio.to_thread(process.stdout.read)
        else:
            process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
            )
            out, err = await asyncio.to_thread(process.communicate)
        try:
            await asyncio.to_thread(process.wait, 60)
        finally:
            if process.poll() is None:
                process.kill()
    return out.decode(), err.decode(errors="replace")


def test_off_a_terminal_progress_is_log_lines_at_each_tenth_and_every_few_seconds(monkeypatch, caplog):
    monkeypatch.setenv(progress.ENV, "auto")
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # not a terminal
    assert progress_mode() == "log"
    with caplog.at_level(logging.INFO, logger="gossiptrain.progress"):
        with show_progress("downloading", 1000, unit="bytes", log_every=3600) as shown:
            for received in range(0, 1001, 10):
                shown.update(received)
    lines = [r.getMessage() for r in caplog.records if r.name == "gossiptrain.progress"]
    assert len(lines) == 11, lines  # 0%, 10%, ..., 100%: not one per update
    assert lines[0].startswith("downloading: 0.0 MB of 0.0 MB (0%)") and "(100%)" in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gossiptrain.progress"):
        with show_progress("waiting for 4 live peers", 4, unit="peers", log_every=0) as shown:
            for _ in range(3):
                shown.update(1)  # no tenth passed, but log_every has: a line each time
    lines = [r.getMessage() for r in caplog.records if r.name == "gossiptrain.progress"]
    assert len(lines) == 3 and lines[0].startswith("waiting for 4 live peers: 1 of 4 peers (25%)"), lines


def test_a_notebook_or_the_environment_variable_picks_log_lines_or_nothing_over_a_bar(monkeypatch, caplog):
    class Terminal:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.delenv(progress.ENV, raising=False)
    assert progress_mode() == "bar"
    kernel = types.SimpleNamespace(get_ipython=lambda: type("ZMQInteractiveShell", (), {})())
    monkeypatch.setitem(sys.modules, "IPython", kernel)
    assert progress_mode() == "log", "a notebook's stderr is no terminal for a bar"
    monkeypatch.delitem(sys.modules, "IPython")
    monkeypatch.setenv(progress.ENV, "off")
    with caplog.at_level(logging.INFO, logger="gossiptrain.progress"):
        with show_progress("waiting", 2) as shown:
            shown.update(1)
    assert not caplog.records
    monkeypatch.setenv(progress.ENV, "sideways")
    assert progress_mode() == "bar"  # an unknown value is auto, with a warning
    assert "GOSSIPTRAIN_PROGRESS='sideways'" in caplog.text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "piped"])
async def test_a_state_download_shows_a_bar_on_a_terminal_and_log_lines_when_piped(terminal):
    out, err = await download_from_a_donor(STATE_FLOATS, terminal)
    assert f"received {STATE_FLOATS} floats" in out, (out, err)
    assert "downloading the training state" in err, err
    if terminal:
        assert "━" in err and "16.0/16.0 MB" in err, err  # rich's bar, complete, with the bytes
        assert "(100%)" not in err, "no log lines where there is a bar"
    else:
        assert "\x1b[" not in err, "no terminal escapes in a pipe"
        lines = [line for line in err.splitlines() if "downloading the training state" in line]
        assert 2 <= len(lines) <= 12 and "state: 16.0 MB of 16.0 MB (100%)" in lines[-1], err
