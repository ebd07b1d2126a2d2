"""One ABI (issue 13): the constants, counters and structs shared by C and Python are read from
the BPF headers by kpr.bpf.abi; a header change reaches Python by name, and one Python cannot
follow (a field the callers pass positionally, a counter whose published name is gone) fails
here, naming it. Root-free."""

from __future__ import annotations

import ctypes
import fnmatch
import re
import shutil
import struct
import tomllib
from pathlib import Path

import pytest

from kpr.bpf import abi
from kpr.bpf import maps as M
from kpr.bpf.inline import BPF_DIR
from kpr.monitor import MonCfg, MonEvent
from kpr.nodeport import datapath as D
from kpr.nodeport import gc
from kpr.plugins.announce_arp import bpfanswer
from kpr.plugins.host_routing import datapath as HR
from kpr.plugins.socklb import plugin as SOCK

ROOT = Path(__file__).resolve().parents[1]

# Every packer Python code calls positionally: (struct, fields skipped as pad bytes, the fields
# its callers pass, in order). A field added, removed, renamed or moved in the header fails
# test_packers_take_the_fields_their_callers_pass naming it: update the callers, then this.
PACKERS: dict[str, tuple[struct.Struct, str, tuple[str, ...], tuple[str, ...]]] = {
    "M.SVC_KEY": (M.SVC_KEY, "kpr_svc_key", (), ("addr", "port", "proto", "scope", "slot", "pad")),
    "M.SVC_VAL": (M.SVC_VAL, "kpr_svc_val", (), ("slot_base", "count", "terminating", "rev_nat", "flags", "affinity_timeout")),
    "M.SLOT": (M.SLOT, "kpr_slot", (), ("backend_id", "flags")),
    "M.BACKEND": (M.BACKEND, "kpr_backend", ("gen",), ("addr", "port", "proto", "reserved", "flags")),
    "M.REVNAT": (M.REVNAT, "kpr_revnat", ("pad",), ("addr", "port", "proto")),
    "M.MAGLEV_KEY": (M.MAGLEV_KEY, "kpr_maglev_key", (), ("rev_nat", "scope")),
    "M.SRCRANGE_KEY": (M.SRCRANGE_KEY, "kpr_srcrange_key", (), ("prefixlen", "rev_nat", "addr")),
    "D.CT_KEY": (D.CT_KEY, "kpr_ct_key", (), ("saddr", "daddr", "sport", "dport", "proto", "dir", "pad")),
    "D.CT_ENTRY": (D.CT_ENTRY, "kpr_ct_entry", (), ("last_seen", "backend_id", "rev_nat", "flags", "tcp_flags", "pad", "nat_port", "pad2", "nat_addr")),
    "D.NAT_ENTRY": (D.NAT_ENTRY, "kpr_nat_entry", (), ("addr", "port", "fe_port", "pad2", "created", "fe_addr")),
    "D.NP_REV": (D.NP_REV, "kpr_np_rev", (), ("addr", "port", "flags", "pad", "last_seen")),
    "D.NP_FE_KEY": (D.NP_FE_KEY, "kpr_np_fe_key", ("pad",), ("addr", "port", "proto")),
    "D.NP_FE": (D.NP_FE, "kpr_np_fe", ("pad",), ("mode",)),
    "D.NP_DEV": (D.NP_DEV, "kpr_np_dev", (), ("addr4", "addr6", "flags", "pad")),
    "SOCK.REVNAT_KEY": (SOCK.REVNAT_KEY, "kpr_sock_revnat_key", (), ("cookie", "addr", "port", "pad", "pad2")),
    "SOCK.REVNAT_VAL": (SOCK.REVNAT_VAL, "kpr_sock_revnat_val", ("pad",), ("addr", "port", "proto", "rev_nat", "netns")),
    "HR.POD": (HR.POD, "kpr_hr_pod", (), ("ifindex", "flags")),
    "HR.DEV": (HR.DEV, "kpr_hr_dev", (), ("flags", "kind", "gw_mac", "pad")),
    "bpfanswer.KEY": (bpfanswer.KEY, "kpr_arp_key", (), ("ifindex", "addr")),
    "bpfanswer.VAL": (bpfanswer.VAL, "kpr_arp_val", (), ("mac", "pad")),
}

