"""Every build switch the NodePort benchmarks measure (kpr.testing.nodeport_bench.SWITCHES)
names flags some BPF header tests: a flag no header reads builds the default again, and its
row in the switch table then measures nothing (KPR_NP_FE_TOUCH's row outlived the flag)."""

from __future__ import annotations

import re
from pathlib import Path

import kpr.bpf
from kpr.testing.nodeport_bench import SWITCHES

BPF_DIR = Path(kpr.bpf.__file__).parent


def _header_text() -> str:
    return "\n".join(p.read_text() for p in sorted(BPF_DIR.rglob("*.h")))


def read_by_a_header(text: str, flag: str) -> bool:
    """Whether some preprocessor test (#if, #ifdef, #ifndef, #elif) in `text` names `flag`."""
    return re.search(rf"#\s*(?:if|ifdef|ifndef|elif)\b[^\n]*\b{flag}\b", text) is not None


def test_every_switch_flag_is_read_by_a_header() -> None:
    text = _header_text()
    unread = {}
    for name, flags in SWITCHES.items():
        for flag in flags:
            m = re.fullmatch(r"-[DU](\w+)(=.*)?", flag)
            assert m, f"{name}: {flag!r} is not a -D or -U flag"
            if not read_by_a_header(text, m[1]):
                unread.setdefault(name, []).append(m[1])
    assert not unread, f"switches whose flags no header tests: {unread}"


def test_the_check_tells_a_read_flag_from_a_gone_one() -> None:
    text = _header_text()
    assert read_by_a_header(text, "KPR_NP_SYN_FIRST")
    assert not read_by_a_header(text, "KPR_NP_FE_TOUCH")  # the flag the removed row named
    assert not read_by_a_header("#define KPR_X 1\nint a = KPR_X;\n", "KPR_X")  # used, never tested
