"""What a tc program needs to read the skb's checksum state: the kernel's `struct sk_buff` as a
BTF pointer (the kfunc bpf_cast_to_kern_ctx, which the verifier turns into a register move) and
where `ip_summed` sits in it. `struct __sk_buff` has no such field; with it a NAT rewrite of a
packet whose checksum is not offloaded (CHECKSUM_NONE, CHECKSUM_UNNECESSARY) patches its L4
checksum in place instead of calling bpf_l4_csum_replace (ctx/skb.h ctx_csum_state, lib/csum.h).

Both come from the running kernel's BTF (/sys/kernel/btf/vmlinux: type ids and offsets differ
between kernel builds), read once per process. `cflags()` is empty when the kernel has no BTF,
no such kfunc (before 6.2) or no such field, or runs BPF without the JIT (kfunc calls need it):
the programs then infer the state from the helper (lib/csum.h KPR_CSUM_L4_INFER).

The call is a raw instruction that cannot name r0, where its result lands: `r0_kept_across_call`
finds a build whose compiler kept a value of its own there (kpr.bpf.loader refuses it).
"""

from __future__ import annotations

import functools
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

VMLINUX = Path("/sys/kernel/btf/vmlinux")
JIT_ENABLE = Path("/proc/sys/net/core/bpf_jit_enable")
KFUNC = "bpf_cast_to_kern_ctx"

# BTF kinds (include/uapi/linux/btf.h) and the bytes each adds after its 12-byte struct btf_type
_INT, _ARRAY, _STRUCT, _UNION, _ENUM, _FUNC, _FUNC_PROTO, _VAR, _DATASEC, _DECL_TAG, _ENUM64 = (
    1, 3, 4, 5, 6, 12, 13, 14, 15, 17, 19)
_FIXED = {_INT: 4, _ARRAY: 12, _VAR: 4, _DECL_TAG: 4}
_PER_MEMBER = {_STRUCT: 12, _UNION: 12, _ENUM: 8, _FUNC_PROTO: 8, _DATASEC: 12, _ENUM64: 12}


def _types(data: bytes) -> tuple[list[tuple[int, int, int, int, int]], bytes]:
    """(name_off, kind, vlen, kind_flag, offset of its extra data) per type id (index 0: void), and the string section."""
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", data)
    if magic != 0xEB9F:
        raise ValueError("not little-endian BTF")
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    strs = data[hdr_len + str_off:hdr_len + str_off + str_len]
    out = [(0, 0, 0, 0, 0)]
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        out.append((name_off, kind, vlen, kflag, pos + 12))
        pos += 12 + _FIXED.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
    return out, strs


def _name(strs: bytes, off: int) -> str:
    return strs[off:strs.index(b"\0", off)].decode()


def _member_bits(data: bytes, types: list, strs: bytes, tid: int, field: str) -> tuple[int, int] | None:
    """(bit offset, bit size) of `field` in struct `tid`, looking into anonymous struct/union members."""
    _n, kind, vlen, kflag, extra = types[tid]
    for i in range(vlen):
        name_off, mtype, moff = struct.unpack_from("<III", data, extra + 12 * i)
        bit, size = (moff & 0xFFFFFF, moff >> 24) if kflag else (moff, 0)
        if name_off and _name(strs, name_off) == field:
            return bit, size
        if not name_off and types[mtype][1] in (_STRUCT, _UNION):
            inner = _member_bits(data, types, strs, mtype, field)
            if inner:
                return bit + inner[0], inner[1]
    return None


@functools.lru_cache(maxsize=1)
def cflags() -> tuple[str, ...]:
    """-D flags naming the kfunc's BTF id and ip_summed's byte and shift in struct sk_buff; () when unknown."""
    try:
        if JIT_ENABLE.read_text().strip() == "0":
            log.info("kernctx_unavailable reason=jit_off")
            return ()
        data = VMLINUX.read_bytes()
        types, strs = _types(data)
        fn = sk_buff = None
        for tid, (name_off, kind, _v, _k, _e) in enumerate(types):
            if kind == _FUNC and fn is None and _name(strs, name_off) == KFUNC:
                fn = tid
            elif kind == _STRUCT and sk_buff is None and name_off and _name(strs, name_off) == "sk_buff":
                sk_buff = tid
        bits = _member_bits(data, types, strs, sk_buff, "ip_summed") if sk_buff else None
    except (OSError, ValueError, struct.error, IndexError) as exc:
        log.info("kernctx_unavailable reason=%r", str(exc))
        return ()
    if fn is None or bits is None or bits[1] != 2 or bits[0] % 8 > 6:
        log.info("kernctx_unavailable kfunc=%s ip_summed=%s", fn, bits)
        return ()
    return (f"-DKPR_SKB_KERN_CTX_FN={fn}", f"-DKPR_SKB_IP_SUMMED_OFF={bits[0] // 8}",
            f"-DKPR_SKB_IP_SUMMED_SHIFT={bits[0] % 8}")


