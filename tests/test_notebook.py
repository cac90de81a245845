"""Notebook peers: examples/colab_peer.ipynb run headless against a CLI swarm, interrupts, re-run cells."""

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest
import torch
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

from gossiptrain.optimizer import GossipOptimizer
from gossiptrain.rounds import AVERAGED
from gossiptrain.tasks import digits_task
from gossiptrain.testing import LOOPBACK, LocalSwarm

ROOT = Path(__file__).resolve().parent.parent


def daemons(pid: int | None = None) -> list[psutil.Process]:
    """The p2pd daemons started by ``pid`` (this process by default), zombies included."""
    return [p for p in psutil.Process(pid).children() if "p2pd" in p.name()]


def loop_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("gossiptrain")]


def final_record(path: Path) -> dict:
    return [json.loads(line) for line in path.read_text().splitlines() if '"final"' in line][-1]


@pytest.mark.timeout(420)
def test_the_notebook_trains_with_a_cli_swarm_and_leaves_with_the_same_parameters(tmp_path, monkeypatch):
    run_id, steps = "notebook-test", "300"
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        peers = [
            swarm.start_peer(
                *("--run-id", run_id, "--steps", steps, "--average-every", "0.5", "--seed", str(i)),
                *("--wait-for-peers", "4", "--finish-timeout", "240", "--metrics-file", str(tmp_path / f"{i}.jsonl")),
            )
            for i in range(3)
        ]
        for _, output in peers:
            output.wait_for(lambda line: "joined run" in line, timeout=60)
        monkeypatch.setenv("GOSSIPTRAIN_INITIAL_PEERS", " ".join(swarm.initial_peers))
        monkeypatch.setenv("GOSSIPTRAIN_RUN_ID", run_id)
        monkeypatch.setenv("GOSSIPTRAIN_STEPS", steps)
        monkeypatch.setenv("GOSSIPTRAIN_AVERAGE_EVERY", "0.5")
        notebook = nbformat.read(ROOT / "examples" / "colab_peer.ipynb", as_version=4)
        NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()
        for process, _ in peers:
            assert process.wait(timeout=120) == 0
    text = "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))
    ours = json.loads(text.split("FINAL ", 1)[1].splitlines()[0])
    theirs = [final_record(tmp_path / f"{i}.jsonl") for i in range(3)]
    # the last round may be "alone": a peer that read the others' digests one round later sees them gone
    assert ours["rounds_done"] > 0 and ours["last_round"] in (*AVERAGED, "alone"), ours
    assert ours["swarm"] == 4 and ours["accuracy"] > 0.5, ours
    for record in theirs:
        assert record["rounds_done"] > 0
        # finish() ends with rounds in which the four averaged identical means; applying ``mean - snapshot``
        # to the live parameters leaves float32 rounding apart, hence the relative tolerance.
        assert record["param_digest"] == pytest.approx(ours["param_digest"], rel=1e-5, abs=1e-5)
        assert record["param_norm"] == pytest.approx(ours["param_norm"], rel=1e-6)


KERNEL_SETUP = """
import json, threading, psutil, torch
from gossiptrain import GossipOptimizer
from gossiptrain.testing import LOOPBACK

def state():
    return json.dumps({
        "daemons": [p.pid for p in psutil.Process().children() if "p2pd" in p.name()],
        "threads": [t.name for t in threading.enumerate() if t.name.startswith("gossiptrain")],
    })
"""
JOIN_CELL = """
model = torch.nn.Linear(64, 10)
opt = GossipOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), run_id="rerun", host_maddrs=[LOOPBACK])
print(state())
"""
TRAIN_CELL = """
with opt:
    print("TRAINING", flush=True)
    while True:
        loss = model(torch.randn(32, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
"""