# Counter names published in status, metrics, kpr.drops and `kpr monitor`, per counter list.
# Adding a counter to a header needs nothing here; one of these gone (a C counter renamed or
# removed, or its name in Python dropped) fails, naming it.
PUBLISHED = {
    "kpr_np_stats": (D.STATS, {"new_local", "new_snat", "new_dsr", "established", "icmp_translated", "drop_no_backend",
                               "drop_no_local_backend", "drop_source_range", "drop_vip_unserved", "drop_snat_no_port",
                               "drop_nat_failed", "drop_dsr_failed", "drop_dsr_unknown_frontend", "drop_mtu",
                               "drop_no_reverse_entry", "drop_no_snat_address", "malformed", "fragments", "fib_to_kernel",
                               "conntrack_write_failed", "stale_backend", "icmp_rate_limited", "tail_call_missing",
                               "reverse_entry_stale"}),
    "kpr_np_fwd": (tuple(D.FWD_STATS.values()), {"fwd_peer", "fwd_neigh", "fwd_redirect", "fwd_stack_unknown_dev",
                                                 "fwd_stack_xdp_unreachable", "fwd_stack_no_neigh", "fwd_drop_short",
                                                 "egress_veth_peer", "egress_bridge", "egress_overlay"}),
    "kpr_np_calls": (D.CALLS, {"kpr_np_local", "kpr_np_snat", "kpr_np_dsr", "kpr_np_nobackend", "kpr_np_snat_reply",
                               "kpr_np_dsr_recv", "kpr_np_icmp_in", "kpr_np_icmp_out"}),
    "kpr_sock_stats": (SOCK.STATS, {"connect", "sendmsg", "reverse", "no_backend", "bind_refused", "skip_not_host",
                                    "skip_external_ip", "skip_source_ranges", "revnat_update_failed", "revnat_stale",
                                    "family_mismatch"}),
    "kpr_hr_stats": (HR.STATS, {"redirect_peer", "redirect", "redirect_neigh", "service_new", "service_established",
                                "service_revnat", "pass_not_ip", "pass_fib", "drop_no_backend", "drop_nat",
                                "conntrack_write_failed", "stale_backend", "service_hairpin", "redirect_neigh_overlay"}),
    "kpr_arp_stats": (bpfanswer.COUNTERS, {"arp_replies", "na_replies", "requests_not_owned", "conflicts", "agent_silent",
                                           "invalid", "reply_errors"}),
}

# (C counter prefix, the Python list in slot order, the slot count the header declares)
COUNTER_LISTS = [
    ("KPR_NP_ST_", D.STATS, "KPR_NP_ST_MAX"),
    ("KPR_NP_CALL_", D.CALLS, "KPR_NP_CALL_MAX"),
    ("KPR_SOCK_ST_", SOCK.STATS, "KPR_SOCK_ST_MAX"),
    ("KPR_HR_ST_", HR.STATS, "KPR_HR_ST_MAX"),
]


def packer_mismatches(a: abi.Abi) -> list[str]:
    """What differs between the headers of `a` and the fields the packers' callers pass."""
    out = []
    for label, (_packer, name, skip, fields) in PACKERS.items():
        have = a.struct_of(name).field_names(skip)
        for i, (want, got) in enumerate(zip(fields, have)):
            if want != got:
                out.append(f"{label}: field {i} of struct {name} is {got!r}, its callers pass {want!r}")
                break
        else:
            if len(have) != len(fields):
                out.append(f"{label}: struct {name} has fields {have}, its callers pass {fields}")
    return out


@pytest.fixture
def lib_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "lib"
    shutil.copytree(abi.LIB_DIR, dst)
    return dst


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer has {old!r}: update this test"
    path.write_text(text.replace(old, new, 1))


