"""Peak host memory of a peer's rounds, measured: the peer processes of ``tests/test_memory.py`` and
``benchmarks/memory.py``.

The measured peer builds a model of Linear layers with SGD (momentum 0.9: after its first step,
training allocates only autograd's temporaries), takes a step, then measures what three more steps
hold at their peak over the RSS before them (``training_peak``, reported apart: a step's own
temporaries, 0.2-1x the model here, varying from run to run). It attaches, waits for its partner,
and takes its baseline: its resident set size (RSS, ``/proc/self/statm``) then. The extra peak is
measured from there, so it also holds the training step's temporaries where they meet a round's
(conservative: not subtracted, as that estimate is noisy). It resets the kernel's high-water mark
(``VmHWM``, ``/proc/self/clear_refs``) and trains on while it averages with the partner (or serves
its state to a joiner that then averages with it); a thread samples RSS every ``SAMPLE_EVERY``
seconds. The peak is the larger of the sampled maximum and the high-water mark, which also sees
peaks between two samples (a loaded machine starves the sampler). The extra peak is that peak minus
the baseline: what rounds (or a download) add on top. The measured process fixes glibc's mmap
threshold at 1 MiB (``fix_mmap_threshold``): every larger tensor or buffer is then its own mapping,
returned to the kernel when freed, so RSS follows live memory rather than what glibc's heap keeps.
The libp2p daemon is a process of its own and is not counted. ``GOSSIPTRAIN_MEMORY_TRACE=1`` records
where (which frames of the other threads) each new peak was reached.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from pathlib import Path

import torch

from gossiptrain.attachment import attach
from gossiptrain.rounds import AVERAGED
from gossiptrain.testing import LOOPBACK

WIDTH = 2048  # one Linear(WIDTH, WIDTH) layer holds 4.2M parameters (16.8 MB in fp32)
SAMPLE_EVERY = 0.005
PACE = 0.02  # seconds between the peers' steps: they train on, leaving CPU for the rounds
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def high_water_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def fix_mmap_threshold(size: int = 2**20) -> None:
    """Make glibc serve every allocation of ``size`` bytes or more with its own mmap (``mallopt``), so that
    a freed tensor goes back to the kernel and RSS follows what is live.  By default glibc raises that
    threshold up to 32 MiB as large chunks are freed, and then keeps freed chunks in its heap, which RSS
    counts too (up to about 0.5x the model here, and differently from run to run)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Give the heap's free memory back to the kernel (glibc ``malloc_trim``), so that the baseline
    counts what is live, not what an earlier allocation left free."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_high_water() -> bool:
    """Reset the kernel's peak RSS of this process to its current RSS (Linux 4.0+); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples this process's RSS every ``every`` seconds in a thread: the maximum, and a time series
    of (seconds since start, RSS) every ``keep_every`` seconds (for soaks)."""

    def __init__(self, every: float = SAMPLE_EVERY, keep_every: float | None = None):
        self.every, self.keep_every = every, keep_every
        self.peak, self.series, self.peaks = 0, [], []
        self.trace, self.traced = bool(os.environ.get("GOSSIPTRAIN_MEMORY_TRACE")), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        started, kept = time.monotonic(), -float("inf")
        while not self._stop.is_set():
            rss, now = rss_bytes(), time.monotonic() - started
            if self.trace and max(rss, high_water_bytes()) > self.traced + 2**23:  # where peaks are reached
                self.traced = max(rss, high_water_bytes())
                self.peaks.append((self.traced, _where(), _large_storages()))
            self.peak = max(self.peak, rss)
            if self.keep_every is not None and now - kept >= self.keep_every:
                self.series.append((round(now, 3), rss))
                kept = now
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def _where() -> list[str]:
    """The innermost gossiptrain frames of every other thread (``GOSSIPTRAIN_MEMORY_TRACE``)."""
    import sys
    import traceback

    out = []
    for thread, frame in sys._current_frames().items():
        if thread == threading.get_ident():
            continue
        frames = [f for f in traceback.extract_stack(frame) if "gossiptrain" in f.filename or "torch" in f.filename]
        out.append(" < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames[-4:])))
    return [line for line in out if line]


def _large_storages(least: int = 2**23) -> list[tuple[int, list[int]]]:
    """The live tensor storages of at least ``least`` bytes (MiB, one tensor's shape each) (tracing)."""
    seen = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                if storage.nbytes() >= least:
                    seen[storage.data_ptr()] = (storage.nbytes() // 2**20, list(obj.shape))
        except (RuntimeError, ReferenceError):
            continue
    return sorted(seen.values(), reverse=True)


def build_model(numel: int, seed: int = 0) -> torch.nn.Sequential:
    """Linear(WIDTH, WIDTH) layers holding about ``numel`` parameters (at least one layer)."""
    torch.manual_seed(seed)
    layers = max(1, round(numel / (WIDTH * WIDTH + WIDTH)))
    return torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)))


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) * 4


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(step))
    loss = model(x).pow(2).mean()
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: training allocates nothing new
    loss.backward()
    optimizer.step()
    return loss.item()


def _outer(params):
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def _attach_options(initial_peers, codec, outer, average_every, **extra):
    options = dict(initial_peers=initial_peers, average_every=average_every, host_maddrs=[LOOPBACK], codec=codec)
    if outer:
        options.update(outer_optimizer=_outer, inner_steps=1)
    return {**options, **extra}


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=False)


