"""kpr.node.missing_devices: configured devices the host lacks."""

from __future__ import annotations

import socket

from kpr.node import missing_devices


def test_missing_devices_names_only_the_absent_ones() -> None:
    present = socket.if_nameindex()[0][1]
    assert missing_devices((present,)) == []
    assert missing_devices((present, "kprnosuch0", "bad\x00name", "x" * 40)) == ["kprnosuch0", "bad\x00name", "x" * 40]
    assert missing_devices(()) == []
