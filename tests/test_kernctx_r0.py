"""kpr.bpf.kernctx.r0_kept_across_call on hand-written instructions: after ctx/skb.h's raw
kfunc call and its load from r0, any path that reads r0 before writing it is found (the kernel
test compiles a program that does: tests/kernel/test_kernctx.py)."""

from __future__ import annotations

import struct

from kpr.bpf.kernctx import r0_kept_across_call


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


KFUNC = insn(0x85, src=2, imm=62980)  # call bpf_cast_to_kern_ctx
LOAD = insn(0x71, dst=1, src=0, off=128)  # r1 = *(u8 *)(r0 + 128): the asm's own read
EXIT = insn(0x95)
R0_ZERO = insn(0xB7, dst=0)  # r0 = 0


def at(prog: bytes) -> int | None:
    """The instruction of the read found (every case here is a read after the asm's load)."""
    kept = r0_kept_across_call(prog)
    assert kept is None or kept.why == "read", kept
    return None if kept is None else kept.at


def test_r0_written_before_it_is_read_passes() -> None:
    assert at(KFUNC + LOAD + R0_ZERO + EXIT) is None
    assert at(KFUNC + insn(0x71, dst=0, src=0, off=128) + EXIT) is None  # the load into r0
    assert at(insn(0x85, imm=5) + EXIT) is None  # a helper call, no kfunc


def test_a_read_of_r0_after_the_call_is_found() -> None:
    assert at(KFUNC + LOAD + EXIT) == 2  # exit returns r0
    assert at(KFUNC + LOAD + insn(0x7B, dst=10, src=0, off=-8) + R0_ZERO + EXIT) == 2  # a store of r0


def test_a_read_on_one_branch_only_is_found() -> None:
    # if r1 == 0 goto +1 (past r0 = 0): the jump reaches exit with the kfunc's r0
    prog = KFUNC + LOAD + insn(0x15, dst=1, off=1) + R0_ZERO + EXIT
    assert at(prog) == 4
    # a 64-bit immediate into r0 on the way (two slots) writes it
    prog = KFUNC + LOAD + insn(0x18, dst=0, imm=1) + insn(0) + EXIT
    assert at(prog) is None


def test_a_64_bit_immediate_is_stepped_over_as_two_slots() -> None:
    # r1 = 1 (ld_imm64): its second slot is no instruction (code 0 would decode as a write of
    # r0); the exit after it reads the kfunc's r0
    assert at(KFUNC + LOAD + insn(0x18, dst=1, imm=1) + insn(0) + EXIT) == 4


def test_a_loop_is_walked_once_and_its_back_edge_followed() -> None:
    # 2: r1 += 1; 3: if r1 != 10 goto 2; then r0 = 0 and exit: every path writes r0 first
    loop = insn(0x07, dst=1, imm=1) + insn(0x55, dst=1, imm=10, off=-2)
    assert at(KFUNC + LOAD + loop + R0_ZERO + EXIT) is None
    # 2: if r1 == 0 goto 5; 3: r1 -= 1; 4: goto 2; 5: exit: the loop's way out reads r0
    loop = insn(0x15, dst=1, off=2) + insn(0x17, dst=1, imm=1) + insn(0x05, off=-3)
    assert at(KFUNC + LOAD + loop + EXIT) == 5
    # the back edge leads to the read: 2: goto 5; 3: exit; 4: r0 = 0; 5: if r1 > 3 goto 3; 6: goto 4
    prog = insn(0x05, off=2) + EXIT + R0_ZERO + insn(0x25, dst=1, imm=3, off=-3) + insn(0x05, off=-3)
    assert at(KFUNC + LOAD + prog) == 3


def test_gotol_takes_its_offset_from_imm() -> None:
    gotol = lambda imm: insn(0x06, imm=imm)  # noqa: E731 - BPF_JMP32|BPF_JA: off unused
    assert at(KFUNC + LOAD + gotol(1) + R0_ZERO + EXIT) == 4  # jumps over the write
    assert at(KFUNC + LOAD + gotol(1) + EXIT + R0_ZERO + EXIT) is None  # over the read


def test_may_goto_reads_no_register_and_both_ways_are_followed() -> None:
    may_goto = lambda off: insn(0xE5, off=off)  # noqa: E731 - BPF_JMP|0xE0: dst is 0, yet no r0
    assert at(KFUNC + LOAD + may_goto(1) + R0_ZERO + R0_ZERO + EXIT) is None
    assert at(KFUNC + LOAD + may_goto(1) + R0_ZERO + EXIT) == 4  # the jump's way reads it
    assert at(KFUNC + LOAD + may_goto(1) + EXIT + R0_ZERO + EXIT) == 3  # and the fall-through's


def test_the_refusal_says_which_case_it_is() -> None:
    kept = r0_kept_across_call(insn(0x07, dst=1, imm=1) + KFUNC + LOAD + EXIT)
    assert (kept.at, kept.call, kept.why) == (3, 1, "read")
    assert str(kept).startswith("r0 read at instruction 3 holds the result of the bpf_cast_to_kern_ctx call at 1")
    # another use of the raw call: the instruction after it stores r0 instead of loading from it
    kept = r0_kept_across_call(KFUNC + insn(0x7B, dst=10, src=0, off=-8) + R0_ZERO + EXIT)
    assert (kept.at, kept.call, kept.why) == (1, 0, "not_load")
    assert str(kept).startswith("instruction 1 after the bpf_cast_to_kern_ctx call at 0 is not ctx_csum_state's load")
    assert "r0 read" not in str(kept)
    kept = r0_kept_across_call(R0_ZERO + KFUNC)  # the call last
    assert (kept.at, kept.call, kept.why) == (2, 1, "not_load")
