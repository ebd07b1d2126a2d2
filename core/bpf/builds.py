"""Which build a pinned link runs, so that a restarting agent adopts it without compiling.

Compiling a plugin's programs with bcc (clang and LLVM in the agent's process) costs 1.5 to 3 s
of one CPU, the bulk of an agent's start. A restart that would load the very programs the
pinned links already run gains nothing from it: the links keep them, and the agent only needs
handles on the pinned maps. So every program kpr attaches through a link is recorded with the
digest of its build, and a starting agent first asks `adopt()` whether every link it wants
already holds a program of the build it would make; only when one does not (the code, a
compile flag, the kernel or bcc changed; a link or record is missing) does it compile, and the
links are then switched to the new programs atomically (kpr.bpf.links.ensure).

The digest (`digest()`) is sha256 over the program text as compiled (kpr's headers are pasted
into it), the compile flags, the kernel release (whose headers the compile includes) and
bcc's version. Records live in the pinned hash map `<bpf.pinPath>/kpr_builds`: program id ->
digest. Program ids are never reused while the machine runs, and a record whose program is
gone is dropped on the next `record()`; `kpr cleanup` removes the map with every other pin.

Adoption also checks that every map the program uses and that has a pin of its own name under
bpf.pinPath is that pinned map (a map re-created behind the program's back would leave the
agent writing maps the program no longer reads), and that the program is the one the caller
names (program names are truncated to 15 characters by the kernel).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib.util
import logging
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import links as L
from . import maps as M

log = logging.getLogger(__name__)

__all__ = ["BUILDS_MAP", "AdoptedProg", "adopt", "digest", "map_ids", "record", "recorded"]

BUILDS_MAP = "kpr_builds"
DIGEST_SIZE = 32  # sha256
# Records for dead programs are pruned on every record(); one agent keeps a few dozen.
SPEC = M.MapSpec(BUILDS_MAP, M.BPF_MAP_TYPE_HASH, 4, DIGEST_SIZE, 4096)
# Bumped when what a digest covers changes, so older records never match.
_SCHEME = b"kpr-build-1"


def bcc_version() -> str:
    """bcc's version, without importing bcc where it is not imported yet: its import loads
    libbcc (LLVM and clang, 0.1-0.2 s of a restart that adopts and compiles nothing) just to
    read one string, which bcc/version.py holds as its only assignment."""
    bcc = sys.modules.get("bcc")
    if bcc is not None:
        return str(getattr(bcc, "__version__", ""))
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return ""
    for where in spec.submodule_search_locations or ():
        try:
            text = (Path(where) / "version.py").read_text()
        except OSError:
            continue
        m = re.fullmatch(r"""\s*__version__\s*=\s*(['"])([^'"]*)\1\s*""", text)
        if m:
            return m.group(2)
    # another layout: ask bcc itself
    try:
        import bcc
    except ImportError:
        return ""
    return str(getattr(bcc, "__version__", ""))


def digest(text: str, cflags: Sequence[str]) -> bytes:
    """The build's identity: program text, compile flags, kernel release and bcc version."""
    h = hashlib.sha256(_SCHEME)
    for part in (text, "\0".join(cflags), platform.release(), bcc_version()):
        h.update(b"\0" + part.encode())
    return h.digest()


@dataclass
class AdoptedProg:
    """A program a pinned link runs, opened by id: stands in for bcc's Function (.fd, and
    .name in bytes as bcc has it)."""

    name: bytes
    fd: int
    id: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open(pin_path: Path, *, create: bool) -> M.BpfMap | None:
    pin = Path(pin_path) / BUILDS_MAP
    try:
        return M.BpfMap.open_pinned(pin)
    except OSError as exc:
        if exc.errno != errno.ENOENT or not create:
            if exc.errno == errno.ENOENT:
                return None
            raise
    m = M.BpfMap.create(SPEC)
    try:
        m.pin(pin)
    except OSError as exc:
        m.close()
        if exc.errno == errno.EEXIST:  # another process made it meanwhile
            return M.BpfMap.open_pinned(pin)
        raise
    return m


def record(pin_path: Path | str, build: bytes, prog_ids: Iterable[int]) -> None:
    """Remember that the programs `prog_ids` are of the build `build`; forget dead programs."""
    m = _open(Path(pin_path), create=True)
    assert m is not None
    with m:
        lib = M.libbpf()
        for key in list(m.keys()):
            fd = lib.bpf_prog_get_fd_by_id(M.U32.unpack(key)[0])
            if fd >= 0:
                os.close(fd)
            else:
                m.delete(key)
        for pid in prog_ids:
            m.update(M.U32.pack(pid), build)


def recorded(pin_path: Path | str, prog_id: int) -> bytes | None:
    """The digest recorded for a program, None when there is none."""
    m = _open(Path(pin_path), create=False)
    if m is None:
        return None
    with m:
        return m.lookup(M.U32.pack(prog_id))


def map_ids(prog_fd: int) -> list[int]:
    """Ids of the maps a loaded program uses."""
    n = M.prog_info(prog_fd).nr_map_ids
    if not n:
        return []
    ids = (ctypes.c_uint32 * n)()
    info = M.ProgInfo(nr_map_ids=n, map_ids=ctypes.addressof(ids))
    size = ctypes.c_uint32(ctypes.sizeof(info))
    M.check_rc(M.libbpf().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return list(ids)[: min(n, info.nr_map_ids)]


def _pinned_map_id(pin: Path) -> int | None:
    return _map_attr(M.BpfMap.open_pinned, pin, "id")


def _map_name(mid: int) -> str | None:
    return _map_attr(M.BpfMap.from_id, mid, "name")


def _map_attr(open_map: Callable[[Any], M.BpfMap], where: Any, attr: str) -> Any:
    """An attribute of the map `open_map(where)` opens, None when it cannot be opened."""
    try:
        with open_map(where) as m:
            return getattr(m, attr)
    except OSError:
        return None


def _why_not(
    pin_path: Path, name: str, prog: AdoptedProg | None, seen: dict[tuple[str, object], object] | None = None
) -> tuple[str, bytes | None]:
    """Why the program behind a link cannot be adopted ("" when it can), and its build.
    `seen`: map names by id and pinned ids by name already looked up (one adopt() asks for
    the same few maps of every program: 60 opens and closes of 7 maps for socklb's 10)."""
    if prog is None:
        return "no usable link", None
    if (L.prog_name(prog.id) or "") != name[:15]:
        return f"the link runs another program ({L.prog_name(prog.id)!r})", None
    have = recorded(pin_path, prog.id)
    if have is None:
        return "no build recorded", None
    seen = {} if seen is None else seen
    for mid in map_ids(prog.fd):
        if ("id", mid) not in seen:
            seen[("id", mid)] = _map_name(mid)
        mname = seen[("id", mid)]
        if not mname:
            continue
        if ("pin", mname) not in seen:
            seen[("pin", mname)] = _pinned_map_id(pin_path / mname)
        pinned = seen[("pin", mname)]
        if pinned is not None and pinned != mid:
            return f"its map {mname} is no longer the pinned one", have
    return "", have


def _prog_of_link(link_pin: Path, name: str) -> AdoptedProg | None:
    lib = M.libbpf()
    fd = lib.bpf_obj_get(str(link_pin).encode())
    if fd < 0:
        return None
    try:
        li = L.link_info(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if li.defunct:
        return None
    pfd = lib.bpf_prog_get_fd_by_id(li.prog_id)
    if pfd < 0:
        return None
    return AdoptedProg(name.encode(), pfd, li.prog_id)


def adopt(
    pin_path: Path | str, candidates: Sequence[bytes], pins: Mapping[str, Path]
) -> tuple[bytes, dict[str, AdoptedProg]] | None:
    """The programs the links pinned at `pins` (program name -> link pin) run, and their build,
    when all of them are of one build among `candidates` (the builds the caller would make:
    one, or one per answer of a kernel probe it has not run yet); None, with a log line saying
    why, when any is not. The caller owns the returned fds (AdoptedProg.close)."""
    pin_path = Path(pin_path)
    out: dict[str, AdoptedProg] = {}
    reason = "" if pins else "no hooks"
    build: bytes | None = None
    seen: dict[tuple[str, object], object] = {}
    for name, link_pin in pins.items():
        prog = _prog_of_link(link_pin, name)
        if prog is not None:
            out[name] = prog
        try:
            reason, have = _why_not(pin_path, name, prog, seen)
        except OSError as exc:
            reason, have = str(exc), None
        if not reason and have not in candidates:
            reason = "another build"
        elif not reason and build is not None and have != build:
            reason = "the links run different builds"
        if reason:
            reason = f"{link_pin}: {reason}"
            break
        build = have
    if reason or build is None:
        for p in out.values():
            p.close()
        log.info("event=build_compile_needed reason=%r", reason)
        return None
    log.info("event=build_adopted programs=%d build=%s", len(out), build.hex()[:12])
    return build, out
