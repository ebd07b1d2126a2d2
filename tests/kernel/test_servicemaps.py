"""ServiceMapWriter against real pinned maps, and lib/lb.h reading what it wrote.

Every test works in its own pin dir (kpr.testing's pin_dir fixture) that is cleaned up afterwards.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pluggy
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from kpr import PROJECT, hookspecs
from kpr.bpf import maps as M
from kpr.bpf.cleanup import attachments, cleanup, record_attachment
from kpr.bpf.inline import inline_includes
from kpr.bpf.loader import compile_and_load, load_prog
from kpr.bpf.maglev import build_table
from kpr.model import Backend, BackendState, Frontend, FrontendType, PluginStatus, Protocol, Service, ServiceKey
from kpr.servicemaps import ALGORITHM_ANNOTATION, ServiceMapWriter
from kpr.servicemaps.slots import size_class
from kpr.testing.bpffs import pin_map
from kpr.testing.prog_run import XDP_DROP, XDP_PASS, XDP_TX, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT
from kpr.testing.prog_run import checksum_problems, test_run

pytestmark = pytest.mark.kernel

CIP, NP, LB = FrontendType.CLUSTER_IP, FrontendType.NODE_PORT, FrontendType.LOAD_BALANCER
TCP_, UDP_ = Protocol.TCP, Protocol.UDP
TERM = BackendState.TERMINATING


@pytest.fixture
def writer(pin_dir: Path) -> Iterator[ServiceMapWriter]:
    w = ServiceMapWriter(pin_dir).open()
    yield w
    w.close()


def be(addr: str, port: int = 8080, **kw: object) -> Backend:
    return Backend(addr, port, **kw)  # type: ignore[arg-type]


B1 = be("10.1.0.1", local=True)
B2 = be("10.1.0.2")
B3 = be("10.1.0.3", state=TERM)
WEB_BACKENDS = (B1, B2, B3)


def web(backends: tuple[Backend, ...] = WEB_BACKENDS, **lb: object) -> Service:
    return Service(
        ServiceKey("default", "web"),
        (
            Frontend(CIP, "10.96.0.10", 80, TCP_, backends),
            Frontend(NP, "192.168.1.10", 30080, TCP_, backends, external_local=True),
            Frontend(
                LB,
                "203.0.113.10",
                80,
                TCP_,
                backends,
                affinity_timeout=300,
                source_ranges=("192.0.2.0/24", "2001:db8::/32"),
                **lb,  # type: ignore[arg-type]
            ),
        ),
    )


DNS = Service(
    ServiceKey("kube-system", "dns"),
    (
        Frontend(
            CIP,
            "fd00:96::10",
            53,
            UDP_,
            (be("fd00:1::1", 5353, local=True), be("fd00:1::2", 5353)),
            internal_local=True,
        ),
    ),
)
EMPTY = Service(ServiceKey("default", "empty"), (Frontend(CIP, "10.96.0.20", 80, TCP_),))
FALLBACK = Service(
    ServiceKey("default", "fallback"),
    (Frontend(CIP, "10.96.0.30", 80, TCP_, (be("10.2.0.1", state=TERM), be("10.2.0.2", state=TERM))),),
)


def fe(backends: list[str], flags: list[str], terminating: list[str] | None = None, **kw: object) -> dict:
    want = {"backends": sorted(backends), "flags": sorted(flags), "terminating": sorted(terminating or [])}
    want.update(kw)
    return want


EXPECTED = {
    "10.96.0.10:80/TCP external": fe(["10.1.0.1:8080", "10.1.0.2:8080"], ["ClusterIP"], ["10.1.0.3:8080"]),
    # eTP=Local: outside clients reach the local backend; in-cluster callers all of them
    "192.168.1.10:30080/TCP external": fe(["10.1.0.1:8080"], ["NodePort", "local", "two-scopes"]),
    "192.168.1.10:30080/TCP internal": fe(["10.1.0.1:8080", "10.1.0.2:8080"], ["NodePort"], ["10.1.0.3:8080"]),
    "0.0.0.0:30080/TCP external": fe(["10.1.0.1:8080"], ["NodePort", "local", "two-scopes", "wildcard"]),
    "0.0.0.0:30080/TCP internal": fe(["10.1.0.1:8080", "10.1.0.2:8080"], ["NodePort", "wildcard"], ["10.1.0.3:8080"]),
    "203.0.113.10:80/TCP external": fe(
        ["10.1.0.1:8080", "10.1.0.2:8080"],
        ["LoadBalancer", "affinity", "source-ranges"],
        ["10.1.0.3:8080"],
        affinity_timeout=300,
        source_ranges=["192.0.2.0/24"],  # the IPv6 range cannot match an IPv4 frontend
    ),
    # iTP=Local on a ClusterIP: the internal scope is the local backend only
    "[fd00:96::10]:53/UDP external": fe(["[fd00:1::1]:5353", "[fd00:1::2]:5353"], ["ClusterIP", "two-scopes"]),
    "[fd00:96::10]:53/UDP internal": fe(["[fd00:1::1]:5353"], ["ClusterIP", "local"]),
    "10.96.0.20:80/TCP external": fe([], ["ClusterIP"]),
    # KEP-1669: only terminating endpoints left, so they are selectable
    "10.96.0.30:80/TCP external": fe(["10.2.0.1:8080", "10.2.0.2:8080"], ["ClusterIP"]),
}


def summary(read: dict) -> dict:
    keys = ("backends", "flags", "terminating", "affinity_timeout", "source_ranges")
    out = {}
    for label, entry in read["frontends"].items():
        want = EXPECTED.get(label, {})
        out[label] = {k: entry[k] for k in keys if k in want or k in ("backends", "flags", "terminating")}
        assert entry["stray_slots"] == [], label
    return out


def check_consistent(read: dict) -> None:
    """Every backend id in a slot exists; every service entry's rev-NAT entry names it."""
    for label, entry in read["frontends"].items():
        for bid in entry["backend_ids"]:
            assert bid in read["backends"], (label, bid)
        assert read["revnat"][entry["rev_nat"]] == label.split()[0]


def total_ops(w: ServiceMapWriter) -> dict[str, int]:
    return {name: ops["update"] + ops["delete"] for name, ops in w.ops().items()}


