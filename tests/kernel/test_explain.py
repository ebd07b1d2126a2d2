"""`kpr explain` against the data path: the flow hash equals the C one, and the backend explain
names is the one real traffic reaches (Maglev over many source ports, affinity), drops and
refusals carry the drop counters' reasons, and the maps read back equal the desired state.

Topology: tc_nodeport_env's two-node cluster (client cl behind a router, pods on both nodes).
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr import cli, drops
from kpr.bpf import maps as M
from kpr.bpf.flowhash import tuple_hash, tuple_hash_raw
from kpr.bpf.loader import compile_and_load, load_prog
from kpr.explain import parse_target
from kpr.testing.fixtures import clear_after
from kpr.explain import explain as run_explain
from kpr.model import Frontend, FrontendType, Protocol, Service, ServiceKey
from kpr.readback import DatapathMaps, differences
from kpr.servicemaps import ALGORITHM_ANNOTATION
from kpr.testing.prog_run import test_run

from tc_nodeport_env import CLIENT, NODES, PODS, PY, Cluster, backends, client, name_and_peer, on_node_address, one_device_cluster

pytestmark = pytest.mark.kernel

NP = FrontendType.NODE_PORT
TCP, UDP = Protocol.TCP, Protocol.UDP
N1 = NODES["node1"]["addr"]
ALL = ("p1a", "p1b", "p2a", "p2b")

# Reads a struct kpr_tuple after a 14-byte pad (SCHED_CLS test runs need an Ethernet header's
# worth) and returns kpr_tuple_hash() of it.
HASH_PROG = r"""
#include "lib/common.h"
int kpr_t_hash(struct __sk_buff *skb)
{
	struct kpr_tuple t = {};

	if (bpf_skb_load_bytes(skb, 14, &t, sizeof(t)) < 0)
		return 0;
	return kpr_tuple_hash(&t);
}
"""
TUPLE = struct.Struct("=16s16sHHBBBB")  # struct kpr_tuple

# One UDP datagram per source port, printed as {"sport": P, "answer": "<pod> <peer>"}.
SPORTS = r"""
import json, socket, sys
host, port, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for sp in range(first, first + n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", sp))
    try:
        s.sendto(b"hi", (host, port))
        print(json.dumps({"sport": sp, "answer": s.recv(256).decode()}), flush=True)
    except OSError as e:
        print(json.dumps({"sport": sp, "error": str(e)}), flush=True)
    finally:
        s.close()
"""


def test_flow_hash_equals_the_programs(kernel_headers: Path) -> None:
    rnd = random.Random(16)
    with compile_and_load(HASH_PROG, name="flowhash_t.c") as b:
        fd = load_prog(b, "kpr_t_hash", "SCHED_CLS").fd
        for i in range(300):
            v6 = i % 3 == 0
            if v6:
                s, d = rnd.randbytes(16), rnd.randbytes(16)
            else:
                s = M.addr_to_bytes(".".join(str(rnd.randrange(256)) for _ in range(4)))
                d = M.addr_to_bytes(".".join(str(rnd.randrange(256)) for _ in range(4)))
            sport, dport, proto = rnd.randrange(65536), rnd.randrange(65536), rnd.choice((6, 17, 132))
            data = b"\0" * 14 + TUPLE.pack(s, d, sport, dport, proto, 6 if v6 else 4, 0, 0)
            got = test_run(fd, data).retval
            assert got == tuple_hash_raw(s, d, sport, dport, proto), (i, s.hex(), d.hex(), sport, dport, proto)


@pytest.fixture(scope="module")
def env(require_kernel: None) -> Iterator[Cluster]:
    with one_device_cluster() as c:
        yield c


_clean = clear_after("env")


def _svc(name: str, port: int, *pods: str, maglev: bool = False, **kw: object):
    return on_node_address(name, port, *pods, annotations=((ALGORITHM_ANNOTATION, "maglev"),) if maglev else (), **kw)


def _explain(env: Cluster, target: str, src: str | None = None, sport: int | None = None) -> dict:
    return run_explain(env.pins["node1"], parse_target(target), source=src, sport=sport, via="device", device="eth0")


def _pod_of(backend: dict) -> str:
    return next(p for p, (_n, ip4, _ip6) in PODS.items() if ip4 == backend["address"])


def test_maglev_backend_explain_names_is_the_one_traffic_reaches(env: Cluster) -> None:
    env.apply(_svc("mag", 30090, *ALL, maglev=True))
    first, n = 20000, 48
    predicted = {}
    for sp in range(first, first + n):
        r = _explain(env, f"{N1}:30090/UDP", CLIENT, sp)
        assert r["verdict"] == "forward" and r["by"] == "maglev" and r["hook"] == "tc on eth0", r
        assert r["maglev"]["hash"] == tuple_hash(CLIENT, sp, N1, 30090, 17)
        predicted[sp] = _pod_of(r["backend"])
    assert len(set(predicted.values())) >= 3, predicted  # the ports spread: the check has teeth
    out = env.topo.run("cl", [PY, "-c", SPORTS, N1, "30090", str(first), str(n)], timeout=120).stdout
    reached = {}
    for line in out.splitlines():
        row = json.loads(line)
        assert "answer" in row, row
        reached[row["sport"]] = row["answer"].split()[0]
    assert reached == predicted
    # Now tracked: explain says so, with the same backend.
    r = _explain(env, f"{N1}:30090/UDP", CLIENT, first)
    assert r["by"] == "conntrack" and _pod_of(r["backend"]) == predicted[first]


def test_affinity_names_the_remembered_backend(env: Cluster) -> None:
    env.apply(_svc("aff", 30091, *ALL, proto=TCP, affinity_timeout=300))
    before = _explain(env, f"{N1}:30091", CLIENT)
    assert before["by"] == "random" and before["backend"] is None
    first = name_and_peer(client(env.topo, "tcp", N1, 30091, 1))[0][0]
    r = _explain(env, f"{N1}:30091", CLIENT)
    assert r["by"] == "affinity" and _pod_of(r["backend"]) == first
    assert {p for p, _ in name_and_peer(client(env.topo, "tcp", N1, 30091, 4))} == {first}


def test_drops_and_refusals_carry_the_counter_reasons(env: Cluster) -> None:
    env.apply(_svc("empty", 30092))
    env.apply(_svc("localonly", 30093, "p2a", external_local=True))
    env.apply(_svc("ranged", 30094, "p1a", source_ranges=("192.0.2.0/24",)))
    r = _explain(env, f"{N1}:30092/UDP", CLIENT, 1234)
    assert (r["verdict"], r["reason"]) == ("drop", "no_backend")
    r = _explain(env, f"{N1}:30093/UDP", CLIENT, 1234)
    assert (r["verdict"], r["reason"], r["service"]["trafficPolicy"]) == ("drop", "no_local_backend", "Local")
    r = _explain(env, f"{N1}:30094/UDP", CLIENT, 1234)
    assert (r["verdict"], r["reason"]) == ("drop", "source_range") and r["sourceRanges"]["allowed"] is False
    assert _explain(env, f"{N1}:30094/UDP", "192.0.2.7", 1234)["verdict"] == "forward"
    # The per-packet path agrees: the drop counters of those reasons move.
    before = env.stats("node1")
    client(env.topo, "udp", N1, 30093, 1, "timeout=0.5")
    client(env.topo, "udp", N1, 30094, 1, "timeout=0.5")
    after = env.stats("node1")
    assert after["drop_no_local_backend"] > before["drop_no_local_backend"]
    assert after["drop_source_range"] > before["drop_source_range"]
    # ... and kpr_drops_total{hook="tc"} carries them under the reasons explain gave.
    by_reason = drops.drops("tc_nodeport", env.plugins["node1"].kpr_status().counters)
    assert by_reason["no_local_backend"] >= 1 and by_reason["source_range"] >= 1


def test_no_service_exits_1(env: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    pin = str(env.pins["node1"])
    assert cli.main(["explain", f"{N1}:31999/TCP", "--pin-path", pin, "--via", "device", "eth0"]) == 1
    assert "is no service" in capsys.readouterr().out
    env.apply(_svc("web", 30095, "p1a", proto=TCP))
    assert cli.main(["explain", f"{N1}:30095", "--from", f"{CLIENT}:4000", "--pin-path", pin, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["verdict"] == "forward" and r["backend"]["address"] == "10.244.1.11"
    assert cli.main(["explain", "nonsense:80", "--pin-path", pin]) == 2
    assert "not an IP address" in capsys.readouterr().err


def test_maps_read_back_equal_the_desired_state_after_churn(env: Cluster) -> None:
    w = env.writers["node1"]
    rnd = random.Random(7)
    for i in range(40):
        pods = tuple(rnd.sample(ALL, rnd.randrange(0, 4)))
        env.apply(_svc(f"churn{i % 7}", 30100 + i % 7, *pods, maglev=bool(i % 2), affinity_timeout=60 * (i % 3)))
        if i % 5 == 4:
            env.delete(ServiceKey("default", f"churn{(i * 3) % 7}"))
    assert differences(w) == {"count": 0, "first": [], "maps": {}}
    with DatapathMaps(env.pins["node1"]) as dm:
        rows = {(r["address"], r["port"]): r for r in dm.frontends()}
    for key, make in env.applied.items():
        fe = make("node1").frontends[0]
        row = rows[(fe.address, fe.port)]
        want = sorted((b.address, b.port) for b in fe.backends)
        assert sorted((b["address"], b["port"]) for b in row["backends"]) == want, key
        assert row["algorithm"] == ("maglev" if "maglev" in str(make("node1").annotations) else "random")
    # A difference made by hand with bpftool is reported.
    fe = next(iter(env.applied.values()))("node1").frontends[0]
    key = M.SVC_KEY.pack(M.addr_to_bytes(fe.address), M.htons(fe.port), 17, 0, 0, 0)
    val = M.SVC_VAL.pack(0, 0, 0, 4242, M.SVC_F_NODE_PORT, 0)
    done = subprocess.run(
        ["bpftool", "map", "update", "pinned", str(env.pins["node1"] / "kpr_svc"), "key", "hex", *key.hex(" ").split(),
         "value", "hex", *val.hex(" ").split()],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    d = differences(w)
    assert d["count"] == 1 and d["maps"] == {"kpr_svc": 1}
    assert f"{fe.address}:{fe.port}/UDP external: kernel value (slots at 0," in d["first"][0]
    w.check()
    assert differences(w)["count"] == 0, differences(w)


def test_load_balancer_and_wildcard_node_port(env: Cluster) -> None:
    from tc_nodeport_env import loadbalancer

    env.apply(loadbalancer("lbx", "203.0.113.9", "p2a", proto=UDP, port=53))
    r = _explain(env, "203.0.113.9:53/UDP", CLIENT, 5353)
    assert r["service"]["type"] == "LoadBalancer" and _pod_of(r["backend"]) == "p2a"
    assert name_and_peer(client(env.topo, "udp", "203.0.113.9", 53, 1))[0][0] == "p2a"
    # Its address on another port: no service, but tc drops it (vip_unserved), as explain says.
    r = _explain(env, "203.0.113.9:54/UDP", CLIENT, 5354)
    assert (r["verdict"], r["reason"], r["service"]) == ("drop", drops.VIP_UNSERVED, None), r
    before = env.stats("node1")["drop_vip_unserved"]
    client(env.topo, "udp", "203.0.113.9", 54, 1, "sport=5354", "timeout=0.5")
    assert env.stats("node1")["drop_vip_unserved"] == before + 1
    # A NodePort on the wildcard entry: any node address leads there.
    wild = Service(ServiceKey("default", "wild"), (Frontend(NP, "0.0.0.0", 30096, UDP, backends("node1", "p1b")),))
    env.writers["node1"].upsert(wild)
    try:
        r = _explain(env, f"{N1}:30096/UDP", CLIENT, 5353)
        assert r["service"]["entry"] == "0.0.0.0:30096/UDP" and _pod_of(r["backend"]) == "p1b"
        assert any("wildcard" in s for s in r["steps"])
    finally:
        env.writers["node1"].delete(wild.key)


def test_external_ip_and_external_traffic_policy_local(env: Cluster) -> None:
    ext = FrontendType.EXTERNAL_IP

    def make(node: str) -> Service:
        fe = Frontend(ext, "203.0.113.20", 8443, TCP, backends(node, "p1a", "p2a"), external_local=True)
        return Service(ServiceKey("default", "extl"), (fe,))

    env.apply(make)
    r = _explain(env, "203.0.113.20:8443", CLIENT, 4321)
    assert r["service"]["type"] == "ExternalIP" and r["service"]["trafficPolicy"] == "Local"
    # Local: only the pod on node1 is selectable here, so the pick is exact, and traffic agrees.
    assert [_pod_of(b) for b in r["backends"]] == ["p1a"] and _pod_of(r["backend"]) == "p1a"
    assert {p for p, _ in name_and_peer(client(env.topo, "tcp", "203.0.113.20", 8443, 3))} == {"p1a"}


def test_without_via_the_nodeport_device(env: Cluster) -> None:
    env.apply(_svc("autovia", 30097, "p1a", proto=TCP))
    r = run_explain(env.pins["node1"], parse_target(f"{N1}:30097"), source=CLIENT, sport=999)
    assert r["hook"] == "tc on eth0" and _pod_of(r["backend"]) == "p1a"


def test_host_port(env: Cluster) -> None:
    env.apply(on_node_address("hostport", 8088, "p1b", proto=TCP, type_=FrontendType.HOST_PORT))
    r = _explain(env, f"{N1}:8088", CLIENT, 777)
    assert r["service"]["type"] == "HostPort" and _pod_of(r["backend"]) == "p1b"
    assert name_and_peer(client(env.topo, "tcp", N1, 8088, 1))[0][0] == "p1b"
