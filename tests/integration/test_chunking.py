"""CHUNKING (RFC 3030) against the real eqmaild over TCP, with Python's
smtplib driving BDAT (smtplib has no BDAT of its own: the commands go out
with send() and the replies come back through getreply()).  A message sent
in chunks, pipelined or not, is stored exactly as the same message sent
with DATA; a 10 MB message in 1 MB chunks goes through the queue."""
from __future__ import annotations

import smtplib

from test_local_delivery import head_lines

BODY = b"".join(b"line %05d .dot and \xc3\xa9\r\n" % i for i in range(3000))
MESSAGE = (b"From: a@client.test\r\nTo: postmaster@mx.example.org\r\n"
           b"Subject: chunked\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n.leading dot\r\n" + BODY)


def _below_received(stored: bytes) -> bytes:
    """The message below eqmail's own lines (Return-Path, Delivered-To,
    Received)."""
    lines = stored.split(b"\n")
    i = 0
    while not lines[i].startswith(b"From: "):
        i += 1
    return b"\n".join(lines[i:])


def _bdat(s: smtplib.SMTP, chunks, pipelined: bool):
    replies = []
    wire = [b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c
            for i, c in enumerate(chunks)]
    if pipelined:
        s.send(b"".join(wire))
        replies = [s.getreply() for _ in wire]
    else:
        for w in wire:
            s.send(w)
            replies.append(s.getreply())
    return replies


def test_bdat_stores_what_data_stores(daemon, home):
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("chunking") and s.has_extn("pipelining")
        s.sendmail("a@client.test", ["postmaster@mx.example.org"], MESSAGE)
        for pipelined in (False, True):
            assert s.docmd("MAIL FROM:<a@client.test>")[0] == 250
            assert s.docmd("RCPT TO:<postmaster@mx.example.org>")[0] == 250
            chunks = [MESSAGE[:1000], MESSAGE[1000:1001], MESSAGE[1001:50000],
                      MESSAGE[50000:]]
            replies = _bdat(s, chunks, pipelined)
            assert [r[0] for r in replies] == [250] * 4, replies
            assert replies[0][1] == b"2.0.0 1000 octets received"
            assert replies[-1][1].startswith(b"2.0.0 ok "), replies[-1]
    msgs = home.wait_messages(3, timeout=30)
    assert len(msgs) == 3
    bodies = {_below_received(m) for m in msgs}
    assert len(bodies) == 1, "BDAT stored something else than DATA"
    assert bodies.pop().endswith(b"\n.leading dot\n" + BODY.replace(b"\r\n", b"\n"))
    for m in msgs:
        assert any(l.startswith(b"Received: from ") for l in head_lines(m))


def test_a_10_mb_message_in_1_mb_chunks(daemon, home):
    big = (b"From: a@client.test\r\nSubject: big\r\n\r\n"
           + (b"x" * 998 + b"\r\n") * 10000)
    chunks = [big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)]
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=60) as s:
        s.ehlo("client.test")
        assert s.docmd("MAIL FROM:<a@client.test>")[0] == 250
        assert s.docmd("RCPT TO:<postmaster@mx.example.org>")[0] == 250
        replies = _bdat(s, chunks, pipelined=False)
        assert [r[0] for r in replies] == [250] * len(chunks), replies
    (m,) = home.wait_messages(1, timeout=60)
    assert _below_received(m) == big.replace(b"\r\n", b"\n")


class ChunkingServer:
    """A small SMTP server (raw sockets, a thread) that offers CHUNKING and
    records every command and the BDAT data, to watch eqmail's client."""

    def __init__(self, host="127.0.0.26", port=25, chunking=True, reject=()):
        import socket
        import threading

        self.chunking = chunking
        self.reject = set(reject)     # recipients refused with 550
        self.commands = []
        self.data = b""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(5)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                f = conn.makefile("rb")
                conn.sendall(b"220 chunky ESMTP\r\n")
                while True:
                    line = f.readline()
                    if not line:
                        break
                    cmd = line.rstrip(b"\r\n").decode()
                    self.commands.append(cmd)
                    verb = cmd.split()[0].upper() if cmd else ""
                    if verb == "EHLO":
                        conn.sendall(b"250-chunky\r\n250-PIPELINING\r\n250 %s\r\n"
                                     % (b"CHUNKING" if self.chunking else b"8BITMIME"))
                    elif verb == "BDAT":
                        self.data += f.read(int(cmd.split()[1]))
                        conn.sendall(b"250 2.0.0 chunk taken\r\n")
                    elif verb == "RCPT" and cmd[9:-1] in self.reject:
                        conn.sendall(b"550 5.1.1 no such user\r\n")
                    elif verb == "DATA":
                        conn.sendall(b"354 go ahead\r\n")
                        while True:
                            line = f.readline()
                            if not line or line == b".\r\n":
                                break
                            self.data += line
                        conn.sendall(b"250 2.0.0 data taken\r\n")
                    elif verb == "QUIT":
                        conn.sendall(b"221 bye\r\n")
                        break
                    else:
                        conn.sendall(b"250 ok\r\n")

    def stop(self):
        import socket

        try:  # wakes the accept() of the thread (close alone would not)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the server thread still holds its port"


def test_remote_delivery_sends_a_small_message_with_bdat(home, daemon_factory):
    from test_remote import inject, start

    srv = ChunkingServer()
    try:
        d = start(home, daemon_factory, routes="chunky.test:[127.0.0.26]\n")
        message = b"From: a\nSubject: bdat out\n\n.dot\nline\n"
        inject(home, ["x@chunky.test"], message)
        deadline = __import__("time").time() + 15
        while "QUIT" not in srv.commands and __import__("time").time() < deadline:
            __import__("time").sleep(0.05)
        bdat = [c for c in srv.commands if c.startswith("BDAT")]
        assert len(bdat) == 1 and bdat[0].endswith(" LAST"), srv.commands
        assert "DATA" not in srv.commands
        # CRLF line ends, no dot-stuffing, the queue's Received line first
        assert srv.data.endswith(b"Subject: bdat out\r\n\r\n.dot\r\nline\r\n"), srv.data
        assert int(bdat[0].split()[1]) == len(srv.data)
        assert "accepted message" in d.log()
    finally:
        srv.stop()


def test_remote_delivery_pipelines_and_one_recipient_is_refused(home, daemon_factory):
    """RFC 2920: MAIL, both RCPTs and DATA in one write to a server that
    offers PIPELINING (no CHUNKING here); the refused recipient bounces,
    the other gets the message."""
    import time

    from test_remote import inject, one_bounce, parse_dsn, start

    srv = ChunkingServer(chunking=False, reject={"gone@chunky.test"})
    try:
        d = start(home, daemon_factory, routes="chunky.test:[127.0.0.26]\n")
        inject(home, ["gone@chunky.test", "ok@chunky.test"],
               b"From: a\nSubject: piped\n\n.dot\n", sender="postmaster@mx.example.org")
        deadline = time.time() + 15
        while "QUIT" not in srv.commands and time.time() < deadline:
            time.sleep(0.05)
        assert [c.split()[0] for c in srv.commands[1:5]] == ["MAIL", "RCPT", "RCPT", "DATA"], \
            srv.commands
        assert srv.data.endswith(b"Subject: piped\r\n\r\n..dot\r\n"), srv.data
        _, _, (block,) = parse_dsn(one_bounce(home, d))
        assert block["Final-Recipient"] == "rfc822; gone@chunky.test"
        assert block["Status"] == "5.1.1"
    finally:
        srv.stop()
