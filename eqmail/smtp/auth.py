"""smtp.auth -- SMTP AUTH mechanisms and the checkpassword runner.

SUMMARY
    The parts of qmail-smtpd-auth 0.59 (as patched in eQmail 1.09) that do
    not talk to the client: decoding what the client sends for PLAIN, LOGIN
    and CRAM-MD5, building the CRAM-MD5 challenge, and running a
    checkpassword-compatible program with the credentials on fd 3.  The
    session sends the prompts and the replies, handles ``*`` (cancel) and
    sleeps the 5 seconds after a failure; this module never sleeps, never
    replies and never logs.

STANDARDS
    RFC 4954 (SMTP AUTH), RFC 4616 (PLAIN), RFC 2195 (CRAM-MD5), the
    checkpassword interface by D. J. Bernstein
    (https://cr.yp.to/checkpwd/interface.html), qmail-smtpd-auth 0.59 and
    the behaviour reference section 3 (test vectors T19-T23).

MECHANISMS
    PLAIN     one base64 line, ``authzid NUL user NUL password``; the
              authzid is ignored, as qmail-smtpd-auth does.  `decode_plain`.
    LOGIN     two base64 lines, the user then the password, after the plain
              text prompts ``334 Username:`` and ``334 Password:`` (eQmail,
              not base64).  `decode_b64_line` for each.
    CRAM-MD5  the challenge ``<PID.UNIXTIME@TCPLOCALHOST>`` (`cram_challenge`)
              goes out base64-encoded (`encode_b64`); the answer is base64 of
              ``user SP hexdigest``, split at the first space (`decode_cram`).

    Decoded bytes become str as UTF-8 with ``surrogateescape``, so any
    bytes survive the round trip: `check` encodes the same way and the
    checkpassword program sees exactly the client's bytes.

CHECKPASSWORD CALL
    `check(argv, user, secret, challenge)` runs ``argv`` (the checkprogram
    and its subprogram, e.g. ``["/bin/checkpassword", "/bin/true"]``) with
    fd 3 a pipe holding ``user NUL secret NUL challenge NUL``.  For PLAIN
    and LOGIN the challenge is empty (``joe\\0secret\\0\\0``, as eQmail
    sends); for CRAM-MD5 the secret is the hex digest and the challenge the
    ``<...>`` string.  The child inherits `env` (default: eqmail's own
    environment) and eqmail's uid.  It runs through eqmail.children, so it
    waits cooperatively and a slow program stalls only its own session.

RESULTS
    ``"ok"``     exit 0: authenticated (235).
    ``"fail"``   any other exit (1 bad credentials, 2 misuse, 111 temporary
                 trouble, ...) and a program that cannot be started (qmail's
                 child ``_exit(1)`` after a failed execvp): the caller sleeps
                 5 s, then ``535 authentication failed (#5.7.1)``.
    ``"crash"``  killed by a signal, or killed by eqmail after `timeout`
                 seconds: ``454 oops, problem with child and I can't auth
                 (#4.3.0)``.

SECURITY
    The secret is passed only on the fd 3 pipe, never in argv or the
    environment.  Credentials containing NUL cannot be framed on fd 3 and
    are refused (`decode_*` raise AuthSyntax; `check` answers ``"fail"``
    without running anything).  Python strings cannot be wiped, so unlike
    qmail the password is not zeroed after use.
"""
from __future__ import annotations

import base64
import binascii
import re
from typing import Mapping, Optional, Sequence, Tuple

#: Results of `check`.
OK = "ok"
FAIL = "fail"
CRASH = "crash"

#: A CRAM-MD5 digest as RFC 2195 section 2 writes it: 16 bytes, 32 lower-case hex digits.
_HEXDIGEST = re.compile(r"[0-9a-f]{32}\Z")

#: Bytes become str (and back) with this codec, losslessly.
_CODEC = ("utf-8", "surrogateescape")


class AuthSyntax(ValueError):
    """The client's AUTH data is malformed: ``501 malformed auth input (#5.5.4)``."""


