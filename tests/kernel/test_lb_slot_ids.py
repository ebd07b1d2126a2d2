"""kpr_lb_slot_backend_ids (lib/lb.h) reads a frontend line's backend ids from the caller's stack
buffer at constant offsets: a variable-offset stack read (ids[slot - 1]) is refused by kernels
before about 5.12, which would refuse every NodePort build with it. This kernel accepts either, so the
test reads the compiled bytecode for a stack pointer plus a register, and runs the choice."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from kpr.bpf import maps as M
from kpr.bpf.inline import inline_includes
from kpr.bpf.loader import compile_and_load, load_prog
from kpr.testing.prog_run import test_run

pytestmark = pytest.mark.kernel

PROGRAM = r"""
#include "ctx/xdp.h"
#include "lib/parse.h"
#include "lib/lb.h"

BPF_ARRAY(test_out, __u32, 1);
BPF_ARRAY(test_ids, __u32, 4); // a line's ids, as the test wrote them

// The backend id of slot (destination port & 7) of an entry whose line holds test_ids (copied
// to the stack, as kpr_lb_lookup_into copies a line's).
int ids_test(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_svc_val svc = {};
	__u32 ids[4], zero = 0, one = 1, two = 2, three = 3, bid, *v;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || !pkt.l4_off)
		return XDP_PASS;
	v = test_ids.lookup(&zero);
	ids[0] = v ? *v : 0;
	v = test_ids.lookup(&one);
	ids[1] = v ? *v : 0;
	v = test_ids.lookup(&two);
	ids[2] = v ? *v : 0;
	v = test_ids.lookup(&three);
	ids[3] = v ? *v : 0;
	svc.slot_base = 100;
	bid = kpr_lb_slot_backend_ids(&svc, ids, (__u16)(kpr_ntohs(pkt.t.dport) & 7));
	test_out.update(&zero, &bid);
	return XDP_PASS;
}
"""

_FP = 10  # the frame pointer register


def stack_plus_register(code: bytes) -> list[int]:
    """Instruction indexes where a pointer derived from the frame pointer gets a register added
    (a variable stack offset), by a linear scan: a register holds such a pointer after a move
    from r10 or from one that holds it, and keeps it through constant adds. Not tracked: such a
    pointer spilled to the stack and loaded back (the reloaded register counts as no stack
    pointer), which clang does not do with this program."""
    fp = {_FP}
    found = []
    i = 0
    while i < len(code) // 8:
        op, regs, _off, _imm = struct.unpack_from("<BBhi", code, i * 8)
        dst, src = regs & 0xF, regs >> 4
        cls = op & 0x07
        if op == 0x18:  # ld_imm64: two slots
            fp.discard(dst)
            i += 2
            continue
        if op == 0xBF:  # mov64 reg
            (fp.add if src in fp else fp.discard)(dst)
        elif op in (0x0F, 0x1F) and (dst in fp or src in fp):  # add64 / sub64 reg
            found.append(i)
            fp.discard(dst)
        elif op in (0x07, 0x17):  # add64 / sub64 imm: still the frame pointer, at a constant offset
            pass
        elif op == 0x85:  # call: r0-r5 clobbered
            fp -= {0, 1, 2, 3, 4, 5}
        elif cls in (0x04, 0x07, 0x01, 0x00):  # ALU32, ALU64, LDX, LD: dst overwritten
            fp.discard(dst)
        i += 1
    return found


@pytest.fixture
def prog(kernel_headers: Path, pin_dir: Path) -> Iterator[tuple[object, object]]:
    b = compile_and_load(inline_includes(PROGRAM), cflags=M.cflags(pin_dir))
    t = b[b"test_ids"]
    for i, v in enumerate((11, 0, 13, 14)):
        t[t.Key(i)] = t.Leaf(v)
    # kpr_slots, where slots the line has no id for are read (slot_base 100: slot n at 99 + n)
    slots = b[b"kpr_slots"]
    for idx, bid in ((101, 22), (104, 55)):
        leaf = slots.Leaf()
        leaf.backend_id = bid
        slots[slots.Key(idx)] = leaf
    try:
        yield b, load_prog(b, "ids_test", "XDP")
    finally:
        b.cleanup()


def test_the_line_ids_are_read_at_constant_stack_offsets(prog: tuple[object, object]) -> None:
    b, _fn = prog
    assert stack_plus_register(b.dump_func(b"ids_test")) == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "slot, want",
    [
        (1, 11),  # the line's ids, slots 1..4
        (3, 13),
        (4, 14),
        (2, 22),  # 0 in the line: kpr_slots
        (5, 55),  # past the line's ids: kpr_slots
        (0, 0),  # no slot 0: kpr_slots' unused index (99)
    ],
)
def test_the_slot_picks_its_id(prog: tuple[object, object], slot: int, want: int) -> None:
    b, fn = prog
    test_run(fn.fd, bytes(Ether() / IP(src="198.51.100.1", dst="10.96.0.10") / UDP(sport=40000, dport=slot)))  # type: ignore[attr-defined]
    t = b[b"test_out"]  # type: ignore[index]
    assert t[t.Key(0)].value == want
