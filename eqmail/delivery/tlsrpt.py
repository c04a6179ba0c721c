"""delivery.tlsrpt -- SMTP TLS Reporting (RFC 8460): counting and reports.

SUMMARY
    Remote delivery calls `record()` for every TLS session it makes to an
    MX host under an MTA-STS or DANE policy: one JSON line appended to
    ``queue/tlsrpt/YYYY-MM-DD`` (UTC), nothing kept in memory.  `report()`
    (``eqmail tlsrpt``) turns one day's lines into one RFC 8460 report a
    policy domain (``queue/tlsrpt/reports/DAY/DOMAIN.json``), and with
    `send` mails each to the ``mailto:`` addresses of the domain's
    ``_smtp._tls`` TXT record as RFC 8460 section 5.3 says (a
    multipart/report of report-type tlsrpt with the gzip'd JSON).  Day
    files older than KEEP_DAYS are removed.

STANDARDS
    RFC 8460 sections 3 (the TXT record), 4 (the report format), 5.3
    (delivery by mail); RFC 8461 and RFC 7672 (the policies reported on).
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

#: Days of session lines kept.
KEEP_DAYS = 7

#: RFC 8460 section 4.3 result types eqmail reports.
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
HOST_MISMATCH = "certificate-host-mismatch"
EXPIRED = "certificate-expired"
NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"


def result_of(error: BaseException) -> str:
    """The RFC 8460 result type of a failed TLS handshake."""
    code = getattr(error, "verify_code", None)
    if code == 62:      # X509_V_ERR_HOSTNAME_MISMATCH
        return HOST_MISMATCH
    if code == 10:      # X509_V_ERR_CERT_HAS_EXPIRED
        return EXPIRED
    if code in (18, 19, 20, 21, 2, 27):  # self-signed, unknown issuer, untrusted
        return NOT_TRUSTED
    return VALIDATION_FAILURE


def _day(when: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(when))


def record(config, domain: str, ptype: str, strings: Sequence[str], mx: str, ip: str,
           result: Optional[str] = None) -> None:
    """Append one session: `domain` (the policy domain), `ptype` "sts" or
    "tlsa", the policy `strings`, the MX host and address, `result` None
    for a success, else an RFC 8460 result type.  Never raises."""
    now = time.time()
    line = json.dumps({"d": domain, "p": ptype, "s": list(strings), "mx": mx, "ip": ip,
                       "r": result}, sort_keys=True) + "\n"
    d = config.path("queue", "tlsrpt")
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(d, _day(now)), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                     0o600)
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError:
        pass  # a report is worth less than the delivery


def build(config, day: str) -> Dict[str, dict]:
    """{policy domain: its RFC 8460 report} from the session lines of
    `day` (YYYY-MM-DD, UTC).  Raises OSError when they cannot be read."""
    path = config.path("queue", "tlsrpt", day)
    groups: Dict[Tuple[str, str, Tuple[str, ...]], dict] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
                key = (str(rec["d"]), str(rec["p"]), tuple(str(s) for s in rec["s"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
            g = groups.setdefault(key, {"ok": 0, "fail": 0, "details": {}, "mx": set()})
            g["mx"].add(str(rec.get("mx") or ""))
            if rec.get("r") is None:
                g["ok"] += 1
            else:
                g["fail"] += 1
                dkey = (str(rec["r"]), str(rec.get("ip") or ""), str(rec.get("mx") or ""))
                g["details"][dkey] = g["details"].get(dkey, 0) + 1
    out: Dict[str, dict] = {}
    for (domain, ptype, strings), g in sorted(groups.items()):
        report = out.get(domain)
        if report is None:
            report = out[domain] = {
                "organization-name": config.me,
                "date-range": {"start-datetime": day + "T00:00:00Z",
                               "end-datetime": day + "T23:59:59Z"},
                "contact-info": "postmaster@%s" % config.me,
                "report-id": "%sT00:00:00Z_%s@%s" % (day, domain, config.me),
                "policies": []}
        policy = {"policy-type": ptype, "policy-string": list(strings),
                  "policy-domain": domain}
        if ptype == "sts":
            policy["mx-host"] = sorted(m for m in g["mx"] if m)
        report["policies"].append({
            "policy": policy,
            "summary": {"total-successful-session-count": g["ok"],
                        "total-failure-session-count": g["fail"]},
            "failure-details": [
                {"result-type": r, "sending-mta-ip": ip, "receiving-mx-hostname": mx,
                 "failed-session-count": n}
                for (r, ip, mx), n in sorted(g["details"].items())]})
    return out


def rua(domain: str) -> List[str]:
    """The mailto: addresses of ``_smtp._tls.DOMAIN`` (RFC 8460 section 3);
    [] without a record (or with https: ones only)."""
    from .remote import PermError, TempError, _query

    try:
        answers = _query("_smtp._tls." + domain, "TXT")
    except (PermError, TempError):
        return []
    out = []
    for r in answers:
        text = b"".join(r.strings).decode("ascii", "replace")
        if not text.startswith("v=TLSRPTv1"):
            continue
        for part in text.split(";"):
            key, _, value = part.strip().partition("=")
            if key == "rua":
                for uri in value.split(","):
                    uri = uri.strip()
                    if uri.lower().startswith("mailto:") and "@" in uri:
                        out.append(uri[7:].split("?")[0])
    return out


def message(config, domain: str, report: dict, to: Sequence[str]) -> bytes:
    """The report as mail (RFC 8460 section 5.3): multipart/report,
    report-type tlsrpt, the JSON gzip'd as application/tlsrpt+gzip."""
    import gzip
    from email.mime.application import MIMEApplication
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText
    from email.utils import formatdate, make_msgid

    day = report["date-range"]["start-datetime"][:10]
    msg = MIMEMultipart("report", report_type="tlsrpt")
    msg["From"] = "postmaster@%s" % config.me
    msg["To"] = ", ".join(to)
    msg["Subject"] = "Report Domain: %s Submitter: %s Report-ID: <%s>" % (
        domain, config.me, report["report-id"])
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = config.me
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=config.me)
    msg.attach(MIMEText("This is an aggregate TLS report from %s.\n" % config.me))
    part = MIMEApplication(gzip.compress(json.dumps(report, indent=1).encode()),
                           "tlsrpt+gzip")
    part.add_header("Content-Disposition", "attachment",
                    filename="%s!%s!%s.json.gz" % (config.me, domain, day))
    msg.attach(part)
    return msg.as_bytes()


def prune(config, now: Optional[float] = None) -> None:
    """Remove session lines older than KEEP_DAYS."""
    d = config.path("queue", "tlsrpt")
    oldest = _day((now or time.time()) - KEEP_DAYS * 86400)
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        if len(name) == 10 and name < oldest:
            try:
                os.unlink(os.path.join(d, name))
            except OSError:
                pass
