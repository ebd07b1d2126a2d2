/* The service maps kpr's programs share, pinned under KPR_PIN_PATH.
 *
 * kpr.servicemaps.ServiceMapWriter is their one writer; programs only read them (and write
 * the affinity LRU). Maps are declared BPF_TABLE_PINNED: bcc opens the pin when it exists
 * (whatever its declared size) and creates and pins it otherwise, so a program loaded
 * before the writer ran still finds the same maps later. The Python mirror of every struct
 * is kpr.bpf.maps; tests/kernel/test_maps_layout.py checks that the two agree.
 *
 * Layout (after Cilium's lb maps, one map per kind for both families, addresses v4-mapped):
 *   kpr_svc       (addr, port, proto, scope, slot 0) -> the service entry: counts, flags and
 *                 slot_base, where its backend slots start in kpr_slots (one entry per frontend
 *                 and scope; the key keeps its slot field: an older kpr kept backend slots 1..
 *                 here, swept once every program reads kpr_slots)
 *   kpr_slots     index -> backend id and its state in that service (ARRAY; a frontend scope's
 *                 selectable backends at slot_base.., its terminating ones right after)
 *   kpr_backend   backend index (id & KPR_BACKEND_INDEX_MASK) -> address, port (shared by every service listing it: no state);
 *                 an array indexed by id, a zero entry (proto 0) = no backend
 *   kpr_revnat    rev-NAT index -> frontend address/port (what replies are rewritten to)
 *   kpr_affinity  (client, rev_nat) -> backend id, last use      (LRU, written by programs)
 *   kpr_maglev    (rev_nat, scope) -> inner array of KPR_MAGLEV_M backend ids (hash of maps)
 *   kpr_srcrange  LPM (rev_nat, prefix) -> allowed (loadBalancerSourceRanges)
 *   kpr_fe        a copy of kpr_svc's entries in one-line slots the programs index by their own
 *                 hash of the key (lib/lb.h kpr_lb_svc_get): a frontend out of cache costs one
 *                 miss there, where kpr_svc's bucket and element cost two or three (issue 14);
 *                 the line also holds its first slots' backend ids (no kpr_slots miss for them).
 *                 kpr_svc stays the truth: a key not found here is looked up there.
 */
#ifndef KPR_LIB_MAPS_H
#define KPR_LIB_MAPS_H

#include "lib/common.h"

/* --- tunables: kpr.bpf.maps.SPECS is their one definition and cflags() passes its values;
 * these fallbacks repeat them (tests/test_map_defaults.py checks that they agree) ---------- */

#ifndef KPR_PIN_PATH
#define KPR_PIN_PATH "/sys/fs/bpf/kpr" // bpffs directory the maps are pinned in (config bpf.pinPath)
#endif
#ifndef KPR_SVC_MAX
#define KPR_SVC_MAX 262144 // service map entries: one per frontend and scope
#endif
#ifndef KPR_SLOTS_MAX
#define KPR_SLOTS_MAX 524288 // backend slots (kpr_slots), frontends' ranges rounded up to a size class; index 0 unused
#endif
#ifndef KPR_BACKEND_MAX
#define KPR_BACKEND_MAX 131072 // distinct backends (address, port, protocol) across all services
#endif
#ifndef KPR_REVNAT_MAX
#define KPR_REVNAT_MAX 65536 // frontends (rev-NAT indexes), wildcard NodePort entries included
#endif
#ifndef KPR_AFFINITY_MAX
#define KPR_AFFINITY_MAX 65536 // remembered (client, service) pairs for sessionAffinity; LRU evicts the rest
#endif
#ifndef KPR_MAGLEV_MAX
#define KPR_MAGLEV_MAX 32768 // Maglev tables (frontend scopes using Maglev)
#endif
#ifndef KPR_MAGLEV_M
#define KPR_MAGLEV_M 16381 // Maglev table size: prime, >= 100 x backends for <1% imbalance (Cilium's default)
#endif
#ifndef KPR_SRCRANGE_MAX
#define KPR_SRCRANGE_MAX 16384 // loadBalancerSourceRanges CIDRs across all frontends
#endif

#define KPR_PIN(name) KPR_PIN_PATH "/" #name // pin path of a map named `name`

/* --- constants ----------------------------------------------------------------------- */