# --- the packers, mirrors and constants modules use --------------------------------------------


def test_packers_take_the_fields_their_callers_pass() -> None:
    assert packer_mismatches(abi.default()) == []


@pytest.mark.parametrize("label", sorted(PACKERS))
def test_every_packer_is_built_from_its_header(label: str) -> None:
    packer, name, skip, _fields = PACKERS[label]
    t = abi.struct_of(name)
    assert packer.format == t.format(skip), label
    assert packer.size == t.size == abi.default().asserted_sizes[name][0], label


def test_ctypes_mirrors_are_the_headers_structs() -> None:
    for mirror, name in [
        (M.SvcKey, "kpr_svc_key"), (M.SvcVal, "kpr_svc_val"), (M.Slot, "kpr_slot"), (M.Backend, "kpr_backend"), (M.RevNat, "kpr_revnat"),
        (M.AffinityKey, "kpr_affinity_key"), (M.AffinityVal, "kpr_affinity_val"), (M.MaglevKey, "kpr_maglev_key"),
        (M.SrcRangeKey, "kpr_srcrange_key"), (M.CtKey, "kpr_ct_key"), (M.CtEntry, "kpr_ct_entry"),
        (M.NatEntry, "kpr_nat_entry"), (MonEvent, "kpr_mon_event"), (MonCfg, "kpr_mon_cfg"),
    ]:
        t = abi.struct_of(name)
        assert [f[0] for f in mirror._fields_] == list(t.field_names()), name
        assert [getattr(mirror, f.name).offset for f in t.fields] == [f.offset for f in t.fields], name
        assert ctypes.sizeof(mirror) == t.size, name
    # the map specs' key and value sizes are the structs'
    assert (M.SPECS["kpr_svc"].key_size, M.SPECS["kpr_svc"].value_size) == (24, 20)
    assert (M.SPECS["kpr_slots"].key_size, M.SPECS["kpr_slots"].value_size) == (4, 8)
    assert (M.SPECS["kpr_snat"].key_size, M.SPECS["kpr_snat"].value_size) == (40, 48)


def test_constants_are_the_headers_values() -> None:
    assert (M.SVC_F_CLUSTER_IP, M.SVC_F_WILDCARD, M.BACKEND_TERMINATING, M.SCOPE_INTERNAL) == (1, 1 << 10, 1, 1)
    assert set(M.SVC_FLAG_NAMES) == set(abi.group("KPR_SVC_F_").values()), "every service flag has a label"
    assert M.SVC_FLAG_NAMES[M.SVC_F_LOAD_BALANCER] == "LoadBalancer" and M.SVC_FLAG_NAMES[M.SVC_F_TWO_SCOPES] == "two-scopes"
    assert (D.CT_F_SEEN_REPLY, D.CT_F_LOCAL, D.REV_F_CLOSING, D.CT_DIR_REPLY) == (1, 32, 2, 1)
    assert D.MODES == {"snat": 0, "dsr": 1, "hybrid": 2}
    assert (D.SNAT_PORT_MIN, D.SNAT_PORT_MAX, D.PORTS_ARMED, D.VIP_BITS) == (61000, 65535, 2048, 2049)
    assert (HR.DEV_F_EXTERNAL, HR.DEV_F_POD, HR.DEV_F_BRIDGE, HR.DEV_F_L2, HR.DEV_F_OVERLAY) == (1, 2, 8, 16, 32)
    assert gc.TCP_TIMEOUT_NS == 21600 * 10**9 and gc.TCP_CLOSE_TIMEOUT_NS == 10 * 10**9
    assert gc.TCP_SYN_TIMEOUT_NS == gc.OTHER_TIMEOUT_NS == 60 * 10**9


# --- counters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, names, total", COUNTER_LISTS, ids=[c[0] for c in COUNTER_LISTS])
def test_counter_lists_have_a_name_per_slot(prefix: str, names: tuple[str, ...], total: str) -> None:
    assert len(names) == abi.value(total) == len(set(names))
    assert sorted(abi.group(prefix, exclude=("MAX",)).values()) == list(range(len(names)))


