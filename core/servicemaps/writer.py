"""ServiceMapWriter: the maps' lifecycle (create or adopt, close) and the writer's state,
composed with rendering, applying, read-back and the plugin hooks."""

from __future__ import annotations

import logging
import threading
from array import array
from collections import OrderedDict, deque
from dataclasses import replace
from pathlib import Path

from ..bpf import maps as M
from ..bpf.maglev import is_prime
from ..bus import Backoff
from ..idtables import IdBytes, IdCounts, IdSet, KeyIds
from .. import memory
from ..memory import gc_paused
from ..model import Service, ServiceKey
from .adopt import AdoptMixin
from .applying import ApplyMixin
from .bulk import BulkMixin
from .claims import Claims
from . import fetable
from .groups import _Group, group_entries
from .hooks import HooksMixin
from .params import SIZE_KEYS_ALL, Refusal
from .reconcile import ReconcileMixin
from .rendering import RenderMixin
from .slots import SlotAllocator

log = logging.getLogger("kpr.servicemaps")  # one logger for the whole writer, as before the split

MapIncompatible = M.MapIncompatible
_ARRAYS = ("kpr_slots", "kpr_backend")  # service maps that are arrays: index 0 unused
_BACKEND_KEY = 19  # a backend's identity: the first bytes of its kpr_backend value (addr16 + port + proto)


