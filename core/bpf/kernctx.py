"""What a tc program needs to read the skb's checksum state: the kernel's `struct sk_buff` as a
BTF pointer (the kfunc bpf_cast_to_kern_ctx, which the verifier turns into a register move) and
where `ip_summed` sits in it. `struct __sk_buff` has no such field; with it a NAT rewrite of a
packet whose checksum is not offloaded (CHECKSUM_NONE, CHECKSUM_UNNECESSARY) patches its L4
checksum in place instead of calling bpf_l4_csum_replace (ctx/skb.h ctx_csum_state, lib/csum.h).

Both come from the running kernel's BTF (/sys/kernel/btf/vmlinux: type ids and offsets differ
between kernel builds), read once per process. `cflags()` is empty when the kernel has no BTF,
no such kfunc (before 6.2) or no such field, or runs BPF without the JIT (kfunc calls need it):
the programs then infer the state from the helper (lib/csum.h KPR_CSUM_L4_INFER).
"""

from __future__ import annotations

import functools
import logging
import struct
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
