/* Slot tables: flow state in an array the program indexes by its own hash of the key (issue 14,
 * items 4 and 6), where an LRU hash insert would take an element off the LRU's lists and link it
 * into a bucket (two or three cache lines more, ~250-400 ns a new flow on XDP).
 *
 * A table is a BPF_TABLE_PINNED("array", __u32, struct <your slot>, name, N, ..., BPF_F_MMAPABLE)
 * with N a power of two; its slot struct is the user's, laid out as
 *
 *     struct my_slot {
 *             __u64 claim;       // KPR_SLOT_FREE (0): free; else the claim stamp (kpr_slots_stamp)
 *             struct my_key key; // a whole number of 64-bit words, no padding left undefined
 *             struct my_val val;
 *             __u8 pad[...];     // to KPR_SLOT_SIZE (two cache lines): kpr_slots_size_ok()
 *     };
 *
 * and kpr.bpf.slots (Python) is its one reader and clearer. The rules every user keeps:
 *
 *  - A program writes only a slot it claimed itself: kpr_slots_claim() turns word 0 from 0 to a
 *    stamp by compare-and-swap, so of two CPUs claiming one slot exactly one wins. It then fills
 *    value and key (kpr_slots_fill_key last, after a compiler barrier: a reader on another CPU that
 *    matches the key reads a whole value on x86's TSO; the users' replies come after the packet that
 *    filled the slot anyway). A claim it cannot use it gives back at once (kpr_slots_release).
 *  - A held slot is never taken over by a program (no eviction, no reuse of an expired one in place):
 *    when every probe is held the caller falls back to its LRU map (and counts it). So nothing is lost
 *    while the collector is not running or the table is full.
 *  - Only the collector frees a held slot (kpr.bpf.slots.SlotTable.free: value and key zeroed, then
 *    word 0 last), once the slot's flow is gone and its stamp is older than a grace period (a slot
 *    being filled, or whose flow's other maps are still being written, is young). Programs claim only
 *    free slots, so the collector's clear of a slot it read as dead cannot race a claim.
 *
 * The key's hash and compare are straight code (unrolled, no branch: each costs the verifier one
 * walk per path). Probes and retries are the user's bounded loops, kept loops (#pragma nounroll:
 * bcc cannot build BPF-to-BPF calls, and bpf_loop needs one); what a probe loop carries from one
 * probe to the next must be plain numbers (a slot index, a flag), not a map value pointer that is
 * NULL on one path and not on another: the verifier cannot prune paths that differ so, and a loop
 * of loops then walks past its million instructions (E2BIG; bcc says "Program too large"). bcc rewrites
 * map calls in the program's text (not in macros pasted from elsewhere), so the probe loop itself
 * is the user's: for i < probes, idx = kpr_slots_index(h, i, N - 1), s = table.lookup(&idx), ...
 * (lib/nat.h kpr_snat_slot_probe and kpr_snat_alloc are the example). Context-free.
 */
#ifndef KPR_LIB_SLOTS_H
#define KPR_LIB_SLOTS_H

#include "lib/common.h"

#define KPR_SLOT_FREE 0   // word 0 of a free slot
#define KPR_SLOT_SIZE 128 // bytes of a slot: two cache lines (claim word, key and the value's start in the first)

// Whether the slot struct `type` is KPR_SLOT_SIZE bytes (for the user's _Static_assert).
#define kpr_slots_size_ok(type) (sizeof(type) == KPR_SLOT_SIZE)

/* The hash of a key of `dwords` 64-bit words (a compile-time constant; the key 8-aligned): FNV-1a's
 * 64-bit constants over the words, each product's high half folded into its low half before the
 * next word, then lowbias32's finaliser on the low half. The fold is what lets a word's high bits
 * reach the index: a multiply carries bits upward only, so keys that differ only in high bits
 * (an IPv4 address's last octet, a port in network order) would differ only in the high bits of
 * the sum, and keys differing in two such fields (a reply key's backend and SNAT port) fell on a
 * few thousand values, whatever the finaliser did (the old 32-bit sum without the fold: 100
 * backends' reply keys over every even SNAT port on 4568 slots of 262144, README issue 14,
 * eighteenth round). 64-bit words: the fold costs no more instructions than the old sum did.
 * kpr.bpf.slots.slot_hash is the same function. */
static __always_inline __u32 kpr_slots_hash(const void *key, const int dwords)
{
	const __u64 *w = (const __u64 *)key;
	__u64 h = 0xCBF29CE484222325ULL;
	__u32 x;

#pragma unroll
	for (int i = 0; i < dwords; i++) {
		h = (h ^ w[i]) * 0x100000001B3ULL;
		h ^= h >> 32;
	}
	x = (__u32)h; // lowbias32's finaliser on the low half
	x ^= x >> 16;
	x *= 0x7FEB352DU;
	x ^= x >> 15;
	x *= 0x846CA68BU;
	return x ^ (x >> 16);
}

// The slot index of probe `i` for hash `h` in a table of mask + 1 slots (linear probing).
static __always_inline __u32 kpr_slots_index(__u32 h, __u32 i, __u32 mask)
{
	return (h + i) & mask;
}

// Whether two keys of `dwords` 64-bit words are equal (both 8-aligned).
static __always_inline int kpr_slots_key_eq(const void *a, const void *b, const int dwords)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	__u64 diff = 0;

#pragma unroll
	for (int i = 0; i < dwords; i++)
		diff |= x[i] ^ y[i];
	return diff == 0;
}

// Whether a key of `dwords` 64-bit words is all zero (a claimed slot whose key is not written yet).
static __always_inline int kpr_slots_key_zero(const void *a, const int dwords)
{
	const __u64 *x = (const __u64 *)a;
	__u64 any = 0;

#pragma unroll
	for (int i = 0; i < dwords; i++)
		any |= x[i];
	return any == 0;
}

/* A non-zero claim stamp from `now` (ns): what the collector's grace period reads. (now is never
 * 0 after boot; the low bit keeps a stamp of 0 impossible.) */
static __always_inline __u64 kpr_slots_stamp(__u64 now)
{
	return now | 1;
}

/* Claim a slot: 1 when word 0 went from free to `stamp` by this CPU's compare-and-swap, 0 when it
 * was held (by a flow, or by another CPU that won the same slot a moment earlier). A plain read
 * first: a held slot (the common refusal) costs no locked instruction. */
static __always_inline int kpr_slots_claim(__u64 *word, __u64 stamp)
{
	if (*(volatile __u64 *)word != KPR_SLOT_FREE)
		return 0;
	return __sync_val_compare_and_swap(word, KPR_SLOT_FREE, stamp) == KPR_SLOT_FREE;
}

/* Write the key of a claimed slot after its value: a reader matching the key then finds the value
 * written (the barrier keeps the compiler from sinking the value's stores below the key's). */
static __always_inline void kpr_slots_fill_key(void *dst, const void *key, const int dwords)
{
	__u64 *d = (__u64 *)dst;
	const __u64 *k = (const __u64 *)key;

	asm volatile("" ::: "memory");
#pragma unroll
	for (int i = 0; i < dwords; i++)
		d[i] = k[i];
}

/* Give back a slot this program claimed and cannot use (its key not written yet, or zeroed
 * first): word 0 back to free. Never on a slot another flow holds: only the collector frees those. */
static __always_inline void kpr_slots_release(__u64 *word)
{
	asm volatile("" ::: "memory");
	*(volatile __u64 *)word = KPR_SLOT_FREE;
}

#endif /* KPR_LIB_SLOTS_H */