class ServiceMapWriter(HooksMixin, ApplyMixin, AdoptMixin, BulkMixin, ReconcileMixin, RenderMixin):
    """Writes services into the maps pinned under `pin_path` (kpr's bpf.pinPath).

    In an agent it is the core's `servicemaps` facility: the bus's writer stage (kpr.pipeline)
    feeds it with `apply_batch` before any plugin sees a change; it keeps kpr_start, kpr_stop
    and kpr_status as a plugin does.
    """

    # True: every outermost operation moves the new backend identities into the compact table
    # itself before it returns, not the checker thread later (tests: the table in every path).
    _compact_in_op = False
    # Its kpr_start only opens the maps: the agent may run the source's first pass meanwhile
    # (kpr.daemon.STARTS_WITHOUT_SOURCE); what that pass sends waits in the bus's queue.
    starts_without_source = True
    # ... and it is short (kpr.daemon.STARTS_OFF_THE_GIL).
    starts_off_the_gil = True

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
        frontend_table: bool = True,
    ) -> None:
        if not is_prime(maglev_size):
            raise ValueError(f"maglev_size must be prime, got {maglev_size}")
        if algorithm not in ("random", "maglev"):
            raise ValueError(f"algorithm must be random or maglev, got {algorithm!r}")
        self.pin_path = Path(pin_path)
        # kpr_fe, kpr_svc's one-line copy for the NodePort programs (kpr.servicemaps.fetable):
        # kept only where a program reads it and the CPU's memory order allows it
        self.frontend_table = frontend_table
        self.maglev_size = maglev_size
        self.algorithm = algorithm
        self.batch = batch
        self.specs = M.specs_with(sizes, maglev_size)
        if self.specs["kpr_backend"].max_entries > 1 << M.BACKEND_INDEX_BITS:
            raise ValueError(
                f"bpf.mapSizes.kprBackend {self.specs['kpr_backend'].max_entries} is larger than "
                f"{1 << M.BACKEND_INDEX_BITS}: a backend id keeps its top {32 - M.BACKEND_INDEX_BITS} bits for a generation"
            )
        self._explicit_sizes = set(sizes or ())
        self._names = list(M.SERVICE_MAPS) + (
            [n for n in self.specs if n not in M.SERVICE_MAPS] if create_datapath_maps else []
        )
        self.maps: dict[str, M.BpfMap] = {}
        # (the arrays kpr_slots and kpr_backend never use index 0: slot_base 0 and id 0 mean none)
        self.limits = {name: self.specs[name].max_entries - (name in _ARRAYS) for name in M.SERVICE_MAPS}
        self._lock = threading.RLock()
        # Depth of public operations (apply_batch, and upserts inside it or retried from
        # another): held kpr_slots ranges are released only when an outermost one begins
        # (see kpr.servicemaps.slots).
        self._depth = 0
        # Backend ids this process freed, in the order it freed them, while still free: kept
        # through the reloads that rebuild the shadow (check(), a full sync), which lose the
        # queue below, so the id freed longest ago is still taken first (RenderMixin._freed_id).
        self._freed: dict[int, None] = {}
        self._gens_bumped: dict[int, int] | None = None  # during _repair: generations its deletes bumped
        # The shadow is the maps as open() read them, no operation since: the first full sync
        # (a restart's, at sync complete) diffs against it without reading 1M entries again.
        self._as_read = False
        # Pinned maps opened but not read into the shadow yet (open(read=False)): the first
        # operation reads them (_ensure_read), unless it is a full sync that finds them holding
        # exactly its services (AdoptMixin).
        self._unread = False
        self._reset_shadow()
        self.errors = 0
        self.conflicts = Claims()  # frontend key -> services waiting for it, first come, first served
        # Services refused for capacity (they keep their last good state), and counters.
        self.refused: dict[ServiceKey, Refusal] = {}
        self.refusals = 0  # refusal decisions since start
        self.rollbacks = 0  # failed writes rolled back
        self.repairs = 0  # entries written or deleted to repair a difference found by check()
        self.checks = 0
        # Seconds between check()s once started (kpr_start; None: agent.resyncInterval; 0: never).
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
        # Services delivered through the writer stage before sync complete; None afterwards.
        self._initial: dict[ServiceKey, Service] | None = {}
        # When the checker thread next moves new backend identities into the compact table
        # (None: nothing waiting; see HooksMixin.compact_ids).
        self._compact_at: float | None = None

    def _reset_shadow(self) -> None:
        self._groups: dict[bytes, _Group] = {}
        # service -> its frontend keys (a tuple: most services have one or two; see _own)
        self._by_service: dict[ServiceKey | None, tuple[bytes, ...] | set[bytes]] = {}
        self._services: dict[ServiceKey, Service] = {}
        # Backends: id -> value in the map; identity (addr16 + port + proto: the value's
        # first 19 bytes) -> id; id -> refs. (Flat tables: a few bytes per backend where dicts
        # took about a hundred. The identity table checks its entries against the values, and
        # takes new ones into a dict first: compact_ids() moves them into its table.)
        self._backend_vals = IdBytes(M.BACKEND.size)
        self._backend_ids = KeyIds(self._backend_vals, _BACKEND_KEY)
        self._backend_refs = IdCounts()
        self._revnat_ids: dict[bytes, int] = {}
        # rev-NAT indexes in use (the groups' and stray entries'): a flag per index, not a set of ints
        self._revnat_used = IdSet()
        self._next_backend = 1
        # Every id in use is below _next_backend; once it reaches kpr_backend's end, new ids
        # come from this queue of freed ones, oldest first (None: not built yet; see
        # RenderMixin._backend_id).
        self._free_ids: deque[int] | None = None
        # Generation per kpr_backend index (None: all 0): an index's current backend's, or for
        # a free index the one its next backend takes (bumped when freed, kept in the zero
        # entry written then). Ids the kernel sees are M.backend_id(index, generation).
        self._backend_gen: array | None = None
        self._next_revnat = 1
        # Entries found in the maps that no group accounts for; removed by GC.
        self._stray: dict[str, set[bytes]] = {"kpr_srcrange": set(), "kpr_maglev": set(), "kpr_revnat": set()}
        # Entries the groups take per map (group_entries of every group), kept up to date.
        self._count = group_entries(())
        # kpr_slots ranges (the groups' and the freed ones held until the next operation).
        self._slots = SlotAllocator(self.specs["kpr_slots"].max_entries)
        # kpr_svc entries of backend slots an older kpr wrote (slot > 0): left for the programs
        # that still read them until sweep_legacy() (README: upgrading from per-slot entries).
        self._legacy: list[bytes] = []
        # Per operation: backends rendered (id -> (identity, value)) and rev-NAT indexes allocated.
        self._pending_vals: dict[int, bytes] = {}  # id -> value (its first 19 bytes: the identity)
        self._fresh_revnat: list[bytes] = []
        self._fresh_slots: list[tuple[bytes, int, int]] = []  # (frontend key, base, span) allocated
        self._ids_over = False  # a backend id past the kpr_backend array was handed out (ApplyMixin._place)

    # ------------------------------------------------------------------ lifecycle

    @gc_paused  # (the shadow of 20k services: 0.1 s of collections while it is made, then frozen)
    def open(self, *, read: bool = True) -> "ServiceMapWriter":
        """Create the maps, or adopt the pinned ones, and rebuild the shadow from them (with
        `read` false, when first needed: a restart's initial sync may find the maps holding
        exactly its services, kpr.servicemaps.adopt)."""
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
                        if M.retyped(m, spec):
                            # an older kpr's hash kpr_backend: copied into an array, ids kept
                            m = self.maps[name] = M.retype_pinned(m, spec, path)
                        spec = self._pinned_size(m, spec)
                        if M.grows(m, spec):
                            # flow state of an older layout: carried over, not refused
                            m = self.maps[name] = M.grow_pinned(m, spec, path)
                        M.check_compatible(m, spec, path)
                        adopted.append(name)
                    else:
                        m = self._create(spec)
                        self.maps[name] = m
                        m.pin(path)
                        created.append(name)
                if self.frontend_table and fetable.supported():
                    self.maps["kpr_svc"] = fetable.mirrored(  # type: ignore[assignment]
                        self.maps["kpr_svc"], self.pin_path, self.maps["kpr_slots"])
                else:
                    fetable.clear_pinned(self.pin_path)
                self._check_maglev_inner()
                if read or not set(M.SERVICE_MAPS).issubset(adopted):  # (created ones: nothing to read, at once)
                    self._reload()
                    self._as_read = True
                else:
                    # The allocator __init__ made has the configured kpr_slots size; a pin of
                    # another size kept as it is (_pinned_size) bounds the ranges as _reload's
                    # does, or the maps taken as they are would hand out slots past the array.
                    s = self._slots
                    self._slots, _past = SlotAllocator.adopt(self.specs["kpr_slots"].max_entries, list(s.live.items()), s.held)
                    self._unread = True
            except Exception:
                self.close()
                raise
            log.info(
                "event=servicemaps_open pin_path=%s created=%s adopted=%s frontends=%s backends=%s",
                self.pin_path, ",".join(created) or "-", ",".join(adopted) or "-",
                "unread" if self._unread else len(self._groups), "unread" if self._unread else len(self._backend_vals),
            )
            return self

    def _ensure_read(self) -> None:
        """Read the maps into the shadow if open() left them unread (under the lock)."""
        if self._unread:
            with self._lock, memory.paused():
                if self._unread:
                    self._unread = False
                    self._reload()
                    self._as_read = True

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
            self.limits[spec.name] = have - (spec.name in _ARRAYS)
        return spec

    def close(self) -> None:
        """Close the map fds. Pins stay: programs keep using the maps (`kpr cleanup` removes them)."""
        with self._lock:
            for m in self.maps.values():
                m.close()
            self.maps.clear()
            self._unread = False

    def __enter__(self) -> "ServiceMapWriter":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_bpffs(self) -> None:
        from ..bpf.fs import on_bpffs

        if not on_bpffs(self.pin_path):
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
        size = M.inner_max_entries(self.maps["kpr_maglev"])
        if size is not None and size != self.maglev_size:
            raise MapIncompatible(
                f"pinned map {self.pin_path / 'kpr_maglev'} holds Maglev tables of {size} slots, this kpr "
                f"builds {self.maglev_size}: run `kpr cleanup` or restore the previous maglev size"
            )
