"""kpr.bpf.builds: which build a pinned link runs, so that a restart adopts it without compiling.
A real program at a real cgroup hook (a child cgroup, a private bpffs): adopted only when its
recorded build is one of the candidates, its name is the one asked for, and the maps it uses
are still the pinned ones."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.bpf import builds, links
from kpr.bpf import maps as M
from kpr.bpf.loader import attach_type_value, compile_and_load, load_prog
from kpr.testing.bpffs import pin_map

PROG = "kprt_connect"
SOURCE = """
BPF_TABLE_PINNED("hash", __u32, __u32, kprt_map, 16, KPRT_PIN "/kprt_map");
int kprt_connect(struct bpf_sock_addr *ctx) {
    __u32 k = KPRT_KEY;
    kprt_map.lookup(&k);
    return 1;
}
"""


def flags(pin: Path, key: int = 1) -> list[str]:
    return [f'-DKPRT_PIN="{pin}"', f"-DKPRT_KEY={key}"]


@pytest.fixture
def rig(kernel_headers: Path, bpffs: Path, cgroup: Path) -> Iterator[tuple[Path, int]]:
    """A private bpffs directory and a child cgroup's fd; links released afterwards."""
    pin = bpffs / "kpr"
    pin.mkdir()
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield pin, fd
    finally:
        links.sweep(pin / links.LINKS_DIR, lambda _p, _li: False)
        os.close(fd)


@contextlib.contextmanager
def attached(pin: Path, cg_fd: int, key: int = 1) -> Iterator[tuple[int, bytes]]:
    """Compile, load and put the program at the cgroup's connect hook through the pinned link;
    yields (program id, digest)."""
    bpf = compile_and_load(SOURCE, cflags=flags(pin, key), name="<kprt>")
    try:
        fn = load_prog(bpf, PROG, "CGROUP_SOCK_ADDR", attach_type="CGROUP_INET4_CONNECT")
        hook = links.Hook.cgroup(cg_fd, attach_type_value("CGROUP_INET4_CONNECT"))
        lfd, _action, li = links.ensure(link_pin(pin), fn.fd, hook)
        os.close(lfd)
        yield li.prog_id, builds.digest(SOURCE, flags(pin, key))
    finally:
        bpf.cleanup()


def link_pin(pin: Path) -> Path:
    return pin / links.LINKS_DIR / "kprt" / "connect"


def adopted_id(pin: Path, candidates: list[bytes], name: str = PROG) -> int | None:
    found = builds.adopt(pin, candidates, {name: link_pin(pin)})
    if found is None:
        return None
    progs = found[1]
    for p in progs.values():
        p.close()
    return progs[name].id


def test_digest_covers_text_and_flags() -> None:
    d = builds.digest("int x;", ["-DA=1"])
    assert d == builds.digest("int x;", ["-DA=1"])
    assert d != builds.digest("int x; ", ["-DA=1"])
    assert d != builds.digest("int x;", ["-DA=2"])
    assert d != builds.digest("int x;", ["-DA=1", ""]), "flags are not just concatenated"


def test_adopts_only_a_recorded_build_among_the_candidates(rig: tuple[Path, int]) -> None:
    pin, cg_fd = rig
    with attached(pin, cg_fd) as (prog_id, digest):
        assert adopted_id(pin, [digest]) is None, "nothing recorded yet: compile"
        builds.record(pin, digest, [prog_id])
        assert builds.recorded(pin, prog_id) == digest
        assert adopted_id(pin, [digest]) == prog_id
        other = builds.digest(SOURCE, flags(pin, key=2))
        assert adopted_id(pin, [other]) is None, "another build: compile"
        assert adopted_id(pin, [other, digest]) == prog_id, "either candidate"
        assert adopted_id(pin, [digest], name="kprt_other") is None, "another program at the link"
        assert adopted_id(pin, [digest]) == prog_id
    # the program stays at its hook through the link after the module is gone
    assert links.query(cg_fd, attach_type_value("CGROUP_INET4_CONNECT")) == [prog_id]


def test_a_map_pinned_anew_is_not_the_programs_any_more(rig: tuple[Path, int]) -> None:
    pin, cg_fd = rig
    with attached(pin, cg_fd) as (prog_id, digest):
        builds.record(pin, digest, [prog_id])
        assert adopted_id(pin, [digest]) == prog_id
        (pin / "kprt_map").unlink()
        pin_map(pin, "kprt_map", M.MapSpec("kprt_map", M.BPF_MAP_TYPE_HASH, 4, 4, 16))
        assert adopted_id(pin, [digest]) is None, "its map is no longer the pinned one: compile"


def test_records_of_gone_programs_are_dropped(rig: tuple[Path, int]) -> None:
    pin, cg_fd = rig
    bpf = compile_and_load(SOURCE, cflags=flags(pin, key=3), name="<kprt>")
    fn = load_prog(bpf, PROG, "CGROUP_SOCK_ADDR", attach_type="CGROUP_INET4_CONNECT")
    gone = M.prog_info(fn.fd).id
    builds.record(pin, b"\x01" * 32, [gone])
    assert builds.recorded(pin, gone) == b"\x01" * 32
    bpf.cleanup()  # nothing else holds it: the program goes
    with attached(pin, cg_fd) as (prog_id, digest):
        builds.record(pin, digest, [prog_id])
        assert builds.recorded(pin, gone) is None
        assert builds.recorded(pin, prog_id) == digest
