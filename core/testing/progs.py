"""Loaded programs as tests compare them: bcc compiles counted, instructions as the kernel holds them.

- `bcc_compiles()`: counts bcc.BPF constructions (compiles) inside the block, calling bcc as
  usual; proves that a start loaded its programs without compiling.
- `loaded_named(name)`: ids of the programs of that name loaded on the machine.
- `xlated_by_map_name(fd)`: a loaded program's instructions as the kernel translated them
  (`bpftool prog dump xlated`'s input), each map reference's id replaced by the map's name,
  so that two loads against maps made anew compare equal when their code is the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
from collections.abc import Iterator

from kpr.bpf import maps as M
from kpr.bpf.progcache import _ld_imm64_maps

__all__ = ["bcc_compiles", "loaded_named", "xlated_by_map_name"]


@contextlib.contextmanager
def bcc_compiles() -> Iterator[list[int]]:
    """[number of bcc.BPF constructed in the block], read after it."""
    import bcc

    count = [0]
    original = bcc.BPF.__init__

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        count[0] += 1
        return original(self, *args, **kwargs)

    bcc.BPF.__init__ = counted
    try:
        yield count
    finally:
        bcc.BPF.__init__ = original


def xlated(fd: int) -> bytes:
    """The program's translated instructions (map references hold map ids)."""
    n = M.prog_info(fd).xlated_prog_len
    buf = ctypes.create_string_buffer(n)
    info = M.ProgInfo(xlated_prog_len=n, xlated_prog_insns=ctypes.addressof(buf))
    size = ctypes.c_uint32(ctypes.sizeof(info))
    M.check_rc(M.libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return buf.raw[: info.xlated_prog_len]


def xlated_by_map_name(fd: int) -> tuple[bytes, list[str]]:
    """(instructions with map ids zeroed, the referenced maps' names in order)."""
    insns = bytearray(xlated(fd))
    names = []
    for i, _kind, mid in _ld_imm64_maps(bytes(insns)):  # (the kernel's translation holds map ids)
        with M.BpfMap.from_id(mid) as m:
            names.append(m.name)
        struct.pack_into("<i", insns, i * 8 + 4, 0)
    return bytes(insns), names


def loaded_named(name: str) -> list[int]:
    """Ids of the programs loaded on this machine under `name` (truncated to 15 characters as
    the kernel keeps it): what a half-finished load would leave."""
    from kpr.bpf import links

    lib = links._lib()
    out, cur, nxt = [], 0, ctypes.c_uint32(0)
    while lib.bpf_prog_get_next_id(cur, ctypes.byref(nxt)) == 0:
        cur = nxt.value
        if links.prog_name(cur) == name[:15]:
            out.append(cur)
    return out
