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


def test_every_switch_flag_is_read_by_a_header() -> None:
    text = _header_text()
    unread = {}
    for name, flags in SWITCHES.items():
        for flag in flags:
            m = re.fullmatch(r"-[DU](\w+)(=.*)?", flag)
            assert m, f"{name}: {flag!r} is not a -D or -U flag"
            if not re.search(rf"#\s*(?:if|ifdef|ifndef|elif)\b[^\n]*\b{m[1]}\b", text):
                unread.setdefault(name, []).append(m[1])
    assert not unread, f"switches whose flags no header tests: {unread}"


def test_the_check_sees_a_flag_no_header_reads() -> None:
    text = _header_text()
    assert re.search(r"#\s*(?:if|ifdef|ifndef|elif)\b[^\n]*\bKPR_NP_SYN_FIRST\b", text)
    assert not re.search(r"#\s*(?:if|ifdef|ifndef|elif)\b[^\n]*\bKPR_NP_FE_TOUCH\b", text)
