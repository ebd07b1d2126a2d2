"""The files source: Kubernetes manifests in a directory, for nodes without a cluster.

Every *.yaml, *.yml and *.json file directly in the directory is read (hidden files and editor
leftovers are not); a file may hold several YAML documents and kubectl-style lists. A pass
runs when inotify reports a completed change (dirwatch.py; a burst is one pass) and at least
every max(pollInterval, SAFETY_POLL) seconds, or every pollInterval where inotify cannot be
used: a file whose (mtime, size, inode) changed is read again, and only the objects that
actually changed reach the sink. A file still open for writing is not read.

A mistake in one file must never take down services that work: a file that does not parse
keeps its last good objects, an invalid object keeps its last good version while the rest of
its file applies, and each problem is reported under the file's path until it is fixed.

Services are defaulted as the API server would: missing ClusterIPs and nodePorts come from
the Allocator, and the allocated values are written into the object the sink receives.

The source is a StatusWriter (kpr.sources): LoadBalancer addresses written to it (lb_ipam)
are kept in the Allocator's state beside ClusterIPs and nodePorts and put into
status.loadBalancer.ingress of the object the sink receives, unless the manifest sets that
itself. Watchers see the objects without them (as the manifests and the Allocator make
them), so what they decide can depend on the manifests only.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import re
import stat
import sys
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence


from .. import memory
from ..model import InvalidObject
from . import SUPPORTED_KINDS, LeaseSpec, ObjectRef, ObjectSink, ServiceHandler
from .dirwatch import DirWatcher, WatchUnavailable
from .yamlload import FastSafeLoader

if TYPE_CHECKING:
    from ..allocator import Allocator

try:
    # About half json's time on manifests (0.3 of the 20k-service initial sync's 3 s); used
    # only where it agrees with json (see _load_json).
    import orjson as _orjson
except ImportError:  # pragma: no cover - a dependency; json alone gives the same objects
    _orjson = None

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")

# libyaml's parser when PyYAML has it, and plain documents built without PyYAML's
# constructor: the same safe subset as yaml.safe_load_all, faster (yamlload.py).
_Loader: Any = FastSafeLoader

# (mtime_ns, size, inode): a file whose signature is unchanged is not read again.
Signature = tuple[int, int, int]
# The signature of a file kpr could not even stat (a symlink loop, a dangling link).
NO_SIGNATURE: Signature = (-1, -1, -1)

DEFAULT_MAX_FILE_SIZE = 10 * 1024 * 1024
DEFAULT_EMPTY_GRACE_PERIOD = 60.0
# Far deeper than any Kubernetes object (managedFields included); deeper input would only
# find the recursion limit somewhere downstream.
MAX_DEPTH = 64
# A reported reason is a hint for a person, cut to this many characters per problem.
MAX_REASON = 500
# With inotify, the directory is still scanned at least this often (or every pollInterval
# when that is longer): a safety net, as events can be lost.
SAFETY_POLL = 10.0


def _nothing_busy() -> set[str]:
    return set()


class _ParseError(Exception):
    pass


@dataclass
class _FileState:
    sig: Signature
    # The file's last good objects in document order; what it contributes. Packed
    # (memory.pack) as soon as each is checked, so a pass holds the dicts of one file at a
    # time; the sink gets them packed and keeps the same bytes.
    objects: dict[ObjectRef, Any] = field(default_factory=dict)
    # Problems found reading this version of the file, reported under its path.
    errors: list[str] = field(default_factory=list)
    # The file did not parse: `objects` are left from an earlier version.
    failed: bool = False
    # namespace/name of every Service the file names, valid or not: their allocations
    # are kept when pruning (collected until that one pruning is done).
    service_keys: set[str] = field(default_factory=set)


# A worker's start costs about 0.25 s of CPU (its imports), what reading 2 MB of manifests does.
WORKER_MIN_BYTES = 2 * 1024 * 1024


def _move_places(tr: Any, read: Any, moved: dict[int, int | None]) -> bool:
    """Give a slice's reading from the worker this process's place ids; False when that
    cannot be done exactly (an id this process has none for, or an address twice, whose
    order the ids may decide)."""
    codes = read.codes
    shift = tr._ADDRESS_SHIFT
    mask = (1 << shift) - 4  # the place id's bits (the state's are the lowest two)
    if not any((c & mask) >> 2 in moved for c in codes):
        return True
    if len({c >> shift for c in codes}) != len(codes):
        return False
    out = []
    for c in codes:
        place = (c & mask) >> 2
        if place in moved:
            place = moved[place]
            if place is None:
                return False
        out.append(c & ~mask | place << 2)
    read.codes = tuple(out) if type(codes) is tuple else array(codes.typecode, out)
    return True


def worker_setting() -> str:
    """KPR_FILES_WORKER: "1" (or on) always starts the worker, "0" (or off) never, anything
    else (unset: auto) when a core is idle for it (worker_choice)."""
    value = os.environ.get("KPR_FILES_WORKER", "auto").strip().lower()
    return {"1": "on", "on": "on", "0": "off", "off": "off"}.get(value, "auto")


def worker_choice(setting: str, size: int, min_bytes: int, spare: bool) -> tuple[bool, str]:
    """(whether the files are read with a worker process, why): forced on or off, too few
    bytes to pay for its start, or in auto whether the load average leaves a core idle for
    it beside what the agent keeps busy itself (`spare`: kpr.daemon.spare_core counting the
    reading thread, and a BPF compile when one runs beside it). Measured on a 2-core VM: with
    a core free it took 0.3-0.8 s off ready at 20k services; on a busy machine it was slower in
    6 of 6 pairs (its own 0.9 s of CPU, imports and pickling, is then paid in wall time)."""
    if setting == "off":
        return False, "off"
    if size < min_bytes:
        return False, "small"  # a worker's start (its imports: 0.25 s of CPU) would cost more
    if setting == "on":
        return True, "forced"
    return (True, "idle_core") if spare else (False, "no_idle_core")


def _ignored(name: str) -> bool:
    # Hidden files include vim's .x.swp and emacs' .#x lock links; emacs autosaves are #x#.
    if name.startswith((".", "#")) or name.endswith(("~", ".swp", ".tmp")):
        return True
    return not name.endswith(SUFFIXES)


def _describe(doc: dict) -> str:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return f"{doc.get('kind') or '(no kind)'} {meta.get('namespace') or 'default'}/{meta.get('name') or '(no name)'}"


def _describe_ref(ref: ObjectRef) -> str:
    return f"{ref[0]} {ref[1]}/{ref[2]}"


def parse_manifest(name: str, data: bytes) -> list[dict]:
    """The objects in one manifest file, lists flattened; raises _ParseError with the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _ParseError(f"not UTF-8 text (byte {e.start})") from None
    docs: list[Any]
    if "\x00" in text:
        raise _ParseError(f"a binary file, not YAML or JSON text (NUL byte at offset {text.index(chr(0))})")
    by_orjson = False
    if name.endswith(".json"):
        try:
            if text.strip():
                doc, by_orjson = _load_json(text)
                docs = [doc]
            else:
                docs = []
        except json.JSONDecodeError as e:
            raise _ParseError(f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise _ParseError(f"not valid JSON: nested deeper than {MAX_DEPTH} levels") from None
    else:
        try:
            docs = _config().load_yaml(text, _Loader, many=True, max_depth=MAX_DEPTH)
        except ValueError as e:
            raise _ParseError(str(e)) from None
    # Bounded depth, and bounded size once aliases are expanded: without aliases a value
    # takes at least a byte of the file, so only an alias bomb exceeds this. JSON has no
    # aliases, nor has YAML without a `*`: only their depth is checked, by a walk that costs
    # half as much (a fifth of reading a big directory went into this check).
    if name.endswith(".json") and _json_shallow(data, MAX_DEPTH):
        # Its brackets alone show it is shallow (most files): no walk. Its floats are looked
        # for only when the text holds 19 digits in a row (what json reads as an int).
        if by_orjson and _LONG_RUN in data.translate(_DIGITS_AS_ZEROS) and _depth_walk(docs, MAX_DEPTH)[1]:
            docs = [json.loads(text)]  # an integer orjson read as a float: json's int
    elif name.endswith(".json") or "*" not in text:
        deep, floats = _depth_walk(docs, MAX_DEPTH)
        if deep:
            raise _ParseError(f"nested deeper than {MAX_DEPTH} levels")
        if floats and by_orjson and _LONG_DIGITS.search(text):
            docs = [json.loads(text)]  # an integer orjson read as a float: json's int
    else:
        shape = _config().shape_problem(docs, max_depth=MAX_DEPTH, max_nodes=100_000 + len(data), depth0=0)
        if shape:
            raise _ParseError(shape)
    out: list[dict] = []
    for i, doc in enumerate(docs, 1):
        if doc is None:
            continue  # an empty document, e.g. a trailing `---`
        if not isinstance(doc, dict):
            raise _ParseError(f"document {i} is not a mapping (got {type(doc).__name__})")
        kind = doc.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and "items" in doc:
            items = doc["items"]
            if not isinstance(items, list):
                raise _ParseError(f"document {i}: {kind}.items is not a list")
            # A typed list from the API (ServiceList) leaves kind out of its items.
            item_kind = kind[: -len("List")] if kind != "List" else None
            for j, item in enumerate(items):
                if not isinstance(item, dict):
                    raise _ParseError(f"document {i}: items[{j}] is not a mapping")
                if item_kind and "kind" not in item:
                    item = {"kind": item_kind, "apiVersion": doc.get("apiVersion"), **item}
                out.append(item)
        else:
            out.append(doc)
    return out


def _load_json(text: str) -> tuple[Any, bool]:
    """json.loads(text), and whether orjson read it. orjson takes half json's time on
    manifests and refuses most of what json reads otherwise or not at all (NaN, Infinity,
    lone surrogates, nesting past 1024): json then reads it as before, errors and messages
    included. The one thing it reads differently, an integer of 19 or more digits (a float
    for orjson), is caught by parse_manifest (a run of 19 digits, and the depth walk finds a
    float)."""
    if _orjson is not None:
        try:
            return _orjson.loads(text), True
        except _orjson.JSONDecodeError:
            pass
    return json.loads(text), False


# An integer orjson cannot hold in 64 bits (it makes a float of it; json an int).
_LONG_DIGITS = re.compile(r"[0-9]{19}")


# Every byte but JSON's brackets, quotes and backslashes (deleted by _json_shallow); ASCII
# digits as "0" and every other byte as " " (a run of 19 digits is then _LONG_RUN).
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'{}[]"\\')
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
_LONG_RUN = b"0" * 19