#define KPR_SCOPE_EXTERNAL 0 // backends for traffic from outside the node (externalTrafficPolicy)
#define KPR_SCOPE_INTERNAL 1 // backends for traffic from inside the cluster, when they differ

// Service entry flags (struct kpr_svc_val.flags, slot 0).
#define KPR_SVC_F_CLUSTER_IP (1U << 0)    // frontend type ClusterIP
#define KPR_SVC_F_NODE_PORT (1U << 1)     // frontend type NodePort (node address, or the wildcard)
#define KPR_SVC_F_EXTERNAL_IP (1U << 2)   // frontend type ExternalIP
#define KPR_SVC_F_LOAD_BALANCER (1U << 3) // frontend type LoadBalancer ingress address
#define KPR_SVC_F_HOST_PORT (1U << 4)     // frontend type HostPort
#define KPR_SVC_F_AFFINITY (1U << 5)      // sessionAffinity ClientIP: consult kpr_affinity first
#define KPR_SVC_F_SOURCE_RANGES (1U << 6) // loadBalancerSourceRanges: clients must match kpr_srcrange
#define KPR_SVC_F_LOCAL_SCOPE (1U << 7)   // this entry's backends are node-local only (traffic policy Local)
#define KPR_SVC_F_TWO_SCOPES (1U << 8)    // an internal-scope entry exists: in-cluster callers look it up
#define KPR_SVC_F_MAGLEV (1U << 9)        // select with the Maglev table, not at random
#define KPR_SVC_F_WILDCARD (1U << 10)     // the address-0 NodePort entry, matched for any node address

/* Backend states, per service: kpr_slot.flags. One pod port can be ready
 * in one Service and terminating in another, so the state lives in each service's slots, never
 * in the shared kpr_backend entry. Programs decide by the slot's position (1..count selectable,
 * affinity included; after count only existing flows); the state says why, for read-back: a
 * terminating backend in 1..count is a KEP-1669 fallback (no ready backend in that scope). */
#define KPR_BACKEND_ACTIVE 0      // ready: new connections may pick it
#define KPR_BACKEND_TERMINATING 1 // serving but terminating: only existing flows (KEP-1669 fallback aside)

#define KPR_BACKEND_F_LOCAL (1U << 0) // the backend runs on this node

/* --- structs ------------------------------------------------------------------------- */

// kpr_svc key: one frontend in one scope; slot is always 0 (1.. were backend slots before kpr_slots).
struct kpr_svc_key {
	union kpr_addr addr; // frontend address; ::ffff:0.0.0.0 / :: for the wildcard NodePort entry
	__be16 port;         // frontend port, network order
	__u8 proto;          // IPPROTO_TCP / UDP / SCTP
	__u8 scope;          // KPR_SCOPE_EXTERNAL / KPR_SCOPE_INTERNAL
	__u16 slot;          // 0 (an older kpr's backend slots 1.. are ignored, then swept)
	__u16 pad;           // zero: no compiler padding may hide in a hash key
};

// kpr_svc value: the service entry of one frontend scope.
struct kpr_svc_val {
	__u32 slot_base;        // kpr_slots index of slot 1 (slot i at slot_base + i - 1); 0: no slots
	__u16 count;            // selectable backends (slots 1..count); 0 = no backend, reject
	__u16 terminating;      // terminating backends in slots count+1..count+terminating
	__u32 rev_nat;          // the frontend's rev-NAT index
	__u32 flags;            // KPR_SVC_F_*
	__u32 affinity_timeout; // sessionAffinity timeout in seconds; 0 = no affinity
};

// kpr_slots value: one backend slot of a frontend scope.
struct kpr_slot {
	__u32 backend_id; // the backend's id in kpr_backend
	__u32 flags;      // the backend's state in this service, KPR_BACKEND_*
};

/* kpr_backend value, at index id & KPR_BACKEND_INDEX_MASK (1..KPR_BACKEND_MAX-1). A backend id
 * is gen << KPR_BACKEND_INDEX_BITS | index: an index is given to another backend once freed, with
 * the next generation, so an id that conntrack, affinity or a socket still holds for the freed
 * backend no longer matches the entry (kpr_lb_backend) and fails as a deleted backend's does.
 * A fixed split, not one by KPR_BACKEND_MAX: an adopted pinned kpr_backend may be larger or
 * smaller than the size programs are built with (kpr.servicemaps: pinned sizes are kept). */
