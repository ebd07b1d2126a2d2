"""kpr.bpf.abi against the compiler: every struct and union the parser reads from lib/*.h has,
field by field (names, offsets, sizes), the layout bcc's clang gives it, and the parser's
constants are the values the compiler sees. The root-free tests/test_abi.py trusts the parser;
this is what makes it trustworthy."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from kpr.bpf import abi
from kpr.bpf import maps as M
from kpr.bpf.inline import inline_includes
from kpr.bpf.loader import compile_and_load

pytestmark = pytest.mark.kernel

# Programs' sets of headers (host_routing.h does not build beside nodeport.h): each struct is
# checked in the first unit that defines it.
UNITS = (
    ("ctx/skb.h", "lib/common.h", "lib/parse.h", "lib/csum.h", "lib/maps.h", "lib/lb.h", "lib/conntrack.h",
     "lib/nat.h", "lib/devkind.h", "lib/monitor.h", "lib/icmp.h", "lib/dsr.h", "lib/nodeport.h", "lib/sock.h",
     "lib/arp.h"),
    ("ctx/skb.h", "lib/host_routing.h"),
)
# Constants checked by the compiler: one array per constant, sized by it.
CONSTANTS = (
    "KPR_NP_ST_MAX", "KPR_NP_FWD_MAX", "KPR_NP_CALL_MAX", "KPR_SOCK_ST_MAX", "KPR_SVC_F_WILDCARD", "KPR_CT_F_LOCAL",
    "KPR_NP_REV_F_CLOSING", "KPR_NP_VIP_BITS", "KPR_MON_R_TAIL_CALL_MISSING",
)


def parseable() -> list[str]:
    a = abi.default()
    out = []
    for name in a.types():
        try:
            a.struct_of(name)
        except abi.AbiError:
            continue
        out.append(name)
    return out


def test_every_parsed_struct_is_laid_out_as_the_compiler_does(kernel_headers: Path, pin_dir: Path) -> None:
    a = abi.default()
    names = parseable()
    assert len(names) >= 30, names
    checked: set[str] = set()
    for u, unit in enumerate(UNITS):
        head = inline_includes("".join(f'#include "{h}"\n' for h in unit))
        mine = [n for n in names if n not in checked and f"{a.struct_of(n).kind} {n} {{" in head]
        src = head + "".join(f"BPF_ARRAY(abi_t{i}, {a.struct_of(n).kind} {n}, 1);\n" for i, n in enumerate(mine))
        consts = CONSTANTS if u == 0 else ()
        src += "".join(f"BPF_ARRAY(abi_c{i}, __u8, {c});\n" for i, c in enumerate(consts))
        src += "int noop(struct __sk_buff *skb) { return 0; }\n"
        b = compile_and_load(src, cflags=M.cflags(pin_dir))
        try:
            for i, name in enumerate(mine):
                c_type = b[f"abi_t{i}".encode()].Leaf
                assert ctypes.sizeof(c_type) == ctypes.sizeof(a.ctype(name)), name
                assert abi.leaves(c_type) == abi.leaves(a.ctype(name)), name
                checked.add(name)
            for i, const in enumerate(consts):
                assert b[f"abi_c{i}".encode()].max_entries == a.value(const), const
        finally:
            b.cleanup()
    assert checked == set(names), f"structs no unit compiles: {sorted(set(names) - checked)}"
