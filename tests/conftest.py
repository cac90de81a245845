"""Fixtures shared by several test files."""

import signal

import pytest

from tests.peer_workers import train_digits


@pytest.fixture(scope="session")
def uncompressed_digits_runs() -> list[dict]:
    """Uncompressed digits training, run once per session: the swarm test and the codecs' baseline."""
    return train_digits("none")


# A shell without job control (a background job, some CI runners) starts the suite with SIGINT ignored, and
# every process it starts would ignore it too: the tests of what Ctrl-C does need it as a terminal has it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test with a timeout of its own runs peers (processes, sockets): mark it ``slow``, so that
    ``make test-fast`` (``-m "not slow"``) runs only the pure protocol, codec and strategy tests."""
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            item.add_marker(pytest.mark.slow)
