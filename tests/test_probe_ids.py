"""kpr.bpf.probes.HELPER_IDS against the uapi header's list of helpers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kpr.bpf import probes

HEADER = Path("/usr/include/linux/bpf.h")


def test_helper_ids_are_the_uapi_enum() -> None:
    if not HEADER.is_file():
        pytest.skip(f"{HEADER} is not installed")
    text = HEADER.read_text()
    found = re.search(r"#define _{2,3}BPF_FUNC_MAPPER", text)
    assert found, f"no helper list in {HEADER}"
    mapper = text[found.start() :]
    # FN(name) in enum order (FN(name, id, ...) in 6.1+ headers gives the id itself).
    ids: dict[str, int] = {}
    for i, m in enumerate(re.finditer(r"FN\((\w+)(?:,\s*(\d+))?", mapper)):
        ids.setdefault(m.group(1), int(m.group(2)) if m.group(2) else i)
    assert ids["unspec"] == 0
    for helper, hid in probes.HELPER_IDS.items():
        assert ids.get(helper) == hid, helper
