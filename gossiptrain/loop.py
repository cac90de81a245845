"""LoopThread: the asyncio event loop that a synchronous caller drives its peer through."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any


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

    def close(self) -> None:
        """Cancel whatever still runs in the loop (e.g. hivemind's cache refreshers), then stop it."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.submit(cancel_all()).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
