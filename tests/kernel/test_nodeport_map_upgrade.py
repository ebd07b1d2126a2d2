"""An upgrade onto maps pinned by a kpr before the two-insert SNAT layout (issue 14): kpr_ct
entries were 24 bytes (no SNAT address and port) and kpr_snat entries 32 (no frontend). The
new programs cannot read those entries, so the agent does not adopt the maps: the service map
writer refuses them with a message naming each map, its old and new value size, and
`kpr cleanup` (which ends the established flows: there is no in-place conversion)."""

from __future__ import annotations

import dataclasses

import pytest

from kpr.bpf import maps as M
from kpr.bpf.cleanup import scratch_pin_dir
from kpr.servicemaps import ServiceMapWriter

pytestmark = pytest.mark.kernel

OLD_VALUE_SIZES = {"kpr_ct": 24, "kpr_snat": 32}


@pytest.fixture
def kernel() -> None:
    from kpr.testing import kernel_skip_reason

    if reason := kernel_skip_reason():
        pytest.skip(reason)


@pytest.mark.parametrize("name", sorted(OLD_VALUE_SIZES))
def test_maps_of_the_four_insert_layout_are_refused_with_a_clear_message(kernel: None, name: str) -> None:
    old = OLD_VALUE_SIZES[name]
    assert M.SPECS[name].value_size != old, "the layout changed"
    with scratch_pin_dir("kpr-npupg") as pin:
        pin.mkdir(parents=True, exist_ok=True)
        with M.BpfMap.create(dataclasses.replace(M.SPECS[name], value_size=old)) as m:
            m.pin(pin / name)
        with pytest.raises(M.MapIncompatible) as err:
            ServiceMapWriter(pin).open()
        msg = str(err.value)
        assert f"{pin / name}" in msg and f"value_size {old} (want {M.SPECS[name].value_size})" in msg, msg
        assert "kpr cleanup" in msg
        # nothing else was left half made: with the old map gone, the writer opens
        (pin / name).unlink()
        ServiceMapWriter(pin).open().close()