def measured_peer(
    initial_peers,
    numel,
    codec,
    outer,
    rounds,
    partner_ready,
    joiner_go,
    stop,
    average_every=2.0,
    seconds=None,
    keep_every=None,
    timeout=120.0,
    up=None,
):
    """Train and average (the first round after the baseline) until ``rounds`` rounds averaged (or, with
    ``seconds``, for that long); returns the baseline, the peak and the extra peak in bytes, with the round
    statuses.  ``joiner_go`` set: a joiner is told to download this peer's state once the baseline is taken
    (it is the one partner).  ``up`` (an event) is set once this peer is in the swarm."""
    torch.set_num_threads(1)
    fix_mmap_threshold()
    model = build_model(numel)
    optimizer = _optimizer(model)
    statuses = []
    options = _attach_options(initial_peers, codec, outer, average_every, load_state=False)
    train_step(model, optimizer, 0)  # before attaching: the first round starts after the next step
    gc.collect()
    trim_heap()
    before, hwm_reset = rss_bytes(), reset_high_water()
    with RssSampler() as warm:  # what a training step itself holds at its peak (autograd's temporaries)
        for step in range(3):
            train_step(model, optimizer, step)
    training_peak = max(warm.peak, high_water_bytes() if hwm_reset else 0) - before
    with attach(optimizer, run_id="memory", on_round=lambda r: statuses.append(r.status), **options) as swarm:
        if up is not None:
            up.set()
        if joiner_go is None:
            partner_ready.wait(timeout)
            swarm.wait_for_peers(2, timeout=timeout)
        statuses.clear()
        gc.collect()
        trim_heap()
        baseline, hwm_reset = rss_bytes(), reset_high_water()
        rss = baseline
        served_before = swarm.peer.state_server.served if swarm.peer.state_server else 0
        started, step = time.monotonic(), 1
        serve_peak = None  # the peak until the joiner's download was served
        with RssSampler(keep_every=keep_every) as sampler:
            if joiner_go is not None:
                joiner_go.set()
            while time.monotonic() - started < timeout:
                train_step(model, optimizer, step)
                step += 1
                time.sleep(PACE)
                if serve_peak is None and swarm.peer.state_server and swarm.peer.state_server.served > served_before:
                    serve_peak = max(sampler.peak, high_water_bytes() if hwm_reset else 0)
                if seconds is not None:
                    if time.monotonic() - started >= seconds:
                        break
                elif sum(status in AVERAGED for status in statuses) >= rounds:
                    break
        high_water = high_water_bytes() if hwm_reset else 0
        served = (swarm.peer.state_server.served if swarm.peer.state_server else 0) - served_before
        stop.set()
        peak = max(sampler.peak, high_water)
        return {
            "numel": sum(p.numel() for p in model.parameters()),
            "model_bytes": model_bytes(model),
            "baseline_bytes": baseline,
            "rss_at_baseline_bytes": rss,
            "training_peak_bytes": training_peak,
            "peak_bytes": peak,
            "sampled_peak_bytes": sampler.peak,
            "high_water_bytes": high_water,
            "extra_bytes": peak - baseline,
            "extra_x": (peak - baseline) / model_bytes(model),
            "end_bytes": rss_bytes(),
            "statuses": statuses,
            "served": served,
            "serve_extra_bytes": None if serve_peak is None else serve_peak - baseline,
            "steps": step,
            "seconds": time.monotonic() - started,
            "series": sampler.series,
            "peaks": [(round(rss / 2**20), where, big) for rss, where, big in sampler.peaks[-6:]],
        }


def partner_peer(initial_peers, numel, codec, outer, ready, stop, go=None, average_every=2.0, timeout=300.0):
    """The measured peer's partner: trains the same model and averages with it until ``stop`` is set.
    Given ``go``, it waits for it and then joins by downloading the measured peer's state."""
    torch.set_num_threads(1)
    model = build_model(numel)
    optimizer = _optimizer(model)
    if go is not None:
        go.wait(timeout)
    options = _attach_options(initial_peers, codec, outer, average_every, load_state=go is not None)
    with attach(optimizer, run_id="memory", **options) as swarm:
        joined = swarm.state_download_seconds
        ready.set()
        step = 1
        while not stop.wait(PACE):
            train_step(model, optimizer, step)
            step += 1
        return {"rounds": swarm.rounds_done, "state_download_seconds": joined}


def measure(
    numel,
    codec="none",
    outer=False,
    serve=False,
    rounds=3,
    average_every=2.0,
    seconds=None,
    keep_every=None,
    timeout=180.0,
) -> dict:
    """One measurement in fresh processes: the measured peer and its partner (a joiner with ``serve``)."""
    from gossiptrain.testing import LocalSwarm

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        ctx = swarm.context
        ready, stop, up = ctx.Event(), ctx.Event(), ctx.Event()
        go = ctx.Event() if serve else None
        swarm.spawn(
            "measured",
            measured_peer,
            swarm.initial_peers,
            numel,
            codec,
            outer,
            rounds,
            ready,
            go,
            stop,
            average_every,
            seconds,
            keep_every,
            timeout,
            up,
        )
        if not serve:  # the measured peer is up first: the partner must not download from it
            if not up.wait(timeout):
                raise TimeoutError(f"the measured peer did not join the swarm within {timeout}s")
        swarm.spawn(
            "partner",
            partner_peer,
            swarm.initial_peers,
            numel,
            codec,
            outer,
            ready,
            stop,
            go,
            average_every,
            timeout + 60,
        )
        results = swarm.results(2, timeout + 120)
    out = results["measured"]
    out.update(codec=codec, mode="outer" if outer else "params", serve=serve, partner=results["partner"])
    return out
