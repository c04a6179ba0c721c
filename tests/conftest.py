"""Shared fixtures: throwaway homes and a real eqmaild on loopback.

The helpers behind them live in helpers.py (import them from there: the
name ``conftest`` is taken by tests/integration/conftest.py as well).
"""
from __future__ import annotations

import pytest

from helpers import Daemon, Home

@pytest.fixture
def home():
    h = Home()
    yield h
    h.remove()


@pytest.fixture
def daemon_factory():
    started = []

    def make(home: Home, extra_args=(), start=True, env=None) -> Daemon:
        d = Daemon(home, extra_args, env)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(5)


@pytest.fixture
def daemon(home, daemon_factory):
    """eqmaild on the fixture test vectors' home: me=mx.example.org,
    locals mx.example.org and localhost, rcpthosts example.org, .example.net
    and the locals, badmailfrom as in the behaviour reference's T1-T30."""
    home.setup(rcpthosts=("mx.example.org", "localhost", "example.org", ".example.net"),
               badmailfrom="spam@bad.com\n@evil.com\n.spammer.org\n")
    return daemon_factory(home)