def _b64decode(line: str) -> bytes:
    """Strict base64 (RFC 4648 alphabet, padding required); AuthSyntax otherwise.
    An empty line is malformed (behaviour reference 3.1)."""
    line = line.strip(" \t\r\n")
    if not line:
        raise AuthSyntax("empty line")
    try:
        return base64.b64decode(line.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as e:
        raise AuthSyntax("bad base64: %s" % e) from None


def encode_b64(text: str) -> str:
    """`text` in base64, as sent after ``334 `` (the CRAM-MD5 challenge)."""
    return base64.b64encode(text.encode(*_CODEC)).decode("ascii")


def decode_b64_line(line: str) -> str:
    """One base64 line of AUTH LOGIN (the user or the password), decoded.

    Raises AuthSyntax for an empty line, bad base64, an empty result or one
    holding NUL (it could not be passed on fd 3).  ``*`` (cancel) is the
    caller's business: here it is just bad base64.
    """
    text = _b64decode(line).decode(*_CODEC)
    if not text:
        raise AuthSyntax("empty")
    if "\0" in text:
        raise AuthSyntax("NUL in decoded line")
    return text


def decode_plain(b64: str) -> Tuple[str, str]:
    """(user, password) from an AUTH PLAIN response (RFC 4616 section 2).

    The decoded form is ``[authzid] NUL authcid NUL passwd``; the authzid is
    ignored, as qmail-smtpd-auth ignores it.  Raises AuthSyntax for bad
    base64, not exactly two NULs, an empty user or an empty password
    (qmail-smtpd-auth: ``if (!user.len || !pass.len) return err_input();``).
    """
    parts = _b64decode(b64).decode(*_CODEC).split("\0")
    if len(parts) != 3:
        raise AuthSyntax("PLAIN needs authzid NUL user NUL password")
    _, user, password = parts
    if not user:
        raise AuthSyntax("empty user")
    if not password:
        raise AuthSyntax("empty password")
    return user, password


def cram_challenge(local_host: str, pid: int, now: float) -> str:
    """The CRAM-MD5 challenge as eQmail makes it: ``<PID.UNIXTIME@local_host>``
    (RFC 2195 section 2's msg-id form; `now` is truncated to whole seconds).
    Not base64-encoded: see `encode_b64`."""
    return "<%d.%d@%s>" % (pid, int(now), local_host)


def decode_cram(b64: str) -> Tuple[str, str]:
    """(user, hexdigest) from a CRAM-MD5 response (RFC 2195 section 2).

    The decoded text is split at the first space, as qmail-smtpd-auth does
    (spaces after it are skipped too), so a user name cannot hold a space.
    Raises AuthSyntax for bad base64, no space, an empty user, NUL in the
    user, or a digest that is not 32 lower-case hex digits.
    """
    text = _b64decode(b64).decode(*_CODEC)
    user, sep, digest = text.partition(" ")
    digest = digest.lstrip(" ")
    if not sep or not user:
        raise AuthSyntax("CRAM-MD5 needs user SP digest")
    if "\0" in user:
        raise AuthSyntax("NUL in user")
    if not _HEXDIGEST.match(digest):
        raise AuthSyntax("digest is not 32 lower-case hex digits")
    return user, digest


def fd3_data(user: str, secret: str, challenge: str = "") -> bytes:
    """The bytes written to the checkpassword program's fd 3:
    ``user NUL secret NUL challenge NUL``."""
    return b"".join(s.encode(*_CODEC) + b"\0" for s in (user, secret, challenge))


def check(argv: Sequence[str], user: str, secret: str, challenge: str = "",
          env: Optional[Mapping[str, str]] = None, timeout: float = 30.0) -> str:
    """Run the checkpassword program `argv` for `user`; ``"ok"``, ``"fail"``
    or ``"crash"`` (see RESULTS in the module docstring).

    `timeout` is in seconds; after it the program (its process group) is
    killed and the answer is ``"crash"``.  Never raises and never sleeps:
    the 5 s delay after ``"fail"`` is the caller's.  An empty `argv`, or
    credentials holding NUL, give ``"fail"`` without running anything.
    """
    from .. import children

    try:
        if not argv or any("\0" in s for s in (user, secret, challenge)):
            return FAIL
        done = children.run(list(argv), timeout=timeout,
                            env=None if env is None else dict(env),
                            extra_fd=3, extra_data=fd3_data(user, secret, challenge))
    except Exception:
        # pipe or spawn trouble in eqmail itself: qmail's "454 oops, unable
        # to open pipe / fork" family, which is what "crash" answers
        return CRASH
    if done.error is not None:
        return FAIL          # qmail's child: execvp() failed, _exit(1)
    if done.timed_out or done.code < 0:
        return CRASH         # wait_crashed(): killed by a signal
    return OK if done.code == 0 else FAIL
