"""kpr.bpf.progcache: programs a compile loaded are loaded again from the cache, without bcc's
compile, and behave the same (BPF_PROG_TEST_RUN of a real XDP program with a pinned and an
unpinned map, on a private bpffs); anything wrong with an entry falls back to the compile
with one warning line."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from kpr.bpf import maps as M
from kpr.bpf.loader import load_prog
from kpr.bpf.progcache import (
    CACHE_DIR, KEEP, CachedModule, CacheMiss, CompileChild, ProgramCache, has_entry, load_programs,
)
from kpr.testing.bpffs import pin_map
from kpr.testing.progs import bcc_compiles, loaded_named, xlated_by_map_name
from kpr.testing.prog_run import test_run

PROG = "kprt_cache_xdp"
PINNED = "kprt_cache_pinned"
SOURCE = """
BPF_TABLE_PINNED("array", __u32, __u64, kprt_cache_pinned, 4, KPRT_PIN "/kprt_cache_pinned");
BPF_ARRAY(kprt_cache_local, __u64, 4); // not pinned: a load from the cache makes it anew
int kprt_cache_xdp(struct xdp_md *ctx) {
    __u32 k = 0;
    __u64 *v = kprt_cache_pinned.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    __u64 *w = kprt_cache_local.lookup(&k);
    if (w)
        *w += 1;
    return KPRT_VERDICT;
}
"""
PROGRAMS = [(PROG, "XDP", None)]
FRAME = bytes(64)


class Rig:
    def __init__(self, pin: Path, state: Path) -> None:
        self.pin, self.state = pin, state
        self.cache = ProgramCache(state / CACHE_DIR, pin)
        self.held: list[Any] = []
        self.pinned = PINNED  # the file name the counter is pinned under

    def load(self, verdict: int = 2, source: str = SOURCE, programs: list = PROGRAMS, extra: int = 0,
             in_child: bool = False) -> Any:
        module = load_programs(source, programs, cflags=self.flags(verdict, extra),
                               name="<kprt cache>", cache=self.cache, in_child=in_child)
        self.held.append(module)
        return module

    def flags(self, verdict: int = 2, extra: int = 0) -> list[str]:
        return [f'-DKPRT_PIN="{self.pin}"', f"-DKPRT_VERDICT={verdict}", f"-DKPRT_UNUSED={extra}"]

    def has_entry(self) -> bool:
        """progcache.has_entry for load()'s build (its defaults)."""
        return has_entry(SOURCE, PROGRAMS, cflags=self.flags(), name="<kprt cache>", cache=self.cache)

    def entries(self) -> list[Path]:
        return sorted((self.state / CACHE_DIR).glob("*.prog"))

    def counter(self) -> int:
        with M.BpfMap.open_pinned(self.pin / self.pinned) as m:
            return struct.unpack("<Q", m.lookup(struct.pack("<I", 0)))[0]

    def run(self, module: Any, verdict: int = 2) -> None:
        """The program answers `verdict` and counts the frame in the pinned map."""
        before = self.counter()
        fn = load_prog(module, PROG, "XDP")
        assert test_run(fn.fd, FRAME).retval == verdict
        assert self.counter() == before + 1


@pytest.fixture
def rig(kernel_headers: Path, bpffs: Path, tmp_path: Path) -> Iterator[Rig]:
    pin = bpffs / "kpr"
    pin.mkdir()
    r = Rig(pin, tmp_path / "state")
    try:
        yield r
    finally:
        for m in r.held:
            m.cleanup()


