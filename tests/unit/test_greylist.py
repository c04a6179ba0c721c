"""eqmail.smtp.greylist: the triplet's life, allow-lists, a damaged store."""
from __future__ import annotations

import os

from eqmail.smtp import greylist


class Conf:
    def __init__(self, home, **kw):
        self.home = home
        self.greydelay, self.greywindow, self.greylifetime = 300, 7200, 86400
        self.greyallow = ()
        self.__dict__.update(kw)

    def path(self, *parts):
        return os.path.join(self.home, *parts)


def conf(tmp_path, **kw):
    os.makedirs(tmp_path / "queue" / "lock", exist_ok=True)
    return Conf(str(tmp_path), **kw)


def test_a_triplet_passes_after_the_delay_and_is_remembered(tmp_path):
    c = conf(tmp_path)
    t = 1_000_000.0
    assert greylist.check(c, "192.0.2.7", "a@x.org", "b@y.org", now=t) == 300
    assert greylist.check(c, "192.0.2.7", "a@x.org", "b@y.org", now=t + 100) == 201
    # the same /24, sender case ignored: the same triplet
    assert greylist.check(c, "192.0.2.99", "A@X.org", "b@y.org", now=t + 301) is None
    assert greylist.check(c, "192.0.2.7", "a@x.org", "b@y.org", now=t + 5000) is None
    # another recipient, another network: new triplets
    assert greylist.check(c, "192.0.2.7", "a@x.org", "c@y.org", now=t + 5000) == 300
    assert greylist.check(c, "198.51.100.7", "a@x.org", "b@y.org", now=t + 5000) == 300
    # unused for longer than the lifetime: forgotten
    assert greylist.check(c, "192.0.2.7", "a@x.org", "b@y.org", now=t + 5000 + 90000) == 300


def test_a_retry_after_the_window_starts_over(tmp_path):
    c = conf(tmp_path)
    t = 2_000_000.0
    assert greylist.check(c, "2001:db8::1", "", "b@y.org", now=t) == 300
    assert greylist.check(c, "2001:db8::ffff", "", "b@y.org", now=t + 8000) == 300  # /64


def test_allow_lists(tmp_path):
    c = conf(tmp_path, greyallow=("192.0.2.0/24", "10.", "example.org", ".example.net",
                                  "2001:db8::/32"))
    assert greylist.allowed(c, "192.0.2.200", "x@z.org")
    assert greylist.allowed(c, "10.1.2.3", "x@z.org")
    assert greylist.allowed(c, "2001:db8::5", "x@z.org")
    assert greylist.allowed(c, "198.51.100.1", "x@example.org")
    assert greylist.allowed(c, "198.51.100.1", "x@mail.example.net")
    assert not greylist.allowed(c, "198.51.100.1", "x@example.net.evil")
    assert not greylist.allowed(c, "198.51.100.1", "x@notexample.org")


def test_a_damaged_store_lets_mail_through_and_is_made_again(tmp_path, caplog):
    c = conf(tmp_path)
    path = c.path("queue", "lock", "greylist.sqlite")
    greylist._db.update(conn=None, path=None, told=False)
    with open(path, "wb") as f:
        f.write(b"this is not a database" * 100)
    assert greylist.check(c, "192.0.2.7", "a@x.org", "b@y.org", now=1.0) is None
    # made anew: greylisting works again
    assert greylist.check(c, "192.0.2.7", "a@x.org", "b@y.org", now=2.0) == 300


def test_a_store_on_a_full_disk_lets_mail_through_with_an_alert(tmp_path, capfd):
    import subprocess

    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    try:
        c = conf(mnt)
        greylist._db.update(conn=None, path=None, told=False)
        assert greylist.check(c, "192.0.2.7", "a@x.org", "b@y.org", now=1.0) == 300
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)  # the disk fills up
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        for i in range(300):  # new triplets: each would need room
            assert greylist.check(c, "198.51.%d.1" % (i % 250), "a%d@x.org" % i, "b@y.org",
                                  now=2.0) in (None, 300)
            if greylist._db["told"]:
                break
        assert greylist._db["told"], "the full disk was never noticed"
        assert "mail is let through" in capfd.readouterr().err
        # a triplet that would be greylisted now passes: fail open
        assert greylist.check(c, "203.0.113.9", "new@x.org", "b@y.org", now=3.0) is None
        os.unlink(mnt / "filler")  # room again: greylisting works again
        assert greylist.check(c, "203.0.113.10", "new@x.org", "b@y.org", now=4.0) == 300
    finally:
        greylist._db.update(conn=None, path=None, told=False)
        subprocess.run(["umount", "-l", str(mnt)], timeout=30)
