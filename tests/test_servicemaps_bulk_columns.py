"""The writer's bulk full sync reads compact IPv4 Backends by their bytes (kpr.servicemaps.bulk:
_compact4, _flag_bits, _keys4): the same keys, states and node-local flags as read through
each Backend's properties, and no property read per backend on the way."""

from __future__ import annotations

import random

import pytest

from kpr.model import Backend, BackendState, Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.servicemaps import bulk


def _backends(rnd: random.Random, n: int) -> list[Backend]:
    return [
        Backend(
            f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(256)}",
            rnd.choice((0, 80, 8080, 65535, rnd.randrange(65536))),
            state=BackendState.TERMINATING if rnd.random() < 0.2 else BackendState.ACTIVE,
            local=rnd.random() < 0.3,
            node_name=rnd.choice(("", "node1", "node2")),
            zone=rnd.choice(("", "z1")),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("chunk", [7, 4096], ids=["small-pieces", "one-piece"])
@pytest.mark.parametrize("seed", range(5))
def test_columns_read_from_the_bytes_equal_the_properties(seed: int, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk, "_CHUNK", chunk)
    rnd = random.Random(seed)
    counts = [rnd.randrange(0, 12) for _ in range(200)]
    protos = [rnd.choice(list(Protocol)) for _ in counts]
    flat = _backends(rnd, sum(counts))
    joined = bulk._compact4(flat)
    assert joined is not None and len(joined) == -(-len(flat) // chunk)
    ports = [b.port for b in flat]
    assert bulk._keys4(joined, protos, counts) == bulk._backend_keys(flat, ports, protos, counts)
    one = [Protocol.UDP] * len(counts)
    assert bulk._keys4(joined, one, counts) == bulk._backend_keys(flat, ports, one, counts)
    assert list(bulk._flag_bits(joined, bulk._TERMINATING_BITS)) == [b.state is BackendState.TERMINATING for b in flat]
    assert list(bulk._locals(flat, joined)) == [b.local for b in flat]
    assert bulk._locals(flat, joined) is not None and list(bulk._locals(flat, None)) == [b.local for b in flat]


def test_other_backends_are_not_read_by_their_bytes() -> None:
    v4 = Backend("10.0.0.1", 80)
    for flat in ([], [v4, Backend("fd00::1", 80)], [v4, Backend("10.0.0.2", 80, node_name="n" * 300)]):
        assert bulk._compact4(flat) is None
    none_local = [v4, Backend("10.0.0.2", 80, node_name="node1")]
    assert bulk._locals(none_local, bulk._compact4(none_local)) is None
    assert bulk._locals(none_local, None) is None


def test_the_bulk_path_reads_no_backend_property(monkeypatch: pytest.MonkeyPatch) -> None:
    """200k backends at 20k services: three properties read per backend (state, port, local)
    took about 0.1 s of the initial sync; their bytes are read instead."""
    rnd = random.Random(7)

    def services(terminating: bool) -> list[Service]:
        out = []
        for i in range(100):
            bes = _backends(rnd, 10)
            if not terminating:
                bes = [Backend(b.address, b.port, local=b.local, node_name=b.node_name, zone=b.zone) for b in bes]
            out.append(Service(ServiceKey("ns", f"s{i:03d}"),
                               (Frontend(FrontendType.CLUSTER_IP, f"10.96.0.{i + 1}", 80, Protocol.TCP, tuple(bes)),)))
        return out

    mixed = services(True)
    common = bulk.BulkMixin._common(None, mixed)  # type: ignore[arg-type]
    assert common is not None
    # a service with a terminating backend goes to the general path, by the same rule as before
    assert [s.key for s in common[0]] == [
        s.key for s in mixed if all(b.state is BackendState.ACTIVE for b in s.frontends[0].backends)
    ]
    assert [s.key for s in common[8]] == sorted(set(s.key for s in mixed) - set(s.key for s in common[0]))

    active = services(False)
    reads: list[str] = []
    for name in ("port", "state", "local", "address"):
        prop = getattr(Backend, name)
        monkeypatch.setattr(Backend, name, property(lambda b, _n=name, _p=prop: reads.append(_n) or _p.fget(b)))
    common = bulk.BulkMixin._common(None, active)  # type: ignore[arg-type]
    locals_ = bulk._locals(common[6], common[9])
    assert reads == []
    monkeypatch.undo()
    assert [s.key for s in common[0]] == [s.key for s in active]
    assert list(locals_) == [b.local for b in common[6]]
    assert common[7] == bulk._backend_keys(common[6], [b.port for b in common[6]], [Protocol.TCP] * 100, common[5])
