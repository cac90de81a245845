"""Fixtures shared by several test files."""

import pytest

from tests.peer_workers import train_digits


@pytest.fixture(scope="session")
def uncompressed_digits_runs() -> list[dict]:
    """Uncompressed digits training, run once per session: the swarm test and the codecs' baseline."""
    return train_digits("none")
