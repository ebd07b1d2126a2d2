"""Map capacity is planned, not discovered: the real writer on scratch pin dirs.

A service that would overflow a map is refused on its own (and keeps its last good state)
while every other service is programmed; a write that fails half way is rolled back so the
kernel equals what status says; check() repairs differences made by hand with bpftool; the
default sizes hold 10k services x 10 endpoints.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from kpr.bpf import maps as M
from kpr.model import Backend, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import ServiceMapWriter
from kpr.testing.bpffs import pin_map

pytestmark = pytest.mark.kernel

CIP, NP, EIP = FrontendType.CLUSTER_IP, FrontendType.NODE_PORT, FrontendType.EXTERNAL_IP
TCP = Protocol.TCP
BACKENDS = (Backend("10.1.0.1", 8080), Backend("10.1.0.2", 8080))


def cluster_ip(name: str, vip: str, backends: tuple[Backend, ...] = BACKENDS) -> Service:
    return Service(ServiceKey("default", name), (Frontend(CIP, vip, 80, TCP, backends),))


def with_external_ips(name: str, n: int) -> Service:
    """A ClusterIP service with n externalIPs (198.18.0.0/15 has 131072 addresses)."""
    fes = [Frontend(CIP, "10.96.9.9", 80, TCP, BACKENDS)]
    fes += [Frontend(EIP, f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}", 80, TCP, BACKENDS) for i in range(n)]
    return Service(ServiceKey("default", name), tuple(fes))


WEB = cluster_ip("web", "10.96.0.10")
DNS = cluster_ip("dns", "10.96.0.53", (Backend("10.1.0.53", 53),))
LATER = cluster_ip("later", "10.96.0.20", (Backend("10.1.0.7", 8080),))


def frontends(w: ServiceMapWriter) -> set[str]:
    return {label.split()[0] for label in w.read_back()["frontends"]}


def kernel_equals_status(w: ServiceMapWriter) -> None:
    """The kernel holds exactly what the writer believes and what status reports."""
    kernel = w.kernel_counts()
    # (the arrays hold every index: kpr_slots counts what the service entries point at,
    # kpr_backend its non-zero entries)
    arrays = ("kpr_slots", "kpr_backend")
    assert {n: c for n, c in kernel.items() if n not in arrays} == {
        name: len(w.maps[name].items()) for name in M.SERVICE_MAPS if name not in arrays
    }
    assert kernel["kpr_backend"] == len(M.backend_items(w.maps["kpr_backend"]))
    assert kernel == w.entry_counts()
    counters = w.kpr_status().counters
    assert {name: int(counters[f"entries_{name}"]) for name in M.SERVICE_MAPS} == kernel
    assert "drift" not in w.kpr_status().details


def metric_counters(w: ServiceMapWriter) -> dict[str, float]:
    """kpr_plugin_counter{plugin="servicemaps"} as the agent's metrics endpoint serves it."""
    from kpr.metrics import _PluginCollector

    class Agent:
        def plugin_statuses(self) -> dict:
            st = w.kpr_status()
            return {"servicemaps": {"healthy": st.healthy, "counters": st.counters}}

    return {
        s.labels["counter"]: s.value
        for family in _PluginCollector(Agent()).collect()
        for s in family.samples
        if s.name == "kpr_plugin_counter" and s.labels["plugin"] == "servicemaps"
    }


