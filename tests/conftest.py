"""Fixtures shared by the in-process test modules."""

from __future__ import annotations

from typing import Iterator

import pytest
from inproc import Harness
from o2receiver import FakeOpenObserve


@pytest.fixture
def receiver() -> Iterator[FakeOpenObserve]:
    """A loopback fake OpenObserve, stopped (and checked for handler errors) after the test."""
    fake = FakeOpenObserve().start()
    try:
        yield fake
    finally:
        fake.release()
        fake.stop()
    assert fake.server_errors == []


@pytest.fixture
def harness() -> Iterator[Harness]:
    """Builds providers, processors and exporters for a test and shuts every one of them down after it."""
    h = Harness()
    try:
        yield h
    finally:
        h.close()