# ctx/skb.h ctx_csum_state's raw kfunc call (BPF_JMP|BPF_CALL, src_reg BPF_PSEUDO_KFUNC_CALL)
_KFUNC_CALL = 0x85, 2
_INSN = struct.Struct("<BBhi")


def _reads_writes_r0(code: int, dst: int, src: int, imm: int) -> tuple[bool, bool]:
    """(reads r0, writes r0) of one instruction."""
    cls, op, x = code & 7, code & 0xF0, code & 8
    if cls == 0:  # LD: imm64 (a write of dst), or LD_ABS/LD_IND (r0 written; IND reads src)
        return code & 0xE0 == 0x40 and src == 0, code != 0x18 or dst == 0
    if cls == 1:  # LDX: dst = *(src + off)
        return src == 0, dst == 0
    if cls == 2:  # ST: *(dst + off) = imm
        return dst == 0, False
    if cls == 3:  # STX (atomics: cmpxchg reads and writes r0, a fetch writes src, load-acquire dst)
        if code & 0xE0 == 0xC0 and imm == 0xF1:
            return True, True
        if code & 0xE0 == 0xC0 and imm == 0x100:
            return src == 0, dst == 0
        return dst == 0 or src == 0, src == 0 and code & 0xE0 == 0xC0 and bool(imm & 1)
    if cls in (4, 7):  # ALU: mov writes dst only; neg and bswap read it; the rest read dst and src
        if op == 0xB0:
            return bool(x) and src == 0, dst == 0
        return dst == 0 or (bool(x) and op not in (0x80, 0xD0) and src == 0), dst == 0
    # JMP, JMP32: a call writes r0 (its arguments are r1-r5), exit returns it; ja and
    # may_goto (0xE0: a jump the verifier bounds, its dst field 0) read no register
    if op == 0x80:
        return False, True
    if op == 0x90:
        return True, False
    if op in (0x00, 0xE0):
        return False, False
    return dst == 0 or (bool(x) and src == 0), False


@dataclass(frozen=True)
class R0Kept:
    """Why a build's use of the raw kfunc call is refused: `at` is the instruction found, `call`
    the call's; `why` "read": r0 is read there before written (the kfunc's result, where the
    compiler kept a value of its own); "not_load": the instruction after the call is not the
    asm's load from r0, so this is no ctx_csum_state and the walk cannot tell what r0 holds."""

    at: int
    call: int
    why: str

    def __str__(self) -> str:
        if self.why == "not_load":
            return (f"instruction {self.at} after the bpf_cast_to_kern_ctx call at {self.call} is not "
                    "ctx_csum_state's load from r0 (another use of the raw call: r0 cannot be followed)")
        return (f"r0 read at instruction {self.at} holds the result of the bpf_cast_to_kern_ctx call at "
                f"{self.call}, not the compiler's value kept there (ctx/skb.h ctx_csum_state)")


def r0_kept_across_call(insns: bytes) -> R0Kept | None:
    """Where a read of r0 that the compiler meant for a value of its own gets the kfunc's
    result instead (ctx/skb.h ctx_csum_state: the asm cannot name r0 as clobbered, so the
    compiler may keep a value there across the call), or None. After the call the asm's own
    load reads r0; from then on, on every path, r0 must be written before it is read. Such a
    build loads (the verifier takes the pointer for whatever the compiler kept there: a
    number stored, compared) and computes with a kernel address."""
    if b"\x85\x20" not in insns:  # (no kfunc call: most programs)
        return None
    n = len(insns) // 8
    for i in range(n):
        code, regs, _off, _imm = _INSN.unpack_from(insns, 8 * i)
        if (code, regs >> 4) != _KFUNC_CALL:
            continue
        code, regs, _off, _imm = _INSN.unpack_from(insns, 8 * (i + 1)) if i + 1 < n else (0, 0, 0, 0)
        if code & 7 != 1 or regs >> 4 != 0:
            return R0Kept(i + 1, i, "not_load")
        if regs & 15 == 0:
            continue  # the load's result went to r0: a value of the compiler's from here on
        todo, seen = [i + 2], set()
        while todo:
            pc = todo.pop()
            if pc in seen or pc >= n:
                continue
            seen.add(pc)
            code, regs, off, imm = _INSN.unpack_from(insns, 8 * pc)
            reads, writes = _reads_writes_r0(code, regs & 15, regs >> 4, imm)
            if reads:
                return R0Kept(pc, i, "read")
            if writes:
                continue  # (calls included; exit reads r0)
            cls, op = code & 7, code & 0xF0
            if code == 0x18:
                todo.append(pc + 2)  # (a 64-bit immediate takes two)
            elif cls in (5, 6) and op == 0x00:  # ja (JMP32's takes its offset from imm)
                todo.append(pc + 1 + (imm if cls == 6 else off))
            elif cls in (5, 6):
                todo += [pc + 1, pc + 1 + off]
            else:
                todo.append(pc + 1)
    return None
