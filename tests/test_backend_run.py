"""kpr.bpf.maps.backend_run: kpr_backend's backends as one run of ids, which adoption reads as
one slice (kpr.servicemaps.reconcile), or None when any id between is not a backend."""

from __future__ import annotations

import pytest

from kpr.bpf import maps as M


class _Array:
    type = M.BPF_MAP_TYPE_ARRAY
    value_size = M.BACKEND.size


def _values(ids: list[int], n: int = 16) -> bytes:
    raw = bytearray(n * M.BACKEND.size)
    for i in ids:
        raw[i * M.BACKEND.size + M.Backend.proto.offset] = 6  # (a zero protocol: no backend)
    return bytes(raw)


@pytest.mark.parametrize(
    "ids, run",
    [([1, 2, 3], range(1, 4)), (list(range(1, 16)), range(1, 16)), ([3, 4, 5], range(3, 6)), ([15], range(15, 16)),
     ([], None), ([2, 4], None), ([1, 2, 3, 15], None)],
)
def test_a_run_of_backends_and_only_that(ids: list[int], run: range | None) -> None:
    assert M.backend_run(_Array(), _values(ids)) == run
    if run is not None:
        assert [i for i, _ in M.backend_items(_Array(), _values(ids))] == list(run)


def test_no_run_without_the_values_read() -> None:
    assert M.backend_run(_Array(), None) is None
