"""Fixtures for the far ends of remote delivery (see peers.py).

- ``test_ca`` (session): the trustme CA every TLS peer uses; ``.ca_file``.
- ``dns`` (function): ``dns(records, **kw) -> DNSServer`` on 127.0.0.153:53,
  stopped at teardown (root only; skips otherwise).
- ``postfix_peer`` (session): Postfix on 127.0.0.25:25 for far.test
  (root only; skips otherwise); ``postfix_far`` is the same, emptied of
  earlier messages, for one test.
- ``scripted_smtp`` (function): ``scripted_smtp(host, port, **kw) ->
  ScriptedSMTP`` with ``ca=test_ca`` by default, stopped at teardown.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from peers import (POSTFIX, ROOT, UNBOUND, DNSServer, PostfixPeer,  # noqa: E402
                   ScriptedSMTP, TestCA, system_postfix_running)


def need_root(what: str):
    if not ROOT:
        pytest.skip("%s needs root (tests/run as root, as in CI)" % what)


@pytest.fixture(scope="session")
def test_ca():
    ca = TestCA()
    yield ca
    ca.remove()


@pytest.fixture
def dns():
    """Factory: dns(records, zones=("test.",), outside="refuse") starts
    unbound; a second call in the same test replaces the first server."""
    need_root("the DNS server on 127.0.0.153:53")
    if not os.path.exists(UNBOUND):
        pytest.skip("unbound is not installed (tests/run installs it as root)")
    current = []

    def make(records=(), **kwargs) -> DNSServer:
        while current:
            current.pop().remove()
        server = DNSServer(records, **kwargs)
        current.append(server)
        return server

    yield make
    while current:
        current.pop().remove()


@pytest.fixture(scope="session")
def postfix_peer(test_ca):
    need_root("the Postfix peer on 127.0.0.25:25")
    if not os.path.exists(POSTFIX):
        pytest.skip("postfix is not installed (tests/run installs it as root)")
    # a system Postfix listening on *:25 would take 127.0.0.25:25 too: stop it
    # for the session, start it again afterwards
    system_was_running = system_postfix_running()
    if system_was_running:
        os.system("postfix stop >/dev/null 2>&1")
    peer = PostfixPeer(test_ca)
    try:
        peer.start()
    except Exception:
        peer.remove()
        raise
    yield peer
    peer.remove()
    if system_was_running:
        os.system("postfix start >/dev/null 2>&1")


@pytest.fixture
def postfix_far(postfix_peer):
    """The session's Postfix peer with an empty Maildir."""
    postfix_peer.clear()
    yield postfix_peer
    postfix_peer.clear()


@pytest.fixture
def scripted_smtp(test_ca):
    """Factory: scripted_smtp(host="127.0.0.1", port=None, **kwargs) ->
    ScriptedSMTP (see its docstring); stopped at teardown.  Port 25 on
    127.0.0.26..29 needs root."""
    started = []

    def make(host="127.0.0.1", port=None, **kwargs) -> ScriptedSMTP:
        if port is not None and port < 1024:
            need_root("listening on port %d" % port)
        kwargs.setdefault("ca", test_ca)
        server = ScriptedSMTP(host, port, **kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
