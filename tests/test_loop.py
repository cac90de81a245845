"""LoopThread: the event loop thread that synchronous callers drive their peer through."""

import asyncio
import threading
import time

from gossiptrain.loop import LoopThread


def test_closing_a_loop_whose_thread_is_blocked_returns_within_its_bound_and_stops_it_later():
    loop = LoopThread()
    blocked, release = threading.Event(), threading.Event()
    loop.loop.call_soon_threadsafe(lambda: (blocked.set(), release.wait(30)))  # e.g. heavy work on the loop
    assert blocked.wait(5)
    started = time.monotonic()
    try:
        loop.close(timeout=0.2)  # neither the cancellation nor the join can finish while the thread is blocked
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert elapsed < 5, elapsed
    loop._thread.join(5)
    assert not loop._thread.is_alive(), "once unblocked, the loop stops: close() asked it to"
    leftover = asyncio.all_tasks(loop.loop)  # close()'s cancellation, started too late to finish
    loop.loop.run_until_complete(asyncio.gather(*leftover))
    loop.loop.close()


def test_closing_an_idle_loop_cancels_its_tasks_and_closes_it():
    loop = LoopThread()

    async def forever() -> None:
        await asyncio.Event().wait()

    future = loop.submit(forever())
    loop.close()
    assert future.cancelled() and loop.loop.is_closed() and not loop._thread.is_alive()
