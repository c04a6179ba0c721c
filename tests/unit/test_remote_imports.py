"""Remote delivery's DNS imports stay small (issue 7: memory after a remote
delivery).  dnspython's optional-feature probe would import
importlib.metadata, email and zipfile; eqmail keeps it out
(eqmail.delivery.remote._without_feature_probe)."""
from __future__ import annotations

import subprocess
import sys

PROGRAM = r"""
import sys
import threading, time
from eqmail.delivery import remote
# the path a delivery takes; nothing answers, so it waits in the background
threading.Thread(target=remote.addresses, args=("mx.example.invalid",), daemon=True).start()
deadline = time.time() + 20
while not remote._resolvers and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.3)
import dns.name, dns.resolver
loaded = sorted(m for m in ("importlib.metadata", "email.message", "zipfile")
                if m in sys.modules)
print("loaded:", loaded)
print(dns.name.from_text("b\u00fccher.example").to_text())
import dns._features
print("have:", dns._features.have("dnssec"), dns._features.have("doh"))
dns._features.force("dnssec", True)
print("forced:", dns._features.have("dnssec"))
"""


def test_dns_loads_without_importlib_metadata(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, timeout=60,
                         env={"EQMAIL_RESOLV_CONF": str(conf), "PATH": "/usr/bin:/bin"},
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr.decode()
    lines = out.stdout.decode().splitlines()
    assert lines[0] == "loaded: []"
    assert lines[1] == "xn--bcher-kva.example."  # U-labels still go out as A-labels
    assert lines[2] == "have: False False"
    assert lines[3] == "forced: True"
