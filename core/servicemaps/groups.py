"""How the service maps' entries are encoded, and the writer's picture of one frontend.

`_Group` is everything one frontend (address, port, protocol) holds in the maps: its kpr_svc
entries in both scopes (packed), its range of kpr_slots (both scopes' backend slots, packed),
rev-NAT entry, source ranges and Maglev tables. The constants
are the byte pieces rendering and applying build keys and values from (layout:
core/bpf/lib/maps.h).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable
from typing import Any

from ..bpf import maps as M
from ..model import FrontendType, Protocol, ServiceKey

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
_SVC_TAIL = bytes(4)  # kpr_svc key tail: slot 0 (the only slot since kpr_slots), pad
_ONE = M.U32.pack(1)  # kpr_srcrange value
_COUNTS = struct.Struct("=HH")  # kpr_svc_val's count, terminating (at offset 4)
_V4_MAPPED = M.addr_to_bytes("0.0.0.0")[:12]  # ::ffff:0:0/96
_BYTE = [bytes((i,)) for i in range(256)]
# Backend value tails after (addr, port, proto): reserved, flags, pad; indexed by Backend.local.
# No state: the entry is shared by every service listing the pod port, and they may disagree
# (ready in one, terminating in another); a backend slot's flags hold its state per service.
_BACKEND_TAIL = (bytes(5), bytes((0, M.BACKEND_F_LOCAL, 0, 0, 0)))
_EXT_KEY_TAIL = _BYTE[M.SCOPE_EXTERNAL] + _SVC_TAIL  # kpr_svc key after the frontend key: external scope
_WILD4, _WILD6 = M.wildcard_bytes(4), M.wildcard_bytes(6)


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
_NO_MAGLEV: dict[int, Any] = {}  # never written: see _Group.set_maglev
_ACTIVE_SLOT = array("I", (0, M.BACKEND_ACTIVE))  # kpr_slot words of an active backend: id (filled in), state


class _Group:
    """What one frontend (address, port, protocol) holds in the maps."""

    # A plain class with __slots__: full syncs make one per frontend, tens of thousands, and
    # the writer keeps them for its lifetime. Its kpr_svc entries are kept packed (all keys
    # in one bytes, all values in another: fixed sizes) rather than as a dict of bytes, a
    # fifth of the memory; `svc` unpacks them for the rare diff of a changed group. All of
    # them are slot 0 entries (one per scope): the backend slots are in kpr_slots. Its
    # backend ids likewise, as arrays of u32 (a tuple of ten ids and their int objects took
    # about 450 bytes, an array about 110), handed out as tuples (order_of, backends).
    __slots__ = (
        "rev_nat", "owner", "_svc_keys", "_svc_vals", "n_svc", "revnat", "_ext", "_int", "_bk", "maglev",
        "srcrange", "base", "span", "_sv",
    )

    def __init__(self, rev_nat: int, owner: ServiceKey | None, revnat: bytes = b"") -> None:
        self.rev_nat = rev_nat
        # The service that wrote it; None for entries adopted from pinned maps, not yet re-delivered.
        self.owner = owner
        # kpr_svc keys and values, both scopes (see svc). The usual one key (external scope)
        # is kept as the frontend key alone, the very object `_groups` holds it by (set_head).
        self._svc_keys = self._svc_vals = b""
        self.n_svc = 0
        # kpr_revnat value (b"" for a group adopted without one).
        self.revnat = revnat
        # Selectable backend ids in slot order, by scope (external, internal; None where it has
        # none): kept so later renders move few slots. See order_of.
        self._ext: array | tuple[int, ...] | None = None
        self._int: array | tuple[int, ...] | None = None
        # Backend ids referenced by any slot, sorted (None: the external scope's order, the
        # usual case, kept once). See backends.
        self._bk: array | tuple[int, ...] | None = ()
        # Scope -> sorted (name, id) pairs its Maglev table was built from (None: unknown,
        # rebuild). Most groups have none: one shared empty dict, replaced before a write.
        self.maglev: dict[int, tuple[tuple[str, int], ...] | None] = _NO_MAGLEV
        # kpr_srcrange keys (most groups have none: one empty set shared by all of them).
        self.srcrange: frozenset[bytes] = _NO_RANGES
        # Its kpr_slots range (base 0: none) and the slots' values (kpr_slot, external scope's
        # first), which fill the range from its start; span is the range's size class. None:
        # the usual values, not kept (see slot_vals).
        self.base = self.span = 0
        self._sv: bytes | None = b""

    @classmethod
    def fresh(
        cls, rev_nat: int, owner: ServiceKey, revnat: bytes, fk: bytes, svc_val: bytes, order: array,
        base: int, span: int, slot_vals: bytes | None,
    ) -> "_Group":
        """The common frontend's group as rendering makes it (one scope, its kpr_svc entry
        (fk: its key's frontend key, the one `_groups` holds it by; see set_head),
        its backends' ids in slot order in `order`, an array("I"): sorted when rendering
        makes it, as the slots were when adoption does): each field set once (a full sync
        into empty maps makes tens of thousands, see kpr.servicemaps.bulk). slot_vals None:
        every slot the usual value, all active (see slot_vals); given otherwise."""
        g = cls.__new__(cls)
        g.rev_nat, g.owner, g.revnat = rev_nat, owner, revnat
        g._svc_keys, g._svc_vals, g.n_svc = fk, svc_val, 1
        g._ext, g._int, g._bk = order, None, None
        g.maglev, g.srcrange = _NO_MAGLEV, _NO_RANGES
        g.base, g.span, g._sv = base, span, slot_vals
        return g

    def order_of(self, scope: int) -> tuple[int, ...] | None:
        """The scope's selectable backend ids in slot order (None: the scope has no entries)."""
        got = (self._ext, self._int)[scope]
        return None if got is None else tuple(got)

    def set_order(self, scope: int, ids: list[int] | tuple[int, ...]) -> None:
        got = _ids(ids)
        if scope == 0:
            if self._bk is None:
                self._bk = self._ext  # its backends stay what they were
            self._ext = got
        elif scope == 1:
            self._int = got
        else:
            raise IndexError(f"scope {scope}")

    @property
    def slot_vals(self) -> bytes:
        """Its kpr_slots values (packed kpr_slot, the external scope's first). Most groups'
        are their external order's ids, every one active, of generation 0 (their ids are
        their indexes): those are not kept but made again when asked (derive_slots)."""
        sv = self._sv
        if sv is not None:
            return sv
        ext = self._ext
        words = _ACTIVE_SLOT * len(ext)  # type: ignore[arg-type]
        words[0::2] = ext  # type: ignore[assignment]
        return words.tobytes()

    @slot_vals.setter
    def slot_vals(self, vals: bytes) -> None:
        self._sv = vals

    def derive_slots(self) -> None:
        """Its slot values are the usual ones (see slot_vals): not kept. The caller knows
        (rendering: the kernel ids it packed were the ids themselves, every backend active,
        one scope); a group whose order is no array keeps them."""
        if type(self._ext) is array:
            self._sv = None

    def keep_slots(self, vals: bytes) -> None:
        """Its slot values are `vals` (read back from kpr_slots: a restart, a check): not kept
        where they are the usual ones (see slot_vals), as rendering leaves them, else kept."""
        ext = self._ext
        if type(ext) is array and self._int is None and len(vals) == 8 * len(ext):
            words = array("I", vals)
            # (the ids are the kernel ids: generation 0; every slot active)
            if words[0::2] == ext and words[1::2].count(M.BACKEND_ACTIVE) == len(ext):
                self._sv = None
                return
        self._sv = vals

    @property
    def n_slots(self) -> int:
        """How many kpr_slots values it has (both scopes)."""
        sv = self._sv
        return len(sv) >> 3 if sv is not None else len(self._ext)  # type: ignore[arg-type]

    def same_slots(self, other: "_Group") -> bool:
        """Whether both have the same kpr_slots values."""
        if self._sv is None and other._sv is None:
            return self._ext == other._ext
        return self.slot_vals == other.slot_vals

    @property
    def backends(self) -> tuple[int, ...]:
        """Backend ids referenced by any slot, sorted."""
        bk = self._bk
        return tuple(self._ext if bk is None else bk)  # type: ignore[arg-type]

    @backends.setter
    def backends(self, ids: Iterable[int]) -> None:
        got = _ids(ids)
        self._bk = None if self._ext is not None and got == self._ext else got

    def set_maglev(self, scope: int, built_from: tuple[tuple[str, int], ...] | None) -> None:
        if self.maglev is _NO_MAGLEV:
            self.maglev = {}
        self.maglev[scope] = built_from

    def set_svc(self, keys: list[bytes], values: list[bytes]) -> None:
        """Its kpr_svc entries, keys and values in the same order (each of one size)."""
        self._svc_keys = b"".join(keys)
        self._svc_vals = b"".join(values)
        self.n_svc = len(keys)

    def set_packed(self, keys: bytes, values: bytes, n: int) -> None:
        """Its kpr_svc entries already packed: `n` keys and values."""
        self._svc_keys = keys
        self._svc_vals = values
        self.n_svc = n

    def set_head(self, fk: bytes, value: bytes) -> None:
        """Its one kpr_svc entry, of the external scope: key fk + that scope's tail. Only fk
        is kept (pass the frontend key `_groups` holds the group by: no bytes of its own)."""
        self._svc_keys = fk
        self._svc_vals = value
        self.n_svc = 1

    def _keys(self) -> bytes:
        ks = self._svc_keys
        return ks + _EXT_KEY_TAIL if len(ks) == 19 else ks

    def packed_svc(self) -> tuple[bytes, bytes]:
        """(its kpr_svc keys, their values), each concatenated."""
        return self._keys(), self._svc_vals

    @property
    def svc(self) -> dict[bytes, bytes]:
        """kpr_svc key -> value, both scopes (a new dict, unpacked)."""
        n = self.n_svc
        if not n:
            return {}
        ks, vs = self._keys(), self._svc_vals
        k, v = len(ks) // n, len(vs) // n
        return dict(zip([ks[i : i + k] for i in range(0, len(ks), k)], [vs[i : i + v] for i in range(0, n * v, v)] if v else [b""] * n))

    @svc.setter
    def svc(self, entries: dict[bytes, bytes]) -> None:
        self.set_svc(list(entries), list(entries.values()))

    def place(self, base: int) -> None:
        """Put the group's slots at kpr_slots index `base`: its service entries' slot_base
        become base (external scope, whose slots come first) or base + the external scope's
        slot count (internal scope); an entry without slots keeps 0."""
        self.base = base
        n = self.n_svc
        vals = self._svc_vals
        size = len(vals) // n if n else 0
        if n == 1:
            if self.n_slots:  # (its one scope's count + terminating > 0)
                self._svc_vals = M.U32.pack(base) + vals[4:]
            return
        buf = bytearray(vals)
        keys = self._keys()
        ks = len(keys) // n if n else 0
        ext = 0
        for i in range(n):
            if keys[i * ks + 19] == M.SCOPE_EXTERNAL:
                count, term = _COUNTS.unpack_from(buf, i * size + 4)
                ext = count + term
        for i in range(n):
            count, term = _COUNTS.unpack_from(buf, i * size + 4)
            if count + term:
                M.U32.pack_into(buf, i * size, base + (0 if keys[i * ks + 19] == M.SCOPE_EXTERNAL else ext))
        self._svc_vals = bytes(buf)

    def slot_table(self) -> dict[tuple[int, int], tuple[int, int]]:
        """What programs read, decoded: (scope, 0) -> (count, terminating); (scope, i) ->
        (backend id, state flags) of slot i (the external scope's slots first in slot_vals,
        placed or not)."""
        heads = {k[19]: M.SVC_VAL.unpack(v)[1:3] for k, v in self.svc.items()}
        out: dict[tuple[int, int], tuple[int, int]] = {}
        off = 0
        for scope in sorted(heads):  # external (0) first
            count, term = heads[scope]
            out[(scope, 0)] = (count, term)
            for i in range(1, count + term + 1):
                out[(scope, i)] = M.SLOT.unpack_from(self.slot_vals, (off + i - 1) * 8)
            off += count + term
        return out

    def same_svc(self, other: "_Group") -> bool:
        """Whether both hold the same kpr_svc entries (packed in the same order, or not)."""
        if self._svc_keys == other._svc_keys and self._svc_vals == other._svc_vals:  # (either form)
            return True
        return self.n_svc == other.n_svc and self.svc == other.svc