#define KPR_BACKEND_INDEX_BITS 24 // kpr_backend holds at most 2^24 entries; 256 generations
#define KPR_BACKEND_INDEX_MASK ((1U << KPR_BACKEND_INDEX_BITS) - 1)
struct kpr_backend {
	union kpr_addr addr; // backend address
	__be16 port;         // backend port, network order
	__u8 proto;          // IPPROTO_*; never 0 in a backend (a zero entry of the array is no backend)
	__u8 reserved;       // zero; was a state shared by all services (now per service, in kpr_slots)
	__u8 flags;          // KPR_BACKEND_F_*
	__u8 gen[3];         // the generation of the id (24 bits, little endian; kept in a freed zero
	                     // entry: the one its next backend takes)
};

// kpr_revnat value (key: __u32 rev-NAT index): the frontend replies must appear to come from.
struct kpr_revnat {
	union kpr_addr addr; // frontend address; zero (wildcard NodePort) = the node address the client dialled
	__be16 port;         // frontend port, network order
	__u8 proto;          // IPPROTO_*
	__u8 pad;            // zero
};

// kpr_affinity key: a client and a frontend.
struct kpr_affinity_key {
	union kpr_addr client; // client address; socket LB: the netns cookie in w[0..1]
	__u32 rev_nat;         // the frontend's rev-NAT index
	__u8 netns;            // 1: `client` holds a netns cookie rather than an address
	__u8 pad[3];           // zero
};

// kpr_affinity value.
struct kpr_affinity_val {
	__u64 last_used;  // kpr_now() of the client's last new connection, ns
	__u32 backend_id; // the backend the client sticks to
	__u32 slot;       // the slot the backend held when picked: reused only while that slot still names it
};

// kpr_maglev key: one frontend scope's Maglev table.
struct kpr_maglev_key {
	__u32 rev_nat; // the frontend's rev-NAT index
	__u32 scope;   // KPR_SCOPE_*
};

// kpr_srcrange key (LPM trie: prefixlen counts the bits of rev_nat and addr that must match).
struct kpr_srcrange_key {
	__u32 prefixlen;     // 32 (rev_nat) + prefix length within addr (IPv4: 96 + length)
	__u32 rev_nat;       // the frontend the range belongs to
	union kpr_addr addr; // range address, v4-mapped for IPv4
};

/* kpr_fe line: a kpr_svc entry and the backend ids of its first slots, written under a
 * sequence word (odd while the writer changes the line: kpr.servicemaps.fetable). Empty:
 * key.port 0 and key.slot 0 (a lookup stops there); a deleted entry's line keeps key.slot
 * KPR_FE_TOMB (never a lookup's slot 0: probing goes on). ids[i] is what kpr_slots holds at
 * val.slot_base + i (slot i + 1) for i < val.count: the writer rewrites the line whenever either
 * changes (a new range comes with a kpr_svc write; a range rewritten in place, a repair, with a
 * refresh of its lines). 0: not known (past count, more than KPR_FE_IDS slots, a line an older
 * kpr wrote): the program reads kpr_slots. A line 64 bytes, a cache line of its own. */
#define KPR_FE_LINES 131072 // lines (a power of two; fixed: the programs' index mask and the writer's agree on it)
#define KPR_FE_PROBES 8     // lines tried from a key's hash on
#define KPR_FE_TOMB 0xffff  // key.slot of a deleted entry's line
#define KPR_FE_IDS 4        // slots whose backend ids a line holds (the line's room after key and value)
struct kpr_fe_line {
	__u32 seq;               // even: the line is whole; odd: being written
	struct kpr_svc_key key;  // the kpr_svc key (slot 0)
	struct kpr_svc_val val;  // its kpr_svc value
	__u32 ids[4];            // backend ids of slots 1..KPR_FE_IDS (kpr_slots[val.slot_base + i]); 0: read kpr_slots
};

/* What kpr_lb_lookup_into() copies out of a line: the value and its slots' backend ids (ids
 * all 0 whenever the value handed back is not this copy's). */
