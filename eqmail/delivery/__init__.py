"""delivery -- where a queued message goes: local (Maildir) and, later, remote.

Every delivery returns a `Result`: SUCCESS, DEFERRAL (temporary, retried) or
FAILURE (permanent, bounced), with an RFC 3463 status and a one-line text,
as qmail-lspawn/qmail-rspawn report K, Z and D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SUCCESS = "success"
DEFERRAL = "deferral"
FAILURE = "failure"


@dataclass(frozen=True)
class Result:
    """The outcome of one delivery attempt to one recipient."""

    kind: str      # SUCCESS, DEFERRAL or FAILURE
    status: str    # RFC 3463 enhanced status, e.g. "4.3.0"
    text: str      # human-readable report, qmail style
    remote_mta: Optional[str] = None   # remote deliveries: the host that answered
    diagnostic: Optional[str] = None   # remote deliveries: "smtp; <its reply>"
    #: remote deliveries: the next hop took the DSN request on (RFC 3461)
    dsn_passed: bool = False

    @property
    def ok(self) -> bool:
        return self.kind == SUCCESS


def delivered(text: str, status: str = "2.0.0") -> Result:
    return Result(SUCCESS, status, text)


def deferred(text: str, status: str = "4.3.0") -> Result:
    return Result(DEFERRAL, status, text)


def failed(text: str, status: str = "5.0.0") -> Result:
    return Result(FAILURE, status, text)
