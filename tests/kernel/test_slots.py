"""lib/slots.h's primitives in the kernel (BPF_PROG_TEST_RUN on a tiny program over a table of
its own) and kpr.bpf.slots reading and freeing the same table: a claim takes the first free
slot of the key's probes, a find reads it back, a held slot is refused (the next probe taken,
then none), a released claim and a slot the collector freed are free again."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kpr.bpf import abi
from kpr.bpf import maps as M
from kpr.bpf.inline import inline_includes
from kpr.bpf.loader import compile_and_load, load_prog
from kpr.bpf.slots import SlotTable, SlotTableError, slot_hash
from kpr.testing.prog_run import test_run

pytestmark = pytest.mark.kernel

SLOTS, PROBES = 8, 2

# The test table's slot: a 16-byte key, a 16-byte value (the header style kpr.bpf.abi reads).
SLOT_STRUCT = """
struct kpr_test_slot {
	__u64 claim;   // KPR_SLOT_FREE or the claim stamp
	__u64 key[2];  // the key
	__u64 val[2];  // the value
	__u8 pad[88];  // zero
};
"""

# op (first byte after a 14-byte header): 1 claim, 2 find, 3 hash, 4 claim and release.
# claim -> idx + 1, 0 when every probe is held, 0x100 | idx when the key holds a slot already;
# find -> idx + 1 or 0; hash -> kpr_slots_hash of the key.
PROGRAM = """
#include "lib/maps.h"
#include "lib/slots.h"
%s
_Static_assert(kpr_slots_size_ok(struct kpr_test_slot), "slot size");
BPF_TABLE_PINNED("array", __u32, struct kpr_test_slot, kpr_test_slots, %d, KPR_PIN(kpr_test_slots), BPF_F_MMAPABLE);