def rewrite(path: Path, change: Callable[[dict], None]) -> None:
    """Change an entry's record and sign it again (a valid file of another content)."""
    body = path.read_bytes().partition(b"\n")[2]
    doc = json.loads(body)
    change(doc)
    body = json.dumps(doc).encode()
    path.write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def test_a_second_load_comes_from_the_cache_without_compiling(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with bcc_compiles() as compiles:
        first = rig.load()
    assert compiles == [1] and not isinstance(first, CachedModule)
    assert len(rig.entries()) == 1
    rig.run(first)
    compiled = xlated_by_map_name(load_prog(first, PROG, "XDP").fd)

    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    with bcc_compiles() as compiles:
        second = rig.load()
    assert compiles == [0], "no bcc.BPF constructed"
    assert isinstance(second, CachedModule) and "event=bpf_cache_hit" in caplog.text
    rig.run(second)
    # the same instructions as the kernel holds them, the same pinned map (by id), the
    # unpinned map a new one of the same name
    cached = xlated_by_map_name(load_prog(second, PROG, "XDP").fd)
    assert cached == compiled
    assert M.prog_info(load_prog(second, PROG, "XDP").fd).tag[:] == M.prog_info(load_prog(first, PROG, "XDP").fd).tag[:]


def test_a_map_pinned_under_another_name_than_its_own(rig: Rig) -> None:
    """A table pinned under another file name (as nodeport.h's XDP build pins kpr_np_stats as
    kpr_np_xstats): a cached load counts in that pin, and makes it there after a reboot."""
    rig.pinned = "kprt_other_pin"
    source = SOURCE.replace('KPRT_PIN "/kprt_cache_pinned"', 'KPRT_PIN "/kprt_other_pin"')
    rig.run(rig.load(source=source))
    with bcc_compiles() as compiles:
        module = rig.load(source=source)
    assert compiles == [0] and isinstance(module, CachedModule)
    rig.run(module)
    assert rig.counter() == 2
    (rig.pin / rig.pinned).unlink()
    module = rig.load(source=source)
    assert isinstance(module, CachedModule) and os.listdir(rig.pin) == [rig.pinned]
    rig.run(module)


def test_a_pinned_map_that_is_gone_is_made_as_bcc_would(rig: Rig) -> None:
    rig.load()
    (rig.pin / PINNED).unlink()  # a reboot: bpffs empty, the state directory kept
    with bcc_compiles() as compiles:
        module = rig.load()
    assert compiles == [0] and isinstance(module, CachedModule)
    with M.BpfMap.open_pinned(rig.pin / PINNED) as m:
        info = m.info()
        assert (info.type, info.key_size, info.value_size, info.max_entries) == (M.BPF_MAP_TYPE_ARRAY, 4, 8, 4)
    rig.run(module)


def _truncate(rig: Rig) -> None:
    p = rig.entries()[0]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(rig: Rig) -> None:
    p = rig.entries()[0]
    data = bytearray(p.read_bytes())
    data[-40] ^= 0x01
    p.write_bytes(bytes(data))


def _format(rig: Rig) -> None:
    rewrite(rig.entries()[0], lambda d: d.update(format=0))


def _map_kind(rig: Rig) -> None:
    # the pin is now a hash of the same key and value (bcc's compile takes it as it is)
    (rig.pin / PINNED).unlink()
    pin_map(rig.pin, PINNED, M.MapSpec(PINNED, M.BPF_MAP_TYPE_HASH, 4, 8, 4), {struct.pack("<I", 0): bytes(8)})


def _refused(rig: Rig) -> None:
    exit_only = base64.b64encode(struct.pack("<BBhi", 0x95, 0, 0, 0)).decode()  # r0 never set

    def change(d: dict) -> None:
        d["programs"][0].update(insns=exit_only, maps=[])

    rewrite(rig.entries()[0], change)


def _kernctx(rig: Rig) -> None:
    # a raw kfunc call not followed by ctx/skb.h's load from r0: refused before the kernel sees it
    insns = struct.pack("<BBhi", 0x85, 0x20, 0, 0) + struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    rewrite(rig.entries()[0], lambda d: d["programs"][0].update(insns=base64.b64encode(insns).decode(), maps=[]))


def _gone(rig: Rig) -> None:
    rig.entries()[0].unlink()


def _field_type(rig: Rig) -> None:
    # a valid checksum over fields of another type (the unpinned map's size a string)
    rewrite(rig.entries()[0], lambda d: d["maps"][[m["pin"] for m in d["maps"]].index(None)].update(max_entries="4"))


def _prog_type(rig: Rig) -> None:
    rewrite(rig.entries()[0], lambda d: d["programs"][0].update(prog_type="6"))


def _deep(rig: Rig) -> None:
    body = b"[" * 200_000 + b"]" * 200_000  # JSON nested past Python's recursion limit
    rig.entries()[0].write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def _shared_file(rig: Rig) -> None:
    rig.entries()[0].chmod(0o666)


def _foreign_file(rig: Rig) -> None:
    os.chown(rig.entries()[0], 65534, -1)


@pytest.mark.parametrize(
    "spoil, reason, warned",
    [
        (_truncate, "checksum", True),
        (_flip, "checksum", True),
        (_format, "format 0", True),
        (_map_kind, "pinned as another kind", True),
        (_refused, "the kernel refused", True),
        (_kernctx, "bpf_cast_to_kern_ctx call at 0", True),
        (_gone, "no entry", False),
        (_field_type, "ArgumentError", True),
        (_prog_type, "ArgumentError", True),
        (_deep, "corrupt", True),
        (_shared_file, "untrusted entry (owner 0, mode 666)", True),
        (_foreign_file, "untrusted entry (owner 65534", True),
    ],
    ids=["truncated", "corrupt", "format", "map-kind", "verifier", "kernctx", "missing", "field-type", "prog-type",
         "deep", "entry-writable", "entry-owner"],
)
def test_a_spoilt_entry_falls_back_to_the_compile(
    rig: Rig, caplog: pytest.LogCaptureFixture, spoil: Callable[[Rig], None], reason: str, warned: bool
) -> None:
    first = rig.load()
    first.cleanup()
    rig.held.clear()
    spoil(rig)
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    with bcc_compiles() as compiles:
        module = rig.load()
    assert compiles == [1] and not isinstance(module, CachedModule)
    misses = [r for r in caplog.records if "event=bpf_cache_miss" in r.getMessage()]
    assert len(misses) == 1 and reason in misses[0].getMessage(), caplog.text
    assert misses[0].levelno == (logging.WARNING if warned else logging.INFO)
    if spoil is not _map_kind:  # (the hash pinned instead is counted by the program just the same)
        rig.run(module)
    # the compile stored a good entry again
    with bcc_compiles() as compiles:
        again = rig.load()
    assert compiles == [0] and isinstance(again, CachedModule)


@pytest.mark.parametrize("mode, uid", [(0o777, 0), (0o720, 0), (0o700, 65534)], ids=["writable", "group", "owner"])
def test_a_cache_directory_others_may_write_is_not_read(
    rig: Rig, caplog: pytest.LogCaptureFixture, mode: int, uid: int
) -> None:
    """What an entry holds is loaded into the kernel: a directory someone else could put an
    entry into is not read from (the entry itself is root's, 0600)."""
    rig.load()
    d = rig.state / CACHE_DIR
    d.chmod(mode)
    os.chown(d, uid, -1)
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    with bcc_compiles() as compiles:
        rig.load()
    assert compiles == [1] and "untrusted directory" in caplog.text


def test_a_miss_unpins_the_maps_it_pinned(rig: Rig) -> None:
    """A load that fails after pinning a map it made (the pin gone after a reboot, then the
    verifier refusing the program) takes the pin away again: the compile makes its own."""
    rig.load()
    (rig.pin / PINNED).unlink()
    _refused(rig)
    with pytest.raises(CacheMiss, match="the kernel refused"):
        rig.cache.load(rig.entries()[0].stem, "<kprt cache>")
    assert not (rig.pin / PINNED).exists()


def test_a_changed_flag_or_text_is_another_build(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.load(verdict=2)
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    with bcc_compiles() as compiles:
        other = rig.load(verdict=1)
        changed = rig.load(source=SOURCE.replace("*w += 1", "*w += 2"))
    assert compiles == [2] and not isinstance(other, CachedModule) and not isinstance(changed, CachedModule)
    assert caplog.text.count("event=bpf_cache_miss") == 2 and "no entry" in caplog.text
    rig.run(other, verdict=1)
    assert len(rig.entries()) == 3
    with bcc_compiles() as compiles:
        again = rig.load(verdict=2)
    assert compiles == [0] and isinstance(again, CachedModule)


def test_only_the_most_recent_entries_are_kept(rig: Rig) -> None:
    for extra in range(KEEP + 2):
        rig.load(extra=extra)
    assert len(rig.entries()) == KEEP
    with bcc_compiles() as compiles:
        rig.load(extra=KEEP + 1)  # the newest kept
        rig.load(extra=0)  # the oldest not
    assert compiles == [1]


def test_a_ring_buffer_is_made_anew(rig: Rig) -> None:
    """kpr monitor's ring is pinned; after a reboot a start from the cache makes it, as bcc would."""
    source = SOURCE.replace("int kprt_cache_xdp", "BPF_RINGBUF_OUTPUT(kprt_cache_ring, 1);\nint kprt_cache_xdp").replace(
        "return KPRT_VERDICT;", "kprt_cache_ring.ringbuf_output(&k, sizeof(k), 0);\n    return KPRT_VERDICT;")
    rig.load(source=source)
    with bcc_compiles() as compiles:
        module = rig.load(source=source)
    assert compiles == [0] and isinstance(module, CachedModule)
    rig.run(module)


def test_a_build_with_an_unpinned_map_it_cannot_make_is_not_stored(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    source = SOURCE.replace("BPF_ARRAY(kprt_cache_local, __u64, 4);", "BPF_PROG_ARRAY(kprt_cache_local, 4);").replace(
        "__u64 *w = kprt_cache_local.lookup(&k);\n    if (w)\n        *w += 1;", "kprt_cache_local.call(ctx, 0);")
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    rig.load(source=source)
    assert "event=bpf_cache_not_stored" in caplog.text and "kprt_cache_local" in caplog.text
    assert rig.entries() == []
    with bcc_compiles() as compiles:
        rig.load(source=source)
    assert compiles == [1]


def test_state_directory_on_bpffs_leaves_nothing(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A cache that cannot be written (the harness's default state directory is the pin
    directory, a bpffs) costs the next start a compile and leaves no directory behind."""
    rig.cache = ProgramCache(rig.pin / CACHE_DIR, rig.pin)
    module = rig.load()
    assert not isinstance(module, CachedModule) and "event=bpf_cache_not_stored" in caplog.text
    assert not (rig.pin / CACHE_DIR).exists()
    assert os.listdir(rig.pin) == [PINNED]


def test_a_refused_program_leaves_none_of_the_entry_loaded(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The entry's first program loads, its second is refused: the first is closed again before
    the compile, so the only copy loaded afterwards is the compile's."""
    one = f"kprt_c{os.getpid() % 10**9}"  # this run's: a parallel run loads programs of its own
    source = SOURCE.replace(PROG, one) + "int kprt_cache_two(struct xdp_md *ctx) { return XDP_PASS; }\n"
    programs = [(one, "XDP", None), ("kprt_cache_two", "XDP", None)]
    rig.load(source=source, programs=programs).cleanup()
    rig.held.clear()
    assert loaded_named(one) == []
    exit_only = base64.b64encode(struct.pack("<BBhi", 0x95, 0, 0, 0)).decode()
    rewrite(rig.entries()[0], lambda d: d["programs"][1].update(insns=exit_only, maps=[]))
    with bcc_compiles() as compiles:
        module = rig.load(source=source, programs=programs)
    assert compiles == [1] and "the kernel refused kprt_cache_two" in caplog.text
    assert loaded_named(one) == [M.prog_info(load_prog(module, one, "XDP").fd).id]


def test_in_child_the_compile_runs_in_a_process_of_its_own(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """in_child: bcc compiles in kpr.bpf.compile_child, which writes the entry; this process
    loads it (no bcc.BPF here, so no clang or LLVM in the agent), marked compiled, and the
    program is the one an in-process compile loads."""
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    with bcc_compiles() as compiles:
        module = rig.load(in_child=True)
    assert compiles == [0], "no bcc.BPF constructed in this process"
    assert isinstance(module, CachedModule) and module.compiled and "event=bpf_compiled_in_child" in caplog.text
    assert len(rig.entries()) == 1
    rig.run(module)
    child = xlated_by_map_name(load_prog(module, PROG, "XDP").fd)
    module.cleanup()
    rig.held.clear()
    for entry in rig.entries():
        entry.unlink()
    with bcc_compiles() as compiles:
        here = rig.load()
    assert compiles == [1] and not isinstance(here, CachedModule)
    assert xlated_by_map_name(load_prog(here, PROG, "XDP").fd) == child
    with bcc_compiles() as compiles:
        again = rig.load(in_child=True)
    assert compiles == [0] and isinstance(again, CachedModule) and not again.compiled, "an entry: a plain hit"


def test_in_child_errors_are_the_compile_s_own(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A source that does not compile: the child fails, the compile here raises CompileError
    as it always did. A program the verifier refuses: the child's entry loads nothing, is
    removed, and the compile here raises the verifier's error."""
    from kpr.bpf.loader import CompileError, VerifierError

    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    with pytest.raises(CompileError), bcc_compiles() as compiles:
        rig.load(source=SOURCE + "int broken(void) { return nope; }\n", in_child=True)
    assert compiles == [1] and "event=bpf_child_compile_failed" in caplog.text
    assert rig.entries() == []
    refused = SOURCE.replace("return KPRT_VERDICT;", "return *(int *)(long)ctx->data;")  # unchecked packet read
    with pytest.raises(VerifierError), bcc_compiles() as compiles:
        rig.load(source=refused, in_child=True)
    assert compiles == [1] and "event=bpf_child_compile_unusable" in caplog.text
    assert rig.entries() == [], "the entry the verifier refused is not left for the next start"


def test_a_compile_child_started_ahead_is_used_or_ended(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A CompileChild started before the compile serves it (its process has ended after);
    one that is not needed (the entry is there) is ended by close()."""
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    child = CompileChild()
    proc = child.proc
    assert proc is not None and proc.poll() is None, "waiting for its request"
    with bcc_compiles() as compiles:
        module = rig.load(in_child=child)
    assert compiles == [0] and isinstance(module, CachedModule) and module.compiled
    assert "started_ahead=yes" in caplog.text and child.used and proc.poll() == 0
    rig.run(module)
    unused = CompileChild()
    proc = unused.proc
    assert rig.load(in_child=unused).compiled is False, "a plain hit: the child not asked"
    assert proc is not None and proc.poll() is None
    unused.close()
    assert proc.poll() is not None and unused.proc is None


@pytest.mark.parametrize("mode, uid, trusted", [
    (0o777, 0, False), (0o1777, 0, True), (0o775, 0, False), (0o755, 65534, False), (0o755, os.geteuid(), True),
], ids=["writable", "sticky", "group-writable", "owner", "mine"])
def test_a_cache_under_a_directory_others_may_change_is_not_read(
    rig: Rig, caplog: pytest.LogCaptureFixture, mode: int, uid: int, trusted: bool
) -> None:
    """Someone who may write a directory above the cache's (no sticky bit; by its group too, even
    root's group, as here), or owns it, may move the cache directory aside and put one of their
    own in its place: not read from then (the cache's own directory and file being root's, 0700
    and 0600, is not enough), nor counted by has_entry (the NodePort build's choice)."""
    rig.load()
    assert rig.has_entry()
    above = rig.state  # the cache's parent, agent.stateDir
    above.chmod(mode)
    os.chown(above, uid, 0)
    assert rig.has_entry() is trusted
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    with bcc_compiles() as compiles:
        rig.load()
    if trusted:
        assert compiles == [0] and "untrusted" not in caplog.text
    else:
        assert compiles == [1] and f"untrusted ancestor {above} (owner {uid}" in caplog.text, caplog.text
