"""An SMTP load client that sends the same messages with DATA or with BDAT.

    python bench/bdat_client.py HOST PORT MODE N CONCURRENCY SIZE SENDER RCPT

MODE is ``data`` or ``bdat``.  N messages of SIZE bytes (CRLF lines of 78
characters) go out over CONCURRENCY connections at once, one message a
session as smtp-source does by default: greeting, EHLO, then MAIL, RCPT
and DATA (pipelined; the message after the 354) or MAIL, RCPT and ``BDAT
size LAST`` with the message (all in one write, RFC 3030 with RFC 2920),
then QUIT.  The same client for both modes, so that the figures differ
only by the command.  Prints one JSON line: messages accepted, refused,
seconds, msgs/s.
"""
import asyncio
import json
import sys
import time


def message(size: int) -> bytes:
    head = b"From: bench@bench.test\r\nTo: rcpt@bench.test\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def reply(reader) -> int:
    """One SMTP reply's code (multi-line replies read to their end)."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def session(host, port, mode, msg, sender, rcpt) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if await reply(reader) != 220:
            return False
        writer.write(b"EHLO bench.test\r\n")
        if await reply(reader) != 250:
            return False
        env = b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\n" % (sender, rcpt)
        if mode == "data":
            writer.write(env + b"DATA\r\n")
            codes = [await reply(reader) for _ in range(3)]
            if codes != [250, 250, 354]:
                return False
            writer.write(msg + b".\r\n")
        else:
            writer.write(env + b"BDAT %d LAST\r\n" % len(msg) + msg)
            codes = [await reply(reader) for _ in range(2)]
            if codes != [250, 250]:
                return False
        ok = await reply(reader) == 250
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return ok
    finally:
        writer.close()


async def run(host, port, mode, n, concurrency, size, sender, rcpt):
    msg = message(size)
    left = [n]
    counts = {"accepted": 0, "refused": 0}

    async def worker():
        while left[0] > 0:
            left[0] -= 1
            try:
                ok = await session(host, port, mode, msg, sender, rcpt)
            except (OSError, ConnectionError, ValueError):
                ok = False
            counts["accepted" if ok else "refused"] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.monotonic() - t0
    counts.update(mode=mode, messages=n, seconds=seconds,
                  msgs_s=counts["accepted"] / seconds if seconds else None)
    return counts


def main() -> int:
    host, port, mode, n, c, size, sender, rcpt = sys.argv[1:9]
    if mode not in ("data", "bdat"):
        print("MODE is data or bdat", file=sys.stderr)
        return 64
    out = asyncio.run(run(host, int(port), mode, int(n), int(c), int(size),
                          sender.encode(), rcpt.encode()))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
