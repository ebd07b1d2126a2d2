"""`kpr monitor`: read the programs' events from the pinned ring buffer (lib/monitor.h).

The event types, hooks and reasons are read from lib/monitor.h's #defines (one definition),
and `MonEvent` and `MonCfg` are its structs, both through kpr.bpf.abi. A
`Monitor` raises kpr_mon_cfg.on while it is open, so the programs emit only while someone
listens, and lowers it on close. The ring buffer is read through libbpf's ring_buffer API.

Filtering by type and sampling are done in the programs (kpr_mon_cfg.types, .sample) for the
only listener; filters by service, address and reason are applied here. Listeners register
as files under registry_dir(), so one killed with SIGKILL stops counting at the next start or
stop of another.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bpf import abi
from .bpf import maps as M
from .bpf.inline import BPF_DIR

log = logging.getLogger(__name__)

__all__ = ["Event", "EventFilter", "MonEvent", "Monitor", "MonitorError", "TYPES", "HOOKS", "NEW_HOW", "REASONS"]

MONITOR_H = BPF_DIR / "lib" / "monitor.h"
CFG_MAP, RING_MAP = "kpr_mon_cfg", "kpr_mon_ring"
# Running monitors register here (one directory per pin path), so a killed one is noticed:
# under the agent's runtime directory where there is one, else under /tmp.
RUN_DIR = Path("/run/kpr")


def registry_dir() -> Path:
    return RUN_DIR / "monitor" if RUN_DIR.is_dir() else Path(tempfile.gettempdir()) / "kpr-monitor"


def _defines(prefix: str) -> dict[int, str]:
    """value -> lower-case name of every `#define KPR_MON_<prefix>_<NAME> <n>` (kpr.bpf.abi)."""
    return {v: name.lower() for name, v in abi.group(f"KPR_MON_{prefix}_").items()}


TYPES = _defines("T")  # 1: "new", 2: "drop", ...
HOOKS = _defines("HOOK")  # 1: "socket", 2: "tc", 3: "xdp"
NEW_HOW = _defines("NEW")  # 1: "socket", 2: "local", ...
REASONS = _defines("R")  # 1: "no_backend", ... (the drop counters' names, kpr.drops)

# struct kpr_mon_event (lib/monitor.h), read from the header; addresses as 16 bytes
MonEvent = abi.ctype("kpr_mon_event", unions_as_bytes=True)
MonCfg = abi.ctype("kpr_mon_cfg")  # struct kpr_mon_cfg


class MonitorError(RuntimeError):
    """The monitor cannot run; the message says why."""


def _endpoint(raw: bytes, port_be: int) -> str:
    addr = M.bytes_to_addr(raw)
    host = f"[{addr}]" if ":" in addr else addr
    return f"{host}:{M.ntohs(port_be)}"


# Wall clock = monotonic (bpf_ktime_get_ns) + this offset, taken once.
_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


@dataclass
class Event:
    type: str
    hook: str
    reason: str  # drops/refusals: the drop counter's name; new flows: how (socket, local, snat, dsr)
    protocol: str
    frontend: str
    frontend_address: str
    client: str | None  # "addr:port"; None at the socket hook (chosen after connect())
    client_address: str | None
    backend: str | None
    backend_address: str | None
    rev_nat: int
    backend_id: int
    cookie: int
    ts_ns: int
    service: str = ""

    @classmethod
    def decode(cls, raw: bytes) -> "Event":
        e = MonEvent.from_buffer_copy(raw[: ctypes.sizeof(MonEvent)])
        type_ = TYPES.get(e.type, str(e.type))
        reason = (NEW_HOW if e.type == _T_NEW else REASONS).get(e.reason, str(e.reason)) if e.reason else ""
        saddr, daddr, baddr = bytes(e.saddr), bytes(e.daddr), bytes(e.baddr)
        socket_hook = HOOKS.get(e.hook) == "socket"
        has_backend = any(baddr) or e.bport
        # a drop decided where no packet headers were at hand (kpr_mon_bare): no addresses
        bare = not (e.proto or any(daddr) or any(saddr) or e.dport or e.sport)
        return cls(
            type=type_,
            hook=HOOKS.get(e.hook, str(e.hook)),
            reason=reason,
            protocol="" if bare else M.PROTO_NAMES.get(e.proto, str(e.proto)),
            frontend="" if bare else _endpoint(daddr, e.dport),
            frontend_address="" if bare else M.bytes_to_addr(daddr),
            client=None if socket_hook or bare else _endpoint(saddr, e.sport),
            client_address=None if socket_hook or bare else M.bytes_to_addr(saddr),
            backend=_endpoint(baddr, e.bport) if has_backend else None,
            backend_address=M.bytes_to_addr(baddr) if has_backend else None,
            rev_nat=e.rev_nat,
            backend_id=e.backend_id,
            cookie=e.cookie,
            ts_ns=e.ts + _WALL_OFFSET_NS,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.ts_ns / 1e9,
            "type": self.type,
            "hook": self.hook,
            "reason": self.reason,
            "protocol": self.protocol,
            "client": self.client,
            "frontend": self.frontend or None,
            "backend": self.backend,
            "service": self.service or None,
            "revNat": self.rev_nat,
            "backendId": self.backend_id,
            "cookie": self.cookie or None,
        }

    def text(self) -> str:
        t = time.strftime("%H:%M:%S", time.localtime(self.ts_ns / 1e9)) + f".{self.ts_ns % 1_000_000_000 // 1000:06d}"
        if not self.frontend:  # no packet headers to tell (a missing stage, a frame too short)
            line = f"{t} {self.type:<8} {self.hook:<6} -"
        else:
            who = self.client if self.client else f"socket {self.cookie}"
            line = f"{t} {self.type:<8} {self.hook:<6} {who} -> {self.frontend}/{self.protocol}"
        if self.type == "new":
            line += f" => {self.backend} ({self.reason})"
        elif self.reason:
            line += f": {self.reason}"
        if self.service:
            line += f"  [{self.service}]"
        return line


_T_NEW = next(k for k, v in TYPES.items() if v == "new")


@dataclass
class EventFilter:
    """What `kpr monitor` shows: every event by default."""

    types: frozenset[str] = frozenset()
    services: frozenset[str] = frozenset()
    addresses: frozenset[str] = frozenset()  # client, frontend or backend address
    reasons: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        bad = set(self.types) - set(TYPES.values())
        if bad:
            raise MonitorError(f"--type {', '.join(sorted(bad))}: not an event type ({', '.join(TYPES.values())})")
        known = set(REASONS.values()) | set(NEW_HOW.values())
        bad = set(self.reasons) - known
        if bad:
            raise MonitorError(f"--reason {', '.join(sorted(bad))}: not a reason ({', '.join(sorted(known))})")
        for a in self.addresses:
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise MonitorError(f"--address {a!r}: not an IP address") from None
        self.addresses = frozenset(str(ipaddress.ip_address(a)) for a in self.addresses)

    def type_mask(self) -> int:
        """kpr_mon_cfg.types for the programs (0: all)."""
        return sum(1 << k for k, v in TYPES.items() if v in self.types)

    def __call__(self, e: Event) -> bool:
        if self.types and e.type not in self.types:
            return False
        if self.reasons and e.reason not in self.reasons:
            return False
        if self.services and e.service not in self.services:
            return False
        if self.addresses and not ({e.client_address, e.frontend_address, e.backend_address} & self.addresses):
            return False
        return True


_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _ringbuf_lib() -> ctypes.CDLL:
    lib = M.libbpf()
    lib.ring_buffer__new.argtypes = [ctypes.c_int, _SAMPLE_FN, ctypes.c_void_p, ctypes.c_void_p]
    lib.ring_buffer__new.restype = ctypes.c_void_p
    lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.ring_buffer__poll.restype = ctypes.c_int
    lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
    lib.ring_buffer__free.restype = None
    return lib


@dataclass
class Monitor:
    """A listener on the programs' events under `pin_path` (use `with`)."""

    pin_path: Path
    types: int = 0  # kpr_mon_cfg.types when this is the only listener
    sample: int = 1
    # Where listeners register (see _listeners); by default one directory per pin path.
    registry: Path = Path()
    _cfg: M.BpfMap | None = None
    _ring: M.BpfMap | None = None
    _rb: int | None = None
    _pending: list[bytes] = field(default_factory=list)
    _cb: Any = None

    def __post_init__(self) -> None:
        if self.registry == Path():
            tag = hashlib.blake2b(str(Path(self.pin_path).resolve()).encode(), digest_size=6).hexdigest()
            self.registry = registry_dir() / tag

    def open(self) -> "Monitor":
        pin = Path(self.pin_path)
        missing = [n for n in (CFG_MAP, RING_MAP) if not (pin / n).exists()]
        if missing:
            raise MonitorError(
                f"no {' or '.join(missing)} under {pin}: no program with the monitor is loaded there (socklb, "
                "tc_nodeport and xdp_nodeport pin them when they start); is the agent running with this bpf.pinPath?"
            )
        if self.sample < 1:
            raise MonitorError(f"--sample must be 1 or more, got {self.sample}")
        self._cfg = M.BpfMap.open_pinned(pin / CFG_MAP)
        self._ring = M.BpfMap.open_pinned(pin / RING_MAP)
        lib = _ringbuf_lib()

        def on_sample(_ctx: Any, data: int, size: int) -> int:
            self._pending.append(ctypes.string_at(data, size))
            return 0

        self._cb = _SAMPLE_FN(on_sample)  # kept: libbpf calls it for the ring's lifetime
        rb = lib.ring_buffer__new(self._ring.fd, self._cb, None, None)
        if not rb:
            err = ctypes.get_errno() or errno.EINVAL
            self.close()
            raise MonitorError(f"ring_buffer__new on {pin / RING_MAP}: {errno.errorcode.get(err, err)}")
        self._rb = rb
        self._listen(True)
        return self

    def _listeners(self, mine: bool) -> int:
        """Listeners alive: one file per monitor in `registry` named "<pid>-<n>"; files of
        processes that are gone (a monitor killed with SIGKILL) are removed, so a dead
        listener keeps the programs emitting only until the next monitor starts or stops."""
        reg = self.registry
        reg.mkdir(parents=True, exist_ok=True, mode=0o700)
        own = reg / f"{os.getpid()}-{id(self)}"
        if mine:
            own.touch()
        else:
            own.unlink(missing_ok=True)
        alive = 0
        for f in reg.iterdir():
            pid = f.name.split("-", 1)[0]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                alive += 1
            else:
                f.unlink(missing_ok=True)
        if not alive:
            with contextlib.suppress(OSError):
                reg.rmdir()
                reg.parent.rmdir()  # the last pin path's registry: nothing left behind
        return alive

    def _listen(self, mine: bool) -> None:
        """Set kpr_mon_cfg.on (the programs' off switch) to the listeners alive. Alone, this
        monitor sets the type mask and sampling; with others, every type, unsampled."""
        assert self._cfg is not None
        key = M.U32.pack(0)
        raw = self._cfg.lookup(key)
        cfg = MonCfg.from_buffer_copy(raw) if raw else MonCfg()
        cfg.on = self._listeners(mine)
        if cfg.on == 1 and mine:
            cfg.types, cfg.sample = self.types, self.sample
        elif cfg.on > 1:
            cfg.types, cfg.sample = 0, 1
        self._cfg.update(key, bytes(cfg))
        log.debug("event=monitor_listeners on=%d types=%#x sample=%d", cfg.on, cfg.types, cfg.sample)

    def lost(self) -> int:
        """Events the programs had no ring space for (all listeners, since the map exists)."""
        raw = self._cfg.lookup(M.U32.pack(0)) if self._cfg else None
        return MonCfg.from_buffer_copy(raw).lost if raw else 0

    def poll(self, timeout_ms: int = 100) -> list[Event]:
        """Events that arrived, waiting up to timeout_ms for the first."""
        assert self._rb is not None, "Monitor is not open"
        rc = _ringbuf_lib().ring_buffer__poll(self._rb, timeout_ms)
        if rc < 0 and -rc != errno.EINTR:
            raise MonitorError(f"ring_buffer__poll: {errno.errorcode.get(-rc, -rc)}")
        raw, self._pending = self._pending, []
        return [Event.decode(r) for r in raw]

    def collect(self, n: int, timeout: float = 10.0) -> list[Event]:
        """Poll until at least n events arrived or `timeout` seconds passed."""
        got: list[Event] = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            got.extend(self.poll(100))
        return got

    def close(self) -> None:
        if self._cfg is not None:
            try:
                if self._rb is not None:
                    self._listen(False)
            except OSError as e:  # the maps went away (cleanup): nothing to lower
                log.debug("event=monitor_close_failed error=%s", e)
        if self._rb is not None:
            _ringbuf_lib().ring_buffer__free(self._rb)
            self._rb = None
        for m in (self._cfg, self._ring):
            if m is not None:
                m.close()
        self._cfg = self._ring = None

    def __enter__(self) -> "Monitor":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def run(
    monitor: Monitor,
    keep: EventFilter,
    out: Callable[[Event], None],
    *,
    services: Callable[[], dict[tuple[str, int, str], str]] | None = None,
    count: int = 0,
    seconds: float = 0.0,
) -> int:
    """Print matching events until `count` were shown or `seconds` passed (0: no limit).
    `services` maps (frontend address, port, protocol) to a service name."""
    names = services() if services else {}
    looked = time.monotonic()
    shown = 0
    deadline = time.monotonic() + seconds if seconds else None
    while True:
        wait = 200 if deadline is None else max(0, min(200, int((deadline - time.monotonic()) * 1000)))
        for e in monitor.poll(wait):
            key = (e.frontend_address, int(e.frontend.rsplit(":", 1)[1]), e.protocol) if e.frontend else None
            if key not in names and services and e.rev_nat and time.monotonic() - looked > 1.0:
                names, looked = services(), time.monotonic()  # a service added since: at most once a second
            e.service = names.get(key, "")
            if keep(e):
                out(e)
                shown += 1
                if count and shown >= count:
                    return shown
        if deadline is not None and time.monotonic() >= deadline:
            return shown


def service_names(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int, str], str]:
    """(address, port, protocol) -> service, from `kpr service list --json` rows."""
    return {(r["address"], int(r["port"]), r["protocol"]): r["service"] for r in rows}


def as_json(e: Event) -> str:
    return json.dumps(e.to_json())
