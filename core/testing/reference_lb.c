/* A reference load balancer of Katran's shape, for issue 14's benchmark (benchmarks/bench_xdp_nodeport.py,
 * kpr.testing.reference_lb): kpr's own code, written from Katran's published design
 * (facebookincubator/katran, balancer_kern.c), not Katran. It measures what Katran's fast path costs
 * on this machine in the same run as kpr's XDP program, so "at or below Katran's cost" can be judged
 * without Katran's figures from another machine and day.
 *
 * Per packet, as Katran: the total counter (packets, bytes) at entry; for IPv4 TCP/UDP: parse
 * Ethernet, IPv4 (options or a fragment: dropped), the ports; the VIP by (address, port, protocol),
 * else by (address, port 0), else XDP_PASS; the frame's size (over 1514 bytes: dropped); this CPU's
 * connection table (bpf_get_smp_processor_id, its LRU hash from an array of maps; a shared fallback
 * LRU when the CPU has none) by the 5-tuple, except for a TCP SYN (Katran does not look a SYN up); on a
 * miss the new-connection rate (a clock read), the Maglev ring of the VIP (jhash of source and ports
 * mod the ring size), the real (index 0: no real, dropped), one LRU insert, the VIP-miss statistics
 * entry's lookup and compare; the counters (LRU totals and misses, SYN / non-SYN misses, per VIP and
 * per real packets and bytes, per-CPU); IPIP encapsulation (bpf_xdp_adjust_head, an outer IPv4 header
 * with its checksum, the gateway's MAC from a control array) and XDP_TX; at exit the verdict's counter
 * (XDP_TX, XDP_DROP, XDP_PASS).
 *
 * Not here (so a little cheaper than Katran where it matters): IPv6, ICMP handling, QUIC and TCP
 * server-id routing, LPM source routing, decapsulation, healthcheck encapsulation, the global LRU,
 * UDP flow migration, the encapsulation-failure counters; VIP flags are not read (Katran tests a few
 * bits of the VIP's entry it has already loaded). */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include "lib/common.h"

#ifndef REF_RING
#define REF_RING 65537 // Maglev ring slots per VIP (Katran's default)
#endif
#ifndef REF_VIPS
#define REF_VIPS 512 // VIPs (Katran's default MAX_VIPS)
#endif
#ifndef REF_REALS
#define REF_REALS 4096 // reals (Katran's default MAX_REALS)
#endif
#ifndef REF_LRU
#define REF_LRU 131072 // connection table entries, each CPU's and the fallback's: kpr_ct's default size
#endif
#define REF_MAX_CPUS 128 // the array of per-CPU LRU maps (Katran's MAX_SUPPORTED_CPUS)
#ifndef REF_MAX_CONN_RATE
/* new connections per second before LRU inserts stop (Katran's flood guard): out of reach here, so every
 * benchmarked new flow pays its insert as a real node's flows do below the guard */
#define REF_MAX_CONN_RATE 0xffffffffULL
#endif
#define REF_HASH_SEED 0x2a1b3c4d
#define REF_MAX_PKT 1514
#define REF_UDP_TIMEOUT 30000000000ULL // ns a UDP flow keeps its LRU entry (Katran checks UDP flows' age)
#define REF_IPIP_SRC_PREFIX 0x000010ac // 172.16.0.0, network order: the outer source's fixed half

// counters after the per-VIP ones in ref_stats
#define REF_LRU_CNTRS 0     // v1: packets to a VIP, v2: LRU misses
#define REF_MISS_CNTRS 1    // v1: TCP SYN misses (new flows), v2: non-SYN TCP misses
#define REF_CONN_RATE 2     // v1: new connections in the current second, v2: when it started
#define REF_FALLBACK_LRU 3  // v1: packets that found no LRU map for their CPU
#define REF_XDP_TOTAL 4     // every packet at entry: v1 packets, v2 bytes
#define REF_XDP_TX 5        // at exit, by verdict: v1 packets, v2 bytes
#define REF_XDP_DROP 6
#define REF_XDP_PASS 7
#define REF_CNTRS 8

