"""How every program finds its home (eqmail/paths.py, THE RULE), for the
user running the tests: root in CI, where the integration test
tests/integration/test_tools_home.py covers an unprivileged user."""
from __future__ import annotations

import os

import pytest

from eqmail import paths

ROOT = os.geteuid() == 0


def make_home(path):
    os.makedirs(os.path.join(str(path), "control"))
    return str(path)


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A current directory, a ~ and a system home of our own, all empty."""
    cwd, home, system = tmp_path / "cwd", tmp_path / "user", tmp_path / "system"
    for d in (cwd, home, system):
        d.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("EQMAIL_HOME", raising=False)
    monkeypatch.setattr(paths, "SYSTEM_HOME", str(system / "qmail"))
    return cwd, home, system / "qmail"


def test_home_argument_and_environment_come_first(place, monkeypatch):
    cwd, _, _ = place
    make_home(cwd / "eqmail-home")
    monkeypatch.setenv("EQMAIL_HOME", "relative/env")
    assert paths.find_home("given") == (str(cwd / "given"), "from --home")
    assert paths.find_home(None) == (str(cwd / "relative/env"), "from $EQMAIL_HOME")


def test_eqmail_home_in_the_current_directory(place):
    cwd, home, system = place
    make_home(home / "eqmail-home")
    make_home(cwd / "eqmail-home")
    assert paths.find_home(None) == (str(cwd / "eqmail-home"),
                                     "./eqmail-home in the current directory")
    assert paths.resolve_home(None) == str(cwd / "eqmail-home")
    make_home(system)
    # as root the system home wins where it exists (root's cron mail goes there)
    want = str(system) if ROOT else str(cwd / "eqmail-home")
    assert paths.resolve_home(None) == want


def test_a_directory_without_control_is_no_home(place):
    cwd, home, system = place
    os.makedirs(cwd / "eqmail-home")
    path, how = paths.find_home(None)
    assert path != str(cwd / "eqmail-home")


def test_someone_elses_eqmail_home_is_ignored(place):
    if not ROOT:  # (tests/integration/test_tools_home.py covers it as a user)
        pytest.skip("only root can give a directory away")
    cwd, _, _ = place
    make_home(cwd / "eqmail-home")
    os.chown(cwd / "eqmail-home", 12345, 12345)
    assert paths.resolve_home(None) != str(cwd / "eqmail-home")


def test_without_a_home_of_ones_own(place):
    cwd, home, system = place
    if ROOT:
        assert paths.find_home(None) == (str(system), "the system home, as root")
        return
    assert paths.find_home(None)[0] == str(home / "eqmail-home")
    make_home(system)
    assert paths.find_home(None) == (str(system), "the system home: %s/control exists"
                                     % system)
    # a home of one's own beats the system's
    make_home(home / "eqmail-home")
    assert paths.find_home(None) == (str(home / "eqmail-home"), "~/eqmail-home")


def test_a_vanished_current_directory(place, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    os.chdir(gone)
    os.rmdir(gone)
    assert os.path.isabs(paths.resolve_home(None))


def test_explain_names_the_home_and_the_reason(place):
    cwd, _, _ = place
    make_home(cwd / "eqmail-home")
    assert paths.explain(paths.resolve_home(None)) == (
        "home %s (./eqmail-home in the current directory)" % (cwd / "eqmail-home"))
    assert paths.explain("/x/y") == "home /x/y (from --home)"