struct kpr_fe_buf {
	struct kpr_svc_val val;
	__u32 ids[4];            // as kpr_fe_line.ids
};

_Static_assert(sizeof(union kpr_addr) == 16, "kpr_addr layout");
_Static_assert(sizeof(struct kpr_svc_key) == 24, "kpr_svc_key layout");
_Static_assert(sizeof(struct kpr_svc_val) == 20, "kpr_svc_val layout");
_Static_assert(sizeof(struct kpr_slot) == 8, "kpr_slot layout");
_Static_assert(sizeof(struct kpr_backend) == 24, "kpr_backend layout");
_Static_assert(sizeof(struct kpr_revnat) == 20, "kpr_revnat layout");
_Static_assert(sizeof(struct kpr_affinity_key) == 24, "kpr_affinity_key layout");
_Static_assert(sizeof(struct kpr_affinity_val) == 16, "kpr_affinity_val layout");
_Static_assert(sizeof(struct kpr_maglev_key) == 8, "kpr_maglev_key layout");
_Static_assert(sizeof(struct kpr_srcrange_key) == 24, "kpr_srcrange_key layout");
_Static_assert(sizeof(struct kpr_fe_line) == 64, "kpr_fe_line layout");
_Static_assert(sizeof(((struct kpr_fe_line *)0)->ids) == KPR_FE_IDS * 4, "kpr_fe_line ids");
_Static_assert(sizeof(struct kpr_fe_buf) == 36, "kpr_fe_buf layout");

/* --- maps ---------------------------------------------------------------------------- */

// Frontends (service entries).
BPF_TABLE_PINNED("hash", struct kpr_svc_key, struct kpr_svc_val, kpr_svc, KPR_SVC_MAX, KPR_PIN(kpr_svc));
// Backend slots of every frontend scope, in ranges kpr_svc_val.slot_base points at; an array:
// a slot is an index, no hash to insert into or look up. Mmapable: the writer stores into it
// as memory.
BPF_TABLE_PINNED("array", __u32, struct kpr_slot, kpr_slots, KPR_SLOTS_MAX, KPR_PIN(kpr_slots), BPF_F_MMAPABLE);
// Backend index (id & KPR_BACKEND_INDEX_MASK) -> backend: an array (a lookup is an index, an insert a store; mmapable: the
// writer stores into it as memory). Read only through kpr_lb_backend() (lib/lb.h).
BPF_TABLE_PINNED("array", __u32, struct kpr_backend, kpr_backend, KPR_BACKEND_MAX, KPR_PIN(kpr_backend),
		 BPF_F_MMAPABLE);
// Rev-NAT index -> frontend.
BPF_TABLE_PINNED("hash", __u32, struct kpr_revnat, kpr_revnat, KPR_REVNAT_MAX, KPR_PIN(kpr_revnat));
// sessionAffinity memory; LRU so forgotten clients age out without a sweeper.
BPF_TABLE_PINNED("lru_hash", struct kpr_affinity_key, struct kpr_affinity_val, kpr_affinity, KPR_AFFINITY_MAX,
		 KPR_PIN(kpr_affinity));
// Template for the inner Maglev arrays (bcc needs one to create the outer map; never pinned).
BPF_ARRAY(kpr_maglev_in, __u32, KPR_MAGLEV_M);
// (rev_nat, scope) -> Maglev table; hash of maps so a table is swapped atomically by one update.
BPF_TABLE_PINNED("hash_of_maps$kpr_maglev_in", struct kpr_maglev_key, int, kpr_maglev, KPR_MAGLEV_MAX,
		 KPR_PIN(kpr_maglev));
// loadBalancerSourceRanges per frontend.
BPF_TABLE_PINNED("lpm_trie", struct kpr_srcrange_key, __u32, kpr_srcrange, KPR_SRCRANGE_MAX, KPR_PIN(kpr_srcrange),
		 BPF_F_NO_PREALLOC);

// The frontends' one-line copy of kpr_svc (lib/lb.h kpr_lb_svc_get); mmapable: the writer
// stores lines as memory under their sequence word.
BPF_TABLE_PINNED("array", __u32, struct kpr_fe_line, kpr_fe, KPR_FE_LINES, KPR_PIN(kpr_fe), BPF_F_MMAPABLE);

#endif /* KPR_LIB_MAPS_H */
