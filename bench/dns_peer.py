"""A tiny authoritative DNS responder for the benchmark (UDP only).

    python bench/dns_peer.py ADDRESS NAME IPV4

Answers A queries for NAME with IPV4, NODATA for its other types, NXDOMAIN
(authoritative) for anything else, on ADDRESS:53 (root: port 53, because
resolv.conf cannot name a port).  bench/run.py points eqmaild at it with
EQMAIL_RESOLV_CONF so that one remote delivery goes through eqmail's DNS
code (dnspython) and the "idle after a remote delivery" memory figure
includes it.  Prints "ready" once bound; stops on SIGTERM.

It counts the questions it gets: on SIGUSR1 it prints one JSON line, the
totals so far by query type and by the last three labels of the name
(``{"queries": N, "types": {...}, "suffixes": {...}}``), so that the
defences part can show that each configuration really asked (postscreen's
DNSBL look-ups, the plugins' own).
"""
import json
import signal
import socket
import sys

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def main() -> int:
    address, name, ipv4 = sys.argv[1], dns.name.from_text(sys.argv[2]), sys.argv[3]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))
    counts = {"queries": 0, "types": {}, "suffixes": {}}

    def report(*_):
        print(json.dumps(counts, sort_keys=True), flush=True)

    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    signal.signal(signal.SIGUSR1, report)
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            q = query.question[0]
            counts["queries"] += 1
            kind = dns.rdatatype.to_text(q.rdtype)
            counts["types"][kind] = counts["types"].get(kind, 0) + 1
            suffix = ".".join(l.decode("ascii", "replace") for l in q.name.labels[-4:-1]).lower()
            counts["suffixes"][suffix] = counts["suffixes"].get(suffix, 0) + 1
            if q.name == name:
                if q.rdtype == dns.rdatatype.A:
                    reply.answer.append(dns.rrset.from_text(
                        q.name, 60, dns.rdataclass.IN, dns.rdatatype.A, ipv4))
            else:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(reply.to_wire(), peer)
        except Exception as e:  # a malformed query: ignore it
            print("dns_peer: %s" % e, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
