"""eqmail's in-process checks of issue 21 done the qmail way, for the benchmark.

    spp_plugins.py MODE [--resolv FILE] [--zone ZONE] [--db FILE] [--delay S]
                        [--queue PYTHON] [--authserv NAME]

bench/run.py's defences part runs eqmaild with its own checks off and
these instead: one forked process per check and command, as qmail-spp
plugins (control/smtpplugins) and a QMAILQUEUE wrapper do.  The libraries
are the ones eqmail uses in-process (dnspython, pyspf, dkimpy,
authheaders), so the difference is the forking and the interpreter start.

MODES
    rbl    [connection]: the reversed client address (TCPREMOTEIP) in ZONE
           (an A query; TXT for the text when listed); listed: ``R554 ...``
           (refuse and close), else nothing.
    spf    [mail]: pyspf's check of SMTPMAILFROM (the HELO name for the null
           sender) from TCPREMOTEIP; prints ``HReceived-SPF: ...`` and
           ``SSPFRESULT=<result>`` (the dkim mode reads it, as eqmail's
           in-process DMARC check reads the session's SPF result).
    grey   [rcpt]: greylisting of (client /24, SMTPMAILFROM, SMTPRCPTTO) in
           a sqlite file (WAL): a new triplet is refused with
           ``E451 4.7.1 greylisted, try again later`` until DELAY seconds
           have passed; then it is known.
    dkim   QMAILQUEUE: reads the message on fd 0, verifies its DKIM
           signatures and DMARC (dkimpy, authheaders), writes
           ``Authentication-Results:`` and the message to an anonymous file,
           makes that fd 0 and execs ``PYTHON -m eqmail queue`` (eqmail's
           qmail-queue), which reads the envelope from fd 1 as it came.

The DNS questions go to the nameserver of FILE (resolv.conf syntax):
dnspython's default resolver, which pyspf, dkimpy and authheaders use.
"""
import os
import sys

#: qmail-queue exit codes used here
EX_READ = 54        # qq read error
EX_CONFIG = 55      # qq unable to read configuration
EX_EXEC = 120


def _options(argv):
    opts = {"resolv": None, "zone": "bl.bench.test", "db": "grey.sqlite", "delay": 1.0,
            "queue": sys.executable, "authserv": None}
    i = 0
    while i < len(argv):
        key = argv[i][2:] if argv[i].startswith("--") else None
        if key not in opts or i + 1 >= len(argv):
            raise SystemExit("spp_plugins: bad argument %r" % argv[i])
        opts[key] = argv[i + 1]
        i += 2
    opts["delay"] = float(opts["delay"])
    return opts


def _resolver(path):
    import dns.resolver

    if path:
        dns.resolver.default_resolver = dns.resolver.Resolver(filename=path)
        dns.resolver.default_resolver.lifetime = 10.0
    return dns.resolver.default_resolver or dns.resolver.get_default_resolver()


def rbl(opts) -> int:
    ip = os.environ.get("TCPREMOTEIP", "")
    parts = ip.split(".")
    if len(parts) != 4:
        return 0    # IPv6: not looked up here
    import dns.exception
    import dns.resolver

    r = _resolver(opts["resolv"])
    name = ".".join(reversed(parts)) + "." + opts["zone"]
    try:
        r.resolve(name, "A")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return 0    # not listed
    except dns.exception.DNSException:
        return 0    # no answer: let it through, as rblsmtpd does
    text = "listed in %s" % opts["zone"]
    try:
        text = b"".join(r.resolve(name, "TXT")[0].strings).decode("ascii", "replace")
    except dns.exception.DNSException:
        pass
    sys.stdout.write("R554 %s\n" % " ".join(text.split())[:200])
    return 0


def spf(opts) -> int:
    _resolver(opts["resolv"])
    import spf as pyspf

    ip = os.environ.get("TCPREMOTEIP", "")
    helo = os.environ.get("SMTPHELOHOST") or "unknown"
    sender = os.environ.get("SMTPMAILFROM", "")
    q = pyspf.query(ip, sender or "postmaster@" + helo, helo, receiver=opts["authserv"]
                    or os.environ.get("TCPLOCALHOST", "unknown"))
    result, _, _ = q.check()
    header = q.get_header(result)   # the field's value
    if not header.lower().startswith("received-spf:"):
        header = "Received-SPF: " + header
    sys.stdout.write("H%s\nSSPFRESULT=%s\n" % (" ".join(header.split()), result))
    return 0