def _json_shallow(data: bytes, max_depth: int) -> bool:
    """Whether JSON text that json read (`data`, its bytes) surely has no container at depth
    `max_depth` (the top-level value at depth 1), as _depth_walk would find, from its
    brackets alone at C speed (the walk looks at every value: a tenth of reading a big
    directory). False when the brackets cannot tell: a string holding a bracket, a quote
    or any escape, or nesting near the bound; the walk then decides.

    With every byte but brackets and quotes deleted, a string without those is `""`, and
    dropping such pairs leaves no quote (the first string holding a bracket keeps one of
    its quotes: see the tests); what is left is the values' nesting. Each round drops the
    empty dicts, then the lists empty after that: at most two levels a round, so a text
    gone after `r` rounds nests at most 2r deep."""
    left = data.translate(None, _NOT_STRUCTURE)
    if b"\\" in left:
        return False
    left = left.replace(b'""', b"")
    if b'"' in left:
        return False
    for _ in range((max_depth - 1) // 2):
        if not left:
            return True
        shorter = left.replace(b"{}", b"").replace(b"[]", b"")
        if len(shorter) == len(left):
            return False  # not JSON's brackets after all
        left = shorter
    return not left


def _too_deep(docs: list[Any], max_depth: int) -> bool:
    """Whether a dict or list at depth `max_depth` or deeper holds anything (`docs` is at
    depth 0), as config.shape_problem finds "nested deeper than"."""
    return _depth_walk(docs, max_depth)[0]


def _depth_walk(docs: list[Any], max_depth: int) -> tuple[bool, bool]:
    """(_too_deep's answer, whether a float was seen on the way): level by level, looking
    only at the containers (JSON makes nothing else that holds values) and at the classes
    of their values."""
    level: list[Any] = [docs]
    floats = False
    for _ in range(max_depth):
        below: list[Any] = []
        add = below.append
        for value in level:
            for child in value.values() if value.__class__ is dict else value:
                cls = child.__class__
                if cls is dict or cls is list:
                    add(child)
                elif cls is float:
                    floats = True
        if not below:
            return False, floats
        level = below
    return any(level), floats


def _stat_problem(entry: os.DirEntry, e: OSError) -> str:
    """Why a listed name cannot be used, or "" when it simply went away since the listing."""
    if e.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if e.errno == errno.ENOENT:
        try:
            os.lstat(entry.path)
        except OSError:
            return ""  # removed since the listing
        return "dangling symlink (its target does not exist)"
    return f"cannot stat: {e.strerror}"


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "unknown type"


def _cut(text: str, limit: int = MAX_REASON) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when it holds more than `limit`: never more than limit + 1
    bytes in memory, whatever the file claims or grows to while read."""
    # O_NONBLOCK: a name swapped for a FIFO since the listing must not hang the pass.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file ({_file_type(st.st_mode)})")
        if st.st_size > limit:
            return None
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1024 * 1024))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        return None if len(data) > limit else data
    finally:
        os.close(fd)


def _kept(sig: Signature, old: _FileState | None, reason: str) -> _FileState:
    """The state of a file that cannot be used now: its last good objects, and why."""
    if old is None:
        return _FileState(sig, {}, [reason], True)
    return _FileState(sig, old.objects, [reason], True, old.service_keys)


def _config() -> Any:
    # Imported when a YAML file is read: the read-ahead's worker process (files_worker)
    # reading JSON then starts without pydantic (0.17 s of its 0.25 s of imports).
    from .. import config

    return config


def _allocation_error() -> type[Exception]:
    from ..allocator import AllocationError  # imported late: see _config

    return AllocationError


def _translate() -> Any:
    # Imported late: translate pulls in the whole model, and the source must be importable
    # (for `kpr check-config`) even while translate is being worked on.
    from .. import translate

    return translate


class _HeldLog:
    """The read-ahead's log lines, held until the first pass logs them: the read-ahead runs
    while plugins compile BPF code, and the loader (kpr.bpf.loader) captures fd 2 during a
    compile, so a line written then would be lost to the log and read as compiler output.
    Each record is made when its line is written (its time, thread and place), only handed
    to the handlers later: the log says when a file was read, not when it was shown."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []

    def _hold(self, level: int, msg: str, args: tuple[Any, ...], exc_info: Any) -> None:
        if not log.isEnabledFor(level):
            return
        fn, lno, func, _ = log.findCaller(stacklevel=3)  # the line that logs, not _hold
        self.records.append(log.makeRecord(log.name, level, fn, lno, msg, args, exc_info, func))

    def info(self, msg: str, *args: Any) -> None:
        self._hold(logging.INFO, msg, args, None)

    def warning(self, msg: str, *args: Any) -> None:
        self._hold(logging.WARNING, msg, args, None)

    def exception(self, msg: str, *args: Any) -> None:
        self._hold(logging.ERROR, msg, args, sys.exc_info())

    def shipped(self, level: int, msg: str, args: tuple[Any, ...], exc_text: str | None, fn: str, lno: int,
                func: str, created: float) -> None:
        """A line the read-ahead's worker process wrote (kpr.sources.files_worker), held as
        one written here: its place in the code and its time are the worker's."""
        if not log.isEnabledFor(level):
            return
        record = log.makeRecord(log.name, level, fn, lno, msg, args, None, func)
        record.exc_text = exc_text  # the worker's traceback, as text (a Formatter prints it)
        record.created, record.msecs = created, (created - int(created)) * 1000
        self.records.append(record)

    def flush(self) -> None:
        records, self.records = self.records, []
        for record in records:
            log.handle(record)


class FilesSource:
    """Feeds a sink from the manifests in ``path``; see the module docstring."""

    def __init__(
        self,
        path: Path,
        allocator: Allocator,
        poll_interval: float = 0.5,
        empty_grace_period: float = DEFAULT_EMPTY_GRACE_PERIOD,
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = Path(path)
        self.allocator = allocator
        self.poll_interval = poll_interval
        self.empty_grace_period = empty_grace_period
        self.max_file_size = max_file_size
        self._clock = clock
        # When the directory was first seen empty while objects were served; None otherwise.
        self._empty_since: float | None = None
        self._sink: ObjectSink | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Serialises passes: tests may call scan_once while the thread runs.
        self._lock = threading.Lock()
        self._files: dict[str, _FileState] = {}
        # ref -> the file holding it, or the files, sorted, when several do; the first one
        # wins. A name while one (nearly always): a list per object took 4.6 MB at 20k services.
        self._holders: dict[ObjectRef, str | list[str]] = {}
        # What the sink has been given (packed; the file's own bytes unless allocation changed it).
        self._sent: dict[ObjectRef, Any] = {}
        # Problems found across files (duplicates, allocation): ref -> {file: reason}.
        self._ref_errors: dict[ObjectRef, dict[str, str]] = {}
        self._file_ref_errors: dict[str, dict[ObjectRef, str]] = {}
        # Services whose allocation failed: tried again every pass, as whatever blocked
        # them may have gone.
        self._retry: set[ObjectRef] = set()
        # origin -> reason as last reported to the sink.
        self._reported: dict[str, str] = {}
        self._synced = False
        self._pruned = False
        self.passes = 0
        # StatusWriter: watchers of Services, writes waiting for the next pass (key ->
        # addresses), Services as watchers last saw them, and this pass's news for them.
        self._service_handlers: list[ServiceHandler] = []
        self._lb_lock = threading.Lock()
        self._lb_pending: dict[str, list[str]] = {}
        self._lb_seen: dict[ObjectRef, dict] = {}
        self._lb_news: tuple[list[dict], list[str]] = ([], [])
        # "inotify" or "poll" (watchFallback in status says why), set when the thread starts.
        self.watch_mode = "poll"
        self.watch_problem = ""
        self._busy: Callable[[], set[str]] = _nothing_busy
        self._watcher: DirWatcher | None = None
        # Files read ahead of the first pass (preload), by name; taken by that pass when
        # their signature still holds.
        self._preloaded: dict[str, _FileState] = {}
        self._preload_thread: threading.Thread | None = None
        # The read-ahead's worker process (kpr.sources.files_worker): its command (None: the
        # module's own) and the least the files must hold to be worth starting it.
        self.worker_command: list[str] | None = None
        self.worker_min_bytes = WORKER_MIN_BYTES
        # While no result from the worker waits, the read-ahead's thread reads files itself
        # (from the last one down); off, it only takes what the worker sends (tests).
        self.read_while_waiting = True
        # Whether the plugins' start, which the read-ahead and an early first pass run beside,
        # compiles BPF (the agent sets it: kpr.daemon.compile_expected): the worker then needs
        # one more idle core.
        self.compile_beside: Callable[[], bool] = lambda: False
        # Where _load_file logs: the module's logger, or the read-ahead's held lines.
        self._log: Any = log
        self._held_log = _HeldLog()

    # --- Source --------------------------------------------------------------------------

    def start(self, sink: ObjectSink) -> None:
        if self._thread is not None:
            raise RuntimeError("FilesSource already started")
        self._sink = sink
        self._stop.clear()
        # Watching from before the first pass (and in status from the start): nothing
        # written meanwhile is missed.
        self._watch()
        self._thread = threading.Thread(target=self._run, name="kpr-files", daemon=True)
        self._thread.start()
        log.info("files.start path=%s poll_interval=%.2f", self.path, self.poll_interval)

    def preload(self) -> None:
        """Read, check and pack the manifests on a thread of its own, for the first pass to
        take: the agent calls this before its plugins start, so reading overlaps their BPF
        compile (LLVM runs without the GIL) instead of following it. Nothing reaches a sink
        here: allocation and everything after it wait for the first pass, as LoadBalancer
        status written back by a plugin needs its watcher in place first."""
        if self._thread is not None or self._preload_thread is not None:
            return
        self._preload_thread = threading.Thread(target=self._preload_run, name="kpr-files-preload", daemon=True)
        self._preload_thread.start()

    @memory.gc_paused
    def _preload_run(self) -> None:
        # Under the pass lock: the first pass waits for what is being read.
        with self._lock:
            if self.passes:
                # Started after the first pass (nothing else compiles then): what it read
                # would only be held, parses and all, until a later pass threw it away.
                return
            started, cpu = time.perf_counter(), time.thread_time()
            self._log = held = self._held_log
            worker: dict[str, Any] = {}
            try:
                listing, _problems, dir_problem = self._list()
                if dir_problem:
                    return
                tr = _translate()
                # What the worker answered for is not read here; anything else is, whatever
                # became of the worker.
                answered = self._read_ahead_in_worker(tr, held, listing, worker)
                for name in sorted(listing):
                    if self._stop.is_set():
                        return
                    if name in answered:
                        continue
                    st = self._load_file(tr, name, listing[name], None)
                    if st is not None:
                        self._preloaded[name] = st
            except Exception:
                # The first pass reads whatever is missing; the traceback says what went wrong.
                held.exception("files.preload_failed path=%s", self.path)
            finally:
                self._log = log
            held.info(
                "files.preloaded files=%d ms=%.1f cpu_ms=%.1f%s",
                len(self._preloaded), (time.perf_counter() - started) * 1000, (time.thread_time() - cpu) * 1000,
                "".join(f" {k}={v}" for k, v in worker.items()),
            )
            if self._stop.is_set():
                # Stopped before any pass (a plugin failed to start): no pass will log them.
                held.flush()

    def stop(self) -> None:
        self._stop.set()
        watcher = self._watcher
        if watcher is not None:
            watcher.interrupt()
        preload, self._preload_thread = self._preload_thread, None
        if preload is not None:
            preload.join(timeout=0.9)  # it looks at the stop flag between files
        # Lines the read-ahead held for a first pass that never came (a read-ahead still
        # running flushes its own when it sees the stop flag).
        self._held_log.flush()
        thread, self._thread = self._thread, None
        if thread is not None:
            # A pass checks the stop flag between files, so this is short even mid-scan.
            thread.join(timeout=0.9)
            if thread.is_alive():
                log.warning("files.stop thread still busy; leaving it (daemon)")
        log.info("files.stop path=%s", self.path)

    def scan_once(self, sink: ObjectSink | None = None) -> bool:
        """One synchronous pass; returns whether anything was sent. The first pass sends the
        whole state and then calls ``sink.synced()``."""
        sink = sink or self._sink
        if sink is None:
            raise RuntimeError("scan_once needs a sink (or start() first)")
        with self._lock:
            return self._pass(sink)

    def origin_of(self, ref: ObjectRef) -> str | None:
        """The file an object the sink holds comes from (the one that wins), for messages."""
        holders = self._holders_of(ref)
        return str(self.path / holders[0]) if holders else None

    def _holders_of(self, ref: ObjectRef) -> list[str]:
        """The files holding `ref`, sorted (the first wins); [] when none."""
        holders = self._holders.get(ref)
        if holders is None:
            return []
        return [holders] if type(holders) is str else holders  # type: ignore[return-value]

    def _hold(self, ref: ObjectRef, name: str) -> None:
        holders = self._holders.get(ref)
        if holders is None:
            self._holders[ref] = name
        elif type(holders) is str:
            self._holders[ref] = sorted((holders, name))
        else:
            bisect.insort(holders, name)  # type: ignore[arg-type]

    # --- the pass ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """How changes are noticed: inotify events, or polling every pollInterval (and why)."""
        return {"watch": self.watch_mode, **({"watchFallback": self.watch_problem} if self.watch_problem else {})}

    def _watch(self) -> DirWatcher | None:
        """An inotify watch on the directory, or None (then it is polled) with the reason kept."""
        try:
            # A ConfigMap volume swaps its hidden ..data link: that one matters.
            watcher = DirWatcher(self.path, lambda name: _ignored(name) and not name.startswith(".."))
        except WatchUnavailable as e:
            if e.strerror != self.watch_problem:
                log.warning("files.watch_unavailable path=%s reason=%s; polling every %.2fs", self.path, e.strerror, self.poll_interval)
            self.watch_mode, self.watch_problem = "poll", str(e.strerror)
            return None
        if self.watch_mode != "inotify":
            log.info("files.watching path=%s safety_poll=%.1fs", self.path, max(self.poll_interval, SAFETY_POLL))
        self.watch_mode, self.watch_problem = "inotify", ""
        self._busy, self._watcher = watcher.busy, watcher
        return watcher

    def _run(self) -> None:
        assert self._sink is not None
        watcher = self._watcher
        while not self._stop.is_set():
            try:
                self.scan_once(self._sink)
            except Exception:
                # Keep polling: the next pass may well succeed (a file being written, a
                # sink hiccup); the traceback says what went wrong.
                log.exception("files.scan_failed path=%s", self.path)
            if watcher is None or watcher.gone:
                if watcher is not None:
                    self._busy, self._watcher = _nothing_busy, None
                    watcher.close()
                self._stop.wait(self.poll_interval)
                # The directory may exist (again) now.
                watcher = None if self._stop.is_set() else self._watch()
                continue
            # Events wake the pass; the poll stays as a slow safety net (events lost to an
            # overflowing queue, a filesystem inotify misreports).
            timeout = max(self.poll_interval, SAFETY_POLL)
            if self._empty_since is not None:
                # Nothing changes when the grace period ends: wake for it.
                timeout = min(timeout, max(0.0, self._empty_since + self.empty_grace_period - self._clock()) + 0.01)
            watcher.wait(timeout)
        if watcher is not None:
            self._busy, self._watcher = _nothing_busy, None
            watcher.close()

    def _list(self) -> tuple[dict[str, Signature], dict[str, str], str]:
        """(signature of each manifest file, problem of each one kpr cannot use, a problem
        with the directory itself)."""
        sigs: dict[str, Signature] = {}
        problems: dict[str, str] = {}
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return sigs, problems, "directory does not exist"
        except NotADirectoryError:
            return sigs, problems, "not a directory"
        except OSError as e:
            return sigs, problems, f"cannot list directory: {e.strerror}"
        for entry in entries:
            if _ignored(entry.name):
                continue
            try:
                # Follows symlinks: a ConfigMap volume swaps its ..data link, which changes
                # the inode seen through the file's own (unchanged) link.
                st = entry.stat()
            except OSError as e:
                reason = _stat_problem(entry, e)
                if reason:
                    problems[entry.name] = reason
                continue
            if stat.S_ISREG(st.st_mode):
                sigs[entry.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
            else:
                problems[entry.name] = f"not a regular file ({_file_type(st.st_mode)})"
        return sigs, problems, ""

    @memory.gc_paused
    def _pass(self, sink: ObjectSink) -> bool:
        try:
            return self._pass_once(sink)
        finally:
            # What validation read and the store did not translate (unchanged objects).
            _translate().forget_checked()

    def _pass_once(self, sink: ObjectSink) -> bool:
        started = time.perf_counter()
        self.passes += 1
        tr = _translate()
        # The read-ahead's lines: the plugins have started, nothing captures fd 2 now (and a
        # first pass that finds no directory logs them too).
        self._held_log.flush()
        listing, problems, dir_problem = self._list()
        dir_origin = str(self.path)
        if dir_problem:
            # Keep what we have: a directory that vanished is far more likely a mount not
            # there yet than a wish to delete every service.
            self._empty_since = None
            self._report(sink, dir_origin, dir_problem)
            self._finish_first_pass(sink)
            return False

        busy = self._busy()  # open for writing (inotify): their last good state stays for now
        changed = sorted(n for n, sig in listing.items() if (n not in self._files or self._files[n].sig != sig) and n not in busy)
        removed = sorted(n for n in self._files if n not in listing and n not in problems)
        parsed: dict[str, _FileState] = {}
        if self.passes == 1 and not self._preloaded and changed:
            # A first pass without read-ahead (it runs while the plugins start, or the node
            # was busy): a worker process reads with it, as a read-ahead would.
            self._read_with_worker(tr, {n: listing[n] for n in changed})
        preloaded, self._preloaded = self._preloaded, {}
        for name in changed:
            if self._stop.is_set():
                return False  # nothing committed yet; the state stays consistent
            st = preloaded.pop(name, None)
            if st is None or st.sig != listing[name] or name in self._files:
                st = self._load_file(tr, name, listing[name], self._files.get(name))
            if st is not None:
                parsed[name] = st
        for name, reason in sorted(problems.items()):
            # A name kpr cannot read (a symlink loop, a dangling link, a directory) keeps its
            # last good objects, like a file that does not parse.
            old = self._files.get(name)
            if old is None or old.sig != NO_SIGNATURE or old.errors != [reason]:
                parsed[name] = _kept(NO_SIGNATURE, old, reason)
        if self._distrust_emptiness(sink, dir_origin, bool(listing or problems), parsed, removed):
            return False
        self._report(sink, dir_origin, "")

        dirty: set[ObjectRef] = set()
        touched: set[str] = set(removed) | set(parsed)
        for name in removed:
            old = self._files.pop(name)
            for ref in old.objects:
                self._unhold(ref, name)
            dirty.update(old.objects)
            log.info("files.removed file=%s objects=%d", name, len(old.objects))
        for name, st in parsed.items():
            old = self._files.get(name)
            old_objects = old.objects if old is not None else {}
            for ref in old_objects.keys() - st.objects.keys():
                self._unhold(ref, name)
                dirty.add(ref)
            for ref, obj in st.objects.items():
                prev = old_objects.get(ref)
                if prev is None:
                    self._hold(ref, name)
                    dirty.add(ref)
                elif not memory.same(prev, obj):
                    dirty.add(ref)
            self._files[name] = st
            if not st.failed:
                log.info("files.reload file=%s objects=%d errors=%d", name, len(st.objects), len(st.errors))
        dirty |= self._retry
        dirty |= self._take_lb_writes()
        self._prune_allocations()

        upserts, deletes = self._resolve(dirty, touched)
        for name in sorted(touched):
            self._report_file(sink, name)
        if upserts or deletes:
            sink.apply(list(upserts.values()), deletes)
        self._tell_service_handlers()
        self._finish_first_pass(sink)
        if self.allocator.dirty:
            try:
                self.allocator.save()
            except OSError as e:
                # Serving goes on; only stability across a restart is at risk.
                log.error("files.allocations_not_saved path=%s error=%s", self.allocator.state_path, e)
        if changed or removed or upserts or deletes:
            log.info(
                "files.scan files=%d changed=%d removed=%d upserts=%d deletes=%d ms=%.1f",
                len(listing), len(changed), len(removed), len(upserts), len(deletes),
                (time.perf_counter() - started) * 1000,
            )
        return bool(upserts or deletes)

    def _distrust_emptiness(
        self, sink: ObjectSink, origin: str, any_files: bool, parsed: dict[str, _FileState], removed: list[str]
    ) -> bool:
        """Whether to keep the last good state because the directory suddenly holds nothing.

        "Empty" is the state this pass would leave: no object from any file, because there is
        no manifest file or every one is empty (or holds nothing kpr serves). A file that does
        not parse or cannot be read keeps its last good objects, so it never makes the
        directory empty. Emptiness is believed once it has lasted source.emptyGracePeriod;
        at start-up (nothing served yet) at once.
        """
        would_hold = any(
            (parsed[n] if n in parsed else st).objects for n, st in self._files.items() if n not in removed
        ) or any(st.objects for n, st in parsed.items() if n not in self._files)
        if would_hold or not self._sent:
            self._empty_since = None
            return False
        now = self._clock()
        if self._empty_since is None:
            self._empty_since = now
        if now - self._empty_since >= self.empty_grace_period:
            log.warning(
                "files.empty_trusted path=%s objects=%d after=%.1fs", self.path, len(self._sent), now - self._empty_since
            )
            return False
        what = "no objects in its manifest files" if any_files else "no manifest files"
        self._report(
            sink,
            origin,
            f"empty ({what}) while {len(self._sent)} objects were served; keeping them until it has stayed "
            f"empty for {self.empty_grace_period:g}s (source.emptyGracePeriod)",
        )
        return True

    def _finish_first_pass(self, sink: ObjectSink) -> None:
        if not self._synced:
            self._synced = True
            sink.synced()
            log.info("files.synced objects=%d", len(self._sent))

    def _prune_allocations(self) -> None:
        """Release the saved allocations of services no file names any more.

        Only once every file has been read (and parsed: a broken file may name services),
        or a restart would hand their values to others; and before any allocation, so a
        service that went away while kpr was down does not hold a contested value.
        """
        if self._pruned or any(st.failed for st in self._files.values()):
            return
        self._pruned = True
        keep = {f"{ref[1]}/{ref[2]}" for ref in self._holders if ref[0] == "Service"}
        for st in self._files.values():
            keep |= st.service_keys
            st.service_keys.clear()  # needed for this one pruning only (a string per Service)
        n = self.allocator.retain(keep)
        if n:
            log.info("files.allocations_released services=%d", n)

    def _load_file(self, tr: Any, name: str, sig: Signature, old: _FileState | None) -> _FileState | None:
        path = self.path / name
        last_good = old.objects if old is not None else {}
        too_big = (
            f"larger than source.maxFileSize ({self.max_file_size} bytes); not read, "
            f"{'keeping its last good objects' if last_good else 'nothing from it applied'}"
        )
        if sig[1] > self.max_file_size:
            return _kept(sig, old, too_big)
        for _ in range(3):
            try:
                data = _read_bounded(path, self.max_file_size)
                after = os.stat(path)
            except OSError as e:
                return _kept(sig, old, f"cannot read: {e.strerror}")
            if data is None:
                # Grew past the cap while being read: the version on disk is the new one.
                return _kept((after.st_mtime_ns, after.st_size, after.st_ino), old, too_big)
            now = (after.st_mtime_ns, after.st_size, after.st_ino)
            if now == sig:
                break
            # Written to since it was listed (or while read): read it again, so the state
            # kept is that of the version actually read and never half a file.
            sig = now
        else:
            self._log.info("files.busy file=%s; trying next pass", name)
            return None
        try:
            docs = parse_manifest(name, data)
            if not name.endswith(".json"):
                # YAML makes a string per key: interned, an object packs each key once (json
                # shares a file's keys already, and the time is better spent elsewhere).
                docs = [memory.compact(d) for d in docs]
        except _ParseError as e:
            self._log.warning("files.parse_failed file=%s reason=%s kept=%d", name, e, len(last_good))
            return _kept(sig, old, str(e))

        st = _FileState(sig)
        rules = tr.address_rules(self.allocator.cluster_cidrs)
        for doc in docs:
            meta = doc.get("metadata")
            # The API server puts objects without a namespace into "default".
            if isinstance(meta, dict) and not meta.get("namespace"):
                meta["namespace"] = "default"
            kind = doc.get("kind")
            if kind == "Service" and isinstance(meta, dict) and isinstance(meta.get("name"), str) and not self._pruned:
                st.service_keys.add(f"{meta['namespace']}/{meta['name']}")
            if kind not in SUPPORTED_KINDS:
                st.errors.append(f"{_describe(doc)}: kind {kind!r} is not supported (only {', '.join(SUPPORTED_KINDS)}); skipped")
                continue
            ref: ObjectRef | None = None
            try:
                ref = tr.object_ref(doc)
                read = tr.validate_object(doc, rules, ref)
            except Exception as e:
                label = _describe(doc)  # made only for a problem: most objects have none
                # validate_object names the object itself; other exceptions do not.
                reason = str(e) if str(e).startswith(label) else f"{label}: {e}"
                if not isinstance(e, (InvalidObject, ValueError, TypeError, KeyError, AttributeError)):
                    # A bug in validation must cost this object, not the pass (and every
                    # later pass, as the file would be read again and again).
                    self._log.exception("files.validate_crashed file=%s object=%s", name, label)
                    reason = f"{label}: validation failed ({type(e).__name__}: {e}), a bug in kpr"
                prev = last_good.get(ref) if ref is not None else None
                if prev is not None and ref not in st.objects:
                    st.objects[ref] = prev
                    st.errors.append(f"{reason}; keeping its last good version")
                else:
                    st.errors.append(f"{reason}; skipped")
                continue
            if ref in st.objects:
                st.errors.append(f"{_describe(doc)} appears twice in this file; the first is used")
                continue
            packed = memory.pack(doc)
            # An object unchanged by an edit elsewhere in the file stays the bytes the store (and
            # its Over) holds: a new equal copy would be kept beside it until the object changes.
            # (Equal objects may pack to other bytes: marshal's references follow refcounts.)
            prev = last_good.get(ref)
            if type(prev) is bytes and (prev == packed or memory.same(prev, doc)):
                packed = prev
            st.objects[ref] = packed
            # The store translates these bytes later in this pass: not read twice.
            tr.remember_checked(packed, read, ref)
        return st

    def _read_with_worker(self, tr: Any, listing: dict[str, Signature]) -> None:
        """The first pass's reading of `listing` with a worker process, into _preloaded; its
        lines logged as the pass logs its own."""
        held, stats = _HeldLog(), {}
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            self._read_ahead_in_worker(tr, held, listing, stats)
        finally:
            held.flush()
        if stats:
            log.info(
                "files.read_with_worker files=%d ms=%.1f cpu_ms=%.1f%s",
                len(self._preloaded), (time.perf_counter() - started) * 1000, (time.thread_time() - cpu) * 1000,
                "".join(f" {k}={v}" for k, v in stats.items()),
            )

    def _worker_chosen(self, held: _HeldLog, listing: dict[str, Signature]) -> bool:
        """Whether to read `listing` with a worker process, logged with what decided it (one
        line). The worker needs a core of its own beside the thread reading with it and, while
        the plugins start, their BPF compile (compile_beside, set by the agent)."""
        setting, size = worker_setting(), sum(sig[1] for sig in listing.values())
        busy, spare, load, cpus = 0, False, float("nan"), 0
        if setting != "off" and size >= self.worker_min_bytes:
            from ..daemon import spare_core  # imported late: the worker process never decides

            # Only auto weighs a compile (on starts the worker whatever the cores do): the
            # guess imports kpr.bpf.progcache, a quarter second.
            busy = 1 if setting == "auto" and self.compile_beside() else 0
            spare, load, cpus = spare_core(busy)
        on, reason = worker_choice(setting, size, self.worker_min_bytes, spare)
        held.info(
            "files.worker on=%s reason=%s setting=%s bytes=%d load=%.2f cpus=%d compile_beside=%s",
            "yes" if on else "no", reason, setting, size, load, cpus, "yes" if busy else "no",
        )
        return on

    def _read_ahead_in_worker(
        self, tr: Any, held: _HeldLog, listing: dict[str, Signature], stats: dict[str, Any]
    ) -> set[str]:
        """Read the files with a worker process (kpr.sources.files_worker): it reads, checks
        and packs them from the first on, and this thread takes each file's result as
        _load_file would have made it here, reading files itself from the last one down
        while none is waiting, until the two meet. The names read either way; whatever
        became of the worker, the caller reads the rest (a failure is one warning line)."""
        from .. import model
        from . import files_worker

        done: set[str] = set()
        job = {
            "path": str(self.path), "max_file_size": self.max_file_size,
            "cluster_cidrs": tuple(self.allocator.cluster_cidrs), "places": list(model.places),
            "files": sorted(listing.items()),
        }
        try:
            if not self._worker_chosen(held, listing):
                return done
            worker = files_worker.Worker(job, self.worker_command)
        except Exception as e:
            # Whatever keeps the worker from starting (no temp dir, no fd left, the choice
            # failing) costs this line, never the pass: the caller reads every file here.
            reason = str(e) if isinstance(e, files_worker.WorkerFailed) else f"not started ({type(e).__name__}: {e})"
            held.warning("files.worker_failed path=%s reason=%r; reading in the agent", self.path, reason)
            return done
        # The worker's place id -> this process's, where they differ (this thread read a
        # slice naming a new place first): its slices' readings are moved to these ids.
        next_place, moved = len(job["places"]), {}
        mine = sorted(listing)  # this thread reads from the last one down (the worker up)
        by_worker = 0
        grace = 0.0
        try:
            while True:
                while mine and self.read_while_waiting and not worker.ready() and not self._stop.is_set():
                    # Nothing from the worker to take: read the last file not read yet.
                    name = mine.pop()
                    if name in done:
                        mine.clear()  # the worker got here: the rest is its
                        break
                    st = self._load_file(tr, name, listing[name], None)
                    if st is not None:
                        self._preloaded[name] = st
                    done.add(name)
                if not by_worker and len(done) == len(listing):
                    # This thread read every file before the worker sent one (it was still
                    # starting: a busy machine): nothing left to wait for, it is ended.
                    stats["worker_files"] = 0
                    break
                if not mine and self.read_while_waiting:
                    worker.ask_to_stop()  # it sends the file it is at, then "done"
                message = worker.next(self._stop.is_set)
                if message[0] == "done":
                    stats["worker_files"] = by_worker
                    stats["worker_cpu_ms"] = f"{message[1] * 1000:.1f}"
                    stats["worker_peak_mb"] = f"{message[2] / 1024:.1f}"
                    grace = 2.0
                    break
                _, name, result, new_places, records = message
                for pair in new_places:
                    got = model.place_id(*pair)
                    if got != next_place:
                        moved[next_place] = got
                    next_place += 1
                if name in done:
                    continue  # read here too (both got to it): this thread's result stands
                st = self._from_worker(tr, result, moved)
                for record in records:
                    held.shipped(*record)
                if st is not None:
                    self._preloaded[name] = st
                done.add(name)
                by_worker += 1
        except files_worker.WorkerFailed as e:
            if not self._stop.is_set():
                held.warning("files.worker_failed path=%s reason=%r files=%d; reading the rest in the agent",
                             self.path, str(e), by_worker)
        except Exception as e:
            # A message that is not what the worker sends: that file (and the rest) read here.
            held.warning("files.worker_failed path=%s reason=%r files=%d; reading the rest in the agent",
                         self.path, f"bad output ({type(e).__name__}: {e})", by_worker)
        finally:
            worker.close(grace)
        return done

    @staticmethod
    def _from_worker(tr: Any, result: Any, moved: dict[int, int | None]) -> _FileState | None:
        """The _FileState a worker's result stands for (None: the file was being written),
        its objects' validation readings remembered as _load_file remembers them; checked
        whole before anything is remembered (a bad message raises, nothing half taken)."""
        if result is None:
            return None
        from sys import intern

        from ..model import ServiceKey

        sig, errors, failed, service_keys, objects = result
        st = _FileState(tuple(sig), {}, list(errors), bool(failed), set(service_keys))
        if len(st.sig) != 3 or not all(type(e) is str for e in st.errors):
            raise ValueError("not a file's result")
        remembered = []
        for ref, packed, read in objects:
            # Interned, as object_ref makes them (the store and the source key by them).
            kind, ns, name = ref
            ref = (intern(kind), intern(ns), intern(name))
            st.objects[ref] = packed
            key = getattr(read, "key", None)
            if key is not None:
                # The namespace (and a Service's name) are the ref's strings, as they are here.
                key_ns = ref[1] if key.namespace == ref[1] else key.namespace
                key_name = ref[2] if key.name == ref[2] else key.name
                if key_ns is not key.namespace or key_name is not key.name:
                    read.key = ServiceKey(key_ns, key_name)
            if moved and getattr(read, "codes", None) is not None and not _move_places(tr, read, moved):
                read = None  # the store reads this slice again
            remembered.append((packed, read, ref))
        for packed, read, ref in remembered:
            tr.remember_checked(packed, read, ref)
        return st

    def _unhold(self, ref: ObjectRef, name: str) -> None:
        holders = self._holders.get(ref)
        if holders is None:
            return
        if type(holders) is str:
            if holders == name:
                del self._holders[ref]
            return
        try:
            holders.remove(name)  # type: ignore[union-attr]
        except ValueError:
            pass
        if len(holders) == 1:
            self._holders[ref] = holders[0]
        elif not holders:
            del self._holders[ref]

    def _in_order(self, dirty: set[ObjectRef]) -> list[ObjectRef]:
        """`dirty` in _resolve's order without sorting, for a pass where much is dirty (a
        first pass: sorting 40k refs by file and place took about 0.1 s at 20k services):
        refs no file holds first, as the set has them, then file by file in each file's
        order, every ref under the file that wins it."""
        holders = self._holders
        out = [ref for ref in dirty if ref not in holders]
        for name in sorted(self._files):
            for ref in self._files[name].objects:
                if ref in dirty:
                    first = holders[ref]
                    if (first if type(first) is str else first[0]) == name:
                        out.append(ref)
        return out

    def _resolve(self, dirty: set[ObjectRef], touched: set[str]) -> tuple[dict[ObjectRef, dict], list[ObjectRef]]:
        """Work out what each dirty ref now is and which changes the sink needs."""
        tr = _translate()
        upserts: dict[ObjectRef, dict] = {}
        deletes: list[ObjectRef] = []

        # Each file's objects by their place in it, made for the files this pass needs (kept
        # per file, these took 1.8 MB at 20k services).
        positions: dict[str, dict[ObjectRef, int]] = {}

        def order(ref: ObjectRef) -> tuple[int, str, int]:
            holders = self._holders_of(ref)
            if not holders:
                return (0, "", 0)  # deletes first: they free allocations for the rest
            place = positions.get(holders[0])
            if place is None:
                place = positions[holders[0]] = {r: i for i, r in enumerate(self._files[holders[0]].objects)}
            return (1, holders[0], place.get(ref, 0))

        queue = deque(self._in_order(dirty) if len(dirty) * 4 > len(self._holders) else sorted(dirty, key=order))
        # A service moved by another's explicit value gets a free automatic one, so it never
        # moves anyone in turn; the cap only guards against a bug looping a pass forever.
        visits: dict[ObjectRef, int] = {}
        failed: list[ObjectRef] = []
        progress_after_failure = False
        retried = False
        while queue or (failed and progress_after_failure and not retried):
            if not queue:
                # Something freed a value after a service was refused it (another service
                # moved off it later in this pass): one more try, so no error flickers.
                queue.extend(failed)
                failed.clear()
                retried = True
            ref = queue.popleft()
            holders = self._holders_of(ref)
            # Nearly every object has one file: no comprehension run for nothing.
            errors = {
                f: f"{_describe_ref(ref)} is also defined in {holders[0]}, which wins; ignored here"
                for f in holders[1:]
            } if len(holders) > 1 else {}
            if not holders:
                self._set_ref_errors(ref, {}, touched)
                self._retry.discard(ref)
                if ref in self._sent:
                    del self._sent[ref]
                    upserts.pop(ref, None)
                    deletes.append(ref)
                if ref[0] == "Service":
                    self.allocator.release(f"{ref[1]}/{ref[2]}")
                    progress_after_failure = bool(failed)
                    if self._lb_seen.pop(ref, None) is not None:
                        self._lb_news[1].append(f"{ref[1]}/{ref[2]}")
                continue
            winner = holders[0]
            packed = self._files[winner].objects[ref]
            written = tr.written_allocation(packed) if ref[0] == "Service" else None
            if written is not None and ref not in self._lb_seen:
                # A manifest writing its one IPv4 ClusterIP (every Service of a cluster's export):
                # allocated from validation's reading, without unpacking it, diffing the
                # allocated copy (pack_over) or reading it again (checked_after_allocation):
                # the same outcome, 0.1-0.15 s less of a 20k-service first pass.
                ip, keys, values = written
                made = memory.over(packed, keys, values)
                if made is not None and self.allocator.take_written(f"{ref[1]}/{ref[2]}", ip):
                    progress_after_failure = self._allocated_ok(ref, errors, touched, failed) or progress_after_failure
                    # (not a LoadBalancer, nor one before: _lb_status would change nothing)
                    tr.remember_checked(made, tr.take_checked(packed), ref)
                    self._send(ref, made, upserts, deletes)
                    continue
            # Only a Service is read here (allocation); the rest goes to the sink packed.
            obj = read = memory.unpack(packed) if ref[0] == "Service" else packed
            if ref[0] == "Service":
                tr.share_cluster_ip_texts(packed, obj)
                try:
                    alloc = self.allocator.allocate(obj)
                except _allocation_error() as e:
                    kept = "; keeping its last good version" if ref in self._sent else "; not applied"
                    errors[winner] = f"{_describe_ref(ref)}: {e}{kept}"
                    self._set_ref_errors(ref, errors, touched)
                    self._retry.add(ref)
                    if ref not in failed:
                        failed.append(ref)
                    continue
                progress_after_failure = self._allocated_ok(ref, errors, touched, failed) or progress_after_failure
                obj = self._lb_status(ref, alloc.obj)
                for key in sorted(alloc.displaced) if alloc.displaced else ():
                    ns, _, name = key.partition("/")
                    moved = ("Service", ns, name)
                    visits[moved] = visits.get(moved, 0) + 1
                    if moved in self._holders and moved not in queue and visits[moved] <= 3:
                        queue.append(moved)
            elif errors or ref in self._ref_errors:  # else nothing to set or clear
                self._set_ref_errors(ref, errors, touched)
            if obj is not read:
                # as changes over the file's version, which the source keeps anyway (memory.pack_over)
                allocated, obj = obj, memory.pack_over(packed, read, obj)
                # Validation's reading of the manifest's version, brought up to date with what
                # allocation filled in (translate.checked_after_allocation): not read again by the store.
                # Moved, not copied: the store takes it by the allocated object's key, and one
                # left under the file's bytes lived until the pass ended (650 bytes a Service,
                # 13 MB at 20k, freed after the model was made: holes nothing filled).
                tr.remember_checked(obj, tr.checked_after_allocation(packed, read, allocated), ref)
                tr.take_checked(packed)
            else:
                obj = packed
            self._send(ref, obj, upserts, deletes)
        return upserts, deletes

    def _allocated_ok(self, ref: ObjectRef, errors: dict[str, str], touched: set[str], failed: list[ObjectRef]) -> bool:
        """What a Service allocated (the short way or the general one) leaves: no retry
        pending, its errors set or cleared (only when there are some, old or new); returns
        whether a refusal came before it in this pass (something may have been freed for it)."""
        self._retry.discard(ref)
        if errors or ref in self._ref_errors:
            self._set_ref_errors(ref, errors, touched)
        return bool(failed)

    def _send(self, ref: ObjectRef, obj: Any, upserts: dict[ObjectRef, Any], deletes: list[ObjectRef]) -> None:
        """`obj` (packed) is what `ref` now is: an upsert for the sink unless sent already."""
        sent = self._sent.get(ref)
        if sent is None or not memory.same(sent, obj):
            self._sent[ref] = obj
            upserts[ref] = obj
            if ref in deletes:
                deletes.remove(ref)

    # --- StatusWriter (kpr.sources) -------------------------------------------------------

    independent = True

    def watch_services(self, handler: ServiceHandler) -> None:
        with self._lock:
            self._service_handlers.append(handler)
            if self._lb_seen:
                handler([memory.unpack(o) for o in self._lb_seen.values()], [])

    def elect(self, lease: LeaseSpec, on_change: Callable[[bool], None]) -> None:
        # Every node writes its own copy: nothing to compete for.
        on_change(True)

    def resign(self) -> None:
        pass

    def write_load_balancer(self, key: str, ips: Sequence[str], problem: str = "") -> bool:
        # Taken by the next pass, which owns the Allocator; a problem is the
        # writer's to report (the files source has no conditions).
        with self._lb_lock:
            self._lb_pending[key] = list(ips)
        watcher = self._watcher
        if watcher is not None:
            watcher.interrupt()  # a pass now; without inotify the next poll takes it
        return True

    def _take_lb_writes(self) -> set[ObjectRef]:
        with self._lb_lock:
            pending, self._lb_pending = self._lb_pending, {}
        dirty: set[ObjectRef] = set()
        for key, ips in pending.items():
            if self.allocator.set_load_balancer(key, ips):
                ns, _, name = key.partition("/")
                dirty.add(("Service", ns, name))
        return dirty

    def _lb_status(self, ref: ObjectRef, obj: dict) -> dict:
        """`obj` with its written LoadBalancer addresses; watchers hear of `obj` as it was."""
        if not self._service_handlers:
            # No writer runs (lb_ipam turned off): what it wrote once is not served.
            return obj
        spec = obj.get("spec")
        is_lb = isinstance(spec, dict) and spec.get("type") == "LoadBalancer"
        # Only LoadBalancers (and one that just stopped being one) are kept for watchers.
        if (is_lb or ref in self._lb_seen) and not memory.same(self._lb_seen.get(ref), obj):
            # Packed: 10k LoadBalancers would otherwise be held twice as dicts.
            self._lb_seen[ref] = memory.pack(obj)
            self._lb_news[0].append(obj)
        ips = self.allocator.load_balancer(f"{ref[1]}/{ref[2]}")
        if not ips or not is_lb:
            return obj
        status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
        if isinstance(status.get("loadBalancer"), dict) and status["loadBalancer"].get("ingress"):
            return obj  # the manifest's own
        return {**obj, "status": {**status, "loadBalancer": {"ingress": [{"ip": ip} for ip in ips]}}}

    def _tell_service_handlers(self) -> None:
        upserts, deletes = self._lb_news
        self._lb_news = ([], [])
        if upserts or deletes:
            for handler in self._service_handlers:
                handler(upserts, deletes)

    # --- errors --------------------------------------------------------------------------

    def _set_ref_errors(self, ref: ObjectRef, errors: dict[str, str], touched: set[str]) -> None:
        old = self._ref_errors.get(ref, {})
        if old == errors:
            return
        for f in old:
            self._file_ref_errors.get(f, {}).pop(ref, None)
            touched.add(f)
        for f, reason in errors.items():
            self._file_ref_errors.setdefault(f, {})[ref] = reason
            touched.add(f)
        if errors:
            self._ref_errors[ref] = errors
        else:
            self._ref_errors.pop(ref, None)

    def _report_file(self, sink: ObjectSink, name: str) -> None:
        st = self._files.get(name)
        parts = list(st.errors) if st is not None else []
        ref_errors = self._file_ref_errors.get(name, {})
        parts += [ref_errors[r] for r in sorted(ref_errors)]
        # A value quoted in a reason may be huge (a megabyte of name): status stays readable.
        parts = [_cut(p) for p in parts]
        if not ref_errors:
            self._file_ref_errors.pop(name, None)
        self._report(sink, str(self.path / name), "; ".join(parts))

    def _report(self, sink: ObjectSink, origin: str, reason: str) -> None:
        if reason:
            if self._reported.get(origin) != reason:
                self._reported[origin] = reason
                log.warning("files.error origin=%s reason=%s", origin, reason)
                sink.report_error(origin, reason)
        elif origin in self._reported:
            del self._reported[origin]
            log.info("files.error_cleared origin=%s", origin)
            sink.clear_error(origin)