@pytest.mark.parametrize("counters", sorted(PUBLISHED))
def test_published_counter_names_are_still_there(counters: str) -> None:
    names, published = PUBLISHED[counters]
    assert sorted(published - set(names)) == [], f"{counters}: counters whose published name is gone"


def test_the_fwd_counters_leave_no_slot_named_twice() -> None:
    assert len(set(D.FWD_STATS.values())) == len(D.FWD_STATS)
    assert max(D.FWD_STATS) < abi.value("KPR_NP_FWD_MAX")
    assert D.FWD_STATS[abi.value("KPR_NP_FWD_DROP_SHORT")] == "fwd_drop_short"
    # the cached-send slots (one per kind, added into FWD_STATS names by stats()) overlap none
    assert not set(D.FWD_CACHED) & set(D.FWD_STATS) and max(D.FWD_CACHED) < D.FWD_SLOTS
    assert set(D.FWD_CACHED.values()) <= set(D.FWD_STATS.values())


def test_a_reordered_counter_keeps_its_name(lib_copy: Path) -> None:
    # swap two counters' slots in a copy of the header: the names follow the defines
    h = lib_copy / "nodeport.h"
    edit(h, "#define KPR_NP_ST_NEW_LOCAL 0 ", "#define KPR_NP_ST_NEW_LOCAL 9 ")
    edit(h, "#define KPR_NP_ST_DROP_NO_BACKEND 9 ", "#define KPR_NP_ST_DROP_NO_BACKEND 0 ")
    moved = abi.Abi(lib_copy).counters("KPR_NP_ST_", names=D.STATS_NAMES)
    assert moved[0] == "drop_no_backend" and moved[9] == "new_local"
    assert moved[1:9] == D.STATS[1:9] and moved[10:] == D.STATS[10:]


# kpr_np_stats' size and its last counter as the header has them now (the cases below edit them)
_ST_MAX = abi.value("KPR_NP_ST_MAX")
_ST_LAST = next(n for n, v in abi.group("KPR_NP_ST_", exclude=("MAX",)).items() if v == _ST_MAX - 1)


def test_a_new_counter_is_named_with_nothing_to_add(lib_copy: Path) -> None:
    edit(lib_copy / "nodeport.h", f"#define KPR_NP_ST_MAX {_ST_MAX}",
         f"#define KPR_NP_ST_DROP_NEW_THING {_ST_MAX} // test\n#define KPR_NP_ST_MAX {_ST_MAX + 1}")
    names = abi.Abi(lib_copy).counters("KPR_NP_ST_", names=D.STATS_NAMES)
    assert names == (*D.STATS, "drop_new_thing")


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("#define KPR_NP_ST_NEW_SNAT 1 ", "#define KPR_NP_ST_NEW_SNAT 0 ", r"KPR_NP_ST_(NEW_SNAT|NEW_LOCAL) and KPR_NP_ST_(NEW_LOCAL|NEW_SNAT) share slot 0"),
        (f"#define KPR_NP_ST_MAX {_ST_MAX}", f"#define KPR_NP_ST_MAX {_ST_MAX + 1}",
         rf"not 0\.\.KPR_NP_ST_MAX-1 \({_ST_MAX + 1}\): missing \[{_ST_MAX}\]"),
        (f"#define KPR_NP_ST_{_ST_LAST} {_ST_MAX - 1} ", f"#define KPR_NP_ST_{_ST_LAST} {_ST_MAX} ",
         rf"missing \[{_ST_MAX - 1}\], out of range \['KPR_NP_ST_{_ST_LAST}'\]"),
        ("#define KPR_NP_ST_DROP_MTU ", "#define KPR_NP_ST_DROP_TOO_BIG ", None),
        ("#define KPR_NP_ST_DROP_VIP ", "#define KPR_NP_ST_DROP_UNSERVED ", r"counters the headers do not have: KPR_NP_ST_DROP_VIP"),
    ],
    ids=["shared-slot", "gap", "out-of-range", "renamed", "renamed-published"],
)
def test_a_broken_counter_list_names_the_counter(lib_copy: Path, old: str, new: str, message: str | None) -> None:
    edit(lib_copy / "nodeport.h", old, new)
    if message is None:
        # a counter renamed in C under its default name: the published name changes, and the
        # published-names check says which one went
        names = abi.Abi(lib_copy).counters("KPR_NP_ST_", names=D.STATS_NAMES)
        assert sorted(PUBLISHED["kpr_np_stats"][1] - set(names)) == ["drop_mtu"]
        return
    with pytest.raises(abi.AbiError, match=message):
        abi.Abi(lib_copy).counters("KPR_NP_ST_", names=D.STATS_NAMES)


