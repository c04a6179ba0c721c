"""paths -- how every eqmail program finds its home directory.

The rule, the same for `eqmaild` and every `eqmail TOOL`:
  1. ``--home DIR`` on the command line;
  2. else the environment variable ``EQMAIL_HOME``;
  3. else ``/var/qmail`` when running as root, or when ``/var/qmail/control``
     exists (a system install, which sendmail and friends must reach);
  4. else ``~/eqmail-home`` (a personal, unprivileged install).
"""
from __future__ import annotations

import os
from typing import Optional

SYSTEM_HOME = "/var/qmail"


def default_home() -> str:
    """The home chosen by rules 2-4 above."""
    env = os.environ.get("EQMAIL_HOME")
    if env:
        return env
    if os.geteuid() == 0 or os.path.isdir(os.path.join(SYSTEM_HOME, "control")):
        return SYSTEM_HOME
    return os.path.join(os.path.expanduser("~"), "eqmail-home")


def resolve_home(arg: Optional[str]) -> str:
    """The absolute home for a ``--home`` argument (None when not given)."""
    return os.path.abspath(arg or default_home())


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
