"""The one writer of kpr's shared service maps (layout: core/bpf/lib/maps.h).

`ServiceMapWriter` turns `Service` objects into map entries and keeps the pinned maps equal
to the desired state:

- Level-based. Every upsert renders the service's whole desired state and diffs it against
  a Python shadow of what the maps hold, so only entries that changed are written and only
  entries no longer wanted are deleted; `full_sync` does the same for all services against
  the maps' real contents (dumped with lookup_batch) and applies the difference with batch
  syscalls.
- Restart-safe. `open()` adopts maps already pinned (never recreates compatible ones) and
  rebuilds the shadow from them: backend ids, rev-NAT indexes and slot order are kept, so
  established flows (conntrack holds backend ids and rev-NAT indexes) survive a restart.
  Entries nobody re-delivers are removed on `kpr_sync_complete`.
- Safe ordering for concurrent readers: backends, rev-NAT entries, source ranges and Maglev
  tables are written before the service entries that lead to them; slot 0 (the count) is
  written after its slots and deleted before them; orphans are deleted last.

- Planned capacity. Before writing, the writer checks that the desired state fits each map
  (max_entries); a service that would not fit is refused on its own (logged and reported in
  status with its name and the map, counted in `refusals`) and keeps its last good state:
  whatever the maps already hold for it stays, nothing of the new state is written (a service
  that never fitted is not programmed at all). Every other service is programmed. Refused
  services are tried again when entries are freed.
- Kernel = desired. A write that fails half way is rolled back: the maps are read back and
  repaired to the state before the change (no partial batch stays behind). `check()`, run
  periodically (agent.resyncInterval), reads the maps back and repairs any difference from the
  desired state, one made by hand with bpftool included; status counts come from the kernel.
- Ready only when written. Through the bus, the initial state is one full sync at
  `kpr_sync_complete`; if it cannot be written, the writer retries with backoff and reports
  itself not synced (status details `synced: false`, what is missing), which holds the
  agent's readiness.

A frontend group is everything one (address, port, protocol) owns: its service entries in
both scopes, rev-NAT entry, source ranges and Maglev tables. Groups are owned by one service;
a second service claiming the same frontend is reported as a conflict and retried when the
owner lets go.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import struct
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic.alias_generators import to_camel

from . import hookimpl
from .bpf import maps as M
from .bpf.maglev import build_table, is_prime
from .bus import Backoff
from .context import PluginContext
from .idtables import IdBytes, IdCounts
from .model import BackendState, Frontend, FrontendType, PluginStatus, Protocol, Service, ServiceKey

if TYPE_CHECKING:
    from .config import KprConfig

log = logging.getLogger(__name__)

__all__ = ["ServiceMapWriter", "ALGORITHM_ANNOTATION", "MapIncompatible", "Refusal", "group_entries", "first_overflow"]

MapIncompatible = M.MapIncompatible

# Per-service override of the writer's selection algorithm: "random" or "maglev".
ALGORITHM_ANNOTATION = "service.kpr.io/lb-algorithm"

_TYPE_FLAGS = {
    FrontendType.CLUSTER_IP: M.SVC_F_CLUSTER_IP,
    FrontendType.NODE_PORT: M.SVC_F_NODE_PORT,
    FrontendType.EXTERNAL_IP: M.SVC_F_EXTERNAL_IP,
    FrontendType.LOAD_BALANCER: M.SVC_F_LOAD_BALANCER,
    FrontendType.HOST_PORT: M.SVC_F_HOST_PORT,
}
# Protocol.number builds a dict on every call; renders ask once per frontend.
_PROTO_BYTE = {p: bytes((p.number,)) for p in Protocol}
_SCOPE_NAMES = {M.SCOPE_EXTERNAL: "external", M.SCOPE_INTERNAL: "internal"}
_STATE_NAMES = {M.BACKEND_ACTIVE: "active", M.BACKEND_TERMINATING: "terminating"}

_PORT = struct.Struct("=H")  # a port already in network order, as stored
_SLOT = [struct.pack("=HH", i, 0) for i in range(1024)]  # key tail: slot, pad
_ONE = M.U32.pack(1)  # kpr_srcrange value
_V4_MAPPED = M.addr_to_bytes("0.0.0.0")[:12]  # ::ffff:0:0/96
_BYTE = [bytes((i,)) for i in range(256)]
# Backend value tails after (addr, port, proto): state, flags, pad; indexed by Backend.local.
_ACTIVE = (bytes((M.BACKEND_ACTIVE, 0, 0, 0, 0)), bytes((M.BACKEND_ACTIVE, M.BACKEND_F_LOCAL, 0, 0, 0)))
_TERMINATING = (
    bytes((M.BACKEND_TERMINATING, 0, 0, 0, 0)),
    bytes((M.BACKEND_TERMINATING, M.BACKEND_F_LOCAL, 0, 0, 0)),
)
_WILD4, _WILD6 = M.wildcard_bytes(4), M.wildcard_bytes(6)


def _slot_tails(n: int) -> list[bytes]:
    """Key tails of slots 1..n."""
    return _SLOT[1 : n + 1] if n < 1024 else _SLOT[1:] + [struct.pack("=HH", i, 0) for i in range(1024, n + 1)]


def _fk_label(fk: bytes) -> str:
    """ "10.0.0.1:80/TCP" or "[fd00::1]:80/TCP" for a frontend key (addr16 + port + proto)."""
    addr = M.bytes_to_addr(fk[:16])
    port = M.ntohs(_PORT.unpack_from(fk, 16)[0])
    proto = M.PROTO_NAMES.get(fk[18], str(fk[18]))
    host = f"[{addr}]" if ":" in addr else addr
    return f"{host}:{port}/{proto}"


def _backend_name(val: bytes) -> str:
    """Stable Maglev name of a backend value: "addr:port"."""
    addr = M.bytes_to_addr(val[:16])
    port = M.ntohs(_PORT.unpack_from(val, 16)[0])
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


_NO_RANGES: frozenset[bytes] = frozenset()
_NO_ORDER: tuple[None, None] = (None, None)
_NO_MAGLEV: dict[int, Any] = {}  # never written: see _Group.set_maglev


class _Group:
    """What one frontend (address, port, protocol) holds in the maps."""

    # A plain class with __slots__: full syncs make one per frontend, tens of thousands, and
    # the writer keeps them for its lifetime. Its kpr_svc entries are kept packed (all keys
    # in one bytes, all values in another: fixed sizes) rather than as a dict of bytes, a
    # fifth of the memory; `svc` unpacks them for the rare diff of a changed group.
    __slots__ = ("rev_nat", "owner", "_svc_keys", "_svc_vals", "n_svc", "n_heads", "revnat", "_order", "backends", "maglev", "srcrange")

    def __init__(self, rev_nat: int, owner: ServiceKey | None, revnat: bytes = b"") -> None:
        self.rev_nat = rev_nat
        # The service that wrote it; None for entries adopted from pinned maps, not yet re-delivered.
        self.owner = owner
        # kpr_svc keys and values, both scopes, all slots (see svc).
        self._svc_keys = self._svc_vals = b""
        self.n_svc = self.n_heads = 0  # entries, of which slot 0 entries (packed first)
        # kpr_revnat value (b"" for a group adopted without one).
        self.revnat = revnat
        # Selectable backend ids in slot order, by scope (external, internal; None where it has
        # none): kept so later renders move few slots. See order_of.
        self._order: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = _NO_ORDER
        # Backend ids referenced by any slot, sorted (a tuple: a fifth of a frozenset's size).
        self.backends: tuple[int, ...] | frozenset[int] = ()
        # Scope -> sorted (name, id) pairs its Maglev table was built from (None: unknown,
        # rebuild). Most groups have none: one shared empty dict, replaced before a write.
        self.maglev: dict[int, tuple[tuple[str, int], ...] | None] = _NO_MAGLEV
        # kpr_srcrange keys (most groups have none: one empty set shared by all of them).
        self.srcrange: frozenset[bytes] = _NO_RANGES

    def order_of(self, scope: int) -> tuple[int, ...] | None:
        """The scope's selectable backend ids in slot order (None: the scope has no entries)."""
        return self._order[scope]

    def set_order(self, scope: int, ids: list[int] | tuple[int, ...]) -> None:
        order = list(self._order)
        order[scope] = tuple(ids)
        self._order = (order[0], order[1])

    def set_maglev(self, scope: int, built_from: tuple[tuple[str, int], ...] | None) -> None:
        if self.maglev is _NO_MAGLEV:
            self.maglev = {}
        self.maglev[scope] = built_from

    def set_svc(self, keys: list[bytes], values: list[bytes], heads: int | None = None) -> None:
        """Its kpr_svc entries, keys and values in the same order (each of one size); the
        first `heads` are its slot 0 entries (None: found and moved first here)."""
        if heads is None:
            first = [i for i, k in enumerate(keys) if k[20:22] == b"\0\0"]
            if first:
                rest = [i for i, k in enumerate(keys) if k[20:22] != b"\0\0"]
                keys, values = [keys[i] for i in first + rest], [values[i] for i in first + rest]
            heads = len(first)
        self._svc_keys = b"".join(keys)
        self._svc_vals = b"".join(values)
        self.n_svc = len(keys)
        self.n_heads = heads

    def packed_svc(self) -> tuple[bytes, bytes, bytes, bytes]:
        """(slot 0 keys, their values, the other keys, their values), each concatenated."""
        n, h = self.n_svc, self.n_heads
        if not n:
            return b"", b"", b"", b""
        k, v = len(self._svc_keys) // n * h, len(self._svc_vals) // n * h
        return self._svc_keys[:k], self._svc_vals[:v], self._svc_keys[k:], self._svc_vals[v:]

    @property
    def svc(self) -> dict[bytes, bytes]:
        """kpr_svc key -> value, both scopes, all slots (a new dict, unpacked)."""
        n = self.n_svc
        if not n:
            return {}
        ks, vs = self._svc_keys, self._svc_vals
        k, v = len(ks) // n, len(vs) // n
        return dict(zip([ks[i : i + k] for i in range(0, len(ks), k)], [vs[i : i + v] for i in range(0, n * v, v)] if v else [b""] * n))

    @svc.setter
    def svc(self, entries: dict[bytes, bytes]) -> None:
        self.set_svc(list(entries), list(entries.values()))

    def same_svc(self, other: "_Group") -> bool:
        """Whether both hold the same kpr_svc entries (packed in the same order, or not)."""
        if self._svc_keys == other._svc_keys and self._svc_vals == other._svc_vals:
            return True
        return self.n_svc == other.n_svc and self.svc == other.svc


