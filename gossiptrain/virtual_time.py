"""An asyncio event loop in virtual time: when every task waits, the clock jumps to the next timer.

The simulator (``gossiptrain.simulation``) runs the live round code on it: its sleeps, timeouts and straggler
deadlines all read ``loop.time()``, which here is a number the loop advances itself, so a minute of
simulated rounds takes as long as the CPU needs for what happens in it, not a minute.  Work handed to
threads (``asyncio.to_thread``, ``loop.run_in_executor``) runs at once, inline and in zero virtual time: a
run has no thread and no race, and the same program gives the same events in the same order every time.

Failure semantics: a program whose every task waits with no timer set would wait forever on a real loop;
here ``run`` raises ``VirtualDeadlock`` instead.  Real I/O (a socket, a subprocess) still works but takes no
virtual time: the simulator uses none.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class VirtualDeadlock(RuntimeError):
    """Every task waits for something that no timer and no I/O will ever bring."""


class _VirtualSelector(selectors.DefaultSelector):
    """Polls real I/O without blocking; where the loop would block for ``timeout``, advances the clock by it."""

    def __init__(self, start: float):
        super().__init__()
        self.now = start

    def select(self, timeout: float | None = None):
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise VirtualDeadlock("every task waits and no timer is set: the simulated program would hang")
        self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` starts at ``start`` and moves only when every task waits."""

    def __init__(self, start: float = 0.0):
        self._virtual = _VirtualSelector(start)
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as e:
            future.set_exception(e)
        return future


def run(main: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """``asyncio.run(main)`` on a ``VirtualTimeLoop`` whose clock starts at ``start`` seconds."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(start)) as runner:
        return runner.run(main)
