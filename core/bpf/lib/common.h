/* kpr datapath library: types, byte order, clock and hashing shared by every header.
 *
 * Context-free: usable from tc, XDP and cgroup socket programs alike. Headers that touch
 * packets (parse.h, csum.h, nat.h) additionally need ctx/skb.h or ctx/xdp.h first.
 *
 * Every tunable is `#ifndef KPR_X / #define KPR_X default`; programs override with -D.
 */
#ifndef KPR_LIB_COMMON_H
#define KPR_LIB_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <linux/types.h>

/* --- tunables ---------------------------------------------------------------------- */

#ifndef KPR_CLOCK_FINE
#define KPR_CLOCK_FINE 0 // 1: bpf_ktime_get_ns for timestamps; 0: the coarse clock (cheaper, ~4 ms steps, plenty for timeouts)
#endif

/* --- byte order ---------------------------------------------------------------------- */

// Byte-swap usable in constant expressions (case labels, initialisers), unlike bpf_htons().
#define kpr_htons(x) ((__be16)__builtin_bswap16((__u16)(x)))
#define kpr_htonl(x) ((__be32)__builtin_bswap32((__u32)(x)))
#define kpr_ntohs(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define kpr_ntohl(x) ((__u32)__builtin_bswap32((__u32)(x)))

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define KPR_FAMILY_V4 4 // struct kpr_tuple.family for IPv4
#define KPR_FAMILY_V6 6 // struct kpr_tuple.family for IPv6

/* --- addresses ----------------------------------------------------------------------- */

// An IPv6 address, or an IPv4 address mapped into ::ffff:0:0/96, so one key layout serves both
// families (one service map instead of Cilium's v4/v6 pairs). No 64-bit member: keeps 4-byte alignment.
union kpr_addr {
	__u8 b[16];   // bytes in network order
	__be16 h[8];  // 16-bit words, network order
	__be32 w[4];  // 32-bit words; IPv4: w[0]=w[1]=0, w[2]=htonl(0xffff), w[3]=address
};

// True when the address is an IPv4-mapped one.
static __always_inline int kpr_addr_is_v4(const union kpr_addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == kpr_htonl(0x0000ffff);
}

// Store an IPv4 address (network order) as v4-mapped.
static __always_inline void kpr_addr_set_v4(union kpr_addr *a, __be32 v4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = kpr_htonl(0x0000ffff);
	a->w[3] = v4;
}

// Store an IPv6 address from a struct in6_addr-shaped buffer.
static __always_inline void kpr_addr_set_v6(union kpr_addr *a, const __be32 *v6)
{
	a->w[0] = v6[0];
	a->w[1] = v6[1];
	a->w[2] = v6[2];
	a->w[3] = v6[3];
}

// The wildcard of a family: ::ffff:0.0.0.0 for IPv4, :: for IPv6 (wildcard NodePort entries).
static __always_inline void kpr_addr_set_any(union kpr_addr *a, int family)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = family == KPR_FAMILY_V4 ? kpr_htonl(0x0000ffff) : 0;
	a->w[3] = 0;
}

static __always_inline int kpr_addr_eq(const union kpr_addr *a, const union kpr_addr *b)
{
	return ((a->w[0] ^ b->w[0]) | (a->w[1] ^ b->w[1]) | (a->w[2] ^ b->w[2]) | (a->w[3] ^ b->w[3])) == 0;
}

/* --- the flow tuple ------------------------------------------------------------------ */

// What service lookup, backend selection and conntrack key on: one packet's or socket's flow.
struct kpr_tuple {
	union kpr_addr saddr; // source (client) address
	union kpr_addr daddr; // destination (frontend before DNAT) address
	__be16 sport;         // source port; ICMP echo: the identifier
	__be16 dport;         // destination port; ICMP echo: 0
	__u8 proto;           // IPPROTO_TCP / UDP / SCTP / ICMP / ICMPV6
	__u8 family;          // KPR_FAMILY_V4 / KPR_FAMILY_V6
	__u8 tcp_flags;       // TCP flags byte of this packet (0 for other protocols)
	__u8 pad;             // zero
};

/* --- clock --------------------------------------------------------------------------- */

// Nanoseconds for timeouts (conntrack, affinity); every kpr header uses this one clock.
static __always_inline __u64 kpr_now(void)
{
#if KPR_CLOCK_FINE
	return bpf_ktime_get_ns();
#else
	return bpf_ktime_get_coarse_ns();
#endif
}

/* --- hashing ------------------------------------------------------------------------- */

// Bob Jenkins' lookup3 final mix (as the kernel's jhash), reimplemented to avoid kernel-internal headers.
#define kpr_rol32(w, s) (((w) << (s)) | ((w) >> (32 - (s))))
#define kpr_jhash_final(a, b, c)                                                          \
	do {                                                                              \
		c ^= b; c -= kpr_rol32(b, 14);                                            \
		a ^= c; a -= kpr_rol32(c, 11);                                            \
		b ^= a; b -= kpr_rol32(a, 25);                                            \
		c ^= b; c -= kpr_rol32(b, 16);                                            \
		a ^= c; a -= kpr_rol32(c, 4);                                             \
		b ^= a; b -= kpr_rol32(a, 14);                                            \
		c ^= b; c -= kpr_rol32(b, 24);                                            \
	} while (0)
#define kpr_jhash_mix(a, b, c)                                                            \
	do {                                                                              \
		a -= c; a ^= kpr_rol32(c, 4);  c += b;                                    \
		b -= a; b ^= kpr_rol32(a, 6);  a += c;                                    \
		c -= b; c ^= kpr_rol32(b, 8);  b += a;                                    \
		a -= c; a ^= kpr_rol32(c, 16); c += b;                                    \
		b -= a; b ^= kpr_rol32(a, 19); a += c;                                    \
		c -= b; c ^= kpr_rol32(b, 4);  b += a;                                    \
	} while (0)

#ifndef KPR_HASH_SEED
#define KPR_HASH_SEED 0x6b707231 // flow-hash seed; the same on every node so Maglev picks agree across nodes
#endif

// Hash of a flow's 5-tuple (Maglev slot, hash-based random selection): every node computes the same value.
static __always_inline __u32 kpr_tuple_hash(const struct kpr_tuple *t)
{
	__u32 a, b, c;

	a = b = c = 0xdeadbeef + 36 + KPR_HASH_SEED;
	a += t->saddr.w[0]; b += t->saddr.w[1]; c += t->saddr.w[2];
	kpr_jhash_mix(a, b, c);
	a += t->saddr.w[3]; b += t->daddr.w[0]; c += t->daddr.w[1];
	kpr_jhash_mix(a, b, c);
	a += t->daddr.w[2]; b += t->daddr.w[3];
	c += ((__u32)t->sport << 16) ^ (__u32)t->dport ^ ((__u32)t->proto << 8);
	kpr_jhash_final(a, b, c);
	return c;
}

#endif /* KPR_LIB_COMMON_H */