# The config key (bpf.mapSizes) that sizes each map the writer fills, and every map it sizes.
SIZE_KEYS = {"kpr_svc": "kprSvc", "kpr_backend": "kprBackend", "kpr_revnat": "kprRevnat",
             "kpr_maglev": "kprMaglev", "kpr_srcrange": "kprSrcrange"}
SIZE_KEYS_ALL = {**SIZE_KEYS, "kpr_affinity": "kprAffinity"}


def group_entries(groups: Iterable[_Group]) -> dict[str, int]:
    """Entries the groups take in each service map; kpr_backend is left at 0 (backends are
    shared between groups: count distinct ids, see ServiceMapWriter._needs)."""
    svc = revnat = srcrange = maglev = 0
    for g in groups:
        svc += g.n_svc
        revnat += 1 if g.revnat else 0
        srcrange += len(g.srcrange)
        maglev += len(g.maglev)
    return {"kpr_svc": svc, "kpr_backend": 0, "kpr_revnat": revnat, "kpr_srcrange": srcrange, "kpr_maglev": maglev}


def first_overflow(
    current: dict[str, int], delta: dict[str, int], limits: dict[str, int]
) -> tuple[str, int, int] | None:
    """The first map (in SERVICE_MAPS order) that `delta` more entries would overflow, as
    (map, entries wanted, entries free); None when everything fits. A map the delta does not
    grow never overflows: a service that shrinks or stays the same is always let through."""
    for name in M.SERVICE_MAPS:
        d = delta.get(name, 0)
        have = current.get(name, 0)
        if d > 0 and have + d > limits[name]:
            return name, d, max(0, limits[name] - have)
    return None


@dataclass(frozen=True)
class Refusal:
    """Why a service is not (fully) programmed: the map it would overflow."""

    map: str
    # entries the service needs beyond what it holds now, and what the map has free
    need: int
    free: int
    max_entries: int
    # the service's growth per map: tried again once all of it fits
    delta: tuple[tuple[str, int], ...] = ()

    def text(self) -> str:
        key = SIZE_KEYS.get(self.map, self.map)
        return (
            f"{self.map} full: needs {self.need} more entries, {self.free} of {self.max_entries} free "
            f"(raise bpf.mapSizes.{key}); keeps its last good state"
        )


@dataclass(frozen=True)
class WriterParams:
    """What the shared maps are built with; programs must be compiled with the same values."""

    algorithm: str = "random"
    maglev_size: int = M.MAGLEV_DEFAULT_SIZE
    # max_entries overrides by map name.
    sizes: dict[str, int] = field(default_factory=dict)

    def cflags(self, pin_path: Path | str) -> list[str]:
        return M.cflags(pin_path, self.sizes, self.maglev_size)


# Seconds from a change of the desired state to the next try of a failed initial sync.
_RETRY_ON_CHANGE = 2.0

# Plugin section keys (snake_case attributes) that configure the shared maps, and what they set.
_SHARED_KEYS = {"algorithm": "algorithm", "maglev_table_size": "maglev_size", "conntrack_size": "conntrack"}


def writer_params(config: "KprConfig") -> WriterParams:
    """The shared maps' settings, from the enabled plugins' sections.

    The maps are shared, so plugins that set the same knob (``algorithm``,
    ``maglevTableSize``, ``conntrackSize``) must agree; a disagreement is a ConfigError
    naming both keys.
    """
    from .config import ConfigError

    chosen: dict[str, tuple[str, Any]] = {}
    problems = []
    for name, section in sorted(config.plugin_sections.items()):
        if section is None:
            continue
        for attr, knob in _SHARED_KEYS.items():
            value = getattr(section, attr, None)
            if value is None:
                continue
            key = f"plugins.{name}.{to_camel(attr)}"
            if knob in chosen and chosen[knob][1] != value:
                other_key, other = chosen[knob]
                problems.append(f"{key}: {value!r} disagrees with {other_key}: {other!r} (the service maps are shared)")
                continue
            chosen.setdefault(knob, (key, value))
    if problems:
        raise ConfigError(problems)
    sizes = config.bpf.map_size_overrides()
    if "conntrack" in chosen:
        ct = int(chosen["conntrack"][1])
        sizes.update(kpr_ct=ct, kpr_snat=ct)
    return WriterParams(
        algorithm=chosen.get("algorithm", ("", "random"))[1],
        maglev_size=int(chosen.get("maglev_size", ("", M.MAGLEV_DEFAULT_SIZE))[1]),
        sizes=sizes,
    )