#define REF_F_SYN 1

struct ref_flow { // the connection table's key; addresses sized for IPv6 as Katran's
	union { __be32 src; __be32 srcv6[4]; };
	union { __be32 dst; __be32 dstv6[4]; };
	union { __u32 ports; __be16 port16[2]; };
	__u8 proto;
	__u8 pad[3];
};

struct ref_vip_key {
	union { __be32 vip; __be32 vipv6[4]; };
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct ref_vip_meta {
	__u32 flags;
	__u32 vip_num; // index of the VIP's ring and counters
};

struct ref_real {
	union { __be32 dst; __be32 dstv6[4]; };
	__u8 flags;
	__u8 pad[3];
};

struct ref_lru_val {
	__u32 pos; // the real's index
	__u32 pad;
	__u64 atime; // UDP flows: last seen
};

struct ref_ctl {
	__u8 mac[6]; // the default gateway's MAC (Katran's ctl_array entry 0)
	__u8 pad[2];
};

struct ref_stat {
	__u64 v1;
	__u64 v2;
};

BPF_HASH(ref_vips, struct ref_vip_key, struct ref_vip_meta, REF_VIPS);
// Katran's connection tables: one LRU hash per CPU (created and put in by kpr.testing.reference_lb,
// plain LRU hashes as Katran's, flags 0), found through an array of maps; the fallback one is the
// inner maps' template too
BPF_TABLE("lru_hash", struct ref_flow, struct ref_lru_val, ref_lru, REF_LRU);
BPF_ARRAY_OF_MAPS(ref_lru_mapping, "ref_lru", REF_MAX_CPUS);
BPF_ARRAY(ref_vip_miss_stats, struct ref_vip_key, 1); // the one VIP whose misses are counted per real
BPF_ARRAY(ref_lru_miss_stats, u32, REF_REALS);
BPF_F_TABLE("array", u32, u32, ref_ring, REF_VIPS * REF_RING, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct ref_real, ref_reals, REF_REALS, BPF_F_MMAPABLE);
BPF_ARRAY(ref_ctl, struct ref_ctl, 16);
BPF_PERCPU_ARRAY(ref_stats, struct ref_stat, REF_VIPS + REF_CNTRS);
BPF_PERCPU_ARRAY(ref_real_stats, struct ref_stat, REF_REALS);

struct ref_pkt {
	struct ref_flow flow;
	__u32 real_index;
	__u8 flags;
	__u8 tos;
};

static __always_inline __u32 ref_hash(const struct ref_flow *f) // jhash_2words(source, ports, seed)
{
	__u32 a = f->src + 0xdeadbeef, b = f->ports + 0xdeadbeef, c = REF_HASH_SEED;

	kpr_jhash_final(a, b, c);
	return c;
}

static __always_inline struct ref_stat *ref_stat(__u32 key)
{
	return ref_stats.lookup(&key);
}

// this CPU's connection table (lru: from ref_lru_mapping), or the fallback one
static __always_inline struct ref_lru_val *ref_lru_get(void *lru, struct ref_flow *f)
{
	if (lru)
		return bpf_map_lookup_elem(lru, f);
	return ref_lru.lookup(f);
}

static __always_inline void ref_lru_put(void *lru, struct ref_flow *f, struct ref_lru_val *v)
{
	if (lru)
		bpf_map_update_elem(lru, f, v, BPF_ANY);
	else
		ref_lru.update(f, v);
}

// Katran's flood guard: a clock read and a counter per new connection
static __always_inline int ref_under_flood(__u64 *now)
{
	struct ref_stat *rate = ref_stat(REF_VIPS + REF_CONN_RATE);

	if (!rate)
		return 1;
	*now = bpf_ktime_get_ns();
	if (*now - rate->v2 > 1000000000ULL) {
		rate->v1 = 1;
		rate->v2 = *now;
		return 0;
	}
	rate->v1 += 1;
	return rate->v1 > REF_MAX_CONN_RATE;
}

// a new connection's real: the VIP's Maglev ring slot, the real, the LRU entry
static __always_inline struct ref_real *ref_pick(struct ref_pkt *p, const struct ref_vip_meta *vip, void *lru)
{
	struct ref_lru_val val = {};
	__u64 now = 0;
	int flood = ref_under_flood(&now);
	__u32 key = REF_RING * vip->vip_num + ref_hash(&p->flow) % REF_RING, *pos;
	struct ref_real *real;

	pos = ref_ring.lookup(&key);
	if (!pos)
		return 0;
	key = *pos;
	if (!key)
		return 0; // reals are numbered from 1, as Katran's: 0 is an unfilled ring
	p->real_index = key;
	real = ref_reals.lookup(&key);
	if (!real)
		return 0;
	if (!flood) {
		if (p->flow.proto == IPPROTO_UDP)
			val.atime = now;
		val.pos = key;
		ref_lru_put(lru, &p->flow, &val);
	}
	return real;
}

// an established connection's real, from its LRU entry
static __always_inline struct ref_real *ref_known(struct ref_pkt *p, void *lru)
{
	struct ref_lru_val *v = ref_lru_get(lru, &p->flow);
	__u32 key;

	if (!v)
		return 0;
	if (p->flow.proto == IPPROTO_UDP) {
		__u64 now = bpf_ktime_get_ns();

		if (now - v->atime > REF_UDP_TIMEOUT)
			return 0;
		v->atime = now;
	}
	key = v->pos;
	p->real_index = key;
	return ref_reals.lookup(&key);
}

// the outer header's checksum over its ten 16-bit words
static __always_inline __u16 ref_ip_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

// IPIP: a new Ethernet and outer IPv4 header in front of the packet as it came
static __always_inline int ref_encap(struct xdp_md *ctx, const struct ref_ctl *gw, const struct ref_pkt *p,
				     const struct ref_real *real, __u16 pkt_bytes)
{
	struct ethhdr *eth, *old;
	struct iphdr *ip;
	void *data, *end;

	if (bpf_xdp_adjust_head(ctx, 0 - (int)sizeof(struct iphdr)))
		return 0;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = data + sizeof(struct ethhdr);
	old = data + sizeof(struct iphdr);
	if ((void *)(eth + 1) > end || (void *)(old + 1) > end || (void *)(ip + 1) > end)
		return 0;
	__builtin_memcpy(eth->h_dest, gw->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, old->h_dest, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = p->tos;
	ip->tot_len = bpf_htons(pkt_bytes + sizeof(struct iphdr));
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = 64;
	ip->protocol = IPPROTO_IPIP;
	// the outer source varies with the flow (the real's receive queues spread the flows): 172.16.x.y
	ip->saddr = (((__u32)bpf_htons(p->flow.port16[0]) << 16) ^ p->flow.src) & 0xffff0000 | REF_IPIP_SRC_PREFIX;
	ip->daddr = real->dst;
	ip->check = 0;
	ip->check = ref_ip_csum(ip);
	return 1;
}

// Katran's per-VIP miss statistics: the watched VIP's entry read and compared on every miss
static __always_inline int ref_vip_miss(const struct ref_vip_key *vk, const struct ref_pkt *p)
{
	__u32 zero = 0, key = p->real_index, *n;
	struct ref_vip_key *watched = ref_vip_miss_stats.lookup(&zero);

	if (!watched)
		return -1;
	if (watched->vip == vk->vip && watched->port == vk->port && watched->proto == vk->proto) {
		n = ref_lru_miss_stats.lookup(&key);
		if (!n)
			return -1;
		*n += 1;
	}
	return 0;
}

static __always_inline int ref_process(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct ref_pkt p = {};
	struct ref_vip_key vk = {};
	struct ref_vip_meta *vip;
	struct ref_real *real = 0;
	struct ref_stat *st;
	struct ref_ctl *gw;
	__u32 key = 0, cpu;
	__u16 pkt_bytes;
	void *lru;

	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS; // IPv6 and the rest: to the stack (Katran balances IPv6 too)
	if ((void *)(ip + 1) > end)
		return XDP_DROP;
	if (ip->ihl != 5)
		return XDP_DROP; // options: Katran drops them
	if (ip->frag_off & bpf_htons(0x3fff))
		return XDP_DROP; // fragments: Katran drops them
	p.tos = ip->tos;
	p.flow.proto = ip->protocol;
	p.flow.src = ip->saddr;
	p.flow.dst = ip->daddr;
	pkt_bytes = bpf_ntohs(ip->tot_len);
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(ip + 1);

		if ((void *)(th + 1) > end)
			return XDP_DROP;
		if (th->syn)
			p.flags |= REF_F_SYN;
		p.flow.port16[0] = th->source;
		p.flow.port16[1] = th->dest;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = (void *)(ip + 1);

		if ((void *)(uh + 1) > end)
			return XDP_DROP;
		p.flow.port16[0] = uh->source;
		p.flow.port16[1] = uh->dest;
	} else {
		return XDP_PASS;
	}

	vk.vip = p.flow.dst;
	vk.port = p.flow.port16[1];
	vk.proto = p.flow.proto;
	vip = ref_vips.lookup(&vk);
	if (!vip) {
		vk.port = 0; // a VIP of every port
		vip = ref_vips.lookup(&vk);
		if (!vip)
			return XDP_PASS;
		p.flow.port16[1] = 0;
	}
	if (end - data > REF_MAX_PKT)
		return XDP_DROP;

	st = ref_stat(REF_VIPS + REF_LRU_CNTRS);
	if (!st)
		return XDP_DROP;
	st->v1 += 1;
	cpu = bpf_get_smp_processor_id();
	lru = ref_lru_mapping.lookup(&cpu);
	if (!lru) {
		struct ref_stat *fb = ref_stat(REF_VIPS + REF_FALLBACK_LRU);

		if (!fb)
			return XDP_DROP;
		fb->v1 += 1;
	}
	if (!(p.flags & REF_F_SYN))
		real = ref_known(&p, lru);
	if (!real) {
		if (p.flow.proto == IPPROTO_TCP) {
			struct ref_stat *miss = ref_stat(REF_VIPS + REF_MISS_CNTRS);

			if (!miss)
				return XDP_DROP;
			if (p.flags & REF_F_SYN)
				miss->v1 += 1;
			else
				miss->v2 += 1;
		}
		real = ref_pick(&p, vip, lru);
		if (!real)
			return XDP_DROP;
		if (ref_vip_miss(&vk, &p))
			return XDP_DROP;
		st->v2 += 1;
	}

	gw = ref_ctl.lookup(&key);
	if (!gw)
		return XDP_DROP;
	st = ref_stat(vip->vip_num);
	if (!st)
		return XDP_DROP;
	st->v1 += 1;
	st->v2 += pkt_bytes;
	st = ref_real_stats.lookup(&p.real_index);
	if (!st)
		return XDP_DROP;
	st->v1 += 1;
	st->v2 += pkt_bytes;
	if (!ref_encap(ctx, gw, &p, real, pkt_bytes))
		return XDP_DROP;
	return XDP_TX;
}

int ref_balancer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u64 bytes = end - data;
	struct ref_stat *st;
	__u32 key = REF_VIPS + REF_XDP_TOTAL;
	int action;

	if (data + sizeof(struct ethhdr) > end)
		return XDP_DROP;
	st = ref_stat(key);
	if (!st)
		return XDP_DROP;
	st->v1 += 1;
	st->v2 += bytes;
	action = ref_process(ctx);
	key = REF_VIPS + (action == XDP_TX ? REF_XDP_TX : action == XDP_PASS ? REF_XDP_PASS : REF_XDP_DROP);
	st = ref_stat(key);
	if (!st)
		return XDP_DROP;
	st->v1 += 1;
	st->v2 += bytes;
	return action;
}