int slots_op(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct kpr_test_slot *s;
	__u64 key[2];
	__u32 op, h, i, idx;

	if (data + 32 > end)
		return 0xffff;
	op = *(__u8 *)(data + 14);
	__builtin_memcpy(key, data + 16, 16);
	h = kpr_slots_hash(key, 2);
	if (op == 3)
		return h;
#pragma nounroll
	for (i = 0; i < %d; i++) {
		idx = kpr_slots_index(h, i, %d - 1);
		s = kpr_test_slots.lookup(&idx);
		if (!s)
			return 0xfffe;
		if (op == 2) {
			if (s->claim != KPR_SLOT_FREE && kpr_slots_key_eq(s->key, key, 2))
				return idx + 1;
			continue;
		}
		if (s->claim != KPR_SLOT_FREE && kpr_slots_key_eq(s->key, key, 2))
			return 0x100 | idx;
		if (!kpr_slots_claim(&s->claim, kpr_slots_stamp(bpf_ktime_get_ns())))
			continue;
		if (op == 4) {
			kpr_slots_release(&s->claim);
			return idx + 1;
		}
		s->val[0] = key[0] + 1;
		s->val[1] = key[1] + 1;
		kpr_slots_fill_key(s->key, key, 2);
		return idx + 1;
	}
	return 0;
}
"""


def _run(fd: int, op: int, key: bytes) -> int:
    return test_run(fd, bytes(14) + bytes([op, 0]) + key + bytes(16)).retval


def _key(n: int) -> bytes:
    return struct.pack("=QQ", 0x1000 + n, n * 0x9E3779B97F4A7C15 & (2**64 - 1))


@pytest.fixture
def prog(pin_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    b = compile_and_load(inline_includes(PROGRAM % (SLOT_STRUCT, SLOTS, PROBES, SLOTS)), cflags=M.cflags(pin_dir))
    try:
        fd = load_prog(b, "slots_op", "XDP").fd
        # the test's slot struct read as kpr.bpf.abi reads the product's (one header of its own)
        (tmp_path / "test_slot.h").write_text(SLOT_STRUCT + "#define KPR_SLOT_SIZE 128\n")
        ct = abi.Abi(tmp_path).struct_of("kpr_test_slot")
        with SlotTable.open(pin_dir / "kpr_test_slots", ct) as table:
            yield fd, table
    finally:
        b.cleanup()


def test_claim_find_refuse_release_free(prog) -> None:  # type: ignore[no-untyped-def]
    fd, table = prog
    a = _key(1)
    home = slot_hash(a) & (SLOTS - 1)
    assert _run(fd, 3, a) == slot_hash(a), "C and Python hash the key alike"
    # two more keys whose probes start at the same slot
    same = [k for k in (_key(n) for n in range(2, 200)) if slot_hash(k) & (SLOTS - 1) == home][:2]
    b, c = same

    assert _run(fd, 2, a) == 0, "an empty table finds nothing"
    assert _run(fd, 1, a) == home + 1, "the first probe's free slot is claimed"
    stamp, key, val = table.read(home)
    assert stamp and stamp & 1 and key == a
    assert val == struct.pack("=QQ", *(x + 1 for x in struct.unpack("=QQ", a)))
    assert _run(fd, 2, a) == home + 1
    assert table.find(a, PROBES) == home
    assert _run(fd, 1, a) == 0x100 | home, "a key already holding a slot is not claimed twice"

    nxt = (home + 1) & (SLOTS - 1)
    assert _run(fd, 1, b) == nxt + 1, "a held slot is refused: the next probe is taken"
    assert _run(fd, 1, c) == 0, "every probe held: no claim"
    assert _run(fd, 2, c) == 0
    assert table.count() == 2
    assert [(i, k) for i, _, k, _ in table.held()] == sorted([(home, a), (nxt, b)])

    table.free(home)
    assert table.claim(home) == 0 and table.read(home)[1] == bytes(16)
    assert _run(fd, 2, a) == 0, "a freed slot is not found"
    assert _run(fd, 2, b) == nxt + 1, "a slot past a freed one is still found (the find probes on)"
    assert _run(fd, 4, c) == home + 1, "a released claim..."
    assert table.claim(home) == 0, "...leaves the slot free"
    assert _run(fd, 1, c) == home + 1, "the freed slot is claimed again"
    assert table.clear() == 2 and table.count() == 0


def test_a_map_that_is_not_a_slot_table_is_refused(require_kernel: None, tmp_path: Path) -> None:
    (tmp_path / "test_slot.h").write_text(SLOT_STRUCT + "#define KPR_SLOT_SIZE 128\n")
    ct = abi.Abi(tmp_path).struct_of("kpr_test_slot")
    spec = M.MapSpec("kpr_not_slots", M.BPF_MAP_TYPE_ARRAY, 4, 128, 8)  # not mmapable
    with M.BpfMap.create(spec) as m, pytest.raises(SlotTableError, match="not a slot table"):
        SlotTable(m, ct)


def test_a_column_after_the_value_belongs_to_the_index(prog) -> None:  # type: ignore[no-untyped-def]
    """A 64-bit field after the value (a home slot's gate words) is read and written for every
    slot at once, kept when its slot is freed or claimed; a field of the key or value, or an
    unaligned offset, is refused by name."""
    fd, table = prog
    col = 48  # a word of pad (bytes 40-127)
    table.set_column(col, [10 + i for i in range(SLOTS)])
    table.set_column(120, [7] * SLOTS)  # the slot's last word
    assert table.column(col) == [10 + i for i in range(SLOTS)] and table.column(120) == [7] * SLOTS
    a = _key(1)
    idx = _run(fd, 1, a) - 1
    assert table.column(col)[idx] == 10 + idx, "a program's claim leaves it"
    table.free(idx)
    assert table.claim(idx) == 0 and table.read(idx)[1:] == (bytes(16), bytes(16))
    assert table.column(col) == [10 + i for i in range(SLOTS)] and table.column(120) == [7] * SLOTS, "free kept it"
    for bad in (8, 32, 52, 128):  # key, value, unaligned, past the slot
        with pytest.raises(ValueError, match="not a 64-bit field after the value"):
            table.column(bad)
    with pytest.raises(ValueError, match="values for 8 slots"):
        table.set_column(col, [0] * (SLOTS - 1))