class ServiceMapWriter:
    """Writes services into the maps pinned under `pin_path` (kpr's bpf.pinPath).

    Also a kpr plugin object: register it with the plugin manager and it follows the bus.
    """

    def __init__(
        self,
        pin_path: Path | str,
        *,
        maglev_size: int = M.MAGLEV_DEFAULT_SIZE,
        algorithm: str = "random",
        sizes: dict[str, int] | None = None,
        batch: bool = True,
        create_datapath_maps: bool = True,
        check_interval: float | None = None,
        retry_backoff: Backoff | None = None,
    ) -> None:
        if not is_prime(maglev_size):
            raise ValueError(f"maglev_size must be prime, got {maglev_size}")
        if algorithm not in ("random", "maglev"):
            raise ValueError(f"algorithm must be random or maglev, got {algorithm!r}")
        self.pin_path = Path(pin_path)
        self.maglev_size = maglev_size
        self.algorithm = algorithm
        self.batch = batch
        self.specs = M.specs_with(sizes, maglev_size)
        self._explicit_sizes = set(sizes or ())
        self._names = list(M.SERVICE_MAPS) + (
            [n for n in self.specs if n not in M.SERVICE_MAPS] if create_datapath_maps else []
        )
        self.maps: dict[str, M.BpfMap] = {}
        self.limits = {name: self.specs[name].max_entries for name in M.SERVICE_MAPS}
        self._lock = threading.RLock()
        self._reset_shadow()
        self.errors = 0
        self.conflicts: dict[bytes, ServiceKey] = {}  # frontend key -> service refused it
        # Services refused for capacity (they keep their last good state), and counters.
        self.refused: dict[ServiceKey, Refusal] = {}
        self.refusals = 0  # refusal decisions since start
        self.rollbacks = 0  # failed writes rolled back
        self.repairs = 0  # entries written or deleted to repair a difference found by check()
        self.checks = 0
        # Seconds between check()s when run as a plugin (None: agent.resyncInterval; 0: never).
        self.check_interval = check_interval
        self._backoff = retry_backoff or Backoff(0.5, 30.0)
        self._checker: threading.Thread | None = None
        self._kick = threading.Event()
        self._stopping = False
        # Initial sync: requested (sync complete seen), failed attempts, last error, next retry.
        self._sync_requested = False
        self._sync_attempts = 0
        self.sync_error = ""
        self._retry_at: float | None = None
        self._maglev_cache: OrderedDict[tuple, array] = OrderedDict()
        self._maglev_keys = array("I", range(maglev_size)).tobytes()
        # Services delivered through the bus before kpr_sync_complete; None afterwards.
        self._initial: dict[ServiceKey, Service] | None = {}

    def _reset_shadow(self) -> None:
        self._groups: dict[bytes, _Group] = {}
        # service -> its frontend keys (a tuple: most services have one or two; see _own)
        self._by_service: dict[ServiceKey | None, tuple[bytes, ...] | set[bytes]] = {}
        self._services: dict[ServiceKey, Service] = {}
        # Backends: identity (addr16 + port + proto) -> id; id -> value in the map; id -> refs.
        self._backend_ids: dict[bytes, int] = {}
        # (flat tables: a few bytes per backend where dicts took about a hundred)
        self._backend_vals = IdBytes(M.BACKEND.size)
        self._backend_refs = IdCounts()
        self._revnat_ids: dict[bytes, int] = {}
        self._revnat_used: set[int] = set()
        self._next_backend = 1
        self._next_revnat = 1
        # Entries found in the maps that no group accounts for; removed by GC.
        self._stray: dict[str, set[bytes]] = {"kpr_srcrange": set(), "kpr_maglev": set(), "kpr_revnat": set()}
        # Entries the groups take per map (group_entries of every group), kept up to date.
        self._count = group_entries(())
        self._delivered: set[ServiceKey] = set()
        # Per operation: backends rendered (id -> (identity, value)) and rev-NAT indexes allocated.
        self._pending_vals: dict[int, bytes] = {}  # id -> value (its first 19 bytes: the identity)
        self._fresh_revnat: list[bytes] = []

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> "ServiceMapWriter":
        """Create the maps, or adopt the pinned ones, and rebuild the shadow from them."""
        with self._lock:
            self._check_bpffs()
            self.pin_path.mkdir(parents=True, exist_ok=True)
            created, adopted = [], []
            try:
                for name in self._names:
                    spec, path = self.specs[name], self.pin_path / name
                    if path.exists():
                        m = M.BpfMap.open_pinned(path)
                        self.maps[name] = m
                        M.check_compatible(m, self._pinned_size(m, spec), path)
                        adopted.append(name)
                    else:
                        m = self._create(spec)
                        self.maps[name] = m
                        m.pin(path)
                        created.append(name)
                self._check_maglev_inner()
                self._reload()
            except Exception:
                self.close()
                raise
            log.info(
                "event=servicemaps_open pin_path=%s created=%s adopted=%s frontends=%d backends=%d",
                self.pin_path, ",".join(created) or "-", ",".join(adopted) or "-",
                len(self._groups), len(self._backend_vals),
            )
            return self

    def _pinned_size(self, m: M.BpfMap, spec: M.MapSpec) -> M.MapSpec:
        """A service map pinned by an earlier kpr with another default size is adopted as it
        is (established flows keep their maps; capacity is planned against its real size).
        A size set in bpf.mapSizes must match the pin."""
        have = m.info().max_entries
        if have == spec.max_entries or spec.name in self._explicit_sizes or spec.name not in SIZE_KEYS_ALL:
            return spec
        log.warning(
            "event=servicemaps_pinned_size map=%s pinned=%d default=%d: kept; `kpr cleanup` and a restart, "
            "or bpf.mapSizes.%s, resize it",
            spec.name, have, spec.max_entries, SIZE_KEYS_ALL[spec.name],
        )
        spec = replace(spec, max_entries=have)
        self.specs[spec.name] = spec
        if spec.name in self.limits:
            self.limits[spec.name] = have
        return spec

    def close(self) -> None:
        """Close the map fds. Pins stay: programs keep using the maps (`kpr cleanup` removes them)."""
        with self._lock:
            for m in self.maps.values():
                m.close()
            self.maps.clear()

    def __enter__(self) -> "ServiceMapWriter":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _mount_bpffs_if_missing(self) -> None:
        """As Cilium does: with no bpffs under the pin path, mount one where it belongs.

        Pins under the standard /sys/fs/bpf get bpffs mounted there; any other pin path gets
        one mounted on its parent directory.
        """
        from .bpf.fs import ensure_bpffs, find_mounts

        target = self.pin_path if self.pin_path.is_absolute() else self.pin_path.resolve()
        if any(target == m or m in target.parents for m in find_mounts("bpf")):
            return
        std = Path("/sys/fs/bpf")
        where = std if std in target.parents else target.parent
        where.mkdir(parents=True, exist_ok=True)
        ensure_bpffs(where, reuse_existing=False)
        log.info("servicemaps.bpffs_mounted path=%s", where)

    def _check_bpffs(self) -> None:
        from .bpf.fs import find_mounts

        p = self.pin_path.resolve() if self.pin_path.exists() else self.pin_path
        if not any(p == m or m in p.parents for m in find_mounts("bpf")):
            raise OSError(f"{self.pin_path} is not on a bpffs: mount one (mount -t bpf bpf /sys/fs/bpf) or set bpf.pinPath")

    def _create(self, spec: M.MapSpec) -> M.BpfMap:
        if spec.inner is None:
            return M.BpfMap.create(spec)
        t, k, v, n = spec.inner
        template = M.BpfMap.create(M.MapSpec("kpr_maglev_in", t, k, v, n))
        try:
            return M.BpfMap.create(spec, inner_fd=template.fd)
        finally:
            template.close()

    def _check_maglev_inner(self) -> None:
        outer = self.maps["kpr_maglev"]
        for key in outer.keys():
            raw = outer.lookup(key)
            if raw is None:
                continue
            with M.BpfMap.from_id(M.U32.unpack(raw)[0]) as inner:
                size = inner.info().max_entries
            if size != self.maglev_size:
                raise MapIncompatible(
                    f"pinned map {self.pin_path / 'kpr_maglev'} holds Maglev tables of {size} slots, this kpr "
                    f"builds {self.maglev_size}: run `kpr cleanup` or restore the previous maglev size"
                )
            return

    # ------------------------------------------------------------------ adoption

    def _reload(self) -> None:
        """Rebuild the shadow from the maps' contents, keeping known owners."""
        owners = {fk: g.owner for fk, g in self._groups.items() if g.owner is not None}
        services, delivered = self._services, self._delivered
        self._reset_shadow()
        self._services, self._delivered = services, delivered

        for k, v in self.maps["kpr_backend"].items():
            bid = M.U32.unpack(k)[0]
            self._backend_vals[bid] = v
            self._backend_ids[v[:19]] = bid
            self._backend_refs[bid] = 0
            self._next_backend = max(self._next_backend, bid + 1)

        by_revnat: dict[int, _Group] = {}
        counts: dict[tuple[bytes, int], int] = {}
        slots: dict[tuple[bytes, int], dict[int, int]] = {}
        entries: dict[bytes, tuple[list[bytes], list[bytes]]] = {}
        for k, v in self.maps["kpr_svc"].items():
            fk, scope, slot = k[:19], k[19], _PORT.unpack_from(k, 20)[0]
            bid, count, _term, rev_nat, _flags, _aff = M.SVC_VAL.unpack(v)
            g = self._groups.get(fk)
            if g is None:
                g = self._groups[fk] = _Group(rev_nat, owners.get(fk))
                by_revnat[rev_nat] = g
                entries[fk] = ([], [])
            kv = entries[fk]
            kv[0].append(k)
            kv[1].append(v)
            if slot == 0:
                counts[(fk, scope)] = count
            else:
                slots.setdefault((fk, scope), {})[slot] = bid
        for fk, (keys, values) in entries.items():
            self._groups[fk].set_svc(keys, values)
        for (fk, scope), count in counts.items():
            got = slots.get((fk, scope), {})
            self._groups[fk].set_order(scope, [got[i] for i in range(1, count + 1) if i in got])
        referenced: dict[bytes, set[int]] = {}
        for (fk, _scope), s in slots.items():
            referenced.setdefault(fk, set()).update(s.values())
        for fk, ids in referenced.items():
            g = self._groups[fk]
            g.backends = tuple(sorted(i for i in ids if i in self._backend_vals))
            for bid in g.backends:
                self._backend_refs[bid] += 1

        for k, v in self.maps["kpr_revnat"].items():
            idx = M.U32.unpack(k)[0]
            fk = v[:19]
            g = by_revnat.get(idx)
            if g is None:
                self._stray["kpr_revnat"].add(k)
            else:
                g.revnat = v
            self._revnat_used.add(idx)
            self._next_revnat = max(self._next_revnat, idx + 1)
        for fk, g in self._groups.items():
            self._revnat_ids[fk] = g.rev_nat
            self._revnat_used.add(g.rev_nat)
            self._next_revnat = max(self._next_revnat, g.rev_nat + 1)

        for k, _v in self.maps["kpr_srcrange"].items():
            g = by_revnat.get(M.SRCRANGE_KEY.unpack(k)[1])
            if g is None:
                self._stray["kpr_srcrange"].add(k)
            else:
                g.srcrange = g.srcrange | {k}
        for k in list(self.maps["kpr_maglev"].keys()):
            rev_nat, scope = M.MAGLEV_KEY.unpack(k)
            g = by_revnat.get(rev_nat)
            if g is None:
                self._stray["kpr_maglev"].add(k)
                continue
            # The table was built from the selectable slots; take that as its input so an
            # unchanged re-delivery after a restart does not rebuild every table.
            g.set_maglev(scope, self._maglev_input(g.order_of(scope) or ()))
        self._by_service = {}
        for fk, g in self._groups.items():
            if g.owner is not None:
                _own(self._by_service, g.owner, fk)
        self._count = group_entries(self._groups.values())

    def _maglev_input(self, ids: Iterable[int]) -> tuple[tuple[str, int], ...]:
        return tuple(sorted((_backend_name(self._backend_vals[i]), i) for i in ids if i in self._backend_vals))

    # ------------------------------------------------------------------ allocation

    def _backend_id(self, bkey: bytes) -> int:
        bid = self._backend_ids.get(bkey)
        if bid is None:
            bid = self._next_backend
            while bid in self._backend_vals or bid == 0:
                bid = (bid + 1) & 0xFFFFFFFF
            self._next_backend = (bid + 1) & 0xFFFFFFFF or 1
            self._backend_ids[bkey] = bid
        return bid

    def _revnat_id(self, fk: bytes) -> int:
        idx = self._revnat_ids.get(fk)
        if idx is None:
            idx = self._next_revnat
            while idx in self._revnat_used or idx == 0:
                idx = (idx + 1) & 0xFFFFFFFF
            self._next_revnat = (idx + 1) & 0xFFFFFFFF or 1
            self._revnat_ids[fk] = idx
            self._revnat_used.add(idx)
            self._fresh_revnat.append(fk)
        return idx

    def _forget_revnat(self, fk: bytes) -> None:
        idx = self._revnat_ids.pop(fk, None)
        if idx is not None:
            self._revnat_used.discard(idx)

    # ------------------------------------------------------------------ rendering

    def _algorithm_for(self, service: Service) -> str:
        algo = service.annotation_map.get(ALGORITHM_ANNOTATION, self.algorithm)
        return algo if algo in ("random", "maglev") else self.algorithm

    def _render(self, service: Service) -> dict[bytes, _Group]:
        """The groups a service wants, keyed by frontend key."""
        out: dict[bytes, _Group] = {}
        maglev = self._algorithm_for(service) == "maglev"
        # Frontends of one service usually share their backends: convert each backend once
        # (None: a single frontend, nothing to share).
        seen: dict[tuple, tuple[int, bytes]] | None = {} if len(service.frontends) > 1 else None
        for fe in service.frontends:
            addr = M.addr_to_bytes(fe.address)
            tail = fe.port.to_bytes(2, "big") + _PROTO_BYTE[fe.protocol]
            flags = _TYPE_FLAGS[fe.type]
            wild = _WILD4 if addr[:12] == _V4_MAPPED else _WILD6
            if addr == wild:
                flags |= M.SVC_F_WILDCARD
            self._render_group(out, service.key, fe, addr + tail, flags, maglev, seen)
            if fe.type is FrontendType.NODE_PORT and addr != wild:
                # Any node address (and socket LB's loopback) finds the service through address 0.
                self._render_group(out, service.key, fe, wild + tail, M.SVC_F_NODE_PORT | M.SVC_F_WILDCARD, maglev, seen)
        return out

    def _render_group(
        self,
        out: dict[bytes, _Group],
        owner: ServiceKey,
        fe: Frontend,
        fk: bytes,
        flags: int,
        maglev: bool,
        seen: dict[tuple, tuple[int, bytes]] | None,
    ) -> None:
        if fk in out:  # the wildcard entry of a NodePort served on several node addresses
            return
        prev = self._groups.get(fk)
        rev_nat = prev.rev_nat if prev is not None else self._revnat_id(fk)
        proto_b = fk[18:19]
        g = _Group(rev_nat, owner, revnat=fk + b"\x00")

        # Backend ids by object identity (selectable() hands back the same objects; hashing
        # the dataclasses would cost more than the rest of the render).
        ids: dict[int, int] = {}
        pending_vals = self._pending_vals
        backend_ids = self._backend_ids
        to_bytes = M.addr_to_bytes
        all_active = True
        terminating = BackendState.TERMINATING
        for b in fe.backends:
            state = b.state
            term = state is terminating
            if seen is not None:
                ident = (b.address, b.port, proto_b, state, b.local)
                hit = seen.get(ident)
                if hit is not None:
                    ids[id(b)] = hit[0]
                    all_active = all_active and not term
                    continue
            bkey = to_bytes(b.address) + b.port.to_bytes(2, "big") + proto_b
            bid = backend_ids.get(bkey) or self._backend_id(bkey)
            val = bkey + (_TERMINATING if term else _ACTIVE)[b.local]
            pending_vals[bid] = val
            if seen is not None:
                seen[ident] = (bid, val)
            if term:
                all_active = False
            ids[id(b)] = bid

        common = flags
        if fe.affinity_timeout > 0:
            common |= M.SVC_F_AFFINITY
        if fe.source_ranges:
            common |= M.SVC_F_SOURCE_RANGES
            g.srcrange = frozenset(self._srcrange_keys(fe, rev_nat))
        if maglev:
            common |= M.SVC_F_MAGLEV

        scopes = [(M.SCOPE_EXTERNAL, fe.external_scope_local)]
        ext_local, int_local = fe.external_scope_local, fe.internal_scope_local
        if all_active and not ext_local:
            # the common case, without selectable()'s filtering: every backend, no terminating
            ext: tuple[list[int], list[int]] = (list(dict.fromkeys(ids.values())), [])
        else:
            ext = self._scope_backends(fe, ext_local, ids, all_active)
        if int_local == ext_local:
            intl, two = ext, False
        else:
            intl = self._scope_backends(fe, int_local, ids, all_active)
            two = (set(ext[0]), set(ext[1])) != (set(intl[0]), set(intl[1]))
        if two:
            scopes.append((M.SCOPE_INTERNAL, fe.internal_scope_local))

        # backend slot values: id, count 0, terminating 0, rev_nat, flags 0, affinity 0
        slot_val_tail = bytes(4) + M.U32.pack(rev_nat) + bytes(8)
        pack_u32 = M.U32.pack
        referenced: set[int] = set()
        # slot 0 entries first, the internal scope's before the external one's (as written)
        head_keys: list[bytes] = []
        head_vals: list[bytes] = []
        svc_keys: list[bytes] = []
        svc_vals: list[bytes] = []
        for scope, local in scopes:
            sel, term = ext if scope == M.SCOPE_EXTERNAL else intl
            prev_order = prev.order_of(scope) if prev is not None else None
            order = _stable_order(prev_order, sel)
            g.set_order(scope, order)
            f = common
            if local:
                f |= M.SVC_F_LOCAL_SCOPE
            if two and scope == M.SCOPE_EXTERNAL:
                f |= M.SVC_F_TWO_SCOPES
            head = fk + _BYTE[scope]
            head_keys.insert(0, head + _SLOT[0])
            head_vals.insert(0, M.SVC_VAL.pack(0, len(order), len(term), rev_nat, f, fe.affinity_timeout))
            slotted = order + term if term else order
            svc_keys += [head + t for t in _slot_tails(len(slotted))]
            svc_vals += [pack_u32(bid) + slot_val_tail for bid in slotted]
            referenced.update(slotted)
            if maglev and order:
                # names from the packed address, as adoption derives them: same table after a restart
                g.set_maglev(scope, tuple(sorted((_backend_name(pending_vals[bid]), bid) for bid in order)))
        g.set_svc(head_keys + svc_keys, head_vals + svc_vals, len(head_keys))
        backends = tuple(sorted(referenced))
        # Usually the one scope's slot order itself (every backend active, sorted): kept once.
        first = g.order_of(M.SCOPE_EXTERNAL)
        g.backends = first if first == backends else backends
        out[fk] = g

    @staticmethod
    def _scope_backends(
        fe: Frontend, local_only: bool, ids: dict[int, int], all_active: bool
    ) -> tuple[list[int], list[int]]:
        """(selectable ids, terminating ids kept for existing flows) of one scope."""
        sel = list(dict.fromkeys([ids[id(b)] for b in fe.selectable(local_only)]))
        if all_active:
            return sel, []
        chosen = set(sel)
        term = sorted(
            {ids[id(b)] for b in fe.backends if b.state is BackendState.TERMINATING and (b.local or not local_only)}
            - chosen
        )
        return sel, term

    @staticmethod
    def _srcrange_keys(fe: Frontend, rev_nat: int) -> list[bytes]:
        keys = []
        for cidr in fe.source_ranges:
            net = ipaddress.ip_network(cidr, strict=False)
            if net.version != fe.family:
                continue  # a range of the other family can never match this frontend's clients
            plen = net.prefixlen + (96 if net.version == 4 else 0)
            keys.append(M.SRCRANGE_KEY.pack(32 + plen, rev_nat, M.addr_to_bytes(str(net.network_address))))
        return keys

    # ------------------------------------------------------------------ public API

    def upsert(self, service: Service) -> None:
        """Make the maps hold exactly this service's desired state (touching only what changed)."""
        with self._lock:
            self._require_open()
            key = service.key
            if key in self.refused and self._services.get(key) == service:
                return  # still refused; tried again when entries are freed
            self._services[key] = service
            self._delivered.add(key)
            self._begin()
            desired = self._render(service)
            for fk in list(desired):
                g = self._groups.get(fk)
                if g is not None and g.owner is not None and g.owner != key:
                    log.warning(
                        "event=frontend_conflict frontend=%s service=%s owner=%s", _fk_label(fk), key, g.owner
                    )
                    self.conflicts[fk] = key
                    del desired[fk]
                elif self.conflicts.get(fk) == key:
                    del self.conflicts[fk]
            old_fks = set(self._by_service.get(key, ())) | {fk for fk in desired if fk in self._groups}
            old = {fk: self._groups.get(fk) for fk in old_fks}
            refusal = self._refusal(old, desired)
            if refusal is not None:
                self._refuse(key, refusal)
                self._forget_render()
                return
            if self.refused.pop(key, None) is not None:
                log.info("event=service_accepted service=%s", key)
            self._apply(old, desired)
            if self.refused:
                self._retry_refused()  # the change may have freed entries

    def delete(self, key: ServiceKey) -> None:
        """Remove everything the service wrote; a service never seen is not an error."""
        with self._lock:
            self._require_open()
            self._services.pop(key, None)
            self.refused.pop(key, None)
            self._delivered.add(key)
            self._begin()
            fks = set(self._by_service.get(key, ()))
            self._apply({fk: self._groups.get(fk) for fk in fks}, {})
            self._retry_conflicts(fks)
            self._retry_refused()

    def full_sync(self, services: Iterable[Service]) -> None:
        """Make the maps hold exactly these services: everything else is removed."""
        # A full sync allocates a few objects per map entry and creates no reference cycles;
        # the collector's passes over the growing heap cost ~25% of a 20k-service sync.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._full_sync(services)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _full_sync(self, services: Iterable[Service]) -> None:
        with self._lock:
            self._require_open()
            services = sorted(services, key=lambda s: (s.key.namespace, s.key.name))
            self._reload()  # diff against what the maps really hold
            for g in self._groups.values():
                g.owner = None  # ownership is decided afresh, in key order
            self._by_service = {}
            self._services = {s.key: s for s in services}
            self._delivered = set(self._services)
            self.conflicts = {}
            self.refused = {}
            self._begin()
            old = dict(self._groups)
            desired = self._plan(services, old)
            self._apply(old, desired, strays=True)

    def _plan(self, services: list[Service], old: dict[bytes, _Group]) -> dict[bytes, _Group]:
        """The groups a full sync writes: services in key order, each whole or refused.

        A service claims its frontends (a frontend already claimed is a conflict) if all of
        them fit beside what earlier services took; otherwise it is refused and keeps the
        groups the maps hold for frontends it claims (its last good state), if those fit.
        """
        desired: dict[bytes, _Group] = {}
        used = group_entries(())
        used_bids: set[int] = set()
        for s in services:
            mine: dict[bytes, _Group] = {}
            try:
                rendered = self._render(s)
            except Exception:  # noqa: BLE001 - one service's bad input must not hold up the rest
                self.errors += 1
                log.exception("event=service_render_failed service=%s", s.key)
                continue
            for fk, g in rendered.items():
                if fk in desired:
                    log.warning(
                        "event=frontend_conflict frontend=%s service=%s owner=%s", _fk_label(fk), s.key, desired[fk].owner
                    )
                    self.conflicts[fk] = s.key
                    continue
                mine[fk] = g
            need = self._needs(mine.values(), used_bids)
            hit = first_overflow(used, need, self.limits)
            if hit is not None:
                wanted = need
                mine = {fk: old[fk] for fk in mine if fk in old}
                need = self._needs(mine.values(), used_bids)
                kept = bool(mine) and first_overflow(used, need, self.limits) is None
                growth = {name: wanted[name] - (need[name] if kept else 0) for name in wanted}
                self._refuse(s.key, Refusal(*hit, self.limits[hit[0]], tuple(growth.items())))
                if not kept:
                    continue
                for g in mine.values():
                    g.owner = s.key
            desired.update(mine)
            for name, n in need.items():
                used[name] += n
            for g in mine.values():
                used_bids.update(g.backends)
        return desired

    # ------------------------------------------------------------------ capacity

    @staticmethod
    def _needs(groups: Iterable[_Group], known_backends: set[int]) -> dict[str, int]:
        """Entries `groups` add to a state that already holds `known_backends`."""
        groups = list(groups)
        need = group_entries(groups)
        new_bids: set[int] = set()
        for g in groups:
            new_bids.update(g.backends)
        need["kpr_backend"] = len(new_bids - known_backends)
        return need

    def _counts(self) -> dict[str, int]:
        """Entries per map the shadow accounts for, strays included (cheap: no syscalls)."""
        c = dict(self._count)
        c["kpr_backend"] = len(self._backend_vals)
        for name, keys in self._stray.items():
            c[name] += len(keys)
        return c

    def _refusal(self, old: dict[bytes, _Group | None], new: dict[bytes, _Group]) -> Refusal | None:
        """Whether replacing `old` by `new` would overflow a map (the service's own delta)."""
        before = group_entries(g for g in old.values() if g is not None)
        after = group_entries(new.values())
        delta = {name: after[name] - before[name] for name in after}
        refs: dict[int, int] = {}
        for g in old.values():
            if g is not None:
                for bid in g.backends:
                    refs[bid] = refs.get(bid, 0) - 1
        for g in new.values():
            for bid in g.backends:
                refs[bid] = refs.get(bid, 0) + 1
        vals, have = self._backend_vals, self._backend_refs
        added = sum(1 for bid, d in refs.items() if d > 0 and bid not in vals)
        freed = sum(1 for bid, d in refs.items() if d < 0 and bid in vals and have.get(bid, 0) + d <= 0)
        delta["kpr_backend"] = added - freed
        hit = first_overflow(self._counts(), delta, self.limits)
        if hit is None:
            return None
        return Refusal(*hit, self.limits[hit[0]], tuple(delta.items()))

    def _forget_render(self) -> None:
        """Forget the ids the last render allocated that were not written."""
        for bid, val in self._pending_vals.items():
            bkey = val[:19]
            if bid not in self._backend_vals:
                self._backend_refs.pop(bid, None)
                if self._backend_ids.get(bkey) == bid:
                    del self._backend_ids[bkey]
        for fk in self._fresh_revnat:
            if fk not in self._groups:
                self._forget_revnat(fk)
        self._begin()

    def _refuse(self, key: ServiceKey, refusal: Refusal) -> None:
        self.refused[key] = refusal
        self.refusals += 1
        log.error("event=service_refused service=%s map=%s reason=%r", key, refusal.map, refusal.text())

    def _retry_refused(self) -> None:
        """Try refused services again whose growth now fits (in key order)."""
        for key in sorted(self.refused):
            r = self.refused.get(key)
            svc = self._services.get(key)
            if r is None or svc is None:
                self.refused.pop(key, None)
                continue
            if first_overflow(self._counts(), dict(r.delta), self.limits) is None:
                log.info("event=service_refused_retry service=%s", key)
                del self.refused[key]
                try:
                    self.upsert(svc)
                except Exception:  # noqa: BLE001 - rolled back and logged; tried again later
                    log.exception("event=service_refused_retry_failed service=%s", key)

    def gc(self) -> int:
        """Remove adopted entries no service re-delivered since open; returns frontends removed."""
        with self._lock:
            self._require_open()
            orphans = {fk: g for fk, g in self._groups.items() if g.owner is None}
            self._begin()
            self._apply(orphans, {}, strays=True)
            if orphans:
                log.info("event=servicemaps_gc frontends=%d", len(orphans))
            return len(orphans)

    def read_back(self) -> dict[str, Any]:
        """Decode the maps (not the shadow) into plain data: for tests. The decoding is
        kpr.readback's, which `kpr service list --datapath` and `kpr explain` use too."""
        from .readback import decode_maps

        with self._lock:
            self._require_open()
            d = decode_maps(self.maps)
            frontends = {}
            for (fk, scope), slots in sorted(d.slots.items()):
                head = slots.get(0)
                label = f"{_fk_label(fk)} {_SCOPE_NAMES.get(scope, scope)}"
                if head is None:
                    frontends[label] = {"error": "slots without a service entry", "slots": sorted(slots)}
                    continue
                _, count, term, rev_nat, flags, aff = head
                ids = [slots.get(i, (0,))[0] for i in range(1, count + term + 1)]
                names = [_backend_label(d.backends.get(i)) for i in ids]
                table = d.maglev.get((rev_nat, scope))
                frontends[label] = {
                    "rev_nat": rev_nat,
                    "flags": sorted(n for bit, n in M.SVC_FLAG_NAMES.items() if flags & bit),
                    "affinity_timeout": aff,
                    "backends": sorted(names[:count]),
                    "terminating": sorted(names[count:]),
                    "backend_ids": ids[:count],
                    "source_ranges": sorted(d.ranges.get(rev_nat, [])) if flags & M.SVC_F_SOURCE_RANGES else [],
                    "maglev": _table_shares(table, d.backends) if table is not None else None,
                    "stray_slots": sorted(s for s in slots if s > count + term),
                }
            return {
                "frontends": frontends,
                "backends": d.backends,
                "revnat": d.revnat,
                "maglev_tables": sorted(d.maglev),
            }

    def entry_counts(self) -> dict[str, int]:
        """Entries per map according to the shadow, strays found at the last read-back included
        (cheap: no syscalls)."""
        with self._lock:
            c = self._counts()
            return {name: c[name] for name in M.SERVICE_MAPS}

    def kernel_counts(self) -> dict[str, int]:
        """Entries per map as the kernel holds them (read back)."""
        with self._lock:
            self._require_open()
            return {name: self.maps[name].count() for name in M.SERVICE_MAPS}

    def ops(self) -> dict[str, dict[str, int]]:
        """Elements written/deleted and syscalls made, per map, since open."""
        return {name: dict(m.ops) for name, m in self.maps.items()}

    def ids(self) -> dict[str, int]:
        """Kernel map ids by name (unchanged across an adopting restart)."""
        return {name: m.id for name, m in self.maps.items()}

    def backend_ids(self) -> dict[str, int]:
        """Backend "addr:port/proto" -> id, from the shadow."""
        with self._lock:
            return {_backend_label_raw(v): bid for bid, v in self._backend_vals.items()}

    # ------------------------------------------------------------------ applying a diff

    def _begin(self) -> None:
        self._pending_vals = {}
        self._fresh_revnat = []

    def _require_open(self) -> None:
        if not self.maps:
            raise RuntimeError("ServiceMapWriter is not open")

    def _apply(self, old: dict[bytes, _Group | None], new: dict[bytes, _Group], *, strays: bool = False) -> None:
        try:
            self._apply_diff(old, new, strays)
        except Exception:
            self.errors += 1
            log.exception("event=servicemaps_apply_failed frontends=%d", len(new))
            # The maps may hold part of the change: roll them back to the state before it.
            try:
                n = self._repair()
                self.rollbacks += 1
                log.warning("event=servicemaps_rolled_back entries=%d", n)
            except Exception:  # noqa: BLE001 - the first error is the one to report; check() repairs later
                log.exception("event=servicemaps_rollback_failed")
            raise

    def _op_total(self) -> int:
        return sum(m.ops["update"] + m.ops["delete"] for m in self.maps.values())

    def _repair(self) -> int:
        """Make the maps equal the shadow (the accepted desired state): read them back, then
        write what differs and delete what nobody wants. Returns entries written or deleted."""
        groups, vals = self._groups, self._backend_vals
        saved = {a: getattr(self, a) for a in _SHADOW}
        before = self._op_total()
        try:
            self._reload()  # the shadow now describes the kernel
            self._begin()
            self._pending_vals = {bid: vals[bid] for g in groups.values() for bid in g.backends if bid in vals}
            self._apply_diff(dict(self._groups), groups, True)
        except BaseException:
            # The shadow stays the desired state (the kernel differs until a later repair).
            for a, v in saved.items():
                setattr(self, a, v)
            self._begin()
            raise
        for fk, g in groups.items():
            self._revnat_ids[fk] = g.rev_nat
            self._revnat_used.add(g.rev_nat)
            self._next_revnat = max(self._next_revnat, g.rev_nat + 1)
        # identities as the maps now hold them (a hand-edited value must not keep its id)
        self._backend_ids = {val[:19]: bid for bid, val in self._backend_vals.items()}
        return self._op_total() - before

    def check(self) -> int:
        """Compare the maps with the desired state and repair any difference (one made by hand
        included); returns the entries repaired. Before the initial sync the desired state is
        the adopted one: only entries nothing accounts for go."""
        with self._lock:
            self._require_open()
            self.checks += 1
            n = self._repair()
            if n:
                self.repairs += n
                log.warning("event=servicemaps_repaired entries=%d", n)
            self._retry_refused()
            return n

    def _apply_diff(self, old: dict[bytes, _Group | None], new: dict[bytes, _Group], strays: bool) -> None:
        # Diff group by group: a service-map key belongs to exactly one group (its prefix is
        # the frontend key), so unchanged groups cost one dict comparison.
        svc_up: dict[bytes, bytes] = {}  # backend slots
        head_up: dict[bytes, bytes] = {}  # slot 0 entries, written last
        svc_del: list[bytes] = []  # stale slots of frontends that stay
        gone_del: list[bytes] = []  # every entry of frontends that go
        rn_up: dict[int, bytes] = {}
        rn_del: list[int] = []
        sr_up: set[bytes] = set()
        sr_del: set[bytes] = set()
        mg_up: dict[bytes, Any] = {}
        mg_del: list[bytes] = []
        ref_delta: dict[int, int] = {}
        pack_mg = M.MAGLEV_KEY.pack
        svc_new = 0  # kpr_svc keys written that the map does not hold yet
        b = self.batch
        # New frontends, written from their packed entries (a full sync makes no object per entry).
        fresh: list[_Group] = []

        for fk, g in new.items():
            og = old.get(fk)
            if og is None:
                if b:
                    fresh.append(g)
                else:
                    svc_up.update(g.svc)
                svc_new += g.n_svc
            elif not og.same_svc(g):
                osvc, gsvc = og.svc, g.svc
                svc_up.update((k, v) for k, v in gsvc.items() if osvc.get(k) != v)
                svc_del.extend(k for k in osvc if k not in gsvc)
                svc_new += sum(1 for k in gsvc if k not in osvc)
            for scope in (M.SCOPE_INTERNAL, M.SCOPE_EXTERNAL):
                k0 = fk + _BYTE[scope] + _SLOT[0]
                v0 = svc_up.pop(k0, None)
                if v0 is not None:
                    head_up[k0] = v0
            if og is None or og.revnat != g.revnat or og.rev_nat != g.rev_nat:
                rn_up[g.rev_nat] = g.revnat
            if og is not None and og.rev_nat != g.rev_nat and og.revnat:
                rn_del.append(og.rev_nat)
            if og is None:
                sr_up |= g.srcrange
            elif og.srcrange != g.srcrange:
                sr_up |= g.srcrange - og.srcrange
                sr_del |= og.srcrange - g.srcrange
            if g.maglev or (og is not None and og.maglev):
                omg = {pack_mg(og.rev_nat, sc): i for sc, i in og.maglev.items()} if og is not None else {}
                nmg = {pack_mg(g.rev_nat, sc): i for sc, i in g.maglev.items()}
                mg_up.update((k, i) for k, i in nmg.items() if i is not None and omg.get(k) != i)
                mg_del.extend(k for k in omg if k not in nmg)
            if og is None:
                for bid in g.backends:
                    ref_delta[bid] = ref_delta.get(bid, 0) + 1
            elif og.backends != g.backends:
                gb, ob = frozenset(g.backends), frozenset(og.backends)
                for bid in gb - ob:
                    ref_delta[bid] = ref_delta.get(bid, 0) + 1
                for bid in ob - gb:
                    ref_delta[bid] = ref_delta.get(bid, 0) - 1
        for fk, og in old.items():
            if og is None or fk in new:
                continue
            # external slot 0 first, so lookups stop before the rest goes
            heads = [fk + _BYTE[sc] + _SLOT[0] for sc in (M.SCOPE_EXTERNAL, M.SCOPE_INTERNAL)]
            osvc = og.svc
            gone_del.extend(k for k in heads if k in osvc)
            gone_del.extend(k for k in osvc if k not in heads)
            if og.revnat:
                rn_del.append(og.rev_nat)
            sr_del |= og.srcrange
            mg_del.extend(pack_mg(og.rev_nat, sc) for sc in og.maglev)
            for bid in og.backends:
                ref_delta[bid] = ref_delta.get(bid, 0) - 1

        refs = self._backend_refs
        vals = self._backend_vals
        be_up = {}
        for bid, val in self._pending_vals.items():
            if vals.get(bid) != val and (refs.get(bid, 0) + ref_delta.get(bid, 0)) > 0:
                be_up[bid] = val
        be_del = [bid for bid, d in ref_delta.items() if d < 0 and refs.get(bid, 0) + d <= 0 and bid in vals]
        if strays:
            be_del.extend(bid for bid, n in refs.items() if n == 0 and bid in vals and bid not in ref_delta)
        # An entry a new group still wants is never deleted (rev-NAT indexes read back from
        # hand-edited maps may collide).
        if rn_del:
            live_rn = {g.rev_nat for g in new.values() if g.revnat}
            rn_del = [i for i in rn_del if i not in live_rn]
        if mg_del:
            live_mg = {pack_mg(g.rev_nat, sc) for g in new.values() for sc in g.maglev}
            mg_del = [k for k in mg_del if k not in live_mg]
        if sr_del:
            for g in new.values():
                if g.srcrange:
                    sr_del -= g.srcrange
        if strays:
            # Nor a stray: a hand-edited slot 0 can give its frontend another rev-NAT index at
            # reload, leaving the frontend's own kpr_revnat entry looking like nobody's.
            self._stray["kpr_revnat"] -= {M.U32.pack(g.rev_nat) for g in new.values() if g.revnat}
            self._stray["kpr_maglev"] -= {pack_mg(g.rev_nat, sc) for g in new.values() for sc in g.maglev}
            self._stray["kpr_srcrange"] -= {k for g in new.values() for k in g.srcrange}

        mp = self.maps
        # Where the change would not fit beside what it replaces, everything that goes is
        # deleted first (readers may miss an entry for a moment instead of the write failing).
        have = self._counts()
        peak = {
            "kpr_svc": have["kpr_svc"] - len(gone_del) + svc_new,
            "kpr_backend": have["kpr_backend"] + sum(1 for i in be_up if i not in vals),
            "kpr_revnat": have["kpr_revnat"] + len(rn_up),
            "kpr_srcrange": have["kpr_srcrange"] + len(sr_up),
            "kpr_maglev": have["kpr_maglev"] + len(mg_up),
        }
        tight = any(peak[name] > self.limits[name] for name in peak)
        # 0. frontends that go: first, so a nearly full map has room for what comes
        if gone_del:
            mp["kpr_svc"].delete_many(gone_del, batch=b)
        if tight:
            log.info("event=servicemaps_tight peak=%s", ",".join(f"{k}:{v}" for k, v in peak.items()))
            self._delete_phase(svc_del, mg_del, sr_del, rn_del, strays, be_del)
            svc_del, mg_del, sr_del, rn_del, be_del = [], [], set(), [], []
        # 1. what service entries will point at
        if be_up and b:
            # ids as one array of u32 (M.U32's layout), no bytes object per key
            mp["kpr_backend"].update_blob(array("I", be_up).tobytes(), b"".join(be_up.values()), len(be_up))
        elif be_up:
            mp["kpr_backend"].update_many([M.U32.pack(i) for i in be_up], list(be_up.values()), batch=b)
        if rn_up:
            mp["kpr_revnat"].update_many([M.U32.pack(i) for i in rn_up], list(rn_up.values()), batch=b)
        if sr_up:
            keys = sorted(sr_up)
            mp["kpr_srcrange"].update_many(keys, [_ONE] * len(keys), batch=b)
        for k, inp in mg_up.items():
            self._write_maglev(k, inp)
        # 2. service entries: backend slots, then slot 0 (internal scope before external)
        if fresh:
            packed = [g.packed_svc() for g in fresh]
            heads = sum(g.n_heads for g in fresh)
            slots = sum(g.n_svc for g in fresh) - heads
            svc_map = mp["kpr_svc"]
            if svc_up:
                svc_map.update_many(list(svc_up), list(svc_up.values()), batch=b)
            if slots:
                svc_map.update_blob(b"".join([p[2] for p in packed]), b"".join([p[3] for p in packed]), slots)
            if heads or head_up:
                svc_map.update_blob(
                    b"".join([p[0] for p in packed] + list(head_up)),
                    b"".join([p[1] for p in packed] + list(head_up.values())),
                    heads + len(head_up),
                )
        elif svc_up or head_up:
            svc_up.update(head_up)  # dicts keep insertion order: heads land last
            mp["kpr_svc"].update_many(list(svc_up), list(svc_up.values()), batch=b)
        # 3. deletions, slot 0 first so lookups stop before slots disappear
        self._delete_phase(svc_del, mg_del, sr_del, rn_del, strays, be_del)

        # Shadow follows the maps.
        count = self._count
        for fk, g in old.items():
            if g is not None and fk not in new:
                gone = self._groups.pop(fk, None)
                if gone is not None:
                    _add_counts(count, gone, -1)
                self._forget_revnat(fk)
                if g.owner is not None and g.owner in self._by_service:
                    _disown(self._by_service, g.owner, fk, drop_empty=True)
        for fk, g in new.items():
            prev = self._groups.get(fk)
            if prev is not None and prev.owner is not None and prev.owner != g.owner:
                _disown(self._by_service, prev.owner, fk, drop_empty=False)
            if prev is not None:
                _add_counts(count, prev, -1)
            _add_counts(count, g, 1)
            self._groups[fk] = g
            _own(self._by_service, g.owner, fk)
        for bid, d in ref_delta.items():
            refs[bid] = refs.get(bid, 0) + d
        self._backend_vals.update(be_up)
        for bid in be_del:
            val = self._backend_vals.pop(bid, None)
            refs.pop(bid, None)
            if val is not None and self._backend_ids.get(val[:19]) == bid:
                del self._backend_ids[val[:19]]
        # ids allocated while rendering but never written (conflicting frontends) are forgotten
        self._forget_render()
        log.debug(
            "event=servicemaps_applied svc_up=%d svc_del=%d backend_up=%d backend_del=%d revnat_up=%d "
            "revnat_del=%d srcrange_up=%d srcrange_del=%d maglev_up=%d maglev_del=%d",
            len(svc_up), len(svc_del) + len(gone_del), len(be_up), len(be_del), len(rn_up), len(rn_del),
            len(sr_up), len(sr_del), len(mg_up), len(mg_del),
        )

    def _delete_phase(
        self, svc_del: list[bytes], mg_del: list[bytes], sr_del: set[bytes], rn_del: list[int], strays: bool, be_del: list[int]
    ) -> None:
        b = self.batch
        mp = self.maps
        if svc_del:
            svc_del.sort(key=_svc_delete_order)
            mp["kpr_svc"].delete_many(svc_del, batch=b)
        if mg_del:
            mp["kpr_maglev"].delete_many(mg_del, batch=False)
        if sr_del:
            mp["kpr_srcrange"].delete_many(sorted(sr_del), batch=b)
        if rn_del:
            mp["kpr_revnat"].delete_many([M.U32.pack(i) for i in rn_del], batch=b)
        if strays:
            for name, keys in self._stray.items():
                if keys:
                    mp[name].delete_many(sorted(keys), batch=b and name != "kpr_maglev")
                    keys.clear()
        if be_del:
            mp["kpr_backend"].delete_many([M.U32.pack(i) for i in be_del], batch=b)

    def _write_maglev(self, key: bytes, inp: tuple[tuple[str, int], ...]) -> None:
        """Build the table and swap it in with one outer-map update (readers never see half a table)."""
        table = self._maglev_cache.get(inp)
        if table is None:
            table = build_table(((bid, name) for name, bid in inp), self.maglev_size)
            self._maglev_cache[inp] = table
            if len(self._maglev_cache) > 256:
                self._maglev_cache.popitem(last=False)
        else:
            self._maglev_cache.move_to_end(inp)
        t, k, v, n = self.specs["kpr_maglev"].inner
        with M.BpfMap.create(M.MapSpec("kpr_maglev_in", t, k, v, n)) as inner:
            inner.update_blob(self._maglev_keys, table.tobytes(), n)
            self.maps["kpr_maglev"].update(key, M.U32.pack(inner.fd))

    def _retry_conflicts(self, freed: Iterable[bytes]) -> None:
        waiting = {self.conflicts.pop(fk) for fk in list(freed) if fk in self.conflicts}
        for key in sorted(waiting):
            svc = self._services.get(key)
            if svc is not None:
                log.info("event=frontend_conflict_retry service=%s", key)
                self.upsert(svc)

    # ------------------------------------------------------------------ plugin hooks

    @hookimpl
    def kpr_start(self, context: PluginContext) -> None:
        if not self.maps:
            self._mount_bpffs_if_missing()
            self.open()
        if self.check_interval is None:
            self.check_interval = float(context.config.agent.resync_interval) if context is not None else 0.0
        self._stopping = False
        self._checker = threading.Thread(target=self._check_loop, name="kpr-servicemaps-check", daemon=True)
        self._checker.start()

    @hookimpl
    def kpr_stop(self, context: PluginContext) -> None:
        self._stopping = True
        self._kick.set()
        if self._checker is not None:
            self._checker.join(10)
            self._checker = None
        self.close()  # pins stay: established flows keep working until the next agent adopts them

    def _check_loop(self) -> None:
        """Retries a failed initial sync with backoff, and runs check() every check_interval."""
        interval = self.check_interval or 0.0
        next_check = time.monotonic() + interval
        while True:
            due = [t for t in (self._retry_at, next_check if interval else None) if t is not None]
            self._kick.wait(max(0.0, min(due) - time.monotonic()) if due else None)
            self._kick.clear()
            if self._stopping:
                return
            now = time.monotonic()
            try:
                if self._retry_at is not None and now >= self._retry_at:
                    self._initial_sync()
                elif interval and now >= next_check:
                    next_check = now + interval
                    self.check()
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("event=servicemaps_check_failed")

    # Through the bus, the initial state is collected and written in one batched full sync
    # at kpr_sync_complete (adopted maps keep serving the old state until then); later
    # changes are applied one service at a time.

    @hookimpl
    def kpr_service_upsert(self, service: Service) -> None:
        with self._lock:
            if self._initial is not None:
                self._initial[service.key] = service
                self._desired_changed()
                return
            self.upsert(service)

    @hookimpl
    def kpr_service_delete(self, key: ServiceKey) -> None:
        with self._lock:
            if self._initial is not None:
                self._initial.pop(key, None)
                self._desired_changed()
                return
            self.delete(key)

    @hookimpl
    def kpr_sync_complete(self) -> None:
        with self._lock:
            if self._initial is None:
                self.gc()
                return
            self._sync_requested = True
            self._initial_sync()

    def _desired_changed(self) -> None:
        # While a failed initial sync waits for its retry, a new desired state is tried soon
        # (but not more often than every _RETRY_ON_CHANGE seconds under churn).
        if self._retry_at is not None:
            self._retry_at = min(self._retry_at, time.monotonic() + _RETRY_ON_CHANGE)
            self._kick.set()

    def _initial_sync(self) -> bool:
        """Write the initial state (one full sync); on failure the maps are rolled back, the
        writer stays not synced and a retry is scheduled with backoff."""
        with self._lock:
            initial = self._initial
            if initial is None or not self._sync_requested:
                return initial is None
            t0 = time.monotonic()
            try:
                self.full_sync(initial.values())
            except Exception as e:  # noqa: BLE001 - reported in status, retried
                self._sync_attempts += 1
                self.sync_error = f"{type(e).__name__}: {e}"
                delay = self._backoff.delay(self._sync_attempts)
                self._retry_at = time.monotonic() + delay
                self._kick.set()
                log.error(
                    "event=servicemaps_initial_sync_failed services=%d attempt=%d retry_in=%.1f error=%r: not ready",
                    len(initial), self._sync_attempts, delay, self.sync_error,
                )
                return False
            self._initial = None
            self._retry_at = None
            self.sync_error = ""
            log.info(
                "event=servicemaps_initial_sync services=%d seconds=%.3f attempts=%d refused=%d",
                len(initial), time.monotonic() - t0, self._sync_attempts + 1, len(self.refused),
            )
            return True

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        """Counts read back from the kernel maps; `details.synced` is false until the initial
        state is in the maps (the agent is not ready before)."""
        with self._lock:
            counts = self.kernel_counts() if self.maps else {}
            expected = self.entry_counts()
            conflicts = len(self.conflicts)
            synced = self._initial is None
            counters = {
                "services": float(len(self._by_service) - (1 if None in self._by_service else 0)),
                "frontends": float(len(self._groups)),
                "backends": float(counts.get("kpr_backend", 0)),
                "map_entries": float(sum(counts.values())),
                "errors": float(self.errors),
                "conflicts": float(conflicts),
                "refused": float(len(self.refused)),
                "refusals": float(self.refusals),
                "rollbacks": float(self.rollbacks),
                "repairs": float(self.repairs),
                "checks": float(self.checks),
            }
            for name, n in counts.items():
                counters[f"entries_{name}"] = float(n)
                counters[f"max_entries_{name}"] = float(self.limits[name])
            details: dict[str, Any] = {
                "synced": synced,
                "refused": {str(k): r.text() for k, r in sorted(self.refused.items())},
            }
            drift = {name: {"kernel": n, "desired": expected[name]} for name, n in counts.items() if n != expected[name]}
            if drift:
                details["drift"] = drift
            healthy = bool(self.maps)
            msg = f"{int(counters['services'])} services, {int(counters['backends'])} backends"
            if not healthy:
                msg = "maps not open"
            if conflicts:
                msg += f", {conflicts} conflicting frontends"
            if self.refused:
                healthy = False
                first = min(self.refused)
                msg += f", {len(self.refused)} refused (first {first}: {self.refused[first].map} full)"
            if not synced and self._sync_attempts:
                healthy = False
                waiting = sorted(str(k) for k in (self._initial or {}))
                details["missing"] = waiting[:50]
                details["syncError"] = self.sync_error
                msg += (
                    f"; initial state not in the maps ({len(waiting)} services waiting, attempt "
                    f"{self._sync_attempts} failed: {self.sync_error}; retrying)"
                )
            elif not synced:
                msg += "; waiting for the initial state"
            if drift:
                msg += f"; maps differ from the desired state in {', '.join(sorted(drift))} (check() repairs)"
            return PluginStatus(healthy=healthy, message=msg, counters=counters, details=details)


