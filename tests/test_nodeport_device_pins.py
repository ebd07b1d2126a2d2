"""Device names as bpffs path components: bpffs refuses a dot (flannel.1, eth0.100)."""

from __future__ import annotations

import pytest
from kpr.bpf.links import device_pin_name


@pytest.mark.parametrize(("ifname", "want"), [
    ("eth0", "eth0"),  # unchanged: pins of earlier runs stay where they were
    ("flannel.1", "flannel%2E1"),
    ("eth0.100", "eth0%2E100"),
    ("a%2E", "a%252E"),  # an escaped-looking name stays distinct from "a."
    ("a.", "a%2E"),
])
def test_device_pin_name(ifname: str, want: str) -> None:
    assert device_pin_name(ifname) == want
    assert "." not in device_pin_name(ifname)