def diff_ops(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# ---------------------------------------------------------------------- writer


def test_round_trip_ipv4_and_ipv6(writer: ServiceMapWriter) -> None:
    for s in (web(), DNS, EMPTY, FALLBACK):
        writer.upsert(s)
    read = writer.read_back()
    assert summary(read) == EXPECTED
    check_consistent(read)
    # Backends are shared between frontends: one entry per (address, port, protocol), without
    # a state (that is per service, in the slots).
    assert sorted((b["address"], b["port"], b["local"]) for b in read["backends"].values()) == [
        ("10.1.0.1", 8080, True),
        ("10.1.0.2", 8080, False),
        ("10.1.0.3", 8080, False),
        ("10.2.0.1", 8080, False),
        ("10.2.0.2", 8080, False),
        ("fd00:1::1", 5353, True),
        ("fd00:1::2", 5353, False),
    ]
    assert all("state" not in b for b in read["backends"].values())
    # one kpr_svc entry per frontend scope; its slots in kpr_slots, one range per frontend
    # (both scopes) rounded up to a size class
    counts = writer.entry_counts()
    assert counts["kpr_svc"] == len(read["frontends"]) == len(writer.maps["kpr_svc"].items())
    per_frontend: dict[str, int] = {}
    for label, e in read["frontends"].items():
        fe_label = label.split()[0]
        per_frontend[fe_label] = per_frontend.get(fe_label, 0) + len(e["backends"]) + len(e["terminating"])
    assert counts["kpr_slots"] == sum(map(size_class, per_frontend.values())) == writer.kernel_counts()["kpr_slots"]


def test_incremental_upsert_touches_only_changed_entries(writer: ServiceMapWriter) -> None:
    for s in (web(), DNS, EMPTY):
        writer.upsert(s)
    before = total_ops(writer)
    writer.upsert(web())  # unchanged: nothing written
    writer.upsert(DNS)
    assert diff_ops(before, total_ops(writer)) == {}

    # One more active, non-local backend. Four frontends list it (ClusterIP, LB, the NodePort
    # and its wildcard, in their internal scopes): each gets a new kpr_slots range, written
    # whole (ClusterIP and LB: B1, B2, B4 and the terminating B3; NodePort and wildcard: B1
    # for the external eTP=Local scope and the same four for the internal one), then its
    # service entries pointing at it (NodePort and wildcard: both scopes' entries).
    before = total_ops(writer)
    writer.upsert(web(WEB_BACKENDS + (be("10.1.0.4"),)))
    assert diff_ops(before, total_ops(writer)) == {"kpr_svc": 1 + 1 + 2 + 2, "kpr_slots": 4 + 4 + 5 + 5, "kpr_backend": 1}
    assert "10.1.0.4:8080" in writer.read_back()["frontends"]["10.96.0.10:80/TCP external"]["backends"]

    # Removing B2 from the middle moves the last selectable backend (10.1.0.4) into its slot
    # rather than shifting every slot after it (affinity entries remember slots); new ranges
    # of one slot fewer, the entries pointing at them, and B2's backend entry deleted.
    before = total_ops(writer)
    writer.upsert(web((B1, be("10.1.0.4"), B3)))
    changed = diff_ops(before, total_ops(writer))
    assert changed == {"kpr_svc": 6, "kpr_slots": 3 + 3 + 4 + 4, "kpr_backend": 1}
    read = writer.read_back()
    check_consistent(read)
    assert read["frontends"]["10.96.0.10:80/TCP external"]["backends"] == ["10.1.0.1:8080", "10.1.0.4:8080"]

    # A backend turning terminating changes the slots that list it (its state in this service),
    # not the backend entry other services share.
    before = total_ops(writer)
    writer.upsert(web((B1, be("10.1.0.4", state=TERM), B3)))
    changed = diff_ops(before, total_ops(writer))
    assert "kpr_backend" not in changed and changed["kpr_svc"] > 0, changed


def test_delete_keeps_shared_backends_and_removes_the_rest(writer: ServiceMapWriter) -> None:
    other = Service(ServiceKey("default", "other"), (Frontend(CIP, "10.96.0.11", 80, TCP_, (B1,)),))
    writer.upsert(web())
    writer.upsert(other)
    writer.delete(ServiceKey("default", "web"))
    writer.delete(ServiceKey("default", "never-seen"))
    read = writer.read_back()
    assert list(read["frontends"]) == ["10.96.0.11:80/TCP external"]
    assert [b["address"] for b in read["backends"].values()] == ["10.1.0.1"]
    assert list(read["revnat"].values()) == ["10.96.0.11:80/TCP"]
    assert writer.maps["kpr_srcrange"].items() == []
    writer.delete(other.key)
    assert writer.read_back() == {"frontends": {}, "backends": {}, "revnat": {}, "maglev_tables": []}


def test_restart_adopts_pinned_maps_and_keeps_ids(pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir) as w:
        for s in (web(), DNS, EMPTY):
            w.upsert(s)
        ids, backend_ids, before = w.ids(), w.backend_ids(), w.read_back()
    with ServiceMapWriter(pin_dir) as w2:
        assert w2.ids() == ids  # the same kernel maps: programs using them never notice
        assert w2.backend_ids() == backend_ids
        assert w2.read_back() == before
        ops0 = total_ops(w2)
        w2.upsert(web())
        w2.upsert(DNS)
        assert diff_ops(ops0, total_ops(w2)) == {}  # re-delivery after restart writes nothing
        # EMPTY was not re-delivered: garbage collection removes it, and only it.
        w2.gc()
        after = w2.read_back()
        assert set(after["frontends"]) == set(before["frontends"]) - {"10.96.0.20:80/TCP external"}
        assert w2.backend_ids() == backend_ids
        # A new backend gets a fresh id, never one in use.
        w2.upsert(web(WEB_BACKENDS + (be("10.1.0.9"),)))
        assert w2.backend_ids()["10.1.0.9:8080/TCP"] not in backend_ids.values()


def test_full_sync_removes_everything_not_desired(pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir) as w:
        for s in (web(), DNS, EMPTY, FALLBACK):
            w.upsert(s)
        # Garbage no service accounts for: a stray backend, rev-NAT entry and source range.
        w.maps["kpr_backend"].update(M.U32.pack(999), M.BACKEND.pack(M.addr_to_bytes("10.9.9.9"), 1, 6, 0, 0))
        w.maps["kpr_revnat"].update(M.U32.pack(998), M.REVNAT.pack(M.addr_to_bytes("10.9.9.8"), 1, 6))
        w.maps["kpr_srcrange"].update(M.SRCRANGE_KEY.pack(160, 997, bytes(16)), M.U32.pack(1))
    for batch in (True, False):
        with ServiceMapWriter(pin_dir, batch=batch) as w:
            w.full_sync([web(), DNS])
            read = w.read_back()
            assert summary(read) == {k: v for k, v in EXPECTED.items() if "10.96.0.20" not in k and "10.96.0.30" not in k}
            check_consistent(read)
            assert 999 not in read["backends"] and 998 not in read["revnat"]
            assert all(M.SRCRANGE_KEY.unpack(k)[1] != 997 for k, _ in w.maps["kpr_srcrange"].items())
            syscalls = sum(ops["syscalls"] for ops in w.ops().values())
            if batch:
                assert syscalls < 20, w.ops()  # a handful of batch calls, not one per entry
            w.full_sync([web(), DNS, EMPTY, FALLBACK])
            assert summary(w.read_back()) == EXPECTED


def test_a_service_that_does_not_fit_is_refused_and_nothing_of_it_is_written(pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir, sizes={"kpr_svc": 6}) as w:
        w.upsert(EMPTY)
        w.upsert(web())  # 6 service entries do not fit beside EMPTY's: refused before anything is written
        st = w.kpr_status()
        assert (st.counters["errors"], st.counters["refused"]) == (0, 1)
        assert "kpr_svc full" in st.details["refused"]["default/web"]
        assert w.entry_counts()["kpr_svc"] == len(w.maps["kpr_svc"].items()) == 1
        # A full sync to a state that fits converges, and nothing is refused any more.
        w.full_sync([EMPTY, FALLBACK])
        assert summary(w.read_back()) == {k: v for k, v in EXPECTED.items() if "10.96.0.20" in k or "10.96.0.30" in k}
        assert w.refused == {}


def test_conflicting_frontend_goes_to_the_first_service(writer: ServiceMapWriter) -> None:
    a = Service(ServiceKey("a", "x"), (Frontend(LB, "203.0.113.50", 80, TCP_, (B1,)),))
    b = Service(ServiceKey("b", "x"), (Frontend(LB, "203.0.113.50", 80, TCP_, (B2,)),))
    writer.upsert(a)
    writer.upsert(b)
    assert writer.read_back()["frontends"]["203.0.113.50:80/TCP external"]["backends"] == ["10.1.0.1:8080"]
    assert writer.kpr_status().counters["conflicts"] == 1
    writer.delete(a.key)  # b's claim is retried as soon as a lets go
    assert writer.read_back()["frontends"]["203.0.113.50:80/TCP external"]["backends"] == ["10.1.0.2:8080"]
    assert writer.kpr_status().counters["conflicts"] == 0


def test_maglev_tables_match_the_python_builder(pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir, maglev_size=251) as w:
        svc = Service(
            ServiceKey("default", "mg"),
            (Frontend(CIP, "10.96.0.40", 80, TCP_, (be("10.3.0.1"), be("10.3.0.2"), be("10.3.0.3"))),),
            annotations=((ALGORITHM_ANNOTATION, "maglev"),),
        )
        w.upsert(svc)
        entry = w.read_back()["frontends"]["10.96.0.40:80/TCP external"]
        assert "maglev" in entry["flags"]
        assert sorted(entry["maglev"].values()) == [83, 84, 84]
        ids = w.backend_ids()
        outer = w.maps["kpr_maglev"]
        (key,) = list(outer.keys())
        with M.BpfMap.from_id(M.U32.unpack(outer.lookup(key))[0]) as inner:
            table = [M.U32.unpack(v)[0] for _, v in sorted(inner.items(), key=lambda kv: M.U32.unpack(kv[0])[0])]
        want = build_table([(ids[f"10.3.0.{i}:8080/TCP"], f"10.3.0.{i}:8080") for i in (1, 2, 3)], 251)
        assert table == list(want)
        # Switching back to random drops the table after the flag is cleared.
        w.upsert(Service(svc.key, svc.frontends))
        assert w.read_back()["maglev_tables"] == []


def test_pinned_maglev_tables_of_another_size_are_refused_by_name(pin_dir: Path) -> None:
    from kpr.nodeport.datapath import writer_settings

    svc = Service(
        ServiceKey("default", "mg"),
        (Frontend(CIP, "10.96.0.41", 80, TCP_, (be("10.3.0.1"),)),),
        annotations=((ALGORITHM_ANNOTATION, "maglev"),),
    )
    with ServiceMapWriter(pin_dir, maglev_size=251) as w:
        assert M.inner_max_entries(w.maps["kpr_maglev"]) is None  # no table yet
        w.upsert(svc)
        assert M.inner_max_entries(w.maps["kpr_maglev"]) == 251
    # what the NodePort programs are built with follows the pinned tables
    assert writer_settings(pin_dir).maglev_size == 251
    with pytest.raises(M.MapIncompatible, match=r"kpr_maglev holds Maglev tables of 251 slots, this kpr builds 509"):
        ServiceMapWriter(pin_dir, maglev_size=509).open()
    with ServiceMapWriter(pin_dir, maglev_size=251) as w:  # the size it was made with still opens
        assert "10.96.0.41:80/TCP external" in w.read_back()["frontends"]


def test_initial_state_through_the_bus_is_one_full_sync(pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir) as w:
        for s in (web(), DNS, EMPTY):
            w.upsert(s)
        ids, backend_ids, before = w.ids(), w.backend_ids(), w.read_back()
    with ServiceMapWriter(pin_dir) as w2:
        ops0 = total_ops(w2)
        # What the writer stage (kpr.pipeline) hands it, in two batches.
        assert w2.apply_batch([("upsert", web()), ("upsert", DNS)]) == {}
        assert not w2.initial_written
        assert diff_ops(ops0, total_ops(w2)) == {}, "before sync complete the adopted maps keep serving as they are"
        assert w2.read_back() == before
        assert w2.apply_batch([("sync", None)]) == {} and w2.initial_written
        after = w2.read_back()
        assert set(after["frontends"]) == set(before["frontends"]) - {"10.96.0.20:80/TCP external"}
        assert w2.ids() == ids and w2.backend_ids() == backend_ids
        writes = w2.ops()
        assert sum(o["update"] for o in writes.values()) <= 1, "unchanged services are not rewritten"
        # After sync complete, a change is applied at once.
        assert w2.apply_batch([("delete", DNS.key)]) == {}
        assert not any(k.startswith("[fd00:96::10]:53/UDP") for k in w2.read_back()["frontends"])


def test_writer_is_a_facility_fed_by_the_stage(pin_dir: Path) -> None:
    writer = ServiceMapWriter(pin_dir)
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(writer, name="servicemaps")
    pm.hook.kpr_start(context=None)  # opens (creates and pins) the maps
    assert (pin_dir / "kpr_svc").exists()
    # Service events come from the writer stage, never from a plugin hook call.
    pm.hook.kpr_service_upsert(service=web())
    assert writer.initial_written is False and not writer._initial
    assert writer.apply_batch([("upsert", web()), ("upsert", DNS), ("delete", DNS.key), ("sync", None)]) == {}
    (status,) = pm.hook.kpr_status()
    assert isinstance(status, PluginStatus) and status.healthy
    c = status.counters
    assert (c["services"], c["frontends"], c["backends"], c["errors"]) == (1, 4, 3, 0)
    assert c["map_entries"] == sum(v for k, v in c.items() if k.startswith("entries_"))
    pm.hook.kpr_stop(context=None)  # closes; the pins stay for the next agent
    assert not writer.maps and (pin_dir / "kpr_svc").exists()
    (status,) = pm.hook.kpr_status()
    assert not status.healthy


def test_cleanup_removes_pins_and_registry(pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir) as w:
        w.upsert(web())
    record_attachment(pin_dir, "cgroup", {"cgroup": "/nonexistent/kpr-test", "attach_type": 0}, "sock_connect")
    assert [a["prog_name"] for a in attachments(pin_dir)] == ["sock_connect"]
    removed = cleanup(pin_dir)
    assert not pin_dir.exists()
    assert f"removed pin {pin_dir / 'kpr_svc'}" in removed
    assert f"removed pin {pin_dir / 'kpr_attach'}" in removed
    assert any("cgroup is gone" in line for line in removed)
    assert cleanup(pin_dir) == []


# ---------------------------------------------------------------------- lib/lb.h on packets

LB_PROGRAM = r"""
#include "ctx/%s.h"
#include "lib/parse.h"
#include "lib/lb.h"
#include "lib/conntrack.h"
#include "lib/nat.h"

BPF_ARRAY(test_cfg, __u32, 2); // [0] kpr_lb_lookup flags; [1] rev-NAT index for revnat_test
BPF_ARRAY(test_out, __u32, 3); // [0] backend id, [1] rev-NAT index, [2] path: 1 new flow, 2 conntrack

int lb_test(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_svc_key key;
	struct kpr_svc_val *svc;
	struct kpr_backend *be;
	struct kpr_affinity_key aff;
	struct kpr_ct_entry *ct;
	__u32 zero = 0, one = 1, two = 2, id = 0, rev_nat = 0, path, *lflags;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || !pkt.l4_off)
		return CTX_PASS;
	lflags = test_cfg.lookup(&zero);
	if (!lflags)
		return CTX_PASS;
	ct = kpr_ct_lookup(&pkt.t, KPR_CT_DIR_ORIGINAL);
	if (ct) {
		id = ct->backend_id;
		rev_nat = ct->rev_nat;
		be = kpr_backend.lookup(&id);
		path = 2;
	} else {
		svc = kpr_lb_lookup(&key, &pkt.t, *lflags);
		if (!svc)
			return CTX_PASS;
		if (!kpr_lb_src_allowed(svc, &pkt.t.saddr))
			return CTX_DROP;
		kpr_lb_affinity_key_addr(&aff, svc, &pkt.t.saddr);
		be = kpr_lb_pick(&key, svc, &pkt.t, &aff, &id);
		rev_nat = svc->rev_nat;
		if (be)
			kpr_ct_create(&pkt.t, KPR_CT_DIR_ORIGINAL, id, rev_nat, 0);
		path = 1;
	}
	if (!be)
		return CTX_DROP;
	test_out.update(&zero, &id);
	test_out.update(&one, &rev_nat);
	test_out.update(&two, &path);
	if (kpr_nat_dnat(ctx, &pkt, &be->addr, be->port))
		return CTX_DROP;
	return ctx_tx(ctx);
}

int revnat_test(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_revnat *rn;
	__u32 one = 1, *idx;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || !pkt.l4_off)
		return CTX_PASS;
	idx = test_cfg.lookup(&one);
	if (!idx)
		return CTX_PASS;
	rn = kpr_lb_revnat(*idx);
	if (!rn)
		return CTX_DROP;
	// The reply's source becomes the frontend (kpr_revnat), as host_routing.h's reply path rewrites it.
	if (kpr_nat_snat(ctx, &pkt, &rn->addr, rn->port))
		return CTX_DROP;
	return ctx_tx(ctx);
}

int snat_out(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_nat_entry *e;
	union kpr_addr nat;
	int err;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || !pkt.l4_off)
		return CTX_PASS;
	kpr_addr_set_v4(&nat, kpr_htonl(0x0a630001)); // 10.99.0.1
	e = kpr_snat_mapping(&pkt.t, &nat, 1, &err);
	if (!e)
		return CTX_DROP;
	if (kpr_nat_snat(ctx, &pkt, &e->addr, e->port))
		return CTX_DROP;
	return ctx_tx(ctx);
}

int snat_in(kpr_ctx_t *ctx)
{
	struct kpr_pkt pkt;
	struct kpr_nat_entry *e;

	if (kpr_parse(ctx, &pkt) != KPR_PARSE_OK || !pkt.l4_off)
		return CTX_PASS;
	e = kpr_snat_reverse(&pkt.t);
	if (!e)
		return CTX_PASS;
	if (kpr_nat_dnat(ctx, &pkt, &e->addr, e->port))
		return CTX_DROP;
	return ctx_tx(ctx);
}
"""

FROM_CLUSTER, NODE_ADDR = 1, 2
SNAT_ADDR = "10.99.0.1"
MAGLEV_M = 251


class LbProgram:
    def __init__(self, ctx: str, pin: Path) -> None:
        self.kind = "xdp" if ctx == "xdp" else "tc"
        self.b = compile_and_load(
            inline_includes(LB_PROGRAM % ctx), cflags=M.cflags(pin, maglev_size=MAGLEV_M) + ["-DKPR_CLOCK_FINE=1"]
        )
        ptype = "XDP" if ctx == "xdp" else "SCHED_CLS"
        self.lb = load_prog(self.b, "lb_test", ptype)
        self.revnat = load_prog(self.b, "revnat_test", ptype)
        self.snat_out = load_prog(self.b, "snat_out", ptype)
        self.snat_in = load_prog(self.b, "snat_in", ptype)
        self.tx = XDP_TX if ctx == "xdp" else TC_ACT_REDIRECT
        self.drop = XDP_DROP if ctx == "xdp" else TC_ACT_SHOT
        self.passed = XDP_PASS if ctx == "xdp" else TC_ACT_OK

    def cfg(self, lflags: int = 0, rev_nat: int = 0) -> None:
        t = self.b[b"test_cfg"]
        t[t.Key(0)] = t.Leaf(lflags)
        t[t.Key(1)] = t.Leaf(rev_nat)

    def run(self, pkt: object, fn: str = "lb") -> tuple[int, Ether]:
        res = test_run(getattr(self, fn).fd, bytes(pkt))
        if res.retval == self.tx:
            assert checksum_problems(res.data_out) == []
        return res.retval, Ether(res.data_out)

    def out(self) -> tuple[int, int, int]:
        t = self.b[b"test_out"]
        return t[t.Key(0)].value, t[t.Key(1)].value, t[t.Key(2)].value


def v4(src: str, dst: str, sport: int, dport: int, proto: str = "tcp") -> Ether:
    l4 = TCP(sport=sport, dport=dport, flags="S") if proto == "tcp" else UDP(sport=sport, dport=dport)
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / l4 / Raw(b"kpr")


def v6(src: str, dst: str, sport: int, dport: int) -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IPv6(src=src, dst=dst) / UDP(
        sport=sport, dport=dport
    ) / Raw(b"kpr")


def dest(out: Ether) -> str:
    ip = out[IP] if IP in out else out[IPv6]
    l4 = out[TCP] if TCP in out else out[UDP]
    return f"[{ip.dst}]:{l4.dport}" if IPv6 in out else f"{ip.dst}:{l4.dport}"


# The kernel's flow hash (lib/common.h kpr_tuple_hash), to predict Maglev picks from Python.
def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def tuple_hash(src: str, dst: str, sport: int, dport: int, proto: int, seed: int = 0x6B707231) -> int:
    m = 0xFFFFFFFF
    w = struct.unpack("=4I", M.addr_to_bytes(src)) + struct.unpack("=4I", M.addr_to_bytes(dst))
    a = b = c = (0xDEADBEEF + 36 + seed) & m

    def mix(a: int, b: int, c: int) -> tuple[int, int, int]:
        a = (a - c) & m; a ^= _rol(c, 4); c = (c + b) & m
        b = (b - a) & m; b ^= _rol(a, 6); a = (a + c) & m
        c = (c - b) & m; c ^= _rol(b, 8); b = (b + a) & m
        a = (a - c) & m; a ^= _rol(c, 16); c = (c + b) & m
        b = (b - a) & m; b ^= _rol(a, 19); a = (a + c) & m
        c = (c - b) & m; c ^= _rol(b, 4); b = (b + a) & m
        return a, b, c

    a, b, c = (a + w[0]) & m, (b + w[1]) & m, (c + w[2]) & m
    a, b, c = mix(a, b, c)
    a, b, c = (a + w[3]) & m, (b + w[4]) & m, (c + w[5]) & m
    a, b, c = mix(a, b, c)
    a, b = (a + w[6]) & m, (b + w[7]) & m
    c = (c + (((M.htons(sport) << 16) ^ M.htons(dport) ^ (proto << 8)) & m)) & m
    c ^= b; c = (c - _rol(b, 14)) & m
    a ^= c; a = (a - _rol(c, 11)) & m
    b ^= a; b = (b - _rol(a, 25)) & m
    c ^= b; c = (c - _rol(b, 16)) & m
    a ^= c; a = (a - _rol(c, 4)) & m
    b ^= a; b = (b - _rol(a, 14)) & m
    c ^= b; c = (c - _rol(b, 24)) & m
    return c


MAGLEV_SVC = Service(
    ServiceKey("default", "mg"),
    (Frontend(CIP, "10.96.0.40", 80, TCP_, tuple(be(f"10.3.0.{i}") for i in range(1, 6))),),
    annotations=((ALGORITHM_ANNOTATION, "maglev"),),
)


@pytest.fixture(params=["xdp", "skb"])
def lb_setup(
    request: pytest.FixtureRequest, kernel_headers: Path, pin_dir: Path
) -> Iterator[tuple[LbProgram, ServiceMapWriter]]:
    w = ServiceMapWriter(pin_dir, maglev_size=MAGLEV_M).open()
    for s in (web(), DNS, EMPTY, MAGLEV_SVC):
        w.upsert(s)
    prog = LbProgram(request.param, pin_dir)
    try:
        yield prog, w
    finally:
        prog.b.cleanup()
        w.close()


def test_lb_header_selects_and_dnats_what_the_writer_wrote(lb_setup: tuple[LbProgram, ServiceMapWriter]) -> None:
    p, w = lb_setup
    web_all = {"10.1.0.1:8080", "10.1.0.2:8080"}

    # ClusterIP from a pod: DNAT to a selectable backend, checksums right; conntrack keeps it.
    p.cfg(FROM_CLUSTER)
    verdict, out = p.run(v4("10.0.1.5", "10.96.0.10", 40000, 80))
    assert verdict == p.tx
    first = dest(out)
    assert first in web_all and out[IP].src == "10.0.1.5" and out[TCP].sport == 40000
    assert p.out()[2] == 1
    for _ in range(5):
        assert dest(p.run(v4("10.0.1.5", "10.96.0.10", 40000, 80))[1]) == first
        assert p.out()[2] == 2  # established: the conntrack path
    # New flows spread over the selectable backends, never the terminating one.
    seen = {dest(p.run(v4("10.0.1.5", "10.96.0.10", 41000 + i, 80))[1]) for i in range(40)}
    assert seen == web_all

    # NodePort with eTP=Local: outside clients get the local backend only ...
    p.cfg(0)
    seen = {dest(p.run(v4("198.51.100.7", "192.168.1.10", 42000 + i, 30080))[1]) for i in range(20)}
    assert seen == {"10.1.0.1:8080"}
    # ... in-cluster callers the internal scope (all selectable backends).
    p.cfg(FROM_CLUSTER)
    seen = {dest(p.run(v4("10.0.1.6", "192.168.1.10", 43000 + i, 30080))[1]) for i in range(40)}
    assert seen == web_all
    # Another node address reaches the NodePort through the wildcard entry, only when the
    # caller says the address is the node's.
    p.cfg(NODE_ADDR)
    assert dest(p.run(v4("198.51.100.8", "172.16.0.1", 44000, 30080))[1]) == "10.1.0.1:8080"
    p.cfg(0)
    assert p.run(v4("198.51.100.8", "172.16.0.2", 44001, 30080))[0] == p.passed

    # LoadBalancer with source ranges and affinity.
    p.cfg(0)
    assert p.run(v4("198.51.100.9", "203.0.113.10", 45000, 80))[0] == p.drop
    picks = {dest(p.run(v4("192.0.2.7", "203.0.113.10", 45000 + i, 80))[1]) for i in range(20)}
    assert len(picks) == 1 and picks <= web_all  # one client, many flows, one backend

    # IPv6 UDP, and a service without backends.
    p.cfg(0)
    verdict, out = p.run(v6("fd00:10::5", "fd00:96::10", 46000, 53))
    assert verdict == p.tx and dest(out) in {"[fd00:1::1]:5353", "[fd00:1::2]:5353"}
    assert p.run(v4("10.0.1.5", "10.96.0.20", 47000, 80))[0] == p.drop
    # Not a service: untouched.
    assert p.run(v4("10.0.1.5", "10.96.0.99", 47001, 80))[0] == p.passed


def test_affinity_forgets_a_backend_that_left_the_service(lb_setup: tuple[LbProgram, ServiceMapWriter]) -> None:
    p, w = lb_setup
    p.cfg(0)
    client = "192.0.2.7"
    first = dest(p.run(v4(client, "203.0.113.10", 45500, 80))[1])
    assert all(dest(p.run(v4(client, "203.0.113.10", 45501 + i, 80))[1]) == first for i in range(5))
    # The sticky backend leaves the service but lives on in another one, so the backends
    # map still holds it: the client must be moved, not kept on it.
    gone = next(b for b in WEB_BACKENDS if f"{b.address}:{b.port}" == first)
    w.upsert(Service(ServiceKey("default", "keeper"), (Frontend(CIP, "10.96.0.50", 80, TCP_, (gone,)),)))
    w.upsert(web(tuple(b for b in WEB_BACKENDS if b is not gone)))
    assert first.split(":")[0] + ":8080/TCP" in w.backend_ids(), "the backend is still in the backends map"
    after = {dest(p.run(v4(client, "203.0.113.10", 45600 + i, 80))[1]) for i in range(10)}
    assert first not in after and len(after) == 1, after
    # A backend that merely moved slot keeps its clients: add one, the sticky one stays.
    second = after.pop()
    w.upsert(web(tuple(b for b in WEB_BACKENDS if b is not gone) + (be("10.1.0.9"),)))
    assert all(dest(p.run(v4(client, "203.0.113.10", 45700 + i, 80))[1]) == second for i in range(10))


def test_affinity_holds_for_a_maglev_service(lb_setup: tuple[LbProgram, ServiceMapWriter]) -> None:
    p, w = lb_setup
    fe = MAGLEV_SVC.frontends[0]
    sticky = Service(
        ServiceKey("default", "mg-sticky"),
        (Frontend(CIP, "10.96.0.41", 80, TCP_, fe.backends, affinity_timeout=60),),
        annotations=MAGLEV_SVC.annotations,
    )
    w.upsert(sticky)
    p.cfg(0)
    for client in ("10.0.3.1", "10.0.3.2", "10.0.3.3"):
        picks = {dest(p.run(v4(client, "10.96.0.41", 52000 + i, 80))[1]) for i in range(15)}
        assert len(picks) == 1, (client, picks)


def test_lb_header_maglev_pick_is_the_python_table_entry(lb_setup: tuple[LbProgram, ServiceMapWriter]) -> None:
    p, w = lb_setup
    ids = w.backend_ids()
    table = build_table([(ids[f"10.3.0.{i}:8080/TCP"], f"10.3.0.{i}:8080") for i in range(1, 6)], MAGLEV_M)
    by_id = {v: k.split("/")[0] for k, v in ids.items()}
    p.cfg(0)
    seen = set()
    for i in range(60):
        sport = 50000 + i
        got = dest(p.run(v4("10.0.2.9", "10.96.0.40", sport, 80))[1])
        want = by_id[table[tuple_hash("10.0.2.9", "10.96.0.40", sport, 80, 6) % MAGLEV_M]]
        assert got == want, sport
        seen.add(got)
    assert len(seen) == 5


def test_lb_header_reverse_nat_restores_the_frontend(lb_setup: tuple[LbProgram, ServiceMapWriter]) -> None:
    p, w = lb_setup
    rev = {label: idx for idx, label in w.read_back()["revnat"].items()}
    p.cfg(0, rev["10.96.0.10:80/TCP"])
    verdict, out = p.run(v4("10.1.0.2", "10.0.1.5", 8080, 40000), fn="revnat")
    assert verdict == p.tx
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == ("10.96.0.10", 80, "10.0.1.5", 40000)
    p.cfg(0, rev["[fd00:96::10]:53/UDP"])
    verdict, out = p.run(v6("fd00:1::2", "fd00:10::5", 5353, 46000), fn="revnat")
    assert verdict == p.tx
    assert (out[IPv6].src, out[UDP].sport) == ("fd00:96::10", 53)


# ---------------------------------------------------------------------- cleanup of attachments

HOOKS = r"""
int kpr_tc(struct __sk_buff *skb) { return 0; }
int other_tc(struct __sk_buff *skb) { return 0; }
int kpr_xdp(struct xdp_md *ctx) { return XDP_PASS; }
int other_xdp(struct xdp_md *ctx) { return XDP_PASS; }
int kpr_connect(struct bpf_sock_addr *ctx) { return 1; }
int other_connect(struct bpf_sock_addr *ctx) { return 1; }
"""


def _tc_names(ns: object, direction: str) -> list[str]:
    import json

    out = ns.run(["tc", "-j", "filter", "show", "dev", "eth0", direction]).stdout  # type: ignore[attr-defined]
    return sorted(f["options"]["bpf_name"] for f in json.loads(out or "[]") if "options" in f)


def _xdp_prog(ns: object) -> str | None:
    import json

    link = json.loads(ns.run(["ip", "-j", "-d", "link", "show", "dev", "eth0"]).stdout)[0]  # type: ignore[attr-defined]
    return ((link.get("xdp") or {}).get("prog") or {}).get("name")


def _cgroup_progs(cg: Path, attach_type: int) -> list[int]:
    import ctypes
    import os

    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ctypes.c_uint32 * 8)()
        cnt = ctypes.c_uint32(8)
        flags = ctypes.c_uint32(0)
        assert M.libbpf().bpf_prog_query(fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(cnt)) == 0
        return list(ids)[: cnt.value]
    finally:
        os.close(fd)


