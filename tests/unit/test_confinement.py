"""delivery.local.outside_home(): dot-qmail file lines of deliveries that
run with eqmaild's own uid must not lead out of the home, by ../, an
absolute path or a symbolic link anywhere below the home (including a
Maildir's tmp/ and new/)."""
import os

import pytest

from eqmail.delivery.local import outside_home


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    for d in ("Maildir/tmp", "Maildir/new", "Maildir/cur"):
        (h / d).mkdir(parents=True)
    (tmp_path / "elsewhere" / "tmp").mkdir(parents=True)
    (tmp_path / "elsewhere" / "new").mkdir()
    return h


def test_plain_maildir_is_inside(home):
    assert not outside_home("./Maildir/", str(home), True, ("tmp", "new"))


def test_home_reached_through_a_symlink_is_still_inside(home, tmp_path):
    link = tmp_path / "homelink"
    link.symlink_to(home)
    assert not outside_home("./Maildir/", str(link), True, ("tmp", "new"))
    assert not outside_home(str(home / "Maildir") + "/", str(link), True, ("tmp", "new"))


@pytest.mark.parametrize("sub", ["tmp", "new"])
def test_symlinked_tmp_or_new_leads_out(home, tmp_path, sub):
    os.rmdir(str(home / "Maildir" / sub))
    (home / "Maildir" / sub).symlink_to(tmp_path / "elsewhere" / sub)
    assert outside_home("./Maildir/", str(home), True, ("tmp", "new"))
    assert not outside_home("./Maildir/", str(home), False, ("tmp", "new"))


def test_symlinked_maildir_leads_out_but_one_inside_is_fine(home, tmp_path):
    (home / "out").symlink_to(tmp_path / "elsewhere")
    assert outside_home("./out/", str(home), True, ("tmp", "new"))
    (home / "in").symlink_to(home / "Maildir")
    assert not outside_home("./in/", str(home), True, ("tmp", "new"))


def test_symlink_in_the_middle_of_an_mbox_path(home, tmp_path):
    (home / "dir").symlink_to(tmp_path / "elsewhere")
    assert outside_home("./dir/mbox", str(home), True)
    assert not outside_home("./Maildir/mbox", str(home), True)


def test_climbing_out_and_absolute_paths(home, tmp_path):
    assert outside_home("./../elsewhere/", str(home), False)
    assert outside_home(str(tmp_path / "elsewhere") + "/", str(home), True)
    assert not outside_home(str(tmp_path / "elsewhere") + "/", str(home), False)


def test_missing_maildir_is_judged_by_its_name(home):
    assert not outside_home("./NoSuch/", str(home), True, ("tmp", "new"))
