"""A persistent cache of compiled BPF programs: a cold start loads what bcc made last time.

A start without pinned links to adopt (kpr.bpf.builds), after a node's reboot for instance,
used to compile its programs with bcc (clang and LLVM in the agent: 0.3-1.5 s of CPU and
60 MB of libraries mapped, on the way to ready). As Cilium keeps its compiled objects, kpr keeps,
after a compile whose programs all loaded, what it takes to load them again without bcc: per
program its instructions as bcc handed them to the kernel (`dump_func`), program type,
expected attach type, license and name; and for every 64-bit immediate that holds a map's fd
(BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE) which map that is: its name, the name it is pinned
under in bpf.pinPath if it is (found by the map's id: a pin may be named otherwise than the
map, as the XDP build's counters are), and its type, key and value size, flags and max_entries.

An entry's key is the build's digest (kpr.bpf.builds.digest: the text as compiled with kpr's
headers pasted in, the flags, the kernel release, bcc's version), the kernel's build string
(uname -v: a rebuilt kernel of the same release may number its BTF differently), the
programs asked for with their types, and FORMAT. A pin named anew by every load (`fresh_pins`:
the NodePort builds' stage program array, kpr_np_calls_<random>) counts in the key and the
record under its stable name, and is made and pinned under this load's name on a hit. Entries are files `<key>.prog` under the
cache directory (`<agent.stateDir>/bpf-cache`), written to a temporary file and renamed;
the KEEP most recently used stay, older ones are removed.

A load from an entry opens each pinned map and checks it is the kind recorded (type, key and
value size, flags; max_entries may differ, as bcc too uses a pinned map of any size); a pinned
map that is missing (bpffs is empty after a reboot; every pinned map bcc declared, used by
the programs or not) or a map that is not pinned is created from the record, without BTF
(plain map types only; a program array only when pinned, for
the caller fills it through its pin with plain map updates; an entry whose unpinned map is of
another type is not stored). The fds are patched into the instructions, which go through
kpr.bpf.kernctx's check as a compile's do, and every program is loaded (libbpf's
bpf_prog_load) before the caller gets any: anything wrong (no entry, a file truncated or
corrupt, another format, a field of another type, a map of another kind, the verifier
refusing, no libbpf) closes what was opened, unpins the maps this load pinned, logs one line
`event=bpf_cache_miss reason=...` and compiles instead.

A caller may ask (`in_child`, socklb does) for a miss to be compiled by kpr.bpf.compile_child,
a process of its own that sends the entry back on its stdout; this process loads it from
memory and stores it when it can (a store that fails is one log line, as for a compile here;
a build it cannot record is loaded from the child's compile all the same, never compiled
twice: the child pins the maps an entry cannot record for the agent, HANDED_PREFIX, which the
agent removes once loaded, an earlier agent's at its next load, and nothing is stored):
bcc's clang and LLVM stay out of the agent (they kept about 90 MB of its RSS after a first
start's compile). They do enter it when the compile is here: bpf.programCache false, a caller
that does not ask (the NodePort builds), a build with fresh pins, a child that exits with an
error (the compile here reports it) or whose entry does not load (the verifier's refusal is
reported by the compile here). A child that crashed, was killed or overran CHILD_TIMEOUT ends
the start instead (ChildCompileFailed): a compile here would do the same or worse.

What an entry holds is loaded into the kernel: it is read only from a cache directory and a
file owned by this user that neither group nor others may write (anything else misses as
"untrusted"), under directories no other user may change (none writable by its group or others
without the sticky bit, none owned by a user but root and this one: "untrusted ancestor"); the
directory is made 0700.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import platform
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from kpr.bpf import kernctx
from kpr.childcmd import python_module
from kpr.bpf.builds import AdoptedProg
from kpr.bpf import maps as M
from kpr.bpf import loader
from kpr.bpf import pinlock
from kpr.bpf.loader import Source, attach_type_value, compile_and_load, load_prog, prepare, prog_type_value

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_DIR", "CachedModule", "CachedProg", "ChildCompileFailed", "CompileChild", "ProgramCache", "compile_likely",
    "entries", "for_config", "has_entry", "load_programs", "sweep_handed",
]

FORMAT = 2  # 2: maps recorded with their pin's name
KEEP = 4  # entries kept: an agent's current build and a few it may switch back to
CACHE_DIR = "bpf-cache"  # under agent.stateDir
SUFFIX = ".prog"
LOG_SIZE = 256 * 1024

BPF_LD_IMM64 = 0x18
PSEUDO_MAP_FD, PSEUDO_MAP_VALUE = 1, 2
# A map the cache cannot record (unpinned, of a type kpr does not make), pinned by the compile
# child for the agent under pin_path/<prefix><child pid>-<map name> and removed by the agent once
# loaded: the child's compile serves the load; no entry is stored.
HANDED_PREFIX = "kpr-child-"
# This process's compile children whose handed-over pins are not swept yet (started, not closed
# nor swept after their load): every other HANDED_PREFIX pin under a pin path this process holds
# is stale (one agent per pin path, kpr.bpf.pinlock: an earlier agent's, killed while its child
# compiled) and goes at the next load (sweep_handed).
_children: set[int] = set()
_children_lock = threading.Lock()
# Map types a load may create from the record: nothing to fill in but their size.
CREATABLE = {
    M.BPF_MAP_TYPE_HASH, M.BPF_MAP_TYPE_ARRAY, 5, 6, 9, 10, 11,  # percpu hash/array, lru (percpu) hash, lpm trie
    27,  # ring buffer (kpr monitor's, pinned: gone with the rest after a reboot)
}
# Made from the record only when pinned: empty, filled by the caller through the pin.
PROG_ARRAY = 3
CREATABLE_PINNED = CREATABLE | {PROG_ARRAY}

# (program name, program type, attach type or None), as load_prog takes them
Program = tuple[str, "int | str", "int | str | None"]


class ChildCompileFailed(RuntimeError):
    """The compile child crashed, was killed or overran CHILD_TIMEOUT: the start ends (a
    compile in the agent would crash it, or take as long again)."""


def entries(directory: Path) -> list[Path]:
    """The entry files in `directory` (a writer's `.tmp-*` file is none)."""
    return [p for p in Path(directory).glob(f"*{SUFFIX}") if not p.name.startswith(".")]


def compile_likely(config: Any) -> bool:
    """Whether loading kpr's BPF builds will likely compile: not when an agent left its builds
    pinned under bpf.pinPath (a restart adopts them: kpr.bpf.builds), nor when the program
    cache is on and holds an entry it would read (trusted; a start after a reboot loads it). A guess from what is on
    disk: an entry of another build (an upgrade) still compiles."""
    from kpr.bpf.builds import BUILDS_MAP

    if (Path(config.bpf.pin_path) / BUILDS_MAP).exists():
        return False
    cache = for_config(config)
    return not (cache is not None and cache.has_entries())  # (an untrusted cache is not read: a compile)


class CacheMiss(Exception):
    """Why an entry cannot be used; `quiet`: the ordinary first start (no entry yet)."""

    def __init__(self, reason: str, *, quiet: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.quiet = reason, quiet


# A program loaded from the cache stands in for bcc's Function (.fd, .name in bytes) as an
# adopted one does.
CachedProg = AdoptedProg


@dataclass
class CachedModule:
    """What load_programs returns on a hit: used as the bcc module is for loaded programs
    (load_prog on it returns them; `cleanup()` closes their fds). No tables, no attach."""

    label: str
    insns: dict[str, bytes]
    progs: dict[str, tuple[int, int, CachedProg]]  # name -> (program type, attach type, program)
    key: str = ""
    # Compiled for this load, in a process of its own (load_programs' in_child), not found cached.
    compiled: bool = False
    _kpr_label: str = field(init=False)

    def __post_init__(self) -> None:
        self._kpr_label = self.label

    def dump_func(self, name: bytes) -> bytes:
        try:
            return self.insns[name.decode()]
        except KeyError:
            raise Exception(f"Unknown program {name.decode()}") from None

    def load_func(self, name: bytes, prog_type: int, device: bytes | None = None, attach_type: int = -1) -> CachedProg:
        """The program as loaded from the cache, when asked for with the types it was loaded with."""
        got = self.progs.get(name.decode())
        if got is None:
            raise Exception(f"Unknown program {name.decode()}")
        ptype, atype, prog = got
        if device or (ptype, atype) != (prog_type, attach_type):
            raise Exception(f"Failed to load BPF program {name.decode()}: loaded from the cache as type "
                            f"{ptype}/{atype}, asked for {prog_type}/{attach_type}")
        return prog

    def cleanup(self) -> None:
        for _p, _a, prog in self.progs.values():
            prog.close()


def _ld_imm64_maps(insns: bytes) -> list[tuple[int, int, int]]:
    """(instruction index, pseudo kind, fd) of every map reference in `insns`."""
    out = []
    i, n = 0, len(insns) // 8
    while i < n:
        code, regs, _off, imm = struct.unpack_from("<BBhi", insns, i * 8)
        if code == BPF_LD_IMM64:
            if regs >> 4 in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
                out.append((i, regs >> 4, imm))
            i += 2
            continue
        i += 1
    return out


def _patch(insns: bytes, refs: Sequence[tuple[int, int]], fds: Sequence[int]) -> bytes:
    """`insns` with the fd of map `m` in each reference (index, m)."""
    buf = bytearray(insns)
    for idx, m in refs:
        if idx * 8 + 8 > len(buf):
            raise CacheMiss(f"a map reference past the end ({idx})")
        code, regs = buf[idx * 8], buf[idx * 8 + 1]
        if code != BPF_LD_IMM64 or regs >> 4 not in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
            raise CacheMiss(f"instruction {idx} is no map reference")
        struct.pack_into("<i", buf, idx * 8 + 4, fds[m])
    return bytes(buf)


class ProgramCache:
    """Entries under `directory` for programs whose pinned maps live under `pin_path`."""

    def __init__(self, directory: Path | str, pin_path: Path | str) -> None:
        self.directory = Path(directory)
        self.pin_path = Path(pin_path)

    def key(self, source: Source, programs: Sequence[Program], fresh_pins: Mapping[str, str] = {}) -> str:
        h = hashlib.sha256(f"kpr-progcache-{FORMAT}\0".encode())
        h.update(_stable(source, fresh_pins).digest())
        h.update(platform.version().encode())
        for name, ptype, atype in programs:
            h.update(f"\0{name}:{prog_type_value(ptype)}:{attach_type_value(atype)}".encode())
        return h.hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    # ---------------------------------------------------------------- store

    def store(self, key: str, bpf: Any, programs: Sequence[Program], fresh_pins: Mapping[str, str] = {}) -> Path:
        """Write the entry for a compiled module whose `programs` are loaded; raises CacheMiss
        when the build cannot be cached (the reason says why), OSError when it cannot be written."""
        return self.write(key, self.entry(key, bpf, programs, fresh_pins))

    def entry(self, key: str, bpf: Any, programs: Sequence[Program], fresh_pins: Mapping[str, str] = {},
              *, hand_over: bool = False) -> bytes:
        """The entry's bytes for a compiled module (what store writes; CacheMiss as there).
        `hand_over` (the compile child's): a map the cache cannot record is pinned for the
        agent (HANDED_PREFIX) and recorded as handed over, with why in "unrecorded": bytes the
        agent loads once and never stores. The pins are removed when this raises."""
        handed: list[Path] = []
        try:
            return self._entry(key, bpf, programs, fresh_pins, handed if hand_over else None)
        except BaseException:
            for pin in handed:
                with contextlib.suppress(OSError):
                    pin.unlink()
            raise

    def _entry(self, key: str, bpf: Any, programs: Sequence[Program], fresh_pins: Mapping[str, str],
               handed: list[Path] | None) -> bytes:
        lib = _libbcc()
        pins = self._pins_by_id()
        tables: dict[int, dict[str, Any]] = {}  # fd -> the map's record
        for t in range(lib.bpf_num_tables(bpf.module)):
            fd = lib.bpf_table_fd_id(bpf.module, t)
            info = M.obj_info(fd)
            name = lib.bpf_table_name(bpf.module, t).decode()
            names = pins.get(info.id, [])
            pin = name if name in names else min(names, default=None)
            tables[fd] = {
                "name": name, "pin": fresh_pins.get(pin, pin) if pin else None, "type": info.type,
                "key_size": info.key_size, "value_size": info.value_size, "flags": info.map_flags,
                # what bcc declares (a pinned map may have been made with another size)
                "max_entries": int(lib.bpf_table_max_entries_id(bpf.module, t)) or info.max_entries,
            }
        maps: list[dict[str, Any]] = []
        index: dict[int, int] = {}
        progs = []
        unrecorded: list[str] = []
        for name, ptype, atype in programs:
            insns = bpf.dump_func(name.encode())
            refs = []
            for idx, kind, fd in _ld_imm64_maps(insns):
                rec = tables.get(fd)
                if rec is None:
                    raise CacheMiss(f"{name} uses map fd {fd}, which is no table of the module")
                if not rec["pin"] and (rec["type"] not in CREATABLE or kind == PSEUDO_MAP_VALUE):
                    why = f"{name} uses map {rec['name']}, neither pinned nor a plain map to create"
                    if handed is None:
                        raise CacheMiss(why)
                    pin = self.pin_path / f"{HANDED_PREFIX}{os.getpid()}-{rec['name']}"
                    M.check_rc(M.libbpf().bpf_obj_pin(fd, str(pin).encode()), f"bpf_obj_pin {rec['name']} {pin}")
                    handed.append(pin)
                    rec.update(pin=pin.name, handed=True)
                    unrecorded.append(why)
                if fd not in index:
                    index[fd] = len(maps)
                    maps.append(rec)
                refs.append([idx, index[fd]])
            progs.append({
                "name": name, "prog_type": prog_type_value(ptype), "attach_type": attach_type_value(atype),
                "insns": base64.b64encode(insns).decode(), "maps": refs,
            })
        # bcc makes and pins every pinned map it declares, used or not (the XDP build's
        # kpr_np_fe, which the plugin opens): so does a load from the entry
        maps += [rec for fd, rec in tables.items() if rec["pin"] and fd not in index]
        license = lib.bpf_module_license(bpf.module) or b"GPL"
        doc = {
            "format": FORMAT, "key": key, "label": getattr(bpf, "_kpr_label", ""),
            "license": license.decode(), "kern_version": int(lib.bpf_module_kern_version(bpf.module)),
            "maps": maps, "programs": progs,
        }
        if unrecorded:
            doc["unrecorded"] = unrecorded
        body = json.dumps(doc, sort_keys=True).encode()
        return hashlib.sha256(body).hexdigest().encode() + b"\n" + body

    def _pins_by_id(self) -> dict[int, list[str]]:
        """map id -> the names it is pinned under, directly in pin_path (programs', links' and
        directories skipped)."""
        out: dict[int, list[str]] = {}
        lib = M.libbpf()
        try:
            entries = list(os.scandir(self.pin_path))
        except OSError:
            return out
        for e in entries:
            if not e.is_file(follow_symlinks=False):
                continue
            fd = lib.bpf_obj_get(e.path.encode())
            if fd < 0:
                continue
            try:
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("map_id:"):
                            out.setdefault(int(line.split()[1]), []).append(e.name)
            except OSError:
                pass
            finally:
                os.close(fd)
        return out

    def write(self, key: str, data: bytes) -> Path:
        """Write entry `key` (bytes from entry()); OSError when it cannot be."""
        made = not self.directory.exists()
        # root's alone, as agent.stateDir: what is in it is loaded into the kernel
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        final = self.path(key)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
        except OSError:
            if made:  # e.g. a state directory on bpffs, which holds no files: leave no directory
                with contextlib.suppress(OSError):
                    self.directory.rmdir()
            raise
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        found = []
        for p in entries(self.directory):
            try:
                found.append((p.stat().st_mtime_ns, p))
            except OSError:
                continue
        found.sort(reverse=True)
        for _t, p in found[KEEP:]:
            if p != keep:
                with contextlib.suppress(OSError):
                    p.unlink()

    # ---------------------------------------------------------------- load

    def read(self, key: str) -> dict[str, Any]:
        try:
            data = self._read_trusted(self.path(key).name)
        except FileNotFoundError:
            raise CacheMiss("no entry", quiet=True) from None
        except OSError as exc:
            raise CacheMiss(f"unreadable: {exc}") from None
        return self.parse(key, data)

    @staticmethod
    def parse(key: str, data: bytes) -> dict[str, Any]:
        """The record in entry bytes `data` for `key`; CacheMiss when they are no such entry."""
        head, sep, body = data.partition(b"\n")
        if not sep or hashlib.sha256(body).hexdigest().encode() != head:
            raise CacheMiss("corrupt or truncated (checksum)")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise CacheMiss(f"corrupt: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CacheMiss(f"format {doc.get('format') if isinstance(doc, dict) else '?'}, not {FORMAT}")
        if doc.get("key") != key:
            raise CacheMiss("the entry is another build's")
        return doc

    def _read_trusted(self, name: str) -> bytes:
        """The file `name` of the cache directory, when both are this user's and writable by no one else."""
        with self._trusted_dir() as dfd, self._open_trusted(dfd, name) as f:
            return f.read()

    def has(self, key: str) -> bool:
        """Whether the entry for `key` is there and trusted as read() checks it (not read)."""
        try:
            with self._trusted_dir() as dfd, self._open_trusted(dfd, self.path(key).name):
                return True
        except (CacheMiss, OSError):
            return False

    def has_entries(self) -> bool:
        """Whether the cache directory, trusted as read() checks it, holds an entry (of any build)."""
        try:
            with self._trusted_dir() as dfd:
                # listed through the checked fd, not the path: the directory checked is the one listed
                return any(n.endswith(SUFFIX) and not n.startswith(".") for n in os.listdir(dfd))
        except (CacheMiss, OSError):
            return False

    @contextlib.contextmanager
    def _trusted_dir(self) -> Iterator[int]:
        """An fd of the cache directory; CacheMiss unless it is this user's and writable by no
        one else, under directories no other user may change (the checks of every read, made
        on the fds the open went through: _open_trusted_dir)."""
        dfd = _open_trusted_dir(self.directory)
        try:
            yield dfd
        finally:
            os.close(dfd)

    @staticmethod
    def _open_trusted(dfd: int, name: str) -> BinaryIO:
        """The file `name` of the directory `dfd`, open; CacheMiss unless it is this user's and
        writable by no one else."""
        f = open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd), "rb")
        try:
            _trusted(os.fstat(f.fileno()), "entry")
        except BaseException:
            f.close()
            raise
        return f

    def load(self, key: str, label: str, fresh_pins: Mapping[str, str] = {}, data: bytes | None = None) -> CachedModule:
        """Every program of the entry, loaded against this node's maps; CacheMiss when any cannot
        be. `data`: the entry's bytes as this process's own compile child sent them, not read
        from the directory (nor marked used there)."""
        doc = self.read(key) if data is None else self.parse(key, data)
        if data is None and doc.get("unrecorded"):
            raise CacheMiss("an entry with maps handed over by a compile child (never stored)")
        this_load = {stable: mine for mine, stable in fresh_pins.items()}
        lib = _libbpf()
        fds: list[int] = []
        made: list[Path] = []  # pins this load created, removed again on a miss
        loaded: dict[str, tuple[int, int, CachedProg]] = {}
        insns_of: dict[str, bytes] = {}
        try:
            try:
                for rec in doc["maps"]:
                    fds.append(self._map_fd(rec, this_load, made))
                for p in doc["programs"]:
                    name = p["name"]
                    insns = _patch(base64.b64decode(p["insns"], validate=True), p["maps"], fds)
                    kept = kernctx.r0_kept_across_call(insns)
                    if kept is not None:
                        raise CacheMiss(f"{name}: {kept}")
                    prog = CachedProg(name.encode(), self._load_one(lib, name, p, insns, doc), 0)
                    loaded[name] = (p["prog_type"], p["attach_type"], prog)
                    prog.id = M.prog_info(prog.fd).id
                    insns_of[name] = insns
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise CacheMiss(f"corrupt: {type(exc).__name__} {exc}") from None
        except BaseException:
            for _p, _a, prog in loaded.values():
                prog.close()
            for pin in made:
                with contextlib.suppress(OSError):
                    pin.unlink()
            raise
        finally:
            for fd in fds:  # the programs hold their maps now
                os.close(fd)
        if data is None:
            with contextlib.suppress(OSError):
                os.utime(self.path(key))  # recently used: kept by the next prune
        return CachedModule(label, insns_of, loaded, key)

    def _map_fd(self, rec: dict[str, Any], this_load: Mapping[str, str], made: list[Path]) -> int:
        """An fd of the map `rec` records: its pin (created when missing, its path added to
        `made`), or a new map."""
        name = str(rec["name"])
        want = (rec["type"], rec["key_size"], rec["value_size"], rec["flags"])
        if not rec["pin"]:
            return self._create(rec).fd
        pin = self.pin_path / this_load.get(rec["pin"], rec["pin"])
        if pin.parent != self.pin_path:
            raise CacheMiss(f"map {name}: pin {rec['pin']!r} is no name in {self.pin_path}")
        try:
            m = M.BpfMap.open_pinned(pin)
        except OSError as exc:
            if exc.errno != errno.ENOENT or rec.get("handed"):  # (the child's map: never made here)
                raise CacheMiss(f"map {name}: {exc}") from None
            if rec["type"] not in CREATABLE_PINNED:
                raise CacheMiss(f"map {name} is not pinned and is of a type kpr does not create") from None
            m = self._create(rec, CREATABLE_PINNED)
            try:
                m.pin(pin)
                made.append(pin)
                log.info("event=bpf_cache_map_created map=%s pin=%s", name, pin)
            except OSError as exc:
                m.close()
                if exc.errno != errno.EEXIST:
                    raise CacheMiss(f"map {name}: {exc}") from None
                return self._map_fd(rec, this_load, made)  # another process pinned it meanwhile
        info = m.info()
        have = (info.type, info.key_size, info.value_size, info.map_flags)
        if have != want:
            m.close()
            raise CacheMiss(f"map {name} is pinned as another kind (type, key, value, flags: {have}, recorded {want})")
        return m.fd

    @staticmethod
    def _create(rec: dict[str, Any], creatable: set[int] = CREATABLE) -> M.BpfMap:
        if rec["type"] not in creatable:
            raise CacheMiss(f"map {rec['name']} is of a type kpr does not create ({rec['type']})")
        spec = M.MapSpec(str(rec["name"])[:15], rec["type"], rec["key_size"], rec["value_size"],
                         rec["max_entries"], flags=rec["flags"])
        try:
            return M.BpfMap.create(spec)
        except OSError as exc:
            raise CacheMiss(f"map {rec['name']}: {exc}") from None

    @staticmethod
    def _load_one(lib: Any, name: str, p: dict[str, Any], insns: bytes, doc: dict[str, Any]) -> int:
        log_buf = ctypes.create_string_buffer(LOG_SIZE)
        atype = p["attach_type"]
        opts = M.ProgLoadOpts(sz=ctypes.sizeof(M.ProgLoadOpts), expected_attach_type=max(atype, 0),
                              kern_version=doc["kern_version"], log_level=0)
        fd = lib.bpf_prog_load(p["prog_type"], name[:15].encode(), doc["license"].encode(), insns,
                               len(insns) // 8, ctypes.byref(opts))
        if fd < 0:
            # again with the verifier's log, for the line that says why
            opts.log_level, opts.log_size, opts.log_buf = 1, LOG_SIZE, ctypes.cast(log_buf, ctypes.c_void_p)
            fd = lib.bpf_prog_load(p["prog_type"], name[:15].encode(), doc["license"].encode(), insns,
                                   len(insns) // 8, ctypes.byref(opts))
            if fd >= 0:
                return fd
            tail = log_buf.value.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise CacheMiss(f"the kernel refused {name}: {os.strerror(-fd)} {tail[0]!r}")
        return fd


def _stable(source: Source, fresh_pins: Mapping[str, str]) -> Source:
    """`source` with each of this load's fresh pin names as its stable name (the key's view)."""
    if not fresh_pins:
        return source
    flags = list(source.flags)
    for mine, stable in fresh_pins.items():
        flags = [f.replace(mine, stable) for f in flags]
    return Source(source.text, tuple(flags), source.label)


def _trusted(st: os.stat_result, what: str) -> None:
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise CacheMiss(f"untrusted {what} (owner {st.st_uid}, mode {st.st_mode & 0o7777:o})")


def _trusted_ancestor(st: os.stat_result, d: Path) -> None:
    """CacheMiss when the directory `d` (stat `st`), above the cache's, is one another user may
    change: writable by its group or others without the sticky bit, or owned by a user other
    than root and this one. The cache is only as safe as the path to it (as sshd's StrictModes
    checks): such a user could put another directory in its place (a link to one of root's they
    chose). Group write is refused whatever the group, root's (gid 0) too: gid 0 is not root's
    alone (OpenShift runs its containers' arbitrary users in it)."""
    if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
        raise CacheMiss(f"untrusted ancestor {d} (owner {st.st_uid}, mode {st.st_mode & 0o7777:o})")


def _trusted_link(st: os.stat_result, dst: os.stat_result, link: Path) -> None:
    """CacheMiss when the symbolic link `link` (lstat `st`) sits in a sticky directory others
    may write to (stat `dst`: /tmp) and is owned by neither root, this user nor that
    directory's owner. The sticky bit keeps others from replacing a link, not from making
    one that is followed: the kernel refuses to follow such a link (fs.protected_symlinks),
    but the walk below follows links itself, so it refuses it here (a link another user made
    in /tmp, pointing to one of root's directories, was followed)."""
    if (dst.st_mode & stat.S_ISVTX and dst.st_mode & 0o022
            and st.st_uid not in (0, os.geteuid(), dst.st_uid)):
        raise CacheMiss(f"untrusted link {link} (owner {st.st_uid}, in a sticky directory others may write to)")


# Symbolic links followed on the way to the cache directory at most (the kernel's own limit).
_MAX_LINKS = 40


def _open_trusted_dir(directory: Path) -> int:
    """An fd (read-only) of `directory`, walked down to from / one directory at a time: each
    opened O_PATH|O_NOFOLLOW in the one above and checked by fstat of that fd, every one above
    the cache's by _trusted_ancestor, the cache's by _trusted. The checks see the very
    directories the open goes through (checks by path, then an open by path, left a window in
    which a directory could be swapped between the two). A symbolic link on the way is read in
    its directory (checked: no other user may swap the link) and followed, its directories
    checked in turn, so a link kept in a directory others may change is refused even when it
    points into trusted ones, as is one another user made in a sticky one (_trusted_link).
    CacheMiss naming the directory (or link) refused; OSError when the path does not lead to
    a directory (a missing one, too many links)."""
    todo = list(reversed(Path(os.path.abspath(directory)).parts[1:]))  # the next name last
    root = os.open("/", os.O_PATH | os.O_DIRECTORY)
    stack = [(root, Path("/"))]  # the directories walked through: ".." goes back one
    links = 0
    try:
        while todo:
            fd, where = stack[-1]
            dst = os.fstat(fd)
            _trusted_ancestor(dst, where)
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            nfd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
            st = os.fstat(nfd)
            if stat.S_ISDIR(st.st_mode):
                stack.append((nfd, where / name))
                continue
            os.close(nfd)
            if not stat.S_ISLNK(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(where / name))
            _trusted_link(st, dst, where / name)
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(directory))
            target = os.readlink(name, dir_fd=fd)
            if target.startswith("/"):
                while len(stack) > 1:
                    os.close(stack.pop()[0])
            todo.extend(reversed(Path(target).parts[1:] if target.startswith("/") else Path(target).parts))
        fd, where = stack[-1]
        _trusted(os.fstat(fd), "directory")
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    finally:
        for fd, _where in stack:
            os.close(fd)


def _libbcc() -> Any:
    """libbcc's table listing (bcc's Python declares only some of it), on a handle of our own so
    that bcc's declarations stay as bcc made them."""
    lib = ctypes.CDLL("libbcc.so.0")
    size, vp = ctypes.c_size_t, ctypes.c_void_p
    for fname, res, args in (
        ("bpf_num_tables", size, [vp]),
        ("bpf_table_name", ctypes.c_char_p, [vp, size]),
        ("bpf_table_fd_id", ctypes.c_int, [vp, size]),
        ("bpf_table_max_entries_id", size, [vp, size]),
        ("bpf_module_license", ctypes.c_char_p, [vp]),
        ("bpf_module_kern_version", ctypes.c_uint, [vp]),
    ):
        fn = getattr(lib, fname)
        fn.restype, fn.argtypes = res, args
    return lib


def _libbpf() -> Any:
    try:
        return M.libbpf()
    except OSError as exc:
        raise CacheMiss(str(exc)) from None


def load_programs(
    src: str | Path,
    programs: Sequence[Program],
    *,
    cflags: Sequence[str] = (),
    include_dirs: Sequence[Path] = (),
    name: str = "",
    cache: ProgramCache | None = None,
    fresh_pins: Mapping[str, str] = {},
    in_child: "bool | CompileChild" = False,
) -> Any:
    """compile_and_load, then load_prog for every one of `programs`; with a cache, the programs
    are loaded from its entry when it has one for this build (no bcc imported), and a
    compile's programs are stored for the next start. Returns the bcc module or a
    CachedModule; either way `load_prog(module, name, ...)` gives the loaded program and
    `module.cleanup()` closes what this process holds. `fresh_pins` (this load's pin name ->
    the stable name it stands for): pins that every load names anew, excluded from the key
    (a program array, made empty under this load's name on a hit: the caller fills it).
    `in_child`: on a miss, compile in a process of its own, load the entry it sends back (a
    CachedModule whose `compiled` is true; see kpr.bpf.compile_child) and store it, compiling
    here only when the child exits with an error or its entry does not load (no fresh pins:
    those are named by this load), ChildCompileFailed when it crashed, was killed or overran
    CHILD_TIMEOUT; a CompileChild started ahead is used for it (and left for the caller to
    close when not needed)."""
    source = prepare(src, cflags=cflags, include_dirs=include_dirs, name=name)
    key = ""
    if cache is not None:
        sweep_handed(cache.pin_path)
        try:
            key = cache.key(source, programs, fresh_pins)
            module = cache.load(key, source.label, fresh_pins)
        except CacheMiss as miss:
            (log.info if miss.quiet else log.warning)(
                "event=bpf_cache_miss file=%s reason=%r", source.label, miss.reason)
        except Exception as exc:  # noqa: BLE001 - e.g. a map that cannot be opened for lack of privileges,
            # or a field of another type under a valid checksum: a miss, never a failed start
            log.warning("event=bpf_cache_miss file=%s reason=%r", source.label, f"{type(exc).__name__}: {exc}")
        else:
            log.info("event=bpf_cache_hit file=%s programs=%d key=%s", source.label, len(module.progs), key[:12])
            return module
        if in_child and key and not fresh_pins:
            module = _compile_in_child(source, programs, key, cache, in_child if isinstance(in_child, CompileChild) else None)
            if module is not None:
                return module
    bpf = compile_and_load(source)
    try:
        for prog, ptype, atype in programs:
            load_prog(bpf, prog, ptype, attach_type=atype)
    except BaseException:
        bpf.cleanup()
        raise
    if cache is not None:
        _store_logged(source.label, lambda: cache.store(key, bpf, programs, fresh_pins))
    return bpf


def _store_logged(label: str, store: Any) -> None:
    """Run `store` (a cache write returning the entry's path) and log what came of it: a
    cache that cannot be written costs the next start a compile, never this one."""
    try:
        path = store()
    except CacheMiss as why:
        log.warning("event=bpf_cache_not_stored file=%s reason=%r", label, why.reason)
    except Exception as exc:  # noqa: BLE001 - (see above)
        log.warning("event=bpf_cache_not_stored file=%s reason=%r", label, str(exc))
    else:
        log.info("event=bpf_cache_stored file=%s path=%s", label, path)


# A compile takes 0.3-1.5 s of CPU; a child still at it after this is ended and so is the start
# (below systemd's TimeoutStartSec=120s: the agent says why before systemd kills it).
CHILD_TIMEOUT = 90.0


class CompileChild:
    """kpr.bpf.compile_child started ahead of a compile that is likely (its interpreter, kpr's
    modules and libbcc take about 0.1 s of CPU and 0.25 s of wall to load, meanwhile the agent
    goes on starting); load_programs(in_child=<it>) hands it the request. `close()` ends a
    child that was not needed (a restart adopts, a start after a reboot finds the entry); one
    never closed ends when the agent does (its stdin reaches end of file)."""

    def __init__(self, cmd: Sequence[str] | None = None) -> None:
        # a session of its own: a terminal's ^C reaches the agent, which ends the child
        self.proc: subprocess.Popen | None = subprocess.Popen(
            list(cmd or python_module("kpr.bpf.compile_child")),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        self.used = False
        self.pid = self.proc.pid
        with _children_lock:  # (before it is given a request: it pins nothing before)
            _children.add(self.pid)

    def run(self, request: bytes) -> tuple[int, bytes, bytes]:
        """(exit status, stdout, stderr) of the child given `request`; it has ended by then.
        ChildCompileFailed when it overran CHILD_TIMEOUT (ended by this process)."""
        proc, self.proc = self.proc, None
        if proc is None:
            raise OSError("the compile child was closed")
        self.used = True
        try:
            out, err = proc.communicate(request, timeout=CHILD_TIMEOUT)
        except BaseException as exc:
            proc.kill()
            proc.wait()
            # its compile's capture (kpr.bpf.loader): no crash to report, this process ended it
            with contextlib.suppress(OSError):
                loader.capture_path(proc.pid).unlink()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise ChildCompileFailed(f"no answer in {CHILD_TIMEOUT:.0f} s (ended)") from None
            raise
        return proc.returncode, out, err

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()  # (it did nothing but import: nothing to finish)
            proc.communicate()
            with _children_lock:
                _children.discard(self.pid)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _compile_in_child(
    source: Source, programs: Sequence[Program], key: str, cache: ProgramCache, child: CompileChild | None = None
) -> CachedModule | None:
    """The programs compiled by kpr.bpf.compile_child (`child`, or one started now), loaded
    from the entry it sends back and stored in `cache` when it can be; None (logged) when the
    child fails or its entry does not load: the caller compiles itself, which reports why.
    ChildCompileFailed when the child crashed, was killed or overran CHILD_TIMEOUT."""
    ran: list[CompileChild] = []
    try:
        return _child_compile(source, programs, key, cache, child, ran)
    finally:
        # whatever became of the child (loaded, unusable, crashed, ended): the pins it handed over go
        for c in ran:
            for pin in cache.pin_path.glob(f"{HANDED_PREFIX}{c.pid}-*"):
                with contextlib.suppress(OSError):
                    pin.unlink()
            with _children_lock:
                _children.discard(c.pid)


def sweep_handed(pin_path: Path | str) -> list[Path]:
    """Remove the HANDED_PREFIX pins directly under `pin_path` that no compile child of this
    process may still hand over (see _children): an earlier agent's, killed while its child
    compiled, would hold their maps until `kpr cleanup` or a reboot. The pins removed. Only
    by the process that holds the pin path (kpr.bpf.pinlock, the agent): another agent's
    running children's pins are not stale, and a process that does not own the path (a tool,
    a test's load) leaves them alone."""
    removed: list[Path] = []
    if not pinlock.held(pin_path):
        return removed
    # held throughout: a child registered after the listing was given no request yet (nothing pinned)
    with _children_lock:
        try:
            names = os.listdir(pin_path)
        except OSError:
            return removed
        for name in names:
            if not name.startswith(HANDED_PREFIX):
                continue
            pid = name[len(HANDED_PREFIX):].partition("-")[0]
            if pid.isdigit() and int(pid) in _children:
                continue
            pin = Path(pin_path) / name
            try:
                pin.unlink()
            except OSError as exc:
                log.warning("event=bpf_handed_pin_not_removed pin=%s reason=%r", pin, exc.strerror)
            else:
                removed.append(pin)
                log.info("event=bpf_handed_pin_removed pin=%s reason=stale", pin)
    return removed


def _child_compile(
    source: Source, programs: Sequence[Program], key: str, cache: ProgramCache, child: CompileChild | None,
    ran: list[CompileChild],
) -> CachedModule | None:
    request = json.dumps({
        "text": source.text, "flags": list(source.flags), "label": source.label,
        "programs": [list(p) for p in programs], "pin_path": str(cache.pin_path), "key": key,
    }).encode()
    # the child's compile does not report earlier compiles' crashes (its stderr is not logged)
    loader.report_crashed_compiles()
    started = time.perf_counter()
    warm = child is not None and child.proc is not None
    try:
        runner = child if warm else CompileChild()
        ran.append(runner)  # type: ignore[arg-type]
        status, out, err = runner.run(request)  # type: ignore[union-attr]
    except ChildCompileFailed as exc:
        log.error("event=bpf_child_compile_failed file=%s reason=%r", source.label, str(exc))
        raise
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("event=bpf_child_compile_failed file=%s reason=%r", source.label, f"{type(exc).__name__}: {exc}")
        return None
    last = (err.decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
    if status < 0:
        # a crash (LLVM aborts on a fatal error: its output is reported now) or a kill
        loader.report_crashed_compiles()
        log.error("event=bpf_child_compile_failed file=%s status=%d reason=%r", source.label, status, last)
        raise ChildCompileFailed(f"the compile child ended by signal {-status}: {last}")
    if status != 0:
        # (the compile here says what is wrong, as it always did)
        log.info("event=bpf_child_compile_failed file=%s status=%d reason=%r", source.label, status, last)
        return None
    try:
        module = cache.load(key, source.label, data=out)
    except Exception as exc:  # noqa: BLE001 - a miss: compiled here, which reports a verifier's refusal
        log.warning("event=bpf_child_compile_unusable file=%s reason=%r", source.label,
                    exc.reason if isinstance(exc, CacheMiss) else f"{type(exc).__name__}: {exc}")
        return None
    unrecorded = _unrecorded(out)
    module.compiled = True
    log.info("event=bpf_compiled_in_child file=%s programs=%d ms=%.0f started_ahead=%s key=%s", source.label,
             len(module.progs), (time.perf_counter() - started) * 1000, "yes" if warm else "no", key[:12])
    if unrecorded:  # (loaded from the maps the child handed over: there is no entry to store)
        log.warning("event=bpf_cache_not_stored file=%s reason=%r", source.label, "; ".join(unrecorded))
    else:
        _store_logged(source.label, lambda: cache.write(key, out))  # (loaded: verified)
    return module


def _unrecorded(data: bytes) -> list[str]:
    """Why the child's entry `data` (loaded) cannot be stored: its "unrecorded", when it has one."""
    unrecorded = json.loads(data.partition(b"\n")[2]).get("unrecorded", [])
    return [str(u) for u in unrecorded] if isinstance(unrecorded, list) else []


def has_entry(
    src: str | Path,
    programs: Sequence[Program],
    *,
    cflags: Sequence[str] = (),
    name: str = "",
    cache: ProgramCache,
    fresh_pins: Mapping[str, str] = {},
) -> bool:
    """Whether `cache` has an entry file for this build that load_programs would read (trusted:
    ProgramCache.has; not read, load_programs checks the rest)."""
    source = prepare(src, cflags=cflags, name=name)
    return cache.has(cache.key(source, programs, fresh_pins))


def for_config(config: Any) -> ProgramCache | None:
    """The cache a plugin loads through: `<agent.stateDir>/bpf-cache` for maps under bpf.pinPath;
    None when bpf.programCache is off."""
    if not config.bpf.program_cache:
        return None
    return ProgramCache(Path(config.agent.state_dir) / CACHE_DIR, config.bpf.pin_path)
