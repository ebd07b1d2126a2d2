"""An upgrade onto maps pinned by a kpr before the two-insert SNAT layout (issue 14): kpr_ct
entries were 24 bytes (no SNAT address and port) and kpr_snat entries 32 (no frontend). The
new programs read either kind (a zero SNAT port or frontend port: look where the old layout
kept it), so the service map writer carries such a map over into the new layout, every
entry zero-extended, under the same pin: established flows survive the upgrade. A pinned map
that differs in any other way is still refused with a message naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kpr.bpf import maps as M
from kpr.servicemaps import ServiceMapWriter
from kpr.testing.bpffs import pin_map

pytestmark = pytest.mark.kernel

OLD_VALUE_SIZES = {"kpr_ct": 24, "kpr_snat": 32}


@pytest.mark.parametrize("name", sorted(OLD_VALUE_SIZES))
def test_maps_of_the_four_insert_layout_are_carried_over_zero_extended(pin_dir: Path, name: str) -> None:
    pin, old = pin_dir, OLD_VALUE_SIZES[name]
    spec = M.SPECS[name]
    assert spec.value_size > old, "the layout grew"
    entries = {bytes([i]) * spec.key_size: bytes([i + 1]) * old for i in range(1, 40)}
    old_id = pin_map(pin, name, dataclasses.replace(spec, value_size=old), entries)
    with ServiceMapWriter(pin).open() as w:
        grown = w.maps[name]
        info = grown.info()
        assert (info.value_size, info.max_entries) == (spec.value_size, spec.max_entries)
        grown_id = grown.id
        assert grown_id != old_id
        pad = bytes(spec.value_size - old)
        assert dict(grown.items()) == {k: v + pad for k, v in entries.items()}
    # the pin names the new map: the next agent adopts it as it is
    with M.BpfMap.open_pinned(pin / name) as again:
        assert again.info().value_size == spec.value_size and again.id == grown_id
    with ServiceMapWriter(pin).open() as w:
        assert w.maps[name].id == grown_id
    assert not (pin / f"{name}_grown").exists()


def test_a_pinned_map_that_differs_otherwise_is_refused_with_a_clear_message(pin_dir: Path) -> None:
    pin, spec = pin_dir, M.SPECS["kpr_ct"]
    # an older value size, but a key of another size: nothing to carry over
    pin_map(pin, "kpr_ct", dataclasses.replace(spec, value_size=24, key_size=spec.key_size + 8))
    with pytest.raises(M.MapIncompatible) as err:
        ServiceMapWriter(pin).open()
    msg = str(err.value)
    assert f"{pin / 'kpr_ct'}" in msg and f"key_size {spec.key_size + 8} (want {spec.key_size})" in msg, msg
    assert "kpr cleanup" in msg
    # nothing else was left half made: with the old map gone, the writer opens
    (pin / "kpr_ct").unlink()
    ServiceMapWriter(pin).open().close()