# ---------------------------------------------------------------------- helpers


# What _reset_shadow sets: the writer's picture of the maps.
_SHADOW = (
    "_groups", "_by_service", "_backend_ids", "_backend_vals", "_backend_refs", "_revnat_ids", "_revnat_used",
    "_next_backend", "_next_revnat", "_stray", "_count",
)


def _own(by: dict[Any, Any], owner: ServiceKey | None, fk: bytes) -> None:
    """Record that `owner` has `fk`: a tuple while it has a few, a set beyond."""
    fks = by.get(owner, ())
    if type(fks) is set:
        fks.add(fk)
    elif fk not in fks:
        by[owner] = fks + (fk,) if len(fks) < 8 else {*fks, fk}


def _disown(by: dict[Any, Any], owner: ServiceKey | None, fk: bytes, drop_empty: bool) -> None:
    """Forget that `owner` has `fk`; an owner left with none is dropped only when asked (an
    empty entry still counts in status, as it always did)."""
    fks = by.get(owner)
    if fks is None:
        return
    if type(fks) is set:
        fks.discard(fk)
    elif fk in fks:
        fks = by[owner] = tuple(f for f in fks if f != fk)
    if drop_empty and not fks:
        del by[owner]


def _add_counts(count: dict[str, int], g: _Group, sign: int) -> None:
    count["kpr_svc"] += sign * g.n_svc
    count["kpr_revnat"] += sign * (1 if g.revnat else 0)
    count["kpr_srcrange"] += sign * len(g.srcrange)
    count["kpr_maglev"] += sign * len(g.maglev)


