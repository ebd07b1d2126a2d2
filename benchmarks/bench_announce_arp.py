"""announce_arp benchmarks (not a test): failover time and ARP reply rate. Prints figures.

    sudo .venv/bin/python benchmarks/bench_announce_arp.py [--quick]

1. Failover: three nodes (kpr agents in namespaces on a bridge) announce a LoadBalancer IP; the
   owner is killed with SIGKILL (and, separately, stopped with SIGTERM). Measured: from the
   signal to the router's neighbour entry naming the new owner, polled through netlink in the
   router's namespace every 5 ms, with no traffic from the router (only the new owner's
   gratuitous ARP can move the entry). Goal: under 2 s with the default timing
   (heartbeatInterval 0.2 s, deadInterval 1.0 s); MetalLB's layer 2 takes "a few seconds",
   Cilium's L2 announcements 10-20 s with default leases.
2. ARP replies (and neighbour advertisements) per second one node sustains: the router
   offers requests for the VIP at a fixed rate from a packet socket for a few seconds and
   counts the replies it gets back; once with one requester (routers and hosts repeat
   identical requests) and once with 50,000 distinct requesters (an ARP scan), with the BPF
   program answering (responder: auto) and with the Python responder (responder: python).
   The node's kernel answering for one of its own addresses from one requester, measured
   the same way in the same run, is the baseline. The floods come from a plain host on the
   segment (not the router: it would forward the replies meant for made-up requesters), and
   the kernel is never flooded from 50,000 requesters: its neighbour table, which all
   namespaces share, would overflow for everything else on the machine.

Everything runs in namespaces this script creates and removes (kpr.testing.netns.Topology).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernel"))

from announce_arp_env import VIP4, VIP6, Segment, flood, lb_manifest, node_ip4, node_ip6, segment, wait_for  # noqa: E402

from kpr.plugins.announce_arp import ownership  # noqa: E402
from kpr.testing.netns import Topology, in_netns  # noqa: E402

NODES = ["node1", "node2", "node3"]


class NeighWatch:
    """The router's neighbour entry for one address, read through netlink in its namespace."""

    def __init__(self, seg: Segment, vip: str):
        from pyroute2 import IPRoute

        with in_netns(seg.topo.namespaces["r"].path):
            self.ipr = IPRoute()  # the netlink socket stays in the router's namespace
        self.vip = vip
        self.ifindex = seg.topo.ifindex("r", "eth0")

    def mac(self) -> str | None:
        for msg in self.ipr.get_neighbours(dst=self.vip, ifindex=self.ifindex):
            mac = msg.get_attr("NDA_LLADDR")
            if mac and msg["state"] not in (0x01, 0x20):  # INCOMPLETE, FAILED
                return mac.lower()
        return None

    def close(self) -> None:
        self.ipr.close()


def failover_rounds(base: Path, rounds: int, sig: int, timing: dict, responder: str = "auto") -> list[float]:
    out = []
    with segment(base, announce={**timing, "responder": responder}) as seg:
        (seg.manifests / "lb.yaml").write_text(lb_manifest("lb", VIP4, NODES))
        for n in NODES:
            seg.start(n)
        seg.wait_ready(NODES)
        watch = NeighWatch(seg, VIP4)
        try:
            owner, nxt = ownership.rank(VIP4, NODES)[:2]
            for _ in range(rounds):
                wait_for(lambda: seg.owners(VIP4) == {owner}, 10, "owner")
                seg.resolve(VIP4)
                wait_for(lambda: watch.mac() == seg.nodes[owner].mac, 5, "router resolved the owner")
                want = seg.nodes[nxt].mac
                t0 = time.monotonic()
                seg.send_signal(owner, sig)
                while watch.mac() != want:
                    if time.monotonic() - t0 > 10:
                        raise RuntimeError("no failover within 10 s")
                    time.sleep(0.005)
                out.append(time.monotonic() - t0)
                seg.reap(owner)
                seg.start(owner)
                seg.wait_ready(NODES)
                wait_for(lambda: watch.mac() == seg.nodes[owner].mac, 10, "owner back")
        finally:
            watch.close()
            for n in NODES:
                if seg.nodes[n].proc is not None:
                    seg.stop(n)
    return out


