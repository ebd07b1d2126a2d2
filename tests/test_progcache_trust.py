"""The program cache's trust check walks the fds the open goes through (kpr.bpf.progcache
_open_trusted_dir): from / down, each directory opened in the one above and checked by fstat.
A symbolic link kept in a directory another user may change is refused even when it points
into trusted directories (a check of the resolved path's parents let it through: that user
could point the link elsewhere between the check and the open); a link in trusted directories
is followed; the refusal names the directory."""

from __future__ import annotations

import os

import pytest

from kpr.bpf import progcache
from kpr.bpf.progcache import CacheMiss, ProgramCache

KEY = "0" * 40


def _cache(directory) -> ProgramCache:
    c = ProgramCache(directory, "/sys/fs/bpf/unused")
    c.write(KEY, b"entry")
    return c


def test_an_entry_in_trusted_directories_is_read(tmp_path):
    c = _cache(tmp_path / "state" / "progcache")
    assert c.has(KEY) and c.has_entries()


def test_a_link_in_a_directory_others_may_change_is_refused(tmp_path):
    real = tmp_path / "real"
    _cache(real / "progcache")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone may replace the link
    (shared / "state").symlink_to(real)
    c = ProgramCache(shared / "state" / "progcache", "/sys/fs/bpf/unused")
    assert not c.has(KEY) and not c.has_entries()
    with pytest.raises(CacheMiss, match=f"untrusted ancestor {shared} \\(owner 0, mode 777\\)"):
        c._read_trusted(c.path(KEY).name)


def test_a_link_in_trusted_directories_is_followed(tmp_path):
    real = tmp_path / "real"
    _cache(real / "progcache")
    (tmp_path / "state").symlink_to("real")  # relative, as /var/run -> ../run
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "back").symlink_to("../real/progcache")
    for d in (tmp_path / "state" / "progcache", tmp_path / "up" / "back"):
        c = ProgramCache(d, "/sys/fs/bpf/unused")
        assert c.has(KEY) and c.has_entries(), d
        assert c._read_trusted(c.path(KEY).name) == b"entry"


def test_a_link_into_a_directory_others_may_change_is_refused(tmp_path):
    shared = tmp_path / "shared"
    _cache(shared / "progcache")
    shared.chmod(0o775)
    (tmp_path / "state").symlink_to(shared)
    c = ProgramCache(tmp_path / "state" / "progcache", "/sys/fs/bpf/unused")
    with pytest.raises(CacheMiss, match=f"untrusted ancestor {shared} \\(owner 0, mode 775\\)"):
        c._read_trusted(c.path(KEY).name)


def test_a_link_loop_or_a_file_on_the_way_is_an_error_not_a_crash(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    (tmp_path / "f").write_text("")
    for d in (tmp_path / "a" / "progcache", tmp_path / "f" / "progcache", tmp_path / "missing"):
        c = ProgramCache(d, "/sys/fs/bpf/unused")
        assert not c.has(KEY) and not c.has_entries()
        with pytest.raises(CacheMiss):
            c.read(KEY)


def test_the_checks_see_the_directories_opened(tmp_path, monkeypatch):
    """Every directory the walk checks is one it opened (an fd), none by its path."""
    _cache(tmp_path / "state" / "progcache")
    checked_by_path = []
    real_stat = os.stat
    monkeypatch.setattr(progcache.os, "stat", lambda p, *a, **k: checked_by_path.append(p) or real_stat(p, *a, **k))
    assert ProgramCache(tmp_path / "state" / "progcache", "/sys/fs/bpf/unused").has(KEY)
    assert checked_by_path == []


def test_a_link_another_user_made_in_a_sticky_directory_is_refused(tmp_path):
    """A sticky directory anyone may write to (/tmp) keeps others from replacing a link, not
    from making one: the kernel follows another user's link there only for that user or the
    directory's owner (fs.protected_symlinks). The walk follows links itself, so it checks
    the same: root's, this user's or the directory owner's link is followed, another's not."""
    if os.geteuid() == 1000:
        pytest.skip("the other user is uid 1000")
    real = tmp_path / "real"
    _cache(real / "progcache")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    link = sticky / "state"
    link.symlink_to(real)
    c = ProgramCache(link / "progcache", "/sys/fs/bpf/unused")
    assert c.has(KEY), "this user's link is followed"
    os.lchown(link, 1000, 1000)
    assert not c.has(KEY) and not c.has_entries()
    with pytest.raises(CacheMiss, match=f"untrusted link {link} \\(owner 1000, in a sticky directory others may write to\\)"):
        c._read_trusted(c.path(KEY).name)
    sticky.chmod(0o1755)  # only its owner writes there: the link stays the owner's to change
    assert c.has(KEY)
