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
  Entries nobody re-delivers are removed at sync complete (the bus's "sync" change).
- Safe ordering for concurrent readers: backends, backend slots (a new kpr_slots range per
  change, see kpr.servicemaps.slots), rev-NAT entries, source ranges and Maglev tables are
  written before the service entries that lead to them; a frontend's old range is freed only
  after the entry points at the new one, and reused from the next operation on; orphans are
  deleted last.

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
- Ready only when written. Through the bus's writer stage (kpr.pipeline), the initial state is
  one full sync at sync complete (`apply_batch` with a "sync" change); if it cannot be written, the writer retries with backoff and reports
  itself not synced (status details `synced: false`, what is missing), which holds the
  agent's readiness.

A frontend group is everything one (address, port, protocol) owns: its service entries in
both scopes, its kpr_slots range, rev-NAT entry, source ranges and Maglev tables. Groups are owned by one service;
a second service claiming the same frontend is reported as a conflict and retried when the
owner lets go.
"""

from .groups import _Group, group_entries
from .params import SIZE_KEYS, SIZE_KEYS_ALL, Refusal, WriterParams, first_overflow, writer_params
from .rendering import ALGORITHM_ANNOTATION
from .writer import MapIncompatible, ServiceMapWriter

# Modules: params (sizes, WriterParams, writer_params), groups (entry encoding, _Group), slots
# (kpr_slots ranges), rendering (Service -> groups, no syscalls), applying
# (upsert/delete/full_sync, diff and batches), bulk (a full sync's common services a list at a
# time: into empty maps, or claimed unchanged from adopted ones), reconcile (adoption, check/repair, gc, read_back), hooks (the plugin side), claims
# (services waiting for a frontend another holds, first come first served), writer
# (the class, composed from them, and the maps' lifecycle).

__all__ = [
    "ServiceMapWriter", "ALGORITHM_ANNOTATION", "MapIncompatible", "Refusal", "group_entries", "first_overflow",
    "SIZE_KEYS", "SIZE_KEYS_ALL", "WriterParams", "writer_params", "_Group",
]