def _svc_delete_order(k: bytes) -> tuple[bool, bool]:
    slot0 = k[20] == 0 and k[21] == 0
    return (not slot0, k[19] != M.SCOPE_EXTERNAL)


def _stable_order(prev: tuple[int, ...] | list[int] | None, want: list[int]) -> list[int]:
    """Slot order for `want` that moves as few ids as possible from `prev`.

    Survivors keep their slots; new ids fill the holes, then go at the end; leftover holes
    are closed with ids taken from the end. Without a previous order, ids are sorted.
    """
    if not prev:
        return sorted(want)
    want_set = set(want)
    prev_set = set(prev)
    out: list[int | None] = [x if x in want_set else None for x in prev]
    added = sorted(x for x in want_set if x not in prev_set)
    holes = [i for i, x in enumerate(out) if x is None]
    ai = 0
    for i in holes:
        if ai < len(added):
            out[i] = added[ai]
            ai += 1
    out.extend(added[ai:])
    # close remaining holes from the tail
    lo = 0
    while True:
        while out and out[-1] is None:
            out.pop()
        try:
            lo = out.index(None, lo)
        except ValueError:
            break
        out[lo] = out.pop()
    return out  # type: ignore[return-value]


def _backend_label(b: dict | None) -> str:
    if b is None:
        return "?"
    host = f"[{b['address']}]" if ":" in b["address"] else b["address"]
    return f"{host}:{b['port']}"


def _backend_label_raw(v: bytes) -> str:
    return _backend_name(v) + "/" + M.PROTO_NAMES.get(v[18], str(v[18]))


def _table_shares(table: list[int], backends: dict[int, dict]) -> dict[str, int]:
    counts: dict[int, int] = {}
    for bid in table:
        counts[bid] = counts.get(bid, 0) + 1
    return {_backend_label(backends.get(bid)): n for bid, n in sorted(counts.items())}