# --- structs ---------------------------------------------------------------------------------------


def test_a_changed_struct_field_is_caught_by_name(lib_copy: Path) -> None:
    # a field renamed: the packer's callers would pass the wrong thing in its place
    edit(lib_copy / "maps.h", "\t__u8 scope;          // KPR_SCOPE_EXTERNAL", "\t__u8 zone;          // KPR_SCOPE_EXTERNAL")
    assert packer_mismatches(abi.Abi(lib_copy)) == [
        "M.SVC_KEY: field 3 of struct kpr_svc_key is 'zone', its callers pass 'scope'"
    ]


def test_a_field_added_is_caught_by_name(lib_copy: Path) -> None:
    edit(lib_copy / "nodeport.h", "\t__u8 mode;   // KPR_NP_MODE_*\n", "\t__u8 mode;   // KPR_NP_MODE_*\n\t__u8 weight;\n")
    edit(lib_copy / "nodeport.h", "\t__u8 pad[3]; // zero\n};\n\n// kpr_np_dev", "\t__u8 pad[2]; // zero\n};\n\n// kpr_np_dev")
    assert packer_mismatches(abi.Abi(lib_copy)) == [
        "D.NP_FE: struct kpr_np_fe has fields ('mode', 'weight'), its callers pass ('mode',)"
    ]


def test_a_field_whose_size_changes_contradicts_the_asserted_size(lib_copy: Path) -> None:
    edit(lib_copy / "maps.h", "\t__be16 port;         // frontend port, network order\n\t__u8 proto;          // IPPROTO_TCP",
         "\t__u32 port;         // frontend port, network order\n\t__u8 proto;          // IPPROTO_TCP")
    with pytest.raises(abi.AbiError, match=r"struct kpr_svc_key \(maps.h\): the fields add up to 28 bytes, but the header asserts 24"):
        abi.Abi(lib_copy).struct_of("kpr_svc_key")


def test_every_asserted_size_is_the_parsers() -> None:
    a = abi.default()
    outside = []
    for name, (size, header) in a.asserted_sizes.items():
        try:
            assert a.struct_of(name).size == size, name
        except abi.AbiError as exc:
            # structs holding kernel headers' types (struct iphdr) are out of the parser's reach
            assert re.search(r"no struct or union (iphdr|ipv6hdr|icmphdr|icmp6hdr)\b", str(exc)), exc
            outside.append(name)
    assert set(outside) <= {"kpr_icmp4_err", "kpr_icmp6_err"}
    assert len(a.asserted_sizes) - len(outside) >= 25


