"""BpfMap.items() over several lookup_batch calls: every entry once, with its own value, when
the values are large (batches bounded to about 1 MB of values) and when the buffer is small."""

from __future__ import annotations

import os

import pytest

from kpr.bpf import maps as M

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize(("value_size", "entries", "chunk"), [(1024, 2500, 8192), (8, 300, 16)])
def test_items_reads_every_entry_across_batches(value_size, entries, chunk):
    spec = M.MapSpec(f"h6it{os.getpid() % 10000}", M.BPF_MAP_TYPE_HASH, 4, value_size, entries + 10)
    with M.BpfMap.create(spec) as m:
        want = {M.U32.pack(i): (i.to_bytes(4, "little") * (value_size // 4)) for i in range(entries)}
        for k, v in want.items():
            m.update(k, v)
        got = m.items(chunk=chunk)
        assert len(got) == entries
        assert dict(got) == want