def grey(opts) -> int:
    import hashlib
    import sqlite3
    import time

    ip = os.environ.get("TCPREMOTEIP", "")
    net = ".".join(ip.split(".")[:3]) if "." in ip else ip
    key = hashlib.blake2b("\0".join((net, os.environ.get("SMTPMAILFROM", ""),
                                     os.environ.get("SMTPRCPTTO", ""))).lower().encode(),
                          digest_size=16).digest()
    db = sqlite3.connect(opts["db"], timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS grey (k BLOB PRIMARY KEY, first REAL, last REAL)")
    now = time.time()
    row = db.execute("SELECT first FROM grey WHERE k = ?", (key,)).fetchone()
    if row is None:
        with db:
            db.execute("INSERT OR IGNORE INTO grey VALUES (?, ?, ?)", (key, now, now))
        sys.stdout.write("E451 4.7.1 greylisted, try again later\n")
    elif now - row[0] < opts["delay"]:
        sys.stdout.write("E451 4.7.1 greylisted, try again later\n")
    else:
        with db:
            db.execute("UPDATE grey SET last = ? WHERE k = ?", (now, key))
    db.close()
    return 0


def _authentication_results(data: bytes, opts) -> str:
    import re

    import authheaders
    import dkim

    sender = os.environ.get("SMTPMAILFROM", "")
    helo = os.environ.get("SMTPHELOHOST") or "unknown"
    results = []
    spf_ar = None
    if os.environ.get("SPFRESULT"):
        spf_ar = authheaders.SPFAuthenticationResult(
            result=os.environ["SPFRESULT"], smtp_mailfrom=sender or None,
            smtp_helo=None if sender else helo)
        results.append(spf_ar)
    head = data.split(b"\n\n", 1)[0]
    dkims = []
    for idx in range(len(re.findall(rb"^dkim-signature:", head, re.I | re.M))):
        d = dkim.DKIM(data)
        try:
            result = "pass" if d.verify(idx=idx) else "fail"
        except Exception:
            result = "permerror"
        fields = getattr(d, "signature_fields", None) or {}
        dkims.append(authheaders.DKIMAuthenticationResult(
            result=result, header_d=fields.get(b"d", b"").decode("ascii", "replace") or None,
            header_s=fields.get(b"s", b"").decode("ascii", "replace") or None))
    if not dkims:
        dkims.append(authheaders.DKIMAuthenticationResult(result="none"))
    results += dkims
    try:
        dmarc = authheaders.check_dmarc(data, spf_ar, dkims[0])
        if dmarc is not None:
            results.append(dmarc)
    except Exception:
        pass
    header = str(authheaders.AuthenticationResultsHeader(
        authserv_id=opts["authserv"] or os.environ.get("TCPLOCALHOST", "localhost"),
        results=results))
    header = " ".join(header.split())
    if not header.lower().startswith("authentication-results:"):
        header = "Authentication-Results: " + header
    return header


def dkim_queue(opts) -> int:
    """QMAILQUEUE: verify, prepend Authentication-Results, exec qmail-queue."""
    chunks = []
    try:
        while True:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return EX_READ
    data = b"".join(chunks)
    try:
        _resolver(opts["resolv"])
        header = _authentication_results(data, opts).encode("utf-8", "replace") + b"\n"
    except Exception as e:  # the libraries missing, a message they choke on: go on
        sys.stderr.write("spp_plugins dkim: %s\n" % e)
        header = b""
    fd = os.memfd_create("message")
    view = memoryview(header + data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    os.dup2(fd, 0)
    os.close(fd)
    try:
        os.execv(opts["queue"], [opts["queue"], "-m", "eqmail", "queue"])
    except OSError:
        return EX_EXEC


MODES = {"rbl": rbl, "spf": spf, "grey": grey, "dkim": dkim_queue}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in MODES:
        sys.stderr.write("usage: spp_plugins.py %s [options]\n" % "|".join(MODES))
        return EX_CONFIG if argv and argv[0] == "dkim" else 2
    return MODES[argv[0]](_options(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
