"""kpr.netdevs without root: the C header's KPR_DEV_* match DevKind by name and value, and the
classification rules for each kind of link."""

from __future__ import annotations

import re
from pathlib import Path

import kpr
import pytest
from kpr.netdevs import ARPHRD_ETHER, DevKind, _kind_of

HEADER = Path(kpr.__file__).parent / "bpf" / "lib" / "devkind.h"
MAC = b"\x02\x00\x00\x00\x00\x01"


def _header_kinds() -> dict[str, int]:
    text = HEADER.read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define KPR_DEV_([A-Z0-9_]+)\s+(\d+)\b", text, re.M)}


def test_header_matches_enum() -> None:
    kinds = _header_kinds()
    assert kinds.pop("COUNT") == len(DevKind)  # array sizes in the data path
    assert kinds == {k.name: k.value for k in DevKind}


def test_header_parser_sees_a_mismatch(tmp_path: Path) -> None:
    # the check above must be able to fail: a renamed or renumbered define shows up
    kinds = _header_kinds()
    kinds["BRIDGE"] = 9
    assert kinds != {k.name: k.value for k in DevKind}


@pytest.mark.parametrize(
    ("link_kind", "arphrd", "mac", "nsid", "want"),
    [
        ("veth", ARPHRD_ETHER, MAC, 3, DevKind.VETH_PEER),
        ("veth", ARPHRD_ETHER, MAC, None, DevKind.VETH_LOCAL),
        ("netkit", ARPHRD_ETHER, MAC, 1, DevKind.NETKIT),
        ("bridge", ARPHRD_ETHER, MAC, None, DevKind.BRIDGE),
        ("vxlan", ARPHRD_ETHER, MAC, None, DevKind.OVERLAY),
        ("geneve", ARPHRD_ETHER, MAC, None, DevKind.OVERLAY),
        ("ipip", 768, None, None, DevKind.OVERLAY),
        ("wireguard", 0xFFFE, None, None, DevKind.OVERLAY),
        (None, ARPHRD_ETHER, MAC, None, DevKind.PHYSICAL),
        ("macvlan", ARPHRD_ETHER, MAC, None, DevKind.PHYSICAL),
        ("bond", ARPHRD_ETHER, MAC, None, DevKind.PHYSICAL),
        ("vlan", ARPHRD_ETHER, MAC, None, DevKind.PHYSICAL),
        (None, 772, None, None, DevKind.L3),  # loopback
        ("tun", 0xFFFE, None, None, DevKind.L3),
        (None, 32, None, None, DevKind.UNKNOWN),  # InfiniBand
    ],
)
def test_kind_rules(link_kind: str | None, arphrd: int, mac: bytes | None, nsid: int | None, want: DevKind) -> None:
    assert _kind_of(link_kind, arphrd, mac, nsid) is want
