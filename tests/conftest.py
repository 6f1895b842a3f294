"""Fixtures shared by the whole suite: private daemons and clients connected to them."""

from __future__ import annotations

import pytest

import npu
from npu.local import LocalDaemon


@pytest.fixture(scope="module")
def daemon():
    """A private npud (one 'edge' device) shared by the tests of one module."""
    d = LocalDaemon()
    yield d
    d.stop()


@pytest.fixture
def client(daemon):
    """A fresh session with the module's daemon."""
    with npu.connect(daemon.endpoint) as c:
        yield c


@pytest.fixture
def make_client(daemon):
    """Open extra sessions with the module's daemon; all closed at teardown."""
    opened = []

    def make(**kwargs):
        c = npu.connect(daemon.endpoint, **kwargs)
        opened.append(c)
        return c
    yield make
    for c in opened:
        c.close()