def test_a_service_with_100k_external_ips_is_refused_alone(pin_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    huge = with_external_ips("huge", 100_000)
    with ServiceMapWriter(pin_dir, create_datapath_maps=False) as w:
        w.upsert(WEB)
        w.upsert(DNS)
        before = w.read_back()
        with caplog.at_level(logging.ERROR, logger="kpr.servicemaps"):
            w.upsert(huge)  # refused: no exception, nothing written
        assert w.read_back() == before
        # (100001 frontends fit kpr_svc and their slots kpr_slots; not 100001 rev-NAT indexes)
        assert "event=service_refused service=default/huge map=kpr_revnat" in caplog.text
        st = w.kpr_status()
        assert "kpr_revnat full" in st.details["refused"]["default/huge"]
        assert "bpf.mapSizes.kprRevnat" in st.details["refused"]["default/huge"]
        assert (st.counters["refused"], st.counters["refusals"], st.counters["errors"]) == (1, 1, 0)
        assert not st.healthy and "default/huge" in st.message
        assert metric_counters(w)["refusals"] == 1, "counted in the agent's metrics"
        # The same state re-delivered (a level resync) is not rendered again.
        w.upsert(huge)
        assert w.kpr_status().counters["refusals"] == 1
        # Later services still program.
        w.upsert(LATER)
        assert frontends(w) == {"10.96.0.10:80/TCP", "10.96.0.53:80/TCP", "10.96.0.20:80/TCP"}
        kernel_equals_status(w)

        # A full sync (the initial state) refuses it too, and programs everything else.
        w.full_sync([WEB, huge, DNS, LATER])
        assert frontends(w) == {"10.96.0.10:80/TCP", "10.96.0.53:80/TCP", "10.96.0.20:80/TCP"}
        assert list(w.refused) == [huge.key]
        kernel_equals_status(w)

        # Deleting it clears the refusal.
        w.delete(huge.key)
        assert w.refused == {} and w.kpr_status().healthy


def test_a_refused_service_keeps_its_last_good_state(pin_dir: Path) -> None:
    small, huge = with_external_ips("huge", 10), with_external_ips("huge", 100_000)
    with ServiceMapWriter(pin_dir, create_datapath_maps=False) as w:
        w.upsert(WEB)
        w.upsert(small)
        good = w.read_back()
        w.upsert(huge)
        assert w.read_back() == good, "the 10 externalIPs it had stay served"
        assert list(w.refused) == [huge.key]
        # Back to a state that fits: programmed at once.
        w.upsert(small)
        assert w.refused == {} and w.read_back() == good
        w.upsert(huge)
        before_ids = w.backend_ids()
    # After a restart, the initial full sync keeps what the maps hold for it, too.
    with ServiceMapWriter(pin_dir, create_datapath_maps=False) as w2:
        w2.full_sync([WEB, huge])
        assert w2.read_back() == good
        assert list(w2.refused) == [huge.key]
        assert w2.backend_ids() == before_ids
        kernel_equals_status(w2)


def test_a_refused_service_is_programmed_once_entries_are_freed(pin_dir: Path) -> None:
    # kpr_svc holds 3 entries (one per frontend): WEB and DNS fit, BIG (2 frontends) does not.
    big = Service(
        ServiceKey("default", "big"),
        tuple(Frontend(CIP, f"10.96.1.{i}", 80, TCP, BACKENDS) for i in range(1, 3)),
    )
    with ServiceMapWriter(pin_dir, sizes={"kpr_svc": 3}, create_datapath_maps=False) as w:
        w.upsert(WEB)
        w.upsert(DNS)
        w.upsert(big)
        assert list(w.refused) == [big.key]
        assert w.refused[big.key].map == "kpr_svc"
        w.delete(WEB.key)  # frees 1 entry: big (2) now fits beside DNS (1)
        assert w.refused == {}
        assert frontends(w) == {"10.96.0.53:80/TCP", "10.96.1.1:80/TCP", "10.96.1.2:80/TCP"}
        kernel_equals_status(w)


def stray_svc_entry(i: int) -> tuple[bytes, bytes]:
    key = M.SVC_KEY.pack(M.addr_to_bytes(f"10.200.0.{i}"), M.htons(80), 6, 0, 0, 0)
    return key, M.SVC_VAL.pack(0, 0, 0, 9000 + i, M.SVC_F_CLUSTER_IP, 0)


def test_a_failed_write_is_rolled_back_and_the_kernel_equals_status(pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir, sizes={"kpr_svc": 16}, create_datapath_maps=False) as w:
        w.upsert(DNS)  # 1 entry
        # Someone fills the map behind the writer's back: the plan says WEB (1 entry, its
        # slots in kpr_slots) fits, the kernel has no room for it.
        for i in range(15):
            w.maps["kpr_svc"].update(*stray_svc_entry(i))
        with pytest.raises(OSError, match="kpr_svc"):
            w.upsert(WEB)
        st = w.kpr_status()
        assert (st.counters["errors"], st.counters["rollbacks"]) == (1, 1)
        # No partial batch left: the maps hold exactly the state before the change (the
        # hand-made entries went too: nobody wants them).
        assert frontends(w) == {"10.96.0.53:80/TCP"}
        kernel_equals_status(w)
        # The bus retries the delivery: now it fits.
        w.upsert(WEB)
        assert frontends(w) == {"10.96.0.53:80/TCP", "10.96.0.10:80/TCP"}
        kernel_equals_status(w)


def test_a_full_sync_beyond_the_map_at_its_peak_deletes_first(pin_dir: Path) -> None:
    # 4 entries: the old state (WEB, DNS: 2) and the new one (three services: 3) do not fit
    # side by side, the new one alone does.
    new = [cluster_ip(f"n{i}", f"10.96.2.{i}", (Backend(f"10.2.0.{i}", 80),)) for i in range(3)]
    with ServiceMapWriter(pin_dir, sizes={"kpr_svc": 4}, create_datapath_maps=False) as w:
        w.full_sync([WEB, DNS])
        w.full_sync(new)
        assert frontends(w) == {f"10.96.2.{i}:80/TCP" for i in range(3)}
        assert w.refused == {} and w.errors == 0
        kernel_equals_status(w)


def bpftool(*args: str) -> None:
    subprocess.run(["bpftool", *args], check=True, capture_output=True)


def hexbytes(raw: bytes) -> list[str]:
    return [f"0x{b:02x}" for b in raw]


def test_check_repairs_entries_added_changed_and_deleted_with_bpftool(pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir, create_datapath_maps=False) as w:
        w.upsert(WEB)
        w.upsert(DNS)
        before = w.read_back()
        assert w.check() == 0, "nothing to repair"
        svc = str(pin_dir / "kpr_svc")
        # a stray frontend, a changed backend slot, a changed backend, a deleted rev-NAT entry
        key, val = stray_svc_entry(1)
        bpftool("map", "update", "pinned", svc, "key", "hex", *[h[2:] for h in hexbytes(key)], "value", "hex", *[h[2:] for h in hexbytes(val)])
        web_head = next(v for k, v in w.maps["kpr_svc"].items() if k[:16] == M.addr_to_bytes("10.96.0.10"))
        slot1 = M.U32.pack(M.SVC_VAL.unpack(web_head)[0])  # WEB's slot 1 in kpr_slots
        bpftool("map", "update", "pinned", str(pin_dir / "kpr_slots"), "key", "hex", *[h[2:] for h in hexbytes(slot1)],
                "value", "hex", *[h[2:] for h in hexbytes(M.SLOT.pack(777, 0))])
        bid = w.backend_ids()["10.1.0.53:53/TCP"]
        bad = M.BACKEND.pack(M.addr_to_bytes("10.66.6.6"), M.htons(53), 6, 0, 0)
        bpftool("map", "update", "pinned", str(pin_dir / "kpr_backend"), "key", "hex", *[h[2:] for h in hexbytes(M.U32.pack(bid))],
                "value", "hex", *[h[2:] for h in hexbytes(bad)])
        rn = next(iter(w.maps["kpr_revnat"].items()))[0]
        bpftool("map", "delete", "pinned", str(pin_dir / "kpr_revnat"), "key", "hex", *[h[2:] for h in hexbytes(rn)])

        st = w.kpr_status()
        assert st.details["drift"] == {
            "kpr_svc": {"kernel": 3, "desired": 2}, "kpr_revnat": {"kernel": 1, "desired": 2}
        }, "status counts what the kernel holds"
        assert "maps differ from the desired state in kpr_revnat, kpr_svc" in st.message
        n = w.check()
        assert n == 5, n  # one delete; WEB's range (2 slots), the backend, the rev-NAT entry written
        assert w.read_back() == before
        assert w.kpr_status().counters["repairs"] == 5
        assert w.check() == 0
        kernel_equals_status(w)


def test_a_backend_the_repair_writes_back_keeps_its_id_to_itself(pin_dir: Path) -> None:
    """check() writes back a backend deleted by hand: a service added afterwards gets a new id,
    not the written-back one (new ids come from a counter that must stay above every id in use)."""
    with ServiceMapWriter(pin_dir, create_datapath_maps=False) as w:
        w.upsert(cluster_ip("a", "10.96.1.1"))
        ids_a = w.backend_ids()
        top = max(ids_a.values())
        w.maps["kpr_backend"].update(M.U32.pack(top), bytes(M.BACKEND.size))  # the newest backend, gone by hand
        assert w.check() == 1
        w.upsert(cluster_ip("b", "10.96.1.2", (Backend("10.2.0.1", 8080),)))
        ids = w.backend_ids()
        assert ids["10.2.0.1:8080/TCP"] not in ids_a.values(), ids
        assert {k: ids[k] for k in ids_a} == ids_a
        read = w.read_back()["backends"]
        name_of_top = next(name for name, bid in ids_a.items() if bid == top)
        assert read[top]["address"] == name_of_top.split(":")[0], "the written-back backend is still itself"
        assert read[ids["10.2.0.1:8080/TCP"]]["address"] == "10.2.0.1"
        kernel_equals_status(w)


def test_the_check_runs_periodically_once_started(pin_dir: Path) -> None:
    import time

    w = ServiceMapWriter(pin_dir, create_datapath_maps=False, check_interval=0.2)
    w.kpr_start(context=None)
    try:
        assert w.apply_batch([("upsert", WEB), ("sync", None)]) == {}  # as the writer stage hands them
        before = w.read_back()
        w.maps["kpr_svc"].update(*stray_svc_entry(7))
        deadline = time.monotonic() + 5
        while w.repairs == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.repairs == 1 and w.read_back() == before
    finally:
        w.kpr_stop(context=None)


def ten_k_services() -> list[Service]:
    """10k services x 10 endpoints: every one a ClusterIP, every third also a NodePort on two
    node addresses (and the wildcard entry)."""
    out = []
    for i in range(10_000):
        bes = tuple(Backend(f"10.{64 + i // 6400}.{i // 25 % 256}.{i % 25 * 10 + j}", 8080) for j in range(10))
        fes = [Frontend(CIP, f"10.96.{i // 256}.{i % 256}", 80, TCP, bes)]
        if i % 3 == 0:
            port = 30000 + i // 3
            fes += [Frontend(NP, a, port, TCP, bes) for a in ("192.168.1.10", "192.168.2.10")]
        out.append(Service(ServiceKey("bench", f"svc-{i}"), tuple(fes)))
    return out


def test_the_default_sizes_hold_10k_services_x_10_endpoints(pin_dir: Path) -> None:
    with ServiceMapWriter(pin_dir) as w:  # every map, default sizes, as the agent makes them
        w.full_sync(ten_k_services())
        assert w.refused == {} and w.errors == 0
        counts = w.kernel_counts()
        assert counts["kpr_svc"] == 10_000 + 3334 * 3
        assert counts["kpr_slots"] == (10_000 + 3334 * 3) * 12  # ranges of 10 slots take the class of 12
        assert counts["kpr_backend"] == 100_000
        assert counts["kpr_revnat"] == 10_000 + 3334 * 3
        assert counts == w.entry_counts()
        for name, n in counts.items():
            assert n <= M.SPECS[name].max_entries


def test_a_service_that_shrinks_makes_room_for_a_refused_one(pin_dir: Path) -> None:
    wide = Service(ServiceKey("default", "wide"), tuple(Frontend(CIP, f"10.96.3.{i}", 80, TCP, BACKENDS) for i in range(1, 3)))
    with ServiceMapWriter(pin_dir, sizes={"kpr_svc": 2}, create_datapath_maps=False) as w:
        w.upsert(wide)  # 2 entries
        w.upsert(WEB)  # 1 more does not fit
        assert list(w.refused) == [WEB.key]
        w.upsert(Service(wide.key, wide.frontends[:1]))  # gives 1 back
        assert w.refused == {}
        assert frontends(w) == {"10.96.3.1:80/TCP", "10.96.0.10:80/TCP"}
        kernel_equals_status(w)


def test_a_map_pinned_with_an_earlier_default_size_is_kept(
    kernel_headers: Path, pin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kpr.bpf.inline import inline_includes
    from kpr.bpf.loader import compile_and_load

    map_id = pin_map(pin_dir, "kpr_svc", replace(M.SPECS["kpr_svc"], max_entries=65536))
    with caplog.at_level(logging.WARNING, logger="kpr.servicemaps"):
        w = ServiceMapWriter(pin_dir, create_datapath_maps=False).open()
    try:
        assert "event=servicemaps_pinned_size map=kpr_svc pinned=65536 default=262144" in caplog.text
        assert w.ids()["kpr_svc"] == map_id and w.limits["kpr_svc"] == 65536
        assert w.kpr_status().counters["max_entries_kpr_svc"] == 65536
        # Programs compiled with the default sizes use the pinned map as it is.
        b = compile_and_load(inline_includes('#include "lib/maps.h"\nint noop(void *ctx) { return 0; }\n'), cflags=M.cflags(pin_dir))
        try:
            assert M.obj_info(b[b"kpr_svc"].map_fd).id == map_id
        finally:
            b.cleanup()
    finally:
        w.close()
    # A size set in bpf.mapSizes must match the pin.
    with pytest.raises(M.MapIncompatible, match="max_entries 65536 \\(want 262144\\)"):
        ServiceMapWriter(pin_dir, sizes={"kpr_svc": 262144}, create_datapath_maps=False).open()
