/* A prototype frontend table (issue 14, item 6), for benchmarks/bench_nodeport_scale.py
 * --fe-table and tests/kernel/test_nodeport_fe_bench.py only: no writer fills it, no program of
 * the agent's is built with it. kpr.testing.fe_table pastes this header before a plugin's entry
 * file (a build of its own), where it replaces lib/lb.h's kpr_lb_svc_get (KPR_LB_SVC_GET_OWN).
 *
 * kpr_svc is a kernel hash: a lookup reads the bucket, then the element (hash and key, then the
 * value: one or two lines at its 96-byte stride), two dependent misses or three for a frontend
 * out of cache. This table is an array of one-line entries (key and value together) the program
 * indexes by its own hash of the key, with linear probing: one line for a frontend out of
 * cache. The benchmark copies kpr_svc into it (kpr.testing.fe_table.fill_fe_table). */
// (the guard named as lib/*.h guards are: kpr.bpf.abi reads this header beside them)
#ifndef KPR_LIB_TESTING_FE_TABLE_H
#define KPR_LIB_TESTING_FE_TABLE_H

#include "lib/maps.h"

#ifndef KPR_FE_BENCH_MAX
#define KPR_FE_BENCH_MAX 262144 // a power of two
#endif
#ifndef KPR_FE_BENCH_PROBES
#define KPR_FE_BENCH_PROBES 8 // lines tried from the key's hash on
#endif
struct kpr_fe_line {
	struct kpr_svc_key key; // port 0: an empty line
	struct kpr_svc_val val;
	__u8 pad[20]; // zero: a line of its own (the array's values are 64-byte aligned: page-aligned, 64 apart)
};
_Static_assert(sizeof(struct kpr_fe_line) == 64, "kpr_fe_line layout");

BPF_TABLE_PINNED("array", __u32, struct kpr_fe_line, kpr_fe_bench, KPR_FE_BENCH_MAX, KPR_PIN(kpr_fe_bench),
		 BPF_F_MMAPABLE);

// The key's six words mixed (murmur3's finaliser at the end); kpr.testing.fe_table hashes the same way.
static __always_inline __u32 kpr_fe_hash(const struct kpr_svc_key *k)
{
	const __u32 *w = (const __u32 *)k;
	__u32 h = 0;

#pragma unroll
	for (int i = 0; i < 6; i++)
		h = (h ^ w[i]) * 0x9E3779B1U;
	h ^= h >> 16;
	h *= 0x85EBCA6BU;
	h ^= h >> 13;
	h *= 0xC2B2AE35U;
	h ^= h >> 16;
	return h;
}

// lib/lb.h's service-entry lookup, from this table only (a miss is no service).
#define KPR_LB_SVC_GET_OWN 1
static __always_inline struct kpr_svc_val *kpr_lb_svc_get(struct kpr_svc_key *k)
{
	const __u64 *a = (const __u64 *)k, *b;
	__u32 h = kpr_fe_hash(k), i, idx;
	struct kpr_fe_line *l;

#pragma unroll
	for (i = 0; i < KPR_FE_BENCH_PROBES; i++) {
		idx = (h + i) & (KPR_FE_BENCH_MAX - 1);
		l = kpr_fe_bench.lookup(&idx);
		if (!l || !l->key.port)
			return (void *)0;
		b = (const __u64 *)&l->key;
		if (a[0] == b[0] && a[1] == b[1] && a[2] == b[2])
			return &l->val;
	}
	return (void *)0;
}

#endif /* KPR_LIB_TESTING_FE_TABLE_H */