def test_layout_rules(tmp_path: Path) -> None:
    (tmp_path / "t.h").write_text(
        "#define T_A (1U << 4) // a\n#define T_B (T_A * 2 + 0x10ULL)\n#ifdef X\n#define T_C 1\n#else\n#define T_C 2\n#endif\n"
        "#ifndef T_D\n#define T_D 7 // default\n#endif\n#define T_S \"x/y\"\n#define T_F(n) ((n) + 1)\n"
        "union u {\n\t__u8 b[6];\n\t__u32 w;\n};\n"
        "struct s {\n\t__u8 a; // implicit padding follows\n\t__u32 b;\n\tunion u c;\n\t__u16 d[2];\n\t__u8 pad[1];\n};\n"
        "struct p {\n\t__u8 a;\n\t__u32 b;\n} __attribute__((packed));\n"
        "struct c {\n\t__u32 a;\n#if X\n\t__u32 b;\n#endif\n};\n"
    )
    a = abi.Abi(tmp_path)
    assert (a.value("T_A"), a.value("T_B"), a.value("T_D"), a.string("T_S")) == (16, 48, 7, "x/y")
    with pytest.raises(abi.AbiError, match=r"T_C depends on build flags"):
        a.value("T_C")
    with pytest.raises(abi.AbiError, match=r"T_F is not #defined"):
        a.value("T_F")
    assert (a.struct_of("u").size, a.struct_of("u").align) == (8, 4)
    s = a.struct_of("s")
    assert [(f.name, f.offset) for f in s.fields] == [("a", 0), ("b", 4), ("c", 8), ("d", 16), ("pad", 20)]
    assert s.size == 24 and s.format() == "=B3xI8s2H1s3x" and s.format(skip=("pad",)) == "=B3xI8s2Hx3x"
    assert ctypes.sizeof(a.ctype("s")) == 24 and a.ctype("s").d.offset == 16
    assert a.struct_of("p").size == 5 and a.struct_of("p").format() == "=BI" and ctypes.sizeof(a.ctype("p")) == 5
    with pytest.raises(abi.AbiError, match=r"struct c \(t.h\) has preprocessor lines inside"):
        a.struct_of("c")
    with pytest.raises(abi.AbiError, match=r"struct s \(t.h\) has no field nope"):
        s.format(skip=("nope",))


def test_an_aligned_struct_is_laid_out_as_the_compiler_does(tmp_path: Path) -> None:
    """`__attribute__((aligned(N)))` raises a type's alignment (struct kpr_ct_key's 8: written in
    words); ctypes has no such attribute, so a mirror that would put a field elsewhere is refused
    by name rather than read at the wrong offset."""
    (tmp_path / "t.h").write_text(
        "struct k {\n\t__u32 a[3];\n\t__u16 b;\n} __attribute__((aligned(8)));\n"
        "struct at0 {\n\tstruct k key;\n\t__u64 c;\n};\n"
        "struct at4 {\n\t__u32 seq;\n\tstruct k key;\n};\n"
        "struct same_size {\n\t__u32 seq;\n\tstruct k key;\n\t__u64 c;\n};\n"
    )
    a = abi.Abi(tmp_path)
    assert (a.struct_of("k").size, a.struct_of("k").align) == (16, 8)
    assert [(f.name, f.offset) for f in a.struct_of("at4").fields] == [("seq", 0), ("key", 8)]
    assert a.struct_of("at4").size == 24
    assert a.ctype("at0").c.offset == 16  # where C puts it too: the mirror is taken
    with pytest.raises(abi.AbiError, match=r"struct at4: ctypes lays it out in 20 bytes, the header in 24"):
        a.ctype("at4")
    # the same total size, a field moved: caught by the offsets, not the size
    assert a.struct_of("same_size").size == 32
    with pytest.raises(abi.AbiError, match=r"struct same_size: ctypes puts key at 4, the header at 8"):
        a.ctype("same_size")


# --- where the headers are -----------------------------------------------------------------------


def test_headers_are_read_where_the_loader_compiles_them_and_are_package_data() -> None:
    assert abi.LIB_DIR == BPF_DIR / "lib" and abi.default().lib_dir == abi.LIB_DIR
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["kpr.bpf"]
    for h in abi.LIB_DIR.glob("*.h"):
        assert any(fnmatch.fnmatch(f"lib/{h.name}", g) for g in globs), f"{h.name} is not package data of kpr.bpf"
    assert "kpr.bpf" in pyproject["tool"]["setuptools"]["packages"]


def test_no_headers_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(abi.AbiError, match=r"no BPF headers under .*package data"):
        abi.Abi(tmp_path)