@pytest.mark.timeout(240)
def test_in_a_kernel_rerunning_the_join_cell_and_interrupting_training_leak_no_peer():
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=120, cwd=str(ROOT))
    kernel_pid = km.provisioner.process.pid
    outputs: list[str] = []

    def run(code: str, timeout: float = 60) -> dict:
        outputs.clear()
        reply = kc.execute_interactive(
            code, timeout=timeout, output_hook=lambda msg: outputs.append(msg["content"].get("text", ""))
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        return json.loads("".join(outputs).strip().splitlines()[-1]) if "".join(outputs).strip() else {}

    try:
        run(KERNEL_SETUP)
        first = run(JOIN_CELL)
        second = run(JOIN_CELL)  # the user re-runs the cell: the first peer is shut down, not leaked
        assert len(first["daemons"]) == 1 and first["threads"] == ["gossiptrain-loop"]
        assert len(second["daemons"]) == 1 and second["daemons"] != first["daemons"]
        assert second["threads"] == ["gossiptrain-loop"]

        msg_id = kc.execute(TRAIN_CELL)
        deadline = time.monotonic() + 60
        while "TRAINING" not in "".join(outputs):
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                outputs.append(msg["content"].get("text", ""))
        interrupted = time.monotonic()
        km.interrupt_kernel()  # what Jupyter's stop button does: SIGINT to the kernel's process group (p2pd too)
        while (reply := kc.get_shell_msg(timeout=60))["parent_header"].get("msg_id") != msg_id:
            pass
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - interrupted < 60  # a hang, not a slow machine (it takes seconds)
        after = run("print(state())")
        assert after == {"daemons": [], "threads": []}, after
        assert daemons(kernel_pid) == []
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        LocalSwarm.kill(kernel_pid)  # the kernel runs in a session of its own: anything it left behind


@pytest.mark.timeout(240)
@pytest.mark.parametrize("reach", ["process", "process_group"])
def test_an_interrupt_while_an_event_loop_runs_in_the_main_thread_shuts_the_peer_down(reach):
    """The notebook situation in-process: a cell's code runs inside the kernel's running event loop, in the
    main thread, and Ctrl-C raises KeyboardInterrupt there; Jupyter's interrupt also reaches the daemon
    (``process_group``), a plain ``kill -INT <pid>`` does not (``process``)."""
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        _, partner = swarm.start_peer("--run-id", "interrupt", "--average-every", "0.5")
        partner.wait_for(lambda line: "joined run" in line, timeout=60)
        task, averaged = digits_task(), threading.Event()
        opt = GossipOptimizer(
            torch.optim.Adam(task.model.parameters(), lr=1e-3),
            run_id="interrupt",
            initial_peers=swarm.initial_peers,
            host_maddrs=[LOOPBACK],
            average_every=0.5,
            samples_per_step=32,
            on_round=lambda record: record.status in AVERAGED and averaged.set(),
        )
        [daemon] = daemons()
        interrupted_at, stopped = [], threading.Event()

        def interrupt() -> None:
            averaged.wait(timeout=60)
            if reach == "process_group":
                os.kill(daemon.pid, signal.SIGINT)
            interrupted_at.append(time.monotonic())
            signal.raise_signal(signal.SIGINT)
            # CPython drops a KeyboardInterrupt that lands in a finalizer (a weakref callback): the user
            # presses Ctrl-C again, and so does this test until the loop has stopped.
            while not stopped.wait(timeout=5):
                signal.raise_signal(signal.SIGINT)

        async def cell() -> None:
            assert asyncio.get_running_loop().is_running()
            batches = task.batches(0, 32)
            threading.Thread(target=interrupt, daemon=True).start()
            with opt:
                while True:
                    loss = task.loss(task.model, next(batches))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    opt.report(loss.item())

        loop = asyncio.new_event_loop()
        try:
            with pytest.raises(KeyboardInterrupt):
                loop.run_until_complete(cell())
        finally:
            stopped.set()
            loop.close()
        shutdown_seconds = time.monotonic() - interrupted_at[0]
        assert averaged.is_set() and opt.rounds_done > 0
        assert daemons() == [] and not daemon.is_running()
        assert loop_threads() == []
        assert shutdown_seconds < 60  # a hang, not a slow machine (it takes seconds)
        with pytest.raises(RuntimeError, match="shut down"):
            opt.step()