def test_cleanup_detaches_exactly_what_kpr_recorded(
    kernel_headers: Path, pin_dir: Path, topology: object, cgroup: Path
) -> None:
    import os

    from bcc import BPFAttachType
    from pyroute2 import IPRoute

    topo = topology
    topo.add_namespace("node")  # type: ignore[attr-defined]
    topo.add_namespace("peer")  # type: ignore[attr-defined]
    topo.link("node", "peer", "10.99.0.1/24", "10.99.0.2/24")  # type: ignore[attr-defined]
    node, peer = topo["node"], topo["peer"]  # type: ignore[index]
    b = compile_and_load(HOOKS)
    try:
        progs = {
            n: load_prog(b, n, t, attach_type=a)
            for n, t, a in (
                ("kpr_tc", "SCHED_CLS", None),
                ("other_tc", "SCHED_CLS", None),
                ("kpr_xdp", "XDP", None),
                ("other_xdp", "XDP", None),
                ("kpr_connect", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
                ("other_connect", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT"),
            )
        }
        with node.enter():
            ipr = IPRoute()
            idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.tc("add", "clsact", idx)
            for name, parent, prio in (("kpr_tc", "ffff:fff2", 1), ("other_tc", "ffff:fff2", 2), ("kpr_tc", "ffff:fff3", 1)):
                fn = progs[name]
                ipr.tc("add-filter", "bpf", idx, ":1", fd=fn.fd, name=name, parent=parent, classid=1,
                       direct_action=True, prio=prio)
            ipr.close()
            b.attach_xdp(b"eth0", progs["kpr_xdp"], 0)
        with peer.enter():
            b.attach_xdp(b"eth0", progs["other_xdp"], 0)  # a foreign program on a device kpr never used
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            b.attach_func(progs["kpr_connect"], cg_fd, BPFAttachType.CGROUP_INET4_CONNECT)
            b.attach_func(progs["other_connect"], cg_fd, BPFAttachType.CGROUP_INET6_CONNECT)

            def prog_id(name: str) -> int:
                return M.prog_info(progs[name].fd).id

            ns_path = str(node.path)
            for direction in ("ingress", "egress"):
                record_attachment(pin_dir, "tc", {"ifname": "eth0", "direction": direction, "netns": ns_path}, "kpr_tc",
                                  prog_id=prog_id("kpr_tc"))
            record_attachment(pin_dir, "xdp", {"ifname": "eth0", "netns": ns_path}, "kpr_xdp", prog_id=prog_id("kpr_xdp"))
            record_attachment(pin_dir, "cgroup", {"cgroup": str(cgroup), "attach_type": "CGROUP_INET4_CONNECT"},
                              "kpr_connect", prog_id=prog_id("kpr_connect"))
            # Recording the same hook again replaces the record rather than adding one.
            record_attachment(pin_dir, "xdp", {"ifname": "eth0", "netns": ns_path}, "kpr_xdp", prog_id=prog_id("kpr_xdp"))
            assert len(attachments(pin_dir)) == 4
            with ServiceMapWriter(pin_dir) as w:
                w.upsert(web())

            removed = cleanup(pin_dir)

            assert _tc_names(node, "ingress") == ["other_tc"]
            assert _tc_names(node, "egress") == []
            assert _xdp_prog(node) is None
            assert _xdp_prog(peer) == "other_xdp"
            in4 = int(BPFAttachType.CGROUP_INET4_CONNECT)
            in6 = int(BPFAttachType.CGROUP_INET6_CONNECT)
            assert _cgroup_progs(cgroup, in4) == []
            assert _cgroup_progs(cgroup, in6) == [prog_id("other_connect")]
            assert sum(line.startswith("detached tc") for line in removed) == 2
            assert sum(line.startswith("detached xdp") for line in removed) == 1
            assert sum(line.startswith("detached cgroup") for line in removed) == 1
            assert not pin_dir.exists()
            b.detach_func(progs["other_connect"], cg_fd, BPFAttachType.CGROUP_INET6_CONNECT)
        finally:
            os.close(cg_fd)
    finally:
        b.cleanup()


def test_nat_header_allocates_snat_ports_and_reverses_replies(lb_setup: tuple[LbProgram, ServiceMapWriter]) -> None:
    p, _w = lb_setup
    verdict, out = p.run(v4("10.0.1.5", "198.51.100.1", 40000, 443), fn="snat_out")
    assert verdict == p.tx and out[IP].src == SNAT_ADDR
    port = out[TCP].sport
    assert 61000 <= port <= 65535  # KPR_SNAT_PORT_MIN..MAX, clear of Linux's ephemeral range
    # The same flow keeps its mapping; another client gets another port.
    assert p.run(v4("10.0.1.5", "198.51.100.1", 40000, 443), fn="snat_out")[1][TCP].sport == port
    other = p.run(v4("10.0.1.6", "198.51.100.1", 40000, 443), fn="snat_out")[1][TCP].sport
    assert other != port
    # The reply to the SNAT address and port goes back to the original client.
    verdict, back = p.run(v4("198.51.100.1", SNAT_ADDR, 443, port), fn="snat_in")
    assert verdict == p.tx
    assert (back[IP].dst, back[TCP].dport, back[IP].src, back[TCP].sport) == ("10.0.1.5", 40000, "198.51.100.1", 443)
    # Unknown replies are left alone.
    assert p.run(v4("198.51.100.1", SNAT_ADDR, 443, 1), fn="snat_in")[0] == p.passed


def test_an_older_kprs_slot_entries_stay_until_the_sweep_and_new_programs_ignore_them(
    kernel_headers: Path, pin_dir: Path
) -> None:
    """Upgrade from the per-slot layout (README "Service map writer: the slot layout"): an
    older kpr kept backend slots 1..count as kpr_svc entries, read by its programs still
    attached, and kpr_backend was a hash. The new writer copies the hash into an array (every
    id its index), adopts the backend ids, leaves the slot entries in place through the initial
    sync and deletes them at the first check() after it; new programs read only kpr_slots."""
    from dataclasses import replace

    specs = M.specs_with(None, MAGLEV_M)
    vip, port = M.addr_to_bytes("10.96.0.10"), M.htons(80)
    # kpr_svc: slot 0 (backend_id 0), slots 1..2 naming backends 11 and 12
    svc_entries = {M.SVC_KEY.pack(vip, port, 6, 0, 0, 0): M.SVC_VAL.pack(0, 2, 0, 7, M.SVC_F_CLUSTER_IP, 0)}
    for slot, bid in ((1, 11), (2, 12)):
        svc_entries[M.SVC_KEY.pack(vip, port, 6, 0, slot, 0)] = M.SVC_VAL.pack(bid, 0, 0, 7, M.BACKEND_ACTIVE, 0)
    pin_map(pin_dir, "kpr_svc", specs["kpr_svc"], svc_entries)
    pin_map(pin_dir, "kpr_backend", replace(specs["kpr_backend"], type=M.BPF_MAP_TYPE_HASH, flags=0), {
        M.U32.pack(bid): M.BACKEND.pack(M.addr_to_bytes(addr), M.htons(8080), 6, 0, 0)
        for bid, addr in ((11, "10.1.0.1"), (12, "10.1.0.2"))
    })
    pin_map(pin_dir, "kpr_revnat", specs["kpr_revnat"], {M.U32.pack(7): M.REVNAT.pack(vip, port, 6)})
    svc = Service(ServiceKey("default", "web"), (Frontend(CIP, "10.96.0.10", 80, TCP_, (be("10.1.0.1"), be("10.1.0.2"))),))
    label = "10.96.0.10:80/TCP external"
    with ServiceMapWriter(pin_dir, maglev_size=MAGLEV_M) as w:
        assert w.read_back()["frontends"][label]["stray_slots"] == [1, 2]
        assert w.backend_ids() == {"10.1.0.1:8080/TCP": 11, "10.1.0.2:8080/TCP": 12}
        info = w.maps["kpr_backend"].info()
        assert (info.type, info.max_entries) == (M.BPF_MAP_TYPE_ARRAY, M.SPECS["kpr_backend"].max_entries)
        with M.BpfMap.open_pinned(pin_dir / "kpr_backend") as pinned:
            assert pinned.id == w.ids()["kpr_backend"], "the array is pinned in the hash's place"
        # the initial state, as the writer stage hands it over
        assert w.apply_batch([("upsert", svc), ("sync", None)]) == {}
        read = w.read_back()["frontends"][label]
        assert read["backends"] == ["10.1.0.1:8080", "10.1.0.2:8080"] and read["rev_nat"] == 7
        assert read["backend_ids"] == [11, 12], "established flows keep their backend ids"
        assert read["stray_slots"] == [1, 2], "the older programs still find their slots"
        assert w.kernel_counts()["kpr_svc"] == 3 == w.entry_counts()["kpr_svc"]
        # New programs ignore the old entries: point both at backend 12, new flows still
        # reach both backends through kpr_slots.
        for slot in (1, 2):
            w.maps["kpr_svc"].update(M.SVC_KEY.pack(vip, port, 6, 0, slot, 0), M.SVC_VAL.pack(12, 0, 0, 7, 0, 0))
        prog = LbProgram("skb", pin_dir)
        try:
            prog.cfg(FROM_CLUSTER)
            picks = {dest(prog.run(v4("10.0.1.5", "10.96.0.10", 41000 + i, 80))[1]) for i in range(30)}
            assert picks == {"10.1.0.1:8080", "10.1.0.2:8080"}
            # the first check after the initial sync sweeps them
            assert w.check() == 2
            assert w.read_back()["frontends"][label]["stray_slots"] == []
            assert len(w.maps["kpr_svc"].items()) == 1 and w.check() == 0
            assert dest(prog.run(v4("10.0.1.5", "10.96.0.10", 42000, 80))[1]) in picks
        finally:
            prog.b.cleanup()


def test_a_range_freed_in_a_batch_is_reused_only_by_a_later_one(pin_dir: Path) -> None:
    """A change writes the frontend's new kpr_slots range before the entry pointing at it and
    frees the old one after; a program that read the old entry just before may still read the
    old range, so no change of the same bus batch may take it."""

    def svc(name: str, vip: str, backend: Backend) -> Service:
        return Service(ServiceKey("default", name), (Frontend(CIP, vip, 80, TCP_, (backend,)),))

    def base(vip: str) -> int:
        raw = w.maps["kpr_svc"].lookup(M.SVC_KEY.pack(M.addr_to_bytes(vip), M.htons(80), 6, 0, 0, 0))
        return M.SVC_VAL.unpack(raw)[0]

    with ServiceMapWriter(pin_dir) as w:
        assert w.apply_batch([("upsert", svc("a", "10.96.5.1", B2)), ("sync", None)]) == {}
        old = base("10.96.5.1")
        # a's backend changes (a new range of the same size class) and b arrives, in one batch
        assert w.apply_batch([("upsert", svc("a", "10.96.5.1", be("10.1.0.4"))), ("upsert", svc("b", "10.96.5.2", B3))]) == {}
        assert old not in (base("10.96.5.1"), base("10.96.5.2"))
        # the next batch may take it
        assert w.apply_batch([("upsert", svc("c", "10.96.5.3", be("10.1.0.5")))]) == {}
        assert base("10.96.5.3") == old
        read = w.read_back()["frontends"]
        assert [read[f"10.96.5.{i}:80/TCP external"]["backends"] for i in (1, 2, 3)] == [
            ["10.1.0.4:8080"], ["10.1.0.3:8080"], ["10.1.0.5:8080"]
        ]
