"""Python side of the shared service maps: struct mirrors, map specs, and map access.

The C side is core/bpf/lib/maps.h (+ conntrack.h, nat.h), the one definition: constants,
ctypes mirrors and packers here are read from it (kpr.bpf.abi); tests/kernel/test_maps_layout.py
checks the mirrors against bcc's view of the C structs. The writer packs entries with the
`struct.Struct` packers below (much faster than ctypes instances).

Maps are created, pinned and opened through libbpf.so.1 (ctypes): bcc has no batch
operations in Python, and the writer must own the maps before any program is loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import functools
import ipaddress
import logging
import mmap
import os
import re
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kpr.bpf import abi, ctclock

log = logging.getLogger(__name__)

__all__ = [
    "BpfMap",
    "MapIncompatible",
    "GROWN_VALUES",
    "grow_pinned",
    "grows",
    "inner_max_entries",
    "MapSpec",
    "SPECS",
    "cflags",
    "addr_to_bytes",
    "bytes_to_addr",
    "libbpf",
]

# --- kernel constants (uapi/linux/bpf.h) -----------------------------------------------

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_HASH_OF_MAPS = 13

MAP_TYPE_NAMES = {1: "hash", 2: "array", 9: "lru_hash", 11: "lpm_trie", 13: "hash_of_maps"}

BPF_F_NO_PREALLOC = 1 << 0
BPF_F_MMAPABLE = 1 << 10  # an ARRAY whose values user space maps into memory (BpfMap.mmap)

BPF_ANY = 0
BPF_NOEXIST = 1

IPPROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in IPPROTO.items()}

# The constants, structs and packers below are read from lib/maps.h, lib/conntrack.h and
# lib/nat.h (kpr.bpf.abi): the headers are their one definition.
SCOPE_EXTERNAL = abi.value("KPR_SCOPE_EXTERNAL")  # backends for traffic from outside the node
SCOPE_INTERNAL = abi.value("KPR_SCOPE_INTERNAL")  # backends for in-cluster traffic, when they differ

SVC_F_CLUSTER_IP = abi.value("KPR_SVC_F_CLUSTER_IP")
SVC_F_NODE_PORT = abi.value("KPR_SVC_F_NODE_PORT")
SVC_F_EXTERNAL_IP = abi.value("KPR_SVC_F_EXTERNAL_IP")
SVC_F_LOAD_BALANCER = abi.value("KPR_SVC_F_LOAD_BALANCER")
SVC_F_HOST_PORT = abi.value("KPR_SVC_F_HOST_PORT")
SVC_F_AFFINITY = abi.value("KPR_SVC_F_AFFINITY")
SVC_F_SOURCE_RANGES = abi.value("KPR_SVC_F_SOURCE_RANGES")
SVC_F_LOCAL_SCOPE = abi.value("KPR_SVC_F_LOCAL_SCOPE")
SVC_F_TWO_SCOPES = abi.value("KPR_SVC_F_TWO_SCOPES")
SVC_F_MAGLEV = abi.value("KPR_SVC_F_MAGLEV")
SVC_F_WILDCARD = abi.value("KPR_SVC_F_WILDCARD")

# How `kpr service list` names the KPR_SVC_F_* flags where it is not the suffix in lower case
# with dashes (SOURCE_RANGES: "source-ranges"); a new flag in lib/maps.h is named with nothing
# to add here.
_SVC_FLAG_LABELS = {
    "CLUSTER_IP": "ClusterIP",
    "NODE_PORT": "NodePort",
    "EXTERNAL_IP": "ExternalIP",
    "LOAD_BALANCER": "LoadBalancer",
    "HOST_PORT": "HostPort",
    "LOCAL_SCOPE": "local",
}
SVC_FLAG_NAMES = {
    bit: _SVC_FLAG_LABELS.get(suffix, suffix.lower().replace("_", "-"))
    for suffix, bit in abi.group("KPR_SVC_F_").items()
}

BACKEND_ACTIVE = abi.value("KPR_BACKEND_ACTIVE")
BACKEND_TERMINATING = abi.value("KPR_BACKEND_TERMINATING")
BACKEND_F_LOCAL = abi.value("KPR_BACKEND_F_LOCAL")

# --- ctypes mirrors of the C structs, generated from the headers --------------------------

KprAddr = abi.ctype("kpr_addr")  # union kpr_addr: IPv6, or IPv4 mapped into ::ffff:0:0/96
SvcKey = abi.ctype("kpr_svc_key")  # frontend, scope and backend slot
SvcVal = abi.ctype("kpr_svc_val")  # the service entry of a frontend scope, slot_base into kpr_slots
Slot = abi.ctype("kpr_slot")  # kpr_slots value: a backend id and its state in that service
Backend = abi.ctype("kpr_backend")
RevNat = abi.ctype("kpr_revnat")
AffinityKey = abi.ctype("kpr_affinity_key")
AffinityVal = abi.ctype("kpr_affinity_val")
MaglevKey = abi.ctype("kpr_maglev_key")
SrcRangeKey = abi.ctype("kpr_srcrange_key")  # LPM key
CtKey = abi.ctype("kpr_ct_key")  # lib/conntrack.h; also the kpr_snat key
CtEntry = abi.ctype("kpr_ct_entry")
NatEntry = abi.ctype("kpr_nat_entry")  # lib/nat.h

# Fast packers with the same layouts ("=": native order, no padding; ports are passed already
# in network order, as `htons(port)`). Callers pass the fields positionally, in header order,
# without the ones skipped (pad bytes); tests/test_abi.py pins the field lists they rely on.
SVC_KEY = abi.packer("kpr_svc_key")  # addr, port, proto, scope, slot, pad
SVC_VAL = abi.packer("kpr_svc_val")  # slot_base, count, terminating, rev_nat, flags, affinity_timeout
SLOT = abi.packer("kpr_slot")  # backend_id, flags
BACKEND = abi.packer("kpr_backend", skip=("gen",))  # addr, port, proto, reserved (0: state is per service), flags
REVNAT = abi.packer("kpr_revnat", skip=("pad",))  # addr, port, proto
MAGLEV_KEY = abi.packer("kpr_maglev_key")  # rev_nat, scope
SRCRANGE_KEY = abi.packer("kpr_srcrange_key")  # prefixlen, rev_nat, addr
U32 = struct.Struct("=I")

# Struct mirror -> packer, for the layout test.
PACKERS: dict[type[ctypes.Structure], struct.Struct] = {
    SvcKey: SVC_KEY,
    SvcVal: SVC_VAL,
    Slot: SLOT,
    Backend: BACKEND,
    RevNat: REVNAT,
    MaglevKey: MAGLEV_KEY,
    SrcRangeKey: SRCRANGE_KEY,
}

htons = socket.htons
ntohs = socket.ntohs

_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"


@functools.lru_cache(maxsize=65536)
def addr_to_bytes(address: str) -> bytes:
    """16 bytes as the maps store an address: IPv6 as is, IPv4 mapped into ::ffff:0:0/96."""
    # inet_pton rather than ipaddress: ~10x faster, and full syncs convert 100k+ addresses.
    try:
        return _V4_PREFIX + socket.inet_pton(socket.AF_INET, address)
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        raise ValueError(f"not an IP address: {address!r}") from None


def bytes_to_addr(raw: bytes) -> str:
    """Inverse of addr_to_bytes: the text form, IPv4 for mapped addresses."""
    if raw[:12] == _V4_PREFIX:
        return str(ipaddress.IPv4Address(raw[12:16]))
    return str(ipaddress.IPv6Address(raw[:16]))


def wildcard_bytes(family: int) -> bytes:
    """The address-0 of a family as stored: ::ffff:0.0.0.0 or ::."""
    return addr_to_bytes("0.0.0.0" if family == 4 else "::")


# --- map specs --------------------------------------------------------------------------


@dataclass(frozen=True)
class MapSpec:
    # Map and pin name (the C variable name in lib/*.h).
    name: str
    # BPF_MAP_TYPE_*.
    type: int
    key_size: int
    value_size: int
    max_entries: int
    # C macro that sets max_entries in lib/*.h ("" when fixed).
    macro: str = ""
    flags: int = 0
    # Inner map of a map-of-maps: (type, key_size, value_size, max_entries).
    inner: tuple[int, int, int, int] | None = None

    def describe(self) -> str:
        return (
            f"type={MAP_TYPE_NAMES.get(self.type, self.type)} key_size={self.key_size} "
            f"value_size={self.value_size} max_entries={self.max_entries} flags={self.flags}"
        )


MAGLEV_DEFAULT_SIZE = 16381  # KPR_MAGLEV_M

_sz = ctypes.sizeof  # key and value sizes: the structs' (lib/*.h)

# Every shared map kpr pins. These max_entries are the one definition of the defaults:
# programs get them as -D flags (cflags() below), and lib/*.h's #ifndef fallbacks repeat them
# (tests/test_map_defaults.py checks that they agree). bpf.mapSizes overrides them.
#
# Sized for at least 10k services x 10 endpoints: every service a ClusterIP, a third of them
# also a NodePort on two node addresses (23k frontends: 23k kpr_svc entries and ranges of 12
# slots, 280k of kpr_slots; 100k backends). kpr_svc keeps the size it had when it also held the
# backend slots (a pinned map of an older kpr stays compatible).
# Hash maps are preallocated: the kernel takes the memory at creation, per max entry, whatever
# the fill (memlock, kernel 6.18): kpr_svc 112 B (28 MiB), kpr_slots 8 B (4 MiB), kpr_backend 24 B (3 MiB),
# kpr_revnat 96 B (6 MiB), kpr_affinity 104 B (6.5 MiB), kpr_maglev 80 B (2.5 MiB) plus 128 KiB
# per Maglev table in use (M = 16381); kpr_srcrange is not preallocated (per range in use);
# kpr_ct 144 B (18 MiB), kpr_snat 152 B (19 MiB) since the two-insert SNAT layout (issue 14).
SPECS: dict[str, MapSpec] = {
    s.name: s
    for s in (
        # frontend + scope (+ slot 0) -> service entry
        MapSpec("kpr_svc", BPF_MAP_TYPE_HASH, _sz(SvcKey), _sz(SvcVal), 262144, "KPR_SVC_MAX"),
        # index -> backend id and its state in the service: every frontend scope's backend slots
        # (mmapable: the writer stores ranges into it as memory, no syscall, no per-entry copy)
        MapSpec("kpr_slots", BPF_MAP_TYPE_ARRAY, 4, _sz(Slot), 524288, "KPR_SLOTS_MAX", BPF_F_MMAPABLE),
        # backend id -> address, port, protocol (its state is per service, in kpr_slots); an
        # mmapable array: ids stay below max_entries, a zero entry (proto 0) is no backend
        MapSpec("kpr_backend", BPF_MAP_TYPE_ARRAY, 4, _sz(Backend), 131072, "KPR_BACKEND_MAX", BPF_F_MMAPABLE),
        # rev-NAT index -> frontend address, port, protocol
        MapSpec("kpr_revnat", BPF_MAP_TYPE_HASH, 4, _sz(RevNat), 65536, "KPR_REVNAT_MAX"),
        # (client, rev-NAT index) -> backend id, last use: sessionAffinity, written by programs
        MapSpec("kpr_affinity", BPF_MAP_TYPE_LRU_HASH, _sz(AffinityKey), _sz(AffinityVal), 65536, "KPR_AFFINITY_MAX"),
        # (rev-NAT index, scope) -> inner array of M backend ids
        MapSpec(
            "kpr_maglev",
            BPF_MAP_TYPE_HASH_OF_MAPS,
            _sz(MaglevKey),
            4,
            32768,
            "KPR_MAGLEV_MAX",
            inner=(BPF_MAP_TYPE_ARRAY, 4, 4, MAGLEV_DEFAULT_SIZE),
        ),
        # LPM (rev-NAT index, client prefix) -> allowed: loadBalancerSourceRanges
        MapSpec("kpr_srcrange", BPF_MAP_TYPE_LPM_TRIE, _sz(SrcRangeKey), 4, 16384, "KPR_SRCRANGE_MAX", BPF_F_NO_PREALLOC),
        # 5-tuple + direction -> backend id, rev-NAT index, timestamps (lib/conntrack.h)
        MapSpec("kpr_ct", BPF_MAP_TYPE_LRU_HASH, _sz(CtKey), _sz(CtEntry), 131072, "KPR_CT_MAX"),
        # 5-tuple + direction -> SNAT address/port, both directions (lib/nat.h)
        MapSpec("kpr_snat", BPF_MAP_TYPE_LRU_HASH, _sz(CtKey), _sz(NatEntry), 131072, "KPR_SNAT_MAX"),
    )
}

# The maps the service writer fills; the others are written by programs.
SERVICE_MAPS = ("kpr_svc", "kpr_slots", "kpr_backend", "kpr_revnat", "kpr_maglev", "kpr_srcrange")


def specs_with(sizes: Mapping[str, int] | None = None, maglev_size: int = MAGLEV_DEFAULT_SIZE) -> dict[str, MapSpec]:
    """SPECS with max_entries overridden per map name, and the Maglev table size."""
    sizes = dict(sizes or {})
    unknown = set(sizes) - set(SPECS)
    if unknown:
        raise ValueError(f"unknown map names in sizes: {sorted(unknown)}")
    out = {}
    for name, spec in SPECS.items():
        if name in sizes:
            spec = replace(spec, max_entries=int(sizes[name]))
        if spec.inner is not None:
            t, k, v, _ = spec.inner
            spec = replace(spec, inner=(t, k, v, maglev_size))
        out[name] = spec
    return out


def cflags(
    pin_path: str | Path, sizes: Mapping[str, int] | None = None, maglev_size: int = MAGLEV_DEFAULT_SIZE
) -> list[str]:
    """-D flags that make lib/*.h declare the maps exactly as the writer creates them."""
    flags = [f'-DKPR_PIN_PATH="{Path(pin_path)}"', f"-DKPR_MAGLEV_M={maglev_size}"]
    for spec in specs_with(sizes, maglev_size).values():
        if spec.macro:
            flags.append(f"-D{spec.macro}={spec.max_entries}")
    # Every program that writes kpr_ct stamps it on one clock, the one the collector reads
    # (kpr.bpf.ctclock): a build without the kernel's HZ would stamp on another.
    return flags + ctclock.cflags()


# --- libbpf through ctypes ---------------------------------------------------------------


class _CreateOpts(ctypes.Structure):
    # struct bpf_map_create_opts (libbpf 1.1 bpf.h).
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


class _BatchOpts(ctypes.Structure):
    # struct bpf_map_batch_opts.
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class ProgTestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts (libbpf 1.x bpf.h); `sz` tells libbpf which fields we know.
    # Filled by kpr.testing.prog_run for BPF_PROG_TEST_RUN.
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class MapInfo(ctypes.Structure):
    # struct bpf_map_info (uapi), the fields up to map_extra.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class ProgInfo(ctypes.Structure):
    # struct bpf_prog_info (uapi), the fields up to verified_insns (the verifier's walk, 5.16+;
    # an older kernel takes the longer struct as long as its tail is zero, as it is here).
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),  # (a 1-bit field in the uapi's u32)
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
    ]


class ProgLoadOpts(ctypes.Structure):
    # struct bpf_prog_load_opts (libbpf 1.1 bpf.h, up to log_buf); `sz` tells libbpf which
    # fields we know. Filled by kpr.bpf.probes' raw helper probe.
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_void_p),
    ]


_c_int, _c_u32, _vp, _cp = ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_char_p
_pu32 = ctypes.POINTER(ctypes.c_uint32)

_SIGNATURES = {
    "bpf_map_create": [_c_int, _cp, _c_u32, _c_u32, _c_u32, ctypes.POINTER(_CreateOpts)],
    "bpf_map_update_elem": [_c_int, _vp, _vp, ctypes.c_uint64],
    "bpf_map_lookup_elem": [_c_int, _vp, _vp],
    "bpf_map_delete_elem": [_c_int, _vp],
    "bpf_map_get_next_key": [_c_int, _vp, _vp],
    "bpf_map_update_batch": [_c_int, _vp, _vp, _pu32, ctypes.POINTER(_BatchOpts)],
    "bpf_map_delete_batch": [_c_int, _vp, _pu32, ctypes.POINTER(_BatchOpts)],
    "bpf_map_lookup_batch": [_c_int, _vp, _vp, _vp, _vp, _pu32, ctypes.POINTER(_BatchOpts)],
    "bpf_obj_pin": [_c_int, _cp],
    "bpf_obj_get": [_cp],
    "bpf_obj_get_info_by_fd": [_c_int, _vp, _pu32],
    "bpf_map_get_fd_by_id": [_c_u32],
    "bpf_prog_get_fd_by_id": [_c_u32],
    "bpf_prog_detach2": [_c_int, _c_int, _c_int],
    "bpf_prog_query": [_c_int, _c_int, _c_u32, _pu32, _pu32, _pu32],
    "bpf_prog_test_run_opts": [_c_int, ctypes.POINTER(ProgTestRunOpts)],
    # the program's fd, or -errno
    "bpf_prog_load": [_c_int, _cp, _cp, _vp, ctypes.c_size_t, ctypes.POINTER(ProgLoadOpts)],
}


@functools.cache
def libbpf() -> ctypes.CDLL:
    """libbpf.so.1 with the signatures kpr uses. Functions return -errno (libbpf 1.x)."""
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        found = ctypes.util.find_library("bpf")
        if not found:
            raise OSError("libbpf.so.1 not found; install libbpf1 (a dependency of python3-bpfcc)") from None
        lib = ctypes.CDLL(found, use_errno=True)
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    return lib


def check_rc(rc: int, what: str) -> int:
    """`rc`, a libbpf call's return, when it is not negative; else OSError of its errno (libbpf
    returns -errno) naming `what`, the call and its object. The one check of libbpf returns:
    every module that calls libbpf (kpr.bpf.progcache, links, cleanup, the plugins) uses it."""
    if rc < 0:
        err = -rc
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


_BATCH_OPTS = _BatchOpts(sz=ctypes.sizeof(_BatchOpts), elem_flags=BPF_ANY, flags=0)
# Batch operations a map type lacks fail with these (the kernel then leaves count alone);
# callers fall back to one element at a time. 524 is the kernel-internal ENOTSUPP.
_UNSUPPORTED = (errno_mod.ENOTSUP, errno_mod.EOPNOTSUPP, 524)


class MapIncompatible(RuntimeError):
    """A pinned map exists but does not match what kpr needs; the message says how to fix it."""


def obj_info(fd: int) -> MapInfo:
    info = MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check_rc(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return info


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check_rc(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return info


def prog_jited(fd: int) -> bytes:
    """The program's JIT image (the machine code perf's samples in bpf_prog_<tag>_<name> point
    into, by offset); empty when the kernel has no JIT or hides it."""
    n = prog_info(fd).jited_prog_len
    buf = (ctypes.c_uint8 * max(n, 1))()
    info = ProgInfo(jited_prog_len=n, jited_prog_insns=ctypes.addressof(buf))
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check_rc(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return bytes(buf)[: info.jited_prog_len]


class BpfMap:
    """One map by fd: element and batch operations on raw bytes keys and values.

    `ops` counts elements written and deleted, so tests can prove an update touched only
    the entries that changed.
    """

    def __init__(self, fd: int, name: str, key_size: int, value_size: int, map_type: int) -> None:
        self.fd = fd
        self.name = name
        self.key_size = key_size
        self.value_size = value_size
        self.type = map_type
        # elements written/deleted, syscalls made and ns spent in them (for tests and benchmarks)
        self.ops = {"update": 0, "delete": 0, "syscalls": 0, "syscall_ns": 0}
        self._batch_ok = {"update": True, "delete": True, "lookup": True}
        self._mmap: mmap.mmap | None = None

    def _sys(self, fn: Any, *args: Any) -> int:
        t = time.perf_counter_ns()
        rc = fn(*args)
        self.ops["syscall_ns"] += time.perf_counter_ns() - t
        self.ops["syscalls"] += 1
        return rc

    # -- lifecycle

    @classmethod
    def create(cls, spec: MapSpec, inner_fd: int | None = None) -> "BpfMap":
        opts = _CreateOpts(sz=ctypes.sizeof(_CreateOpts), map_flags=spec.flags)
        if inner_fd is not None:
            opts.inner_map_fd = inner_fd
        fd = check_rc(
            libbpf().bpf_map_create(
                spec.type, spec.name.encode(), spec.key_size, spec.value_size, spec.max_entries, ctypes.byref(opts)
            ),
            f"bpf_map_create {spec.name} ({spec.describe()})",
        )
        return cls(fd, spec.name, spec.key_size, spec.value_size, spec.type)

    @classmethod
    def open_pinned(cls, path: Path) -> "BpfMap":
        fd = check_rc(libbpf().bpf_obj_get(str(path).encode()), f"bpf_obj_get {path}")
        info = obj_info(fd)
        return cls(fd, info.name.decode(), info.key_size, info.value_size, info.type)

    @classmethod
    def from_id(cls, map_id: int) -> "BpfMap":
        fd = check_rc(libbpf().bpf_map_get_fd_by_id(map_id), f"bpf_map_get_fd_by_id {map_id}")
        info = obj_info(fd)
        return cls(fd, info.name.decode(), info.key_size, info.value_size, info.type)

    def pin(self, path: Path) -> None:
        check_rc(libbpf().bpf_obj_pin(self.fd, str(path).encode()), f"bpf_obj_pin {self.name} {path}")

    def info(self) -> MapInfo:
        return obj_info(self.fd)

    @property
    def id(self) -> int:
        return self.info().id

    def mmap(self) -> memoryview:
        """A BPF_F_MMAPABLE array's values as writable memory (value i at i * value_size
        rounded up to 8), shared with the programs: a store is seen by the next lookup.
        Unmapped by close()."""
        if self._mmap is None:
            info = self.info()
            if info.type != BPF_MAP_TYPE_ARRAY or not info.map_flags & BPF_F_MMAPABLE:
                raise ValueError(f"map {self.name} is not an mmapable array")
            size = -(-info.max_entries * ((info.value_size + 7) & ~7) // mmap.PAGESIZE) * mmap.PAGESIZE
            self._mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return memoryview(self._mmap)

    def store(self, vals: Mapping[int, bytes]) -> None:
        """Write index -> value into an mmapable array's memory (runs of consecutive indexes
        as one copy); counted as updates."""
        if not vals:
            return
        first, n = next(iter(vals)), len(vals)
        if list(vals) == list(range(first, first + n)):
            # one run (a full sync's new ids): one copy
            self.store_ranges(((first, b"".join(vals.values())),))
            return
        runs: list[tuple[int, bytes]] = []
        run: list[bytes] = []
        start = prev = -2
        for i, v in vals.items():
            if i != prev + 1:
                if run:
                    runs.append((start, b"".join(run)))
                run, start = [], i
            run.append(v)
            prev = i
        runs.append((start, b"".join(run)))
        self.store_ranges(runs)

    def store_ranges(self, ranges: Iterable[tuple[int, bytes]]) -> None:
        """Write runs of consecutive values into an mmapable array's memory: (first index,
        the values concatenated, each value_size bytes); counted as updates."""
        vs = (self.value_size + 7) & ~7
        mem = self.mmap()
        n = 0
        try:
            if vs == self.value_size:
                for first, blob in ranges:
                    at = first * vs
                    mem[at : at + len(blob)] = blob
                    n += len(blob)
            else:  # values padded to 8 bytes in the array's memory
                size = self.value_size
                for first, blob in ranges:
                    for j in range(0, len(blob), size):
                        at = (first + j // size) * vs
                        mem[at : at + size] = blob[j : j + size]
                    n += len(blob) // size * vs
        finally:
            mem.release()
            self.ops["update"] += n // vs

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a memoryview still exported: unmapped when it is collected
                pass
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "BpfMap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- single elements

    def lookup(self, key: bytes) -> bytes | None:
        val = ctypes.create_string_buffer(self.value_size)
        rc = self._sys(libbpf().bpf_map_lookup_elem, self.fd, key, val)
        if rc == -errno_mod.ENOENT:
            return None
        check_rc(rc, f"lookup in {self.name}")
        return val.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        rc = self._sys(libbpf().bpf_map_update_elem, self.fd, key, value, flags)
        check_rc(rc, f"update in {self.name}")
        self.ops["update"] += 1

    def delete(self, key: bytes) -> bool:
        rc = self._sys(libbpf().bpf_map_delete_elem, self.fd, key)
        if rc == -errno_mod.ENOENT:
            return False
        check_rc(rc, f"delete in {self.name}")
        self.ops["delete"] += 1
        return True

    def keys(self) -> Iterator[bytes]:
        lib = libbpf()
        cur = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            rc = lib.bpf_map_get_next_key(self.fd, cur, nxt)
            if rc == -errno_mod.ENOENT:
                return
            check_rc(rc, f"get_next_key in {self.name}")
            key = nxt.raw
            yield key
            cur = key

    # -- batches (one syscall for many elements; the point of the writer's design)

    def update_many(self, keys: Sequence[bytes], values: Sequence[bytes], *, batch: bool = True) -> None:
        """Write every (key, value); batched when the map type supports it."""
        n = len(keys)
        if n == 0:
            return
        if batch and self._batch_ok["update"]:
            count = ctypes.c_uint32(n)
            rc = self._sys(
                libbpf().bpf_map_update_batch,
                self.fd, b"".join(keys), b"".join(values), ctypes.byref(count), ctypes.byref(_BATCH_OPTS),
            )
            if rc == 0:
                self.ops["update"] += n
                return
            if -rc in _UNSUPPORTED:
                log.debug("event=map_batch_unsupported map=%s op=update errno=%d", self.name, -rc)
                self._batch_ok["update"] = False
                count.value = 0
            else:
                self.ops["update"] += count.value
                check_rc(rc, f"update_batch in {self.name} ({count.value} of {n} written)")
            # fall through: one at a time from where the batch stopped
            keys, values = keys[count.value :], values[count.value :]
        for k, v in zip(keys, values):
            self.update(k, v)

    def update_blob(self, keys: bytes, values: bytes, count: int) -> None:
        """Write `count` entries given as concatenated keys and values (one batch syscall)."""
        if self._batch_ok["update"]:
            n = ctypes.c_uint32(count)
            rc = self._sys(libbpf().bpf_map_update_batch, self.fd, keys, values, ctypes.byref(n), ctypes.byref(_BATCH_OPTS))
            if rc == 0:
                self.ops["update"] += count
                return
            if -rc not in _UNSUPPORTED:
                check_rc(rc, f"update_batch in {self.name} ({n.value} of {count} written)")
            self._batch_ok["update"] = False
        ks, vs = self.key_size, self.value_size
        self.update_many(
            [keys[i * ks : (i + 1) * ks] for i in range(count)], [values[i * vs : (i + 1) * vs] for i in range(count)]
        )

    def delete_many(self, keys: Sequence[bytes], *, batch: bool = True) -> None:
        """Delete every key; keys already gone are not an error."""
        n = len(keys)
        if n == 0:
            return
        if batch and self._batch_ok["delete"]:
            count = ctypes.c_uint32(n)
            rc = self._sys(
                libbpf().bpf_map_delete_batch, self.fd, b"".join(keys), ctypes.byref(count), ctypes.byref(_BATCH_OPTS)
            )
            if rc == 0:
                self.ops["delete"] += n
                return
            # A missing key stops a batch with ENOENT after `count` deletions: resume past it.
            done = count.value
            if -rc in _UNSUPPORTED:
                log.debug("event=map_batch_unsupported map=%s op=delete errno=%d", self.name, -rc)
                self._batch_ok["delete"] = False
                done = 0
            else:
                self.ops["delete"] += done
            if -rc in _UNSUPPORTED:
                pass
            elif -rc != errno_mod.ENOENT:
                check_rc(rc, f"delete_batch in {self.name} ({done} of {n} deleted)")
            else:
                done += 1  # the key that was missing
            if done < n:
                self.delete_many(keys[done:], batch=self._batch_ok["delete"])
            return
        for k in keys:
            self.delete(k)

    def items(self, *, chunk: int = 8192) -> list[tuple[bytes, bytes]]:
        """Every (key, value), by lookup_batch when supported."""
        if not self._batch_ok["lookup"]:
            return self._items_one_by_one()
        lib = libbpf()
        ks, vs = self.key_size, self.value_size
        # At most about 1 MB of values a batch: buffers are zeroed when made, and a registry
        # of 1 KB records read 8192 at a time made and copied 16 MB per call (socklb's start
        # reads kpr_attach once per hook it records).
        chunk = max(16, min(chunk, (1 << 20) // max(vs, 1)))
        # The batch cursor is opaque; hash maps use a bucket index, others may use a key.
        token_size = max(ks, 8)
        in_tok = ctypes.create_string_buffer(token_size)
        out_tok = ctypes.create_string_buffer(token_size)
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            kbuf = ctypes.create_string_buffer(ks * chunk)
            vbuf = ctypes.create_string_buffer(vs * chunk)
            count = ctypes.c_uint32(chunk)
            rc = self._sys(
                lib.bpf_map_lookup_batch,
                self.fd, None if first else in_tok, out_tok, kbuf, vbuf, ctypes.byref(count), ctypes.byref(_BATCH_OPTS),
            )
            if rc < 0 and -rc == errno_mod.ENOSPC and count.value == 0:
                chunk *= 4  # a hash bucket holds more entries than the buffer
                continue
            if rc < 0 and -rc in _UNSUPPORTED:
                self._batch_ok["lookup"] = False
                return self._items_one_by_one()
            if rc < 0 and -rc != errno_mod.ENOENT:
                check_rc(rc, f"lookup_batch in {self.name}")
            n = count.value
            # only the entries returned (.raw copies the whole buffer)
            kraw, vraw = ctypes.string_at(kbuf, n * ks), ctypes.string_at(vbuf, n * vs)
            out.extend((kraw[i * ks : (i + 1) * ks], vraw[i * vs : (i + 1) * vs]) for i in range(n))
            if rc < 0:  # ENOENT: that was the last batch
                return out
            ctypes.memmove(in_tok, out_tok, token_size)
            first = False

    def array_values(self, *, chunk: int = 65536) -> bytes:
        """An ARRAY map's values, index order, concatenated (from memory for an mmapable one,
        else lookup_batch; no object per entry)."""
        info = self.info()
        if info.map_flags & BPF_F_MMAPABLE:
            with self.mmap() as mem:
                return bytes(mem[: info.max_entries * ((info.value_size + 7) & ~7)])
        n = info.max_entries
        if not self._batch_ok["lookup"]:
            return b"".join(self.lookup(U32.pack(i)) or bytes(self.value_size) for i in range(n))
        lib = libbpf()
        in_tok, out_tok = ctypes.c_uint32(0), ctypes.c_uint32(0)
        parts = []
        first = True
        while True:
            kbuf = ctypes.create_string_buffer(4 * chunk)
            vbuf = ctypes.create_string_buffer(self.value_size * chunk)
            count = ctypes.c_uint32(chunk)
            rc = self._sys(
                lib.bpf_map_lookup_batch, self.fd, None if first else ctypes.byref(in_tok), ctypes.byref(out_tok),
                kbuf, vbuf, ctypes.byref(count), ctypes.byref(_BATCH_OPTS),
            )
            if rc < 0 and -rc not in (errno_mod.ENOENT,):
                check_rc(rc, f"lookup_batch in {self.name}")
            parts.append(vbuf.raw[: self.value_size * count.value])
            if rc < 0 or count.value == 0:
                return b"".join(parts)
            in_tok.value = out_tok.value
            first = False

    def count(self, *, chunk: int = 8192) -> int:
        """Entries the kernel holds (lookup_batch into reused buffers; keys one by one where unsupported)."""
        if not self._batch_ok["lookup"]:
            return sum(1 for _ in self.keys())
        lib = libbpf()
        token_size = max(self.key_size, 8)
        in_tok = ctypes.create_string_buffer(token_size)
        out_tok = ctypes.create_string_buffer(token_size)
        kbuf = ctypes.create_string_buffer(self.key_size * chunk)
        vbuf = ctypes.create_string_buffer(self.value_size * chunk)
        total, first = 0, True
        while True:
            n = ctypes.c_uint32(chunk)
            rc = self._sys(
                lib.bpf_map_lookup_batch,
                self.fd, None if first else in_tok, out_tok, kbuf, vbuf, ctypes.byref(n), ctypes.byref(_BATCH_OPTS),
            )
            if rc < 0 and -rc == errno_mod.ENOSPC and n.value == 0:
                return len(self.items(chunk=chunk * 4))  # a hash bucket holds more than the buffer
            if rc < 0 and -rc in _UNSUPPORTED:
                self._batch_ok["lookup"] = False
                return sum(1 for _ in self.keys())
            if rc < 0 and -rc != errno_mod.ENOENT:
                check_rc(rc, f"lookup_batch in {self.name}")
            total += n.value
            if rc < 0:  # ENOENT: that was the last batch
                return total
            ctypes.memmove(in_tok, out_tok, token_size)
            first = False

    def _items_one_by_one(self) -> list[tuple[bytes, bytes]]:
        out = []
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out


_NONZERO = re.compile(b"[^\x00]")


def backend_items(m: BpfMap, raw: bytes | None = None) -> list[tuple[int, bytes]]:
    """(id, value) of every backend in kpr_backend: the array's entries whose protocol byte is
    set (a zero entry is no backend), found by one scan of that column. (A hash, as an older
    kpr pinned it, or a stand-in with items(): its entries.) `raw`: the array's values
    already read (array_values), for a caller that reads them once for several decodings."""
    if getattr(m, "type", None) != BPF_MAP_TYPE_ARRAY:
        return [(U32.unpack(k)[0], v) for k, v in m.items()]
    if raw is None:
        raw = m.array_values()
    vs = m.value_size
    col = raw[Backend.proto.offset :: vs]
    return [(i, raw[i * vs : (i + 1) * vs]) for i in (mt.start() for mt in _NONZERO.finditer(col))]


def backend_run(m: BpfMap, raw: bytes | None) -> range | None:
    """The ids of kpr_backend's backends when they are one run lo..hi-1 with no zero entry
    between (as full syncs leave them; a restart then adopts 200k backends at 20k services
    without an object per entry), None otherwise or when `raw` (its values, array_values)
    is not given."""
    if raw is None or getattr(m, "type", None) != BPF_MAP_TYPE_ARRAY:
        return None
    col = raw[Backend.proto.offset :: m.value_size]
    lo, hi = len(col) - len(col.lstrip(b"\0")), len(col.rstrip(b"\0"))
    if lo >= hi or col.find(0, lo, hi) >= 0:
        return None
    return range(lo, hi)


# A backend id is gen << BACKEND_INDEX_BITS | index (lib/maps.h struct kpr_backend): the index
# of its kpr_backend entry and the generation stored there. A freed index is given to another
# backend with the next generation, so ids that conntrack, affinity or sockets still hold for
# the freed one no longer match (kpr_lb_backend) and fail as a deleted backend's did. A fixed
# split: programs are built with the configured size, an adopted pin may have another.
BACKEND_INDEX_BITS = 24  # lib/maps.h KPR_BACKEND_INDEX_BITS: kpr_backend holds at most 2^24
BACKEND_INDEX_MASK = (1 << BACKEND_INDEX_BITS) - 1
BACKEND_GENS = 1 << (32 - BACKEND_INDEX_BITS)  # generations; the next after the last is 0
BACKEND_GEN_AT = Backend.gen.offset  # kpr_backend.gen (3 bytes, little endian)


def backend_id(index: int, gen: int) -> int:
    """The id programs and maps carry for kpr_backend's entry `index` in generation `gen`."""
    return gen << BACKEND_INDEX_BITS | index


def backend_index(bid: int) -> tuple[int, int]:
    """(index, generation) of backend id `bid`: backend_id's inverse."""
    return bid & BACKEND_INDEX_MASK, bid >> BACKEND_INDEX_BITS


def backend_gen(value: bytes) -> int:
    """The generation stored in a kpr_backend value (kept in a freed zero entry as well)."""
    return int.from_bytes(value[BACKEND_GEN_AT : BACKEND_GEN_AT + 3], "little")


def with_backend_gen(value: bytes, gen: int) -> bytes:
    """`value` with its generation bytes set to `gen`."""
    return value[:BACKEND_GEN_AT] + gen.to_bytes(3, "little") + value[BACKEND_GEN_AT + 3 :]


def backend_entry_gens(m: BpfMap, raw: bytes | None = None) -> dict[int, int]:
    """index -> stored generation of every kpr_backend entry whose generation is not 0, the
    freed (zero) entries' included: an adopting writer must not hand an (index, generation)
    pair out again (an array only; a hash of an older kpr stores none). `raw`: as for
    backend_items."""
    if getattr(m, "type", None) != BPF_MAP_TYPE_ARRAY:
        return {}
    if raw is None:
        raw = m.array_values()
    vs = m.value_size
    at: set[int] = set()
    for off in range(BACKEND_GEN_AT, BACKEND_GEN_AT + 3):
        at.update(mt.start() for mt in _NONZERO.finditer(raw[off::vs]))
    return {i: backend_gen(raw[i * vs : (i + 1) * vs]) for i in sorted(at)}


def backend_ids(m: BpfMap) -> list[tuple[int, bytes]]:
    """(id, value) of every backend in kpr_backend, the id as programs carry it (backend_id of
    its index and stored generation): what conntrack entries and slots name."""
    if getattr(m, "type", None) != BPF_MAP_TYPE_ARRAY:
        return backend_items(m)
    return [(backend_id(i, backend_gen(v)), v) for i, v in backend_items(m)]


# Maps an older kpr pinned as another type, converted by retype_pinned: name -> that type.
RETYPED: dict[str, int] = {"kpr_backend": BPF_MAP_TYPE_HASH}
_RETYPE_MAX = 1 << BACKEND_INDEX_BITS  # ids beyond this cannot become array indexes (refused: kpr cleanup)


def retyped(m: BpfMap, spec: MapSpec) -> bool:
    """Whether pinned map `m` is an older kpr's hash of what is an array now (retype_pinned)."""
    info = m.info()
    return info.type == RETYPED.get(spec.name) != spec.type and (info.key_size, info.value_size) == (
        spec.key_size, spec.value_size,
    )


def retype_pinned(m: BpfMap, spec: MapSpec, path: Path) -> BpfMap:
    """Copy an older kpr's hash kpr_backend into an array of `spec` (every id its index: flows in
    conntrack keep their backends; sized to hold the largest id) and pin it in its place.
    Programs still holding the hash keep it until they are replaced. Closes `m`."""
    items = m.items()
    ids = [U32.unpack(k)[0] for k, _ in items]
    top = max(ids, default=0)
    if top >= _RETYPE_MAX:
        raise MapIncompatible(
            f"pinned map {path} (a hash of an older kpr) holds backend id {top}, too large for an array index: "
            f"run `kpr cleanup` (drops all kpr state)"
        )
    spec = replace(spec, max_entries=max(spec.max_entries, top + 1))
    new = _copy_in_place(m, spec, path, "_retyped", lambda n: n.store(dict(sorted(zip(ids, (v for _, v in items))))))
    log.warning("event=map_type_upgraded map=%s path=%s entries=%d max_entries=%d", spec.name, path, len(items), spec.max_entries)
    return new


def inner_max_entries(outer: BpfMap) -> int | None:
    """The size of the maps a map-of-maps holds (its first inner map; they are all made alike),
    None while it holds none: kpr_maglev's Maglev table size."""
    for key in outer.keys():
        raw = outer.lookup(key)
        if raw is None:  # removed since the key was listed
            continue
        with BpfMap.from_id(U32.unpack(raw)[0]) as inner:
            return inner.info().max_entries
    return None


# Flow-state maps whose values grew at their end in a later kpr, the new bytes zero meaning
# "not recorded here" (the programs read either kind of entry): name -> the value sizes an
# older kpr pinned. An upgrade copies such a map into one of the new layout (grow_pinned)
# instead of refusing it, so established flows survive the upgrade. The two-insert SNAT
# layout (issue 14) grew kpr_ct by the SNAT address and port, kpr_snat by the frontend.
GROWN_VALUES: dict[str, tuple[int, ...]] = {"kpr_ct": (24,), "kpr_snat": (32,)}


def grows(m: BpfMap, spec: MapSpec) -> bool:
    """Whether pinned map `m` is an older layout of `spec` that grow_pinned can carry over."""
    info = m.info()
    return (
        info.value_size in GROWN_VALUES.get(spec.name, ())
        and (info.type, info.key_size, info.map_flags) == (spec.type, spec.key_size, spec.flags)
        and info.value_size < spec.value_size
    )


def _copy_in_place(m: BpfMap, spec: MapSpec, path: Path, suffix: str, fill: Any) -> BpfMap:
    """A new map of `spec`, filled by fill(new), pinned in the place of `m` (closed)."""
    new = BpfMap.create(spec)
    try:
        fill(new)
        tmp = path.with_name(path.name + suffix)  # bpffs refuses dots in names
        if tmp.exists():  # a copy a crashed agent left behind
            tmp.unlink()
        new.pin(tmp)
        # bpffs renames atomically: the pin names the old map or the new one, never neither
        os.rename(tmp, path)
    except BaseException:
        new.close()
        raise
    m.close()
    return new


def grow_pinned(m: BpfMap, spec: MapSpec, path: Path) -> BpfMap:
    """Copy the pinned map `m` (an older layout, see grows()) into a new map of `spec` (its
    size kept), every value zero-extended, and pin the new map in its place. Programs still
    holding the old map keep it until they are replaced; flows they begin after the copy are
    not carried over. Closes `m`; returns the new map."""
    info = m.info()
    spec = replace(spec, max_entries=info.max_entries)
    items = m.items()
    pad = bytes(spec.value_size - info.value_size)

    def fill(n: BpfMap) -> None:
        if items:
            n.update_many([k for k, _ in items], [v + pad for _, v in items])

    new = _copy_in_place(m, spec, path, "_grown", fill)
    log.warning(
        "event=map_layout_upgraded map=%s path=%s entries=%d value_size_old=%d value_size=%d",
        spec.name, path, len(items), info.value_size, spec.value_size,
    )
    return new


def check_compatible(m: BpfMap, spec: MapSpec, path: Path) -> None:
    """Raise MapIncompatible naming every difference between a pinned map and its spec."""
    info = m.info()
    have = {
        "type": info.type,
        "key_size": info.key_size,
        "value_size": info.value_size,
        "max_entries": info.max_entries,
        "flags": info.map_flags,
    }
    want = {
        "type": spec.type,
        "key_size": spec.key_size,
        "value_size": spec.value_size,
        "max_entries": spec.max_entries,
        "flags": spec.flags,
    }
    diffs = [f"{k} {have[k]} (want {want[k]})" for k in want if have[k] != want[k]]
    if diffs:
        raise MapIncompatible(
            f"pinned map {path} does not match this kpr: {', '.join(diffs)}. Established flows use the old "
            f"map, so it is not replaced automatically: run `kpr cleanup` (drops all kpr state) or restore "
            f"the previous sizes"
        )
