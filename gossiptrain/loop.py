"""LoopThread: the asyncio event loop that a synchronous caller drives its peer through."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)


class LoopThread:
    """An asyncio event loop in a daemon thread.

    Sync code and notebooks (whose main thread may already run a loop) drive the peer through
    it, so nothing ever calls ``asyncio.run`` on a running loop and nothing forks.
    """

    def __init__(self, name: str = "gossiptrain-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None) -> Any:
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def close(self, timeout: float = 10.0) -> None:
        """Cancel whatever still runs in the loop (e.g. hivemind's cache refreshers), then stop it.

        Returns within about twice ``timeout`` seconds: that long for the tasks to end once cancelled,
        that long for the thread to stop.  A loop thread that is blocked (a callback that does not
        return) is asked to stop and left behind, with a warning: it stops once unblocked, or with
        the process (a daemon thread); the loop is then not closed.
        """

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        cancelled = self.submit(cancel_all())
        try:
            cancelled.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            logger.warning("the event loop's tasks did not end within %ss of being cancelled: stopping it", timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "the event loop thread %r did not stop within %ss (something blocks it): left to stop "
                "when unblocked or with the process",
                self._thread.name,
                timeout,
            )
            return
        self.loop.close()
