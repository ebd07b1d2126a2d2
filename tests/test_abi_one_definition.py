"""One definition of every struct shared by C and Python: Python code takes a header struct's
layout from kpr.bpf.abi (read from core/bpf/lib), never a struct.Struct format of its own that a
header change would leave behind. Root-free."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from kpr.bpf import abi

ROOT = Path(__file__).resolve().parents[1]
_LITERAL = re.compile(r'struct\.Struct\(\s*"([^"]+)"\s*\)')
# Small formats ("=HH", "=I") say too little to name a struct; a header struct of 8 bytes or
# more written out by hand is a copy.
_MIN_SIZE = 8


def _header_formats() -> dict[str, set[str]]:
    """Format -> header structs with that layout, their pad fields written as pad bytes or not."""
    a = abi.default()
    formats: dict[str, set[str]] = {}
    for name in a.types():
        try:
            t = a.struct_of(name)
        except abi.AbiError:  # a struct sized by a define that is not one (a flexible table)
            continue
        if t.kind != "struct" or t.size < _MIN_SIZE:
            continue
        pads = [f.name for f in t.fields if "pad" in f.name]
        for k in range(len(pads) + 1):
            for skip in itertools.combinations(pads, k):
                formats.setdefault(t.format(skip), set()).add(name)
    return formats


def _copies(formats: dict[str, set[str]]) -> list[str]:
    found = []
    for path in sorted([*(ROOT / "core").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]):
        if path == ROOT / "core" / "bpf" / "abi.py":  # its docstring shows what a packer gives
            continue
        text = path.read_text()
        for m in _LITERAL.finditer(text):
            if m.group(1) in formats:
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line} {m.group(1)} is {sorted(formats[m.group(1)])}")
    return found


def test_no_header_struct_is_written_out_by_hand() -> None:
    assert _copies(_header_formats()) == []


def test_the_scan_finds_a_copy() -> None:
    # The check itself: kpr_ct_key's layout written out is found, under both spellings of a pad.
    formats = _header_formats()
    assert {"kpr_ct_key"} <= formats[abi.packer("kpr_ct_key").format]
    assert "kpr_affinity_key" in formats[abi.packer("kpr_affinity_key", skip=("pad",)).format]
    assert _LITERAL.search('_K = struct.Struct("=16s16sHHBBH")').group(1) in formats


# abi.packer("name", ...) / abi.value("NAME"): one module makes each, the others import it (two
# modules each making kpr_ct_key's packer is the same layout defined twice in Python).
_ABI_CALL = re.compile(r'abi\.(packer|value)\(\s*"([^"]+)"([^)]*)\)')


def test_each_abi_packer_and_value_is_made_in_one_module() -> None:
    made: dict[str, list[str]] = {}
    for path in sorted([*(ROOT / "core").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]):
        if path == ROOT / "core" / "bpf" / "abi.py":  # its docstring shows the calls
            continue
        text = path.read_text()
        for m in _ABI_CALL.finditer(text):
            call = f"abi.{m.group(1)}({m.group(2)!r}{m.group(3)})"
            made.setdefault(call, []).append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}")
    assert {call: where for call, where in made.items() if len(where) > 1} == {}
