"""smtp.content -- the message as it arrives: header checks, and BDAT's chunks.

SUMMARY
    `HeaderScan` follows the header section line by line for DATA and BDAT
    alike: it counts the hops (Received and Delivered-To lines, qmail's
    loop check) and drops ``Authentication-Results:`` fields that claim
    this host's authserv-id (RFC 8601 section 5) when eqmail adds its own.

    `Chunks` takes BDAT's chunks (RFC 3030) as they come off the wire, in
    pieces of any size: CRLF line ends become the queue's LF (a CR that
    ends a piece waits for the next one), the header lines go through a
    `HeaderScan`, the size is counted against databytes, and a line that
    ends in a bare LF is noted, so that BDAT is refused for it as DATA is
    (qmail's rule; nothing is ever turned into a different message).  No
    dot-stuffing: BDAT's data is taken as it is.

STANDARDS
    RFC 3030 (CHUNKING); RFC 5321 section 2.3.8 (lines end in CRLF);
    RFC 8601 section 5; qmail-smtpd(8) (hops, bare LF).
"""
from __future__ import annotations

from typing import Callable, Optional

#: A header line longer than this (bytes) is written in pieces, as DATA
#: does with long lines, and only its first piece is looked at.
MAX_HEADER_LINE = 8192


class HeaderScan:
    """The header section, one line at a time (without its line end).
    `strip`: the lower-case authserv-id whose Authentication-Results
    fields are dropped, or None to keep them all."""

    __slots__ = ("in_header", "hops", "strip", "dropping")

    def __init__(self, strip: Optional[bytes]):
        self.in_header = True
        self.hops = 0
        self.strip = strip
        self.dropping = False

    def line(self, body: bytes) -> bool:
        """Take one whole header line; return whether it is kept.  An empty
        line ends the header section."""
        if not body:
            self.in_header = False
            return True
        self.piece(body)
        if self.strip is not None:
            if body[:1] not in (b" ", b"\t"):
                from .authcheck import authserv_id

                self.dropping = body[:23].lower() == b"authentication-results:" \
                    and authserv_id(body) == self.strip
            if self.dropping:
                return False
        return True

    def piece(self, start: bytes) -> None:
        """The first piece of a header line too long to hold: counted as a
        hop when it is one, never dropped."""
        if start[:8].lower() == b"received" or start[:9].lower() == b"delivered":
            self.hops += 1


class Chunks:
    """BDAT's data for one message.  `write(bytes)` gets the message with
    LF line ends; `limit` is databytes (0: none)."""

    __slots__ = ("write", "limit", "size", "too_big", "bare_lf", "scan", "_line", "_cr",
                 "_long")

    def __init__(self, write: Callable[[bytes], None], limit: int, scan: HeaderScan):
        self.write = write
        self.limit = limit
        self.size = 0           # bytes kept (after CRLF -> LF), as DATA counts
        self.too_big = False
        self.bare_lf = False
        self.scan = scan
        self._line = bytearray()  # a header line not yet whole
        self._cr = False          # the last piece ended in CR
        self._long = False        # a long header line is being written in pieces

    def _keep(self, out: bytes) -> None:
        self.size += len(out)
        if self.limit and self.size > self.limit:
            self.too_big = True
        if not self.too_big and not self.bare_lf:
            self.write(out)

    def feed(self, data: bytes) -> None:
        """Take the next piece of the chunk's data."""
        if not data:
            return
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if self.scan.in_header:
            data = self._header(data)
            if not data:
                return
        if data.count(b"\n") != data.count(b"\r\n"):
            self.bare_lf = True
        self._keep(data.replace(b"\r\n", b"\n"))

    def _header(self, data: bytes) -> bytes:
        """Header lines out of `data`; returns what follows the header."""
        line = self._line
        start = 0
        while self.scan.in_header:
            i = data.find(b"\n", start)
            if i == -1:
                line += data[start:]
                if len(line) > MAX_HEADER_LINE:  # written in pieces, as DATA does
                    if not self._long:
                        self.scan.piece(bytes(line))
                    self._long = True
                    self._keep(bytes(line))  # no line end in it
                    line.clear()
                return b""
            line += data[start:i + 1]
            start = i + 1
            if line.endswith(b"\r\n"):
                body = bytes(line[:-2])
            else:
                self.bare_lf = True
                body = bytes(line[:-1])
            line.clear()
            if self._long:  # the end of a long line: not a line of its own
                self._long = False
                self._keep(body + b"\n")
            elif self.scan.line(body):
                self._keep(body + b"\n")
        return data[start:]

    def finish(self) -> None:
        """The last chunk is in: what is held goes out (a final CR is
        data; a last line without its CRLF is kept as it is)."""
        tail = bytes(self._line) + (b"\r" if self._cr else b"")
        self._line.clear()
        self._cr = False
        if tail:
            self._keep(tail)