# Offered request rates: a busy segment's worth, and more than one Python thread can take.
RATES = (5_000, 50_000)


def median_flood(seg: Segment, target: str, seconds: float, senders: int, rate: int, ns: str, repeat: int) -> tuple[float, int]:
    """The median reply rate of `repeat` floods (the sender shares this machine's CPUs)."""
    runs = sorted(flood(seg, target, seconds, senders, rate, ns=ns) for _ in range(repeat))
    return runs[len(runs) // 2]


def reply_rate(base: Path, seconds: float, responder: str, v6: bool = False, repeat: int = 3) -> dict[tuple[str, int], tuple[float, int]]:
    """Reply rates of one node answering with `responder` (auto: BPF; python), and of its
    kernel for its own address, measured in the same run."""
    vip, own = (VIP6, node_ip6(1)) if v6 else (VIP4, node_ip4(1))
    with segment(base, n_nodes=1, members=False) as seg:
        scanner = seg.add_host("f", 60)
        (seg.manifests / "lb.yaml").write_text(lb_manifest("lb", vip, ["node1"]))
        seg.start("node1", responder=responder)
        try:
            seg.wait_ready(["node1"])
            wait_for(lambda: seg.plugin("node1")["details"]["owned"] == [vip], 10, "owned")
            answering = seg.plugin("node1")["details"]["answering"]["eth0"]
            out = {}
            for rate in RATES:
                out[("kernel, node address, 1 requester", rate)] = median_flood(seg, own, seconds, 1, rate, scanner, repeat)
                out[(f"kpr {answering}, 1 requester", rate)] = median_flood(seg, vip, seconds, 1, rate, scanner, repeat)
                out[(f"kpr {answering}, 50k requesters", rate)] = median_flood(seg, vip, seconds, 50_000, rate, scanner, repeat)
            return out
        finally:
            seg.stop("node1")


def show(name: str, xs: list[float]) -> None:
    print(
        f"  {name:<44} median {statistics.median(xs) * 1000:7.0f} ms   min {min(xs) * 1000:6.0f}   "
        f"max {max(xs) * 1000:6.0f}   (n={len(xs)})"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 2 if args.quick else 5
    seconds = 1.0 if args.quick else 2.0
    repeat = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="kpr-bench-arp-") as tmp:
        base = Path(tmp)
        print("== failover: signal to the router's neighbour entry naming the new owner (goal < 2 s)")
        default = {"heartbeatInterval": 0.2, "deadInterval": 1.0}
        fast = {"heartbeatInterval": 0.1, "deadInterval": 0.5}
        kill = failover_rounds(base / "a", rounds, signal.SIGKILL, default)
        show("SIGKILL, heartbeat 0.2 s / dead 1.0 s", kill)
        show("  the same answered in Python (responder: python)", failover_rounds(base / "a2", rounds, signal.SIGKILL, default, "python"))
        show("SIGKILL, heartbeat 0.1 s / dead 0.5 s", failover_rounds(base / "b", rounds, signal.SIGKILL, fast))
        show("SIGTERM (leaving heartbeat), 0.2 s / 1.0 s", failover_rounds(base / "c", rounds, signal.SIGTERM, default))
        print(f"  goal < 2 s with the defaults: {'met' if max(kill) < 2.0 else 'NOT met'} (worst {max(kill):.2f} s)")
        print()
        for v6 in (False, True):
            what = "neighbour advertisements" if v6 else "ARP replies"
            print(f"== {what} per second (median of {repeat} floods of {seconds:.0f} s from a host on the segment; "
                  "x = ratio to the kernel's rate for its own address from one requester, same run)")
            for i, responder in enumerate(("auto", "python")):
                rates = reply_rate(base / f"d{int(v6)}{i}", seconds, responder, v6, repeat)
                for (name, offered), (replies, sent) in rates.items():
                    kernel = rates[("kernel, node address, 1 requester", offered)][0]
                    print(
                        f"  offered {offered:6d}/s  {name:<36} {replies:8.0f} replies/s"
                        f"   ({replies * seconds / max(sent, 1):6.1%} answered, {replies / kernel:5.2f}x the kernel's)"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