def _ids(ids: Iterable[int]) -> array | tuple[int, ...]:
    """Backend ids as kept in a group: an array of u32, or a tuple where one does not fit
    (an id read from a map edited by hand)."""
    try:
        return array("I", ids)
    except (OverflowError, TypeError):
        return tuple(ids)


def group_entries(groups: Iterable[_Group]) -> dict[str, int]:
    """Entries the groups take in each service map (kpr_slots: their ranges' spans);
    kpr_backend is left at 0 (backends are shared between groups: count distinct ids, see
    ServiceMapWriter._needs)."""
    svc = slots = revnat = srcrange = maglev = 0
    for g in groups:
        svc += g.n_svc
        slots += g.span
        revnat += 1 if g.revnat else 0
        srcrange += len(g.srcrange)
        maglev += len(g.maglev)
    return {
        "kpr_svc": svc, "kpr_slots": slots, "kpr_backend": 0, "kpr_revnat": revnat, "kpr_srcrange": srcrange,
        "kpr_maglev": maglev,
    }


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
    count["kpr_slots"] += sign * g.span
    count["kpr_revnat"] += sign * (1 if g.revnat else 0)
    count["kpr_srcrange"] += sign * len(g.srcrange)
    count["kpr_maglev"] += sign * len(g.maglev)
