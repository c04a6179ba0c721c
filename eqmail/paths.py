"""paths -- how every eqmail program finds its home directory.

THE RULE (the same for `eqmaild` and every `eqmail TOOL`, sendmail too):
  1. ``--home DIR`` on the command line;
  2. else the environment variable ``EQMAIL_HOME``;
  3. else ``./eqmail-home``, when the current directory holds a home (a
     directory with ``control/`` in it) that belongs to the user running
     the program -- the quick start's home, so that tools run where
     ``eqmaild --home ./eqmail-home`` was started reach that daemon.  As
     root only when there is no system home (``/var/qmail/control``);
  4. else, for a user other than root, ``~/eqmail-home`` when it holds
     ``control/`` and belongs to the user: a home of your own always
     comes before the system's;
  5. else ``/var/qmail`` when running as root, or when
     ``/var/qmail/control`` exists (a system install, which sendmail and
     friends must reach);
  6. else ``~/eqmail-home`` (where a first ``eqmaild`` start makes one).

  "Belongs to the user": owned by the user's uid, so that a directory
  someone else made (in /tmp, say) never becomes your home.  `find_home`
  also says which rule chose the home, for the error messages of the tools
  ("every failure names the home it used").
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

SYSTEM_HOME = "/var/qmail"

#: The name of a personal home, in the current directory or the user's ~.
HOME_NAME = "eqmail-home"

#: The rule in one sentence, for --help texts.
HOME_RULE = ("Home: --home DIR, else $EQMAIL_HOME, else ./eqmail-home when the current "
             "directory holds one of yours (as root: unless /var/qmail/control exists), "
             "else ~/eqmail-home when you have one (not as root), else /var/qmail (as "
             "root, or when /var/qmail/control exists), else ~/eqmail-home.")


def _own_home(path: str) -> bool:
    """True when `path` is a directory with control/ in it, owned by the
    effective uid (symbolic links followed: a link of your own to a home
    of your own)."""
    try:
        st = os.stat(path)
        return (os.path.isdir(os.path.join(path, "control"))
                and os.path.isdir(path) and st.st_uid == os.geteuid())
    except OSError:
        return False


def find_home(arg: Optional[str] = None) -> Tuple[str, str]:
    """(the absolute home, how it was chosen) for a ``--home`` argument
    (None when not given), by THE RULE above.  The second part completes
    "home DIR (...)" in messages: ``--home``, ``$EQMAIL_HOME``,
    ``./eqmail-home in the current directory`` ..."""
    if arg:
        return os.path.abspath(arg), "from --home"
    env = os.environ.get("EQMAIL_HOME")
    if env:
        return os.path.abspath(env), "from $EQMAIL_HOME"
    root = os.geteuid() == 0
    system = os.path.isdir(os.path.join(SYSTEM_HOME, "control"))
    try:
        here = os.path.abspath(HOME_NAME)
    except OSError:  # the current directory is gone
        here = ""
    if here and not (root and system) and _own_home(here):
        return here, "./%s in the current directory" % HOME_NAME
    mine = os.path.join(os.path.expanduser("~"), HOME_NAME)
    if not root and _own_home(mine):
        return os.path.abspath(mine), "~/%s" % HOME_NAME
    if root:
        return SYSTEM_HOME, "the system home, as root"
    if system:
        return SYSTEM_HOME, "the system home: %s/control exists" % SYSTEM_HOME
    return os.path.abspath(mine), ("the default: no --home, no $EQMAIL_HOME, no ./%s "
                                   "or ~/%s of yours" % (HOME_NAME, HOME_NAME))


def default_home() -> str:
    """The home chosen by rules 2-6 above."""
    return find_home(None)[0]


def resolve_home(arg: Optional[str]) -> str:
    """The absolute home for a ``--home`` argument (None when not given)."""
    return find_home(arg)[0]


def describe_home(arg: Optional[str]) -> str:
    """``DIR (how it was chosen)``, for messages."""
    return "%s (%s)" % find_home(arg)


def explain(home: str) -> str:
    """``home DIR (how it was chosen)`` for a home already resolved (by
    `resolve_home`), for a tool's failure message: the rule's reason when
    the rule gives this very home, else it came from --home."""
    path, how = find_home(None)
    if os.path.abspath(home) != path:
        how = "from --home"
    return "home %s (%s)" % (os.path.abspath(home), how)


def init_home(home: str, fqdn: Optional[str] = None) -> bool:
    """Create the embedded default configuration in `home` if it has none.

    Writes what ``eqmail config-fast FQDN`` writes (FQDN defaults to this
    host's), adds ``localhost`` to locals and rcpthosts, and makes
    ``users/`` and the queue.  A missing ``alias/`` is created with
    ``alias/Maildir/`` and a catch-all ``alias/.qmail-default`` holding
    ``./Maildir/``: every local address without a user of its own lands in
    ``alias/Maildir/``.  Existing files are kept.  Returns True when
    control/me had to be created.  Raises OSError.
    """
    from . import control
    from .delivery.local import maildirmake
    from .queue.store import Store

    created = not os.path.exists(os.path.join(home, "control", "me"))
    os.makedirs(home, mode=0o755, exist_ok=True)
    if created:
        name = fqdn or control.host_fqdn()
        control.config_fast(home, name, extra_locals=["localhost"])
        try:  # STARTTLS from the start, so submission can take passwords
            from .smtp.tls import make_self_signed
            make_self_signed(home, name)
        except (OSError, RuntimeError):
            pass  # no openssl: STARTTLS stays off until eqmail mkservercert
    os.makedirs(os.path.join(home, "users"), mode=0o755, exist_ok=True)
    alias = os.path.join(home, "alias")
    if not os.path.isdir(alias):
        os.makedirs(alias, mode=0o755)
        maildirmake(os.path.join(alias, "Maildir"))
        with open(os.path.join(alias, ".qmail-default"), "w") as f:
            f.write("./Maildir/\n")
    Store.open(home, create=True)
    return created
