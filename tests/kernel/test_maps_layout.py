"""The C structs of lib/*.h and their Python mirrors in kpr.bpf.maps agree; the ctx API
compiles for both hooks and refuses operations a hook lacks."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from kpr.bpf import maps as M
from kpr.bpf.abi import leaves as layout
from kpr.bpf.inline import inline_includes
from kpr.bpf.loader import CompileError, compile_and_load, load_prog
from kpr.servicemaps import ServiceMapWriter
from kpr.testing.bpffs import pin_map

pytestmark = pytest.mark.kernel


def compile_lib(src: str, pin: Path, **kw: object) -> object:
    return compile_and_load(inline_includes(src), cflags=M.cflags(pin, **kw))  # type: ignore[arg-type]


ALL_HEADERS = """
#include "ctx/xdp.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/lb.h"
#include "lib/conntrack.h"
#include "lib/nat.h"
int noop(kpr_ctx_t *ctx) { return CTX_PASS; }
"""

# map name -> (key mirror, value mirror); None where the map's side is a plain integer.
MIRRORS = {
    "kpr_svc": (M.SvcKey, M.SvcVal),
    "kpr_slots": (None, M.Slot),
    "kpr_backend": (None, M.Backend),
    "kpr_revnat": (None, M.RevNat),
    "kpr_affinity": (M.AffinityKey, M.AffinityVal),
    "kpr_maglev": (M.MaglevKey, None),
    "kpr_srcrange": (M.SrcRangeKey, None),
    "kpr_ct": (M.CtKey, M.CtEntry),
    "kpr_snat": (M.CtKey, M.NatEntry),
}


def test_every_struct_matches_its_python_mirror(kernel_headers: Path, pin_dir: Path) -> None:
    b = compile_lib(ALL_HEADERS, pin_dir)
    try:
        for name, (key_mirror, val_mirror) in MIRRORS.items():
            table = b[name.encode()]
            spec = M.SPECS[name]
            assert ctypes.sizeof(table.Key) == spec.key_size, name
            if spec.inner is None:
                assert ctypes.sizeof(table.Leaf) == spec.value_size, name
            for c_type, mirror in ((table.Key, key_mirror), (table.Leaf, val_mirror)):
                if mirror is None:
                    continue
                assert ctypes.sizeof(c_type) == ctypes.sizeof(mirror), (name, mirror.__name__)
                assert layout(c_type) == layout(mirror), (name, mirror.__name__)
    finally:
        b.cleanup()


def test_packers_write_the_same_bytes_as_the_mirrors() -> None:
    addr = M.addr_to_bytes("10.1.2.3")
    k = M.SvcKey(port=M.htons(80), proto=6, scope=1, slot=7)
    k.addr.b[:] = addr
    assert bytes(k) == M.SVC_KEY.pack(addr, M.htons(80), 6, 1, 7, 0)
    v = M.SvcVal(slot_base=9, count=3, terminating=1, rev_nat=12, flags=0x305, affinity_timeout=600)
    assert bytes(v) == M.SVC_VAL.pack(9, 3, 1, 12, 0x305, 600)
    be = M.Backend(port=M.htons(8080), proto=17, reserved=0, flags=1)
    be.addr.b[:] = addr
    assert bytes(be) == M.BACKEND.pack(addr, M.htons(8080), 17, 0, 1)
    rn = M.RevNat(port=M.htons(53), proto=17)
    rn.addr.b[:] = addr
    assert bytes(rn) == M.REVNAT.pack(addr, M.htons(53), 17)
    sr = M.SrcRangeKey(prefixlen=152, rev_nat=4)
    sr.addr.b[:] = addr
    assert bytes(sr) == M.SRCRANGE_KEY.pack(152, 4, addr)
    assert bytes(M.MaglevKey(rev_nat=5, scope=1)) == M.MAGLEV_KEY.pack(5, 1)
    for mirror, packer in M.PACKERS.items():
        assert ctypes.sizeof(mirror) == packer.size, mirror.__name__


def test_addresses_are_v4_mapped() -> None:
    assert M.addr_to_bytes("10.0.0.1") == bytes(10) + b"\xff\xff\x0a\x00\x00\x01"
    assert M.bytes_to_addr(M.addr_to_bytes("10.0.0.1")) == "10.0.0.1"
    assert M.bytes_to_addr(M.addr_to_bytes("fd00::1")) == "fd00::1"
    assert M.wildcard_bytes(4) == M.addr_to_bytes("0.0.0.0") != M.wildcard_bytes(6) == bytes(16)


def test_program_loaded_first_creates_maps_the_writer_adopts(kernel_headers: Path, pin_dir: Path) -> None:
    sizes = {"kpr_svc": 1024, "kpr_backend": 512, "kpr_ct": 2048}
    b = compile_lib(ALL_HEADERS, pin_dir, sizes=sizes, maglev_size=251)
    try:
        ids = {name: M.obj_info(b[name.encode()].map_fd).id for name in MIRRORS}
        with ServiceMapWriter(pin_dir, sizes=sizes, maglev_size=251) as w:
            # Nothing recreated: the writer uses the very maps bcc created and pinned.
            assert {n: i for n, i in w.ids().items() if n in ids} == ids
            for name, m in w.maps.items():
                assert m.info().max_entries == w.specs[name].max_entries
    finally:
        b.cleanup()


def test_program_loaded_after_the_writer_uses_its_maps(kernel_headers: Path, pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir) as w:
        b = compile_lib(ALL_HEADERS, pin_dir)
        try:
            for name in MIRRORS:
                assert M.obj_info(b[name.encode()].map_fd).id == w.ids()[name], name
        finally:
            b.cleanup()


def test_writer_refuses_an_incompatible_pinned_map(pin_dir: Path) -> None:
    pin_map(pin_dir, "kpr_svc", M.MapSpec("kpr_svc", M.BPF_MAP_TYPE_HASH, 24, 16, 65536))
    with pytest.raises(M.MapIncompatible, match=r"kpr_svc does not match.*value_size 16 \(want 20\).*kpr cleanup"):
        ServiceMapWriter(pin_dir).open()
    # Nothing was replaced.
    with M.BpfMap.open_pinned(pin_dir / "kpr_svc") as m:
        assert m.info().value_size == 16


# ---------------------------------------------------------------------- ctx API

CTX_PROGRAM = """
#include "ctx/%s.h"
#include "lib/parse.h"
int uses_common_api(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	__u8 buf[4];
	__u32 *p = ctx_ptr(ctx, 0, 4);

	if (!p || ctx_data(ctx) + 14 > ctx_data_end(ctx))
		return CTX_DROP;
	if (ctx_len(ctx) < 14 || ctx_load_bytes(ctx, 0, buf, 4) || ctx_store_bytes(ctx, 0, buf, 4))
		return CTX_DROP;
	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK)
		return CTX_PASS;
	// the operations whose answer differs by hook (ctx/skb.h: defined by both), on run-time
	// inputs: a constant answer placed before the rest let XDP's build fold every later
	// operation away, so the verifier never saw them
	if (pkt.t.proto == 252 && (pkt.t.dport & 1) == CTX_REDIRECT_NEEDS_XDP_XMIT)
		return CTX_PASS;
	if (pkt.t.proto == 253 && !ctx_fits_mtu(ctx, 14, CTX_FIB_MTU ? 1500 : 0))
		return CTX_PASS;
	if (pkt.t.proto == 254 && (pkt.t.dport & 1) == CTX_RESOLVE_NEIGH_IS_STACK)
		return ctx_resolve_neigh(ctx, ctx_ifindex(ctx));
	if (pkt.t.proto == 255 && (pkt.t.dport & 1) == CTX_REDIRECTS_EVERYWHERE)
		return CTX_PASS;
	if (pkt.t.proto == 250)
		return ctx_redirect(ctx, ctx_ifindex(ctx), 0);
	if (pkt.t.proto == 251)
		return CTX_REDIRECT;
	return ctx_tx(ctx);
}
%s
"""

SKB_ONLY = """
int skb_only(kpr_ctx_t *ctx)
{
	if (ctx_len(ctx) == 1)
		return ctx_redirect_neigh(ctx, 1);
	if (ctx_len(ctx) == 2)
		return ctx_adjust_room(ctx, 8, BPF_ADJ_ROOM_MAC, 0);
	return ctx_redirect_peer(ctx, 1, 0);
}
"""


@pytest.mark.parametrize("ctx, prog_type", [("xdp", "XDP"), ("skb", "SCHED_CLS")])
def test_common_ctx_api_compiles_and_loads_for_both_hooks(kernel_headers: Path, ctx: str, prog_type: str) -> None:
    extra = SKB_ONLY if ctx == "skb" else "int xdp_only(kpr_ctx_t *ctx) { return ctx_adjust_head(ctx, 0) ? CTX_DROP : CTX_TX; }"
    b = compile_and_load(inline_includes(CTX_PROGRAM % (ctx, extra)))
    try:
        load_prog(b, "uses_common_api", prog_type)
        load_prog(b, "skb_only" if ctx == "skb" else "xdp_only", prog_type)
    finally:
        b.cleanup()


@pytest.mark.parametrize(
    "ctx, body, symbol, op",
    [
        ("xdp", "return ctx_redirect_peer(ctx, 1, 0);", "__kpr_xdp_has_no_redirect_peer", "ctx_redirect_peer"),
        ("xdp", "return ctx_redirect_neigh(ctx, 1);", "__kpr_xdp_has_no_redirect_neigh", "ctx_redirect_neigh"),
        ("xdp", "return ctx_redirect_neigh_nh(ctx, 1, 0);", "__kpr_xdp_has_no_redirect_neigh", "ctx_redirect_neigh_nh"),
        ("xdp", "return ctx_adjust_room(ctx, 8, 0, 0);", "__kpr_xdp_has_no_adjust_room", "ctx_adjust_room"),
        ("skb", "return CTX_TX;", "__kpr_skb_has_no_tx_verdict", "CTX_TX"),
        ("skb", "return ctx_adjust_head(ctx, -8);", "__kpr_skb_has_no_adjust_head", "ctx_adjust_head"),
        # even where the hook never gets there: lib/ code cannot keep one hook's operation in a
        # dead branch of the other's build (ctx/skb.h), it takes an operation both define
        ("xdp", "if (0) return ctx_redirect_peer(ctx, 1, 0); return CTX_PASS;", "__kpr_xdp_has_no_redirect_peer",
         "ctx_redirect_peer"),
    ],
)
def test_an_operation_the_hook_lacks_fails_the_build(kernel_headers: Path, ctx: str, body: str, symbol: str,
                                                     op: str) -> None:
    src = f'#include "ctx/{ctx}.h"\nint prog(kpr_ctx_t *ctx) {{ {body} }}\n'
    with pytest.raises(CompileError) as info:
        compile_and_load(inline_includes(src))
    # by name: the undefined symbol says what is missing, the compiler's note the operation used
    assert symbol in str(info.value)
    assert f"expanded from macro '{op}'" in str(info.value)


@pytest.mark.parametrize("ctx", ["xdp", "skb"])
def test_ctx_header_includes_no_lib_header(ctx: str) -> None:
    # ctx/ is the bottom tier: it states the hook's facts (CTX_REDIRECT_NEEDS_XDP_XMIT), lib/
    # what they mean for its devices (lib/nodeport.h: kpr_np_redirect_reaches)
    text = inline_includes(f'#include "ctx/{ctx}.h"\n')
    # inlined (a #line marker) or left to the compiler (an include with a comment after it)
    lib = re.findall(r'^#line 1 "(.*/lib/[^/"]*)"$|^\s*#\s*include\s+"([^"]*lib/[^"]*)"', text, re.M)
    assert not lib


def test_ctx_headers_guard_their_use(kernel_headers: Path) -> None:
    with pytest.raises(CompileError, match="include only one of"):
        compile_and_load(inline_includes('#include "ctx/xdp.h"\n#include "ctx/skb.h"\n'))
    with pytest.raises(CompileError, match="include ctx/skb.h or ctx/xdp.h before lib/parse.h"):
        compile_and_load(inline_includes('#include "lib/parse.h"\n'))


def test_lb_header_is_context_free_for_socket_hooks(kernel_headers: Path, pin_dir: Path) -> None:
    # cgroup connect hooks have no packet: lb.h and conntrack.h must compile without a ctx header.
    src = """
#include "lib/lb.h"
#include "lib/conntrack.h"
int sock_connect(struct bpf_sock_addr *ctx)
{
	struct kpr_tuple t = {};
	struct kpr_svc_key key;
	struct kpr_svc_val *svc;
	struct kpr_affinity_key aff;
	__u32 id;

	kpr_addr_set_v4(&t.daddr, ctx->user_ip4);
	t.dport = (__be16)ctx->user_port;
	t.proto = IPPROTO_TCP;
	t.family = KPR_FAMILY_V4;
	svc = kpr_lb_lookup(&key, &t, KPR_LB_FROM_CLUSTER | KPR_LB_NODE_ADDR);
	if (!svc)
		return 1;
	kpr_lb_affinity_key_netns(&aff, svc, bpf_get_netns_cookie(ctx));
	if (!kpr_lb_pick(&key, svc, &t, &aff, &id))
		return 0;
	return 1;
}
"""
    b = compile_lib(src, pin_dir)
    try:
        load_prog(b, "sock_connect", "CGROUP_SOCK_ADDR", attach_type="CGROUP_INET4_CONNECT")
    finally:
        b.cleanup()
